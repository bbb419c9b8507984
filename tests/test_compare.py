"""python -m orc_fast.compare: a tiny protocol end to end, skip and resume, the table against
the runs' metrics.json, bad protocols, the lock."""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from orc_fast.compare import main
from orc_fast.compare_report import processor_name

ROOT = Path(__file__).resolve().parents[1]
COMMON = {"num_nets": 2, "image_size": 16, "train_subset": 200, "batch_size": 50, "threads": 1, "epochs": 1}
TINY = {"name": "tiny", "common": COMMON, "pivot": {"arch": "resnet8"},
        "methods": [{"name": "kd", "method": "kd", "pivot": True}, {"name": "dml", "method": "dml"}],
        "seeds": [0, 1]}


def write(path: Path, protocol: dict) -> Path:
    path.write_text(yaml.safe_dump(protocol))
    return path


def compare(*argv, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "orc_fast.compare", *map(str, argv)], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    folder = tmp_path_factory.mktemp("compare")
    protocol = write(folder / "tiny.yaml", TINY)
    result = compare("--config", protocol, "--out", folder / "out", "--jobs", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    return folder, protocol, result


def metrics(out: Path, run: str) -> dict:
    return json.loads((out / "runs" / run / "metrics.json").read_text())


def test_a_tiny_protocol_runs_every_method_and_seed_after_its_pivot(finished):
    folder, _, result = finished
    out = folder / "out"
    runs = ["pivot-s0", "kd-s0", "dml-s0", "pivot-s1", "kd-s1", "dml-s1"]
    for run in runs:
        assert metrics(out, run)["final"] is not None, run
        assert f"{run}: done in" in result.stdout
    assert metrics(out, "pivot-s0")["config"]["archs"] == ["resnet8"]
    assert metrics(out, "kd-s1")["config"]["pivot"].endswith("pivot-s1/best.pt")  # each seed its own pivot
    assert metrics(out, "dml-s1")["config"]["seed"] == 1
    for name in ("table.md", "results.json", "curves.png"):
        assert (out / name).stat().st_size > 0
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert not (out / "compare.lock").exists()


def test_the_table_equals_the_runs_metrics(finished):
    out = finished[0] / "out"
    results = json.loads((out / "results.json").read_text())
    summary = {entry["method"]: entry for entry in results["summary"]}
    assert set(summary) == {"pivot", "kd", "dml"}
    for method in ("pivot", "kd", "dml"):
        finals = [metrics(out, f"{method}-s{seed}")["final"] for seed in (0, 1)]
        mean_member = [100 * statistics.fmean(f["test_acc"]) for f in finals]
        best = [100 * f["test_acc"][f["best_member"]] for f in finals]
        ensemble = [100 * f["ensemble_acc"] for f in finals]
        for column, values in (("mean_member", mean_member), ("best_member", best), ("ensemble", ensemble)):
            assert summary[method][column]["mean"] == pytest.approx(statistics.fmean(values))
            assert summary[method][column]["std"] == pytest.approx(statistics.stdev(values))
        row = f"| {method} | 2 | {statistics.fmean(mean_member):.2f} ± {statistics.stdev(mean_member):.2f} |"
        assert row in (out / "table.md").read_text()


def test_a_second_invocation_skips_the_finished_runs(finished):
    folder, protocol, _ = finished
    out = folder / "out"
    before = {run.name: run.stat().st_mtime_ns for run in (out / "runs").glob("*/metrics.json")}
    again = compare("--config", protocol, "--out", out)
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("finished before, skipped") == 6 and "started" not in again.stdout
    assert {run.name: run.stat().st_mtime_ns for run in (out / "runs").glob("*/metrics.json")} == before


def test_a_killed_comparison_resumes_its_interrupted_run(tmp_path):
    protocol = {"common": dict(COMMON, epochs=6, train_subset=600), "methods": [{"name": "dml", "method": "dml"}],
                "seeds": [0]}
    path = write(tmp_path / "long.yaml", protocol)
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-m", "orc_fast.compare", "--config", str(path), "--out", str(out)],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    checkpoint = out / "runs" / "dml-s0" / "latest.pt"
    deadline = time.time() + 300
    while not checkpoint.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    assert checkpoint.exists(), "the run wrote no checkpoint"
    process.kill()  # SIGKILL to the comparison mid-run: its trainer dies with it
    process.wait()
    gone_by = time.time() + 30
    while subprocess.run(["pgrep", "-f", str(out)], capture_output=True).returncode == 0:  # its trainer
        assert time.time() < gone_by, "the trainer outlived its comparison"
        time.sleep(0.1)
    assert len(metrics(out, "dml-s0")["epochs"]) < 6, "the run finished before the kill"
    again = compare("--config", path, "--out", out)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "dml-s0: resuming" in again.stdout
    assert "resumed from" in (out / "logs" / "dml-s0.log").read_text()
    assert len(metrics(out, "dml-s0")["epochs"]) == 6


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_a_background_comparison_and_its_trainer_cleanly(tmp_path, signum):
    """Started the way a script backgrounds a job (SIGINT ignored), SIGINT and ``kill``
    (SIGTERM) stop the comparison like Ctrl-C: its trainer is interrupted, the lock is
    gone, exit 130."""
    protocol = {"common": dict(COMMON, epochs=50, train_subset=600), "methods": [{"name": "dml", "method": "dml"}],
                "seeds": [0]}
    path = write(tmp_path / "long.yaml", protocol)
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-m", "orc_fast.compare", "--config", str(path), "--out", str(out)],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    checkpoint = out / "runs" / "dml-s0" / "latest.pt"
    deadline = time.time() + 300
    while not checkpoint.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    assert checkpoint.exists(), "the run wrote no checkpoint"
    process.send_signal(signum)
    try:
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130, stderr
    assert "interrupted; run the same command again" in stderr
    assert not (out / "compare.lock").exists()
    assert subprocess.run(["pgrep", "-f", str(out)], capture_output=True).returncode != 0, "its trainer still runs"
    assert "interrupted" in (out / "logs" / "dml-s0.log").read_text()


def test_a_changed_protocol_is_refused_on_a_folder_that_holds_its_runs(finished, tmp_path, capsys):
    folder, _, _ = finished
    changed = write(tmp_path / "changed.yaml", {**TINY, "common": {**COMMON, "lr": 0.2}})
    assert main(["--config", str(changed), "--out", str(folder / "out")]) == 2
    err = capsys.readouterr().err
    assert "started with other values of lr" in err and len(err.strip().splitlines()) == 1
    assert not (folder / "out" / "compare.lock").exists()


BAD = {
    "unknown top-level key": ({**TINY, "budget": 3}, "unknown key 'budget'"),
    "unknown trainer flag": ({**TINY, "common": {**COMMON, "epoch": 3}}, "key 'common': unknown key 'epoch'"),
    "wrong type": ({**TINY, "common": {**COMMON, "epochs": "ten"}}, "bad value 'ten' for 'epochs'"),
    "missing methods": ({k: v for k, v in TINY.items() if k != "methods"}, "missing key 'methods'"),
    "duplicate name": ({**TINY, "methods": [{"name": "a", "method": "dml"}, {"name": "a", "method": "kdcl"}]},
                       "duplicate method name 'a'"),
    "pivot without a pivot section": ({k: v for k, v in TINY.items() if k != "pivot"},
                                      "uses the pivot, but the protocol has no 'pivot' section"),
    "unknown trainer method": ({**TINY, "methods": [{"name": "x", "method": "fitnet"}]},
                               "bad value 'fitnet' for 'method'"),
    "per-run flag": ({**TINY, "common": {**COMMON, "seed": 3}}, "'seed' is set per run"),
    "seeds not integers": ({**TINY, "seeds": ["a"]}, "key 'seeds' must be a list of distinct integers"),
    "methods not a list": ({**TINY, "methods": {"name": "x"}}, "key 'methods' must be a list"),
    "negative seed": ({**TINY, "seeds": [0, -1]}, "key 'seeds' must hold seeds >= 0, got -1"),
    "zero epochs in common": ({**TINY, "common": {**COMMON, "epochs": 0}}, "key 'common': key 'epochs' must be >= 1, got 0"),
    "zero epochs in a method": ({**TINY, "methods": [{"name": "dml", "method": "dml", "epochs": 0}]},
                                "key 'methods[0]': key 'epochs' must be >= 1, got 0"),
    "zero epochs for the pivot": ({**TINY, "pivot": {"arch": "resnet8", "epochs": 0}},
                                  "key 'pivot': key 'epochs' must be >= 1, got 0"),
    "batch of one": ({**TINY, "common": {**COMMON, "batch_size": 1}}, "key 'batch_size' must be >= 2, got 1"),
}


@pytest.mark.parametrize("case", BAD)
def test_a_bad_protocol_is_one_line_naming_the_key_and_starts_nothing(case, tmp_path, capsys):
    protocol, message = BAD[case]
    path = write(tmp_path / "bad.yaml", protocol)
    assert main(["--config", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out" / "runs").exists()


def test_a_folder_in_use_is_refused(finished, tmp_path, capsys):
    folder, protocol, _ = finished
    lock = folder / "out" / "compare.lock"
    lock.write_text(f"{os.getpid()}\n")  # a live process holds it
    try:
        assert main(["--config", str(protocol), "--out", str(folder / "out")]) == 2
        assert "is in use by another comparison" in capsys.readouterr().err
    finally:
        lock.unlink()
    lock.write_text("999999999\n")  # its process is gone: taken over
    assert main(["--config", str(protocol), "--out", str(folder / "out"), "--report-only"]) == 0
    assert not lock.exists()


def test_the_processor_is_named_by_family_model_and_bf16_hardware():
    zen3 = "processor\t: 0\ncpu family\t: 25\nmodel\t\t: 1\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2\n"
    zen5 = "cpu family\t: 26\nmodel\t\t: 2\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx512f avx512_bf16\n"
    intel = ("cpu family\t: 6\nmodel\t\t: 143\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\n"
             "flags\t\t: avx512_bf16 amx_bf16 amx_tile\nprocessor\t: 1\ncpu family\t: 6\nmodel\t\t: 143\n")
    assert processor_name(zen3) == "AMD EPYC (family 25 model 1)"
    assert processor_name(zen5) == "AMD EPYC (family 26 model 2, AVX512-BF16)"
    assert processor_name(intel) == "Intel(R) Xeon(R) Platinum 8480+ (family 6 model 143, AVX512-BF16, AMX)"
    assert processor_name("model name\t: Neoverse\n") == "Neoverse"
