"""Member-parallel training (orc_fast/distributed.py): torchrun with gloo on the CPU.

The launches are real ``torchrun --standalone`` jobs of tiny runs (resnet8 on a 128-image
digits subset, 4 steps per epoch); each costs process start-up and a torch import, so
there are few of them. In-process tests cover the member layout and the checkpoint
manifests with a one-rank gloo group.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from orc_fast import checkpoint, distributed
from orc_fast.config import build as build_config
from orc_fast.run_folder import RunFolder

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--dataset", "digits", "--arch", "resnet8", "--train-subset", "128", "--batch-size", "32",
        "--image-size", "16", "--epochs", "2", "--threads", "1", "--device", "cpu", "--seed", "3"]
NUMBERS = ("train_loss", "test_acc", "ensemble_acc", "teacher_fraction")
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
                "MASTER_PORT", "TORCHELASTIC_RUN_ID", "FAULT_RANK")
FAULTS = str(Path(__file__).with_name("faults.py"))  # the trainer with a planted fault


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def launch(args, ranks: int | None, timeout: float = 240, **env):
    """``python -m orc_fast.train`` (ranks None) or torchrun with ``ranks`` workers; returns
    (completed process, seconds). With a FAULT_RANK in ``env`` the ranks run tests/faults.py."""
    trainer = [FAULTS] if "FAULT_RANK" in env else ["-m", "orc_fast.train"]
    if ranks is None:
        command = [sys.executable, *trainer, *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
                   f"--nproc_per_node={ranks}", "--monitor-interval=0.5", *trainer, *args]
    started = time.monotonic()
    done = subprocess.run(command, cwd=ROOT, env=clean_env(**env), capture_output=True, text=True, timeout=timeout)
    return done, time.monotonic() - started


def ok(done) -> None:
    assert done.returncode == 0, f"exit {done.returncode}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr[-4000:]}"


def numbers(out: Path) -> list[dict]:
    metrics = json.loads((out / "metrics.json").read_text())
    return [{k: e[k] for k in ("epoch", *NUMBERS)} for e in metrics["epochs"]]


def assert_same_numbers(got: Path, want: Path) -> None:
    a, b = numbers(got), numbers(want)
    assert [e["epoch"] for e in a] == [e["epoch"] for e in b]
    for x, y in zip(a, b):
        for key in NUMBERS:
            left, right = x[key], y[key]
            if isinstance(left, list):
                assert len(left) == len(right), (x["epoch"], key)
                assert all(abs(u - v) <= 1e-5 for u, v in zip(left, right)), (x["epoch"], key, left, right)
            else:
                assert abs(left - right) <= 1e-5, (x["epoch"], key, left, right)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    done, _ = launch([*TINY, "--out", str(out)], None)
    ok(done)
    return out


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("two_ranks")
    done, _ = launch([*TINY, "--out", str(out)], 2)
    ok(done)
    return out, done


# ============================================================================ launches


def test_two_ranks_match_the_single_process_run(single, two_ranks):
    out, done = two_ranks
    assert_same_numbers(out, single)
    assert "member-parallel over 2 ranks (gloo" in done.stdout
    assert done.stdout.count("final test accuracy") == 1  # rank 1 stays quiet
    latest = json.loads((out / "latest.json").read_text())
    assert latest["epoch"] == 2 and latest["world_size"] == 2 and latest["members"] == [[0, 2], [2, 4]]
    kept = sorted(p.name for p in out.glob("epoch*.pt"))
    best = json.loads((out / "best.json").read_text())
    assert kept == sorted(set(latest["files"]) | set(best["files"]))  # older sets were deleted
    for rank, name in enumerate(latest["files"]):
        state = checkpoint.load(out / name)
        assert state["rank"] == rank and state["epoch"] == 2 and len(state["models"]) == 2
    assert not (out / "latest.pt").exists() and (out / "curves.png").is_file()


def test_uneven_blocks_with_refresh_mixup_and_momentum_match(tmp_path):
    # 3 members over 2 ranks (blocks of 2 and 1); the options that take extra forwards
    # and masked per-member steps (local roles) all run.
    options = ["--num-nets", "3", "--teacher-size", "1", "--refresh-teachers", "--error-mixup",
               "--rank-momentum", "0.5", "--epochs", "1"]
    one, two = tmp_path / "one", tmp_path / "two"
    done, _ = launch([*TINY, *options, "--out", str(one)], None)
    ok(done)
    done, _ = launch([*TINY, *options, "--out", str(two)], 2)
    ok(done)
    assert_same_numbers(two, one)
    assert json.loads((two / "latest.json").read_text())["members"] == [[0, 2], [2, 3]]


def test_a_killed_rank_stops_the_job_and_the_last_checkpoint_resumes(single, tmp_path):
    out = tmp_path / "killed"
    # 4 steps per epoch: rank 1 SIGKILLs itself at the start of step 6 (epoch 2).
    done, seconds = launch([*TINY, "--out", str(out), "--dist-timeout", "20"], 2,
                           FAULT_RANK="1:6:kill")
    assert done.returncode != 0
    assert seconds < 100, seconds
    latest = json.loads((out / "latest.json").read_text())
    assert latest["epoch"] == 1
    for name in latest["files"]:
        assert checkpoint.load(out / name)["epoch"] == 1
    # The interrupted run, resumed, ends where the uninterrupted one did.
    done, _ = launch([*TINY, "--out", str(out), "--resume"], 2)
    ok(done)
    assert "resumed from" in done.stdout
    assert_same_numbers(out, single)


def test_a_hung_rank_times_the_others_out(tmp_path):
    out = tmp_path / "hung"
    done, seconds = launch([*TINY, "--out", str(out), "--dist-timeout", "10"], 2,
                           FAULT_RANK="1:6:hang")
    assert done.returncode != 0
    assert seconds < 100, seconds
    assert "rank 0: lost the group during the logits exchange" in done.stderr, done.stderr[-3000:]
    assert "latest.json (epoch 1)" in done.stderr
    assert json.loads((out / "latest.json").read_text())["epoch"] == 1


def test_resume_with_another_world_size_is_refused(two_ranks, tmp_path):
    source, _ = two_ranks
    out = tmp_path / "copy"
    out.mkdir()
    for path in source.iterdir():
        (out / path.name).write_bytes(path.read_bytes())
    done, _ = launch([*TINY, "--out", str(out), "--resume"], 1)
    assert done.returncode != 0
    assert "was written by 2 ranks, this run has 1" in done.stderr
    done, _ = launch([*TINY, "--out", str(out), "--resume"], None)
    assert done.returncode == 2
    assert "member-parallel checkpoint: resume it under torchrun" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


# ============================================================================ in process


def test_member_blocks_are_contiguous_and_balanced():
    assert distributed.member_blocks(4, 2) == [range(0, 2), range(2, 4)]
    assert distributed.member_blocks(5, 2) == [range(0, 3), range(3, 5)]
    assert distributed.member_blocks(8, 3) == [range(0, 3), range(3, 6), range(6, 8)]
    assert distributed.member_blocks(3, 3) == [range(0, 1), range(1, 2), range(2, 3)]
    with pytest.raises(distributed.LaunchError, match="cannot be spread over 4 ranks"):
        distributed.member_blocks(3, 4)


def test_plain_runs_use_the_single_process_placement(monkeypatch):
    for name in TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)
    assert isinstance(distributed.setup(build_config({})), distributed.SingleProcess)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def one_rank(monkeypatch, tmp_path):
    """A real one-rank gloo group in this process, as torchrun would set it up."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    stdout = sys.stdout
    config = build_config({"num_nets": 2, "out": str(tmp_path), "device": "cpu", "dist_timeout": 30.0, "threads": 1})
    placement = distributed.setup(config)
    try:
        yield placement, RunFolder(tmp_path)
    finally:
        sys.stdout = stdout
        if dist.is_initialized():
            dist.destroy_process_group()


