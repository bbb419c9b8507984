"""Public API: ``group_kd`` (functional) and ``GroupKDLoss`` (module). docs/design.md §3.

What the loss takes (the drop-in forms KD code passes):

* ``student``: [B, C] or [S, B, C] logits; ``teachers``: [G, B, C], a list of G [B, C], or
  one teacher's [B, C] tensor (G = 1, with either student rank: mdistiller-style
  ``loss(student, teacher, target)``). Any other rank, a list of other than [B, C] tensors
  and a [B, C] teacher that is not the student's [B, C] raise ``ValueError``.
* Logits fp32, fp16, bf16 or float64. float64 runs float64 math (``reference`` and ``cpu``;
  ``torch.autograd.gradcheck`` works); ``triton`` and ``cuda`` refuse it.
* Hyperparameters (temperature, alpha, teacher_weights, error_members, ignore_index) as
  Python numbers or sequences, numpy scalars or arrays, or tensors (0-d or one value per
  network). Tensor alpha and teacher_weights keep their gradient.

Reduction: ``none`` gives the per-sample loss [S, B] ([B] for a 2-D student); ``sum``
sums over students and samples; ``mean`` is the **sum over students** of each student's
mean over the counted samples (rows whose target is not ``ignore_index``), so each
student's gradient is the one its own mean loss would give and S students are not
averaged together.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from .backends import BACKENDS, op_for, resolve_backend
from .reference import ERROR_RULES

REDUCTIONS = ("none", "mean", "sum")
# The fused kernels' logit dtypes (fused_linear takes only these).
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# group_kd's: float64 too, computed in float64 (reference math; see backends.op_for).
LOGIT_DTYPES = FLOAT_DTYPES + (torch.float64,)
TEACHER_FORMS = "[G, B, C], one teacher's [B, C] (G = 1) or a list of G [B, C]"


class GroupKDResult(NamedTuple):
    """Everything one group-KD pass produces.

    ``loss`` is reduced as asked; ``kl`` and ``ce`` are per sample ([S, B], or [B] for a
    2-D student) and carry no gradient; the masks are bool. loss, kl and ce are fp32
    (float64 for float64 logits).
    """

    loss: torch.Tensor
    kl: torch.Tensor
    ce: torch.Tensor
    student_correct: torch.Tensor
    teacher_correct: torch.Tensor
    error_mask: torch.Tensor


# ---------------------------------------------------------------------- hyperparameters


def _plain(value):
    """numpy scalars and arrays as Python numbers and lists, so they take the Python path
    (checked on the host, cached as constants). torch does not need numpy, so it is
    recognised by its module rather than imported."""
    if type(value).__module__ == "numpy" and hasattr(value, "tolist"):
        return value.tolist()
    return value


def _number(name: str, value) -> float:
    """A Python number, numpy scalar or one-element tensor/array as a float (a tensor is
    read on the host: a sync for a CUDA tensor)."""
    value = _plain(value)
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number or a one-element tensor, got shape {tuple(value.shape)}")
        if value.requires_grad:
            raise ValueError(f"{name} gets no gradient from the loss; pass {name}.detach()")
        value = value.item()
    if isinstance(value, (list, tuple)) and len(value) == 1:
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    return float(value)


def check_temperature(temperature) -> float:
    value = _number("temperature", temperature)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return value


def check_ignore_index(ignore_index) -> int:
    """Any integer: a Python or numpy int, or a one-element integer tensor."""
    value = _plain(ignore_index)
    if isinstance(value, bool):
        raise ValueError(f"ignore_index must be an integer, got {ignore_index!r}")
    try:
        return operator.index(value)  # numpy ints and 0-d integer tensors implement __index__
    except TypeError:
        raise ValueError(f"ignore_index must be an integer, got {ignore_index!r}") from None


def parameter_dtype(logits: torch.Tensor) -> torch.dtype:
    """The dtype of the per-network vectors the ops take: fp32, float64 for float64 logits."""
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


@functools.lru_cache(maxsize=64)
def _constant_cached(values: tuple, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=device)


def _constant(values: tuple, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A tensor of Python values. In eager mode the same few (alpha, weights) recur every
    step, so they are built once; ops only read them."""
    if torch.compiler.is_compiling():
        return torch.tensor(values, dtype=dtype, device=device)
    return _constant_cached(values, device, dtype)


