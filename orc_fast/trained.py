"""A trained run, loaded for use outside the trainer: its members, class names and normalisation.

``load_trained`` reads a run folder (its ``latest.pt``, or ``latest.json`` for a
member-parallel run), a checkpoint file, or a member-parallel manifest, and rebuilds every
member from its architecture name and weights (docs/design.md §5). ``Classifier`` is one
member, or the group's ensemble, with the run's input normalisation built in: what
``python -m orc_fast.evaluate`` measures and ``python -m orc_fast.export`` writes out.

Checkpoints carry the class names, image size and normalisation statistics (mean and std
of the training images, per channel). Older ones lack them; they are then recomputed from
the run's training data exactly as the trainer computed them, and ``TrainedRun.note`` says
so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import checkpoint
from .data import DataError, load_dataset, standardize
from .errors import UsageError
from .models import build_model
from .report import final_record
from .run_folder import RunFolder


@dataclass
class TrainedRun:
    path: Path  # the checkpoint file (or manifest) read
    config: dict  # the run's configuration, as the trainer resolved it
    epoch: int  # epochs trained
    models: list[nn.Module]  # every member, in order, in eval mode, on the CPU
    classes: list[str]
    image_size: int
    mean: torch.Tensor  # [3], in [0, 1] units
    std: torch.Tensor
    final: dict | None  # accuracies of the last evaluated epoch and the best member (train.final_record)
    note: str | None = None  # how missing normalisation or class names were filled in

    @property
    def best_member(self) -> int | None:
        """The member with the best validation accuracy (None: trained without a validation split)."""
        return None if self.final is None else self.final["best_member"]


def read_checkpoint(source) -> tuple[Path, dict]:
    """(the file read, one checkpoint dict holding every member); raises CheckpointError."""
    path = Path(source)
    if path.is_dir():
        found = RunFolder(path).checkpoint_file()
        if found is None:
            raise checkpoint.CheckpointError(f"{path} holds no checkpoint ({RunFolder.LATEST} or "
                                             f"{RunFolder.LATEST_MANIFEST})")
        path = found
    if path.suffix != ".json":
        return path, checkpoint.load(path)
    # Member-parallel: one file per rank, each with a contiguous block of members; the
    # manifest names the complete set in rank order.
    manifest, _, error = checkpoint.read_manifests(path, RunFolder(path.parent))
    if error is None:
        sizes = (manifest.get("world_size"), manifest.get("num_nets")) if isinstance(manifest, dict) else (None, None)
        error = checkpoint.manifest_problem(manifest, path, *sizes)
    if error is not None:
        raise checkpoint.CheckpointError(error)
    states = [checkpoint.load(path.parent / name) for name in manifest["files"]]
    for state, block in zip(states, manifest["members"], strict=True):
        if state.get("members") != block or state.get("epoch") != manifest["epoch"]:
            raise checkpoint.CheckpointError(f"checkpoint set {path} is inconsistent: a rank file holds members "
                                             f"{state.get('members')} of epoch {state.get('epoch')}")
    return path, {**states[0], "models": [model for state in states for model in state["models"]]}


def load_trained(source, log=print) -> TrainedRun:
    """Every member of a trained run, ready to use; raises CheckpointError or DataError."""
    path, state = read_checkpoint(source)
    config = state["config"]
    archs = config.get("archs")
    if not isinstance(archs, list) or len(archs) != len(state["models"]):
        raise checkpoint.CheckpointError(f"checkpoint {path} names {archs!r} as its members but holds "
                                         f"{len(state['models'])} sets of weights")
    data, note = state.get("data"), None
    if data is None:
        data = _recompute_data(path, config, log)
        note = (f"{path} predates checkpoints that carry class names and normalisation statistics: recomputed them "
                f"from its training data ({config['dataset']}, as the run configured it)")
    models = []
    for index, (arch, weights) in enumerate(zip(archs, state["models"])):
        model = build_model(arch, len(data["classes"]))
        try:
            model.load_state_dict(weights)
        except (RuntimeError, KeyError) as error:
            raise checkpoint.CheckpointError(f"checkpoint {path}: member {index} ({arch}) does not load: "
                                             f"{str(error).strip().splitlines()[0]}") from None
        models.append(model.eval())
    evaluated = [record for record in state["metrics"]["epochs"] if record.get("test_acc") is not None]
    return TrainedRun(
        path=path, config=config, epoch=state["epoch"], models=models, classes=list(data["classes"]),
        image_size=int(data["image_size"]), mean=data["mean"].float(), std=data["std"].float(),
        final=final_record(evaluated[-1]) if evaluated else None, note=note,
    )


def _recompute_data(path: Path, config: dict, log) -> dict:
    """Class names and normalisation statistics of an older checkpoint's run, from its training
    data as the trainer loaded it (same subset and validation split, so the same statistics)."""
    try:
        dataset = load_dataset(config["dataset"], config.get("data_dir"), False, config["image_size"],
                               config.get("train_subset", 0), "cpu", log=log, val_split=config.get("val_split", 0))
    except DataError as error:
        raise DataError(f"{path} predates checkpoints that carry class names and normalisation statistics, and "
                        f"they cannot be recomputed from its training data: {error}") from None
    if dataset.num_classes != config.get("num_classes", dataset.num_classes):
        raise DataError(f"{path}: its training data now has {dataset.num_classes} classes, the run had "
                        f"{config['num_classes']}")
    return {"classes": dataset.classes, "image_size": dataset.image_size, "mean": dataset.mean, "std": dataset.std}


MEMBER_HELP = "a member index, best (the best member on the validation split) or ensemble (mean softmax of all members)"


class Classifier(nn.Module):
    """float32 images [B, 3, S, S], RGB in [0, 1] -> [B, C]: one member's logits, or for the
    ensemble the log of the members' mean softmax (its softmax is that mean; the same argmax)."""

    def __init__(self, members: list[nn.Module], mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.register_buffer("mean", mean.detach().clone().float())
        self.register_buffer("std", std.detach().clone().float())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        standardized = standardize(images, self.mean, self.std)
        if len(self.members) == 1:
            return self.members[0](standardized).float()
        log_probs = torch.stack([member(standardized).float().log_softmax(-1) for member in self.members])
        return torch.logsumexp(log_probs, 0) - math.log(len(self.members))


def select(run: TrainedRun, member: str) -> tuple[Classifier, str, int | None]:
    """The Classifier for ``member`` (an index, ``best`` or ``ensemble``), its description and
    the member's index (None for the ensemble)."""
    archs = run.config["archs"]
    if member == "ensemble":
        return Classifier(run.models, run.mean, run.std), f"ensemble of {len(archs)} members (mean softmax)", None
    if member == "best":
        if run.best_member is None:
            raise UsageError(f"--member best needs validation accuracies, and {run.path} has none (trained with "
                             f"--val-split 0): pick a member index 0..{len(archs) - 1} or ensemble")
        index, why = run.best_member, ", best on validation"
    else:
        try:
            index, why = int(member), ""
        except ValueError:
            raise UsageError(f"--member must be {MEMBER_HELP}; got {member!r}") from None
        if not 0 <= index < len(archs):
            raise UsageError(f"--member {index} is out of range: {run.path} holds members 0..{len(archs) - 1}")
    return Classifier([run.models[index]], run.mean, run.std), f"member {index} ({archs[index]}{why})", index

