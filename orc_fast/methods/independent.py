"""``independent``: every member trains alone on cross-entropy (the baseline without teaching)."""

from __future__ import annotations

from ..loss import group_kd
from .base import MemberLosses, Method, MethodDefaults, loss_terms


def independent_losses(logits, target, backend: str = "auto") -> MemberLosses:
    """Every member: mean CE (alpha 0 for all; the teachers' side is unused)."""
    result = group_kd(logits, logits.detach(), target, alpha=0.0, reduction="none", validate=False, backend=backend)
    return MemberLosses(result.loss.mean(1), result.error_mask.new_zeros(result.error_mask.shape),
                        *loss_terms(result, 0.0, 1.0))


class Independent(Method):
    name = "independent"
    defaults = MethodDefaults(1.0, 1.0, 0.0, "cross-entropy only")
    min_members = 1
    distils = False

    def losses(self, step, images, logits, target):
        return independent_losses(logits, target, backend=step.config.backend)
