"""Public API: ``group_kd`` (functional) and ``GroupKDLoss`` (module). docs/design.md §3."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from .backends import BACKENDS, op_for, resolve_backend
from .reference import ERROR_RULES

REDUCTIONS = ("none", "mean", "sum")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class GroupKDResult(NamedTuple):
    """Everything one group-KD pass produces.

    ``loss`` is reduced as asked; ``kl`` and ``ce`` are per sample ([S, B], or [B] for a
    2-D student) and carry no gradient; the masks are bool.
    """

    loss: torch.Tensor
    kl: torch.Tensor
    ce: torch.Tensor
    student_correct: torch.Tensor
    teacher_correct: torch.Tensor
    error_mask: torch.Tensor


def _check_logits(name: str, logits: torch.Tensor) -> None:
    if not isinstance(logits, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(logits).__name__}")
    if logits.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, float16 or bfloat16 logits, got {logits.dtype}")


def _stack_teachers(teachers, student: torch.Tensor) -> torch.Tensor:
    if isinstance(teachers, (list, tuple)):
        if len(teachers) == 0:
            raise ValueError("teachers must hold at least one teacher (G = 0)")
        for index, teacher in enumerate(teachers):
            _check_logits(f"teachers[{index}]", teacher)
            if teacher.dim() != 2:
                raise ValueError(f"teachers[{index}] must be [B, C], got shape {tuple(teacher.shape)}")
        teachers = torch.stack([t.detach() for t in teachers])
    _check_logits("teachers", teachers)
    if teachers.dim() != 3:
        raise ValueError(f"teachers must be [G, B, C] or a list of [B, C], got shape {tuple(teachers.shape)}")
    if teachers.shape[0] == 0:
        raise ValueError("teachers must hold at least one teacher (G = 0)")
    if teachers.shape[1:] != student.shape[1:]:
        raise ValueError(
            f"teachers' [B, C] = {list(teachers.shape[1:])} does not match student's {list(student.shape[1:])}"
        )
    if teachers.dtype != student.dtype:
        raise ValueError(f"teachers dtype {teachers.dtype} differs from student dtype {student.dtype}; cast one")
    if teachers.device != student.device:
        raise ValueError(f"teachers are on {teachers.device}, student on {student.device}")
    return teachers.detach()


@functools.lru_cache(maxsize=64)
def _constant_cached(values: tuple, device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device)


def _constant(values: tuple, device: torch.device) -> torch.Tensor:
    """An fp32 tensor of Python values. In eager mode the same few (alpha, weights) recur
    every step, so they are built once; ops only read them."""
    if torch.compiler.is_compiling():
        return torch.tensor(values, dtype=torch.float32, device=device)
    return _constant_cached(values, device)


def _per_network(name: str, value, count: int, like: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """A scalar or one value per network, as an fp32 [count] tensor on the logits' device.

    Python values are checked in Python; tensor values only in eager mode and on the CPU,
    since reading device data would sync the host and break compiled graphs.
    """
    if isinstance(value, torch.Tensor):
        tensor = value.detach().to(device=like.device, dtype=torch.float32).reshape(-1)
        if tensor.numel() == 1:
            tensor = tensor.expand(count)
        values = tensor.tolist() if value.device.type == "cpu" and not torch.compiler.is_compiling() else None
    else:
        values = [float(v) for v in value] if isinstance(value, Sequence) else [float(value)] * count
        tensor = _constant(tuple(values), like.device)
    if tensor.numel() != count:
        raise ValueError(f"{name} must be a scalar or hold {count} values, got {tensor.numel()}")
    if values is not None and not all(low <= v <= high for v in values):
        raise ValueError(f"{name} must lie in [{low}, {high}], got {values}")
    return tensor.contiguous()


def _teacher_weights(teacher_weights, num_teachers: int, like: torch.Tensor) -> torch.Tensor:
    if teacher_weights is None:
        return _constant((1.0 / num_teachers,) * num_teachers, like.device)
    weights = _per_network("teacher_weights", teacher_weights, num_teachers, like, 0.0, math.inf)
    given = teacher_weights if isinstance(teacher_weights, Sequence) else [teacher_weights]
    if not isinstance(teacher_weights, torch.Tensor) and sum(float(w) for w in given) <= 0:
        raise ValueError("teacher_weights must have a positive sum")
    return weights / weights.sum()


def _check_target(target, student: torch.Tensor, ignore_index: int, validate: bool) -> tuple[torch.Tensor, bool]:
    """The target as int64, and whether every row is known to count (no ignore_index)."""
    if not isinstance(target, torch.Tensor):
        raise ValueError(f"target must be a tensor of class indices, got {type(target).__name__}")
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise ValueError(f"target must hold integer class indices, got {target.dtype}")
    if target.dim() != 1 or target.shape[0] != student.shape[1]:
        raise ValueError(f"target must be [B] = [{student.shape[1]}], got shape {tuple(target.shape)}")
    if target.device != student.device:
        raise ValueError(f"target is on {target.device}, student on {student.device}")
    target = target.long()
    if validate and not torch.compiler.is_compiling():
        num_classes = student.shape[-1]
        lowest, highest = (int(v) for v in torch.aminmax(target))
        if lowest >= 0 and highest < num_classes:  # the common case, in one reduction
            return target, not 0 <= ignore_index < num_classes
        bad = (target != ignore_index) & ((target < 0) | (target >= num_classes))
        if bool(bad.any()):
            raise ValueError(
                f"target holds values outside [0, {num_classes}) other than ignore_index={ignore_index}: "
                f"{target[bad][:5].tolist()}"
            )
    return target, False


def check_hyperparameters(temperature: float, alpha, reduction: str, error_rule: str) -> None:
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if not isinstance(alpha, torch.Tensor) and not isinstance(alpha, Sequence):
        if not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1], got {alpha!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if error_rule not in ERROR_RULES:
        raise ValueError(f"error_rule must be one of {ERROR_RULES}, got {error_rule!r}")


def group_kd(
    student: torch.Tensor,
    teachers,
    target: torch.Tensor,
    temperature: float = 4.0,
    alpha=0.9,
    teacher_weights=None,
    ignore_index: int = -100,
    error_rule: str = "any",
    backend: str = "auto",
    reduction: str = "mean",
    error_members=None,
    validate: bool = True,
) -> GroupKDResult:
    """Group knowledge distillation in one pass: loss, per-sample KL and CE, masks.

    Args:
        student: [B, C] or [S, B, C] logits (fp32, fp16 or bf16, any strides).
        teachers: [G, B, C] logits or a list of G [B, C]; never receive gradient.
        target: [B] class indices; rows equal to ``ignore_index`` count for nothing.
        temperature: tau > 0 of the tempered softmaxes.
        alpha: weight of the KD term in [0, 1]; a scalar or one value per student.
        teacher_weights: G non-negative weights of the teachers' mean (normalised);
            uniform when None. A tensor is used as is (no data checks: no host sync).
        error_rule: how the students' mistakes make an error image: any, all,
            majority or ensemble (argmax of the students' mean probability).
        backend: auto, reference, cpu, triton or cuda.
        reduction: none ([S, B], or [B] for a 2-D student), mean (sum over students of
            the mean over counted samples) or sum.
        error_members: [S] 0/1 values marking the students judged by ``error_rule``
            (all of them when None); ORC passes its current student group here.
        validate: check target values on the host (a device sync on CUDA); skipped
            automatically inside torch.compile.
    """
    check_hyperparameters(temperature, alpha, reduction, error_rule)
    _check_logits("student", student)
    if student.dim() not in (2, 3):
        raise ValueError(f"student must be [B, C] or [S, B, C], got shape {tuple(student.shape)}")
    single_student = student.dim() == 2
    students = student.unsqueeze(0) if single_student else student
    if students.shape[0] == 0 or students.shape[1] == 0 or students.shape[2] == 0:
        raise ValueError(f"student must have S, B and C >= 1, got shape {tuple(students.shape)}")
    teachers = _stack_teachers(teachers, students)
    target, all_counted = _check_target(target, students, ignore_index, validate)
    num_students, num_teachers = students.shape[0], teachers.shape[0]
    weights = _teacher_weights(teacher_weights, num_teachers, students)
    alphas = _per_network("alpha", alpha, num_students, students, 0.0, 1.0)
    members = (
        _constant((1.0,) * num_students, students.device)
        if error_members is None
        else _per_network("error_members", error_members, num_students, students, 0.0, 1.0)
    )
    # Kernels read rows with a stride but need unit stride along classes.
    if students.stride(-1) != 1:
        students = students.contiguous()
    if teachers.stride(-1) != 1:
        teachers = teachers.contiguous()

    op = op_for(resolve_backend(backend, students.device))
    loss, kl, ce, student_correct, teacher_correct, error_mask, _ = op(
        students, teachers, target, weights, alphas, members,
        float(temperature), int(ignore_index), ERROR_RULES.index(error_rule),
    )
    if reduction == "sum":
        loss = loss.sum()
    elif reduction == "mean":
        counted = target.shape[0] if all_counted else (target != ignore_index).sum()
        loss = loss.sum() / counted
    if single_student:
        kl, ce, student_correct = kl[0], ce[0], student_correct[0]
        if reduction == "none":
            loss = loss[0]
    return GroupKDResult(loss, kl, ce, student_correct, teacher_correct, error_mask)


class GroupKDLoss(nn.Module):
    """Online group knowledge distillation loss (docs/design.md §3).

    ``loss(student, teachers, target)`` with student [B, C] or [S, B, C] and teachers
    [G, B, C] or a list of G [B, C]. Per student s and sample b:
    (1 - alpha) CE(z_sb, y_b) + alpha tau^2 KL(p_b || softmax(z_sb / tau)), where p_b is
    the (weighted) mean of the teachers' softmax(z_gb / tau).
    """

    def __init__(
        self,
        temperature: float = 4.0,
        alpha: float = 0.9,
        reduction: str = "mean",
        teacher_weights=None,
        ignore_index: int = -100,
        backend: str = "auto",
    ):
        super().__init__()
        check_hyperparameters(temperature, alpha, reduction, "any")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.temperature = temperature
        self.alpha = alpha
        self.reduction = reduction
        self.teacher_weights = teacher_weights
        self.ignore_index = ignore_index
        self.backend = backend

    def forward(self, student: torch.Tensor, teachers, target: torch.Tensor) -> torch.Tensor:
        return group_kd(
            student, teachers, target,
            temperature=self.temperature, alpha=self.alpha, teacher_weights=self.teacher_weights,
            ignore_index=self.ignore_index, backend=self.backend, reduction=self.reduction,
        ).loss

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, alpha={self.alpha}, reduction={self.reduction!r}, "
            f"ignore_index={self.ignore_index}, backend={self.backend!r}"
        )
