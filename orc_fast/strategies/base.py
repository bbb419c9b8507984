"""The small protocol every strategy offers the group step (orc_fast/group_step.py)."""

from __future__ import annotations

from typing import Protocol

import torch


class Strategy(Protocol):
    """Runs the members' parts of a group step: their forward -> logits [N, B, C] and every
    member's optimizer step (plus the masked step of ``--refresh-teachers``). The losses and
    the backward are the group step's; ``before_step``/``after_step`` bracket each whole step."""

    name: str
    ready: bool  # False while auto is still measuring

    @property
    def chosen(self) -> str: ...

    def activate(self) -> None: ...

    def forward(self, images: torch.Tensor) -> torch.Tensor: ...

    def forward_members(self, images: torch.Tensor, members: list[int]) -> torch.Tensor | None:
        """Logits [len(members), B, C] of those members alone, or None where this strategy
        can only run the whole group (then the caller runs ``forward``)."""

    def zero_grad(self) -> None: ...

    def step(self) -> None: ...

    def masked_step(self, apply: torch.Tensor) -> None: ...

    def before_step(self) -> None: ...

    def after_step(self) -> None: ...

    def graph_optimizers(self) -> list[tuple[torch.optim.Optimizer, int, torch.optim.Optimizer, int]]: ...
