"""``orc --pivot`` (pivot mode, the ICCV paper's main setting; docs/design.md §2).

A pre-trained pivot teacher stays in the teacher group all run and the members are the
students. Every step the ``promote`` best-ranked students join the teacher group: the
other students distil from the teacher group's mean (pivot + promoted), a promoted one
from the pivot alone (private teaching), and the teacher group is refined on the other
students' error images (intensive teaching). Two ``group_kd`` calls per step: the promoted
students' KD target differs from the others'.
"""

from __future__ import annotations

import torch

from ..errors import UsageError
from ..loss import group_kd
from .base import MemberLosses, MethodDefaults, StepOutput, distillation, loss_terms
from .orc_peer import DEFAULTS as PEER_DEFAULTS
from .orc_peer import ORC_FLAGS, OrcPeer, teacher_error_weights

# A refined pivot starts trained: at the group's own lr (scale 1) it first lost 10 points on
# CIFAR-10 and the students' validation accuracy was lower (docs/design.md §2, pivot mode).
# Error mixup is on in this mode; the ranking is by CE (the peer-mode freeze does not apply:
# the pivot, not a ranked member, is the lasting teacher).
DEFAULTS = MethodDefaults(
    PEER_DEFAULTS.temperature, PEER_DEFAULTS.ce_weight, PEER_DEFAULTS.kd_weight, PEER_DEFAULTS.source,
    settings={**PEER_DEFAULTS.settings, "error_mixup": True, "rank_by": "ce", "promote": 1, "pivot_lr_scale": 0.1},
)


def pivot_orc_losses(
    logits: torch.Tensor,
    pivot_logits: torch.Tensor,
    target: torch.Tensor,
    promoted: torch.Tensor,
    temperature: float = DEFAULTS.temperature,
    alpha: float | None = None,
    error_weight: float = DEFAULTS.settings["error_weight"],
    error_rule: str = DEFAULTS.settings["error_rule"],
    backend: str = "auto",
    mixed_ce: torch.Tensor | None = None,
    kd_scale: float | None = None,
    private_teaching: bool = True,
) -> MemberLosses:
    """Pivot-mode ORC losses (docs/design.md §2): N + 1 rows, the members then the pivot.

    logits [N, B, C] are the student group, ``pivot_logits`` [B, C] the pivot teacher,
    ``promoted`` [N] 0/1 the students promoted into the teacher group this step. The
    teacher group is the pivot plus the promoted students:

      student (p_i = 0):   s mean_b [(1 - alpha) CE + alpha tau^2 KL(mean of the teacher group || i)]
      promoted (p_i = 1):  s mean_b [(1 - alpha) CE + alpha tau^2 KL(pivot || i)]    (private teaching)
                           + lambda_err sum_b err_b CE_b / B                        (intensive teaching)
      pivot:               mean_b CE + lambda_err sum_b err_b CE_b / B   (no gradient reaches a frozen pivot)

    Error images are judged over the non-promoted students. One ``group_kd`` call over all
    N + 1 rows gives the group teaching, the teachers' CE and the error mask (the promoted
    rows and the pivot get alpha 0); a second call, over the members with the pivot as the
    only teacher and alpha 1, gives tau^2 KL(pivot || i), which only promoted rows keep:
    a promoted row's loss is s [(1 - alpha) L1 + alpha L2] = s (1 - p alpha) L1 + s p alpha L2.
    ``private_teaching=False`` (no student is ever promoted) skips the second call.
    ``mixed_ce`` [N + 1, B] replaces CE in the error term (``--error-mixup``).
    """
    alpha, kd_scale = DEFAULTS.weights(alpha, kd_scale)
    batch = logits.shape[1]
    everyone = torch.cat([logits, pivot_logits[None].to(logits.dtype)])
    pivot_row = torch.ones(1, dtype=torch.float32, device=logits.device)
    teachers = torch.cat([promoted, pivot_row])  # the teacher group: promoted students and the pivot
    students = torch.cat([1.0 - promoted, 0.0 * pivot_row])  # the students they teach
    group = group_kd(
        everyone, everyone.detach(), target,
        temperature=temperature, alpha=alpha * students, teacher_weights=teachers,
        error_rule=error_rule, error_members=students,
        reduction="none", validate=False, backend=backend,
    )
    error_term = teacher_error_weights(teachers, group.error_mask, error_weight)
    row_weight = (torch.cat([kd_scale * (1.0 - alpha * promoted), pivot_row]) / batch)[:, None]
    if mixed_ce is None:
        per_sample = group.loss * (row_weight + error_term)
    else:
        per_sample = group.loss * row_weight + mixed_ce * error_term
    per_row = per_sample.sum(1)
    # The logged KD term: a student's KL to the teacher group; a promoted one's, to the pivot.
    ce, kd = loss_terms(group, float(alpha > 0) * students, temperature)
    if private_teaching:
        private = group_kd(
            logits, pivot_logits.detach()[None].to(logits.dtype), target, temperature=temperature, alpha=1.0,
            reduction="none", validate=False, backend=backend,
        )
        private_row = (kd_scale * alpha * promoted) * private.loss.mean(1)
        per_row = per_row + torch.cat([private_row, torch.zeros_like(private_row[:1])])
        private_kd = loss_terms(private, float(alpha > 0) * promoted, temperature)[1]
        kd = kd + torch.cat([private_kd, torch.zeros_like(private_kd[:1])])
    return MemberLosses(per_row, group.error_mask, ce, kd)


