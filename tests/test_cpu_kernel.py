"""CPU-kernel specifics of orc_fast::group_kd_fused, beyond the shared suite.

test_group_kd.py runs the whole loss contract on every backend, this one included; here:
vocabulary-sized and odd class counts, 16-bit logits at scale, row strides, the NaN /
out-of-range-label policy of the raw op, every instruction-set build of the kernel, the
op's own argument checks, and its peak memory.
"""

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import CPU_BACKENDS
from kd_check import compare, expected, make_logits, make_target

from orc_fast import group_kd
from orc_fast.reference import ERROR_RULES

pytestmark = pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="the C++ CPU kernel is not built")

OUTPUTS = ("loss", "kl", "ce", "student_correct", "teacher_correct", "error_mask", "grad")
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def fused(student, teachers, target, temperature=4.0, alpha=0.9, error_rule=0, ignore_index=-100,
          teacher_weights=None, error_members=None):
    """Call the raw op: per-sample outputs and the per-sample gradient, as a dict."""
    num_students, num_teachers = student.shape[0], teachers.shape[0]
    weights = torch.full((num_teachers,), 1.0 / max(num_teachers, 1)) if teacher_weights is None else teacher_weights
    alphas = torch.full((num_students,), float(alpha)) if not isinstance(alpha, torch.Tensor) else alpha
    members = torch.ones(num_students) if error_members is None else error_members
    outputs = torch.ops.orc_fast.group_kd_fused(
        student, teachers, target, weights, alphas, members, temperature, ignore_index, error_rule)
    return dict(zip(OUTPUTS, outputs))


def truth(student, teachers, target, temperature=4.0, alpha=0.9, error_rule=0, ignore_index=-100, **options):
    """float64 outputs and d loss[s, b] / d student[s, b, :] (the raw op's contract)."""
    return expected(student, teachers, target, temperature=temperature, alpha=alpha, ignore_index=ignore_index,
                    error_rule=ERROR_RULES[error_rule], reduction="none", **options)


# --- class counts, shapes, temperatures --------------------------------------------


@pytest.mark.parametrize("classes", [1, 2, 15, 16, 17, 33, 1000, 4097])
@pytest.mark.parametrize("students,num_teachers,temperature,error_rule", [
    (1, 1, 4.0, 0), (2, 3, 1.0, 3), (3, 2, 2.5, 2), (2, 4, 10.0, 1), (2, 2, 0.5, 3),
])
def test_tails_temperatures_and_rules_match_float64(generator, classes, students, num_teachers, temperature,
                                                    error_rule):
    # class counts around the vector width exercise the masked tails; tau = 2.5, 0.5
    # and 10 the general path, tau = 1 and 4 the integer-power path
    student = make_logits((students, 9, classes), generator)
    teachers = make_logits((num_teachers, 9, classes), generator)
    target = make_target(9, classes, generator, ignore_fraction=0.2)
    members = (torch.arange(students) % 2 == 0).float()
    compare(fused(student, teachers, target, temperature, error_rule=error_rule, error_members=members),
            truth(student, teachers, target, temperature, error_rule=error_rule, error_members=members))


@pytest.mark.parametrize("classes,num_teachers", [(32000, 2), (131071, 1), (131072, 3)])
def test_vocabulary_sized_rows_match_float64(generator, classes, num_teachers):
    student = make_logits((2, 3, classes), generator)
    teachers = make_logits((num_teachers, 3, classes), generator)
    target = make_target(3, classes, generator)
    alpha = torch.tensor([0.9, 0.3])
    got = fused(student, teachers, target, alpha=alpha)
    compare(got, truth(student, teachers, target, alpha=alpha))
    for name in ("loss", "kl", "ce", "grad"):
        assert torch.isfinite(got[name]).all(), f"{name} has non-finite values on finite input"


