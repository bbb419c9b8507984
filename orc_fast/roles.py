"""Online role change (docs/design.md §2, steps 2-3): batch scores -> 0/1 roles, on the device.

Roles are data, never control flow: a member's role is a 0/1 entry of a device tensor that
weights its loss terms, so ranking never reads a device value on the host.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

RANK_BY = ("ce", "accuracy")  # what a member's batch score measures (docs/design.md §2)


def batch_scores(logits: torch.Tensor, target: torch.Tensor, rank_by: str) -> torch.Tensor:
    """Every member's score on the batch, lower is better, no gradient: [N, B, C] -> [N].

    ``ce``: mean cross-entropy. ``accuracy``: the fraction of the batch it gets wrong, which
    does not see confidence: students distil tempered teacher distributions, so at equal
    accuracy their CE is higher and a CE ranking keeps the teachers on top.
    """
    logits = logits.detach()
    if rank_by == "accuracy":
        return (logits.argmax(-1) != target).float().mean(1)
    if rank_by != "ce":
        raise ValueError(f"unknown rank_by {rank_by!r}; known: {', '.join(RANK_BY)}")
    members, batch, classes = logits.shape
    ce = F.cross_entropy(logits.reshape(members * batch, classes).float(), target.repeat(members), reduction="none")
    return ce.view(members, batch).mean(1)


def assign_roles(scores: torch.Tensor, teacher_size: int, tie_start: torch.Tensor | None = None) -> torch.Tensor:
    """1.0 for the ``teacher_size`` best (lowest) scores, 0.0 for the rest: [N] fp32.

    Ties go to the lower member index, counted from member ``tie_start`` (a device scalar,
    wrapping around) when it is given: the accuracy score ties often, and a fixed order
    would hand member 0 every tie. Deterministic either way.
    """
    members = scores.numel()
    priority = torch.arange(members, device=scores.device)
    if tie_start is not None:
        priority = (priority - tie_start.long()) % members
    by_priority = torch.argsort(priority)
    order = by_priority[torch.argsort(scores[by_priority], stable=True)]
    roles = torch.zeros(scores.shape, dtype=torch.float32, device=scores.device)
    return roles.scatter(0, order[:teacher_size], 1.0)


class ScoreTracker:
    """Exponential moving average of the members' scores (``--rank-momentum``).

    Bias-corrected like Adam's moments, so the first step ranks by the first batch alone
    without a branch; momentum 0 ranks by the current batch only. State stays on the
    device.
    """

    def __init__(self, num_members: int, momentum: float, device):
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"rank momentum must lie in [0, 1), got {momentum}")
        self.momentum = momentum
        self.average = torch.zeros(num_members, dtype=torch.float32, device=device)
        self.steps = torch.zeros((), dtype=torch.float32, device=device)

    def update(self, scores: torch.Tensor) -> torch.Tensor:
        self.average = self.momentum * self.average + (1.0 - self.momentum) * scores.float()
        self.steps = self.steps + 1.0
        return self.average / (1.0 - torch.pow(torch.full_like(self.steps, self.momentum), self.steps))

    def rank(self, scores: torch.Tensor, best: int) -> torch.Tensor:
        """1.0 for the ``best`` members by the smoothed score after this batch's ``scores``;
        ties rotate with the step."""
        return assign_roles(self.update(scores), best, tie_start=self.steps)

    def state_dict(self) -> dict:
        return {"momentum": self.momentum, "average": self.average.cpu(), "steps": self.steps.cpu()}

    def load_state_dict(self, state: dict) -> None:
        if tuple(state["average"].shape) != tuple(self.average.shape):
            raise ValueError(f"score state holds {state['average'].numel()} members, expected {self.average.numel()}")
        self.average = state["average"].to(self.average.device, torch.float32)
        self.steps = state["steps"].to(self.steps.device, torch.float32)
