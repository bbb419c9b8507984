"""The trainer's NaN / inf policy (``--nan-policy``), without host syncs inside a step.

``stop`` (default): a non-finite member loss ends the run with an error naming the
member and the step; nothing is saved after the bad step, so the last checkpoint on disk
is the last good one. ``skip-step``: a group step whose losses, or whose updated
parameters, buffers or optimizer state, are non-finite is undone on the device (every
tensor it changed is restored from a snapshot taken before it, with ``torch.where`` on a
device flag) and the run goes on; skipped steps are counted and reported per epoch.

On a GPU the check of step t reads a flag copied without blocking and looks at it after
step t + 1 has been queued, so the host never waits for the device inside a step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

NAN_POLICIES = ("stop", "skip-step")


class NonFiniteLoss(RuntimeError):
    """A member's loss became NaN or infinite under ``--nan-policy stop``."""


class NonFiniteGuard:
    """Watches every step's per-member losses [N] for NaN / inf."""

    def __init__(self, policy: str, device: torch.device, state_tensors: Callable[[], list[torch.Tensor]]):
        """``state_tensors`` lists every tensor a step changes (GroupStep.state_tensors)."""
        if policy not in NAN_POLICIES:
            raise ValueError(f"nan policy must be one of {NAN_POLICIES}, got {policy!r}")
        self.policy, self.device, self.state_tensors = policy, device, state_tensors
        self.skipped = torch.zeros((), dtype=torch.long, device=device)
        self._snapshot = None
        self._pending = None  # (epoch, step, host flags, event) of the step not yet looked at

    def before_step(self) -> None:
        if self.policy == "skip-step":
            self._snapshot = [t.detach().clone() for t in self.state_tensors()]

    def after_step(self, losses: torch.Tensor, epoch: int, step: int) -> torch.Tensor | None:
        """Undo (skip-step) or report (stop) a step whose losses [N] are non-finite. Under
        skip-step, returns whether the step was kept (a 0-d bool on the device), so that
        what the logs average leaves the undone steps out; under stop, None."""
        bad = ~torch.isfinite(losses.detach())
        if self.policy == "skip-step":
            return ~self._undo_if_bad(bad)
        if self.device.type != "cuda":
            self._raise_if_bad(bad, epoch, step)
            return None
        host = torch.empty(bad.shape, dtype=torch.bool, pin_memory=True)
        host.copy_(bad, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        previous, self._pending = self._pending, (epoch, step, host, event)
        if previous is not None:
            self._check(previous)
        return None

    @torch.no_grad()
    def _undo_if_bad(self, bad_losses: torch.Tensor) -> torch.Tensor:
        state = self.state_tensors()
        if len(state) != len(self._snapshot):
            raise RuntimeError("the training state changed shape inside a step; cannot undo it")
        finite = torch.stack([torch.isfinite(t).all() for t in state])
        undo = bad_losses.any() | ~finite.all()
        for tensor, saved in zip(state, self._snapshot):
            tensor.copy_(torch.where(undo, saved, tensor))
        self.skipped += undo
        self._snapshot = None
        return undo

    def flush(self) -> None:
        """Look at the last step too (call at the end of an epoch, before saving)."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._check(pending)

    def take_skipped(self) -> int:
        """Steps skipped since the last call (a host read: call once per epoch)."""
        count = int(self.skipped.item())
        self.skipped.zero_()
        return count

    def _check(self, pending) -> None:
        epoch, step, host, event = pending
        event.synchronize()
        self._raise_if_bad(host, epoch, step)

    @staticmethod
    def _raise_if_bad(bad: torch.Tensor, epoch: int, step: int) -> None:
        if bool(bad.any()):
            members = ", ".join(str(i) for i in torch.nonzero(bad).flatten().tolist())
            raise NonFiniteLoss(
                f"non-finite loss for member {members} at epoch {epoch + 1}, step {step + 1}; the run stopped "
                "without saving, so the last checkpoint is the last good state (lower --lr, or --nan-policy skip-step)"
            )


def start_momentum(optimizer: torch.optim.SGD) -> torch.optim.SGD:
    """Give every parameter a zero momentum buffer before the first step.

    SGD's first step sets the buffer to the gradient, which is what mu * 0 + g gives, so
    this changes nothing, except that the buffers exist from the start: ``skip-step`` can
    then undo even the very first step (a buffer created by a bad step could not be).
    """
    if optimizer.defaults.get("momentum", 0):
        for group in optimizer.param_groups:
            for param in group["params"]:
                optimizer.state[param].setdefault("momentum_buffer", torch.zeros_like(param))
    return optimizer
