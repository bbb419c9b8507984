"""The group-KD operators, registered with torch.library, and their shared autograd.

Every backend is one custom op with the same schema (DESIGN.md section 4):

    (student [S,B,C], teachers [G,B,C], target [B] int64, teacher_weights [G] fp32,
     alpha [S] fp32, error_members [S] fp32, temperature, ignore_index, error_rule)
    -> (loss [S,B] fp32, kl [S,B] fp32, ce [S,B] fp32, student_correct [S,B] bool,
        teacher_correct [G,B] bool, error_mask [B] bool, grad [S,B,C] student dtype)

``grad`` is d loss[s,b] / d student[s,b,:], produced in the same pass as the loss.
Backward only scales it, in place, by the incoming gradient of ``loss`` (so one forward
supports one backward); kl, ce and the masks are diagnostics and carry no gradient.

Ops: ``orc_fast::group_kd_reference`` (here), ``orc_fast::group_kd_fused`` (C++ in
csrc/, CPU and CUDA implementations), ``orc_fast::group_kd_triton`` (kernels/).
"""

from __future__ import annotations

import torch

from .reference import group_kd_reference

OUTPUT_NAMES = ("loss", "kl", "ce", "student_correct", "teacher_correct", "error_mask", "grad")


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


def _traced(tensor: torch.Tensor) -> bool:
    """True while torch.compile / AOTAutograd trace (fake or functional tensors)."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor

    return torch.compiler.is_compiling() or isinstance(tensor, (FakeTensor, FunctionalTensor))


def _backward(ctx, grad_loss, *unused_grads):
    try:
        (per_sample_grad,) = ctx.saved_tensors
    except RuntimeError as error:
        raise RuntimeError(
            "orc_fast group-KD: backward ran twice through one loss (retain_graph): its per-sample "
            "gradient buffer is scaled in place by the first backward, so a second one is not supported"
        ) from error
    if not ctx.needs_input_grad[0] or grad_loss is None:
        return (None,) * 9
    # Scale the gradient the forward already wrote, in place: no second [S, B, C] tensor
    # and no second pass over fresh memory. Autograd's version counter turns any later
    # use of the saved buffer into the error above, never into a wrong gradient.
    scale = grad_loss.unsqueeze(-1)
    if _traced(per_sample_grad):  # traced graphs must not mutate a saved activation
        return (per_sample_grad * scale).to(per_sample_grad.dtype), *(None,) * 8
    return per_sample_grad.mul_(scale), *(None,) * 8


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
