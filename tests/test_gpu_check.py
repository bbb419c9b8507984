"""benchmarks/gpu_check.sh, the one-call GPU check, exercised without a GPU.

A lent GPU machine gives minutes, so a typo in that script would waste a whole lease. Its
dry run (GPU_CHECK_DRY=1) parses every stage's command line here instead: pytest
collection with the real arguments, the benchmark modules compiled, the tools present.
These tests run it and read the summary it leaves, including when a stage fails or
hangs, which must not stop the later stages or the summary.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
STAGES = ["install", "gpu_tests", "bench_loss", "bench_train", "train_bf16"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (shutil.which("bash") and shutil.which("timeout")), reason="needs bash and timeout"),
]


def dry_run(out: Path, **env) -> tuple[subprocess.CompletedProcess, dict[str, list[str]]]:
    """Run the dry check with OUT=out; (process, {stage: summary-table row cells})."""
    full_env = dict(os.environ, GPU_CHECK_DRY="1", GPU_CHECK_PYTHON=sys.executable, OUT=str(out), **env)
    process = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=full_env, capture_output=True, text=True,
                             timeout=600)
    summary = (out / "summary.md").read_text()
    rows = {}
    for line in summary.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if cells and cells[0] in STAGES:
            rows[cells[0]] = cells
    return process, rows


def test_dry_run_passes_every_stage(tmp_path):
    out = tmp_path / "out"
    process, rows = dry_run(out)
    assert process.returncode == 0, process.stdout + process.stderr
    assert list(rows) == STAGES, rows
    for stage, cells in rows.items():
        log = (out / f"{stage}.log").read_text() if (out / f"{stage}.log").exists() else "no log"
        assert cells[1] == "ok", f"{stage}: {cells}\n{log}"
        assert cells[2] == "0" and cells[4] == "no", cells
    # the device tool brings back at most 8 files
    assert len([p for p in out.rglob("*") if p.is_file()]) <= 8


def test_failed_and_hung_stages_still_give_a_summary(tmp_path):
    out = tmp_path / "out"
    process, rows = dry_run(out, GPU_CHECK_FAIL_STAGE="gpu_tests", GPU_CHECK_HANG_STAGE="bench_loss",
                            GPU_CHECK_BUDGET_bench_loss="2")
    assert process.returncode == 0, process.stdout + process.stderr
    assert list(rows) == STAGES, rows
    assert rows["gpu_tests"][1] == "failed" and rows["gpu_tests"][2] == "3", rows["gpu_tests"]
    assert rows["bench_loss"][1] == "timeout" and rows["bench_loss"][4] == "yes", rows["bench_loss"]
    for stage in ("install", "bench_train", "train_bf16"):
        assert rows[stage][1] == "ok", rows[stage]
    assert "GPU_CHECK_FAIL_STAGE=gpu_tests" in (out / "gpu_tests.log").read_text()
