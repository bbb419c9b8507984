"""The group-KD operators: every torch.library registration of orc_fast happens here.

Every backend is one custom op with the same schema (docs/design.md §4):

    (student [S,B,C], teachers [G,B,C], target [B] int64, teacher_weights [G] fp32,
     alpha [S] fp32, error_members [S] fp32, temperature, ignore_index, error_rule)
    -> (loss [S,B] fp32, kl [S,B] fp32, ce [S,B] fp32, student_correct [S,B] bool,
        teacher_correct [G,B] bool, error_mask [B] bool, grad [S,B,C] student dtype)

(float64 logits, taken by the reference op only, come with float64 teacher_weights and
alpha and give float64 loss, kl and ce.) ``grad`` is d loss[s,b] / d student[s,b,:],
produced in the same pass as the loss. Backward only scales it by the incoming gradient
of ``loss``; kl, ce and the masks are diagnostics and carry no gradient. alpha and
teacher_weights get their gradients in backward, only when they require one: alpha's
from the saved kl and ce, the weights' from the logits (recomputed in torch, the
reference's maths).

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
    per_sample_dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
    per_sample = student.new_empty((num_students, batch), dtype=per_sample_dtype)
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
    student, teachers, target, teacher_weights, alpha, _, temperature, ignore_index, _ = inputs
    want_weights, want_alpha = ctx.needs_input_grad[3], ctx.needs_input_grad[4]
    # Only what a requested gradient needs: the logits are kept alive only for a
    # teacher_weights gradient (the fused linear head frees each chunk's logits).
    ctx.save_for_backward(
        output[6],
        output[1] if want_alpha else None,
        output[2] if want_alpha else None,
        *((student, teachers, target, teacher_weights, alpha) if want_weights else (None,) * 5),
    )
    ctx.temperature, ctx.ignore_index, ctx.alpha_dtype = temperature, ignore_index, alpha.dtype
    ctx.mark_non_differentiable(*output[1:])
    # Only `loss` carries gradient: don't have autograd fill zero tensors (one of them
    # [S, B, C]) for the outputs nobody differentiates.
    ctx.set_materialize_grads(False)


HUGE_PAGE_NUMEL = 1 << 20  # below this, page faults are cheap and a plain multiply is quicker


def _student_grad(per_sample_grad, grad_loss):
    # Out of place, so the saved gradient stays valid for another backward through the
    # same loss (retain_graph, per-member autograd.grad). On the CPU the product is
    # written into huge pages: a fresh [S, B, C] tensor from a plain multiply costs as much
    # as the whole forward in 4 KiB page faults at vocabulary sizes (the C++ helper takes
    # the kernels' dtypes, not float64).
    if (per_sample_grad.device.type == "cpu" and per_sample_grad.numel() >= HUGE_PAGE_NUMEL
            and per_sample_grad.dtype != torch.float64 and EXTENSION_MISSING is None):
        return torch.ops.orc_fast.group_kd_scale_grad(per_sample_grad, grad_loss)
    return (per_sample_grad * grad_loss.unsqueeze(-1)).to(per_sample_grad.dtype)


def _alpha_grad(kl, ce, grad_loss, temperature, alpha_dtype):
    # loss = (1 - a_s) ce + a_s tau^2 kl, so d loss_sb / d a_s = tau^2 kl_sb - ce_sb
    # (both 0 on ignored rows).
    return (grad_loss * (temperature**2 * kl - ce)).sum(1).to(alpha_dtype)


def _teacher_weights_grad(grad_loss, student, teachers, target, weights, alpha, temperature, ignore_index):
    """d sum(grad_loss * loss) / d w for the normalised weights w the op took.

    With p_bc = sum_g w_g P_gbc (P: the teachers' softmax at tau) and q the student's,
    d loss_sb / d w_g = a_s tau^2 sum_c P_gbc (log p_bc - log q_sbc + 1) over the classes
    p gives mass (the reference's 0 log 0 = 0), on counted rows. Summed over s first, so
    nothing [S, G, B, C] is formed.
    """
    dtype = grad_loss.dtype
    probs = torch.softmax(teachers.to(dtype) / temperature, -1)  # [G, B, C]
    mean_prob = (weights.to(dtype)[:, None, None] * probs).sum(0)  # [B, C]
    has_mass = mean_prob != 0
    valid = target != ignore_index
    log_q = torch.log_softmax(student.to(dtype) / temperature, -1)  # [S, B, C]
    # masked before the products: 0 * -inf must not turn a ruled-out class into NaN
    log_q = torch.where(has_mass[None] & valid[None, :, None], log_q, torch.zeros((), dtype=dtype, device=log_q.device))
    coefficient = torch.where(valid, grad_loss * alpha.to(dtype)[:, None] * temperature**2, 0.0)  # [S, B]
    total = coefficient.sum(0)  # [B]
    log_p = torch.log(torch.where(has_mass, mean_prob, torch.ones_like(mean_prob)))
    per_class = total[:, None] * (log_p + 1) - torch.einsum("sb,sbc->bc", coefficient, log_q)
    per_class = torch.where(has_mass, per_class, torch.zeros_like(per_class))
    return torch.einsum("gbc,bc->g", probs, per_class).to(weights.dtype)


def _backward(ctx, grad_loss, *unused_grads):
    per_sample_grad, kl, ce, student, teachers, target, weights, alpha = ctx.saved_tensors
    grads = [None] * 9
    if grad_loss is None:
        return tuple(grads)
    if ctx.needs_input_grad[0]:
        grads[0] = _student_grad(per_sample_grad, grad_loss)
    if ctx.needs_input_grad[3]:
        grads[3] = _teacher_weights_grad(grad_loss, student, teachers, target, weights, alpha, ctx.temperature,
                                         ctx.ignore_index)
    if ctx.needs_input_grad[4]:
        grads[4] = _alpha_grad(kl, ce, grad_loss, ctx.temperature, ctx.alpha_dtype)
    return tuple(grads)


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
