"""What a run shows while it trains: the epoch's per-member terms and TensorBoard scalars.

``EpochLog`` adds up every step's outputs on the device, so the host reads them once per
epoch (no sync inside a step, docs/design.md §5). ``TensorBoardLog`` writes those per-step
values and the epoch's record with torch's SummaryWriter (``--tensorboard``/``--log-dir``).
"""

from __future__ import annotations

from pathlib import Path

import torch

STEP_TERMS = ("loss", "ce", "kd", "teacher")  # per member, per step (docs/design.md §5)


class EpochLog:
    """One training epoch's per-step outputs, kept on the device.

    Steps that ``--nan-policy skip-step`` undid are left out of the loss terms' means (a
    skipped step's loss is inf or NaN and changed nothing); roles count on every step.
    ``keep_steps`` also keeps each step's values for TensorBoard ([steps, 4, N] at the end).
    """

    def __init__(self, members: int, device: torch.device, keep_steps: bool):
        self.sums = {name: torch.zeros(members, device=device) for name in STEP_TERMS}
        self.kept_steps = torch.zeros((), device=device)
        self.role_changes = torch.zeros((), device=device)
        self.steps = 0
        self.history: list[torch.Tensor] | None = [] if keep_steps else None
        self.lrs: list[float] = []

    def add(self, output, kept: torch.Tensor | None, previous_roles: torch.Tensor | None, lr: float) -> None:
        """One step's ``StepOutput``; ``kept`` from NonFiniteGuard.after_step (None: kept);
        ``previous_roles`` the roles of the step before (None on a run's first step)."""
        terms = torch.stack([output.losses, output.ce, output.kd]).float()
        if kept is not None:
            terms = torch.where(kept, terms, torch.zeros_like(terms))
            self.kept_steps += kept
        else:
            self.kept_steps += 1
        for name, value in zip(STEP_TERMS, (*terms, output.roles)):
            self.sums[name] += value
        if previous_roles is not None:
            self.role_changes += (output.roles != previous_roles).sum()
        self.steps += 1
        self.lrs.append(lr)
        if self.history is not None:
            self.history.append(torch.cat([terms, output.roles.float()[None]]))

    def record(self) -> dict:
        """The epoch's means (host reads, once): per member loss / ce / kd over kept steps,
        the teacher share over all steps, and role changes per step."""
        kept = max(float(self.kept_steps.item()), 1.0)
        steps = max(self.steps, 1)
        return {
            "train_loss": (self.sums["loss"] / kept).tolist(),
            "train_ce": (self.sums["ce"] / kept).tolist(),
            "train_kd": (self.sums["kd"] / kept).tolist(),
            "teacher_fraction": (self.sums["teacher"] / steps).tolist(),
            "role_changes": self.role_changes.item() / steps,
        }

    def step_values(self) -> torch.Tensor:
        """[steps, 4, N] on the host: loss, ce, kd, role per member per step."""
        if not self.history:
            return torch.zeros(0, len(STEP_TERMS), len(self.sums["loss"]))
        return torch.stack(self.history).cpu()


def tensorboard_writer(log_dir: Path, purge_step: int | None):
    """A SummaryWriter on ``log_dir``; ``purge_step`` (on resume) drops events a crashed run
    wrote after its last checkpoint, so a resumed run's curves do not double back."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:  # tensorboard is a dependency; a broken install still gets one line
        raise RuntimeError(f"--tensorboard needs the tensorboard package ({error}): pip install tensorboard") from None
    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)


class TensorBoardLog:
    """Per-step and per-epoch scalars of a run. Tags: ``step/<term>/member<i>`` and
    ``step/lr`` at the global step; ``epoch/<name>/member<i>`` and ``epoch/<name>`` at the
    epoch number (docs/design.md §5)."""

    def __init__(self, log_dir: Path, steps_per_epoch: int, start_epoch: int):
        self.steps_per_epoch = steps_per_epoch
        self.writer = tensorboard_writer(log_dir, start_epoch * steps_per_epoch if start_epoch else None)

    def steps(self, epoch: int, log: EpochLog) -> None:
        """The epoch's steps (``epoch`` counts from 0)."""
        values = log.step_values()
        first = epoch * self.steps_per_epoch
        for step, (row, lr) in enumerate(zip(values.tolist(), log.lrs)):
            for term, per_member in zip(STEP_TERMS, row):
                for member, value in enumerate(per_member):
                    self.writer.add_scalar(f"step/{term}/member{member}", value, first + step)
            self.writer.add_scalar("step/lr", lr, first + step)

    def epoch(self, record: dict) -> None:
        """An epoch's record as train_epoch/run build it (accuracies may be None)."""
        epoch = record["epoch"]
        per_member = ("train_loss", "train_ce", "train_kd", "teacher_fraction", "test_acc", "val_acc")
        for name in per_member:
            for member, value in enumerate(record.get(name) or []):
                self.writer.add_scalar(f"epoch/{name}/member{member}", value, epoch)
        for name in ("ensemble_acc", "val_ensemble_acc", "pivot_test_acc", "role_changes", "images_per_s",
                     "skipped_steps", "lr"):
            if record.get(name) is not None:
                self.writer.add_scalar(f"epoch/{name}", record[name], epoch)
        self.writer.flush()  # an epoch's scalars are on disk once the epoch is saved

    def close(self) -> None:
        self.writer.close()
