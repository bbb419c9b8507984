"""What KD code passes to the drop-in loss (docs/design.md §3 "Inputs").

A single [B, C] teacher, numpy / 0-d tensor / Python hyperparameters, float64 logits
(gradcheck), gradients for tensor alpha and teacher weights, refused teacher weights, and
the reduction semantics -- on every backend that runs on the CPU here (triton under the
interpreter, on tiny shapes).
"""

import math

import numpy as np
import pytest
import torch
from conftest import CPU_BACKENDS
from kd_check import expected, make_logits, make_target

from orc_fast import FusedLinearGroupKDLoss, GroupKDLoss, fused_linear_group_kd, group_kd
from orc_fast.reference import group_kd_math

FLOAT64_BACKENDS = [b for b in ("reference", "cpu") if b in CPU_BACKENDS]
RESULT_FIELDS = ("loss", "kl", "ce", "student_correct", "teacher_correct", "error_mask")


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    return request.param


def _run(backend, student, teachers, target, **options):
    """group_kd's outputs and the student's gradient of sum(loss)."""
    leaf = student.detach().clone().requires_grad_(True)
    result = group_kd(leaf, teachers, target, backend=backend, **options)
    result.loss.sum().backward()
    return {**result._asdict(), "grad": leaf.grad}


def _assert_identical(got, want):
    for name, value in want.items():
        assert torch.equal(got[name], value), f"{name} differs"


# --- one teacher as a [B, C] tensor -----------------------------------------------------


@pytest.mark.parametrize("student_rank", [2, 3])
def test_one_teacher_tensor_is_one_stacked_teacher(backend, generator, student_rank):
    shape = (6, 9) if student_rank == 2 else (2, 6, 9)
    student = make_logits(shape, generator)
    teacher = make_logits((6, 9), generator)
    target = make_target(6, 9, generator, ignore_fraction=0.2)
    got = _run(backend, student, teacher, target, reduction="none")
    _assert_identical(got, _run(backend, student, teacher[None], target, reduction="none"))
    assert got["teacher_correct"].shape == (1, 6)


def test_mdistiller_style_call(generator):
    """loss(student, teacher, target) with [B, C] tensors is Hinton's KD loss."""
    student, teacher = make_logits((16, 10), generator), make_logits((16, 10), generator)
    target = make_target(16, 10, generator)
    loss = GroupKDLoss(temperature=4.0, alpha=0.9)(student, teacher, target)
    hinton = 0.1 * torch.nn.functional.cross_entropy(student, target) + 0.9 * 16 * torch.nn.functional.kl_div(
        torch.log_softmax(student / 4, -1), torch.softmax(teacher / 4, -1), reduction="batchmean")
    torch.testing.assert_close(loss, hinton, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case,teachers,match", [
    ("1-D", lambda t: t[0, 0], r"teachers must be \[G, B, C\], one teacher's \[B, C\]"),
    ("4-D", lambda t: t[None], r"teachers must be \[G, B, C\], one teacher's \[B, C\]"),
    ("list of 3-D", lambda t: [t[:1], t[1:]], r"teachers\[0\] must be \[B, C\]"),
    ("G teachers of one sample as [G, C]", lambda t: t[:, 0], "a 2-D teacher is one teacher's"),
    ("transposed", lambda t: t[0].t(), "a 2-D teacher is one teacher's"),
])
def test_ambiguous_teacher_shapes_are_refused(generator, case, teachers, match):
    student = make_logits((2, 4, 5), generator)
    target = make_target(4, 5, generator)
    with pytest.raises(ValueError, match=match):
        group_kd(student, teachers(make_logits((3, 4, 5), generator)), target)


# --- hyperparameters as Python, numpy and 0-d tensor values ---------------------------

