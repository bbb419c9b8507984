"""One step of group training: ORC (docs/design.md §2) and the baselines.

Everything that decides *how* a group learns lives here, as functions on tensors:

* ``assign_roles`` / ``ScoreTracker``: the online role change (scores -> 0/1 roles).
* ``orc_losses`` (peer mode), ``pivot_orc_losses`` (pivot mode), ``independent_losses``,
  ``kd_losses``, ``dml_losses``, ``kdcl_losses``: the per-member losses of each method from
  the stacked logits [N, B, C] (and the pivot teacher's [B, C]).
* ``METHOD_DEFAULTS``: each method's published temperature and loss weights.
* ``GroupStep``: forward every member, compute the method's losses, backward, step
  every member's optimizer.

Roles are data, never control flow: a member's role is a 0/1 entry of a device tensor
that weights its loss terms, so there is no ``.item()``, no Python branch on roles and
no host synchronisation inside a step. The peer-mode ORC step makes exactly one ``group_kd``
call that supplies the per-member losses (CE for teachers, CE + KD for students) and the
error-image mask (the refresh option makes a second one); pivot mode makes a second one for
the promoted students' private teaching, whose KD target differs from the others'.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .loss import group_kd
from .masked_sgd import masked_sgd_step
from .precision import LossScaler, autocast
from .strategies import make_strategy

METHODS = ("orc", "independent", "kd", "dml", "kdcl")
PIVOT_METHODS = ("orc", "kd")  # the methods that can (orc) or must (kd) have a pivot teacher


class MethodDefaults(NamedTuple):
    """A method's own settings: loss = ce_weight * CE + kd_weight * tau^2 * KL."""

    temperature: float
    ce_weight: float
    kd_weight: float
    source: str


# Every method runs at its own published settings unless a flag overrides them
# (docs/design.md §2.1). ORC's entry is the students' weighting; teachers always train on CE
# plus the error-image term.
METHOD_DEFAULTS = {
    "independent": MethodDefaults(1.0, 1.0, 0.0, "cross-entropy only"),
    "kd": MethodDefaults(4.0, 0.1, 0.9, "Hinton et al., Distilling the Knowledge in a Neural Network, 2015, at "
                         "the settings of CRD's KD baseline (Tian et al., ICLR 2020): 0.1 CE + 0.9 tau^2 KL, tau = 4"),
    "dml": MethodDefaults(1.0, 1.0, 1.0, "Zhang et al., Deep Mutual Learning, CVPR 2018: CE + KL, tau = 1"),
    "kdcl": MethodDefaults(2.0, 1.0, 1.0, "Guo et al., KDCL, CVPR 2020: CE + tau^2 KL to the MinLogit group "
                           "teacher, tau = 2"),
    # Students keep CE at weight 1 and add tau^2 KL (the DML/KDCL form), so a member's role no
    # longer decides how much hard-label signal it gets: with (1 - alpha) CE at alpha = 0.9
    # the teachers kept the lowest batch CE and roles froze (docs/design.md §2; README).
    "orc": MethodDefaults(4.0, 1.0, 1.0, "students CE + tau^2 KL, tau = 4 (chosen on the validation split "
                          "over (1 - alpha) CE + alpha tau^2 KL at alpha = 0.9, whose roles froze)"),
}


def loss_form(ce_weight: float, kd_weight: float) -> tuple[float, float]:
    """w_ce CE + w_kd tau^2 KL as s * ((1 - alpha) CE + alpha tau^2 KL): (s, alpha), with
    s = w_ce + w_kd and alpha = w_kd / s. The kernels only know the alpha form."""
    if ce_weight < 0 or kd_weight < 0 or ce_weight + kd_weight <= 0:
        raise ValueError(f"loss weights must be >= 0 with a positive sum, got CE {ce_weight}, KD {kd_weight}")
    scale = ce_weight + kd_weight
    return scale, kd_weight / scale


# ---------------------------------------------------------------------------- roles


RANK_BY = ("ce", "accuracy")  # what a member's batch score measures (docs/design.md §2)


def batch_scores(logits: torch.Tensor, target: torch.Tensor, rank_by: str = "ce") -> torch.Tensor:
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

    def state_dict(self) -> dict:
        return {"momentum": self.momentum, "average": self.average.cpu(), "steps": self.steps.cpu()}

    def load_state_dict(self, state: dict) -> None:
        if tuple(state["average"].shape) != tuple(self.average.shape):
            raise ValueError(f"score state holds {state['average'].numel()} members, expected {self.average.numel()}")
        self.average = state["average"].to(self.average.device, torch.float32)
        self.steps = state["steps"].to(self.steps.device, torch.float32)


