"""``kdcl``: KDCL's MinLogit variant, every member distils from a group teacher built from
the members' logits."""

from __future__ import annotations

import torch

from ..loss import group_kd
from .base import DISTILLATION_FLAGS, MemberLosses, Method, MethodDefaults, distillation, loss_terms

DEFAULTS = MethodDefaults(2.0, 1.0, 1.0, "Guo et al., KDCL, CVPR 2020: CE + tau^2 KL to the MinLogit group "
                          "teacher, tau = 2")


def min_logit_teacher(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """KDCL's MinLogit group teacher: [N, B, C] -> [B, C], detached.

    Each member's logits are shifted so its true-class logit is 0 (z_i - z_i[y]); the
    teacher takes, class by class, the smallest shifted logit over the members, i.e. the
    least confusing member for every wrong class.
    """
    logits = logits.detach().float()
    true_class = logits.gather(2, target.view(1, -1, 1).expand(logits.shape[0], -1, 1))
    return (logits - true_class).amin(0)


def kdcl_losses(logits, target, temperature: float = DEFAULTS.temperature, alpha: float | None = None,
                backend: str = "auto", kd_scale: float | None = None) -> MemberLosses:
    """KDCL (MinLogit): every member, s [(1 - alpha) CE + alpha tau^2 KL] to the group teacher
    built from the members' logits (``min_logit_teacher``); one ``group_kd`` call."""
    alpha, kd_scale = DEFAULTS.weights(alpha, kd_scale)
    teacher = min_logit_teacher(logits, target).to(logits.dtype)
    result = group_kd(
        logits, teacher[None], target, temperature=temperature, alpha=alpha,
        reduction="none", validate=False, backend=backend,
    )
    return MemberLosses(kd_scale * result.loss.mean(1), result.error_mask.new_zeros(result.error_mask.shape),
                        *loss_terms(result, float(alpha > 0), temperature))


class KDCL(Method):
    name = "kdcl"
    defaults = DEFAULTS
    reads = DISTILLATION_FLAGS

    def losses(self, step, images, logits, target):
        return kdcl_losses(logits, target, **distillation(step.config))
