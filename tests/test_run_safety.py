"""Nothing lost, nothing silently wrong: one trainer per run folder, --overwrite that never
mixes two runs, operating-system faults (a full disk, a read-only folder, no network) and
impossible numbers answered in one line, and --resume that needs no flag repeated."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from test_train_cli import FAST, run_main

from orc_fast import checkpoint

FAULTS = str(Path(__file__).with_name("faults.py"))
PROG_ERROR = "python -m orc_fast.train: error: "


def trainer(out, *extra, faults=None):
    """The trainer as a subprocess (through tests/faults.py when ``faults`` plants one)."""
    command = [sys.executable, *([FAULTS] if faults else ["-m", "orc_fast.train"]), *FAST, "--out", str(out), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(faults or {})}
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(PROG_ERROR), err[-3000:]
    return lines[0]


# ---------------------------------------------------------------------------- one trainer per folder


def test_a_second_trainer_into_a_folder_in_use_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    first = trainer(out, "--epochs", "30")
    try:
        deadline = time.monotonic() + 120
        while not (out / "train.lock").is_file():
            assert first.poll() is None, first.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the first trainer never took its lock"
            time.sleep(0.1)
        code, _, err = run_main(FAST + ["--epochs", "1", "--out", str(out), "--overwrite"], capsys)
        assert code == 2
        line = one_line_error(err)
        assert f"in use by another trainer (pid {first.pid}" in line
    finally:
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=120)
    assert not (out / "train.lock").exists(), "the interrupted trainer leaves no lock behind"


def test_a_stale_lock_is_taken_over(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (out / "train.lock").write_text(f"{gone.pid}\n")
    code, _, err = run_main(FAST + ["--epochs", "1", "--out", str(out)], capsys)
    assert code == 0, err
    assert not (out / "train.lock").exists()


# ---------------------------------------------------------------------------- --overwrite


def test_overwrite_never_leaves_a_folder_mixing_two_runs(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_main(FAST + ["--epochs", "2", "--seed", "1", "--out", str(out)], capsys)[0] == 0
    assert (out / "best.pt").is_file() and (out / "metrics.json").is_file()
    # The new run dies in the middle of its second save of latest.pt (after its first save).
    crashed = trainer(out, "--epochs", "3", "--seed", "2", "--overwrite", faults={"FAULT_CRASH_IN_SAVE": "latest.pt:2"})
    crashed.communicate(timeout=300)
    assert crashed.returncode == -signal.SIGKILL
    seeds = {name: checkpoint.load(out / name)["config"]["seed"] for name in ("latest.pt", "best.pt")
             if (out / name).is_file()}
    if (out / "metrics.json").is_file():
        seeds["metrics.json"] = json.loads((out / "metrics.json").read_text())["config"]["seed"]
    assert seeds["latest.pt"] == 2 and set(seeds.values()) == {2}, seeds


# ---------------------------------------------------------------------------- operating-system faults


@contextmanager
def tmpfs(path: Path, size_bytes: int):
    """A small tmpfs at ``path`` (needs root and mount); the test skips where there is none."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(path)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()[:200]}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_a_full_disk_ends_in_one_line_with_the_previous_checkpoint_intact(tmp_path, capsys):
    probe = tmp_path / "probe"
    assert run_main(FAST + ["--epochs", "1", "--out", str(probe)], capsys)[0] == 0
    size = (probe / "latest.pt").stat().st_size
    # Room for epoch 1 (latest.pt, best.pt, metrics.json, curves.png), not for a second latest.pt beside it.
    with tmpfs(tmp_path / "disk", 2 * size + 400_000) as disk:
        out = disk / "run"
        code, stdout, err = run_main(FAST + ["--epochs", "3", "--out", str(out)], capsys)
        assert code == 1
        line = one_line_error(err)
        assert "No space left on device" in line and str(out) in line
        assert checkpoint.load(out / "latest.pt")["epoch"] == 1, "the last good checkpoint is kept"
        assert not list(out.glob(".*.tmp")), "no half-written temp file is left to fill the disk"