# Values exact in fp32, so every spelling gives the same fp32 (or float64) constant.
SPELLINGS = {
    "temperature": [2.5, np.float32(2.5), np.float64(2.5), np.array(2.5), np.array([2.5]), torch.tensor(2.5),
                    torch.tensor(2.5, dtype=torch.float64)],
    "alpha": [0.25, np.float32(0.25), np.array(0.25), torch.tensor(0.25), torch.tensor([0.25])],
    "alpha per student": [[0.25, 0.75], (0.25, 0.75), np.array([0.25, 0.75]), np.array([0.25, 0.75], np.float32),
                          [np.float32(0.25), np.float64(0.75)], [torch.tensor(0.25), torch.tensor(0.75)],
                          torch.tensor([0.25, 0.75])],
    "teacher_weights": [[1, 2, 5], [1.0, 2.0, 5.0], np.array([1, 2, 5]), np.array([1, 2, 5], np.float32),
                        torch.tensor([1.0, 2.0, 5.0]), torch.tensor([1, 2, 5])],
    "one weight": [3.0, np.float32(3.0), torch.tensor(3.0)],  # a scalar weight for every teacher: uniform
    "error_members": [[1, 0], np.array([1, 0]), np.array([True, False]), torch.tensor([1.0, 0.0])],
    "ignore_index": [-1, np.int64(-1), np.int32(-1), torch.tensor(-1)],
}
OPTION = {"alpha per student": "alpha", "one weight": "teacher_weights"}


def _hyperparameter_problem(generator, dtype):
    student = make_logits((2, 5, 7), generator, dtype=dtype)
    teachers = make_logits((3, 5, 7), generator, dtype=dtype)
    target = make_target(5, 7, generator, ignore_fraction=0.3, ignore_index=-1)
    target[0] = 2  # one counted row at least
    return student, teachers, target


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", sorted(SPELLINGS))
def test_hyperparameter_spellings_give_identical_results(backend, generator, name, dtype):
    if dtype == torch.float64 and backend not in FLOAT64_BACKENDS:
        pytest.skip(f"{backend} refuses float64 (tested below)")
    student, teachers, target = _hyperparameter_problem(generator, dtype)
    option = OPTION.get(name, name)
    base = {"ignore_index": -1, "error_rule": "majority", "reduction": "none"}
    first, *others = SPELLINGS[name]
    want = _run(backend, student, teachers, target, **{**base, option: first})
    for value in others:
        got = _run(backend, student, teachers, target, **{**base, option: value})
        _assert_identical(got, want)


def test_module_takes_numpy_and_tensor_hyperparameters(generator):
    student, teachers, target = _hyperparameter_problem(generator, torch.float32)
    plain = GroupKDLoss(temperature=2.5, alpha=0.25, teacher_weights=[1, 2, 5], ignore_index=-1)
    spelled = GroupKDLoss(temperature=np.float32(2.5), alpha=torch.tensor(0.25), teacher_weights=np.array([1, 2, 5]),
                          ignore_index=np.int64(-1))
    assert torch.equal(spelled(student, teachers, target), plain(student, teachers, target))


def test_fused_linear_takes_numpy_and_tensor_hyperparameters(generator):
    hidden, weight = torch.randn(6, 4, generator=generator), torch.randn(11, 4, generator=generator)
    teacher_hidden = [torch.randn(6, 4, generator=generator) for _ in range(2)]
    teacher_weights = [torch.randn(11, 4, generator=generator) for _ in range(2)]
    target = make_target(6, 11, generator)
    problem = dict(teacher_hidden=teacher_hidden, teacher_head_weights=teacher_weights)
    plain = FusedLinearGroupKDLoss(temperature=2.5, alpha=0.25, teacher_weights=[1, 3], chunk_size=4)
    spelled = FusedLinearGroupKDLoss(temperature=np.float64(2.5), alpha=np.float32(0.25),
                                     teacher_weights=torch.tensor([1.0, 3.0]), chunk_size=4)
    assert torch.equal(spelled(hidden, weight, target, **problem), plain(hidden, weight, target, **problem))


