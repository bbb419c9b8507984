"""Helpers that check a group-KD backend against the float64 specification.

``expected`` evaluates orc_fast.reference.group_kd_math in float64 and differentiates it
with autograd; ``actual`` runs the public ``group_kd`` on a backend. ``compare`` checks
loss, per-sample KL/CE, masks and the student gradient.
"""

from __future__ import annotations

import torch

from orc_fast import group_kd
from orc_fast.reference import ERROR_RULES, group_kd_math


def make_logits(shape, generator, dtype=torch.float32, scale=3.0):
    return (torch.randn(shape, generator=generator) * scale).to(dtype)


def make_target(batch, classes, generator, ignore_fraction=0.0, ignore_index=-100):
    target = torch.randint(0, classes, (batch,), generator=generator)
    if ignore_fraction:
        ignored = torch.rand(batch, generator=generator) < ignore_fraction
        target[ignored] = ignore_index
    return target


def _reduce(loss, target, ignore_index, reduction):
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.sum() / (target != ignore_index).sum()
    return loss


def expected(student, teachers, target, upstream=None, temperature=4.0, alpha=0.9, teacher_weights=None,
             ignore_index=-100, error_rule="any", reduction="mean", error_members=None):
    """The float64 truth: outputs of group_kd_math and d(reduced loss . upstream)/d student."""
    students = student.unsqueeze(0) if student.dim() == 2 else student
    if isinstance(teachers, (list, tuple)):
        teachers = torch.stack(list(teachers))
    num_students, num_teachers = students.shape[0], teachers.shape[0]
    weights = torch.ones(num_teachers, dtype=torch.float64) if teacher_weights is None else \
        torch.as_tensor(teacher_weights, dtype=torch.float64).reshape(-1).expand(num_teachers)
    alphas = torch.as_tensor(alpha, dtype=torch.float64).reshape(-1).expand(num_students)
    members = torch.ones(num_students) if error_members is None else \
        torch.as_tensor(error_members, dtype=torch.float32).reshape(-1)
    student64 = students.detach().double().requires_grad_(True)
    loss, kl, ce, student_correct, teacher_correct, error_mask = group_kd_math(
        student64, teachers.detach().double(), target, weights / weights.sum(), alphas, members,
        temperature, ignore_index, ERROR_RULES.index(error_rule),
    )
    reduced = _reduce(loss, target, ignore_index, reduction)
    if student.dim() == 2 and reduction == "none":
        reduced = reduced[0]
    weight = torch.ones_like(reduced) if upstream is None else upstream.double()
    (reduced * weight).sum().backward()
    grad = student64.grad if student.dim() == 3 else student64.grad[0]
    squeeze = (lambda t: t[0]) if student.dim() == 2 else (lambda t: t)
    return dict(loss=reduced.detach(), kl=squeeze(kl.detach()), ce=squeeze(ce.detach()),
                student_correct=squeeze(student_correct), teacher_correct=teacher_correct,
                error_mask=error_mask, grad=grad)


def actual(backend, student, teachers, target, upstream=None, **options):
    """Outputs of the public group_kd on ``backend`` and the student's gradient."""
    leaf = student.detach().clone().requires_grad_(True)
    # keep the caller's strides: rebuild a view with the same layout when not contiguous
    if not student.is_contiguous():
        leaf = torch.empty_strided(student.shape, student.stride(), dtype=student.dtype)
        leaf.copy_(student)
        leaf.requires_grad_(True)
    result = group_kd(leaf, teachers, target, backend=backend, **options)
    weight = torch.ones_like(result.loss) if upstream is None else upstream.to(result.loss.dtype)
    (result.loss * weight).sum().backward()
    out = result._asdict()
    out["grad"] = leaf.grad
    return out


def compare(got, want, dtype=torch.float32, grad_rtol=None, grad_atol=None):
    """Check a backend's outputs against the float64 truth with docs/design.md §7's tolerances."""
    loose = dtype in (torch.float16, torch.bfloat16)
    for name in ("loss", "kl", "ce"):
        assert got[name].dtype == torch.float32, f"{name} must be fp32, got {got[name].dtype}"
        torch.testing.assert_close(got[name].double(), want[name], rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    for name in ("student_correct", "teacher_correct", "error_mask"):
        assert got[name].dtype == torch.bool, f"{name} must be bool"
        assert torch.equal(got[name], want[name]), f"{name} differs from argmax truth"
    assert got["grad"].dtype == dtype, f"gradient must have the student's dtype {dtype}, got {got['grad'].dtype}"
    rtol = grad_rtol if grad_rtol is not None else (1e-2 if loose else 1e-5)
    finfo = torch.finfo(dtype)  # + the dtype's subnormal spacing: the absolute step of tiny gradients
    atol = grad_atol if grad_atol is not None else (
        (1e-2 * want["grad"].abs().max().item() if loose else 1e-6) + finfo.tiny * finfo.eps)
    torch.testing.assert_close(got["grad"].double(), want["grad"], rtol=rtol, atol=atol, msg=lambda m: f"grad: {m}")


def check_backend(backend, student, teachers, target, upstream=None, **options):
    """Run one case on a backend and compare it with the float64 truth."""
    got = actual(backend, student, teachers, target, upstream=upstream, **options)
    want = expected(student, teachers, target, upstream=upstream, **options)
    compare(got, want, dtype=student.dtype)
    return got, want


def compiled_step_matches_eager(backend, model, inputs, teachers, target, loss_tol, grad_tol):
    """torch.compile(fullgraph=True) of model + GroupKDLoss gives eager's loss and weight
    gradient, within (rtol, atol) pairs."""
    import torch._dynamo

    from orc_fast import GroupKDLoss

    criterion = GroupKDLoss(backend=backend)

    def step(x, teacher_logits, labels):
        return criterion(model(x), teacher_logits, labels)

    eager = step(inputs, teachers, target)
    eager.backward()
    eager_grad = model.weight.grad.clone()
    model.zero_grad()
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)(inputs, teachers, target)
    compiled.backward()
    torch.testing.assert_close(compiled, eager, rtol=loss_tol[0], atol=loss_tol[1])
    torch.testing.assert_close(model.weight.grad, eager_grad, rtol=grad_tol[0], atol=grad_tol[1])
