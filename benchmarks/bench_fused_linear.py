"""Group KD from hidden states: FusedLinearGroupKDLoss against materialised logits.

Run: ``.venv/bin/python -m pytest benchmarks/bench_fused_linear.py --benchmark-only``.
Both variants of a case run in the same session; the table printed at the end gives each
one's median time and peak memory, and their ratios to the materialised variant
(fused_linear_cases.py says what each variant does and how memory is measured). The CUDA
case (N 8192, H 4096, V 128256, bf16) is skipped without a GPU. Timings from different
runs or machines are not comparable (docs/design.md §7).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fused_linear_cases import CPU_CASE, GPU_CASE, RESULTS, VARIANTS, make_inputs, make_step, peak_growth_cuda

HERE = Path(__file__).resolve().parent


def _peak_memory(case, variant, step) -> int:
    if case.device == "cuda":
        return peak_growth_cuda(step)
    command = [sys.executable, str(HERE / "fused_linear_cases.py"), case.label, variant]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1200, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["growth"]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", [
    CPU_CASE,
    pytest.param(GPU_CASE, marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")),
], ids=lambda case: case.label)
def test_fused_linear_forward_backward(benchmark, case, variant):
    step = make_step(variant, case, make_inputs(case))
    benchmark.group = case.label
    benchmark.extra_info.update(variant=variant, label=case.label, chunk_size=case.chunk_size)
    # Warm-up faults in the allocator's pages and loads the kernels; not timed.
    benchmark.pedantic(step, rounds=case.rounds, iterations=1, warmup_rounds=1)
    peak = _peak_memory(case, variant, step)
    benchmark.extra_info["peak_bytes"] = peak
    stats = benchmark.stats.stats
    RESULTS.setdefault(case.label, {})[variant] = dict(median=stats.median, min=stats.min, peak=peak)
