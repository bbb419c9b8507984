"""One training step of a whole group, and the one owner of the group's trainable state.

``GroupStep`` holds the members, their optimizers, a pivot teacher and its optimizer, the
fp16 loss scale and the ranking state, and runs a step as: forward every member -> the
method's losses (orc_fast/methods/) -> backward -> every optimizer's step. How the members
run is the strategy's business (orc_fast/strategies.py); where they live is the
placement's (all here, or a block per rank: orc_fast/distributed.py).

Roles are data, never control flow (docs/design.md §2): the host never reads a device value
inside a step. The only host randomness is mixup's lambda (numpy's global generator, saved
with the checkpoint).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import methods
from .masked_sgd import masked_sgd_step
from .methods import StepOutput
from .precision import LossScaler, autocast
from .roles import RANK_BY, ScoreTracker, batch_scores
from .strategies import make_strategy


@dataclass(frozen=True)
class StepConfig:
    """How a group step trains. A setting left None takes the method's own default
    (orc_fast/methods/, the one place defaults live); ``teacher_size`` None is N // 2, and
    ``alpha`` given without ``kd_scale`` is the alpha form (1 - alpha) CE + alpha tau^2 KL."""

    method: str = "orc"
    teacher_size: int | None = None
    temperature: float | None = None
    alpha: float | None = None
    kd_scale: float | None = None  # s of s [(1 - alpha) CE + alpha tau^2 KL] for members that distil
    error_weight: float | None = None
    error_rule: str | None = None
    error_mixup: bool | None = None
    mixup_alpha: float | None = None
    refresh_teachers: bool | None = None
    rank_momentum: float | None = None
    rank_by: str | None = None  # the batch score: RANK_BY
    promote: int | None = None  # pivot mode: students promoted into the teacher group each step
    pivot_lr_scale: float | None = None  # a training pivot's lr over the group's
    backend: str = "auto"
    strategy: str = "sequential"  # how members run: orc_fast/strategies/
    # True: never read a device value on the host inside a step (torch.compile(fullgraph),
    # CUDA graphs); the error batch then runs through every member, not the teachers alone.
    sync_free: bool = False
    compile: bool = False  # torch.compile the members' forward (and so their backward)
    precision: str = "fp32"  # fp32, bf16 or fp16 (resolved; orc_fast/precision.py)

    def resolved(self, method: methods.Method, num_members: int) -> StepConfig:
        """Every None setting filled from ``method``'s defaults."""
        defaults = method.defaults
        alpha, kd_scale = defaults.weights(self.alpha, self.kd_scale)
        filled = {"temperature": defaults.temperature, "alpha": alpha, "kd_scale": kd_scale,
                  "teacher_size": num_members // 2,
                  "rank_momentum": 0.0, "refresh_teachers": False, "error_mixup": False,
                  **defaults.settings}
        names = {f.name for f in fields(self)}
        return replace(self, **{k: v for k, v in filled.items() if k in names and getattr(self, k) is None})


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


