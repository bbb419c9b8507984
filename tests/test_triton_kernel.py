"""The Triton group-KD kernel (kernels/group_kd.py) against the float64 specification.

Runs the kernel itself: under TRITON_INTERPRET=1 on CPU tensors here (tests/conftest.py
switches the interpreter on before Triton compiles anything), on CUDA tensors where a GPU
exists. Both tile paths are exercised on small shapes: the single-chunk path (whole rows
in registers, several rows per program) and the chunked two-pass online-softmax path,
forced on small C through ``block_c``. Outputs are poisoned before each launch, so an
element the kernel forgets to write fails. A last group compiles the kernel for real GPU
targets (sm_80, sm_90) with Triton's own compiler and ptxas, so a kernel that only the
interpreter accepts cannot pass.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from orc_fast import group_kd  # noqa: E402
from orc_fast.reference import ERROR_RULES, group_kd_math  # noqa: E402

group_kd_module = pytest.importorskip("orc_fast.kernels.group_kd")

# The interpreter evaluates masked lanes and NaN rows in numpy, which warns about them.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IGNORE = -100
INTERPRETED = type(group_kd_module._group_kd_kernel).__name__ == "InterpretedFunction"

if DEVICE == "cpu" and not INTERPRETED:
    pytest.skip(
        "orc_fast.kernels was imported before TRITON_INTERPRET=1 was set; the kernel cannot run on CPU",
        allow_module_level=True,
    )


# --- helpers ---------------------------------------------------------------------------


def _inputs(gen, S, G, B, C, dtype=torch.float32, scale=3.0, ignore_fraction=0.25):
    student = (torch.randn(S, B, C, generator=gen) * scale).to(dtype)
    teachers = (torch.randn(G, B, C, generator=gen) * scale).to(dtype)
    target = torch.randint(0, C, (B,), generator=gen)
    target[torch.rand(B, generator=gen) < ignore_fraction] = IGNORE
    weights = torch.rand(G, generator=gen) + 0.1
    weights = weights / weights.sum()
    alpha = torch.rand(S, generator=gen)
    members = torch.ones(S)
    return student, teachers, target, weights, alpha, members


def _truth(student, teachers, target, weights, alpha, members, temperature, rule):
    """float64 group_kd_math and its autograd gradient (per sample: rows are independent)."""
    student64 = student.detach().double().requires_grad_(True)
    loss, kl, ce, sc, tc, err = group_kd_math(
        student64, teachers.double(), target, weights.double(), alpha.double(), members,
        temperature, IGNORE, rule,
    )
    (grad,) = torch.autograd.grad(loss.sum(), student64)
    return dict(loss=loss.detach(), kl=kl.detach(), ce=ce.detach(), student_correct=sc, teacher_correct=tc,
                error_mask=err, grad=grad)


def _poisoned_launch(student, teachers, target, weights, alpha, members, temperature, rule, **tiles):
    """Launch with every output pre-filled with garbage (NaN, True) so unwritten elements show."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(out):
        return out.fill_(True) if out.dtype == torch.bool else out.fill_(math.nan)

    args = [t.to(DEVICE) for t in (student, teachers, target, weights, alpha, members)]
    torch.empty = lambda *a, **k: poison(real_empty(*a, **k))
    torch.empty_like = lambda *a, **k: poison(real_empty_like(*a, **k))
    try:
        out = group_kd_module.group_kd_triton_launch(*args, temperature, IGNORE, rule, **tiles)
    finally:
        torch.empty, torch.empty_like = real_empty, real_empty_like
    names = ("loss", "kl", "ce", "student_correct", "teacher_correct", "error_mask", "grad")
    return {name: value.cpu() for name, value in zip(names, out)}


