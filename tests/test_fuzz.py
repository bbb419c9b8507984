"""Property-based fuzzing of every CPU-runnable backend against float64 math.

Hypothesis draws the problem (S, G, B, C, dtype, tau, alpha, reduction, teacher
weights, ignore density, strides, value scale, -inf classes); the tensors come from a
drawn seed. Profiles: ``ci`` (default: 500 examples per backend, derandomised, so CI is
repeatable) and ``dev`` (`make fuzz`: 5000 examples, random).
"""

import math
import os

import pytest
import torch
from conftest import CPU_BACKENDS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kd_check import actual, expected

settings.register_profile("ci", max_examples=500, derandomize=True, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=5000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("ORC_FAST_FUZZ_PROFILE", "ci"))

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SCALES = (1e-3, 1.0, 30.0, 1e4)
# the interpreter is slow: keep its problems smaller
LIMITS = {"triton": dict(batch=16, classes=600)}


@st.composite
def problems(draw, backend):
    limits = LIMITS.get(backend, dict(batch=64, classes=5000))
    return dict(
        students=draw(st.integers(1, 3)),
        teachers=draw(st.integers(1, 4)),
        batch=draw(st.integers(1, limits["batch"])),
        classes=draw(st.one_of(st.integers(1, 40), st.integers(1, limits["classes"]))),
        dtype=draw(st.sampled_from(DTYPES)),
        temperature=draw(st.sampled_from((0.5, 1.0, 2.0, 4.0, 8.0))),
        alpha=draw(st.one_of(st.sampled_from((0.0, 1.0)), st.floats(0.0, 1.0))),
        reduction=draw(st.sampled_from(("none", "mean", "sum"))),
        weighted=draw(st.booleans()),
        ignore_density=draw(st.sampled_from((0.0, 0.0, 0.3, 1.0))),
        strided=draw(st.booleans()),
        scale=draw(st.sampled_from(SCALES)),
        dead_density=draw(st.sampled_from((0.0, 0.0, 0.2))),
        error_rule=draw(st.sampled_from(("any", "all", "majority", "ensemble"))),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def build(problem):
    gen = torch.Generator().manual_seed(problem["seed"])
    S, G, B, C = problem["students"], problem["teachers"], problem["batch"], problem["classes"]
    rows = 2 * B if problem["strided"] else B
    logits = torch.randn(S + G, rows, C, generator=gen) * problem["scale"]
    if problem["strided"]:
        logits = logits[:, ::2]
    target = torch.randint(0, C, (B,), generator=gen)
    ignored = torch.rand(B, generator=gen) < problem["ignore_density"]
    target[ignored] = -100
    dead = torch.rand(B, C, generator=gen) < problem["dead_density"]
    dead[torch.arange(B), target.clamp(min=0)] = False  # the true class stays possible
    logits[:, dead] = -math.inf
    logits = logits.to(problem["dtype"])
    student, teachers = logits[:S], logits[S:]
    options = dict(temperature=problem["temperature"], alpha=problem["alpha"], reduction=problem["reduction"],
                   error_rule=problem["error_rule"])
    if problem["weighted"]:
        options["teacher_weights"] = (torch.rand(G, generator=gen) + 0.1).tolist()
    upstream = torch.rand(S, B, generator=gen) if problem["reduction"] == "none" else None
    return student, teachers, target, upstream, options


def _close(name, got, want, atol, rtol=1e-5):
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"{name}: {m}")


def check(backend, problem):
    student, teachers, target, upstream, options = build(problem)
    got = actual(backend, student, teachers, target, upstream=upstream, **options)
    want = expected(student, teachers, target, upstream=upstream, **options)
    if problem["reduction"] == "mean" and not (target != -100).any():
        assert torch.isnan(got["loss"]), "mean over no counted sample is 0/0"
        return
    # Absolute error budgets of fp32 arithmetic: rounding the exponents (~eps * scale / tau)
    # and cancellation in KL's sum of p * (log p - log q) (~eps * log C), scaled by tau^2.
    scale, tau = problem["scale"], problem["temperature"]
    ce_atol = 1e-5 + 2e-6 * scale
    kl_atol = 1e-6 * (1 + math.log(problem["classes"])) + 2e-6 * scale / tau
    sample_atol = ce_atol + tau**2 * kl_atol
    counted = max(1, int((target != -100).sum()))
    loss_atol = sample_atol * (1 if problem["reduction"] == "none" else problem["students"] * counted)
    _close("loss", got["loss"], want["loss"], loss_atol)
    _close("kl", got["kl"], want["kl"], kl_atol)
    _close("ce", got["ce"], want["ce"], ce_atol)
    for name in ("student_correct", "teacher_correct"):
        assert torch.equal(got[name], want[name]), name
    if problem["error_rule"] != "ensemble":  # ensemble argmax near ties may flip in fp32
        assert torch.equal(got["error_mask"], want["error_mask"]), "error_mask"
    low = problem["dtype"] != torch.float32
    grad_scale = want["grad"].abs().max().item() if want["grad"].numel() else 0.0
    # plus the spacing of the dtype's subnormals: tiny gradients are stored with that absolute step
    finfo = torch.finfo(problem["dtype"])
    grad_atol = (1e-2 * grad_scale if low else 1e-6) + 2e-6 * scale + finfo.tiny * finfo.eps
    _close("grad", got["grad"], want["grad"], grad_atol, rtol=1e-2 if low else 1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fuzz_backend_against_float64(backend):
    @given(problems(backend))
    def run(problem):
        check(backend, problem)

    run()