def fake_state(epoch: int) -> dict:
    return {"epoch": epoch, "config": {}, "models": [{"w": torch.full((2,), float(epoch))}] * 2,
            "optimizers": [], "scores": {}, "rng": {}, "metrics": {"epochs": []}}


def test_exchange_keeps_gradient_in_the_local_block(one_rank):
    placement, _ = one_rank
    local = torch.randn(2, 3, 5, requires_grad=True)
    group = placement.exchange(local)
    assert torch.equal(group, local)
    group.sum().backward()
    assert torch.equal(local.grad, torch.ones_like(local))


def test_manifest_names_the_complete_set_and_old_sets_go(one_rank):
    placement, folder = one_rank
    out = folder.path
    for epoch, best in ((1, True), (2, False), (3, False)):
        placement.save_checkpoint(folder, fake_state(epoch), is_best=best)
    latest = json.loads((out / "latest.json").read_text())
    best = json.loads((out / "best.json").read_text())
    assert (latest["epoch"], best["epoch"]) == (3, 1)
    assert sorted(p.name for p in out.glob("epoch*.pt")) == sorted(best["files"] + latest["files"])

    # A rank file written after the manifest (a crash before the next manifest) is ignored.
    checkpoint.save(out / f"epoch0004-{placement.token}.rank0.pt", {**fake_state(4), "rank": 0})
    path, state = placement.load_checkpoint(folder, "latest")
    assert path == out / "latest.json" and state["epoch"] == 3
    assert placement.load_checkpoint(folder, str(out / "best.json"))[1]["epoch"] == 1


@pytest.mark.parametrize("damage, message", [
    ("missing", "does not exist"),
    ("corrupt file", "is corrupt or not a checkpoint"),
    ("corrupt manifest", "is corrupt or not a checkpoint"),
    ("other world size", "was written by 2 ranks, this run has 1"),
    ("single-process", "was written by a single-process run"),
])
def test_resume_refuses_a_damaged_set(one_rank, damage, message):
    placement, folder = one_rank
    out = folder.path
    placement.save_checkpoint(folder, fake_state(1), is_best=True)
    latest = json.loads((out / "latest.json").read_text())
    if damage == "missing":
        (out / latest["files"][0]).unlink()
    elif damage == "corrupt file":
        (out / latest["files"][0]).write_bytes(b"not a checkpoint")
    elif damage == "corrupt manifest":
        (out / "latest.json").write_text("{")
    elif damage == "other world size":
        (out / "latest.json").write_text(json.dumps({**latest, "world_size": 2}))
    else:
        (out / "latest.json").unlink()
        checkpoint.save(out / "latest.pt", fake_state(1))
    with pytest.raises(checkpoint.CheckpointError, match=message):
        placement.load_checkpoint(folder, "latest")