def _check(got, want, dtype, grad_rtol=None, loss_rtol=1e-5, loss_atol=1e-5, masks=True):
    for name in ("loss", "kl", "ce"):
        assert got[name].dtype == torch.float32
        torch.testing.assert_close(got[name].double(), want[name], rtol=loss_rtol, atol=loss_atol, equal_nan=True,
                                   msg=lambda m, name=name: f"{name}: {m}")
    if masks:
        for name in ("student_correct", "teacher_correct", "error_mask"):
            assert got[name].dtype == torch.bool
            assert torch.equal(got[name], want[name]), f"{name}: {got[name]} != {want[name]}"
    assert got["grad"].dtype == dtype
    loose = dtype in (torch.float16, torch.bfloat16)
    rtol = grad_rtol if grad_rtol is not None else (1e-2 if loose else 1e-5)
    finite = want["grad"][torch.isfinite(want["grad"])]
    scale = finite.abs().max().item() if finite.numel() else 1.0
    atol = (1e-2 if loose else 1e-6) * max(scale, 1e-3)
    torch.testing.assert_close(got["grad"].double(), want["grad"], rtol=rtol, atol=atol, equal_nan=True,
                               msg=lambda m: f"grad: {m}")


def _run_case(gen, S, G, B, C, dtype=torch.float32, temperature=4.0, rule=0, **tiles):
    inputs = _inputs(gen, S, G, B, C, dtype)
    got = _poisoned_launch(*inputs, temperature, rule, **tiles)
    want = _truth(*inputs, temperature, rule)
    _check(got, want, dtype)


# --- the two tile paths on odd shapes -----------------------------------------------------

# (S, G, B, C, tiles): the heuristic tiles, many rows per program, and the chunked path
# forced with a small block_c (C not a multiple of it, and C < block_c for one chunk).
PATH_CASES = [
    (1, 1, 5, 1, {}),
    (2, 1, 6, 2, {"rows": 4}),
    (1, 3, 7, 3, {"rows": 8}),
    (3, 2, 9, 17, {"rows": 4}),
    (2, 2, 4, 100, {}),
    (2, 3, 3, 1000, {}),
    (1, 2, 2, 4097, {}),
    (1, 1, 3, 1, {"block_c": 16, "rows": 1}),
    (2, 1, 3, 17, {"block_c": 16, "rows": 2}),
    (3, 2, 4, 100, {"block_c": 32, "rows": 1}),
    (1, 4, 2, 1000, {"block_c": 128, "rows": 1}),
    (2, 3, 2, 4097, {"block_c": 1024, "rows": 1}),
    (5, 3, 3, 33, {"block_c": 16, "rows": 2}),
]


@pytest.mark.parametrize("S,G,B,C,tiles", PATH_CASES)
def test_paths_match_float64(generator, S, G, B, C, tiles):
    temperature = (1.0, 2.0, 4.0)[(S + G + C) % 3]
    _run_case(generator, S, G, B, C, temperature=temperature, rule=(S + C) % 4, **tiles)


def test_heuristic_picks_both_paths():
    small = group_kd_module.launch_config(2, 2, 4096, 100)
    large = group_kd_module.launch_config(1, 4, 8192, 128256, element_size=2)
    assert small["SINGLE_CHUNK"] and small["ROWS"] > 1
    assert not large["SINGLE_CHUNK"] and large["BLOCK_C"] < 128256


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tiles", [{}, {"block_c": 64, "rows": 1}])
def test_half_precision_inputs(generator, dtype, tiles):
    # The loss is fp32 arithmetic on the (exactly representable) half inputs: tight tolerance.
    _run_case(generator, 2, 3, 6, 300, dtype=dtype, **tiles)


@pytest.mark.parametrize("rule", range(len(ERROR_RULES)))
@pytest.mark.parametrize("tiles", [{"rows": 4}, {"block_c": 16, "rows": 2}])
def test_error_rules_with_members(generator, rule, tiles):
    student, teachers, target, weights, alpha, _ = _inputs(generator, 4, 2, 16, 23, scale=0.6)
    members = torch.tensor([1.0, 0.0, 1.0, 1.0])
    got = _poisoned_launch(student, teachers, target, weights, alpha, members, 3.0, rule, **tiles)
    want = _truth(student, teachers, target, weights, alpha, members, 3.0, rule)
    _check(got, want, torch.float32)
    no_members = torch.zeros(4)
    got = _poisoned_launch(student, teachers, target, weights, alpha, no_members, 3.0, rule, **tiles)
    assert not got["error_mask"].any()