# ---------------------------------------------------------------------------- losses


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


def loss_terms(result, distils: torch.Tensor | float, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(ce, kd) per member from a ``group_kd`` result with per-sample ``ce``/``kl`` [N, B]:
    the batch means, KL scaled by tau^2 and kept only where ``distils`` ([N] 0/1, or a
    number) is 1. Detached: these are for the logs."""
    kd = temperature**2 * result.kl.mean(-1) * distils
    return result.ce.mean(-1).detach(), kd.detach()


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
    temperature: float = 4.0,
    alpha: float = 0.9,
    error_weight: float = 1.0,
    error_rule: str = "any",
    backend: str = "auto",
    teacher_logits: torch.Tensor | None = None,
    mixed_ce: torch.Tensor | None = None,
    kd_scale: float = 1.0,
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


def independent_losses(logits: torch.Tensor, target: torch.Tensor, backend: str = "auto", **_) -> MemberLosses:
    """Every member: mean CE (alpha 0 for all; the teachers' side is unused)."""
    result = group_kd(logits, logits.detach(), target, alpha=0.0, reduction="none", validate=False, backend=backend)
    return MemberLosses(result.loss.mean(1), torch.zeros_like(result.error_mask), *loss_terms(result, 0.0, 1.0))


def dml_losses(
    logits: torch.Tensor, target: torch.Tensor, temperature: float = 1.0, alpha: float = 0.5, backend: str = "auto",
    kd_scale: float = 2.0, **_
) -> MemberLosses:
    """Deep Mutual Learning: every member distils from the mean of all the *other* members:
    s [(1 - alpha) CE + alpha tau^2 KL] (the defaults give DML's CE + KL at tau = 1).

    One ``group_kd`` call per member, with teacher weights that mask the member itself out
    (the mean over the others differs per member, which one call cannot express).
    """
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


def min_logit_teacher(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """KDCL's MinLogit group teacher: [N, B, C] -> [B, C], detached.

    Each member's logits are shifted so its true-class logit is 0 (z_i - z_i[y]); the
    teacher takes, class by class, the smallest shifted logit over the members, i.e. the
    least confusing member for every wrong class.
    """
    logits = logits.detach().float()
    true_class = logits.gather(2, target.view(1, -1, 1).expand(logits.shape[0], -1, 1))
    return (logits - true_class).amin(0)


def kdcl_losses(
    logits: torch.Tensor, target: torch.Tensor, temperature: float = 2.0, alpha: float = 0.5, backend: str = "auto",
    kd_scale: float = 2.0, **_
) -> MemberLosses:
    """KDCL (MinLogit): every member, s [(1 - alpha) CE + alpha tau^2 KL] to the group teacher
    built from the members' logits (``min_logit_teacher``); one ``group_kd`` call."""
    teacher = min_logit_teacher(logits, target).to(logits.dtype)
    result = group_kd(
        logits, teacher[None], target, temperature=temperature, alpha=alpha,
        reduction="none", validate=False, backend=backend,
    )
    return MemberLosses(kd_scale * result.loss.mean(1), torch.zeros_like(result.error_mask),
                        *loss_terms(result, float(alpha > 0), temperature))


def kd_losses(
    logits: torch.Tensor, target: torch.Tensor, pivot_logits: torch.Tensor, temperature: float = 4.0,
    alpha: float = 0.9, backend: str = "auto", kd_scale: float = 1.0, **_
) -> MemberLosses:
    """Hinton KD: every member, s [(1 - alpha) CE + alpha tau^2 KL] to the pivot teacher alone
    (``pivot_logits`` [B, C]); one ``group_kd`` call."""
    result = group_kd(
        logits, pivot_logits.detach()[None].to(logits.dtype), target, temperature=temperature, alpha=alpha,
        reduction="none", validate=False, backend=backend,
    )
    return MemberLosses(kd_scale * result.loss.mean(1), torch.zeros_like(result.error_mask),
                        *loss_terms(result, float(alpha > 0), temperature))


def pivot_orc_losses(
    logits: torch.Tensor,
    pivot_logits: torch.Tensor,
    target: torch.Tensor,
    promoted: torch.Tensor,
    temperature: float = 4.0,
    alpha: float = 0.5,
    error_weight: float = 1.0,
    error_rule: str = "any",
    backend: str = "auto",
    mixed_ce: torch.Tensor | None = None,
    kd_scale: float = 2.0,
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


# ---------------------------------------------------------------------------- mixup


def mixup(images: torch.Tensor, target: torch.Tensor, lam: float, generator: torch.Generator):
    """Mix every image with a random other one of the batch: lam x + (1 - lam) x[perm]."""
    perm = torch.randperm(images.shape[0], generator=generator, device=images.device)
    return lam * images + (1.0 - lam) * images[perm], target[perm]


def mixed_cross_entropy(logits: torch.Tensor, target: torch.Tensor, target_b: torch.Tensor, lam: float) -> torch.Tensor:
    """Per-member, per-sample mixup CE: [N, B, C] -> [N, B], with gradient."""
    members, batch, classes = logits.shape
    flat = logits.reshape(members * batch, classes).float()
    ce_a = F.cross_entropy(flat, target.repeat(members), reduction="none")
    ce_b = F.cross_entropy(flat, target_b.repeat(members), reduction="none")
    return (lam * ce_a + (1.0 - lam) * ce_b).view(members, batch)


# ---------------------------------------------------------------------------- steps


@contextmanager
def preserved_buffers(models: Sequence[nn.Module]):
    """Run extra forwards without touching batch-norm running statistics."""
    saved = [[b.detach().clone() for b in m.buffers()] for m in models]
    try:
        yield
    finally:
        with torch.no_grad():
            for model, buffers in zip(models, saved):
                for buffer, value in zip(model.buffers(), buffers):
                    buffer.data.copy_(value)


@dataclass
class StepConfig:
    method: str = "orc"
    teacher_size: int = 2
    temperature: float = 4.0
    alpha: float = 0.9
    error_weight: float = 1.0
    error_rule: str = "any"
    error_mixup: bool = False
    mixup_alpha: float = 1.0
    refresh_teachers: bool = False
    rank_momentum: float = 0.0
    rank_by: str = "ce"  # the batch score: RANK_BY
    promote: int = 1  # pivot mode: students promoted into the teacher group each step
    kd_scale: float = 1.0  # s of s [(1 - alpha) CE + alpha tau^2 KL] for members that distil
    backend: str = "auto"
    strategy: str = "sequential"  # how members run: orc_fast/strategies.py
    compile: bool = False  # torch.compile the members' forward (and so their backward)
    precision: str = "fp32"  # fp32, bf16 or fp16 (resolved; orc_fast/precision.py)


class StepOutput(NamedTuple):
    losses: torch.Tensor  # [N] per-member loss, detached, on the device
    roles: torch.Tensor  # [N] 1.0 = teacher this step (zeros for the baselines)
    error_mask: torch.Tensor  # [B]
    ce: torch.Tensor  # [N] each member's batch CE (MemberLosses.ce)
    kd: torch.Tensor  # [N] each member's tau^2 KL term, 0 where it did not distil


class GroupStep:
    """One training step of the whole group: forwards, the method's losses, backward, steps.

    How the members run is the strategy's business (``config.strategy``: sequential, streams,
    fused, auto; orc_fast/strategies.py), the mathematics is this class's. The host never reads a
    device value; the only host randomness is mixup's lambda (numpy's global generator,
    saved with the checkpoint).
    """

    def __init__(self, models, optimizers, config: StepConfig, device, generator: torch.Generator,
                 pivot: nn.Module | None = None, pivot_optimizer: torch.optim.Optimizer | None = None):
        if config.method not in METHODS:
            raise ValueError(f"unknown method {config.method!r}; known: {', '.join(METHODS)}")
        if config.rank_by not in RANK_BY:
            raise ValueError(f"unknown rank_by {config.rank_by!r}; known: {', '.join(RANK_BY)}")
        if pivot is None and (config.method == "kd" or pivot_optimizer is not None):
            raise ValueError(f"method {config.method!r} needs a pivot teacher")
        if pivot is not None and (config.method not in PIVOT_METHODS or config.refresh_teachers):
            raise ValueError(f"a pivot teacher works with {' or '.join(PIVOT_METHODS)} without refresh_teachers")
        if pivot_optimizer is not None and config.method != "orc":
            raise ValueError("only orc refines the pivot: method kd keeps it frozen")
        self.models, self.optimizers, self.config = list(models), list(optimizers), config
        # The pivot teacher (pivot mode, kd): trained when it has an optimizer, else frozen.
        self.pivot, self.pivot_optimizer = pivot, pivot_optimizer
        self.generator = generator
        self.device = torch.device(device)
        # fp16 only: one dynamic loss scale for the group (bf16 has fp32's range).
        self.scaler = LossScaler(device) if config.precision == "fp16" else None
        self.scores = ScoreTracker(len(self.models), config.rank_momentum, device)
        self.no_roles = torch.zeros(len(self.models), dtype=torch.float32, device=device)
        self.strategy = make_strategy(config.strategy, self.models, self.optimizers, device, compile=config.compile)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with autocast(self.config.precision, self.device):
            return self.strategy.forward(images)

    def local_roles(self, roles: torch.Tensor) -> torch.Tensor:
        """The roles [N] of the members this process steps, in ``self.optimizers`` order: all
        of them here; a member-parallel rank (orc_fast/distributed.py) keeps its block."""
        return roles

    def trained_modules(self) -> tuple[list[nn.Module], list[torch.optim.Optimizer]]:
        """The modules a step updates and their optimizers: the members, and a pivot that trains."""
        if self.pivot_optimizer is None:
            return self.models, self.optimizers
        return [*self.models, self.pivot], [*self.optimizers, self.pivot_optimizer]

    def state_tensors(self) -> list[torch.Tensor]:
        """Every tensor a step changes: parameters, float buffers (batch-norm statistics)
        and optimizer state. ``--nan-policy skip-step`` snapshots these to undo a step."""
        models, optimizers = self.trained_modules()
        tensors = [t for model in models for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
        for optimizer in optimizers:
            tensors += [v for state in optimizer.state.values() for v in state.values()
                        if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() > 0]
        return tensors

    def pivot_forward(self, images: torch.Tensor) -> torch.Tensor:
        """The pivot's logits [B, C]: with gradient when it trains, else without (it is in
        eval mode then, the trainer's business)."""
        with autocast(self.config.precision, self.device):
            if self.pivot_optimizer is not None:
                return self.pivot(images)
            with torch.no_grad():
                return self.pivot(images)

    def _zero_grad(self) -> None:
        self.strategy.zero_grad()
        if self.pivot_optimizer is not None:
            self.pivot_optimizer.zero_grad(set_to_none=True)

    def _stepped_params(self) -> list[torch.Tensor]:
        """The parameters whose gradients this process's steps read (stacked ones under fused)."""
        params = [p for optimizer, g, _, _ in self.strategy.graph_optimizers() for p in optimizer.param_groups[g]["params"]]
        if self.pivot_optimizer is not None:
            params += [p for group in self.pivot_optimizer.param_groups for p in group["params"]]
        return params

    def _backward_and_step(self, loss: torch.Tensor, apply: torch.Tensor | None = None,
                           retain_graph: bool = False) -> None:
        """Gradients of ``loss``, then the SGD step of every member (``apply`` None) or of the
        members where ``apply`` [N] is 1 (a masked step: ``--refresh-teachers``).

        Under fp16 the loss is scaled, the gradients unscaled, and a step whose gradients are
        not all finite applies nothing (masked, no host read; orc_fast/precision.py)."""
        self._zero_grad()
        if self.scaler is not None:
            loss = self.scaler.scaled(loss)
        loss.backward(retain_graph=retain_graph)
        pivot_apply = None
        if self.scaler is not None:
            finite = 1.0 - self.scaler.unscale(self._stepped_params())
            self.scaler.update()
            apply = finite.expand(len(self.optimizers)) if apply is None else apply * finite
            pivot_apply = finite
        if apply is None:
            self.strategy.step()
        else:
            self.strategy.masked_step(apply)
        if self.pivot_optimizer is not None:
            if pivot_apply is None:
                self.pivot_optimizer.step()
            else:
                masked_sgd_step(self.pivot_optimizer, pivot_apply)

    def _mixed_ce(self, images: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``--error-mixup``'s CE [N, B] (N + 1 rows with a pivot) on the batch mixed with itself.

        Every member sees the mixed batch (roles are not known on the host); only the
        teachers' error rows carry weight in the loss. A frozen pivot gets a zero row.
        """
        cfg = self.config
        lam = float(np.random.beta(cfg.mixup_alpha, cfg.mixup_alpha))
        mixed_images, target_b = mixup(images, target, lam, self.generator)
        with preserved_buffers(self.trained_modules()[0]), autocast(cfg.precision, self.device):
            mixed_logits = self.forward(mixed_images)
            if self.pivot is not None and self.pivot_optimizer is not None:
                mixed_logits = torch.cat([mixed_logits, self.pivot(mixed_images)[None].to(mixed_logits.dtype)])
        mixed = mixed_cross_entropy(mixed_logits, target, target_b, lam)
        if self.pivot is not None and self.pivot_optimizer is None:
            mixed = torch.cat([mixed, torch.zeros_like(mixed[:1])])
        return mixed

    def _rank(self, logits: torch.Tensor, target: torch.Tensor, best: int) -> torch.Tensor:
        """1.0 for the ``best`` members by (smoothed) batch score; ties rotate with the step."""
        scores = self.scores.update(batch_scores(logits, target, self.config.rank_by))
        return assign_roles(scores, best, tie_start=self.scores.steps)

    def __call__(self, images: torch.Tensor, target: torch.Tensor) -> StepOutput:
        return self.strategy.run(self._step, images, target)  # auto times whole steps here

    def _step(self, images: torch.Tensor, target: torch.Tensor) -> StepOutput:
        cfg = self.config
        logits = self.forward(images)
        hyper = dict(temperature=cfg.temperature, alpha=cfg.alpha, backend=cfg.backend, kd_scale=cfg.kd_scale)
        if cfg.method != "orc":
            baseline = {"independent": independent_losses, "kd": kd_losses, "dml": dml_losses, "kdcl": kdcl_losses}
            if self.pivot is not None:
                hyper.update(pivot_logits=self.pivot_forward(images))
            losses = baseline[cfg.method](logits, target, **hyper)
            self._backward_and_step(losses.total)
            return StepOutput(losses.per_member.detach(), self.no_roles, losses.error_mask, losses.ce, losses.kd)

        hyper.update(error_weight=cfg.error_weight, error_rule=cfg.error_rule)
        if self.pivot is not None:
            return self._pivot_step(images, target, logits, hyper)
        roles = self._rank(logits, target, cfg.teacher_size)
        mixed_ce = self._mixed_ce(images, target) if cfg.error_mixup else None

        if not cfg.refresh_teachers:
            losses = orc_losses(logits, target, roles, mixed_ce=mixed_ce, **hyper)
            self._backward_and_step(losses.total)
            return StepOutput(losses.per_member.detach(), roles, losses.error_mask, losses.ce, losses.kd)

        # --refresh-teachers: the teachers step first, then the students distil from the
        # teachers' updated logits (one more forward). Each member still steps exactly
        # once: masked steps, so no role is read on the host.
        before = orc_losses(logits, target, roles, mixed_ce=mixed_ce, **hyper)
        self._backward_and_step((roles * before.per_member).sum(), self.local_roles(roles), retain_graph=True)
        with torch.no_grad(), preserved_buffers(self.models):
            refreshed = self.forward(images)
        after = orc_losses(logits, target, roles, teacher_logits=refreshed, **hyper)
        self._backward_and_step(((1.0 - roles) * after.per_member).sum(), 1.0 - self.local_roles(roles))
        def by_role(first, second):  # a teacher's value from before, a student's from after
            return roles * first.detach() + (1.0 - roles) * second.detach()

        return StepOutput(by_role(before.per_member, after.per_member), roles, before.error_mask,
                          by_role(before.ce, after.ce), by_role(before.kd, after.kd))

    def _pivot_step(self, images: torch.Tensor, target: torch.Tensor, logits: torch.Tensor, hyper: dict) -> StepOutput:
        """Pivot mode (docs/design.md §2): the ``promote`` best-ranked students join the pivot
        in the teacher group for this step; one backward, every member and a training pivot
        step once."""
        cfg = self.config
        pivot_logits = self.pivot_forward(images)
        promoted = self._rank(logits, target, cfg.promote)
        mixed_ce = self._mixed_ce(images, target) if cfg.error_mixup else None
        losses = pivot_orc_losses(logits, pivot_logits, target, promoted, mixed_ce=mixed_ce,
                                  private_teaching=cfg.promote > 0, **hyper)
        self._backward_and_step(losses.total)
        return StepOutput(losses.per_member[:-1].detach(), promoted, losses.error_mask, losses.ce[:-1], losses.kd[:-1])
