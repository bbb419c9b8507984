"""Pivot mode and ``kd`` (orc_fast/methods/orc_pivot.py, orc_fast/methods/kd.py, orc_fast/pivot.py, the trainer's --pivot flags)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_orc import Tiny, batch, ce_rows, kd_term, make_group, random_group
from test_train_cli import FAST, snapshot

from orc_fast import GroupKDLoss, checkpoint
from orc_fast.group_step import GroupStep, StepConfig
from orc_fast.methods.kd import kd_losses
from orc_fast.methods.orc_pivot import pivot_orc_losses
from orc_fast.roles import assign_roles
from orc_fast.train import main

TAU, ALPHA, LAMBDA, SCALE = 4.0, 0.5, 1.5, 2.0


# ---------------------------------------------------------------------------- the losses


def test_promotion_on_crafted_scores_picks_p_students_and_never_the_pivot():
    scores = torch.tensor([0.9, 0.2, 0.5, 0.1])
    for promote, expected in ((0, [0, 0, 0, 0]), (1, [0, 0, 0, 1]), (2, [0, 1, 0, 1]), (3, [0, 1, 1, 1])):
        assert assign_roles(scores, promote).tolist() == expected
    # The pivot is not ranked at all: it is the fixed last row of the teacher group.
    logits, target = random_group(members=4)
    pivot = torch.randn(logits.shape[1:])
    losses = pivot_orc_losses(logits, pivot, target, assign_roles(scores, 1))
    assert losses.per_member.shape == (5,)


@pytest.mark.parametrize("rule", ["any", "majority", "ensemble"])
@pytest.mark.parametrize("promoted", [[0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
def test_pivot_losses_match_the_definition(rule, promoted):
    """Students distil from pivot + promoted, promoted students from the pivot alone, and the
    teacher group (promoted + pivot) adds lambda * CE over the error images / B."""
    logits, target = random_group(members=4, batch=10)
    pivot = torch.randn(logits.shape[1:]) * 2
    promoted = torch.tensor(promoted)
    z, p = logits.clone().requires_grad_(), pivot.clone().requires_grad_()
    losses = pivot_orc_losses(z, p, target, promoted, temperature=TAU, alpha=ALPHA, error_weight=LAMBDA,
                              error_rule=rule, kd_scale=SCALE, private_teaching=bool(promoted.any()))
    grads = torch.autograd.grad(losses.total, (z, p))

    z64, p64 = logits.double().requires_grad_(), pivot.double().requires_grad_()
    everyone = torch.cat([z64, p64[None]])
    ce = ce_rows(everyone, target)
    err = losses.error_mask.double()
    batch_size = logits.shape[1]
    group = torch.cat([promoted.double(), torch.ones(1, dtype=torch.float64)])
    group_kl = kd_term(z64, torch.cat([logits, pivot[None]]), group)
    pivot_kl = kd_term(z64, pivot[None], torch.ones(1, dtype=torch.float64))
    expected = []
    for i in range(4):
        if promoted[i]:
            kd = pivot_kl[i]
            intensive = LAMBDA * (err * ce[i]).sum() / batch_size
        else:
            kd, intensive = group_kl[i], 0.0
        expected.append(SCALE * ((1 - ALPHA) * ce[i] + ALPHA * TAU**2 * kd).mean() + intensive)
    expected.append(ce[4].mean() + LAMBDA * (err * ce[4]).sum() / batch_size)
    expected = torch.stack(expected)
    expected_grads = torch.autograd.grad(expected.sum(), (z64, p64))
    torch.testing.assert_close(losses.per_member.double(), expected, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_error_images_are_judged_over_the_non_promoted_students_only():
    classes = 3
    target = torch.tensor([0, 1, 2])
    right = F.one_hot(target, classes).float() * 5
    wrong = F.one_hot((target + 1) % classes, classes).float() * 5
    logits = torch.stack([wrong, right, right])  # member 0 is wrong everywhere
    pivot = wrong.clone()  # the pivot's mistakes do not count either
    promoted = torch.tensor([1.0, 0.0, 0.0])
    assert not pivot_orc_losses(logits, pivot, target, promoted).error_mask.any()
    promoted = torch.tensor([0.0, 1.0, 0.0])
    assert pivot_orc_losses(logits, pivot, target, promoted).error_mask.all()


def test_kd_equals_group_kd_loss_with_the_pivot_as_only_teacher():
    logits, target = random_group(members=3, batch=9)
    pivot = torch.randn(logits.shape[1:])
    z = logits.clone().requires_grad_()
    losses = kd_losses(z, target, pivot, temperature=4.0, alpha=0.9)
    reference = GroupKDLoss(temperature=4.0, alpha=0.9, reduction="none", backend="reference")
    z2 = logits.clone().requires_grad_()
    per_sample = reference(z2, pivot[None], target)  # [N, B]
    torch.testing.assert_close(losses.per_member, per_sample.mean(1))
    grad, = torch.autograd.grad(losses.total, z)
    grad2, = torch.autograd.grad(per_sample.mean(1).sum(), z2)
    torch.testing.assert_close(grad, grad2)


# ---------------------------------------------------------------------------- the step


def pivot_net(trains: bool):
    torch.manual_seed(9)
    pivot = Tiny()
    optimizer = torch.optim.SGD(pivot.parameters(), lr=0.1, momentum=0.9) if trains else None
    return pivot.train(trains), optimizer


ORC_PIVOT = [{"method": "orc", "promote": 1}, {"method": "orc", "promote": 2, "error_mixup": True},
             {"method": "orc", "promote": 0}]
PIVOT_STEPS = [(o, trains) for o in ORC_PIVOT for trains in (False, True)] + [({"method": "kd", "alpha": 0.9}, False)]


@pytest.mark.parametrize("options, trains", PIVOT_STEPS,
                         ids=lambda v: "-".join(f"{k}={x}" for k, x in v.items()) if isinstance(v, dict) else
                         ("refined" if v else "frozen"))
def test_pivot_step_updates_members_and_only_a_training_pivot(options, trains):
    models, optimizers = make_group(3)
    pivot, pivot_optimizer = pivot_net(trains)
    before = copy.deepcopy(pivot.state_dict())
    member_before = [copy.deepcopy(m.state_dict()) for m in models]
    step = GroupStep(models, optimizers, StepConfig(**options), "cpu", torch.Generator().manual_seed(0),
                     pivot=pivot, pivot_optimizer=pivot_optimizer)
    for _ in range(2):
        out = step(*batch())
    assert out.losses.shape == (3,) and torch.isfinite(out.losses).all()
    assert out.roles.sum().item() == options.get("promote", 0)
    for model, state in zip(models, member_before):
        assert not torch.equal(model.conv.weight, state["conv.weight"])
    changed = [not torch.equal(value, before[key]) for key, value in pivot.state_dict().items()]
    assert all(changed[:2]) if trains else not any(changed)  # a frozen pivot: weights and BN statistics kept
    assert (len(step.state_tensors()) > len(GroupStep(models, optimizers, StepConfig(), "cpu", None).state_tensors())) == trains


@pytest.mark.parametrize("options", [{"method": "orc"}, {"method": "orc", "error_mixup": True}, {"method": "kd"}])
def test_pivot_step_never_reads_device_values(options):
    models, _ = make_group(3)
    models = [m.to("meta") for m in models]
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in models]
    pivot = Tiny().to("meta")
    pivot_optimizer = torch.optim.SGD(pivot.parameters(), lr=0.1) if options["method"] == "orc" else None
    step = GroupStep(models, optimizers, StepConfig(**options, sync_free=True), "meta", None, pivot=pivot,
                     pivot_optimizer=pivot_optimizer)
    out = step(torch.empty(8, 3, 6, 6, device="meta"), torch.empty(8, dtype=torch.long, device="meta"))
    assert out.losses.device.type == "meta" and out.roles.shape == (3,)


def test_a_pivot_needs_a_method_that_uses_it():
    models, optimizers = make_group(2)
    pivot, _ = pivot_net(False)
    with pytest.raises(ValueError, match="needs a pivot"):
        GroupStep(models, optimizers, StepConfig(method="kd"), "cpu", None)
    with pytest.raises(ValueError, match="a pivot teacher works with"):
        GroupStep(models, optimizers, StepConfig(method="dml"), "cpu", None, pivot=pivot)


# ---------------------------------------------------------------------------- the trainer


@pytest.fixture(scope="module")
def pivot_run(tmp_path_factory):
    """A trained two-member run whose checkpoint serves as the pivot."""
    out = tmp_path_factory.mktemp("pivot_run")
    assert main(FAST + ["--method", "independent", "--epochs", "1", "--seed", "5", "--out", str(out)]) == 0
    return out


def test_default_pivot_member_is_the_best_on_validation(pivot_run, tmp_path, capsys):
    metrics = json.loads((pivot_run / "metrics.json").read_text())
    best = metrics["final"]["best_member"]
    assert main(FAST + ["--method", "kd", "--pivot", str(pivot_run), "--epochs", "1", "--out", str(tmp_path)]) == 0
    run = json.loads((tmp_path / "metrics.json").read_text())
    assert run["config"]["pivot_member"] == best and run["config"]["pivot"] == str(pivot_run / "best.pt")
    assert f"member {best} of" in capsys.readouterr().out
    assert 0.0 <= run["pivot"]["pivot_test_acc"] <= 1.0


def test_resume_in_pivot_mode_is_exact(pivot_run, tmp_path, capsys):
    common = FAST + ["--pivot", str(pivot_run / "latest.pt"), "--pivot-member", "1", "--epochs", "2", "--seed", "2"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(common + ["--out", str(straight)]) == 0
    assert main(common + ["--out", str(split), "--stop-after", "1"]) == 0
    assert main(common + ["--out", str(split), "--resume"]) == 0
    assert "resumed from" in capsys.readouterr().out
    a, b = checkpoint.load(straight / "latest.pt"), checkpoint.load(split / "latest.pt")
    pairs = [*zip(a["models"], b["models"]), (a["pivot"]["model"], b["pivot"]["model"])]
    for state_a, state_b in pairs:
        for key in state_a:
            assert torch.equal(state_a[key], state_b[key]), key
    assert a["pivot"]["optimizer"] is not None  # orc refines the pivot by default
    epochs = [json.loads((p / "metrics.json").read_text())["epochs"] for p in (straight, split)]
    assert [e["pivot_test_acc"] for e in epochs[0]] == [e["pivot_test_acc"] for e in epochs[1]]


def test_a_frozen_pivot_is_saved_unchanged(pivot_run, tmp_path):
    argv = FAST + ["--pivot", str(pivot_run / "latest.pt"), "--pivot-member", "0", "--freeze-pivot", "--epochs", "1"]
    assert main(argv + ["--out", str(tmp_path)]) == 0
    saved, original = checkpoint.load(tmp_path / "latest.pt"), checkpoint.load(pivot_run / "latest.pt")
    for key, value in saved["pivot"]["model"].items():
        assert torch.equal(value, original["models"][0][key]), key
    assert saved["pivot"]["optimizer"] is None


def test_pivot_lr_scale_sets_the_refined_pivots_learning_rate(pivot_run, tmp_path, capsys):
    argv = FAST + ["--pivot", str(pivot_run / "latest.pt"), "--pivot-member", "0", "--epochs", "1",
                   "--schedule", "cosine", "--lr", "0.2"]
    default, larger = tmp_path / "default", tmp_path / "larger"
    assert main(argv + ["--out", str(default)]) == 0
    assert "refined on the error images at 0.1 x the group's lr" in capsys.readouterr().out
    assert main(argv + ["--pivot-lr-scale", "0.5", "--out", str(larger)]) == 0
    assert "refined on the error images at 0.5 x the group's lr" in capsys.readouterr().out
    runs = [checkpoint.load(folder / "latest.pt") for folder in (default, larger)]
    for run, scale in zip(runs, (0.1, 0.5)):
        member_lr = run["optimizers"][0]["param_groups"][0]["lr"]
        assert member_lr > 0
        assert run["pivot"]["optimizer"]["param_groups"][0]["lr"] == pytest.approx(scale * member_lr)
        assert run["config"]["pivot_lr_scale"] == scale
        assert run["config"]["rank_by"] == "ce"  # pivot mode's default ranking score
    # The members' own lr is the schedule's either way; the smaller step moves the pivot less.
    assert runs[0]["optimizers"][0]["param_groups"][0]["lr"] == runs[1]["optimizers"][0]["param_groups"][0]["lr"]
    start = checkpoint.load(pivot_run / "latest.pt")["models"][0]
    moved = [sum((run["pivot"]["model"][k].float() - start[k].float()).norm().item() for k in start
                 if start[k].is_floating_point()) for run in runs]
    assert 0 < moved[0] < moved[1]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """An output folder with a finished run in it: bad input must leave it byte-identical."""
    out = tmp_path_factory.mktemp("finished")
    assert main(FAST + ["--epochs", "1", "--out", str(out)]) == 0
    return out


def forged_data(pivot_run: Path, path: Path, **changes) -> Path:
    """The pivot run's checkpoint with its ``data`` entry changed (or dropped: ``data=None``)."""
    state = checkpoint.load(pivot_run / "latest.pt")
    state["data"] = None if changes.get("data", True) is None else {**state["data"], **changes}
    checkpoint.save(path, {k: v for k, v in state.items() if k not in ("format", "version")})
    return path