def _python_values(name: str, value, count: int) -> list[float]:
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        items = list(value)
    else:
        items = [value] * count
    try:
        return [float(v) for v in items]
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{name} must be a number, a sequence of numbers or a tensor, got {value!r}") from None


def _per_network_values(name: str, value, count: int, like: torch.Tensor, validate: bool):
    """A scalar or one value per network as a [count] tensor on the logits' device (in
    ``parameter_dtype``), and its values on the host where they are to be checked.

    Python and numpy values are always checked (no device data is read). Tensor values
    keep their gradient; their data is read (a host sync on CUDA) only when ``validate``
    in eager mode, and not at all inside torch.compile, where it cannot be.
    """
    value = _plain(value)
    if isinstance(value, torch.Tensor):
        tensor = value.to(device=like.device, dtype=parameter_dtype(like)).reshape(-1)
        if tensor.numel() == 1:
            tensor = tensor.expand(count)
        checked = validate and not torch.compiler.is_compiling() and tensor.numel() == count
        values = tensor.detach().tolist() if checked else None
    else:
        values = _python_values(name, value, count)
        tensor = _constant(tuple(values), like.device, parameter_dtype(like))
    if tensor.numel() != count:
        raise ValueError(f"{name} must be a scalar or hold {count} values, got {tensor.numel()}")
    return tensor.contiguous(), values


def _check_range(name: str, values: list[float] | None, low: float, high: float) -> None:
    if values is not None and not all(low <= v <= high for v in values):  # NaN fails too
        raise ValueError(f"{name} must lie in [{low}, {high}], got {values}")


def _per_network(name: str, value, count: int, like: torch.Tensor, low: float, high: float,
                 validate: bool = True) -> torch.Tensor:
    tensor, values = _per_network_values(name, value, count, like, validate)
    _check_range(name, values, low, high)
    return tensor


def _teacher_weights(teacher_weights, num_teachers: int, like: torch.Tensor, validate: bool = True) -> torch.Tensor:
    """The teachers' mixing weights, normalised to sum 1 (differentiably, for a tensor).

    All-zero or negative weights raise: 0 / 0 would give NaN weights, which the backends
    turn into different wrong answers. A tensor's values are checked only when
    ``validate`` (see _per_network_values).
    """
    if teacher_weights is None:
        return _constant((1.0 / num_teachers,) * num_teachers, like.device, parameter_dtype(like))
    weights, values = _per_network_values("teacher_weights", teacher_weights, num_teachers, like, validate)
    if values is not None and not all(0.0 <= v < math.inf for v in values):
        raise ValueError(f"teacher_weights must be finite and >= 0, got {values}")
    if values is not None and not sum(values) > 0:
        raise ValueError(f"teacher_weights must have a positive sum (not all zero), got {values}")
    return weights / weights.sum()


def check_hyperparameters(temperature, alpha, reduction: str, error_rule: str) -> None:
    """What can be checked without the logits (GroupKDLoss checks it at construction)."""
    check_temperature(temperature)
    alpha = _plain(alpha)
    if not isinstance(alpha, (torch.Tensor, Sequence)):
        _check_range("alpha", [_number("alpha", alpha)], 0.0, 1.0)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if error_rule not in ERROR_RULES:
        raise ValueError(f"error_rule must be one of {ERROR_RULES}, got {error_rule!r}")


# ------------------------------------------------------------------------ logits, target


def _check_logits(name: str, logits) -> None:
    if not isinstance(logits, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(logits).__name__}")
    if logits.dtype not in LOGIT_DTYPES:
        raise ValueError(f"{name} must be float32, float16, bfloat16 or float64 logits, got {logits.dtype}")


