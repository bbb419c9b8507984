"""python -m orc_fast.export: a member as one standalone torch.export file, loaded where
orc_fast is not."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch
from trained_runs import TEST_IMAGES, correct_count, final, train_run

from orc_fast import checkpoint
from orc_fast.data import load_dataset
from orc_fast.export import main

HAS_ONNX = all(importlib.util.find_spec(name) for name in ("onnx", "onnxscript"))

# What a user does with the file, in a fresh interpreter where importing orc_fast fails.
USE_IT = """
import json, sys
sys.modules["orc_fast"] = None  # the file must not need orc_fast
import torch

images, labels = torch.load(sys.argv[1])
results = {}
for path in sys.argv[2:]:
    meta = {"orc_fast.json": ""}
    model = torch.export.load(path, extra_files=meta).module()
    info = json.loads(meta["orc_fast.json"])
    x = images.float().div(255.0)
    with torch.inference_mode():
        logits = model(x)
        one = model(x[:1])
    results[path] = {"correct": int((logits.argmax(-1) == labels).sum()), "shape": list(logits.shape),
                     "batch_of_one": bool(torch.allclose(one, logits[:1], atol=1e-5)), "info": info}
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train_run(tmp_path_factory.mktemp("trained") / "run")


def export(capsys, *argv):
    code = main(list(map(str, argv)))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_an_exported_member_reproduces_its_test_accuracy_in_a_fresh_process(run, capsys, tmp_path):
    best, ensemble = tmp_path / "model.pt", tmp_path / "ensemble.pt2"
    code, out, err = export(capsys, run, "--member", "best", "--out", best)
    assert code == 0, err
    assert "largest difference from the eager model" in out
    assert export(capsys, run / "latest.pt", "--member", "ensemble", "--out", ensemble)[0] == 0
    digits = load_dataset("digits", image_size=16)
    torch.save((digits.test_images, digits.test_labels), tmp_path / "test.pt")
    used = subprocess.run([sys.executable, "-c", USE_IT, "test.pt", best.name, ensemble.name], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, env={"PATH": "/usr/bin:/bin"})
    assert used.returncode == 0, used.stderr
    results = json.loads(used.stdout)
    result = final(run)
    member = result["best_member"]
    assert results[best.name]["correct"] == correct_count(result["test_acc"][member])
    assert results[ensemble.name]["correct"] == correct_count(result["ensemble_acc"])
    for path in (best.name, ensemble.name):
        assert results[path]["shape"] == [TEST_IMAGES, 10] and results[path]["batch_of_one"]
    info = results[best.name]["info"]
    data = checkpoint.load(run / "latest.pt")["data"]
    assert info["classes"] == data["classes"] and info["image_size"] == 16
    assert info["mean"] == data["mean"].tolist() and info["std"] == data["std"].tolist()
    assert info["member"] == member and info["archs"] == ["resnet8"]
    assert info["trained"]["accuracy"]["test"] == result["test_acc"][member]
    assert results[ensemble.name]["info"]["member"] == "ensemble"


def string_values(value):
    if isinstance(value, dict):
        return [s for v in value.values() for s in string_values(v)]
    if isinstance(value, list):
        return [s for v in value for s in string_values(v)]
    return [value] if isinstance(value, str) else []


def test_the_export_carries_no_path_of_the_machine_it_was_made_on(run, capsys, tmp_path):
    out = tmp_path / "model.pt2"
    assert export(capsys, run / "best.pt", "--member", "0", "--out", out)[0] == 0
    meta = {"orc_fast.json": ""}
    torch.export.load(out, extra_files=meta)
    info = json.loads(meta["orc_fast.json"])
    assert info["trained"]["checkpoint"] == "best.pt"  # named within its run folder
    assert not [s for s in string_values(info) if s.startswith("/") or str(run) in s or str(tmp_path) in s]
    assert str(run).encode() not in out.read_bytes()


def test_existing_output_is_refused_unless_overwrite(run, capsys, tmp_path):
    out = tmp_path / "model.pt2"
    out.write_bytes(b"keep me")
    code, _, err = export(capsys, run, "--member", "0", "--out", out)
    assert code == 2 and "exists: pick another name or add --overwrite" in err and len(err.strip().splitlines()) == 1
    assert out.read_bytes() == b"keep me"
    # A failure after the checks still leaves it alone: member 5 does not exist.
    assert export(capsys, run, "--member", "5", "--out", out, "--overwrite")[0] == 2
    assert out.read_bytes() == b"keep me"
    assert export(capsys, run, "--member", "0", "--out", out, "--overwrite")[0] == 0
    assert out.read_bytes()[:2] == b"PK"  # a zip archive now: the torch.export file
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("case", ["folder as out", "missing run", "best without validation"])
def test_bad_input_is_one_line_and_exit_2(run, capsys, tmp_path, case):
    state = checkpoint.load(run / "latest.pt")
    for record in state["metrics"]["epochs"]:
        record["val_acc"] = None
    checkpoint.save(tmp_path / "noval.pt", state)
    argv, message = {
        "folder as out": ([run, "--out", tmp_path], "is a folder, not a file"),
        "missing run": ([tmp_path / "nope", "--out", tmp_path / "m.pt2"], "does not exist"),
        "best without validation": ([tmp_path / "noval.pt", "--out", tmp_path / "m.pt2"], "--val-split 0"),
    }[case]
    code, _, err = export(capsys, *argv)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("python -m orc_fast.export: error: ")
    assert message in lines[0], lines[0]
    assert not (tmp_path / "m.pt2").exists()


@pytest.mark.skipif(HAS_ONNX, reason="onnx is installed here")
def test_onnx_without_onnx_is_refused_before_any_work(run, capsys, tmp_path):
    code, _, err = export(capsys, run, "--out", tmp_path / "m.pt2", "--onnx", tmp_path / "m.onnx")
    assert code == 2 and "--onnx needs the onnx and onnxscript packages" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not HAS_ONNX, reason="needs the onnx and onnxscript packages")
def test_onnx_export_is_a_valid_model(run, capsys, tmp_path):
    import onnx

    code, _, err = export(capsys, run, "--out", tmp_path / "m.pt2", "--onnx", tmp_path / "m.onnx")
    assert code == 0, err
    onnx.checker.check_model(onnx.load(tmp_path / "m.onnx"))


def test_help(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "torch.export" in text and all(flag in text for flag in ("--member", "--out", "--onnx", "--overwrite"))