def test_a_pivot_is_checked_against_the_runs_data_and_older_ones_by_class_count_only(pivot_run, tmp_path):
    from types import SimpleNamespace

    from orc_fast.pivot import load_pivot

    data = checkpoint.load(pivot_run / "latest.pt")["data"]
    run_data = SimpleNamespace(classes=list(data["classes"]), num_classes=10, image_size=16,
                               mean=data["mean"] + 5e-5, std=data["std"].clone())
    assert load_pivot(str(pivot_run / "latest.pt"), 0, run_data)[1]["member"] == 0  # within 1e-4: the same data
    other = SimpleNamespace(**{**vars(run_data), "image_size": 24, "std": data["std"] * 2})
    with pytest.raises(checkpoint.CheckpointError, match="16x16 images, this run's are 24x24"):
        load_pivot(str(pivot_run / "latest.pt"), 0, other)
    older = forged_data(pivot_run, tmp_path / "older.pt", data=None)  # predates the data entry
    assert load_pivot(str(older), 0, other)[1]["member"] == 0
    with pytest.raises(checkpoint.CheckpointError, match="was trained on 10 classes, this run's data has 3"):
        load_pivot(str(older), 0, SimpleNamespace(**{**vars(other), "classes": ["a", "b", "c"], "num_classes": 3}))


