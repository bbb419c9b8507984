"""Crash safety, the trainer's NaN policy and flat memory over many steps.

Training runs in subprocesses (``python -m orc_fast.train`` on the bundled digits set,
on the CPU, deterministic), killed with SIGKILL: once from outside in the middle of an
epoch, once from inside in the middle of writing a checkpoint.
"""

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

TINY = ["--arch", "resnet8", "--num-nets", "3", "--train-subset", "384", "--batch-size", "32", "--epochs", "3",
        "--seed", "7", "--threads", "1"]


FAULTS = str(Path(__file__).with_name("faults.py"))  # the trainer with a planted fault


def train(out, *extra, env=None, check=True):
    command = [FAULTS] if env else ["-m", "orc_fast.train"]
    run = subprocess.run([sys.executable, *command, *TINY, "--out", str(out), *extra],
                         capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})
    if check:
        assert run.returncode == 0, run.stderr[-3000:]
    return run


def metrics(out):
    return json.loads((Path(out) / "metrics.json").read_text())


def comparable(result):
    """metrics.json without what legitimately differs between runs (speed, paths)."""
    result = json.loads(json.dumps(result))
    result["config"].pop("out", None)
    for epoch in result["epochs"]:
        epoch.pop("images_per_s", None)
        epoch.pop("seconds", None)
    return result


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    train(out)
    return comparable(metrics(out))


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tmp_path, uninterrupted):
    process = subprocess.Popen([sys.executable, "-m", "orc_fast.train", *TINY, "--out", str(tmp_path),
                                "--progress", "on"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []

    def read_progress():  # the progress bar ends each redraw with \r, not \n
        while chunk := process.stderr.read(1):
            seen.append(chunk)

    reader = threading.Thread(target=read_progress, daemon=True)
    reader.start()
    deadline = time.monotonic() + 300
    while "epoch 2/3 [" not in "".join(seen) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)  # inside epoch 2: its work is lost, epoch 1's checkpoint is not
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, "the run must have been killed mid-way, not have finished"
    assert metrics(tmp_path)["epochs"][-1]["epoch"] == 1

    train(tmp_path, "--resume")
    assert comparable(metrics(tmp_path)) == uninterrupted


@pytest.mark.slow
def test_sigkill_during_a_save_leaves_the_previous_checkpoint(tmp_path, uninterrupted):
    crashed = train(tmp_path, env={"FAULT_CRASH_IN_SAVE": "latest.pt:2"}, check=False)
    assert crashed.returncode == -signal.SIGKILL
    stale = list(tmp_path.glob(".latest.pt.*.tmp"))
    assert stale, "the crash happened with the new checkpoint written to a temp file, not yet renamed"
    state = torch.load(tmp_path / "latest.pt", weights_only=True)
    assert state["epoch"] == 1, "the checkpoint on disk is the complete previous one"

    train(tmp_path, "--resume")
    assert not list(tmp_path.glob(".*.tmp")), "stale temp files are cleaned up"
    assert comparable(metrics(tmp_path)) == uninterrupted


def test_nan_stop_names_member_and_step_and_keeps_last_good_checkpoint(tmp_path):
    train(tmp_path, "--stop-after", "1")
    before = (tmp_path / "latest.pt").read_bytes()
    blown = train(tmp_path, "--resume", "--resume-changes", "--lr", "1e12", check=False)
    assert blown.returncode == 1
    assert "non-finite loss for member" in blown.stderr and "epoch 2, step" in blown.stderr
    assert (tmp_path / "latest.pt").read_bytes() == before


def test_nan_skip_step_updates_nothing_on_bad_steps(tmp_path):
    train(tmp_path, "--lr", "1e12", "--nan-policy", "skip-step", "--epochs", "1", "--max-skipped-steps", "1000")
    record = metrics(tmp_path)["epochs"][-1]
    assert record["skipped_steps"] > 0
    # What the epoch reports averages the kept steps only: finite, not the skipped steps' inf.
    assert all(map(math.isfinite, record["train_loss"] + record["train_ce"] + record["train_kd"]))
    state = torch.load(tmp_path / "latest.pt", weights_only=True)
    for member in state["models"]:
        assert all(torch.isfinite(v).all() for v in member.values() if v.is_floating_point())


def test_too_many_skipped_steps_end_the_run_with_exit_1_and_keep_the_last_checkpoint(tmp_path):
    train(tmp_path, "--stop-after", "1")
    before = (tmp_path / "latest.pt").read_bytes()
    blown = train(tmp_path, "--resume", "--resume-changes", "--lr", "1e12", "--nan-policy", "skip-step",
                  "--max-skipped-steps", "2", check=False)
    assert blown.returncode == 1, blown.stderr[-2000:]
    assert "more than --max-skipped-steps 2" in blown.stderr and "without saving epoch 2" in blown.stderr
    assert (tmp_path / "latest.pt").read_bytes() == before


STEPS = """
import os, sys, torch
from orc_fast.models import build_model
from orc_fast.group_step import GroupStep, StepConfig

def rss_bytes():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

torch.manual_seed(0)
models = [build_model("resnet8", 10) for _ in range(3)]
optimizers = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, fused=True) for m in models]
step = GroupStep(models, optimizers, StepConfig(teacher_size=1), torch.device("cpu"), torch.Generator())
images, labels = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
for _ in range(20):
    step(images, labels)
before = rss_bytes()
for _ in range(200):
    step(images, labels)
print(before, rss_bytes())
"""


@pytest.mark.slow
def test_training_steps_keep_memory_flat():
    run = subprocess.run([sys.executable, "-c", STEPS], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    before, after = map(int, run.stdout.split())
    assert (after - before) / before < 0.05, f"RSS {before} -> {after} over 200 steps"