class GroupStep:
    """One training step of the whole group, and the owner of everything it trains.

    ``placement`` (orc_fast/distributed.py) says which members this process holds:
    None, all of them; else an object with ``num_members``, ``exchange`` (this process's
    logits -> the whole group's) and ``local_rows`` (the group's [N] -> this process's).
    """

    def __init__(self, models, optimizers, config: StepConfig, device, generator: torch.Generator,
                 pivot: nn.Module | None = None, pivot_optimizer: torch.optim.Optimizer | None = None,
                 placement=None):
        if config.method not in methods.REGISTRY:
            raise ValueError(f"unknown method {config.method!r}; known: {', '.join(methods.names())}")
        if config.rank_by is not None and config.rank_by not in RANK_BY:
            raise ValueError(f"unknown rank_by {config.rank_by!r}; known: {', '.join(RANK_BY)}")
        self.method = methods.get(config.method, pivot=pivot is not None)
        self.placement = placement
        self.num_members = len(models) if placement is None else placement.num_members
        self.models, self.optimizers = list(models), list(optimizers)
        # The pivot teacher (pivot mode, kd): trained when it has an optimizer, else frozen.
        self.pivot, self.pivot_optimizer = pivot, pivot_optimizer
        self.config = config.resolved(self.method, self.num_members)
        self.method.check_step(self)
        self.teacher_size = self.config.teacher_size
        self.generator = generator
        self.device = torch.device(device)
        # fp16 only: one dynamic loss scale for the group (bf16 has fp32's range).
        self.scaler = LossScaler(device) if self.config.precision == "fp16" else None
        self.scores = ScoreTracker(self.num_members, self.config.rank_momentum, device)
        self.no_roles = torch.zeros(self.num_members, dtype=torch.float32, device=device)
        self.strategy = make_strategy(self.config.strategy, self.models, self.optimizers, device,
                                      compile=self.config.compile)

    # ---------------------------------------------------------------- the trainer's handles

    @property
    def all_optimizers(self) -> list:
        """Every optimizer the learning-rate schedule drives: the members', and a training pivot's."""
        return self.optimizers + ([self.pivot_optimizer] if self.pivot_optimizer is not None else [])

    def set_lr(self, lr: float) -> None:
        """The schedule's lr for this step: the members', and a training pivot's scaled."""
        scale = self.config.pivot_lr_scale or 1.0
        for optimizer in self.all_optimizers:
            for param_group in optimizer.param_groups:
                param_group["lr"] = lr * (scale if optimizer is self.pivot_optimizer else 1.0)

    def set_train_mode(self) -> None:
        """Members train; a pivot trains only when it has an optimizer (a frozen one stays in
        eval mode, batch-norm statistics included)."""
        for model in self.models:
            model.train()
        if self.pivot is not None:
            self.pivot.train(self.pivot_optimizer is not None)

    def state_dict(self) -> dict:
        """What a checkpoint needs to continue this group bit for bit."""
        return {
            "models": [m.state_dict() for m in self.models], "optimizers": [o.state_dict() for o in self.optimizers],
            "scores": self.scores.state_dict(), "scaler": None if self.scaler is None else self.scaler.state_dict(),
            "pivot": None if self.pivot is None else {
                "model": self.pivot.state_dict(),
                "optimizer": None if self.pivot_optimizer is None else self.pivot_optimizer.state_dict(),
            },
        }

    def load_state_dict(self, state: dict) -> None:
        for model, saved in zip(self.models, state["models"], strict=True):
            model.load_state_dict(saved)
        for optimizer, saved in zip(self.optimizers, state["optimizers"], strict=True):
            optimizer.load_state_dict(saved)
        self.scores.load_state_dict(state["scores"])
        if self.scaler is not None:
            self.scaler.load_state_dict(state["scaler"])
        if self.pivot is not None:  # the pivot as the run left it (a refined pivot has moved on)
            self.pivot.load_state_dict(state["pivot"]["model"])
            if self.pivot_optimizer is not None:
                self.pivot_optimizer.load_state_dict(state["pivot"]["optimizer"])

    def graph_optimizers(self) -> list:
        """(optimizer, group index, source optimizer, source group index) of every param group a
        step updates, the pivot's included: a CUDA graph turns each one's lr into a device
        tensor refilled from the source before every replay (orc_fast/cuda_graphs.py)."""
        pairs = list(self.strategy.graph_optimizers())
        if self.pivot_optimizer is not None:
            pairs += [(self.pivot_optimizer, g, self.pivot_optimizer, g)
                      for g in range(len(self.pivot_optimizer.param_groups))]
        return pairs

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

    # ---------------------------------------------------------------- the parts a method's step uses

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The whole group's logits [N, B, C] (this process's members with gradient)."""
        with autocast(self.config.precision, self.device):
            logits = self.strategy.forward(images)
        return logits if self.placement is None else self.placement.exchange(logits)

    def extra_forward(self, images: torch.Tensor) -> torch.Tensor:
        """Another forward of the members, without gradient and leaving batch-norm statistics
        as they were."""
        with torch.no_grad(), preserved_buffers(self.models):
            return self.forward(images)

    def local_roles(self, roles: torch.Tensor) -> torch.Tensor:
        """The roles [N] of the members this process steps, in ``self.optimizers`` order."""
        return roles if self.placement is None else self.placement.local_rows(roles)

    def pivot_forward(self, images: torch.Tensor) -> torch.Tensor:
        """The pivot's logits [B, C]: with gradient when it trains, else without (it is in
        eval mode then, the trainer's business)."""
        with autocast(self.config.precision, self.device):
            if self.pivot_optimizer is not None:
                return self.pivot(images)
            with torch.no_grad():
                return self.pivot(images)

    def rank(self, logits: torch.Tensor, target: torch.Tensor, best: int) -> torch.Tensor:
        """1.0 for the ``best`` members by (smoothed) batch score; ties rotate with the step."""
        return self.scores.rank(batch_scores(logits, target, self.config.rank_by), best)

    def mixed_ce(self, images: torch.Tensor, target: torch.Tensor, teachers: torch.Tensor) -> torch.Tensor:
        """``--error-mixup``'s CE [N, B] (N + 1 rows with a pivot) on the batch mixed with itself.

        Only the teachers' rows carry weight in the loss (``teachers`` [N] 0/1; a pivot is
        always one), so only the teachers run the mixed batch: one small read of the roles on
        the host per step, and the students' rows are zeros. Where no host read is allowed
        (``sync_free``), under member-parallel placement, or with a strategy that runs only
        the whole group (fused), every member runs it (the same values: a zero weight). A
        frozen pivot gets a zero row.
        """
        cfg = self.config
        lam = float(np.random.beta(cfg.mixup_alpha, cfg.mixup_alpha))
        mixed_images, target_b = mixup(images, target, lam, self.generator)
        trains_pivot = self.pivot is not None and self.pivot_optimizer is not None
        with preserved_buffers(self.trained_modules()[0]), autocast(cfg.precision, self.device):
            logits, rows = self._mixed_member_logits(mixed_images, teachers)
            if trains_pivot:
                pivot_logits = self.pivot(mixed_images)[None]
                logits = pivot_logits if logits is None else torch.cat([logits, pivot_logits.to(logits.dtype)])
                rows = None if rows is None else [*rows, self.num_members]
        full = torch.zeros((self.num_members + trains_pivot, len(target)), dtype=torch.float32, device=target.device)
        if logits is None:  # nobody teaches this step (a frozen pivot, no student promoted)
            mixed = full
        else:
            mixed = mixed_cross_entropy(logits, target, target_b, lam)
            if rows is not None:  # the teachers' rows (and a training pivot's, last) into the group's [N (+1), B]
                mixed = full.index_copy(0, torch.tensor(rows, device=mixed.device), mixed)
        if self.pivot is not None and not trains_pivot:
            mixed = torch.cat([mixed, torch.zeros_like(mixed[:1])])
        return mixed

    def _mixed_member_logits(self, images: torch.Tensor, teachers: torch.Tensor):
        """(logits, rows): the teacher members' logits on the mixed batch and their rows (None
        and [] when no member teaches), or every member's logits and rows None."""
        if not self.config.sync_free and self.placement is None:
            members = torch.nonzero(teachers).flatten().tolist()  # the step's one host read
            if not members:
                return None, []
            logits = self.strategy.forward_members(images, members)
            if logits is not None:
                return logits, members
        return self.forward(images), None

    def backward_and_step(self, loss: torch.Tensor, apply: torch.Tensor | None = None,
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

    def _zero_grad(self) -> None:
        self.strategy.zero_grad()
        if self.pivot_optimizer is not None:
            self.pivot_optimizer.zero_grad(set_to_none=True)

    def _stepped_params(self) -> list[torch.Tensor]:
        """The parameters whose gradients this process's steps read (stacked ones under fused)."""
        return [p for optimizer, g, _, _ in self.graph_optimizers() for p in optimizer.param_groups[g]["params"]]

    # ---------------------------------------------------------------- the step

    def __call__(self, images: torch.Tensor, target: torch.Tensor) -> StepOutput:
        """One step: the method's forward, losses, backward and optimizer steps; the strategy
        sees it whole (``auto`` times it)."""
        self.strategy.before_step()
        output = self.method.step(self, images, target)
        self.strategy.after_step()
        return output