@pytest.mark.parametrize("options,match", [
    ({"temperature": np.array([1.0, 2.0])}, "temperature"),
    ({"temperature": torch.tensor(2.0, requires_grad=True)}, "temperature gets no gradient"),
    ({"temperature": "4"}, "temperature"),
    ({"alpha": np.float64(1.5)}, "alpha"),
    ({"alpha": np.array([0.2, 1.5])}, "alpha"),
    ({"alpha": torch.tensor([0.2, -0.5])}, "alpha"),
    ({"alpha": [[0.2], [0.5]]}, "alpha"),
    ({"alpha": np.array([0.2, 0.5, 0.7])}, "alpha"),
    ({"ignore_index": 1.5}, "ignore_index"),
    ({"ignore_index": torch.tensor(-1.0)}, "ignore_index"),
    ({"error_members": np.array([2, 0])}, "error_members"),
])
def test_bad_hyperparameters_name_the_argument(generator, options, match):
    student, teachers, target = _hyperparameter_problem(generator, torch.float32)
    with pytest.raises(ValueError, match=match):
        group_kd(student, teachers, target, **{"ignore_index": -1, **options})


# --- float64 logits ---------------------------------------------------------------------


def _float64_problem(generator, shape=(2, 5, 6), num_teachers=3):
    student = make_logits(shape, generator, dtype=torch.float64)
    teachers = make_logits((num_teachers, *shape[-2:]), generator, dtype=torch.float64)
    target = make_target(shape[-2], shape[-1], generator, ignore_fraction=0.3)
    target[0] = 1
    return student, teachers, target


@pytest.mark.parametrize("backend64", FLOAT64_BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("shape", [(5, 6), (2, 5, 6)])
def test_gradcheck_student_in_float64(generator, backend64, reduction, shape):
    student, teachers, target = _float64_problem(generator, shape)
    student.requires_grad_(True)

    def loss(z):
        return group_kd(z, teachers, target, temperature=2.5, alpha=0.7, backend=backend64, reduction=reduction).loss

    assert torch.autograd.gradcheck(loss, (student,))


@pytest.mark.parametrize("backend64", FLOAT64_BACKENDS)
def test_gradcheck_alpha_and_teacher_weights_in_float64(generator, backend64):
    student, teachers, target = _float64_problem(generator)
    student.requires_grad_(True)
    alpha = torch.tensor([0.3, 0.8], dtype=torch.float64, requires_grad=True)
    weights = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64, requires_grad=True)  # normalised inside

    def loss(z, a, w):
        return group_kd(z, teachers, target, temperature=2.5, alpha=a, teacher_weights=w, backend=backend64,
                        reduction="none").loss

    assert torch.autograd.gradcheck(loss, (student, alpha, weights))
    # one alpha and one weight tensor for everybody (broadcast inside)
    assert torch.autograd.gradcheck(lambda a: loss(student, a, weights), (alpha[:1].detach().requires_grad_(),))


@pytest.mark.parametrize("backend64", FLOAT64_BACKENDS)
def test_float64_matches_float64_math(generator, backend64):
    student, teachers, target = _float64_problem(generator, (3, 8, 20), num_teachers=2)
    options = dict(temperature=3.0, alpha=[0.1, 0.5, 0.9], teacher_weights=[1.0, 3.0], error_rule="ensemble")
    got = _run(backend64, student, teachers, target, **options)
    want = expected(student, teachers, target, **options)
    for name in ("loss", "kl", "ce", "grad"):
        assert got[name].dtype == torch.float64, name
        torch.testing.assert_close(got[name], want[name], rtol=1e-12, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}")
    for name in ("student_correct", "teacher_correct", "error_mask"):
        assert torch.equal(got[name], want[name]), name


