"""The ORC step and the baselines (orc_fast/methods/, roles.py, group_step.py), on crafted tensors and tiny models."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from orc_fast import methods
from orc_fast.group_step import GroupStep, StepConfig, preserved_buffers
from orc_fast.masked_sgd import masked_sgd_step
from orc_fast.methods import loss_form
from orc_fast.methods.dml import dml_losses
from orc_fast.methods.independent import independent_losses
from orc_fast.methods.kdcl import kdcl_losses, min_logit_teacher
from orc_fast.methods.orc_peer import orc_losses
from orc_fast.roles import ScoreTracker, assign_roles, batch_scores

TAU, ALPHA, LAMBDA = 4.0, 0.9, 1.5


def kd_term(student, teachers, weights, tau=TAU):
    """KL(sum_g w_g softmax(t_g / tau) || softmax(s / tau)) per sample, float64, with grad in student."""
    p = (weights[:, None, None] * F.softmax(teachers.double() / tau, -1)).sum(0) / weights.sum()
    return (p * (p.log() - F.log_softmax(student / tau, -1))).sum(-1)


def ce_rows(logits, target):
    members, batch, classes = logits.shape
    return F.cross_entropy(logits.reshape(-1, classes), target.repeat(members), reduction="none").view(members, batch)


# ---------------------------------------------------------------------------- roles


def test_roles_pick_the_k_lowest_scores():
    scores = torch.tensor([0.5, 0.1, 0.9, 0.3])
    assert assign_roles(scores, 1).tolist() == [0, 1, 0, 0]
    assert assign_roles(scores, 2).tolist() == [0, 1, 0, 1]
    assert assign_roles(scores, 3).tolist() == [1, 1, 0, 1]
    assert assign_roles(scores, 2).dtype == torch.float32


def test_roles_break_ties_by_member_index():
    assert assign_roles(torch.tensor([0.2, 0.2, 0.2, 0.2]), 2).tolist() == [1, 1, 0, 0]
    assert assign_roles(torch.tensor([0.3, 0.2, 0.2, 0.1]), 2).tolist() == [0, 1, 0, 1]


def test_ties_rotate_from_tie_start_and_never_outrank_a_better_score():
    tied = torch.tensor([0.2, 0.2, 0.2, 0.2])
    assert assign_roles(tied, 2, tie_start=torch.tensor(0.0)).tolist() == [1, 1, 0, 0]
    assert assign_roles(tied, 2, tie_start=torch.tensor(1.0)).tolist() == [0, 1, 1, 0]
    assert assign_roles(tied, 2, tie_start=torch.tensor(3.0)).tolist() == [1, 0, 0, 1]
    assert assign_roles(tied, 2, tie_start=torch.tensor(6.0)).tolist() == [0, 0, 1, 1]  # wraps around
    # Member 0's better score wins whatever the rotation; the tie for the second place rotates.
    scores = torch.tensor([0.1, 0.2, 0.2, 0.2])
    assert assign_roles(scores, 2, tie_start=torch.tensor(2.0)).tolist() == [1, 0, 1, 0]
    assert assign_roles(scores, 2, tie_start=torch.tensor(0.0)).tolist() == [1, 1, 0, 0]


def test_promotion_and_demotion_follow_the_current_batch():
    tracker = ScoreTracker(4, momentum=0.0, device="cpu")
    first = assign_roles(tracker.update(torch.tensor([0.1, 0.2, 0.8, 0.9])), 2)
    assert first.tolist() == [1, 1, 0, 0]
    # Member 3 now ranks best and member 1 worst: 3 is promoted, 1 demoted.
    second = assign_roles(tracker.update(torch.tensor([0.3, 0.95, 0.8, 0.05])), 2)
    assert second.tolist() == [1, 0, 0, 1]


def test_rank_momentum_delays_the_role_change():
    tracker = ScoreTracker(2, momentum=0.9, device="cpu")
    # Bias correction: the first update is exactly the first batch's scores.
    torch.testing.assert_close(tracker.update(torch.tensor([0.2, 1.0])), torch.tensor([0.2, 1.0]))
    # One good batch for member 1 is not enough to overtake member 0's average ...
    assert assign_roles(tracker.update(torch.tensor([0.6, 0.1])), 1).tolist() == [1, 0]
    # ... a run of them is.
    for _ in range(10):
        roles = assign_roles(tracker.update(torch.tensor([0.6, 0.1])), 1)
    assert roles.tolist() == [0, 1]


def test_score_tracker_state_round_trip():
    tracker = ScoreTracker(3, momentum=0.5, device="cpu")
    tracker.update(torch.tensor([1.0, 2.0, 3.0]))
    clone = ScoreTracker(3, momentum=0.5, device="cpu")
    clone.load_state_dict(tracker.state_dict())
    scores = torch.tensor([0.5, 0.5, 0.5])
    torch.testing.assert_close(clone.update(scores), tracker.update(scores))
    with pytest.raises(ValueError):
        ScoreTracker(2, 0.5, "cpu").load_state_dict(tracker.state_dict())


def test_batch_scores_are_mean_cross_entropy_without_grad():
    logits = torch.randn(3, 8, 5, requires_grad=True)
    target = torch.randint(0, 5, (8,))
    scores = batch_scores(logits, target, "ce")
    assert not scores.requires_grad
    expected = torch.stack([F.cross_entropy(logits[i], target) for i in range(3)]).detach()
    torch.testing.assert_close(scores, expected)


def test_accuracy_scores_are_the_fraction_wrong_without_grad():
    logits = torch.zeros(2, 4, 3)
    logits[0, :, 0] = 1.0  # member 0 always says class 0
    logits[1, torch.arange(4), torch.tensor([1, 1, 2, 0])] = 5.0
    target = torch.tensor([0, 1, 2, 2])
    scores = batch_scores(logits.requires_grad_(), target, "accuracy")
    assert not scores.requires_grad
    assert scores.tolist() == [0.75, 0.5]
    with pytest.raises(ValueError, match="rank_by"):
        batch_scores(logits, target, "loss")


def test_rank_by_accuracy_ignores_confidence_where_ce_does_not():
    """A confident member and a soft one with the same predictions: CE ranks the confident
    one first every time; the accuracy score ties them and the tie rotates with the step."""
    target = torch.tensor([0, 1, 2, 0])
    confident = F.one_hot(target, 3).float() * 6.0  # every member right on every image
    logits = torch.stack([confident * 0.2, confident, confident * 0.2, confident])  # soft, sharp, soft, sharp
    ce = batch_scores(logits, target, "ce")
    assert assign_roles(ce, 2).tolist() == [0, 1, 0, 1]
    tracker = ScoreTracker(4, 0.0, "cpu")
    teachers = torch.zeros(4)
    for _ in range(4):
        teachers += assign_roles(tracker.update(batch_scores(logits, target, "accuracy")), 2, tie_start=tracker.steps)
    assert teachers.tolist() == [2, 2, 2, 2]


# ---------------------------------------------------------------------------- error images


def crafted_group():
    """5 members, 4 samples, 3 classes; members 0, 1 teachers; 2, 3, 4 students.

    Students' argmax per sample (target 0 everywhere):
      sample 0: all right;  sample 1: one wrong;  sample 2: two wrong;  sample 3: all wrong.
    """
    right, wrong = [4.0, 0.0, 0.0], [0.0, 4.0, 0.0]
    students = [
        [right, wrong, wrong, wrong],
        [right, right, wrong, wrong],
        [right, right, right, wrong],
    ]
    teachers = [[wrong] * 4, [wrong] * 4]  # teachers' mistakes never make error images
    logits = torch.tensor(teachers + students)
    return logits, torch.zeros(4, dtype=torch.long), torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0])


@pytest.mark.parametrize(
    "rule, expected",
    [("any", [0, 1, 1, 1]), ("all", [0, 0, 0, 1]), ("majority", [0, 0, 1, 1]), ("ensemble", [0, 0, 1, 1])],
)
def test_error_mask_is_judged_over_the_students(rule, expected):
    logits, target, roles = crafted_group()
    losses = orc_losses(logits, target, roles, error_rule=rule)
    assert losses.error_mask.tolist() == [bool(e) for e in expected]


def test_error_mask_follows_the_roles():
    logits, target, _ = crafted_group()
    # With member 2 (the student that errs most) promoted, only members 3, 4 are judged.
    roles = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0])
    losses = orc_losses(logits, target, roles, error_rule="any")
    # member 1 (wrong everywhere) is a student now, so every sample is an error image
    assert losses.error_mask.tolist() == [True, True, True, True]
    roles = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0])
    assert orc_losses(logits, target, roles, error_rule="any").error_mask.tolist() == [False, False, True, True]


# ---------------------------------------------------------------------------- gradients


def random_group(members=4, batch=12, classes=7, seed=0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(members, batch, classes, generator=generator) * 2
    target = torch.randint(0, classes, (batch,), generator=generator)
    return logits, target


@pytest.mark.parametrize("rule", ["any", "all", "majority", "ensemble"])
def test_orc_losses_match_the_definition(rule):
    logits, target = random_group()
    roles = torch.tensor([0.0, 1.0, 1.0, 0.0])
    z = logits.clone().requires_grad_()
    losses = orc_losses(z, target, roles, temperature=TAU, alpha=ALPHA, error_weight=LAMBDA, error_rule=rule)
    grad, = torch.autograd.grad(losses.total, z)

    z64 = logits.double().requires_grad_()
    ce = ce_rows(z64, target)
    err = losses.error_mask.double()
    batch_size = logits.shape[1]
    kl = kd_term(z64, logits, roles.double())
    expected = []
    for i in range(4):
        if roles[i]:  # teacher: CE on the batch + lambda * CE on the error images, both over B
            expected.append(ce[i].mean() + LAMBDA * (err * ce[i]).sum() / batch_size)
        else:  # student: (1 - alpha) CE + alpha tau^2 KL to the teachers' mean
            expected.append(((1 - ALPHA) * ce[i] + ALPHA * TAU**2 * kl[i]).mean())
    expected = torch.stack(expected)
    expected_grad, = torch.autograd.grad(expected.sum(), z64)
    torch.testing.assert_close(losses.per_member.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-5, atol=1e-6)


def test_teacher_gradient_comes_only_from_ce_terms():
    logits, target = random_group()
    roles = torch.tensor([1.0, 0.0, 1.0, 0.0])
    z = logits.clone().requires_grad_()
    grad, = torch.autograd.grad(orc_losses(z, target, roles, error_weight=LAMBDA).total, z)
    # Moving the other teacher's logits changes the students' KD target but not a
    # teacher's gradient (its loss has no KD term), as long as the error images stay.
    shifted = logits.clone()
    shifted[2] += torch.randn_like(shifted[2])
    z2 = shifted.requires_grad_()
    grad2, = torch.autograd.grad(orc_losses(z2, target, roles, error_weight=LAMBDA).total, z2)
    torch.testing.assert_close(grad[0], grad2[0])
    # A teacher's gradient is a combination of (softmax - onehot) rows: pure CE.
    softmax_minus_onehot = F.softmax(logits[0], -1) - F.one_hot(target, logits.shape[-1])
    ratio = grad[0] / softmax_minus_onehot
    assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio), rtol=1e-4, atol=1e-6)
    # ... while a student's depends on the teachers (CE + KD).
    assert not torch.allclose(grad[1], grad2[1])


def test_member_gradients_are_independent():
    logits, target = random_group()
    roles = torch.tensor([0.0, 1.0, 0.0, 1.0])
    z = logits.clone().requires_grad_()
    total_grad, = torch.autograd.grad(orc_losses(z, target, roles).total, z)
    for i in range(4):
        z_i = logits.clone().requires_grad_()
        own, = torch.autograd.grad(orc_losses(z_i, target, roles).per_member[i], z_i)
        torch.testing.assert_close(own[i], total_grad[i])
        assert torch.count_nonzero(own[torch.arange(4) != i]) == 0


def test_one_error_image_weighs_lambda_over_batch():
    """The error term is a sum over the error images divided by B: one error image adds
    lambda/B of its CE, never as much as the whole batch."""
    classes, batch_size = 3, 8
    target = torch.arange(batch_size) % classes
    logits = (F.one_hot(target, classes).float() * 5).expand(4, -1, -1).clone()
    logits[2:, 0] = torch.tensor([0.0, 5.0, 0.0])  # both students get image 0 wrong
    logits[2:, 0, target[0]] = 0.0
    roles = torch.tensor([1.0, 1.0, 0.0, 0.0])
    losses = orc_losses(logits, target, roles, error_weight=LAMBDA)
    assert losses.error_mask.tolist() == [True] + [False] * (batch_size - 1)
    ce = ce_rows(logits, target)
    torch.testing.assert_close(losses.per_member[0], ce[0].mean() + LAMBDA * ce[0, 0] / batch_size)


def test_no_error_images_means_no_error_term():
    classes = 3
    target = torch.tensor([0, 1, 2])
    logits = (F.one_hot(target, classes).float() * 5).expand(4, -1, -1).clone()
    roles = torch.tensor([1.0, 1.0, 0.0, 0.0])
    losses = orc_losses(logits, target, roles, error_weight=10.0)
    assert not losses.error_mask.any()
    torch.testing.assert_close(losses.per_member[:2], ce_rows(logits, target)[:2].mean(1))


def test_mixed_ce_replaces_ce_in_the_error_term_only():
    logits, target = random_group()
    roles = torch.tensor([1.0, 0.0, 1.0, 0.0])
    mixed = torch.rand(4, logits.shape[1])
    plain = orc_losses(logits, target, roles, error_weight=LAMBDA)
    with_mix = orc_losses(logits, target, roles, error_weight=LAMBDA, mixed_ce=mixed)
    err = plain.error_mask.float()
    ce = ce_rows(logits, target)
    for i in (0, 2):
        torch.testing.assert_close(with_mix.per_member[i], ce[i].mean() + LAMBDA * (err * mixed[i]).mean())
    torch.testing.assert_close(with_mix.per_member[[1, 3]], plain.per_member[[1, 3]])


# ---------------------------------------------------------------------------- baselines


def test_independent_is_cross_entropy():
    logits, target = random_group()
    losses = independent_losses(logits, target)
    torch.testing.assert_close(losses.per_member, ce_rows(logits, target).mean(1))


def test_kdcl_distils_from_the_min_logit_teacher():
    logits, target = random_group()
    shifted = logits.double() - logits.double().gather(2, target.view(1, -1, 1).expand(4, -1, 1))
    teacher = shifted.min(0).values  # KDCL-MinLogit: class-wise minimum of z_i - z_i[y]
    torch.testing.assert_close(min_logit_teacher(logits, target).double(), teacher)
    z = logits.double().requires_grad_()
    kl = (F.softmax(teacher / 2.0, -1) * (F.log_softmax(teacher / 2.0, -1) - F.log_softmax(z / 2.0, -1))).sum(-1)
    expected = (ce_rows(z, target) + 2.0**2 * kl).mean(1)  # CE + tau^2 KL, tau = 2 (the defaults)
    losses = kdcl_losses(logits, target)
    torch.testing.assert_close(losses.per_member.double(), expected.detach(), rtol=1e-5, atol=1e-5)


def test_dml_defaults_are_ce_plus_kl_at_temperature_one():
    logits, target = random_group()
    z = logits.double()
    probs = F.softmax(z, -1)
    expected = []
    for i in range(4):
        mean_others = (probs.sum(0) - probs[i]) / 3
        kl = (mean_others * (mean_others.log() - F.log_softmax(z[i], -1))).sum(-1)
        expected.append((F.cross_entropy(z[i], target, reduction="none") + kl).mean())
    losses = dml_losses(logits, target)
    torch.testing.assert_close(losses.per_member.double(), torch.stack(expected), rtol=1e-5, atol=1e-5)


def test_loss_form_maps_weights_to_scale_and_alpha():
    assert loss_form(1.0, 1.0) == (2.0, 0.5)
    assert loss_form(0.1, 0.9) == pytest.approx((1.0, 0.9))
    with pytest.raises(ValueError):
        loss_form(0.0, 0.0)


def test_dml_distils_from_the_others_only():
    logits, target = random_group()
    z = logits.double().requires_grad_()
    expected = []
    for i in range(4):
        others = torch.ones(4)
        others[i] = 0
        kl = kd_term(z[i][None], logits, others)[0]
        expected.append(((1 - ALPHA) * ce_rows(z[i][None], target)[0] + ALPHA * TAU**2 * kl).mean())
    expected = torch.stack(expected)
    x = logits.clone().requires_grad_()
    losses = dml_losses(x, target, temperature=TAU, alpha=ALPHA, kd_scale=1.0)
    torch.testing.assert_close(losses.per_member.double(), expected.detach(), rtol=1e-5, atol=1e-6)
    grad, = torch.autograd.grad(losses.total, x)
    expected_grad, = torch.autograd.grad(expected.sum(), z)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- full steps


class Tiny(nn.Module):
    """A conv + BN + linear net: small enough for exact step comparisons."""

    def __init__(self, classes=5):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, classes)

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.conv(x))).mean((2, 3)))


def make_group(members=4, seed=0):
    torch.manual_seed(seed)
    models = [Tiny() for _ in range(members)]
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4) for m in models]
    return models, optimizers


def batch(seed=1, size=16):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(size, 3, 6, 6, generator=generator), torch.randint(0, 5, (size,), generator=generator)


OPTIONS = [
    {"method": "orc"},
    {"method": "orc", "error_mixup": True},
    {"method": "orc", "refresh_teachers": True},
    {"method": "orc", "refresh_teachers": True, "error_mixup": True, "rank_momentum": 0.9, "error_rule": "ensemble"},
    {"method": "orc", "rank_by": "accuracy"},
    {"method": "independent"},
    {"method": "dml"},
    {"method": "kdcl"},
]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_one_step_of_every_method_updates_every_member(options):
    models, optimizers = make_group()
    before = [copy.deepcopy(m.state_dict()) for m in models]
    step = GroupStep(models, optimizers, StepConfig(**options), "cpu", torch.Generator().manual_seed(0))
    for _ in range(2):
        out = step(*batch())
    assert out.losses.shape == (4,) and torch.isfinite(out.losses).all()
    expected_teachers = 2 if options["method"] == "orc" else 0
    assert out.roles.sum().item() == expected_teachers
    for model, state in zip(models, before):
        assert not torch.equal(model.conv.weight, state["conv.weight"])
        assert model.bn.num_batches_tracked.item() == 2  # extra forwards leave BN statistics alone


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_step_never_reads_device_values(options):
    """On the meta device any host read (.item(), bool(), .tolist()) raises: a sync_free step
    (what CUDA graphs and fullgraph compiles need) never reads one."""
    models, _ = make_group()
    models = [m.to("meta") for m in models]
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4) for m in models]
    step = GroupStep(models, optimizers, StepConfig(**options, sync_free=True), "meta", None)
    x = torch.empty(8, 3, 6, 6, device="meta")
    y = torch.empty(8, dtype=torch.long, device="meta")
    out = step(x, y)
    assert out.losses.device.type == "meta" and out.roles.shape == (4,)


def test_default_orc_step_equals_per_member_sgd_on_own_loss():
    models, optimizers = make_group()
    reference = [copy.deepcopy(m) for m in models]
    x, y = batch()
    step = GroupStep(models, optimizers, StepConfig(teacher_size=2), "cpu", None)
    out = step(x, y)
    # Reference: each member's own loss, its own backward, its own SGD step.
    logits = torch.stack([m(x) for m in reference])
    losses = orc_losses(logits, y, out.roles)
    grads = [torch.autograd.grad(losses.per_member[i], list(m.parameters()), retain_graph=True)
             for i, m in enumerate(reference)]
    for i, model in enumerate(reference):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        for p, g in zip(model.parameters(), grads[i]):
            p.grad = g
        optimizer.step()
        for p, q in zip(model.parameters(), models[i].parameters()):
            torch.testing.assert_close(p, q)


def test_refresh_teachers_matches_a_host_branching_reference():
    models, optimizers = make_group()
    reference = [copy.deepcopy(m) for m in models]
    ref_optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4) for m in reference]
    config = StepConfig(teacher_size=2, refresh_teachers=True, error_weight=LAMBDA, rank_by="ce")
    step = GroupStep(models, optimizers, config, "cpu", None)
    for seed in (1, 2, 3):
        x, y = batch(seed)
        out = step(x, y)
        # Reference with roles on the host: teachers step on CE (+ error term), then the
        # students distil from the refreshed teachers.
        logits = torch.stack([m(x) for m in reference])
        roles = assign_roles(batch_scores(logits, y, "ce"), 2)
        torch.testing.assert_close(roles, out.roles)
        teachers = [i for i in range(4) if roles[i]]
        students = [i for i in range(4) if not roles[i]]
        first = orc_losses(logits, y, roles, error_weight=LAMBDA)
        for opt in ref_optimizers:
            opt.zero_grad()
        first.per_member[teachers].sum().backward()
        for i in teachers:
            ref_optimizers[i].step()
        with torch.no_grad(), preserved_buffers(reference):
            refreshed = torch.stack([m(x) for m in reference])
        with preserved_buffers(reference):  # a fresh graph for the students (same values)
            logits = torch.stack([m(x) if i in students else refreshed[i] for i, m in enumerate(reference)])
        second = orc_losses(logits, y, roles, teacher_logits=refreshed, error_weight=LAMBDA)
        for opt in ref_optimizers:
            opt.zero_grad()
        second.per_member[students].sum().backward()
        for i in students:
            ref_optimizers[i].step()
        for model, ref in zip(models, reference):
            for (name, p), q in zip(model.state_dict().items(), ref.state_dict().values()):
                torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_masked_sgd_step_is_sgd_or_nothing():
    torch.manual_seed(0)
    for apply in (1.0, 0.0):
        a, b = nn.Linear(3, 2), nn.Linear(3, 2)
        b.load_state_dict(a.state_dict())
        opt_a = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
        opt_b = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
        start = copy.deepcopy(a.state_dict())
        for _ in range(3):
            x = torch.randn(4, 3)
            for model, opt in ((a, opt_a), (b, opt_b)):
                opt.zero_grad()
                model(x).square().sum().backward()
            opt_a.step()
            masked_sgd_step(opt_b, torch.tensor(apply))
        expected = a.state_dict() if apply else start
        for key, value in b.state_dict().items():
            torch.testing.assert_close(value, expected[key])


def test_unknown_method_is_rejected():
    models, optimizers = make_group(2)
    with pytest.raises(ValueError, match="unknown method"):
        GroupStep(models, optimizers, StepConfig(method="nope"), "cpu", None)
    assert set(methods.names()) == {"orc", "independent", "kd", "dml", "kdcl"}
    with pytest.raises(ValueError, match="unknown rank_by"):
        GroupStep(models, optimizers, StepConfig(rank_by="loss"), "cpu", None)
