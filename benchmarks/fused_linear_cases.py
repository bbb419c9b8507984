"""What the fused-linear benchmark times and measures: shapes, the two variants, one step.

A step is forward + backward of the group-KD loss from hidden states (docs/design.md §4),
reduction "mean", for one student and G teachers with LM heads [V, H]:

* ``materialised``: student logits = F.linear(h, W, b) [N, V], teachers' logits stacked
  [G, N, V] (no grad), then ``GroupKDLoss`` (backend auto) and autograd through F.linear.
* ``fused``: ``FusedLinearGroupKDLoss(chunk_size=...)`` on the same inputs.

Peak memory: on CUDA torch.cuda.max_memory_allocated over one step less what was
allocated before it; on the CPU the peak RSS (VmHWM, reset through /proc/self/clear_refs
just before the step; ru_maxrss where that is refused) less the RSS before the step, in a
fresh process (``python fused_linear_cases.py LABEL VARIANT``), so that neither variant's
freed pages nor the allocator's cache count for the other.
"""

from __future__ import annotations

import json
import resource
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from orc_fast import FusedLinearGroupKDLoss, GroupKDLoss

TEMPERATURE = 4.0
ALPHA = 0.9
VARIANTS = ("materialised", "fused")


@dataclass(frozen=True)
class LinearCase:
    device: str
    tokens: int
    width: int
    vocab: int
    teachers: int
    dtype: torch.dtype
    chunk_size: int
    rounds: int

    @property
    def label(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        return f"{self.device}-N{self.tokens}-H{self.width}-V{self.vocab}-G{self.teachers}-{dtype}"


CPU_CASE = LinearCase("cpu", 4096, 512, 32000, 2, torch.float32, chunk_size=1024, rounds=3)
GPU_CASE = LinearCase("cuda", 8192, 4096, 128256, 2, torch.bfloat16, chunk_size=2048, rounds=5)
CASES = {case.label: case for case in (CPU_CASE, GPU_CASE)}


def make_inputs(case: LinearCase, seed: int = 0):
    generator = torch.Generator(device=case.device).manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(shape, generator=generator, device=case.device, dtype=case.dtype) * scale)

    scale = case.width ** -0.5
    hidden = randn(case.tokens, case.width).requires_grad_(True)
    weight = randn(case.vocab, case.width, scale=2 * scale).requires_grad_(True)
    bias = randn(case.vocab).requires_grad_(True)
    teacher_hidden = [randn(case.tokens, case.width) for _ in range(case.teachers)]
    teacher_weights = [randn(case.vocab, case.width, scale=2 * scale) for _ in range(case.teachers)]
    target = torch.randint(0, case.vocab, (case.tokens,), generator=generator, device=case.device)
    target[::16] = -100  # some ignored (padding / prompt) tokens, as in LM distillation
    return hidden, weight, bias, teacher_hidden, teacher_weights, target


def make_step(variant: str, case: LinearCase, inputs):
    hidden, weight, bias, teacher_hidden, teacher_weights, target = inputs
    if variant == "materialised":
        criterion = GroupKDLoss(temperature=TEMPERATURE, alpha=ALPHA)

        def loss_fn():
            student = F.linear(hidden, weight, bias)
            with torch.no_grad():
                teachers = torch.stack([F.linear(h, w) for h, w in zip(teacher_hidden, teacher_weights)])
            return criterion(student, teachers, target)
    elif variant == "fused":
        criterion = FusedLinearGroupKDLoss(temperature=TEMPERATURE, alpha=ALPHA, chunk_size=case.chunk_size)

        def loss_fn():
            return criterion(hidden, weight, target, teacher_hidden=teacher_hidden,
                             teacher_head_weights=teacher_weights, student_head_bias=bias)
    else:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")

    def step():
        for leaf in (hidden, weight, bias):
            leaf.grad = None
        loss = loss_fn()
        loss.backward()
        loss = loss.detach()
        if case.device == "cuda":
            torch.cuda.synchronize()
        return loss

    return step


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def _reset_peak_resident() -> bool:
    """Start the kernel's peak-RSS mark (VmHWM) afresh, so import-time peaks don't count."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def _peak_resident_bytes(reset: bool) -> int:
    if reset:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_growth_cpu(label: str, variant: str) -> dict:
    """In this (fresh) process: RSS before one step and the peak during it, in bytes."""
    case = CASES[label]
    inputs = make_inputs(case)
    small = LinearCase("cpu", 8, 8, 16, case.teachers, case.dtype, 4, 1)
    make_step(variant, small, make_inputs(small))()  # load the extension, start threads
    step = make_step(variant, case, inputs)
    before = _resident_bytes()
    reset = _reset_peak_resident()
    loss = step()
    peak = _peak_resident_bytes(reset)
    return dict(before=before, peak=peak, growth=peak - before, loss=loss.item(), peak_reset=reset)


def peak_growth_cuda(step) -> int:
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    return torch.cuda.max_memory_allocated() - before


# Filled by the benchmark, printed by conftest.py at the end of the session:
# case label -> variant -> dict(median, min, peak bytes).
RESULTS: dict[str, dict[str, dict]] = {}


def results_table() -> str:
    if not RESULTS:
        return ""
    lines = [
        "| case | variant | median ms | min ms | peak memory MiB | time vs materialised | memory vs materialised |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, variants in RESULTS.items():
        base = variants.get("materialised")
        for variant, row in variants.items():
            speed = f"{base['median'] / row['median']:.2f}x faster" if base else "n/a"
            memory = f"{base['peak'] / row['peak']:.2f}x less" if base and row["peak"] else "n/a"
            lines.append(f"| {label} | {variant} | {row['median'] * 1e3:.1f} | {row['min'] * 1e3:.1f} "
                         f"| {row['peak'] / 2**20:.0f} | {speed} | {memory} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(json.dumps(peak_growth_cpu(sys.argv[1], sys.argv[2])))
