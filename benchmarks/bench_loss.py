"""Forward + backward of the group-KD loss on CPU, every backend.

Run: ``.venv/bin/python -m pytest benchmarks/bench_loss.py --benchmark-only`` (or
``make bench``). The table printed at the end gives each backend's median and its
speed-up over reference-eager and reference-compiled in this same run; timings from
different runs or machines are not comparable (docs/design.md §7).
"""

import pytest
from loss_cases import CPU_CASES, backends_for, run_case

DEVICE = "cpu"


@pytest.mark.parametrize("backend", backends_for(DEVICE))
@pytest.mark.parametrize("case", CPU_CASES, ids=lambda case: case.label)
def test_loss_forward_backward(benchmark, case, backend):
    run_case(benchmark, DEVICE, case, backend)
