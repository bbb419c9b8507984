"""The loss contract (docs/design.md §3) on every backend that runs on the CPU here.

Each case draws fresh random inputs (seed printed on failure) and compares the backend
with float64 math differentiated by autograd.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import CPU_BACKENDS
from kd_check import actual, check_backend, compare, compiled_step_matches_eager, expected, make_logits, make_target

import orc_fast
from orc_fast import GroupKDLoss, group_kd
from orc_fast.backends import BackendUnavailableError, resolve_backend

CLASSES = (1, 2, 10, 100, 1000, 4097)
BATCHES = (1, 7, 128)


def _shape_grid():
    """Every C with every B; S, G and tau rotate so each value meets many others."""
    cases = []
    for i, classes in enumerate(CLASSES):
        for j, batch in enumerate(BATCHES):
            k = i * len(BATCHES) + j
            cases.append((1 + k % 3, (1, 2, 4)[(k // 3) % 3], batch, classes, (1.0, 4.0)[k % 2]))
    return cases


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    return request.param


@pytest.mark.parametrize("students,num_teachers,batch,classes,temperature", _shape_grid())
def test_matches_float64_across_shapes(backend, generator, students, num_teachers, batch, classes, temperature):
    student = make_logits((students, batch, classes), generator)
    teachers = make_logits((num_teachers, batch, classes), generator)
    target = make_target(batch, classes, generator)
    check_backend(backend, student, teachers, target, temperature=temperature)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("student_rank", [2, 3])
def test_reductions_and_upstream_gradient(backend, generator, reduction, student_rank):
    shape = (5, 33) if student_rank == 2 else (2, 5, 33)
    student = make_logits(shape, generator)
    teachers = make_logits((3, 5, 33), generator)
    target = make_target(5, 33, generator, ignore_fraction=0.3)
    target[0] = 4  # at least one counted row
    upstream = torch.rand(shape[:-1], generator=generator) if reduction == "none" else None
    got, _ = check_backend(backend, student, teachers, target, upstream=upstream, reduction=reduction)
    assert got["loss"].shape == (shape[:-1] if reduction == "none" else ())


def test_teacher_weights_alpha_and_ignore_index(backend, generator):
    student = make_logits((3, 64, 50), generator)
    teachers = [make_logits((64, 50), generator) for _ in range(4)]
    target = make_target(64, 50, generator, ignore_fraction=0.25, ignore_index=7)
    target[target == 7] = 8  # class 7 is the ignore marker here, never a real target
    target[:10] = 7
    check_backend(backend, student, teachers, target, teacher_weights=[0.5, 2.0, 0.0, 1.5],
                  alpha=[0.0, 0.3, 1.0], ignore_index=7, temperature=2.5)


@pytest.mark.parametrize("rule", orc_fast.ERROR_RULES)
def test_error_rules_with_members(backend, generator, rule):
    # few classes so students are often right and the rules disagree with each other
    student = make_logits((4, 200, 3), generator)
    teachers = make_logits((2, 200, 3), generator)
    target = make_target(200, 3, generator, ignore_fraction=0.1)
    check_backend(backend, student, teachers, target, error_rule=rule, error_members=[1, 0, 1, 1])


def test_masks_follow_argmax(backend, generator):
    student = make_logits((3, 100, 5), generator)
    teachers = make_logits((2, 100, 5), generator)
    target = make_target(100, 5, generator)
    result = group_kd(student, teachers, target, backend=backend, error_rule="any")
    assert torch.equal(result.student_correct, student.argmax(-1) == target)
    assert torch.equal(result.teacher_correct, teachers.argmax(-1) == target)
    assert torch.equal(result.error_mask, (student.argmax(-1) != target).any(0))


def test_non_contiguous_inputs(backend, generator):
    wide = make_logits((2, 40, 70), generator)
    student = wide[:, ::2, :]  # strided rows
    teachers = make_logits((30, 3, 70), generator).permute(1, 0, 2)[:, :20]  # [G, B, C] from [B, G, C]
    target = make_target(20, 70, generator)
    assert not student.is_contiguous() and not teachers.is_contiguous()
    check_backend(backend, student, teachers, target)
    class_strided = make_logits((2, 20, 140), generator)[..., ::2]
    check_backend(backend, class_strided, teachers, target)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(backend, generator, dtype):
    student = make_logits((2, 16, 300), generator, dtype=dtype)
    teachers = make_logits((2, 16, 300), generator, dtype=dtype)
    target = make_target(16, 300, generator)
    got, _ = check_backend(backend, student, teachers, target)
    assert got["grad"].dtype == dtype and got["loss"].dtype == torch.float32


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_extreme_logits(backend, generator, temperature):
    batch, classes = 12, 257
    pick = torch.randint(0, 3, (3, batch, classes), generator=generator)
    values = torch.tensor([-1e4, 1e4, 0.0])[pick] + torch.randn(3, batch, classes, generator=generator)
    student, teachers = values[:2].contiguous(), values[2:].contiguous()
    target = make_target(batch, classes, generator)
    check_backend(backend, student, teachers, target, temperature=temperature)


def test_minus_inf_classes(backend, generator):
    batch, classes = 9, 40
    student = make_logits((2, batch, classes), generator)
    teachers = make_logits((3, batch, classes), generator)
    target = make_target(batch, classes, generator)
    dead = torch.rand(batch, classes, generator=generator) < 0.3
    dead[torch.arange(batch), target] = False  # the true class stays possible
    student[:, dead] = -math.inf
    teachers[:, dead] = -math.inf
    teachers[0, ~dead] = -math.inf  # a teacher sure of nothing the others allow: p̄ falls back on the rest
    teachers[0, torch.arange(batch), target] = 0.0
    got, _ = check_backend(backend, student, teachers, target)
    assert torch.isfinite(got["loss"]) and torch.isfinite(got["grad"]).all()


def test_hinton_kd_equivalence(backend, generator):
    tau, alpha = 4.0, 0.9
    student = make_logits((32, 100), generator)
    teacher = make_logits((32, 100), generator)
    target = make_target(32, 100, generator)
    loss = GroupKDLoss(temperature=tau, alpha=alpha, backend=backend)(student, teacher[None], target)
    hinton = (1 - alpha) * F.cross_entropy(student, target) + alpha * tau**2 * F.kl_div(
        F.log_softmax(student / tau, -1), F.softmax(teacher / tau, -1), reduction="batchmean")
    torch.testing.assert_close(loss, hinton, rtol=1e-6, atol=1e-6)


def test_teachers_get_no_gradient(backend, generator):
    student = make_logits((2, 8, 10), generator).requires_grad_(True)
    teachers = make_logits((2, 8, 10), generator).requires_grad_(True)
    target = make_target(8, 10, generator)
    group_kd(student, teachers, target, backend=backend).loss.backward()
    assert student.grad is not None and teachers.grad is None


def test_opcheck(backend, generator):
    """torch.library's own checks of schema, fake and autograd registrations."""
    if backend == "triton":
        pytest.skip("fake-tensor tracing of an interpreted Triton kernel is impossible; a GPU test covers it")
    from orc_fast.backends import op_for
    student = make_logits((2, 6, 11), generator).requires_grad_(True)
    teachers = make_logits((3, 6, 11), generator)
    target = make_target(6, 11, generator)
    args = (student, teachers, target, torch.full((3,), 1 / 3), torch.full((2,), 0.9), torch.ones(2), 4.0, -100, 0)
    torch.library.opcheck(op_for(backend), args)


