"""What a run shows: each member's CE and KD terms, the epoch log, TensorBoard scalars,
curves.png, the terminal line and images/s without the compile warm-up."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from test_orc import TAU, ce_rows, kd_term, random_group
from test_train_cli import FAST, run_main

from orc_fast.config import build as build_config
from orc_fast.data import steps_per_epoch
from orc_fast.methods import StepOutput
from orc_fast.methods.dml import dml_losses
from orc_fast.methods.independent import independent_losses
from orc_fast.methods.kd import kd_losses
from orc_fast.methods.kdcl import kdcl_losses, min_logit_teacher
from orc_fast.methods.orc_peer import orc_losses
from orc_fast.methods.orc_pivot import pivot_orc_losses
from orc_fast.observe import EpochLog
from orc_fast.plot import _epoch_axis, plot_metrics
from orc_fast.train import main, warmup_steps


def close(actual, expected):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=1e-5, atol=1e-6)


def kd_means(logits, teachers, weights):
    """tau^2 KL to the weighted mean of ``teachers`` per member, batch-averaged: [N]."""
    return torch.stack([TAU**2 * kd_term(member, teachers, weights).mean() for member in logits])


# ---------------------------------------------------------------------------- the loss terms


def test_orc_terms_are_plain_ce_and_the_students_kd_only():
    logits, target = random_group()
    roles = torch.tensor([1.0, 0.0, 1.0, 0.0])
    losses = orc_losses(logits.clone().requires_grad_(), target, roles, temperature=TAU, alpha=0.9)
    close(losses.ce, ce_rows(logits, target).mean(1))
    close(losses.kd, (1 - roles) * kd_means(logits, logits, roles))
    assert not losses.ce.requires_grad and not losses.kd.requires_grad


def test_baseline_terms_match_their_teachers():
    logits, target = random_group()
    close(independent_losses(logits, target).kd, torch.zeros(4))
    close(independent_losses(logits, target).ce, ce_rows(logits, target).mean(1))
    others = 1.0 - torch.eye(4)
    dml = dml_losses(logits, target, temperature=TAU)
    close(dml.kd, torch.stack([TAU**2 * kd_term(logits[i], logits, others[i]).mean() for i in range(4)]))
    close(dml.ce, ce_rows(logits, target).mean(1))
    teacher = min_logit_teacher(logits, target)[None]
    close(kdcl_losses(logits, target, temperature=TAU).kd, kd_means(logits, teacher, torch.ones(1)))
    pivot = torch.randn(logits.shape[1:], generator=torch.Generator().manual_seed(5))
    close(kd_losses(logits, target, pivot, temperature=TAU).kd, kd_means(logits, pivot[None], torch.ones(1)))


def test_pivot_terms_student_to_the_group_promoted_to_the_pivot():
    logits, target = random_group()
    pivot = torch.randn(logits.shape[1:], generator=torch.Generator().manual_seed(3))
    promoted = torch.tensor([0.0, 1.0, 0.0, 0.0])
    losses = pivot_orc_losses(logits, pivot, target, promoted, temperature=TAU, alpha=0.5)
    group = torch.cat([logits, pivot[None]])
    to_group = kd_means(logits, group, torch.cat([promoted, torch.ones(1)]))
    to_pivot = kd_means(logits, pivot[None], torch.ones(1))
    close(losses.kd[:4], (1 - promoted) * to_group + promoted * to_pivot)
    assert losses.kd[4] == 0  # the pivot distils from nobody
    close(losses.ce, ce_rows(group, target).mean(1))


# ---------------------------------------------------------------------------- the epoch log


def output(losses, ce, kd, roles):
    tensor = torch.tensor
    return StepOutput(tensor(losses), tensor(roles), torch.zeros(2, dtype=torch.bool), tensor(ce), tensor(kd))


def test_epoch_log_leaves_skipped_steps_out_of_the_means_and_counts_role_changes():
    log = EpochLog(2, torch.device("cpu"), keep_steps=True)
    log.add(output([1.0, 2.0], [0.5, 1.0], [0.0, 1.0], [1.0, 0.0]), torch.tensor(True), None, 0.1)
    log.add(output([float("inf"), 2.0], [9.0, 9.0], [9.0, 9.0], [0.0, 1.0]), torch.tensor(False),
            torch.tensor([1.0, 0.0]), 0.09)
    log.add(output([3.0, 4.0], [1.5, 2.0], [0.0, 3.0], [0.0, 1.0]), torch.tensor(True),
            torch.tensor([0.0, 1.0]), 0.08)
    record = log.record()
    assert record["train_loss"] == [2.0, 3.0]  # the skipped (inf) step is not averaged in
    assert record["train_ce"] == [1.0, 1.5] and record["train_kd"] == [0.0, 2.0]
    assert record["teacher_fraction"] == pytest.approx([1 / 3, 2 / 3])  # roles count on every step
    assert record["role_changes"] == pytest.approx(2 / 3)  # both flipped at step 2, none at step 3
    values = log.step_values()
    assert values.shape == (3, 4, 2) and values[1, 0].tolist() == [0.0, 0.0] and values[2, 3].tolist() == [0, 1]
    assert log.lrs == [0.1, 0.09, 0.08]


def test_warm_up_is_the_first_compiled_or_captured_steps_of_the_first_epoch_trained():
    def Args(compile, cuda_graphs):  # noqa: N802 - stands for the run's settings
        return build_config({"compile": compile, "cuda_graphs": cuda_graphs})

    assert warmup_steps(Args(True, False), start_epoch=2, epoch=2) == 1
    assert warmup_steps(Args(True, False), start_epoch=2, epoch=3) == 0
    assert warmup_steps(Args(False, True), 0, 0) == 4  # 3 eager warm-up steps and the capture
    assert warmup_steps(Args(False, False), 0, 0) == 0


# ---------------------------------------------------------------------------- a run


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("logged")
    assert main([*FAST, "--epochs", "2", "--out", str(out), "--tensorboard"]) == 0
    return out


def scalars(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_holds_the_step_and_epoch_scalars_of_metrics_json(logged_run):
    metrics = json.loads((logged_run / "metrics.json").read_text())
    board = scalars(logged_run / "tensorboard")
    steps = steps_per_epoch(metrics["config"]["train_size"], metrics["config"]["batch_size"])
    for term in ("loss", "ce", "kd", "teacher"):
        for member in range(2):
            assert [s for s, _ in board[f"step/{term}/member{member}"]] == list(range(2 * steps))
    assert len(board["step/lr"]) == 2 * steps
    for epoch in metrics["epochs"]:
        for name in ("test_acc", "val_acc", "train_ce", "train_kd", "teacher_fraction"):
            for member in range(2):
                logged = dict(board[f"epoch/{name}/member{member}"])[epoch["epoch"]]
                assert logged == pytest.approx(epoch[name][member], rel=1e-6)
        for name in ("ensemble_acc", "role_changes", "images_per_s", "lr"):
            assert dict(board[f"epoch/{name}"])[epoch["epoch"]] == pytest.approx(epoch[name], rel=1e-6)
    # The per-step CE averages to the epoch's CE.
    first_epoch = [v for s, v in board["step/ce/member0"] if s < steps]
    assert sum(first_epoch) / steps == pytest.approx(metrics["epochs"][0]["train_ce"][0], rel=1e-5)


def test_terminal_shows_ce_and_kd_apart(tmp_path, capsys):
    code, out, _ = run_main([*FAST, "--epochs", "1", "--out", str(tmp_path / "orc")], capsys)
    assert code == 0
    line = next(line for line in out.splitlines() if line.startswith("epoch   1/1"))
    assert "  ce " in line and "  kd " in line and "loss" not in line and "img/s" in line
    code, out, _ = run_main([*FAST, "--epochs", "1", "--method", "independent", "--out", str(tmp_path / "ind")],
                            capsys)
    line = next(line for line in out.splitlines() if line.startswith("epoch   1/1"))
    assert code == 0 and "  ce " in line and "  kd " not in line


# ---------------------------------------------------------------------------- curves.png


def test_one_epoch_axis_has_whole_epoch_ticks():
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots()
    axes.plot([1], [50.0])
    _epoch_axis(axes)
    figure.canvas.draw()
    ticks = [t for t in axes.get_xticks() if axes.get_xlim()[0] <= t <= axes.get_xlim()[1]]
    plt.close(figure)
    assert ticks and all(float(t).is_integer() for t in ticks)


def test_curves_draw_for_orc_a_baseline_and_an_old_metrics_file(logged_run, tmp_path):
    metrics = json.loads((logged_run / "metrics.json").read_text())
    assert (logged_run / "curves.png").read_bytes()[:4] == b"\x89PNG"
    baseline = json.loads(json.dumps(metrics))
    baseline["config"]["method"] = "independent"
    plot_metrics(baseline, tmp_path / "baseline.png")
    old = json.loads(json.dumps(metrics))  # written before the terms were logged apart
    for epoch in old["epochs"]:
        del epoch["train_ce"], epoch["train_kd"]
    plot_metrics(old, tmp_path / "old.png")
    for name in ("baseline.png", "old.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def test_kd_term_helper_is_the_plain_definition():
    # The tests above lean on test_orc.kd_term; pin it to F.kl_div once.
    logits, _ = random_group()
    expected = F.kl_div(F.log_softmax(logits[0] / TAU, -1), F.softmax(logits[1] / TAU, -1), reduction="none").sum(-1)
    close(kd_term(logits[0].double(), logits[1:2], torch.ones(1)), expected)
