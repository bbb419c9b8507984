"""One step of group training: ORC (docs/design.md §2) and the baselines.

Everything that decides *how* a group learns lives here, as functions on tensors:

* ``assign_roles`` / ``ScoreTracker``: the online role change (scores -> 0/1 roles).
* ``orc_losses``, ``independent_losses``, ``dml_losses``, ``kdcl_losses``: the
  per-member losses of each method from the stacked logits [N, B, C].
* ``METHOD_DEFAULTS``: each method's published temperature and loss weights.
* ``GroupStep``: forward every member, compute the method's losses, backward, step
  every member's optimizer.

Roles are data, never control flow: a member's role is a 0/1 entry of a device tensor
that weights its loss terms, so there is no ``.item()``, no Python branch on roles and
no host synchronisation inside a step. The ORC step makes exactly one ``group_kd`` call
that supplies the per-member losses (CE for teachers, CE + KD for students) and the
error-image mask (the refresh option makes a second one).
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
from .strategies import make_strategy

METHODS = ("orc", "independent", "dml", "kdcl")


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


def batch_scores(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of every member on the batch (no gradient): [N, B, C] -> [N]."""
    logits = logits.detach()
    members, batch, classes = logits.shape
    ce = F.cross_entropy(logits.reshape(members * batch, classes).float(), target.repeat(members), reduction="none")
    return ce.view(members, batch).mean(1)


def assign_roles(scores: torch.Tensor, teacher_size: int) -> torch.Tensor:
    """1.0 for the ``teacher_size`` best (lowest) scores, 0.0 for the rest: [N] fp32.

    Ties go to the lower member index (stable sort), so roles are deterministic.
    """
    order = torch.argsort(scores, stable=True)
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
    """``per_member`` [N] losses with gradient (their sum is what to backward) and the
    error-image mask [B] (all False for methods without error images)."""

    per_member: torch.Tensor
    error_mask: torch.Tensor

    @property
    def total(self) -> torch.Tensor:
        return self.per_member.sum()


def teacher_error_weights(roles: torch.Tensor, error_mask: torch.Tensor, error_weight: float) -> torch.Tensor:
    """Per-member, per-sample weights of the teachers' error-image term: [N, B].

    r_i * lambda_err * err_b / max(n_err, 1): averaging CE over the error images, and
    0 when there are none.
    """
    errors = error_mask.float()
    count = errors.sum().clamp_min(1.0)
    return roles[:, None] * (error_weight * errors / count)[None, :]


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

      teacher: mean_b CE_ib + lambda_err * sum_b err_b CE_ib / max(n_err, 1)
      student: s mean_b [(1 - alpha) CE_ib + alpha tau^2 KL_ib]   (s = ``kd_scale``)

    Both come from weighting ``result.loss`` [N, B] by c_ib = r_i (1/B + lambda err_b /
    max(n_err, 1)) + (1 - r_i) s / B. ``teacher_logits`` replaces the teachers' side
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
    return MemberLosses(per_sample.sum(1), result.error_mask)


def independent_losses(logits: torch.Tensor, target: torch.Tensor, backend: str = "auto", **_) -> MemberLosses:
    """Every member: mean CE (alpha 0 for all; the teachers' side is unused)."""
    result = group_kd(logits, logits.detach(), target, alpha=0.0, reduction="none", validate=False, backend=backend)
    return MemberLosses(result.loss.mean(1), torch.zeros_like(result.error_mask))


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
    per_member = []
    for i in range(members):
        result = group_kd(
            logits[i], teachers, target, temperature=temperature, alpha=alpha, teacher_weights=others[i],
            reduction="none", validate=False, backend=backend,
        )
        per_member.append(kd_scale * result.loss.mean())
    no_errors = torch.zeros(logits.shape[1], dtype=torch.bool, device=logits.device)
    return MemberLosses(torch.stack(per_member), no_errors)


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
    return MemberLosses(kd_scale * result.loss.mean(1), torch.zeros_like(result.error_mask))


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
    kd_scale: float = 1.0  # s of s [(1 - alpha) CE + alpha tau^2 KL] for members that distil
    backend: str = "auto"
    strategy: str = "sequential"  # how members run: orc_fast/strategies.py
    compile: bool = False  # torch.compile the members' forward (and so their backward)


class StepOutput(NamedTuple):
    losses: torch.Tensor  # [N] per-member loss, detached, on the device
    roles: torch.Tensor  # [N] 1.0 = teacher this step (zeros for the baselines)
    error_mask: torch.Tensor  # [B]