@pytest.mark.slow
def test_compile_fullgraph(backend, generator):
    if backend == "triton":
        pytest.skip("torch.compile cannot trace a Triton kernel run by the interpreter; a GPU test covers it")
    torch.manual_seed(0)
    x = torch.randn(3, 8, 16, generator=generator)
    teachers, target = make_logits((2, 8, 10), generator), make_target(8, 10, generator)
    compiled_step_matches_eager(backend, torch.nn.Linear(16, 10), x, teachers, target,
                                loss_tol=(1e-6, 1e-6), grad_tol=(1e-5, 1e-6))


# --- dispatch and bad input ----------------------------------------------------------


def test_auto_picks_fastest_built_backend():
    chosen = resolve_backend("auto", torch.device("cpu"))
    assert chosen == ("cpu" if "cpu" in CPU_BACKENDS else "reference")


def test_env_overrides_auto(monkeypatch):
    monkeypatch.setenv("ORC_FAST_BACKEND", "reference")
    assert resolve_backend("auto", torch.device("cpu")) == "reference"
    monkeypatch.setenv("ORC_FAST_BACKEND", "bogus")
    with pytest.raises(ValueError, match="ORC_FAST_BACKEND"):
        resolve_backend("auto", torch.device("cpu"))


def test_unusable_backend_names_what_is_missing():
    with pytest.raises(BackendUnavailableError, match="CUDA"):
        resolve_backend("cuda", torch.device("cpu"))


