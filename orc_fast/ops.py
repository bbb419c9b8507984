"""The group-KD operators: every torch.library registration of orc_fast happens here.

Every backend is one custom op with the same schema (docs/design.md §4):

    (student [S,B,C], teachers [G,B,C], target [B] int64, teacher_weights [G] fp32,
     alpha [S] fp32, error_members [S] fp32, temperature, ignore_index, error_rule)
    -> (loss [S,B] fp32, kl [S,B] fp32, ce [S,B] fp32, student_correct [S,B] bool,
        teacher_correct [G,B] bool, error_mask [B] bool, grad [S,B,C] student dtype)

``grad`` is d loss[s,b] / d student[s,b,:], produced in the same pass as the loss.
Backward only scales it by the incoming gradient of ``loss``; kl, ce and the masks are
diagnostics and carry no gradient.

Ops: ``orc_fast::group_kd_reference`` (defined here), ``orc_fast::group_kd_fused``
(schema and kernels in C++, csrc/; its fake and autograd are registered here),
``orc_fast::group_kd_triton`` (kernels/, which registers it with this module's autograd).
Everything is registered at import: torch.compile may trace the backend dispatch, and a
first registration inside a traced region is not allowed. Which backend runs is decided
in backends.py, which imports the op objects from here.
"""

from __future__ import annotations

import torch

from .reference import group_kd_reference


def group_kd_fake(student, teachers, target, teacher_weights, alpha, error_members, temperature, ignore_index, error_rule):
    """Output shapes and dtypes, for torch.compile's fake tensors."""
    num_students, batch, _ = student.shape
    num_teachers = teachers.shape[0]
    per_sample = student.new_empty((num_students, batch), dtype=torch.float32)
    return (
        per_sample,
        torch.empty_like(per_sample),
        torch.empty_like(per_sample),
        student.new_empty((num_students, batch), dtype=torch.bool),
        student.new_empty((num_teachers, batch), dtype=torch.bool),
        student.new_empty((batch,), dtype=torch.bool),
        student.new_empty(student.shape, dtype=student.dtype),
    )


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[6])
    ctx.mark_non_differentiable(*output[1:])
    # Only `loss` carries gradient: don't have autograd fill zero tensors (one of them
    # [S, B, C]) for the outputs nobody differentiates.
    ctx.set_materialize_grads(False)


HUGE_PAGE_NUMEL = 1 << 20  # below this, page faults are cheap and a plain multiply is quicker


def _backward(ctx, grad_loss, *unused_grads):
    (per_sample_grad,) = ctx.saved_tensors
    if not ctx.needs_input_grad[0] or grad_loss is None:
        return (None,) * 9
    # Out of place, so the saved gradient stays valid for another backward through the
    # same loss (retain_graph, per-member autograd.grad). On the CPU the product is
    # written into huge pages: a fresh [S, B, C] tensor from a plain multiply costs as much
    # as the whole forward in 4 KiB page faults at vocabulary sizes.
    if per_sample_grad.device.type == "cpu" and per_sample_grad.numel() >= HUGE_PAGE_NUMEL and EXTENSION_MISSING is None:
        grad_student = torch.ops.orc_fast.group_kd_scale_grad(per_sample_grad, grad_loss)
    else:
        grad_student = (per_sample_grad * grad_loss.unsqueeze(-1)).to(per_sample_grad.dtype)
    return (grad_student,) + (None,) * 8


def register_autograd_and_fake(op, fake: bool = True) -> None:
    """Give a group-KD op (any backend) its autograd formula and, if asked, its fake."""
    if fake:
        torch.library.register_fake(op, group_kd_fake)
    torch.library.register_autograd(op, _backward, setup_context=_setup_context)


@torch.library.custom_op("orc_fast::group_kd_reference", mutates_args=())
def group_kd_reference_op(
    student: torch.Tensor,
    teachers: torch.Tensor,
    target: torch.Tensor,
    teacher_weights: torch.Tensor,
    alpha: torch.Tensor,
    error_members: torch.Tensor,
    temperature: float,
    ignore_index: int,
    error_rule: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return group_kd_reference(
        student, teachers, target, teacher_weights, alpha, error_members, temperature, ignore_index, error_rule
    )


register_autograd_and_fake(group_kd_reference_op)


def _load_extension() -> str | None:
    """Load the C++ extension (its TORCH_LIBRARY block defines group_kd_fused and
    group_kd_scale_grad); return why it is missing, or None when it loaded."""
    try:
        from . import _C  # noqa: F401
    except ImportError as error:
        return f"the C++ extension orc_fast._C is not built ({error}); reinstall with a C++ compiler present"
    return None


EXTENSION_MISSING = _load_extension()
# None where the extension is not built; backends.py then never dispatches to it.
group_kd_fused_op = None if EXTENSION_MISSING else torch.ops.orc_fast.group_kd_fused.default
if group_kd_fused_op is not None:
    register_autograd_and_fake(group_kd_fused_op)
