"""A branch-free, masked ``torch.optim.SGD`` step: parameters move only where a 0/1 mask says.

``--refresh-teachers`` steps the teachers before the students' gradient exists, and the
roles that say who is a teacher live on the device (docs/design.md §2): reading them on the
host would sync every step. So the step is computed for every member and kept only where
the mask is 1, with ``torch.where``. One function serves both layouts: a member's own
optimizer (a 0-dim mask for the whole member) and the ``fused`` strategy's stacked
parameters (a [R] mask over the leading, per-member dimension of every tensor).
"""

from __future__ import annotations

import torch


@torch.no_grad()
def masked_sgd_step(optimizer: torch.optim.SGD, apply: torch.Tensor, param_groups=None) -> None:
    """torch.optim.SGD's update, applied where ``apply`` is 1.

    ``apply``: a 0-dim 0/1 tensor (every parameter of ``param_groups`` steps or none does),
    or a [R] 0/1 tensor matched against the leading dimension of every parameter (stacked
    members, row i steps where apply[i] == 1). ``param_groups`` defaults to all of the
    optimizer's. Writes through ``.data`` and updates momentum buffers in place, so an
    autograd graph still held for the students' backward stays valid and member views of
    stacked buffers stay bound.
    """
    for group in optimizer.param_groups if param_groups is None else param_groups:
        if group.get("nesterov") or group.get("maximize") or group.get("dampening", 0) != 0:
            raise ValueError("masked_sgd_step supports plain momentum SGD (no nesterov, dampening or maximize)")
        lr, momentum, decay = group["lr"], group["momentum"], group["weight_decay"]
        for param in group["params"]:
            if param.grad is None:
                continue
            keep = apply.bool() if apply.dim() == 0 else apply.bool().view(-1, *([1] * (param.dim() - 1)))
            step = param.grad + decay * param.data if decay else param.grad.clone()
            if momentum:
                state = optimizer.state[param]
                buffer = state.get("momentum_buffer")
                if buffer is None:  # torch starts the buffer at the first gradient: m * 0 + g
                    buffer = state["momentum_buffer"] = torch.zeros_like(step)
                step = momentum * buffer + step
                buffer.copy_(torch.where(keep, step, buffer))
            param.data.copy_(torch.where(keep, param.data - lr * step, param.data))