def _stack_teachers(teachers, student: torch.Tensor) -> torch.Tensor:
    """The teachers as one detached [G, B, C] tensor (student is [S, B, C])."""
    if isinstance(teachers, (list, tuple)):
        if len(teachers) == 0:
            raise ValueError("teachers must hold at least one teacher (G = 0)")
        for index, teacher in enumerate(teachers):
            _check_logits(f"teachers[{index}]", teacher)
            if teacher.dim() != 2:
                # a list of [G_i, B, C] could mean stacking or concatenating: refused
                raise ValueError(f"teachers[{index}] must be [B, C], got shape {tuple(teacher.shape)}")
        teachers = torch.stack([t.detach() for t in teachers])
    _check_logits("teachers", teachers)
    one_teacher = teachers.dim() == 2
    if one_teacher:
        teachers = teachers.unsqueeze(0)
    if teachers.dim() != 3:
        raise ValueError(f"teachers must be {TEACHER_FORMS}, got shape {tuple(teachers.shape)}")
    if teachers.shape[0] == 0:
        raise ValueError("teachers must hold at least one teacher (G = 0)")
    if teachers.shape[1:] != student.shape[1:]:
        hint = " (a 2-D teacher is one teacher's [B, C]; stack G teachers as [G, B, C])" if one_teacher else ""
        raise ValueError(
            f"teachers' [B, C] = {list(teachers.shape[1:])} does not match student's {list(student.shape[1:])}{hint}"
        )
    if teachers.dtype != student.dtype:
        raise ValueError(f"teachers dtype {teachers.dtype} differs from student dtype {student.dtype}; cast one")
    if teachers.device != student.device:
        raise ValueError(f"teachers are on {teachers.device}, student on {student.device}")
    return teachers.detach()


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


# ------------------------------------------------------------------------------ the loss


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
        student: [B, C] or [S, B, C] logits (fp32, fp16, bf16 or float64, any strides).
        teachers: [G, B, C] logits, a list of G [B, C], or one teacher's [B, C] (G = 1,
            with either student rank); never receive gradient.
        target: [B] class indices; rows equal to ``ignore_index`` count for nothing.
        temperature: tau > 0 of the tempered softmaxes (a number, numpy scalar or
            one-element tensor, read on the host).
        alpha: weight of the KD term in [0, 1]; a scalar or one value per student
            (Python, numpy or a tensor; a tensor gets d loss / d alpha).
        teacher_weights: G non-negative weights, not all zero, of the teachers' mean
            (normalised); uniform when None. A tensor gets d loss / d weights.
        error_rule: how the students' mistakes make an error image: any, all,
            majority or ensemble (argmax of the students' mean probability).
        backend: auto, reference, cpu, triton or cuda (float64: reference or cpu).
        reduction: none ([S, B], or [B] for a 2-D student), mean (sum over students of
            each student's mean over counted samples) or sum (over students and samples).
        error_members: [S] 0/1 values marking the students judged by ``error_rule``
            (all of them when None); ORC passes its current student group here.
        validate: check the values held in tensors -- target classes, alpha, teacher
            weights (negative or all zero), error_members -- on the host (a device sync on
            CUDA). False (the trainer's no-sync path) skips these checks: bad values then
            give NaN or meaningless results, which may differ between backends. Skipped
            automatically inside torch.compile. Python and numpy values are always checked.
    """
    temperature, ignore_index = check_temperature(temperature), check_ignore_index(ignore_index)
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
    weights = _teacher_weights(teacher_weights, num_teachers, students, validate)
    alphas = _per_network("alpha", alpha, num_students, students, 0.0, 1.0, validate)
    members = (
        _constant((1.0,) * num_students, students.device, parameter_dtype(students))
        if error_members is None
        else _per_network("error_members", error_members, num_students, students, 0.0, 1.0, validate)
    )
    # Kernels read rows with a stride but need unit stride along classes.
    if students.stride(-1) != 1:
        students = students.contiguous()
    if teachers.stride(-1) != 1:
        teachers = teachers.contiguous()

    op = op_for(resolve_backend(backend, students.device, students.dtype), students.dtype)
    loss, kl, ce, student_correct, teacher_correct, error_mask, _ = op(
        students, teachers, target, weights, alphas, members,
        temperature, ignore_index, ERROR_RULES.index(error_rule),
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
    [G, B, C], a list of G [B, C] or one teacher's [B, C]. Per student s and sample b:
    (1 - alpha) CE(z_sb, y_b) + alpha tau^2 KL(p_b || softmax(z_sb / tau)), where p_b is
    the (weighted) mean of the teachers' softmax(z_gb / tau).

    ``reduction="mean"`` (the default) sums over students the mean over counted samples:
    with one student it is the usual batch mean; S students give S times the scale of
    their average. ``"sum"`` sums everything, ``"none"`` returns [S, B] ([B]).
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
        self.temperature = check_temperature(temperature)
        self.alpha = alpha
        self.reduction = reduction
        self.teacher_weights = teacher_weights
        self.ignore_index = check_ignore_index(ignore_index)
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
