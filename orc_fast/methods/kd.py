"""``kd``: Hinton KD, every member distils from the pivot teacher alone, which stays frozen.

The baseline pivot-mode ORC has to beat (docs/design.md §2.1).
"""

from __future__ import annotations

from ..errors import UsageError
from ..loss import group_kd
from .base import DISTILLATION_FLAGS, MemberLosses, Method, MethodDefaults, distillation, loss_terms

DEFAULTS = MethodDefaults(4.0, 0.1, 0.9, "Hinton et al., Distilling the Knowledge in a Neural Network, 2015, at "
                          "the settings of CRD's KD baseline (Tian et al., ICLR 2020): 0.1 CE + 0.9 tau^2 KL, tau = 4")


def kd_losses(logits, target, pivot_logits, temperature: float = DEFAULTS.temperature, alpha: float | None = None,
              backend: str = "auto", kd_scale: float | None = None) -> MemberLosses:
    """Hinton KD: every member, s [(1 - alpha) CE + alpha tau^2 KL] to the pivot teacher alone
    (``pivot_logits`` [B, C]); one ``group_kd`` call."""
    alpha, kd_scale = DEFAULTS.weights(alpha, kd_scale)
    result = group_kd(
        logits, pivot_logits.detach()[None].to(logits.dtype), target, temperature=temperature, alpha=alpha,
        reduction="none", validate=False, backend=backend,
    )
    return MemberLosses(kd_scale * result.loss.mean(1), result.error_mask.new_zeros(result.error_mask.shape),
                        *loss_terms(result, float(alpha > 0), temperature))


class KD(Method):
    name = "kd"
    defaults = DEFAULTS
    reads = (*DISTILLATION_FLAGS, "pivot", "pivot_member")
    pivot = "required"
    min_members = 1

    def settings(self, flags, num_nets):
        if flags.get("promote") is not None:
            raise UsageError("--promote is for --method orc; kd distils every member from the pivot alone")
        if flags.get("freeze_pivot") is False or flags.get("pivot_lr_scale") is not None:
            flag = "--no-freeze-pivot" if flags.get("freeze_pivot") is False else "--pivot-lr-scale"
            raise UsageError(f"--method kd keeps the pivot fixed (Hinton KD): drop {flag}")
        return {"freeze_pivot": True}

    def pivot_role(self, config) -> str:
        return "frozen (kd)"

    def losses(self, step, images, logits, target):
        return kd_losses(logits, target, step.pivot_forward(images), **distillation(step.config))
