"""Top-1 accuracy of a group's members and of its ensemble, as the trainer measures it."""

from __future__ import annotations

import torch

from .data import Source
from .precision import autocast, memory_format


@torch.inference_mode()
def accuracy(models, data: Source, split: str, config, exchange=None) -> tuple[list[float], float]:
    """Top-1 of every member and of the group ensemble (mean softmax) on ``split`` (test or
    val), as fractions, at the run's precision and memory format. ``exchange``
    (member-parallel runs) turns this rank's members' logits into the group's."""
    for model in models:
        model.eval()
    correct, ensemble_correct = 0, 0
    for images, labels in data.eval_batches(split, config.run.eval_batch_size):
        images = images.contiguous(memory_format=memory_format(config.run.channels_last))
        with autocast(config.run.precision, images.device):
            logits = torch.stack([model(images) for model in models]).float()
        if exchange is not None:
            logits = exchange(logits)
        correct = correct + (logits.argmax(-1) == labels).sum(1)
        ensemble_correct = ensemble_correct + (logits.softmax(-1).mean(0).argmax(-1) == labels).sum()
    count = data.size(split)
    return [c / count for c in correct.tolist()], ensemble_correct.item() / count


def pivot_accuracy(pivot: torch.nn.Module, data: Source, config) -> dict:
    """The pivot's own test (and validation) top-1: a refined pivot moves during the run."""
    return {"pivot_test_acc": accuracy([pivot], data, "test", config)[0][0],
            "pivot_val_acc": accuracy([pivot], data, "val", config)[0][0] if config.data.val_size else None}
