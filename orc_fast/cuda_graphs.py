"""``--cuda-graphs``: a whole group step captured once as a CUDA graph, then replayed.

Not a strategy: it wraps any ``GroupStep`` (whatever strategy runs its members) and
replaces its eager launches by one graph replay (docs/design.md §5).
"""

from __future__ import annotations

import torch

CUDA_GRAPH_WARMUP = 3  # eager steps before the capture (torch.cuda.graphs wants warm-up on a side stream)


class CudaGraphStep:
    """A whole group step (forwards, losses, backward, every optimizer step) as one CUDA graph.

    The first ``warmup_steps`` calls (and every call while ``auto`` still measures) run
    eagerly on a side stream, as torch.cuda.graphs requires; then one call captures the step
    on static input buffers and every call after copies its batch in and replays. Needs what
    the ORC step already guarantees: static shapes and no host synchronisation. Learning
    rates become device tensors that each replay refills from the optimizers' current values
    (SGD runs its fused kernel, which reads lr from a tensor); state the step replaces instead
    of updating in place (the ORC score average) is carried from the graph's output back to
    its input after every replay.
    """

    def __init__(self, group_step, warmup_steps: int = CUDA_GRAPH_WARMUP):
        device = torch.device(group_step.scores.average.device)
        if device.type != "cuda":
            raise ValueError("--cuda-graphs needs a CUDA device")
        if group_step.config.error_mixup:
            raise ValueError("--cuda-graphs cannot capture --error-mixup (its mixing weight is drawn on the host)")
        self.group_step, self.device, self.warmup_steps = group_step, device, warmup_steps
        self.graph: torch.cuda.CUDAGraph | None = None
        self.calls = 0
        self.side_stream = torch.cuda.Stream(device)

    def __call__(self, images: torch.Tensor, target: torch.Tensor):
        strategy = self.group_step.strategy
        if self.graph is None and (self.calls < self.warmup_steps or not getattr(strategy, "ready", True)):
            self.calls += 1
            main = torch.cuda.current_stream(self.device)
            self.side_stream.wait_stream(main)
            with torch.cuda.stream(self.side_stream):
                output = self.group_step(images, target)
            main.wait_stream(self.side_stream)
            return output
        if self.graph is None:
            self._capture(images, target)
        self.static_images.copy_(images)
        self.static_target.copy_(target)
        for lr, source, index in self.lrs:
            lr.fill_(source.param_groups[index]["lr"])
        self.graph.replay()
        for before, after in self.carried:
            before.copy_(after)
        return type(self.static_output)(*(t.clone() for t in self.static_output))

    def _capture(self, images, target) -> None:
        self.static_images, self.static_target = images.clone(), target.clone()
        self.lrs, restore = [], []
        for optimizer, index, source, source_index in self.group_step.graph_optimizers():
            group = optimizer.param_groups[index]
            lr = torch.tensor(float(source.param_groups[source_index]["lr"]), device=self.device)
            restore.append((group, {k: group.get(k) for k in ("lr", "fused", "foreach")}))
            group.update(lr=lr, fused=True, foreach=False)
            self.lrs.append((lr, source, source_index))
        scores = self.group_step.scores
        before = {k: v for k, v in vars(scores).items() if isinstance(v, torch.Tensor)}
        self.group_step.strategy.zero_grad()
        torch.cuda.synchronize(self.device)
        self.graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(self.graph):
                self.static_output = self.group_step(self.static_images, self.static_target)
        finally:
            for group, values in restore:
                group["lr"] = values["lr"] if not isinstance(values["lr"], torch.Tensor) else float(values["lr"])
                group["fused"], group["foreach"] = values["fused"], values["foreach"]
        after = {k: v for k, v in vars(scores).items() if isinstance(v, torch.Tensor)}
        self.carried = [(before[k], after[k]) for k in before if after[k] is not before[k]]
