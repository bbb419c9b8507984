"""``orc`` without a pivot (peer mode, docs/design.md §2): the best-ranked members teach.

Every step each member is scored on the batch (``--rank-by``), the ``teacher_size`` best
become this step's teachers, the teachers are refined on the students' error images and
the students distil from the teachers' mean tempered distribution. One ``group_kd`` call
supplies the per-member losses (CE for teachers, CE + KD for students) and the error-image
mask; ``--refresh-teachers`` makes a second one.
"""

from __future__ import annotations

import torch

from ..errors import UsageError
from ..loss import group_kd
from .base import DISTILLATION_FLAGS, MemberLosses, Method, MethodDefaults, StepOutput, distillation, loss_terms

# Students keep CE at weight 1 and add tau^2 KL (the DML/KDCL form), so a member's role no
# longer decides how much hard-label signal it gets: with (1 - alpha) CE at alpha = 0.9
# the teachers kept the lowest batch CE and roles froze (docs/design.md §2; README).
DEFAULTS = MethodDefaults(
    4.0, 1.0, 1.0, "students CE + tau^2 KL, tau = 4 (chosen on the validation split over (1 - alpha) CE + "
    "alpha tau^2 KL at alpha = 0.9, whose roles froze)",
    # Peer mode ranks by top-1 error: ranked by CE the teachers kept the lowest CE and the
    # roles froze (docs/design.md §2, step 2).
    settings={"error_rule": "any", "error_weight": 1.0, "error_mixup": False, "mixup_alpha": 1.0,
              "refresh_teachers": False, "rank_momentum": 0.0, "rank_by": "accuracy"},
)
# The flags of ORC in either mode.
ORC_FLAGS = (*DISTILLATION_FLAGS, "teacher_size", "error_rule", "error_weight", "error_mixup", "mixup_alpha",
             "refresh_teachers", "rank_momentum", "rank_by")


def teacher_error_weights(roles: torch.Tensor, error_mask: torch.Tensor, error_weight: float) -> torch.Tensor:
    """Per-member, per-sample weights of the teachers' error-image term: [N, B].

    r_i * lambda_err * err_b / B: every error image weighs lambda_err / B on top of its
    share of the batch mean, so the term grows with the number of error images and a
    single one never weighs as much as the whole batch (docs/design.md §2, step 5).
    """
    return roles[:, None] * (error_weight / error_mask.shape[0]) * error_mask.float()[None, :]


def orc_losses(
    logits: torch.Tensor,
    target: torch.Tensor,
    roles: torch.Tensor,
    temperature: float = DEFAULTS.temperature,
    alpha: float | None = None,
    error_weight: float = DEFAULTS.settings["error_weight"],
    error_rule: str = DEFAULTS.settings["error_rule"],
    backend: str = "auto",
    teacher_logits: torch.Tensor | None = None,
    mixed_ce: torch.Tensor | None = None,
    kd_scale: float | None = None,
) -> MemberLosses:
    """ORC member losses from one ``group_kd`` call (docs/design.md §2, steps 4-7).

    logits [N, B, C] (with gradient), roles [N] 0/1. Teachers (r = 1) get alpha 0, so
    their ``group_kd`` loss is plain CE; students get alpha, and the KD target is the
    mean tempered distribution of the teachers only (``teacher_weights = roles``). The
    error mask is judged over the students (``error_members = 1 - roles``).

      teacher: mean_b CE_ib + lambda_err * sum_b err_b CE_ib / B
      student: s mean_b [(1 - alpha) CE_ib + alpha tau^2 KL_ib]   (s = ``kd_scale``)

    Both come from weighting ``result.loss`` [N, B] by c_ib = r_i (1 + lambda err_b) / B
    + (1 - r_i) s / B. ``teacher_logits`` replaces the teachers' side
    (``--refresh-teachers``); ``mixed_ce`` [N, B] replaces CE in the error term
    (``--error-mixup``).
    """
    alpha, kd_scale = DEFAULTS.weights(alpha, kd_scale)
    batch = logits.shape[1]
    teachers = logits.detach() if teacher_logits is None else teacher_logits.detach()
    result = group_kd(
        logits, teachers, target,
        temperature=temperature, alpha=alpha * (1.0 - roles), teacher_weights=roles,
        error_rule=error_rule, error_members=1.0 - roles,
        reduction="none", validate=False, backend=backend,
    )
    error_term = teacher_error_weights(roles, result.error_mask, error_weight)
    row_weight = ((roles + (1.0 - roles) * kd_scale) / batch)[:, None]
    if mixed_ce is None:
        per_sample = result.loss * (row_weight + error_term)
    else:
        per_sample = result.loss * row_weight + mixed_ce * error_term
    distils = (1.0 - roles) if alpha > 0 else torch.zeros_like(roles)
    return MemberLosses(per_sample.sum(1), result.error_mask, *loss_terms(result, distils, temperature))


def step_losses(step, logits, target, roles, **extra) -> MemberLosses:
    """``orc_losses`` at the group step's settings."""
    cfg = step.config
    return orc_losses(logits, target, roles, error_weight=cfg.error_weight, error_rule=cfg.error_rule,
                      **distillation(cfg), **extra)


class OrcPeer(Method):
    name = "orc"
    defaults = DEFAULTS
    reads = ORC_FLAGS
    pivot = "optional"
    has_roles = True

    def settings(self, flags, num_nets):
        teacher_size = num_nets // 2 if flags.get("teacher_size") is None else flags["teacher_size"]
        if not 1 <= teacher_size <= num_nets - 1:
            raise UsageError(f"--teacher-size must lie in [1, N-1] = [1, {num_nets - 1}], got {teacher_size}")
        return {"teacher_size": teacher_size, "rank_by": flags.get("rank_by") or DEFAULTS.settings["rank_by"]}

    def describe(self, config) -> str:
        return f"k = {config.method.teacher_size} teachers ranked by batch {config.method.rank_by}"

    def step(self, step, images, target) -> StepOutput:
        cfg = step.config
        logits = step.forward(images)
        roles = step.rank(logits, target, step.teacher_size)
        mixed_ce = step.mixed_ce(images, target, roles) if cfg.error_mixup else None
        if not cfg.refresh_teachers:
            losses = step_losses(step, logits, target, roles, mixed_ce=mixed_ce)
            step.backward_and_step(losses.total)
            return StepOutput(losses.per_member.detach(), roles, losses.error_mask, losses.ce, losses.kd)

        # --refresh-teachers: the teachers step first, then the students distil from the
        # teachers' updated logits (one more forward). Each member still steps exactly
        # once: masked steps, so no role is read on the host.
        before = step_losses(step, logits, target, roles, mixed_ce=mixed_ce)
        step.backward_and_step((roles * before.per_member).sum(), step.local_roles(roles), retain_graph=True)
        refreshed = step.extra_forward(images)
        after = step_losses(step, logits, target, roles, teacher_logits=refreshed)
        step.backward_and_step(((1.0 - roles) * after.per_member).sum(), 1.0 - step.local_roles(roles))

        def by_role(first, second):  # a teacher's value from before, a student's from after
            return roles * first.detach() + (1.0 - roles) * second.detach()

        return StepOutput(by_role(before.per_member, after.per_member), roles, before.error_mask,
                          by_role(before.ce, after.ce), by_role(before.kd, after.kd))