def test_argmax_ties_pick_the_first_index(generator):
    S, G, B, C = 2, 2, 4, 40
    student = torch.zeros(S, B, C)
    teachers = torch.zeros(G, B, C)
    student[:, :, 5] = 1.0
    student[:, :, 30] = 1.0  # tie with class 5, across chunks when block_c = 16
    teachers[:, :, 7] = 2.0
    teachers[:, :, 20] = 2.0
    target = torch.tensor([5, 30, 7, 20])
    weights, alpha, members = torch.full((G,), 0.5), torch.full((S,), 0.5), torch.ones(S)
    want = _truth(student, teachers, target, weights, alpha, members, 2.0, 3)
    for tiles in ({}, {"block_c": 16, "rows": 1}):
        got = _poisoned_launch(student, teachers, target, weights, alpha, members, 2.0, 3, **tiles)
        _check(got, want, torch.float32)


# --- strides, ignore_index, extreme and bad values ------------------------------------------


def test_row_strides_and_views(generator):
    S, G, B, C = 2, 3, 5, 37
    wide_student = torch.randn(B, S, C + 9, generator=generator) * 3
    student = wide_student.transpose(0, 1)[..., 3:C + 3]  # [S, B, C]: odd row strides, offset
    teachers = (torch.randn(G, 2 * B, C, generator=generator) * 3)[:, ::2]  # every other row
    assert student.stride(-1) == 1 and not student.is_contiguous() and not teachers.is_contiguous()
    target = torch.randint(0, C, (B,), generator=generator)
    weights, alpha, members = torch.full((G,), 1 / G), torch.tensor([0.3, 0.9]), torch.ones(S)
    want = _truth(student, teachers, target, weights, alpha, members, 4.0, 0)
    for tiles in ({}, {"block_c": 16, "rows": 2}):
        got = _poisoned_launch(student, teachers, target, weights, alpha, members, 4.0, 0, **tiles)
        _check(got, want, torch.float32)


@pytest.mark.parametrize("tiles", [{"rows": 8}, {"block_c": 16, "rows": 1}])
def test_ignored_rows_are_zero(generator, tiles):
    student, teachers, target, weights, alpha, members = _inputs(generator, 2, 2, 8, 50, ignore_fraction=0)
    target[[0, 3, 7]] = IGNORE
    student[0, 3] = math.nan  # an ignored row is never read: garbage there changes nothing
    got = _poisoned_launch(student, teachers, target, weights, alpha, members, 4.0, 0, **tiles)
    ignored = target == IGNORE
    for name in ("loss", "kl", "ce"):
        assert (got[name][:, ignored] == 0).all()
    assert not got["student_correct"][:, ignored].any() and not got["teacher_correct"][:, ignored].any()
    assert not got["error_mask"][ignored].any()
    assert (got["grad"][:, ignored] == 0).all()
    student[0, 3] = 0.0
    want = _truth(student, teachers, target, weights, alpha, members, 4.0, 0)
    _check(got, want, torch.float32)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
@pytest.mark.parametrize("tiles", [{}, {"block_c": 32, "rows": 1}])
def test_extreme_logits(generator, temperature, tiles):
    student, teachers, target, weights, alpha, members = _inputs(generator, 2, 2, 6, 70)
    signs = torch.randint(0, 2, student.shape, generator=generator) * 2 - 1
    student = torch.where(torch.rand(student.shape, generator=generator) < 0.2, signs * 1e4, student)
    teachers = torch.where(torch.rand(teachers.shape, generator=generator) < 0.2, -teachers.sign() * 1e4, teachers)
    got = _poisoned_launch(student, teachers, target, weights, alpha, members, temperature, 0, **tiles)
    want = _truth(student, teachers, target, weights, alpha, members, temperature, 0)
    assert torch.isfinite(got["loss"]).all()
    _check(got, want, torch.float32)