def test_cpu_and_reference_agree_in_float64(generator):
    if "cpu" not in CPU_BACKENDS:
        pytest.skip("the C++ extension is not built")
    student, teachers, target = _float64_problem(generator, (2, 9, 33))
    _assert_identical(_run("cpu", student, teachers, target, reduction="none"),
                      _run("reference", student, teachers, target, reduction="none"))
    auto = _run("auto", student, teachers, target, reduction="none")
    assert auto["loss"].dtype == torch.float64


@pytest.mark.parametrize("backend64", FLOAT64_BACKENDS)
def test_float64_backward_of_a_vocabulary_sized_gradient(generator, backend64):
    """Large CPU gradients are scaled by a C++ helper in backward that takes the kernels'
    dtypes only; float64 must take the plain product."""
    from orc_fast.ops import HUGE_PAGE_NUMEL
    classes = HUGE_PAGE_NUMEL // 64
    student = make_logits((64, classes), generator, dtype=torch.float64)
    teacher, target = make_logits((64, classes), generator, dtype=torch.float64), make_target(64, classes, generator)
    got = _run(backend64, student, teacher, target)
    want = expected(student, teacher, target)
    torch.testing.assert_close(got["grad"], want["grad"], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("fp32_backend", ["triton", "cuda"])
def test_fp32_kernels_refuse_float64_naming_the_backend(generator, fp32_backend):
    student, teachers, target = _float64_problem(generator)
    with pytest.raises(ValueError, match=f"backend '{fp32_backend}' does not take float64"):
        group_kd(student, teachers, target, backend=fp32_backend)


def test_fused_linear_still_refuses_float64(generator):
    hidden = torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="student_hidden must be float32, float16 or bfloat16"):
        fused_linear_group_kd(hidden, torch.randn(5, 3, dtype=torch.float64), torch.zeros(4, dtype=torch.long),
                              teacher_hidden=[hidden], teacher_head_weights=[torch.randn(5, 3, dtype=torch.float64)])


# --- alpha and teacher-weight gradients on every backend --------------------------------