def test_a_read_only_folder_is_refused_before_any_training(tmp_path, capsys):
    with tmpfs(tmp_path / "disk", 50_000_000) as disk:
        out = disk / "run"
        assert run_main(FAST + ["--epochs", "1", "--out", str(out)], capsys)[0] == 0
        before = (out / "latest.pt").read_bytes()
        remounted = subprocess.run(["mount", "-o", "remount,ro", str(disk)], capture_output=True)
        if remounted.returncode != 0:
            pytest.skip("cannot remount the tmpfs read-only")
        code, stdout, err = run_main(["--out", str(out), "--resume", "--epochs", "2", "--resume-changes"], capsys)
        assert code == 1
        line = one_line_error(err)
        assert "Read-only file system" in line and str(out) in line
        assert "epoch   2/2" not in stdout, "nothing trains before the folder is known to be writable"
        assert (out / "latest.pt").read_bytes() == before


def test_no_network_for_download_is_one_line(tmp_path, capsys, monkeypatch):
    import torchvision.datasets.cifar as cifar

    def offline(*args, **kwargs):
        raise urllib.error.URLError(OSError(101, "Network is unreachable"))

    monkeypatch.setattr(cifar, "download_and_extract_archive", offline)
    code, _, err = run_main(["--dataset", "cifar10", "--data-dir", str(tmp_path / "data"), "--download",
                             "--out", str(tmp_path / "run")], capsys)
    assert code == 2
    line = one_line_error(err)
    assert "cannot download cifar10" in line and "Network is unreachable" in line


# ---------------------------------------------------------------------------- impossible numbers


@pytest.mark.parametrize("flags, words", [
    (["--seed", "-1"], "--seed must be >= 0"),
    (["--batch-size", "100000000"], "--batch-size 100000000 is larger than the"),
    (["--milestones", "5,10", "--epochs", "1", "--schedule", "step"], "--milestones 5, 10 lie past --epochs 1"),
])
def test_impossible_numbers_are_refused_before_training(tmp_path, capsys, flags, words):
    code, stdout, err = run_main(FAST + ["--out", str(tmp_path / "run"), *flags], capsys)
    assert code == 2
    assert words in one_line_error(err)
    assert "epoch" not in stdout
    assert not (tmp_path / "run" / "latest.pt").exists()


def test_a_binary_config_file_is_one_line(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_bytes(bytes(range(256)) * 4)
    code, _, err = run_main(["--config", str(config)], capsys)
    assert code == 2
    assert f"--config {config}" in one_line_error(err)


# ---------------------------------------------------------------------------- --resume


def test_resume_takes_the_runs_configuration_from_its_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    flags = ["--method", "dml", "--arch", "resnet8,resnet14", "--lr", "0.05", "--epochs", "2", "--seed", "4"]
    assert run_main(FAST + flags + ["--stop-after", "1", "--out", str(out)], capsys)[0] == 0
    code, stdout, err = run_main(["--out", str(out), "--resume"], capsys)
    assert code == 0, err
    assert "resumed from" in stdout and "epoch   2/2" in stdout
    config = json.loads((out / "metrics.json").read_text())["config"]
    assert (config["method"], config["archs"], config["lr"], config["seed"]) == ("dml", ["resnet8", "resnet14"], 0.05, 4)
    assert len(json.loads((out / "metrics.json").read_text())["epochs"]) == 2
    # A flag given with --resume is a change, under the rules for changes.
    code, _, err = run_main(["--out", str(out), "--resume", "--lr", "0.01", "--epochs", "3"], capsys)
    assert code == 2 and "--resume-changes" in one_line_error(err)


def test_resume_continues_exactly_as_the_uninterrupted_run(tmp_path, capsys):
    flags = ["--lr", "0.05", "--epochs", "2", "--seed", "5", "--rank-by", "ce"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert run_main(FAST + flags + ["--out", str(whole)], capsys)[0] == 0
    assert run_main(FAST + flags + ["--stop-after", "1", "--out", str(split)], capsys)[0] == 0
    assert run_main(["--out", str(split), "--resume"], capsys)[0] == 0
    a = torch.load(whole / "latest.pt", weights_only=True)["models"]
    b = torch.load(split / "latest.pt", weights_only=True)["models"]
    for x, y in zip(a, b):
        for key in x:
            assert torch.equal(x[key], y[key]), key