@pytest.mark.parametrize("classes", [131072, 131071])
def test_one_dominant_logit_keeps_the_denominator_exact(generator, classes):
    """A row whose largest logit holds ~60 % of the softmax (a confident prediction over a
    vocabulary): each vector lane of the denominator takes C / lanes adds next to exp(0) = 1,
    and a plain running sum came out ~2e-5 low, putting that logit's gradient outside the
    tolerance. The kernel sums with a compensation term (csrc/cpu/group_kd_cpu_kernel.h)."""
    student = make_logits((2, 3, classes), generator)
    teachers = make_logits((2, 3, classes), generator)
    others = torch.logsumexp(student.double(), dim=-1)  # log of the rest of the row's mass
    dominant = torch.randint(0, classes, (3,), generator=generator)
    for row in range(3):
        student[:, row, dominant[row]] = (others[:, row] + 0.4).float()
        teachers[:, row, dominant[row]] = (others[:, row] + 0.4).float()
    target = make_target(3, classes, generator)
    for temperature, alpha in ((4.0, torch.tensor([0.0, 0.3])), (1.0, torch.tensor([0.9, 0.5]))):
        compare(fused(student, teachers, target, temperature, alpha=alpha),
                truth(student, teachers, target, temperature, alpha=alpha))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("classes", [1000, 32001])
def test_16bit_logits_at_scale(generator, dtype, classes):
    student = make_logits((2, 4, classes), generator, dtype)
    teachers = make_logits((2, 4, classes), generator, dtype)
    target = make_target(4, classes, generator)
    got = fused(student, teachers, target)
    assert got["grad"].dtype == dtype and got["grad"].is_contiguous()
    compare(got, truth(student, teachers, target), dtype=dtype)


# --- strides -----------------------------------------------------------------------


def test_strided_rows_give_the_contiguous_result_exactly(generator):
    classes = 1000
    wide = make_logits((2, 10, classes + 24), generator)
    student = wide[:, ::2, 5:classes + 5]  # rows 2 * (C + 24) apart, offset start
    teachers_bgc = make_logits((5, 3, classes), generator)
    teachers = teachers_bgc.permute(1, 0, 2)  # [G, B, C] with stride(0) = C, stride(1) = 3C
    target = make_target(5, classes, generator)
    assert not student.is_contiguous() and not teachers.is_contiguous()
    got = fused(student, teachers, target)
    want = fused(student.contiguous(), teachers.contiguous(), target)
    for name in OUTPUTS:
        assert torch.equal(got[name], want[name]), f"{name} depends on the input strides"
    compare(got, truth(student, teachers, target))


def test_broadcast_teacher_and_strided_classes(generator):
    student = make_logits((2, 6, 300), generator)
    one_teacher = make_logits((1, 6, 300), generator)
    target = make_target(6, 300, generator)
    expanded = fused(student, one_teacher.expand(3, 6, 300), target)  # stride 0 along G
    single = fused(student, one_teacher, target)
    torch.testing.assert_close(expanded["loss"], single["loss"], rtol=1e-6, atol=1e-6)
    # a class stride other than 1 is accepted by the raw op (it copies)
    transposed = make_logits((2, 300, 6), generator).transpose(1, 2)
    compare(fused(transposed, one_teacher, target), truth(transposed, one_teacher, target))


def test_public_loss_with_sliced_student(generator):
    base = make_logits((3, 40, 500), generator).requires_grad_(True)
    student = base[1:, 5:25]  # [2, 20, 500] view with a batch offset
    teachers = make_logits((2, 20, 500), generator)
    target = make_target(20, 500, generator, ignore_fraction=0.25)
    group_kd(student, teachers, target, backend="cpu").loss.backward()
    want = expected(student.detach(), teachers, target)
    torch.testing.assert_close(base.grad[1:, 5:25].double(), want["grad"], rtol=1e-5, atol=1e-6)
    assert torch.count_nonzero(base.grad[0]) == 0 and torch.count_nonzero(base.grad[1:, :5]) == 0


# --- NaN / inf / bad labels --------------------------------------------------------