def pivot_bad_cases(pivot_run: Path, tmp_path: Path) -> dict:
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    other_classes = tmp_path / "other_classes.pt"
    state = checkpoint.load(pivot_run / "latest.pt")
    state["config"] = {**state["config"], "num_classes": 3}
    checkpoint.save(other_classes, {k: v for k, v in state.items() if k not in ("format", "version")})
    other_names = forged_data(pivot_run, tmp_path / "other_names.pt",
                              classes=["zero", "1", "two"] + [str(c) for c in range(3, 10)])
    data = checkpoint.load(pivot_run / "latest.pt")["data"]
    other_stats = forged_data(pivot_run, tmp_path / "other_stats.pt", mean=data["mean"] + torch.tensor([0.0, 0.01, 0.0]))
    pivot = ["--pivot", str(pivot_run / "latest.pt")]
    return {
        "missing": (["--pivot", str(tmp_path / "none.pt")], "does not exist"),
        "empty folder": (["--pivot", str(tmp_path)], "is a folder without best.pt or latest.pt"),
        "corrupt": (["--pivot", str(corrupt)], "is corrupt or not a checkpoint"),
        "class count": (["--pivot", str(other_classes)], "was trained on 3 classes, this run's data has 10"),
        "class names": (["--pivot", str(other_names)],
                        "was trained on other classes: class 0 is 'zero' there, '0' here; class 2 is 'two' there, '2' here"),
        "image size": (pivot + ["--image-size", "32"], "was trained on 16x16 images, this run's are 32x32"),
        "normalisation": (["--pivot", str(other_stats)], "was trained with other normalisation statistics: mean ("),
        "independent": (pivot + ["--method", "independent"], "--pivot works with --method orc or kd, not independent"),
        "kd without pivot": (["--method", "kd"], "--method kd distils from a pre-trained pivot"),
        "promote without pivot": (["--promote", "1"], "--promote needs --pivot"),
        "promote N": (pivot + ["--promote", "2"], "--promote must lie in [0, N-1] = [0, 1]"),
        "teacher size": (pivot + ["--teacher-size", "1"], "--teacher-size is for peer mode"),
        "member out of range": (pivot + ["--pivot-member", "7"], "--pivot-member 7 is not a member"),
        "kd unfrozen": (pivot + ["--method", "kd", "--no-freeze-pivot"], "keeps the pivot fixed"),
        "kd pivot lr": (pivot + ["--method", "kd", "--pivot-lr-scale", "0.1"], "drop --pivot-lr-scale"),
        "frozen pivot lr": (pivot + ["--freeze-pivot", "--pivot-lr-scale", "0.1"], "drop it or --freeze-pivot"),
        "pivot lr zero": (pivot + ["--pivot-lr-scale", "0"], "--pivot-lr-scale must be > 0, got 0"),
        "pivot lr without pivot": (["--pivot-lr-scale", "0.5"], "--pivot-lr-scale needs --pivot"),
    }


