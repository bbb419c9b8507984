"""``auto``: times real training steps of each applicable strategy, then keeps the fastest."""

from __future__ import annotations

import time

import torch

from .fused import FusedStrategy, fusable_subgroups, fusion_problem
from .sequential import SequentialStrategy
from .streams import StreamsStrategy

AUTO_MARGIN = 0.05  # a challenger must be 5% faster than sequential (see benchmarks/results)


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

    def forward_members(self, images, members):
        return self.current.forward_members(images, members)

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

    def before_step(self) -> None:
        """While measuring: switch to the scheduled candidate and start its timer."""
        if self.ready:
            return
        self._index = self.schedule[self.calls]
        self._switch(self.candidates[self._index])
        if self.device.type == "cuda":
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._started = time.perf_counter()

    def after_step(self) -> None:
        """While measuring: stop the timer (kept once the warm-up steps are past), decide
        after the last scheduled step."""
        if self.ready:
            return
        timed = self.calls >= self.warmups
        if self.device.type == "cuda":
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            if timed:
                self.timings[self._index].append((self._start, end))
        elif timed:
            self.timings[self._index].append(time.perf_counter() - self._started)
        self.calls += 1
        if self.ready:
            self._decide()

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