@pytest.mark.parametrize("where,column", [("student", 3), ("student", 4096), ("teacher", 0), ("teacher", 4000)])
@pytest.mark.parametrize("bad", [math.nan, math.inf, "all -inf"])
def test_non_finite_logits_spoil_only_their_row(generator, where, column, bad):
    classes, row = 4097, 2  # column 4096 sits in the masked tail
    student = make_logits((2, 5, classes), generator)
    teachers = make_logits((2, 5, classes), generator)
    target = make_target(5, classes, generator)
    clean = fused(student, teachers, target)
    spoiled_input = student[1, row] if where == "student" else teachers[0, row]
    if bad == "all -inf":
        spoiled_input.fill_(-math.inf)
    else:
        spoiled_input[column] = bad
    got = fused(student, teachers, target)

    spoiled = torch.zeros(2, 5, dtype=torch.bool)
    if where == "student":
        spoiled[1, row] = True
    else:
        spoiled[:, row] = True
    for name in ("loss", "kl"):
        assert torch.isnan(got[name][spoiled]).all(), f"{name} of the spoiled row must be NaN"
    assert torch.isnan(got["grad"][spoiled]).all(), "the spoiled row's gradient must be NaN"
    if where == "student":
        assert torch.isnan(got["ce"][spoiled]).all()
    else:  # the students' own cross-entropy does not involve the teachers
        assert torch.equal(got["ce"], clean["ce"])
    for name in ("loss", "kl", "ce"):
        assert torch.equal(got[name][~spoiled], clean[name][~spoiled]), f"{name}: a clean row changed"
    assert torch.equal(got["grad"][~spoiled], clean["grad"][~spoiled]), "a clean row's gradient changed"
    # torch.argmax semantics: the first NaN, else the first +inf, is the maximum
    network = got["student_correct"][1] if where == "student" else got["teacher_correct"][0]
    argmax = 0 if bad == "all -inf" else column
    assert network[row].item() == (target[row].item() == argmax)


def test_minus_inf_classes_stay_finite(generator):
    student = make_logits((2, 4, 70), generator)
    teachers = make_logits((2, 4, 70), generator)
    target = make_target(4, 70, generator)
    target[:] = 0
    teachers[:, :, 50:] = -math.inf  # no teacher mass there ...
    student[:, :, 60:] = -math.inf  # ... so the student's -inf is 0 * log 0 = 0
    got = fused(student, teachers, target)
    for name in ("loss", "kl", "ce", "grad"):
        assert torch.isfinite(got[name]).all(), name
    compare(got, truth(student, teachers, target))


@pytest.mark.parametrize("bad_label", [-1, 77, 2**40, -(2**40)])
def test_out_of_range_label_gives_nan_not_a_crash(generator, bad_label):
    student = make_logits((2, 6, 77), generator)
    teachers = make_logits((2, 6, 77), generator)
    target = make_target(6, 77, generator)
    clean = fused(student, teachers, target)
    target[4] = bad_label
    got = fused(student, teachers, target)
    for name in ("loss", "kl", "ce", "grad"):
        assert torch.isnan(got[name][:, 4]).all(), f"{name} of the bad-label row must be NaN"
        assert torch.equal(got[name][:, :4], clean[name][:, :4]) and torch.equal(got[name][:, 5:], clean[name][:, 5:])
    assert not got["student_correct"][:, 4].any() and not got["teacher_correct"][:, 4].any()
    # and through the public API when validation is off (as inside torch.compile)
    loss = group_kd(student, teachers, target, backend="cpu", reduction="none", validate=False).loss
    assert torch.isnan(loss[:, 4]).all() and torch.isfinite(loss[:, :4]).all()