@pytest.mark.parametrize("case", ["missing", "empty folder", "corrupt", "class count", "class names", "image size",
                                  "normalisation", "independent", "kd without pivot",
                                  "promote without pivot", "promote N", "teacher size", "member out of range",
                                  "kd unfrozen", "kd pivot lr", "frozen pivot lr", "pivot lr zero",
                                  "pivot lr without pivot"])
def test_bad_pivot_input_is_one_line_exit_2_and_overwrites_nothing(case, pivot_run, finished_run, tmp_path, capsys):
    argv, message = pivot_bad_cases(pivot_run, tmp_path)[case]
    out = finished_run
    before = snapshot(out)
    code = main(FAST + ["--epochs", "1", "--out", str(out), "--overwrite"] + argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and message in lines[0], lines
    assert snapshot(out) == before


# ---------------------------------------------------------------------------- the error batch


@pytest.mark.parametrize("mode, options", [
    ("peer", {"method": "orc", "error_mixup": True, "teacher_size": 2}),
    ("peer", {"method": "orc", "error_mixup": True, "teacher_size": 1, "rank_momentum": 0.5, "rank_by": "ce"}),
    ("pivot refined", {"method": "orc", "promote": 1}),
    ("pivot refined", {"method": "orc", "promote": 2}),
    ("pivot frozen", {"method": "orc", "promote": 0}),
    ("pivot frozen", {"method": "orc", "promote": 1}),
])
def test_only_the_teachers_run_the_error_batch_with_the_same_result(mode, options):
    """The mixed error batch through the teacher group alone (one host read of the roles)
    trains exactly as through every member (sync_free, where the students' rows weigh 0):
    float64 parameters and momenta after three steps, and the forwards actually saved."""
    def run(sync_free):
        torch.set_default_dtype(torch.float64)
        try:
            models, optimizers = make_group(4)
            pivot, pivot_optimizer = pivot_net(mode == "pivot refined") if mode != "peer" else (None, None)
        finally:
            torch.set_default_dtype(torch.float32)
        counts = [0] * (len(models) + 1)
        for i, module in enumerate([*models, *([pivot] if pivot is not None else [])]):
            module.register_forward_hook(lambda *_, i=i: counts.__setitem__(i, counts[i] + 1))
        np.random.seed(0)
        step = GroupStep(models, optimizers, StepConfig(**options, sync_free=sync_free), "cpu",
                         torch.Generator().manual_seed(0), pivot=pivot, pivot_optimizer=pivot_optimizer)
        roles = []
        for seed in (1, 2, 3):
            x, y = batch(seed)
            roles.append(step(x.double(), y).roles)
        trained = [*models, *([pivot] if pivot is not None else [])]
        momenta = [o.state[p]["momentum_buffer"] for o in [*optimizers, *([pivot_optimizer] if pivot_optimizer else [])]
                   for p in o.param_groups[0]["params"]]
        return trained, momenta, roles, counts

    every, every_momenta, every_roles, every_counts = run(sync_free=True)
    teachers, teacher_momenta, teacher_roles, teacher_counts = run(sync_free=False)
    for a, b in zip(every_roles, teacher_roles):
        assert torch.equal(a, b)
    for a, b in zip(every, teachers):
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            torch.testing.assert_close(y, x, rtol=1e-12, atol=1e-12, msg=name)
    for a, b in zip(every_momenta, teacher_momenta):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    # Through every member: 2 forwards per member and step. Through the teachers alone: a
    # student's mixed forward is saved.
    student_steps = sum(4 - int(r.sum().item()) for r in every_roles)
    assert sum(every_counts[:4]) == 2 * 3 * 4
    assert sum(teacher_counts[:4]) == 2 * 3 * 4 - student_steps > 0
