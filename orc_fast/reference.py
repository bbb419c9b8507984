"""The group-KD loss in plain PyTorch: the specification every kernel is tested against.

docs/design.md §3. Two functions:

* ``group_kd_math`` computes the loss parts and masks with differentiable torch ops in
  whatever floating dtype it is given. Tests run it in float64 and differentiate it with
  autograd to get the "true" gradient.
* ``group_kd_reference`` is the ``reference`` backend: the same math in fp32 (float64 for
  float64 logits) plus the closed-form student gradient, with the exact input/output
  contract of the fused kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Index of each error rule as passed to the ops (kernels take an int).
ERROR_RULES = ("any", "all", "majority", "ensemble")


def error_mask_from(
    student_logits: torch.Tensor,
    student_correct: torch.Tensor,
    valid: torch.Tensor,
    error_members: torch.Tensor,
    target: torch.Tensor,
    error_rule: int,
) -> torch.Tensor:
    """Which samples the student group gets wrong, under one of ERROR_RULES.

    ``error_members`` [S] (0/1) says which students belong to the group that is judged;
    samples whose target is ignored are never error images.
    """
    members = error_members > 0  # [S]
    wrong = (~student_correct) & members[:, None]  # [S, B]
    n_members = members.sum()
    rule = ERROR_RULES[error_rule]
    if rule == "any":
        mask = wrong.any(0)
    elif rule == "all":
        mask = (wrong.sum(0) == n_members) & (n_members > 0)
    elif rule == "majority":
        mask = 2 * wrong.sum(0) > n_members
    else:  # ensemble: argmax of the members' mean (tau = 1) probability
        probs = torch.softmax(student_logits.float(), dim=-1) * members[:, None, None]
        ensemble_pred = probs.sum(0).argmax(-1)
        mask = (ensemble_pred != target) & (n_members > 0)
    return mask & valid


def group_kd_math(
    student: torch.Tensor,
    teachers: torch.Tensor,
    target: torch.Tensor,
    teacher_weights: torch.Tensor,
    alpha: torch.Tensor,
    error_members: torch.Tensor,
    temperature: float,
    ignore_index: int,
    error_rule: int,
):
    """Loss parts of docs/design.md §3, differentiable in ``student``.

    student [S, B, C], teachers [G, B, C], target [B] int64, teacher_weights [G] summing
    to 1, alpha [S], error_members [S]. Arithmetic happens in ``student.dtype``.
    Returns (loss [S, B], kl [S, B], ce [S, B], student_correct [S, B],
    teacher_correct [G, B], error_mask [B]); ignored rows hold 0 / False.
    """
    dtype = student.dtype
    teachers = teachers.detach().to(dtype)
    valid = target != ignore_index
    safe_target = torch.where(valid, target, torch.zeros_like(target))

    teacher_prob = torch.softmax(teachers / temperature, dim=-1)  # [G, B, C]
    mean_prob = (teacher_weights.to(dtype)[:, None, None] * teacher_prob).sum(0)  # [B, C]
    student_logq = torch.log_softmax(student / temperature, dim=-1)  # [S, B, C]
    # KL(p || q) with 0 * log 0 = 0: classes the teachers give no mass drop out, even
    # where the student's log-probability is -inf.
    has_mass = mean_prob != 0  # NaN counts as mass, so it propagates (NaN policy)
    log_mean_prob = torch.log(torch.where(has_mass, mean_prob, torch.ones_like(mean_prob)))
    kl_terms = torch.where(has_mass, mean_prob * (log_mean_prob - student_logq), torch.zeros_like(student_logq))
    kl = kl_terms.sum(-1)  # [S, B]

    student_logp = torch.log_softmax(student, dim=-1)
    index = safe_target[None, :, None].expand(student.shape[0], -1, 1)
    ce = -student_logp.gather(-1, index).squeeze(-1)  # [S, B]

    zero = torch.zeros((), dtype=dtype, device=student.device)
    kl = torch.where(valid, kl, zero)
    ce = torch.where(valid, ce, zero)
    alpha = alpha.to(dtype)[:, None]
    loss = (1 - alpha) * ce + alpha * temperature**2 * kl

    student_correct = (student.detach().argmax(-1) == target) & valid
    teacher_correct = (teachers.argmax(-1) == target) & valid
    error_mask = error_mask_from(student.detach(), student_correct, valid, error_members, target, error_rule)
    return loss, kl, ce, student_correct, teacher_correct, error_mask


def group_kd_reference(
    student: torch.Tensor,
    teachers: torch.Tensor,
    target: torch.Tensor,
    teacher_weights: torch.Tensor,
    alpha: torch.Tensor,
    error_members: torch.Tensor,
    temperature: float,
    ignore_index: int,
    error_rule: int,
):
    """The ``reference`` backend: fp32 math plus the per-sample student gradient.

    Same contract as the fused kernels: returns (loss, kl, ce, student_correct,
    teacher_correct, error_mask, grad) where grad [S, B, C] (student dtype) is
    d loss[s, b] / d student[s, b, :]. float64 logits (with float64 teacher_weights and
    alpha) are computed in float64, and loss, kl and ce are then float64 too: the one
    float64 path of every backend (backends.op_for).
    """
    compute = torch.float64 if student.dtype == torch.float64 else torch.float32
    logits = student.detach().to(compute)
    teacher_logits = teachers.to(compute)
    weights, alphas = teacher_weights.detach().to(compute), alpha.detach().to(compute)
    loss, kl, ce, student_correct, teacher_correct, error_mask = group_kd_math(
        logits, teacher_logits, target, weights, alphas,
        error_members, temperature, ignore_index, error_rule,
    )
    valid = target != ignore_index
    safe_target = torch.where(valid, target, torch.zeros_like(target))
    # d/dz [(1-a) CE + a t^2 KL] = (1-a)(softmax(z) - onehot(y)) + a t (softmax(z/t) - p)
    mean_prob = (weights[:, None, None] * torch.softmax(teacher_logits / temperature, -1)).sum(0)
    onehot = F.one_hot(safe_target, student.shape[-1]).to(compute)
    a = alphas[:, None, None]
    grad = (1 - a) * (torch.softmax(logits, -1) - onehot) + a * temperature * (
        torch.softmax(logits / temperature, -1) - mean_prob
    )
    grad = torch.where(valid[None, :, None], grad, torch.zeros((), dtype=compute, device=grad.device))
    return loss, kl, ce, student_correct, teacher_correct, error_mask, grad.to(student.dtype)
