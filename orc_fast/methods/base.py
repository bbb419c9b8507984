"""What a training method is: its published defaults, the flags it reads, its checks, its losses.

A method is one file in this package and one line in the registry (``__init__.py``). The
group step (orc_fast/group_step.py) owns the loop every method shares - forward every
member, the method's losses, backward, every optimizer's step - and a method adds only its
mathematics (``losses``), or, where it needs more forwards or steps (ORC's refresh, pivot
mode), its own ``step`` built from the group step's parts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import torch

if TYPE_CHECKING:
    from ..group_step import GroupStep

# The flags of a method that distils: its temperature and loss weights.
DISTILLATION_FLAGS = ("temperature", "alpha", "ce_weight", "kd_weight")


def loss_form(ce_weight: float, kd_weight: float) -> tuple[float, float]:
    """w_ce CE + w_kd tau^2 KL as s * ((1 - alpha) CE + alpha tau^2 KL): (s, alpha), with
    s = w_ce + w_kd and alpha = w_kd / s. The kernels only know the alpha form."""
    if ce_weight < 0 or kd_weight < 0 or ce_weight + kd_weight <= 0:
        raise ValueError(f"loss weights must be >= 0 with a positive sum, got CE {ce_weight}, KD {kd_weight}")
    scale = ce_weight + kd_weight
    return scale, kd_weight / scale


@dataclass(frozen=True)
class MethodDefaults:
    """A method's own settings, with their source: loss = ce_weight CE + kd_weight tau^2 KL,
    and, in ``settings``, the defaults of the method's other flags (ORC's ranking, say)."""

    temperature: float
    ce_weight: float
    kd_weight: float
    source: str
    settings: dict = field(default_factory=dict)

    @property
    def kd_scale(self) -> float:
        return loss_form(self.ce_weight, self.kd_weight)[0]

    @property
    def alpha(self) -> float:
        return loss_form(self.ce_weight, self.kd_weight)[1]

    def weights(self, alpha: float | None, kd_scale: float | None) -> tuple[float, float]:
        """(alpha, s) of s [(1 - alpha) CE + alpha tau^2 KL]: the method's own unless given; an
        alpha given without s is the alpha form (s = 1), as the trainer's --alpha is."""
        if alpha is None:
            return self.alpha, self.kd_scale if kd_scale is None else kd_scale
        return alpha, 1.0 if kd_scale is None else kd_scale


class MemberLosses(NamedTuple):
    """``per_member`` [N] losses with gradient (their sum is what to backward), the
    error-image mask [B] (all False for methods without error images), and, for the logs,
    each member's two terms apart (detached, [N]): ``ce``, its plain batch-mean CE, and
    ``kd``, its batch-mean tau^2 KL to the teacher it distils from this step (0 for a
    member that does not distil). The objective weighs and adds these (plus a teacher's
    error-image term), so neither is the objective itself."""

    per_member: torch.Tensor
    error_mask: torch.Tensor
    ce: torch.Tensor
    kd: torch.Tensor

    @property
    def total(self) -> torch.Tensor:
        return self.per_member.sum()


class StepOutput(NamedTuple):
    losses: torch.Tensor  # [N] per-member loss, detached, on the device
    roles: torch.Tensor  # [N] 1.0 = teacher this step (zeros for methods without roles)
    error_mask: torch.Tensor  # [B]
    ce: torch.Tensor  # [N] each member's batch CE (MemberLosses.ce)
    kd: torch.Tensor  # [N] each member's tau^2 KL term, 0 where it did not distil


def distillation(config) -> dict:
    """The loss functions' distillation keywords at a group step's settings (``StepConfig``)."""
    return {"temperature": config.temperature, "alpha": config.alpha, "backend": config.backend,
            "kd_scale": config.kd_scale}


def loss_terms(result, distils: torch.Tensor | float, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(ce, kd) per member from a ``group_kd`` result with per-sample ``ce``/``kl`` [N, B]:
    the batch means, KL scaled by tau^2 and kept only where ``distils`` ([N] 0/1, or a
    number) is 1. Detached: these are for the logs."""
    kd = temperature**2 * result.kl.mean(-1) * distils
    return result.ce.mean(-1).detach(), kd.detach()


class Method:
    """A training method. Subclasses set the class attributes and ``losses`` (or ``step``).

    ``reads``: the flags (argparse dests) it reads beyond the ones every method reads; any
    other method-owned flag given with it is refused, since it would be silently ignored.
    ``pivot``: ``never``, ``optional`` (``pivot_variant`` runs when one is given) or
    ``required``. ``has_roles``: members change roles (the reports show teacher shares).
    """

    name: str = ""
    defaults: MethodDefaults
    reads: tuple[str, ...] = ()
    pivot: str = "never"
    pivot_variant: Method | None = None
    min_members: int = 2
    has_roles: bool = False
    distils: bool = True
    refines_pivot: bool = False  # may train the pivot on the error images (else it stays frozen)

    def settings(self, flags: dict, num_nets: int) -> dict:
        """This method's resolved settings from the flag values (None: not given), checked:
        {setting: value}; a bad value raises UsageError. Only the settings it reads."""
        return {}

    def describe(self, config) -> str:
        """The method's part of the run's opening line ('' for none)."""
        return ""

    def pivot_role(self, config) -> str:
        """What the pivot does in this method, for the run's pivot line."""
        return ""

    def losses(self, step: GroupStep, images: torch.Tensor, logits: torch.Tensor, target: torch.Tensor) -> MemberLosses:
        raise NotImplementedError

    def step(self, step: GroupStep, images: torch.Tensor, target: torch.Tensor) -> StepOutput:
        """Forward every member, the losses, one backward, every optimizer steps once."""
        logits = step.forward(images)
        losses = self.losses(step, images, logits, target)
        step.backward_and_step(losses.total)
        return StepOutput(losses.per_member.detach(), step.no_roles, losses.error_mask, losses.ce, losses.kd)

    def check_step(self, step: GroupStep) -> None:
        """Raise ValueError when the group step cannot run this method (library use)."""
        if step.pivot is None and (self.pivot == "required" or step.pivot_optimizer is not None):
            raise ValueError(f"method {self.name!r} needs a pivot teacher")
        if step.pivot is not None and self.pivot == "never":
            raise ValueError(f"a pivot teacher works with a method that takes one, not {self.name!r}")
        if step.pivot_optimizer is not None and not self.refines_pivot:
            raise ValueError(f"only orc refines the pivot: method {self.name} keeps it frozen")
