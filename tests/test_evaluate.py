"""python -m orc_fast.evaluate: a trained run's members measured outside the trainer."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from trained_runs import TEST_IMAGES, correct_count, final, train_run

from orc_fast import checkpoint
from orc_fast.data import load_dataset
from orc_fast.evaluate import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train_run(tmp_path_factory.mktemp("trained") / "run")


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ORC_FAST_CACHE", str(tmp_path / "cache"))


def evaluate(capsys, *argv):
    code = main([*map(str, argv), "--threads", "1"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def top1_count(out: str) -> tuple[int, int]:
    """(correct, total) of evaluate's top-1 line."""
    (match,) = re.findall(r"top-1 [\d.]+% \((\d+)/(\d+)\)", out)
    return int(match[0]), int(match[1])


def test_checkpoints_carry_class_names_and_normalisation(run):
    data = checkpoint.load(run / "latest.pt")["data"]
    trained_on = load_dataset("digits", image_size=16, train_subset=1000, val_split=-1)
    assert data["classes"] == [str(c) for c in range(10)] and data["image_size"] == 16
    assert torch.equal(data["mean"], trained_on.mean) and torch.equal(data["std"], trained_on.std)


def test_every_member_and_the_ensemble_reproduce_the_runs_test_accuracy(run, capsys):
    result = final(run)
    assert 0.3 < result["ensemble_acc"] < 1.0  # trained, far from chance (10 %)
    for member in range(2):
        code, out, err = evaluate(capsys, run, "--member", member)
        assert code == 0, err
        assert top1_count(out) == (correct_count(result["test_acc"][member]), TEST_IMAGES)
    code, out, _ = evaluate(capsys, run, "--member", "ensemble")
    assert code == 0 and top1_count(out) == (correct_count(result["ensemble_acc"]), TEST_IMAGES)
    assert "ensemble of 2 members" in out


def test_best_is_the_best_member_on_validation(run, capsys):
    result = final(run)
    code, out, _ = evaluate(capsys, run)  # --member best is the default
    best = result["best_member"]
    assert best == max(range(2), key=result["val_acc"].__getitem__)
    assert code == 0 and f"member {best} (resnet8, best on validation)" in out
    assert top1_count(out) == (correct_count(result["test_acc"][best]), TEST_IMAGES)


def test_per_class_accuracy(run, capsys):
    code, out, _ = evaluate(capsys, run, "--member", "0", "--per-class")
    assert code == 0
    rows = re.findall(r"class (\d): +[\d.]+% \((\d+)/(\d+)\)", out)
    assert [name for name, _, _ in rows] == [str(c) for c in range(10)]
    test_labels = load_dataset("digits", image_size=16).test_labels
    assert [int(total) for _, _, total in rows] == torch.bincount(test_labels).tolist()
    assert sum(int(hits) for _, hits, _ in rows) == top1_count(out)[0]


def write_png_tree(folder: Path, images: torch.Tensor, labels: torch.Tensor, names) -> None:
    from PIL import Image

    for index, (image, label) in enumerate(zip(images, labels.tolist())):
        (folder / names[label]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / names[label] / f"{index}.png")


def test_any_folder_of_class_folders(run, capsys, tmp_path):
    digits = load_dataset("digits", image_size=16)
    # The same test images as PNG files (lossless, already at the run's image size).
    write_png_tree(tmp_path / "test", digits.test_images, digits.test_labels, digits.classes)
    code, out, err = evaluate(capsys, run, "--member", "1", "--data", tmp_path / "test")
    assert code == 0, err
    assert top1_count(out) == (correct_count(final(run)["test_acc"][1]), TEST_IMAGES)
    # Only some of the classes: labels follow the folder names, not their order.
    keep = (digits.test_labels == 3) | (digits.test_labels == 7)
    write_png_tree(tmp_path / "some", digits.test_images[keep], digits.test_labels[keep], digits.classes)
    _, full, _ = evaluate(capsys, run, "--member", "1", "--per-class")
    expected = sum(int(h) for name, h in re.findall(r"class (\d): +[\d.]+% \((\d+)/\d+\)", full) if name in "37")
    code, out, _ = evaluate(capsys, run, "--member", "1", "--data", tmp_path / "some")
    assert code == 0 and top1_count(out) == (expected, int(keep.sum()))


def test_a_larger_folder_is_resized_to_the_runs_image_size(run, capsys, tmp_path):
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (4, 3, 40, 40), dtype=np.uint8))
    write_png_tree(tmp_path / "test", images, torch.tensor([0, 1, 2, 9]), [str(c) for c in range(10)])
    code, out, err = evaluate(capsys, run, "--data", tmp_path / "test", "--per-class")
    assert code == 0, err
    assert top1_count(out)[1] == 4 and len(re.findall(r"class \d:", out)) == 4