def _good(generator):
    return make_logits((2, 4, 5), generator), make_logits((3, 4, 5), generator), make_target(4, 5, generator)


BAD_INPUTS = {
    "mismatched B": (lambda s, t, y: (s, t[:, :3], y), {}, "teachers"),
    "mismatched C": (lambda s, t, y: (s, t[..., :4], y), {}, "teachers"),
    "student rank": (lambda s, t, y: (s[0, 0], t, y), {}, "student"),
    "teacher rank 1": (lambda s, t, y: (s, t[0, 0], y), {}, "teachers"),
    "teacher rank 4": (lambda s, t, y: (s, t[None], y), {}, "teachers"),
    "no teachers": (lambda s, t, y: (s, [], y), {}, "teachers"),
    "G = 0": (lambda s, t, y: (s, t[:0], y), {}, "teachers"),
    "float target": (lambda s, t, y: (s, t, y.float()), {}, "target"),
    "target shape": (lambda s, t, y: (s, t, y[:3]), {}, "target"),
    "target range": (lambda s, t, y: (s, t, torch.tensor([0, 1, 5, 2])), {}, "target"),
    "negative target": (lambda s, t, y: (s, t, torch.tensor([0, 1, -3, 2])), {}, "target"),
    "teacher dtype": (lambda s, t, y: (s, t.double(), y), {}, "teachers"),
    "temperature 0": (lambda s, t, y: (s, t, y), {"temperature": 0.0}, "temperature"),
    "temperature < 0": (lambda s, t, y: (s, t, y), {"temperature": -1.0}, "temperature"),
    "alpha > 1": (lambda s, t, y: (s, t, y), {"alpha": 1.5}, "alpha"),
    "alpha < 0": (lambda s, t, y: (s, t, y), {"alpha": -0.1}, "alpha"),
    "reduction": (lambda s, t, y: (s, t, y), {"reduction": "avg"}, "reduction"),
    "backend": (lambda s, t, y: (s, t, y), {"backend": "tpu"}, "backend"),
    "error rule": (lambda s, t, y: (s, t, y), {"error_rule": "most"}, "error_rule"),
    "weights length": (lambda s, t, y: (s, t, y), {"teacher_weights": [1.0, 1.0]}, "teacher_weights"),
    "negative weight": (lambda s, t, y: (s, t, y), {"teacher_weights": [1.0, -1.0, 1.0]}, "teacher_weights"),
    "zero weights": (lambda s, t, y: (s, t, y), {"teacher_weights": [0.0, 0.0, 0.0]}, "teacher_weights"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_names_the_argument(generator, case):
    transform, options, argument = BAD_INPUTS[case]
    student, teachers, target = transform(*_good(generator))
    with pytest.raises(ValueError, match=argument):
        group_kd(student, teachers, target, **options)


@pytest.mark.parametrize("options,argument", [
    ({"temperature": 0}, "temperature"), ({"alpha": 2}, "alpha"),
    ({"reduction": "max"}, "reduction"), ({"backend": "gpu"}, "backend"),
])
def test_module_rejects_bad_configuration(options, argument):
    with pytest.raises(ValueError, match=argument):
        GroupKDLoss(**options)


def test_float64_truth_is_self_consistent(generator):
    """The checker itself: the reference backend's closed-form gradient equals autograd's."""
    student = make_logits((2, 6, 9), generator)
    teachers = make_logits((2, 6, 9), generator)
    target = make_target(6, 9, generator)
    compare(actual("reference", student, teachers, target), expected(student, teachers, target))



def test_backward_twice_through_one_loss(backend, generator):
    """retain_graph and per-student autograd.grad through one loss call both work."""
    student = make_logits((2, 8, 10), generator).requires_grad_(True)
    teachers = make_logits((2, 8, 10), generator)
    target = make_target(8, 10, generator)
    per_student = group_kd(student, teachers, target, backend=backend, reduction="none").loss.sum(1)
    first = torch.autograd.grad(per_student[0], student, retain_graph=True)[0]
    second = torch.autograd.grad(per_student[1], student, retain_graph=True)[0]
    both = torch.autograd.grad(per_student.sum(), student)[0]
    torch.testing.assert_close(first + second, both)
    assert first[1].abs().max() == 0 and second[0].abs().max() == 0