class OrcPivot(OrcPeer):
    name = "orc"
    defaults = DEFAULTS
    reads = (*ORC_FLAGS, "pivot", "pivot_member", "promote", "freeze_pivot", "pivot_lr_scale")
    pivot = "required"
    pivot_variant = None
    refines_pivot = True

    def settings(self, flags, num_nets):
        if flags.get("teacher_size") is not None:
            raise UsageError("--teacher-size is for peer mode; with --pivot, --promote P students join the pivot")
        if flags.get("refresh_teachers"):
            raise UsageError("--refresh-teachers is for peer mode, not with --pivot")
        settings = DEFAULTS.settings
        promote = settings["promote"] if flags.get("promote") is None else flags["promote"]
        if not 0 <= promote <= num_nets - 1:
            raise UsageError(f"--promote must lie in [0, N-1] = [0, {num_nets - 1}], got {promote}")
        scale, freeze = flags.get("pivot_lr_scale"), bool(flags.get("freeze_pivot"))
        if scale is not None and freeze:
            raise UsageError("--pivot-lr-scale sets a refined pivot's learning rate: drop it or --freeze-pivot")
        if scale is not None and not scale > 0:
            raise UsageError(f"--pivot-lr-scale must be > 0, got {scale:g} (--freeze-pivot keeps it fixed)")
        return {"teacher_size": None, "promote": promote, "freeze_pivot": freeze,
                "pivot_lr_scale": None if freeze else (scale or settings["pivot_lr_scale"]),
                "error_mixup": flags.get("error_mixup") is not False,
                "rank_by": flags.get("rank_by") or settings["rank_by"]}

    def describe(self, config) -> str:
        return ""

    def pivot_role(self, config) -> str:
        m = config.method
        refined = f"refined on the error images at {m.pivot_lr_scale:g} x the group's lr" if m.pivot_lr_scale else ""
        return (f"{'frozen' if m.freeze_pivot else refined}; every step the {m.promote} best-ranked student(s) by "
                f"batch {m.rank_by} join it as teachers")

    def step(self, step, images, target) -> StepOutput:
        """The ``promote`` best-ranked students join the pivot in the teacher group for this
        step; one backward, every member and a training pivot step once."""
        cfg = step.config
        logits = step.forward(images)
        pivot_logits = step.pivot_forward(images)
        promoted = step.rank(logits, target, cfg.promote)
        mixed_ce = step.mixed_ce(images, target, promoted) if cfg.error_mixup else None
        losses = pivot_orc_losses(logits, pivot_logits, target, promoted, error_weight=cfg.error_weight,
                                  error_rule=cfg.error_rule, mixed_ce=mixed_ce, private_teaching=cfg.promote > 0,
                                  **distillation(cfg))
        step.backward_and_step(losses.total)
        return StepOutput(losses.per_member[:-1].detach(), promoted, losses.error_mask, losses.ce[:-1], losses.kd[:-1])

    def check_step(self, step) -> None:
        super().check_step(step)
        if step.config.refresh_teachers:
            raise ValueError("a pivot teacher works with orc without refresh_teachers (peer mode's option)")


OrcPeer.pivot_variant = OrcPivot()