def old_checkpoint(run: Path, folder: Path) -> Path:
    """latest.pt as written before checkpoints carried class names and normalisation."""
    state = checkpoint.load(run / "latest.pt")
    del state["data"]
    folder.mkdir()
    checkpoint.save(folder / "latest.pt", state)
    return folder / "latest.pt"


def test_old_checkpoints_still_load(run, capsys, tmp_path):
    old = old_checkpoint(run, tmp_path / "old")
    code, out, err = evaluate(capsys, old, "--member", "ensemble")
    assert code == 0, err
    assert "predates checkpoints that carry class names and normalisation statistics" in out
    assert top1_count(out) == (correct_count(final(run)["ensemble_acc"]), TEST_IMAGES)


def test_a_member_parallel_checkpoint_set(run, capsys, tmp_path):
    """A torchrun run's latest.json and its rank files (one member each), as the trainer
    writes them (orc_fast/distributed.py)."""
    state = checkpoint.load(run / "latest.pt")
    files = []
    for rank in range(2):
        files.append(f"epoch0002-abc.rank{rank}.pt")
        checkpoint.save(tmp_path / files[-1], {**state, "models": state["models"][rank : rank + 1], "rank": rank,
                                               "world_size": 2, "members": [rank, rank + 1], "run_id": "abc"})
    manifest = checkpoint.make_manifest(2, 2, 2, "abc", [[0, 1], [1, 2]], files)
    (tmp_path / "latest.json").write_text(json.dumps(manifest))
    code, out, err = evaluate(capsys, tmp_path, "--member", "1")
    assert code == 0, err
    assert top1_count(out) == (correct_count(final(run)["test_acc"][1]), TEST_IMAGES)


def bad_cases(run: Path, tmp_path: Path) -> dict:
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    state = checkpoint.load(run / "latest.pt")
    for record in state["metrics"]["epochs"]:
        record["val_acc"] = None
    (tmp_path / "noval").mkdir()
    checkpoint.save(tmp_path / "noval" / "latest.pt", state)
    (tmp_path / "empty").mkdir()
    strange = tmp_path / "strange"
    write_png_tree(strange, torch.zeros(1, 3, 16, 16, dtype=torch.uint8), torch.tensor([0]), ["cat"])
    root = tmp_path / "root"
    for split in ("train", "test"):
        write_png_tree(root / split, torch.zeros(1, 3, 16, 16, dtype=torch.uint8), torch.tensor([0]), ["1"])
    return {
        "missing run": ([tmp_path / "nope"], "does not exist"),
        "folder without a run": ([tmp_path / "empty"], "holds no checkpoint"),
        "text file": ([text], "is corrupt or not a checkpoint: torch.save did not write it"),
        "member out of range": ([run, "--member", "2"], "--member 2 is out of range"),
        "member not a name": ([run, "--member", "first"], "--member must be a member index, best"),
        "best without validation": ([tmp_path / "noval", "--member", "best"], "trained with --val-split 0"),
        "unknown class": ([run, "--data", strange], "has classes the run was not trained on: cat"),
        "dataset root as folder": ([run, "--data", root], f"pass {root / 'test'}"),
        "missing data folder": ([run, "--data", tmp_path / "nodata"], "does not exist"),
        "bad batch size": ([run, "--batch-size", "0"], "--batch-size must be >= 1"),
    }


@pytest.mark.parametrize("case", ["missing run", "folder without a run", "text file", "member out of range",
                                  "member not a name", "best without validation", "unknown class",
                                  "dataset root as folder", "missing data folder", "bad batch size"])
def test_bad_input_is_one_line_and_exit_2(run, capsys, tmp_path, case):
    argv, message = bad_cases(run, tmp_path)[case]
    code, _, err = evaluate(capsys, *argv)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("python -m orc_fast.evaluate: error: ") and message in lines[0], lines[0]


def test_command_line(run):
    result = subprocess.run([sys.executable, "-m", "orc_fast.evaluate", str(run), "--threads", "1"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "best on validation" in result.stdout
    help_text = subprocess.run([sys.executable, "-m", "orc_fast.evaluate", "--help"], cwd=ROOT, capture_output=True,
                               text=True, timeout=120).stdout
    for flag in ("--member", "--data", "--data-dir", "--per-class", "--batch-size", "--device"):
        assert flag in help_text
