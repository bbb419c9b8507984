"""The pivot teacher: one member of an earlier run of this trainer, loaded as the pre-trained
teacher of pivot mode and of ``--method kd`` (docs/design.md §2).

``--pivot`` names a checkpoint (``best.pt``/``latest.pt``) or a run folder (its best.pt, else
its latest.pt). The architecture comes from the checkpoint; the member is ``--pivot-member``
or, by default, the member that run ranked best on its validation split. Every problem is a
``CheckpointError`` with a one-line reason (the trainer exits with code 2 before touching its
output folder).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from . import checkpoint
from .models import build_model
from .run_folder import RunFolder


def pivot_path(given: str) -> Path:
    """The checkpoint file ``--pivot`` names: the path itself, or a run folder's best.pt (else
    latest.pt)."""
    path = Path(given)
    if path.is_dir():
        found = RunFolder(path).pivot_file()
        if found is None:
            raise checkpoint.CheckpointError(f"--pivot {path} is a folder without {RunFolder.BEST} or {RunFolder.LATEST}")
        return found
    if not path.is_file():
        raise checkpoint.CheckpointError(f"--pivot {path} does not exist")
    return path


def best_member(state: dict, path: Path) -> int:
    """The member the pivot's run ranked best on its validation split (the last evaluated
    epoch of the checkpoint); the only member of a one-member run."""
    if len(state["models"]) == 1:
        return 0
    evaluated = [e for e in state["metrics"]["epochs"] if e.get("val_acc") is not None]
    if not evaluated:
        raise checkpoint.CheckpointError(
            f"--pivot {path} has no validation accuracy to pick its best member from: give --pivot-member"
        )
    val_acc = evaluated[-1]["val_acc"]
    return max(range(len(val_acc)), key=val_acc.__getitem__)


STATS_TOLERANCE = 1e-4  # absolute, per channel: the same training images give the same statistics


def check_data(path: Path, saved: dict, data) -> None:
    """Refuse a pivot trained on other data than the run's: other class names (same count),
    image size or normalisation statistics. Its logits would index other classes, or it
    would see inputs scaled unlike its training images (docs/design.md §2, pivot mode)."""
    differing = [(i, a, b) for i, (a, b) in enumerate(zip(saved["classes"], data.classes)) if a != b]
    if differing:
        named = "; ".join(f"class {i} is {a!r} there, {b!r} here" for i, a, b in differing[:3])
        more = f" (and {len(differing) - 3} more)" if len(differing) > 3 else ""
        raise checkpoint.CheckpointError(f"--pivot {path} was trained on other classes: {named}{more}")
    if int(saved["image_size"]) != data.image_size:
        raise checkpoint.CheckpointError(f"--pivot {path} was trained on {saved['image_size']}x{saved['image_size']} "
                                         f"images, this run's are {data.image_size}x{data.image_size} (--image-size)")
    for name in ("mean", "std"):
        there, here = saved[name].float().cpu(), getattr(data, name).float().cpu()
        if there.shape != here.shape or (there - here).abs().max().item() > STATS_TOLERANCE:
            raise checkpoint.CheckpointError(
                f"--pivot {path} was trained with other normalisation statistics: {name} {_values(there)} there, "
                f"{_values(here)} here (its training data differs from this run's)")


def _values(tensor) -> str:
    return "(" + ", ".join(f"{v:.4f}" for v in tensor.tolist()) + ")"


def load_pivot(given: str, member: int | None, data) -> tuple[nn.Module, dict]:
    """The pivot model (on the CPU, in train mode) for a run on ``data`` (a Source,
    orc_fast/data.py) and a description of where it came from: {"checkpoint", "arch",
    "member", "val_acc"} (val_acc None when its run had no split)."""
    num_classes = data.num_classes
    path = pivot_path(given)
    state = checkpoint.load(path)
    archs = state["config"].get("archs") or []
    if len(state["models"]) != len(archs):
        raise checkpoint.CheckpointError(
            f"--pivot {path} holds {len(state['models'])} of its run's {len(archs)} members (a member-parallel "
            f"rank file?): give a single-process checkpoint"
        )
    index = best_member(state, path) if member is None else member
    if not 0 <= index < len(archs):
        raise checkpoint.CheckpointError(f"--pivot-member {index} is not a member of {path} (members 0..{len(archs) - 1})")
    saved_classes = state["config"].get("num_classes")
    if saved_classes != num_classes:
        raise checkpoint.CheckpointError(
            f"--pivot {path} was trained on {saved_classes} classes, this run's data has {num_classes}"
        )
    if state.get("data") is not None:  # checkpoints from before it was saved: the class count only
        check_data(path, state["data"], data)
    model = build_model(archs[index], num_classes)
    try:
        model.load_state_dict(state["models"][index])
    except RuntimeError as error:
        raise checkpoint.CheckpointError(f"--pivot {path}: member {index} does not load into {archs[index]}: "
                                         f"{str(error).strip().splitlines()[0]}") from None
    evaluated = [e for e in state["metrics"]["epochs"] if e.get("val_acc") is not None]
    val_acc = evaluated[-1]["val_acc"][index] if evaluated else None
    return model, {"checkpoint": str(path), "arch": archs[index], "member": index, "val_acc": val_acc}