class GroupStep:
    """One training step of the whole group: forwards, the method's losses, backward, steps.

    How the members run is the strategy's business (``config.strategy``: sequential, streams,
    fused, auto; orc_fast/strategies.py), the mathematics is this class's. The host never reads a
    device value; the only host randomness is mixup's lambda (numpy's global generator,
    saved with the checkpoint).
    """

    def __init__(self, models, optimizers, config: StepConfig, device, generator: torch.Generator):
        if config.method not in METHODS:
            raise ValueError(f"unknown method {config.method!r}; known: {', '.join(METHODS)}")
        self.models, self.optimizers, self.config = list(models), list(optimizers), config
        self.generator = generator
        self.scores = ScoreTracker(len(self.models), config.rank_momentum, device)
        self.no_roles = torch.zeros(len(self.models), dtype=torch.float32, device=device)
        self.strategy = make_strategy(config.strategy, self.models, self.optimizers, device, compile=config.compile)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.strategy.forward(images)

    def local_roles(self, roles: torch.Tensor) -> torch.Tensor:
        """The roles [N] of the members this process steps, in ``self.optimizers`` order: all
        of them here; a member-parallel rank (orc_fast/distributed.py) keeps its block."""
        return roles

    def state_tensors(self) -> list[torch.Tensor]:
        """Every tensor a step changes: parameters, float buffers (batch-norm statistics)
        and optimizer state. ``--nan-policy skip-step`` snapshots these to undo a step."""
        tensors = [t for model in self.models for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
        for optimizer in self.optimizers:
            tensors += [v for state in optimizer.state.values() for v in state.values()
                        if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() > 0]
        return tensors

    def _zero_grad(self) -> None:
        self.strategy.zero_grad()

    def _backward_and_step(self, total: torch.Tensor) -> None:
        self._zero_grad()
        total.backward()
        self.strategy.step()

    def __call__(self, images: torch.Tensor, target: torch.Tensor) -> StepOutput:
        return self.strategy.run(self._step, images, target)  # auto times whole steps here

    def _step(self, images: torch.Tensor, target: torch.Tensor) -> StepOutput:
        cfg = self.config
        logits = self.forward(images)
        hyper = dict(temperature=cfg.temperature, alpha=cfg.alpha, backend=cfg.backend, kd_scale=cfg.kd_scale)
        if cfg.method != "orc":
            baseline = {"independent": independent_losses, "dml": dml_losses, "kdcl": kdcl_losses}
            losses = baseline[cfg.method](logits, target, **hyper)
            self._backward_and_step(losses.total)
            return StepOutput(losses.per_member.detach(), self.no_roles, losses.error_mask)

        roles = assign_roles(self.scores.update(batch_scores(logits, target)), cfg.teacher_size)
        hyper.update(error_weight=cfg.error_weight, error_rule=cfg.error_rule)
        mixed_ce = None
        if cfg.error_mixup:
            # Every member sees the mixed batch (roles are not known on the host); only
            # the teachers' error rows carry weight in the loss.
            lam = float(np.random.beta(cfg.mixup_alpha, cfg.mixup_alpha))
            mixed_images, target_b = mixup(images, target, lam, self.generator)
            with preserved_buffers(self.models):
                mixed_ce = mixed_cross_entropy(self.forward(mixed_images), target, target_b, lam)

        if not cfg.refresh_teachers:
            losses = orc_losses(logits, target, roles, mixed_ce=mixed_ce, **hyper)
            self._backward_and_step(losses.total)
            return StepOutput(losses.per_member.detach(), roles, losses.error_mask)

        # --refresh-teachers: the teachers step first, then the students distil from the
        # teachers' updated logits (one more forward). Each member still steps exactly
        # once: masked steps, so no role is read on the host.
        before = orc_losses(logits, target, roles, mixed_ce=mixed_ce, **hyper)
        self._zero_grad()
        (roles * before.per_member).sum().backward(retain_graph=True)
        self.strategy.masked_step(self.local_roles(roles))
        with torch.no_grad(), preserved_buffers(self.models):
            refreshed = self.forward(images)
        after = orc_losses(logits, target, roles, teacher_logits=refreshed, **hyper)
        self._zero_grad()
        ((1.0 - roles) * after.per_member).sum().backward()
        self.strategy.masked_step(1.0 - self.local_roles(roles))
        per_member = roles * before.per_member.detach() + (1.0 - roles) * after.per_member.detach()
        return StepOutput(per_member, roles, before.error_mask)