def test_ignored_rows_and_custom_ignore_index(generator):
    student = make_logits((2, 8, 40), generator)
    teachers = make_logits((3, 8, 40), generator)
    target = make_target(8, 40, generator)
    target[[1, 5]] = -1
    got = fused(student, teachers, target, ignore_index=-1, error_rule=3)
    for name in ("loss", "kl", "ce"):
        assert torch.equal(got[name][:, [1, 5]], torch.zeros(2, 2))
        assert torch.isfinite(got[name]).all()
    assert torch.count_nonzero(got["grad"][:, [1, 5]]) == 0
    assert not got["error_mask"][[1, 5]].any() and not got["teacher_correct"][:, [1, 5]].any()
    compare(got, truth(student, teachers, target, ignore_index=-1, error_rule=3))


def test_empty_batch():
    got = fused(torch.zeros(2, 0, 10), torch.zeros(1, 0, 10), torch.zeros(0, dtype=torch.long))
    assert got["loss"].shape == (2, 0) and got["grad"].shape == (2, 0, 10) and got["error_mask"].shape == (0,)


# --- backward helper ---------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(2, 3, 1), (1, 5, 1031), (2, 70, 16384)])  # the last one: huge-page path
def test_scale_grad_is_the_plain_formula(generator, dtype, shape):
    per_sample_grad = make_logits(shape, generator, dtype)
    grad_loss = torch.rand(shape[:2], generator=generator).t().contiguous().t()  # non-contiguous
    got = torch.ops.orc_fast.group_kd_scale_grad(per_sample_grad, grad_loss)
    want = (per_sample_grad * grad_loss.unsqueeze(-1)).to(dtype)
    assert got.dtype == dtype and got.is_contiguous() and torch.equal(got, want)


def test_scale_grad_on_meta_tensors():
    out = torch.ops.orc_fast.group_kd_scale_grad(torch.empty(2, 3, 7, device="meta"), torch.empty(2, 3, device="meta"))
    assert out.shape == (2, 3, 7) and out.device.type == "meta"


# --- argument checks of the raw op -------------------------------------------------


@pytest.mark.parametrize("case", ["student rank", "dtype mismatch", "class mismatch", "no teacher", "target dtype",
                                  "alpha size", "weights dtype", "error rule", "temperature", "int logits"])
def test_raw_op_rejects_bad_arguments(case):
    student, teachers, target = torch.randn(2, 3, 5), torch.randn(2, 3, 5), torch.tensor([0, 1, 2])
    kwargs = {}
    if case == "student rank":
        student = student[0]
    elif case == "dtype mismatch":
        teachers = teachers.double()
    elif case == "class mismatch":
        teachers = torch.randn(2, 3, 6)
    elif case == "no teacher":
        teachers = torch.randn(0, 3, 5)
    elif case == "target dtype":
        target = target.int()
    elif case == "alpha size":
        kwargs["alpha"] = torch.full((3,), 0.5)
    elif case == "weights dtype":
        kwargs["teacher_weights"] = torch.full((2,), 0.5, dtype=torch.float64)
    elif case == "error rule":
        kwargs["error_rule"] = 4
    elif case == "temperature":
        kwargs["temperature"] = 0.0
    elif case == "int logits":
        student, teachers = student.long(), teachers.long()
    with pytest.raises(RuntimeError, match="group_kd_fused"):
        fused(student, teachers, target, **kwargs)


# --- every instruction-set build ---------------------------------------------------

_ISA_CHECK = textwrap.dedent("""
    import math, sys, torch
    sys.path.insert(0, {tests_dir!r})
    from kd_check import compare, make_logits, make_target
    from test_cpu_kernel import fused, truth
    assert torch.backends.cpu.get_cpu_capability() == {capability!r}, torch.backends.cpu.get_cpu_capability()
    generator = torch.Generator().manual_seed(7)
    for classes, dtype, tau, rule in [(1, torch.float32, 4.0, 0), (17, torch.float32, 2.5, 3),
                                      (4097, torch.float32, 4.0, 2), (1000, torch.bfloat16, 1.0, 0),
                                      (333, torch.float16, 4.0, 1)]:
        student = make_logits((2, 7, classes), generator, dtype)
        teachers = make_logits((3, 7, classes), generator, dtype)
        target = make_target(7, classes, generator, ignore_fraction=0.2)
        compare(fused(student, teachers, target, tau, error_rule=rule),
                truth(student, teachers, target, tau, error_rule=rule), dtype=dtype)
    student = make_logits((2, 4, 100), generator)
    student[0, 1, 99] = math.nan
    got = fused(student, make_logits((1, 4, 100), generator), make_target(4, 100, generator))
    assert torch.isnan(got["loss"][0, 1]) and torch.isfinite(got["loss"]).sum() == 7
    print("ok")
""")


