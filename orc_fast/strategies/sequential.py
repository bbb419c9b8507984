"""``sequential``: the loop over members, each with its own optimizer (the baseline)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..masked_sgd import masked_sgd_step


def _compiled(fn):
    return torch.compile(fn, dynamic=False)


class SequentialStrategy:
    """One member after another; each member's own optimizer steps it."""

    name = "sequential"
    ready = True  # False while auto is still measuring

    def __init__(self, models: Sequence[nn.Module], optimizers, device, compile: bool = False):
        if len(models) != len(optimizers):
            raise ValueError(f"{len(models)} models but {len(optimizers)} optimizers")
        self.models, self.optimizers = list(models), list(optimizers)
        self.device = torch.device(device)
        self.compile = compile
        # torch.compile reuses one graph for members of the same class (parameters are
        # graph inputs), so a homogeneous group compiles once.
        self.member_forwards = [_compiled(m) if compile else m for m in self.models]

    @property
    def chosen(self) -> str:
        return self.name

    def activate(self) -> None:
        """Called when this strategy (re)starts running the group after another one."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.stack([forward(images) for forward in self.member_forwards])

    def forward_members(self, images: torch.Tensor, members: list[int]) -> torch.Tensor:
        """Logits of some members only (each member's forward is its own: the same values as
        their rows of ``forward``)."""
        return torch.stack([self.member_forwards[i](images) for i in members])

    def zero_grad(self) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)

    def step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()

    def masked_step(self, apply: torch.Tensor) -> None:
        """SGD step of member i only where apply[i] == 1 (``--refresh-teachers``)."""
        for optimizer, member_apply in zip(self.optimizers, apply):
            masked_sgd_step(optimizer, member_apply)

    def before_step(self) -> None:
        """Called by the group step before each whole step (``auto`` starts its timer)."""

    def after_step(self) -> None:
        """Called by the group step after each whole step (``auto`` reads its timer)."""

    def graph_optimizers(self) -> list[tuple[torch.optim.Optimizer, int, torch.optim.Optimizer, int]]:
        """(optimizer, group index, source optimizer, source group index) for every param group
        this strategy steps; the source holds the lr the trainer sets (``CudaGraphStep``)."""
        return [(o, g, o, g) for o in self.optimizers for g in range(len(o.param_groups))]
