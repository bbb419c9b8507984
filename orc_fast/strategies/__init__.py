"""How a group step runs its members: ``--strategy sequential|streams|fused|auto``, one file each.

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
  challenger must beat ``sequential`` by ``AUTO_MARGIN`` to be chosen. It sees whole steps
  through the ``before_step``/``after_step`` hooks the group step calls around each step.

The stacked tensors are the source of truth while ``fused`` runs, and the member modules
and optimizers stay in sync without copies: every member parameter, buffer and momentum
buffer is re-pointed (``.data``) to its row of the stacked tensor. ``model.state_dict()``,
evaluation, ``load_state_dict`` and checkpoints keep working on the members, in the
unchanged per-member format, and strategies can take turns (``auto``) on the same storage.

No strategy reads a device value on the host during a step (``auto`` syncs once, when it
decides).
"""

from __future__ import annotations

from .auto import AUTO_MARGIN, AutoStrategy
from .base import Strategy
from .fused import FusedStrategy, fusable_subgroups, fusion_problem
from .sequential import SequentialStrategy
from .streams import StreamsStrategy

STRATEGIES = ("sequential", "streams", "fused", "auto")


def make_strategy(name: str, models, optimizers, device, compile: bool = False) -> Strategy:
    """The strategy called ``name`` for this group (raises ValueError for an unknown one)."""
    kinds = {"sequential": SequentialStrategy, "streams": StreamsStrategy, "fused": FusedStrategy,
             "auto": AutoStrategy}
    if name not in kinds:
        raise ValueError(f"unknown strategy {name!r}; known: {', '.join(STRATEGIES)}")
    return kinds[name](models, optimizers, device, compile=compile)


__all__ = ["AUTO_MARGIN", "STRATEGIES", "AutoStrategy", "FusedStrategy", "SequentialStrategy", "Strategy",
           "StreamsStrategy", "fusable_subgroups", "fusion_problem", "make_strategy"]