def _capabilities_below_best():
    """The builds this CPU runs but does not pick by default (the default one runs everywhere above)."""
    order = ["DEFAULT", "AVX2", "AVX512"]
    best = torch.backends.cpu.get_cpu_capability()
    return order[: order.index(best)] if best in order else []


@pytest.mark.parametrize("capability", ["DEFAULT", "AVX2"])
def test_every_isa_build_matches_float64(capability):
    if capability not in _capabilities_below_best():
        pytest.skip(f"{capability} is this CPU's default build (covered by every other test) or not runnable")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability.lower())
    code = _ISA_CHECK.format(tests_dir=TESTS_DIR, capability=capability)
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stdout + run.stderr


@pytest.mark.skipif(shutil.which("objdump") is None or not sys.platform.startswith("linux"), reason="needs objdump")
def test_wide_instructions_stay_in_their_builds():
    """AVX code may only sit in the AVX2/AVX512 kernel builds, never in code every CPU runs.

    The ISA builds switch instruction sets by pragma; an inline function they share with
    the rest of the library must not end up with an AVX body (see group_kd_cpu_kernel.h).
    """
    import orc_fast._C as extension

    listing = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-C", extension.__file__],
                             capture_output=True, text=True, check=True).stdout
    function, offenders = None, set()
    for line in listing.splitlines():
        if line.endswith(">:"):
            function = line
            continue
        fields = line.split("\t")  # "  addr:", "mnemonic operands"
        if function is None or len(fields) < 2 or not fields[0].strip().endswith(":"):
            continue
        mnemonic = fields[1].split(" ")[0]
        wide = mnemonic.startswith("v") or "%ymm" in line or "%zmm" in line  # VEX/EVEX encodings
        if wide and "::AVX2::" not in function and "::AVX512::" not in function:
            offenders.add(function)
    assert not offenders, f"AVX instructions outside the ISA builds: {sorted(offenders)[:5]}"


# --- memory ------------------------------------------------------------------------

_PEAK_MEMORY = textwrap.dedent("""
    import json, resource, torch
    import orc_fast
    S, G, B, C = 2, 2, 1024, 32000
    student = torch.randn(S, B, C).mul_(3)
    teachers = torch.randn(G, B, C).mul_(3)
    target = torch.randint(0, C, (B,))
    orc_fast.group_kd(student[:, :4], teachers[:, :4], target[:4], backend="cpu")  # load, start threads

    def resident():
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * resource.getpagesize()

    before = resident()
    result = orc_fast.group_kd(student, teachers, target, backend="cpu", reduction="none")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(dict(before=before, peak=peak, grad_bytes=student.numel() * 4,
                          finite=bool(torch.isfinite(result.loss).all()))))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and ru_maxrss in KiB")
def test_peak_memory_is_inputs_plus_one_gradient():
    run = subprocess.run([sys.executable, "-c", _PEAK_MEMORY], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout.strip().splitlines()[-1])
    growth, grad_bytes = report["peak"] - report["before"], report["grad_bytes"]
    print(f"peak RSS growth during the call: {growth / 2**20:.1f} MiB; gradient {grad_bytes / 2**20:.1f} MiB")
    assert report["finite"]
    assert growth < 1.2 * grad_bytes, f"the call grew RSS by {growth / grad_bytes:.2f}x the gradient"
    # and the measurement does see the gradient (every element is written)
    assert growth > 0.9 * grad_bytes, f"RSS grew by only {growth / grad_bytes:.2f}x the gradient"