@pytest.mark.parametrize("tiles", [{}, {"block_c": 16, "rows": 1}])
def test_minus_inf_classes(generator, tiles):
    """Classes masked out (-inf) everywhere drop out: finite loss, zero gradient there."""
    student, teachers, target, weights, alpha, members = _inputs(generator, 2, 3, 6, 40, ignore_fraction=0)
    masked = torch.zeros(40, dtype=torch.bool)
    masked[[0, 5, 16, 17, 39]] = True
    student[..., masked] = -math.inf
    teachers[..., masked] = -math.inf
    target = torch.where(masked[target], torch.ones_like(target), target)
    teachers[1, 2, 30:] = -math.inf  # one teacher also rules out a tail: p̄ still has mass there
    got = _poisoned_launch(student, teachers, target, weights, alpha, members, 2.0, 0, **tiles)
    want = _truth(student, teachers, target, weights, alpha, members, 2.0, 0)
    assert torch.isfinite(got["loss"]).all() and (got["grad"][..., masked] == 0).all()
    _check(got, want, torch.float32)


@pytest.mark.parametrize("tiles", [{}, {"block_c": 16, "rows": 1}])
def test_student_minus_inf_where_teachers_have_mass_is_inf(generator, tiles):
    student, teachers, target, weights, alpha, members = _inputs(generator, 1, 2, 3, 20, ignore_fraction=0)
    target[:] = 1
    student[0, 1, 4] = -math.inf
    got = _poisoned_launch(student, teachers, target, weights, alpha, members, 2.0, 0, **tiles)
    want = _truth(student, teachers, target, weights, alpha, members, 2.0, 0)
    assert got["kl"][0, 1] == math.inf and torch.isfinite(got["kl"][0, [0, 2]]).all()
    _check(got, want, torch.float32)


@pytest.mark.parametrize("tiles", [{"rows": 8}, {"block_c": 16, "rows": 2}])
@pytest.mark.parametrize("where,value", [("student", math.nan), ("student", math.inf),
                                         ("teacher", math.nan), ("teacher", math.inf)])
def test_bad_logits_spoil_only_their_row(generator, tiles, where, value):
    student, teachers, target, weights, alpha, members = _inputs(generator, 2, 2, 6, 40, ignore_fraction=0)
    clean = _poisoned_launch(student, teachers, target, weights, alpha, members, 4.0, 0, **tiles)
    row = 4
    if where == "student":
        student[1, row, 33] = value
        spoiled = torch.zeros(2, 6, dtype=torch.bool)
        spoiled[1, row] = True
    else:
        teachers[0, row, 9] = value
        spoiled = torch.zeros(2, 6, dtype=torch.bool)
        spoiled[:, row] = True
    got = _poisoned_launch(student, teachers, target, weights, alpha, members, 4.0, 0, **tiles)
    for name in ("loss", "kl" if where == "teacher" else "ce", "grad"):
        assert torch.isnan(got[name][spoiled]).all(), f"{name} of the spoiled row must be NaN"
        assert torch.equal(got[name][~spoiled], clean[name][~spoiled]), f"{name} of other rows changed"
    rows_ok = torch.ones(6, dtype=torch.bool)
    rows_ok[row] = False
    assert torch.equal(got["error_mask"][rows_ok], clean["error_mask"][rows_ok])
    if where == "student" and value != value:  # torch.argmax: a NaN is the maximum
        assert not got["student_correct"][1, row] or target[row] == 33


def test_nan_argmax_follows_torch(generator):
    S, G, B, C = 1, 1, 4, 40
    student = torch.randn(S, B, C, generator=generator)
    teachers = torch.randn(G, B, C, generator=generator)
    student[0, 0, 25] = math.nan
    student[0, 1, 3] = math.inf
    student[0, 1, 20] = math.nan  # NaN beats an earlier +inf
    student[0, 2, 10] = math.inf
    student[0, 2, 30] = math.inf  # first of two +inf
    target = student[0].argmax(-1)
    teachers[0] = student[0]
    weights, alpha, members = torch.ones(G), torch.full((S,), 0.5), torch.ones(S)
    for tiles in ({}, {"block_c": 16, "rows": 1}):
        got = _poisoned_launch(student, teachers, target, weights, alpha, members, 4.0, 0, **tiles)
        assert got["student_correct"].all() and got["teacher_correct"].all(), tiles


