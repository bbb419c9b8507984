"""``dml``: Deep Mutual Learning, every member distils from the mean of all the others."""

from __future__ import annotations

import torch

from ..loss import group_kd
from .base import DISTILLATION_FLAGS, MemberLosses, Method, MethodDefaults, distillation, loss_terms

DEFAULTS = MethodDefaults(1.0, 1.0, 1.0, "Zhang et al., Deep Mutual Learning, CVPR 2018: CE + KL, tau = 1")


def dml_losses(logits, target, temperature: float = DEFAULTS.temperature, alpha: float | None = None,
               backend: str = "auto", kd_scale: float | None = None) -> MemberLosses:
    """Deep Mutual Learning: every member distils from the mean of all the *other* members:
    s [(1 - alpha) CE + alpha tau^2 KL] (the defaults give DML's CE + KL at tau = 1).

    One ``group_kd`` call per member, with teacher weights that mask the member itself out
    (the mean over the others differs per member, which one call cannot express).
    """
    alpha, kd_scale = DEFAULTS.weights(alpha, kd_scale)
    members = logits.shape[0]
    teachers = logits.detach()
    others = 1.0 - torch.eye(members, dtype=torch.float32, device=logits.device)
    per_member, terms = [], []
    for i in range(members):
        result = group_kd(
            logits[i], teachers, target, temperature=temperature, alpha=alpha, teacher_weights=others[i],
            reduction="none", validate=False, backend=backend,
        )
        per_member.append(kd_scale * result.loss.mean())
        terms.append(loss_terms(result, float(alpha > 0), temperature))
    no_errors = torch.zeros(logits.shape[1], dtype=torch.bool, device=logits.device)
    ce, kd = (torch.stack(term) for term in zip(*terms))
    return MemberLosses(torch.stack(per_member), no_errors, ce, kd)


class DML(Method):
    name = "dml"
    defaults = DEFAULTS
    reads = DISTILLATION_FLAGS

    def losses(self, step, images, logits, target):
        return dml_losses(logits, target, **distillation(step.config))