def test_alpha_and_teacher_weight_gradients_match_float64(backend, generator):
    student = make_logits((2, 6, 12), generator)
    teachers = make_logits((3, 6, 12), generator)
    target = make_target(6, 12, generator, ignore_fraction=0.3)
    target[0] = 3
    ruled_out = torch.zeros(6, 12, dtype=torch.bool)
    ruled_out[1, 5] = ruled_out[2, 7] = True  # classes nobody gives mass: 0 log 0 = 0
    ruled_out[torch.arange(6), target.clamp(min=0)] = False
    student[:, ruled_out] = -math.inf
    teachers[:, ruled_out] = -math.inf
    upstream = torch.rand(2, 6, generator=generator)
    alpha = torch.tensor([0.4, 0.9], requires_grad=True)
    weights = torch.tensor([1.0, 0.5, 2.5], requires_grad=True)
    loss = group_kd(student, teachers, target, temperature=2.0, alpha=alpha, teacher_weights=weights,
                    backend=backend, reduction="none").loss
    (loss * upstream).sum().backward()

    # The truth's autograd through torch.where turns -inf into NaN gradients; a logit of
    # -1e4 has exactly zero probability in float64 too, and a finite autograd.
    alpha64 = alpha.detach().double().requires_grad_(True)
    weights64 = weights.detach().double().requires_grad_(True)
    finite = [torch.where(torch.isinf(z), -1e4, z).double() for z in (student, teachers)]
    loss64 = group_kd_math(*finite, target, weights64 / weights64.sum(), alpha64, torch.ones(2), 2.0, -100, 0)[0]
    (loss64 * upstream.double()).sum().backward()
    assert torch.isfinite(alpha.grad).all() and torch.isfinite(weights.grad).all()
    torch.testing.assert_close(alpha.grad.double(), alpha64.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(weights.grad.double(), weights64.grad, rtol=1e-5, atol=1e-5)


def test_student_only_backward_keeps_no_logits(generator):
    """Without alpha/weight gradients nothing but the per-sample gradient is saved."""
    student = make_logits((2, 4, 5), generator).requires_grad_(True)
    loss = group_kd(student, make_logits((2, 4, 5), generator), make_target(4, 5, generator), backend="reference").loss
    saved = [t for t in _saved_tensors(loss.grad_fn) if t is not None]
    assert [tuple(t.shape) for t in saved] == [(2, 4, 5)]


def _saved_tensors(grad_fn):
    """The tensors saved by the group-KD op's node, found below the reduction."""
    stack, seen = [grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if hasattr(node, "saved_tensors"):
            return node.saved_tensors
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    raise AssertionError("no custom-op node in the graph")


@pytest.mark.parametrize("dtype,backend_name", [(torch.float32, b) for b in FLOAT64_BACKENDS]
                         + [(torch.float64, b) for b in FLOAT64_BACKENDS])
def test_opcheck_with_alpha_and_weight_gradients(generator, dtype, backend_name):
    """torch.library's checks of the ops' fake and autograd with every input differentiable."""
    from orc_fast.backends import op_for
    vectors = torch.float64 if dtype == torch.float64 else torch.float32
    student = make_logits((2, 6, 11), generator, dtype=dtype).requires_grad_(True)
    weights = torch.full((3,), 1 / 3, dtype=vectors, requires_grad=True)
    alpha = torch.tensor([0.2, 0.9], dtype=vectors, requires_grad=True)
    args = (student, make_logits((3, 6, 11), generator, dtype=dtype), make_target(6, 11, generator), weights, alpha,
            torch.ones(2, dtype=vectors), 4.0, -100, 0)
    torch.library.opcheck(op_for(backend_name, dtype), args)


@pytest.mark.parametrize("name", ["alpha", "teacher_weights"])
def test_fused_linear_refuses_hyperparameters_that_want_gradient(generator, name):
    hidden, weight = torch.randn(4, 3, generator=generator), torch.randn(5, 3, generator=generator)
    value = torch.tensor([0.5], requires_grad=True)
    with pytest.raises(ValueError, match=f"{name} gets no gradient from the fused head"):
        fused_linear_group_kd(hidden, weight, make_target(4, 5, generator), teacher_hidden=[hidden],
                              teacher_head_weights=[weight], **{name: value})


# --- zero and negative teacher weights --------------------------------------------------

BAD_WEIGHTS = {
    "zero list": [0.0, 0.0, 0.0],
    "zero tensor": torch.zeros(3),
    "zero numpy": np.zeros(3),
    "zero scalar": 0.0,
    "zero 0-d tensor": torch.tensor(0.0),
    "negative list": [1.0, -0.5, 1.0],
    "negative tensor": torch.tensor([1.0, -0.5, 1.0]),
    "negative numpy": np.array([1.0, -0.5, 1.0]),
    "negative sum": [-1.0, -1.0, -1.0],
    "NaN tensor": torch.tensor([1.0, math.nan, 1.0]),
    "inf list": [1.0, math.inf, 1.0],
}


@pytest.mark.parametrize("case", sorted(BAD_WEIGHTS))
def test_bad_teacher_weights_are_refused(backend, generator, case):
    student, teachers, target = make_logits((2, 3, 4), generator), make_logits((3, 3, 4), generator), \
        make_target(3, 4, generator)
    with pytest.raises(ValueError, match="teacher_weights must"):
        group_kd(student, teachers, target, teacher_weights=BAD_WEIGHTS[case], backend=backend)
    with pytest.raises(ValueError, match="teacher_weights must"):
        GroupKDLoss(teacher_weights=BAD_WEIGHTS[case], backend=backend)(student, teachers, target)


def test_fused_linear_refuses_zero_tensor_weights(generator):
    hidden, weight = torch.randn(4, 3, generator=generator), torch.randn(5, 3, generator=generator)
    problem = dict(teacher_hidden=[hidden, hidden], teacher_head_weights=[weight, weight])
    with pytest.raises(ValueError, match="positive sum"):
        fused_linear_group_kd(hidden, weight, make_target(4, 5, generator), teacher_weights=torch.zeros(2), **problem)


def test_validate_false_skips_the_tensor_checks(generator):
    """The trainer's no-sync path: values in tensors are not read (documented), Python ones still are."""
    student, teachers, target = make_logits((2, 3, 4), generator), make_logits((3, 3, 4), generator), \
        make_target(3, 4, generator)
    group_kd(student, teachers, target, teacher_weights=torch.tensor([1.0, -0.5, 1.0]), validate=False)
    group_kd(student, teachers, target, alpha=torch.tensor([0.5, 2.0]), validate=False)
    hidden, weight = torch.randn(3, 2, generator=generator), torch.randn(4, 2, generator=generator)
    fused_linear_group_kd(hidden, weight, make_target(3, 4, generator), teacher_hidden=[hidden, hidden],
                          teacher_head_weights=[weight, weight], teacher_weights=torch.zeros(2), validate=False)
    with pytest.raises(ValueError, match="teacher_weights"):
        group_kd(student, teachers, target, teacher_weights=[0.0, 0.0, 0.0], validate=False)
    with pytest.raises(ValueError, match="alpha"):
        group_kd(student, teachers, target, alpha=torch.tensor([0.5, 2.0]))


# --- reduction semantics (README, docs/design.md §3) ------------------------------------


def test_mean_sums_the_students_means(backend, generator):
    student = make_logits((3, 6, 5), generator)
    teachers = make_logits((2, 6, 5), generator)
    target = make_target(6, 5, generator, ignore_fraction=0.4)
    target[0] = 1
    per_sample = group_kd(student, teachers, target, backend=backend, reduction="none").loss
    counted = (target != -100).sum()
    mean = group_kd(student, teachers, target, backend=backend, reduction="mean").loss
    total = group_kd(student, teachers, target, backend=backend, reduction="sum").loss
    one_by_one = sum(group_kd(student[s], teachers, target, backend=backend).loss for s in range(3))
    torch.testing.assert_close(mean, per_sample.sum() / counted)
    torch.testing.assert_close(mean, one_by_one)
    torch.testing.assert_close(total, per_sample.sum())


# --- CUDA tensors (skipped without a GPU) ---------------------------------------------


@pytest.mark.gpu
def test_cuda_backends_take_the_same_inputs(generator):
    from orc_fast import available_backends

    student = make_logits((2, 8, 30), generator).cuda()
    teacher = make_logits((8, 30), generator).cuda()
    target = make_target(8, 30, generator, ignore_fraction=0.2).cuda()
    want = None
    for backend in available_backends("cuda"):
        got = _run(backend, student, teacher, target, reduction="none", alpha=np.array([0.25, 0.75]))
        _assert_identical(got, _run(backend, student, teacher[None], target, reduction="none", alpha=[0.25, 0.75]))
        with pytest.raises(ValueError, match="positive sum"):
            group_kd(student, teacher, target, teacher_weights=torch.zeros(1, device="cuda"), backend=backend)
        alpha = torch.tensor([0.4, 0.9], device="cuda", requires_grad=True)
        weights = torch.tensor([1.0, 2.0], device="cuda", requires_grad=True)
        group_kd(student, torch.stack([teacher, teacher.flip(-1)]), target, alpha=alpha, teacher_weights=weights,
                 backend=backend).loss.backward()
        grads = torch.cat([alpha.grad, weights.grad]).cpu()
        want = grads if want is None else want
        torch.testing.assert_close(grads, want, rtol=1e-4, atol=1e-5)
    student64, teacher64 = student.double(), teacher.double()
    assert group_kd(student64, teacher64, target).loss.dtype == torch.float64  # auto: reference
    for backend in ("triton", "cuda"):
        with pytest.raises(ValueError, match=f"backend '{backend}' does not take float64"):
            group_kd(student64, teacher64, target, backend=backend)
