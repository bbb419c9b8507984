"""``fused``: members of the same architecture as one wide model (torch.func), the rest beside them.

The stacked tensors are the source of truth while ``fused`` runs, and the member modules
and optimizers stay in sync without copies: every member parameter, buffer and momentum
buffer is re-pointed (``.data``) to its row of the stacked tensor.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from ..masked_sgd import masked_sgd_step
from .sequential import SequentialStrategy, _compiled

FUSABLE_HYPER = ("momentum", "dampening", "weight_decay", "nesterov", "maximize")


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

    def forward_members(self, images: torch.Tensor, members: list[int]) -> None:
        """The stacked parameters hold the gradients fused steps read: a member's own module
        would put them elsewhere, so only the whole wide model runs."""
        return None

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
