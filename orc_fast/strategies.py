"""How a group step runs its members: ``--strategy sequential|streams|fused|auto``.

A strategy does the two parts of ``GroupStep`` that touch every member: "forward every
member -> logits [N, B, C]" and "optimizer step for every member" (plus the masked step of
``--refresh-teachers``). The losses and the backward stay in ``GroupStep``; every strategy
computes the same mathematics, only the schedule differs:

* ``sequential``: the loop over members, each with its own optimizer (the baseline).
* ``streams``: on CUDA, each member's forward, backward (autograd runs a backward op on the
  stream of its forward op) and optimizer step on its own stream, joined by events before
  the shared loss and at the end of the step. On CPU it is ``sequential``.
* ``fused``: members of the same architecture run as one wide model: parameters and
  buffers stacked (``torch.func.stack_module_state``), one ``vmap(functional_call)`` for the
  forward, BatchNorm running statistics batched per member, one foreach/fused SGD step over
  the stacked parameters. Other members run beside them.
* ``auto``: times a few real training steps of each applicable strategy (they are ordinary
  steps, counted as such: same math, so nothing is wasted) and keeps the fastest; a
  challenger must beat ``sequential`` by ``AUTO_MARGIN`` to be chosen.

The stacked tensors are the source of truth while ``fused`` runs, and the member modules
and optimizers stay in sync without copies: every member parameter, buffer and momentum
buffer is re-pointed (``.data``) to its row of the stacked tensor. ``model.state_dict()``,
evaluation, ``load_state_dict`` and checkpoints keep working on the members, in the
unchanged per-member format, and strategies can take turns (``auto``) on the same storage.

No strategy reads a device value on the host during a step (``auto`` syncs once, when it
decides).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from .masked_sgd import masked_sgd_step

STRATEGIES = ("sequential", "streams", "fused", "auto")
AUTO_MARGIN = 0.05  # a challenger must be 5% faster than sequential (see benchmarks/results)
FUSABLE_HYPER = ("momentum", "dampening", "weight_decay", "nesterov", "maximize")


def make_strategy(name: str, models, optimizers, device, compile: bool = False) -> SequentialStrategy:
    """The strategy called ``name`` for this group (raises ValueError for an unknown one)."""
    kinds = {"sequential": SequentialStrategy, "streams": StreamsStrategy, "fused": FusedStrategy,
             "auto": AutoStrategy}
    if name not in kinds:
        raise ValueError(f"unknown strategy {name!r}; known: {', '.join(STRATEGIES)}")
    return kinds[name](models, optimizers, device, compile=compile)


def _compiled(fn):
    return torch.compile(fn, dynamic=False)


# ---------------------------------------------------------------------------- sequential


class SequentialStrategy:
    """One member after another; each member's own optimizer steps it."""

    name = "sequential"
    ready = True  # False while auto is still measuring

    def __init__(self, models: Sequence[nn.Module], optimizers, device, compile: bool = False):
        if len(models) != len(optimizers):
            raise ValueError(f"{len(models)} models but {len(optimizers)} optimizers")
        self.models, self.optimizers = list(models), list(optimizers)
        self.device = torch.device(device)
        self.compile = compile
        # torch.compile reuses one graph for members of the same class (parameters are
        # graph inputs), so a homogeneous group compiles once.
        self.member_forwards = [_compiled(m) if compile else m for m in self.models]

    @property
    def chosen(self) -> str:
        return self.name

    def activate(self) -> None:
        """Called when this strategy (re)starts running the group after another one."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.stack([forward(images) for forward in self.member_forwards])

    def zero_grad(self) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)

    def step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()

    def masked_step(self, apply: torch.Tensor) -> None:
        """SGD step of member i only where apply[i] == 1 (``--refresh-teachers``)."""
        for optimizer, member_apply in zip(self.optimizers, apply):
            masked_sgd_step(optimizer, member_apply)

    def run(self, step: Callable, images: torch.Tensor, target: torch.Tensor):
        """Run one whole group step (``GroupStep``'s body); ``auto`` times it here."""
        return step(images, target)

    def graph_optimizers(self) -> list[tuple[torch.optim.Optimizer, int, torch.optim.Optimizer, int]]:
        """(optimizer, group index, source optimizer, source group index) for every param group
        this strategy steps; the source holds the lr the trainer sets (``CudaGraphStep``)."""
        return [(o, g, o, g) for o in self.optimizers for g in range(len(o.param_groups))]


# ---------------------------------------------------------------------------- streams


class StreamsStrategy(SequentialStrategy):
    """Each member on its own CUDA stream; on other devices the sequential loop.

    Allocator rules: a tensor made on one stream and used on another is marked with
    ``record_stream`` so its memory is not reused while the other stream may still read
    it (the input batch on every member stream; each member's logits on the main stream).
    """

    name = "streams"

    def __init__(self, models, optimizers, device, compile: bool = False):
        super().__init__(models, optimizers, device, compile)
        self.enabled = self.device.type == "cuda"
        self.streams = [torch.cuda.Stream(self.device) for _ in self.models] if self.enabled else []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return super().forward(images)
        main = torch.cuda.current_stream(self.device)
        outputs = []
        for forward, stream in zip(self.member_forwards, self.streams):
            stream.wait_stream(main)  # the batch and the previous step's updates are ready
            with torch.cuda.stream(stream):
                images.record_stream(stream)
                outputs.append(forward(images))
        for stream, logits in zip(self.streams, outputs):
            main.wait_stream(stream)  # join before the shared loss
            logits.record_stream(main)
        return torch.stack(outputs)

    def step(self) -> None:
        if not self.enabled:
            return super().step()
        main = torch.cuda.current_stream(self.device)
        for optimizer, stream in zip(self.optimizers, self.streams):
            # Gradients come from this member's stream (its backward ran there) or from the
            # main stream (autograd joins leaf streams to the caller): wait for both.
            stream.wait_stream(main)
            with torch.cuda.stream(stream):
                optimizer.step()
        for stream in self.streams:
            main.wait_stream(stream)  # join before the next step


# ---------------------------------------------------------------------------- fused


def _structure_key(model: nn.Module):
    """Models with equal keys can share one functional_call: same class, same layer
    configuration (repr shows strides, paddings, ...), same state shapes and dtypes."""
    state = tuple((name, tuple(t.shape), t.dtype, t.device.type) for name, t in model.state_dict(keep_vars=True).items())
    return type(model), repr(model), state


def fusable_subgroups(models: Sequence[nn.Module]) -> list[list[int]]:
    """Member indices grouped by architecture, in first-appearance order."""
    groups: dict = {}
    for index, model in enumerate(models):
        groups.setdefault(_structure_key(model), []).append(index)
    return list(groups.values())


def _sgd_settings(optimizer, model: nn.Module) -> tuple | None:
    """The SGD hyper-parameters of a plain one-group SGD over ``model.parameters()``, else None."""
    if type(optimizer) is not torch.optim.SGD or len(optimizer.param_groups) != 1:
        return None
    group = optimizer.param_groups[0]
    params = list(model.parameters())
    if len(group["params"]) != len(params) or any(a is not b for a, b in zip(group["params"], params)):
        return None
    if group.get("differentiable"):
        return None
    return tuple(group[key] for key in FUSABLE_HYPER)


def fusion_problem(models, optimizers) -> str | None:
    """Why the fused strategy cannot run this group, or None when it can."""
    for index, (model, optimizer) in enumerate(zip(models, optimizers)):
        if _sgd_settings(optimizer, model) is None:
            return (f"member {index}'s optimizer is not a plain one-group torch.optim.SGD over its "
                    f"model's parameters")
    for indices in fusable_subgroups(models):
        settings = {_sgd_settings(optimizers[i], models[i]) for i in indices}
        if len(settings) > 1:
            return f"members {indices} share an architecture but not their SGD settings"
    return None


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.device.type == "meta":  # no memory, nothing to keep in sync
        return True
    return a.data_ptr() == b.data_ptr()


class _Subgroup:
    """Members of one architecture, stacked: the wide model and its bookkeeping."""

    def __init__(self, indices, models, optimizers, device):
        self.indices = list(indices)
        self.members = [models[i] for i in indices]
        self.optimizers = [optimizers[i] for i in indices]
        self.index_tensor = torch.tensor(self.indices, device=device)
        self.param_names = [name for name, _ in self.members[0].named_parameters()]
        self.buffer_names = [name for name, _ in self.members[0].named_buffers()]
        # The same structure with no storage: functional_call only needs its code.
        self.base = copy.deepcopy(self.members[0]).to("meta")
        self.params, self.buffers = stack_module_state(self.members)
        self._bind(first=True)

    def member_tensors(self, i: int, names, kind: str):
        getter = self.members[i].get_parameter if kind == "param" else self.members[i].get_buffer
        return [getter(name) for name in names]

    def _bind(self, first: bool = False) -> None:
        """Point every member tensor at its row of the stacked tensor (no copy from then on);
        later calls re-point only a tensor that was moved elsewhere meanwhile."""
        with torch.no_grad():
            for names, stacked, kind in ((self.param_names, self.params, "param"), (self.buffer_names, self.buffers, "buffer")):
                for i in range(len(self.members)):
                    for name, tensor in zip(names, self.member_tensors(i, names, kind)):
                        row = stacked[name].detach()[i]
                        if first or not _same_memory(tensor, row):
                            if not first:
                                row.copy_(tensor)
                            tensor.data = row

    def forward_fn(self):
        base = self.base

        def one_member(params, buffers, images):
            return functional_call(base, (params, buffers), (images,))

        def wide(params, buffers, images):
            return vmap(one_member, in_dims=(0, 0, None), randomness="different")(params, buffers, images)

        return wide

    def sync_mode(self) -> None:
        training = self.members[0].training
        if self.base.training != training:
            self.base.train(training)


class FusedStrategy(SequentialStrategy):
    """Same-architecture members as one wide model (torch.func), the rest beside them."""

    name = "fused"

    def __init__(self, models, optimizers, device, compile: bool = False):
        super().__init__(models, optimizers, device, compile=False)
        problem = fusion_problem(self.models, self.optimizers)
        if problem:
            raise ValueError(f"strategy fused: {problem}")
        self.compile = compile
        self.groups: list[_Subgroup] | None = None  # built at the first step (after any --resume)
        self.optimizer: torch.optim.SGD | None = None
        self.singles = [g[0] for g in fusable_subgroups(self.models) if len(g) == 1]
        self.member_forwards = [_compiled(self.models[i]) if compile else self.models[i] for i in range(len(self.models))]

    # -- binding: stacked tensors <-> member modules and optimizers

    def _build(self) -> None:
        self.groups = [_Subgroup(g, self.models, self.optimizers, self.device)
                       for g in fusable_subgroups(self.models) if len(g) > 1]
        self.wide_forwards = [_compiled(g.forward_fn()) if self.compile else g.forward_fn() for g in self.groups]
        use_fused = self.device.type == "cuda"
        param_groups = []
        for group in self.groups:
            settings = dict(zip(FUSABLE_HYPER, _sgd_settings(group.optimizers[0], group.members[0])))
            param_groups.append({"params": [group.params[n] for n in group.param_names],
                                 "lr": group.optimizers[0].param_groups[0]["lr"], **settings})
        self.optimizer = None
        if param_groups:
            # fused=True: one kernel for the whole stacked update on CUDA; foreach on CPU.
            self.optimizer = torch.optim.SGD(param_groups, lr=param_groups[0]["lr"],
                                             fused=True if use_fused else None,
                                             foreach=None if use_fused else True)
        self._linked: dict = {}
        self._member_states: list = []
        self._pull_momentum()

    def activate(self) -> None:
        if self.groups is None:
            self._build()
            return
        for group in self.groups:
            group._bind()
        self._pull_momentum()

    def _pull_momentum(self) -> None:
        """Member optimizers' momentum -> the stacked buffers (after a load or another
        strategy's steps), then link the members' state to rows of the stacked buffers."""
        with torch.no_grad():
            for group in self.groups:
                for name in group.param_names:
                    stacked = group.params[name]
                    member_buffers = [opt.state.get(p, {}).get("momentum_buffer") for opt, p in
                                      zip(group.optimizers, self._member_params(group, name))]
                    state = self.optimizer.state[stacked]
                    if all(b is None for b in member_buffers):
                        state.pop("momentum_buffer", None)  # members start afresh: so does the stack
                        continue
                    buffer = state.get("momentum_buffer")
                    if buffer is None:
                        buffer = state["momentum_buffer"] = torch.zeros_like(stacked, memory_format=torch.contiguous_format)
                    for i, member_buffer in enumerate(member_buffers):
                        if member_buffer is None:
                            buffer[i].zero_()
                        elif not _same_memory(member_buffer, buffer[i]):
                            buffer[i].copy_(member_buffer)
        self._linked = {}
        self._link_momentum()
        self._member_states = [o.state for o in self.optimizers]

    def _member_params(self, group: _Subgroup, name: str):
        return [m.get_parameter(name) for m in group.members]

    def _link_momentum(self) -> None:
        """Members' optimizer state -> views of the stacked momentum (checkpoints see it)."""
        if self.optimizer is None:
            return
        for group in self.groups:
            for name in group.param_names:
                stacked = group.params[name]
                buffer = self.optimizer.state.get(stacked, {}).get("momentum_buffer")
                if buffer is None or self._linked.get((id(group), name)) is buffer:
                    continue
                for i, (opt, p) in enumerate(zip(group.optimizers, self._member_params(group, name))):
                    opt.state[p]["momentum_buffer"] = buffer[i]
                self._linked[(id(group), name)] = buffer

    def _check_binding(self) -> None:
        if self.groups is None:
            self._build()
        elif any(o.state is not s for o, s in zip(self.optimizers, self._member_states)):
            self._pull_momentum()  # a member optimizer was reloaded (load_state_dict)

    # -- the strategy

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self._check_binding()
        outputs: list = [None] * len(self.models)
        for group, wide in zip(self.groups, self.wide_forwards):
            group.sync_mode()
            logits = wide(group.params, group.buffers, images)
            if len(group.indices) == len(self.models):
                return logits  # the whole group is one wide model: already [N, B, C]
            for row, index in enumerate(group.indices):
                outputs[index] = logits[row]
        for index in self.singles:
            outputs[index] = self.member_forwards[index](images)
        return torch.stack(outputs)

    def zero_grad(self) -> None:
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        for index in self.singles:
            self.optimizers[index].zero_grad(set_to_none=True)

    def _sync_hyper(self) -> None:
        """The trainer sets lr on the member optimizers; the stacked step uses the same."""
        for group, fused_group in zip(self.groups, self.optimizer.param_groups):
            if isinstance(fused_group["lr"], torch.Tensor):
                continue  # a captured CUDA graph reads its lr tensor, filled before each replay
            lrs = {o.param_groups[0]["lr"] for o in group.optimizers}
            if len(lrs) != 1:
                raise ValueError(f"strategy fused: members {group.indices} have different learning rates {sorted(lrs)}")
            fused_group["lr"] = lrs.pop()

    def step(self) -> None:
        self._check_binding()
        if self.optimizer is not None:
            self._sync_hyper()
            self.optimizer.step()
            self._link_momentum()
        for index in self.singles:
            self.optimizers[index].step()

    def masked_step(self, apply: torch.Tensor) -> None:
        self._check_binding()
        if self.optimizer is not None:
            self._sync_hyper()
            for group, fused_group in zip(self.groups, self.optimizer.param_groups):
                rows = apply.index_select(0, group.index_tensor)
                masked_sgd_step(self.optimizer, rows, [fused_group])
            self._link_momentum()
        for index in self.singles:
            masked_sgd_step(self.optimizers[index], apply[index])

    def graph_optimizers(self):
        self._check_binding()
        pairs = [(self.optimizer, g, group.optimizers[0], 0) for g, group in enumerate(self.groups)]
        return pairs + [(self.optimizers[i], 0, self.optimizers[i], 0) for i in self.singles]


# ---------------------------------------------------------------------------- auto


class AutoStrategy:
    """Times real training steps of each applicable strategy, then keeps the fastest.

    Schedule: one untimed warm-up step per candidate (allocator, cuDNN autotuning, compile),
    then ``timed_rounds`` rounds of one timed step per candidate, interleaved so that a
    change of machine load hits every candidate alike. The best (minimum) step time wins;
    a challenger must beat ``sequential`` by ``AUTO_MARGIN``. On CUDA the timings are
    CUDA events read once, at the decision (the only host sync). Every measured step is an
    ordinary training step of the same mathematics.
    """

    name = "auto"

    def __init__(self, models, optimizers, device, compile: bool = False, timed_rounds: int | None = None):
        self.device = torch.device(device)
        self.models, self.optimizers = list(models), list(optimizers)
        self.candidates: list[SequentialStrategy] = [SequentialStrategy(models, optimizers, device, compile)]
        if self.device.type == "cuda" and len(self.models) > 1:
            self.candidates.append(StreamsStrategy(models, optimizers, device, compile))
        if any(len(g) > 1 for g in fusable_subgroups(self.models)) and fusion_problem(self.models, self.optimizers) is None:
            self.candidates.append(FusedStrategy(models, optimizers, device, compile))
        rounds = timed_rounds if timed_rounds is not None else (3 if self.device.type == "cuda" else 2)
        names = range(len(self.candidates))
        self.schedule = list(names) + [c for _ in range(rounds) for c in names] if len(self.candidates) > 1 else []
        self.warmups = len(self.candidates)
        self.timings: list[list] = [[] for _ in self.candidates]
        self.current = self.candidates[0]
        self.measured: dict[str, float] = {}
        self.calls = 0

    @property
    def ready(self) -> bool:
        return self.calls >= len(self.schedule)

    @property
    def chosen(self) -> str:
        return self.current.name if self.ready else "auto (measuring)"

    def activate(self) -> None:
        self.current.activate()

    def forward(self, images):
        return self.current.forward(images)

    def zero_grad(self):
        self.current.zero_grad()

    def step(self):
        self.current.step()

    def masked_step(self, apply):
        self.current.masked_step(apply)

    def graph_optimizers(self):
        return self.current.graph_optimizers()

    def _switch(self, candidate: SequentialStrategy) -> None:
        if candidate is not self.current:
            self.current.zero_grad()  # free the gradients the other layout holds
            self.current = candidate
            candidate.activate()

    def run(self, step, images, target):
        if self.ready:
            return self.current.run(step, images, target)
        index = self.schedule[self.calls]
        self._switch(self.candidates[index])
        timed = self.calls >= self.warmups
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            output = step(images, target)
            end.record()
            if timed:
                self.timings[index].append((start, end))
        else:
            started = time.perf_counter()
            output = step(images, target)
            if timed:
                self.timings[index].append(time.perf_counter() - started)
        self.calls += 1
        if self.ready:
            self._decide()
        return output

    def _decide(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            seconds = [[s.elapsed_time(e) / 1e3 for s, e in times] for times in self.timings]
        else:
            seconds = self.timings
        best = {c.name: min(t) for c, t in zip(self.candidates, seconds)}
        self.measured = best
        winner = min(self.candidates, key=lambda c: best[c.name])
        if best[winner.name] > (1.0 - AUTO_MARGIN) * best["sequential"]:
            winner = self.candidates[0]
        self._switch(winner)
        for candidate in self.candidates:
            if candidate is not winner:
                candidate.zero_grad()


# What ``make_strategy`` returns: every strategy offers the same methods (forward, zero_grad,
# step, masked_step, run, activate, graph_optimizers, chosen, ready).
Strategy = SequentialStrategy | AutoStrategy