@pytest.mark.parametrize("tiles", [{"rows": 4}, {"block_c": 16, "rows": 1}])
def test_out_of_range_target_is_nan_not_a_read(generator, tiles):
    student, teachers, target, weights, alpha, members = _inputs(generator, 2, 2, 4, 30, ignore_fraction=0)
    target[1] = 30
    target[2] = -7
    target[3] = 2**40
    got = _poisoned_launch(student, teachers, target, weights, alpha, members, 4.0, 0, **tiles)
    for name in ("loss", "kl", "ce", "grad"):
        assert torch.isnan(got[name][:, 1:]).all(), name
    good_target = target.clone()
    good_target[1:] = IGNORE
    want = _truth(student, teachers, good_target, weights, alpha, members, 4.0, 0)
    for name in ("loss", "kl", "ce", "grad"):
        torch.testing.assert_close(got[name][:, 0].double(), want[name][:, 0], rtol=1e-5, atol=1e-6)
    assert not got["student_correct"][:, 1:].any() and not got["teacher_correct"][:, 1:].any()


# --- through the public API and autograd --------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_public_api_and_backward(generator, dtype):
    student, teachers, target, _, _, _ = _inputs(generator, 2, 3, 8, 19, dtype=dtype)
    leaf = student.to(DEVICE).clone().requires_grad_(True)
    upstream = torch.rand(2, 8, generator=generator)
    result = group_kd(leaf, teachers.to(DEVICE), target.to(DEVICE), temperature=3.0, alpha=[0.2, 0.8],
                      backend="triton", reduction="none")
    (result.loss * upstream.to(DEVICE)).sum().backward()
    assert leaf.grad.dtype == dtype
    student64 = student.double().requires_grad_(True)
    loss = group_kd_math(student64, teachers.double(), target, torch.full((3,), 1 / 3, dtype=torch.float64),
                         torch.tensor([0.2, 0.8], dtype=torch.float64), torch.ones(2), 3.0, IGNORE, 0)[0]
    (loss * upstream.double()).sum().backward()
    torch.testing.assert_close(result.loss.cpu().double(), loss.detach(), rtol=1e-5, atol=1e-5)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(leaf.grad.cpu().double(), student64.grad, rtol=tol,
                               atol=tol * student64.grad.abs().max().item())


# --- compiled for real GPUs (no GPU needed) ------------------------------------------------

_COMPILE_SCRIPT = """
import sys
from orc_fast.kernels.group_kd import compile_for_target
for case in sys.argv[1:]:
    dtype, S, G, B, C, rule, arch = case.split(",")
    ptx = compile_for_target(dtype, int(S), int(G), int(B), int(C), int(rule), int(arch)).asm["ptx"]
    vector = "ld.global.v4" in ptx or "ld.global.nc.v4" in ptx
    print(case, "vectorised" if vector else "scalar", flush=True)
"""


def test_kernel_compiles_for_gpu():
    """Triton's real compiler and ptxas accept the kernel for sm_80 and sm_90 (no GPU needed).

    Runs in a fresh process: this one may have Triton in interpreter mode. On a GPU
    machine the real launches compile the kernel anyway (and its Triton may differ).
    """
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the kernel is compiled by every launch")
    import subprocess
    import sys

    cases = ["bf16,2,2,128,100,0,90", "fp16,2,2,256,1000,3,80", "bf16,1,4,8192,32000,3,90",
             "fp32,1,1,16384,131072,0,90", "bf16,4,4,64,4097,2,90"]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, *cases], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    lines = dict(line.split(" ", 1) for line in done.stdout.split("\n") if line)
    assert sorted(lines) == sorted(cases), done.stdout
    for case, kind in lines.items():
        C = int(case.split(",")[4])
        if C % 16 == 0:  # aligned rows: 16-byte vector loads of the logits
            assert kind == "vectorised", case
