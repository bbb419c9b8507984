"""python -m orc_fast.train end to end: outputs, resume, config files, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import orc_fast.train as train
from orc_fast import checkpoint
from orc_fast.cli import build_parser, parse_args
from orc_fast.config import build as build_config
from orc_fast.config import resolve
from orc_fast.errors import UsageError
from orc_fast.run_folder import RunFolder
from orc_fast.train import main

ROOT = Path(__file__).resolve().parents[1]
# Small and quick: 2 members on 16x16 digits, 200 training images.
FAST = ["--num-nets", "2", "--image-size", "16", "--train-subset", "200", "--batch-size", "50", "--threads", "1",
        "--progress", "off"]


def run_main(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_end_to_end_on_digits(tmp_path):
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "orc_fast.train", "--epochs", "1", "--train-subset", "300", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "epoch   1/1" in result.stdout
    for i in range(4):
        assert f"member {i} (resnet8):" in result.stdout
    assert "ensemble:" in result.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"config", "epochs", "final", "pivot"} and metrics["pivot"] is None
    (epoch,) = metrics["epochs"]
    # The schema (other work may add keys, e.g. skipped_steps from --nan-policy).
    assert {"epoch", "train_loss", "test_acc", "ensemble_acc", "teacher_fraction", "images_per_s"} <= set(epoch)
    assert epoch["epoch"] == 1 and len(epoch["train_loss"]) == len(epoch["test_acc"]) == 4
    assert all(0.0 <= a <= 1.0 for a in epoch["test_acc"]) and 0.0 <= epoch["ensemble_acc"] <= 1.0
    assert sum(epoch["teacher_fraction"]) == pytest.approx(2.0)  # k = N // 2 teachers every step
    assert epoch["images_per_s"] > 0
    final = metrics["final"]
    assert (final["test_acc"], final["ensemble_acc"]) == (epoch["test_acc"], epoch["ensemble_acc"])
    # Chosen on the validation split (10% of the 300 training images), never on the test set.
    assert metrics["config"]["val_size"] == 30 and metrics["config"]["train_size"] == 270
    assert final["best_member"] == max(range(4), key=final["val_acc"].__getitem__)
    assert epoch["role_changes"] >= 0
    assert metrics["config"]["archs"] == ["resnet8"] * 4 and metrics["config"]["method"] == "orc"
    for name in ("latest.pt", "best.pt", "curves.png"):
        assert (out / name).stat().st_size > 0
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))


@pytest.mark.parametrize("method", ["orc", "independent", "dml", "kdcl"])
def test_every_method_trains(tmp_path, capsys, method):
    code, out, err = run_main(FAST + ["--method", method, "--epochs", "1", "--out", str(tmp_path)], capsys)
    assert code == 0, err
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert len(metrics["final"]["test_acc"]) == 2
    if method != "orc":
        assert metrics["epochs"][0]["teacher_fraction"] == [0.0, 0.0]


def comparable(metrics):
    return [{k: v for k, v in e.items() if k not in ("images_per_s", "seconds")} for e in metrics["epochs"]]


def test_resume_continues_exactly(tmp_path, capsys):
    common = FAST + ["--epochs", "2", "--rank-momentum", "0.5", "--error-mixup", "--seed", "3"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run_main(common + ["--out", str(straight)], capsys)[0] == 0
    assert run_main(common + ["--out", str(split), "--stop-after", "1"], capsys)[0] == 0
    assert len(json.loads((split / "metrics.json").read_text())["epochs"]) == 1
    code, out, err = run_main(common + ["--out", str(split), "--resume"], capsys)
    assert code == 0, err
    assert "resumed from" in out
    a = json.loads((straight / "metrics.json").read_text())
    b = json.loads((split / "metrics.json").read_text())
    assert comparable(a) == comparable(b)
    assert a["final"] == b["final"]
    state_a, state_b = checkpoint.load(straight / "latest.pt"), checkpoint.load(split / "latest.pt")
    for model_a, model_b in zip(state_a["models"], state_b["models"]):
        for key in model_a:
            assert torch.equal(model_a[key], model_b[key]), key
    # Resuming a finished run trains nothing and writes nothing.
    mtime = (split / "latest.pt").stat().st_mtime_ns
    assert run_main(common + ["--out", str(split), "--resume"], capsys)[0] == 0
    assert (split / "latest.pt").stat().st_mtime_ns == mtime
    # A crash after the last checkpoint but before metrics.json: resuming completes the file.
    short = json.loads((split / "metrics.json").read_text())
    short["epochs"], short["final"] = short["epochs"][:1], None
    (split / "metrics.json").write_text(json.dumps(short))
    assert run_main(common + ["--out", str(split), "--resume"], capsys)[0] == 0
    assert comparable(json.loads((split / "metrics.json").read_text())) == comparable(a)


def test_config_file_and_cli_override(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("epochs: 7\nmethod: dml\narch: [resnet8, resnet14]\nerror_mixup: true\nmilestones: [3, 5]\n")
    args = parse_args(["--config", str(config)])
    assert (args.epochs, args.method, args.arch, args.error_mixup) == (7, "dml", "resnet8,resnet14", True)
    with pytest.raises(UsageError, match="--method dml does not use --error-mixup"):
        resolve(args)  # an orc-only flag that dml would silently ignore
    assert resolve(parse_args(["--config", str(config), "--no-error-mixup"])).record()["milestones"] == [3, 5]
    args = parse_args(["--config", str(config), "--epochs", "2", "--no-error-mixup", "--method", "orc"])
    assert (args.epochs, args.error_mixup, args.method) == (2, False, "orc")
    resolved = resolve(args).record()
    assert resolved["archs"] == ["resnet8", "resnet14"] and resolved["teacher_size"] == 1


@pytest.mark.parametrize("preset", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_presets_parse(preset):
    config = resolve(parse_args(["--config", str(preset)])).record()
    assert config["epochs"] >= 1 and config["archs"]


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    flags = [o for action in build_parser()._actions for o in action.option_strings if o.startswith("--")]
    for flag in flags:
        assert flag in text
    for flag in ("--epochs", "--batch-size", "--lr", "--momentum", "--weight-decay", "--schedule", "--temperature",
                 "--alpha", "--num-nets", "--teacher-size", "--device", "--seed", "--out", "--resume", "--config",
                 "--method", "--arch", "--dataset", "--data-dir", "--download", "--train-subset", "--error-rule",
                 "--error-weight", "--error-mixup", "--refresh-teachers", "--rank-momentum", "--rank-by", "--backend"):
        assert flag in flags


def test_the_ranking_score_defaults_to_accuracy_in_peer_mode_only():
    assert resolve(parse_args([])).record()["rank_by"] == "accuracy"
    assert resolve(parse_args(["--rank-by", "ce"])).record()["rank_by"] == "ce"
    assert resolve(parse_args(["--method", "dml"])).record()["rank_by"] is None  # nothing to rank


def test_lr_schedules():
    from orc_fast.train import learning_rate

    step = build_config({"schedule": "step", "lr": 0.1, "lr_decay": 0.1, "milestones": [150, 180, 210], "epochs": 240})
    assert [round(learning_rate(step, e, 0, 10), 6) for e in (0, 149, 150, 180, 239)] == [0.1, 0.1, 0.01, 0.001, 0.0001]
    cosine = {"schedule": "cosine", "lr": 0.1, "epochs": 10}
    assert learning_rate(build_config(cosine), 0, 0, 10) == pytest.approx(0.1)
    assert learning_rate(build_config(cosine), 5, 0, 10) == pytest.approx(0.05)
    assert learning_rate(build_config(cosine), 9, 9, 10) < 0.001
    assert resolve(parse_args(["--epochs", "240", "--schedule", "step"])).record()["milestones"] == [150, 180, 210]


# ---------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def previous_run(tmp_path_factory):
    """An output folder with a finished run in it, to check nothing gets overwritten."""
    out = tmp_path_factory.mktemp("previous")
    assert main(FAST + ["--epochs", "1", "--out", str(out)]) == 0
    return out


def snapshot(folder: Path):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def bad_cases(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    mismatched = tmp_path / "mismatched"
    for split, classes in (("train", ("a", "b")), ("test", ("a", "c"))):
        for c in classes:
            (mismatched / split / c).mkdir(parents=True)
            (mismatched / split / c / "x.png").write_bytes(b"")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x80\x02 this is not a checkpoint")
    truncated = tmp_path / "truncated.pt"
    text = tmp_path / "afile.txt"
    text.write_text("hello\n")
    one_class = tmp_path / "one_class"
    for split in ("train", "test"):
        (one_class / split / "cat").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(one_class / split / "cat" / "x.png")
    return {
        "unknown arch": (["--arch", "resnet9"], "unknown arch resnet9"),
        "unknown arch in a list": (["--arch", "resnet8,nope"], "unknown arch nope"),
        "unknown dataset": (["--dataset", "mnist"], "invalid choice: 'mnist'"),
        "unknown method": (["--method", "fancy"], "invalid choice: 'fancy'"),
        "missing folder": (["--dataset", "imagefolder", "--data-dir", str(tmp_path / "nope")], "does not exist"),
        "empty folder": (["--dataset", "imagefolder", "--data-dir", str(empty)], "has no train/ folder"),
        "class mismatch": (["--dataset", "imagefolder", "--data-dir", str(mismatched)], "test classes differ"),
        "teacher size 0": (["--teacher-size", "0"], "--teacher-size must lie in [1, N-1] = [1, 1]"),
        "teacher size N": (["--num-nets", "4", "--teacher-size", "4"], "--teacher-size must lie in [1, N-1] = [1, 3]"),
        "corrupt checkpoint": (["--resume", str(corrupt)], "is corrupt or not a checkpoint"),
        "missing checkpoint": (["--resume", str(truncated)], "does not exist"),
        "mismatched checkpoint": (["--arch", "resnet14", "--resume"], "does not match this run: archs"),
        "bad number": (["--epochs", "zero"], "invalid int value"),
        "bad config": (["--config", str(tmp_path / "none.yaml")], "cannot read --config"),
        "used folder": ([], "already holds a run"),
        "file as out": (["--out", str(corrupt)], "is a file, not a folder"),
        "one-class folder": (["--dataset", "imagefolder", "--data-dir", str(one_class), "--train-subset", "0"],
                             "has only one class (cat): a classifier needs at least 2"),
        "subset below classes": (["--train-subset", "5"], "--train-subset 5 is smaller than the 10 classes"),
        "subset above data": (["--train-subset", "99999"], "--train-subset 99999 asks for more than the 1437"),
        "teacher size with dml": (["--method", "dml", "--teacher-size", "1"], "--method dml does not use --teacher-size"),
        "rank score with kdcl": (["--method", "kdcl", "--rank-by", "accuracy"], "--method kdcl does not use --rank-by"),
        "unknown rank score": (["--rank-by", "loss"], "argument --rank-by: invalid choice: 'loss'"),
        "temperature with independent": (["--method", "independent", "--temperature", "2"],
                                         "--method independent does not use --temperature"),
        "negative num-nets": (["--num-nets", "-3"], "--num-nets must be >= 1, got -3"),
        "file as data dir": (["--dataset", "imagefolder", "--data-dir", str(corrupt)], "is a file, not a folder"),
        "text file as checkpoint": (["--resume", str(text)], "is corrupt or not a checkpoint: torch.save did not write it"),
        "changed epochs on resume": (["--resume"], "was trained with other settings (epochs 1 -> 2"),
        "changed lr on resume": (["--resume", "--epochs", "1", "--lr", "0.05"], "(lr 0.1 -> 0.05)"),
        "changed alpha on resume": (["--resume", "--epochs", "1", "--alpha", "0.9"], "alpha 0.5 -> 0.9"),
        "changed seed on resume": (["--resume", "--epochs", "1", "--seed", "4", "--resume-changes"],
                                   "does not match this run: seed was 0, now 4"),
    }


@pytest.mark.parametrize(
    "case",
    ["unknown arch", "unknown arch in a list", "unknown dataset", "unknown method", "missing folder", "empty folder",
     "class mismatch", "teacher size 0", "teacher size N", "corrupt checkpoint", "missing checkpoint",
     "mismatched checkpoint", "bad number", "bad config", "used folder", "file as out", "one-class folder",
     "subset below classes", "subset above data", "teacher size with dml", "temperature with independent",
     "negative num-nets", "file as data dir", "text file as checkpoint", "changed epochs on resume",
     "changed lr on resume", "changed alpha on resume", "changed seed on resume"],
)
def test_bad_input_is_one_line_exit_2_and_overwrites_nothing(case, previous_run, tmp_path, capsys):
    argv, message = bad_cases(tmp_path)[case]
    before = snapshot(previous_run)
    try:
        # --overwrite: even where a run may be replaced, bad input must leave it untouched
        # (except the case that checks the refusal of a used folder itself).
        overwrite = [] if case == "used folder" else ["--overwrite"]
        code = main(FAST + ["--epochs", "2", "--out", str(previous_run)] + overwrite + argv)
    except SystemExit as exit_info:  # argparse errors exit from inside
        code = exit_info.code
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("python -m orc_fast.train: error: ")
    assert message in lines[0]
    assert snapshot(previous_run) == before


def test_unknown_config_key_is_reported(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("epochs: 1\nlearning_rate: 0.1\n")
    assert main(["--config", str(config)]) == 2
    assert "unknown key 'learning_rate'" in capsys.readouterr().err
    config.write_text("epochs: [1\n")
    assert main(["--config", str(config)]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    config.write_text("method: fancy\n")
    assert main(["--config", str(config)]) == 2
    assert "bad value 'fancy' for 'method'" in capsys.readouterr().err


def test_help_gives_every_flag_a_text_and_shows_the_defaults(capsys):
    parser = build_parser()
    undocumented = [a.option_strings[0] for a in parser._actions if a.option_strings and not (a.help or "").strip()]
    assert undocumented == []
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    entries, current = {}, None  # each option's help: from its "  --flag" line to the next option
    for line in capsys.readouterr().out.splitlines():
        if line.startswith("  -"):
            current = line.split()[0].rstrip(",")
            entries[current] = ""
        if current:
            entries[current] += " " + line.strip()
    for flag, default in (("--epochs", 10), ("--batch-size", 64), ("--momentum", 0.9), ("--weight-decay", 0.0005),
                          ("--lr-decay", 0.1), ("--seed", 0), ("--eval-batch-size", 1000)):
        assert f"(default: {default})" in entries[flag], (flag, entries[flag])


def test_resume_with_changes_continues_with_the_new_values(tmp_path, capsys):
    assert run_main(FAST + ["--epochs", "1", "--out", str(tmp_path)], capsys)[0] == 0
    code, out, err = run_main(FAST + ["--epochs", "2", "--lr", "0.05", "--out", str(tmp_path), "--resume",
                                      "--resume-changes"], capsys)
    assert code == 0, err
    assert "resuming with changed settings: epochs 1 -> 2" in out and "lr 0.1 -> 0.05" in out
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2]
    assert metrics["config"]["epochs"] == 2 and metrics["config"]["lr"] == 0.05
    (change,) = metrics["config"]["changed_on_resume"]
    assert change["epoch"] == 1 and change["changes"]["epochs"] == [1, 2] and change["changes"]["lr"] == [0.1, 0.05]
    # The history stays with the run: resuming it again with its new settings keeps it.
    assert run_main(FAST + ["--epochs", "2", "--lr", "0.05", "--out", str(tmp_path), "--resume"], capsys)[0] == 0
    assert checkpoint.load(tmp_path / "latest.pt")["config"]["changed_on_resume"] == [change]
    # Fewer epochs than the run has trained cannot be resumed.
    code, _, err = run_main(FAST + ["--epochs", "1", "--lr", "0.05", "--out", str(tmp_path), "--resume",
                                    "--resume-changes"], capsys)
    assert code == 2 and "--epochs 1 is fewer than the 2 epochs" in err


def test_resume_of_a_checkpoint_from_before_the_ranking_score_was_recorded(tmp_path, capsys):
    """Such a run ranked by CE: resuming it in peer mode (now ranked by top-1 error) is a
    change that needs --resume-changes; with --rank-by ce, or for a method that ranks
    nothing, it resumes as before."""
    peer, dml = tmp_path / "peer", tmp_path / "dml"
    assert run_main(FAST + ["--epochs", "1", "--out", str(peer)], capsys)[0] == 0
    assert run_main(FAST + ["--epochs", "1", "--method", "dml", "--out", str(dml)], capsys)[0] == 0
    for folder in (peer, dml):
        state = checkpoint.load(folder / "latest.pt")
        del state["config"]["rank_by"]
        checkpoint.save(folder / "latest.pt", state)
    code, _, err = run_main(FAST + ["--epochs", "2", "--out", str(peer), "--resume"], capsys)
    assert code == 2 and "rank_by 'ce' -> 'accuracy'" in err
    assert run_main(FAST + ["--epochs", "2", "--rank-by", "ce", "--out", str(peer), "--resume",
                            "--resume-changes"], capsys)[0] == 0
    assert run_main(FAST + ["--epochs", "2", "--method", "dml", "--out", str(dml), "--resume",
                            "--resume-changes"], capsys)[0] == 0


def interrupt_after(monkeypatch, owner, function: str, calls: int):
    """Make ``owner.function`` (a module's function or a class's method) raise
    KeyboardInterrupt (Ctrl-C) on its ``calls``-th call."""
    real, seen = getattr(owner, function), []

    def interrupted(*args, **kwargs):
        seen.append(1)
        if len(seen) == calls:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, function, interrupted)


def test_ctrl_c_before_the_first_save_says_there_is_nothing_to_resume(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    interrupt_after(monkeypatch, train, "train_epoch", 1)
    code, _, err = run_main(FAST + ["--epochs", "2", "--out", str(out)], capsys)
    assert code == 130
    assert "nothing to resume: run the same command again (without --resume)" in err and "continue" not in err
    monkeypatch.undo()
    assert run_main(FAST + ["--epochs", "1", "--out", str(out)], capsys)[0] == 0  # as it said


def test_ctrl_c_names_the_epoch_that_resume_continues_from(tmp_path, capsys, monkeypatch):
    # Ctrl-C while epoch 2's outputs are written: its checkpoint is on disk, its summary line
    # never printed. The message says which epoch the checkpoint holds; resume agrees.
    out = tmp_path / "run"
    interrupt_after(monkeypatch, RunFolder, "write_metrics", 2)
    code, stdout, err = run_main(FAST + ["--epochs", "3", "--out", str(out)], capsys)
    assert code == 130 and "epoch   2/3" not in stdout
    assert f"{out / 'latest.pt'} holds epoch 2: continue with the same command and --resume --out {out}" in err
    monkeypatch.undo()
    code, stdout, err = run_main(FAST + ["--epochs", "3", "--out", str(out), "--resume"], capsys)
    assert code == 0, err
    assert f"resumed from {out / 'latest.pt'} after epoch 2" in stdout and "epoch   3/3" in stdout
