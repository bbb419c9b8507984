"""Group KD straight from hidden states: the LM head and the loss, chunk by chunk.

docs/design.md §4. A language model's logits are [N, V] per network with V in the tens or
hundreds of thousands; materialising the student's and G teachers' logits (and the
student's logit gradient) costs (G + 2)·N·V values. ``FusedLinearGroupKDLoss`` never holds
more than one chunk of rows: for rows [r, r + chunk) it computes

    z_s = h_s[r:r+chunk] @ W_s^T (+ b_s)               student logits  [chunk, V]
    z_g = h_g[r:r+chunk] @ W_g^T (+ b_g), g = 1..G     teacher logits  [G, chunk, V]

runs the existing group-KD op on them (one student, ``orc_fast.ops``; the loss maths is
the op's, nothing is re-derived here), and turns the op's per-sample logit gradient
``d_b = d loss_b / d z_s[b]`` at once into the parameter gradients

    grad_h[r:r+chunk] = d @ W_s,   grad_W_s += d^T @ h_s[r:r+chunk],   grad_b_s += sum_b d_b.

So peak memory is O(chunk · V) (plus the [V, H] weight-gradient accumulator) instead of
O((G + 1) · N · V). The backward only multiplies these saved gradients by the incoming
scalar gradient (times 1 / counted rows for ``mean``). Teachers get no gradient.

The loss per token b (with p̄_b the weighted mean of the teachers' softmax(z_gb / τ)) is

    loss_b = (1 − α)·CE(z_sb, y_b) + α·τ²·KL(p̄_b ‖ softmax(z_sb / τ)),

rows whose target is ``ignore_index`` count for nothing (``mean`` divides by the number
of counted rows).

Dtypes: hidden states and head weights are fp32, fp16 or bf16, all the same dtype. The
logits are computed in that dtype by the matmul (which accumulates in fp32), exactly as
``F.linear`` would give them to a materialised loss; the op then works in fp32 inside.
The head-weight and bias gradients are accumulated over chunks in fp32 and returned in
the weight's dtype; the hidden-state gradient is written per chunk in the hidden dtype.

Sparse teachers (``teacher_topk=(indices [G, N, K], logprobs [G, N, K])``): teacher g's
distribution on token b is its top-K renormalised at temperature τ,

    p_gk ∝ exp(logprob_gk / τ) over the K kept classes, exactly 0 on every other class,

with 0·log 0 = 0 in the KL. This is the dense loss on teacher logits that equal the
log-probabilities on the kept classes and −inf elsewhere, which is how it is computed:
each chunk's top-K is scattered into a dense [G, chunk, V] tensor filled with −inf (the op
treats −inf logits as classes with no mass). Indices within a row must be distinct.
Log-probabilities need not be normalised (the renormalisation absorbs any constant).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .backends import BACKENDS, op_for, resolve_backend
from .loss import (
    FLOAT_DTYPES,
    GroupKDResult,
    _check_target,
    _constant,
    _per_network,
    _teacher_weights,
    check_hyperparameters,
    check_ignore_index,
    check_temperature,
    group_kd,
)
from .reference import ERROR_RULES

FUSED_REDUCTIONS = ("mean", "sum")


# ---------------------------------------------------------------------------- validation


def _check_matrix(name: str, tensor, rows: int | None, cols: int | None, like: torch.Tensor | None) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(tensor).__name__}")
    if tensor.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, float16 or bfloat16, got {tensor.dtype}")
    if tensor.dim() != 2 or 0 in tensor.shape:
        raise ValueError(f"{name} must be a non-empty 2-D matrix, got shape {tuple(tensor.shape)}")
    if (rows is not None and tensor.shape[0] != rows) or (cols is not None and tensor.shape[1] != cols):
        want = f"[{rows if rows is not None else '*'}, {cols if cols is not None else '*'}]"
        raise ValueError(f"{name} must be {want}, got shape {tuple(tensor.shape)}")
    if like is not None:
        if tensor.dtype != like.dtype:
            raise ValueError(f"{name} dtype {tensor.dtype} differs from student_hidden dtype {like.dtype}; cast one")
        if tensor.device != like.device:
            raise ValueError(f"{name} is on {tensor.device}, student_hidden on {like.device}")


def _check_bias(name: str, bias, vocab: int, like: torch.Tensor) -> None:
    if bias is None:
        return
    if not isinstance(bias, torch.Tensor):
        raise ValueError(f"{name} must be a tensor or None, got {type(bias).__name__}")
    if bias.dim() != 1 or bias.shape[0] != vocab:
        raise ValueError(f"{name} must be [V] = [{vocab}], got shape {tuple(bias.shape)}")
    if bias.dtype != like.dtype:
        raise ValueError(f"{name} dtype {bias.dtype} differs from student_hidden dtype {like.dtype}; cast one")
    if bias.device != like.device:
        raise ValueError(f"{name} is on {bias.device}, student_hidden on {like.device}")


def _as_list(name: str, value) -> list:
    if isinstance(value, torch.Tensor) or not isinstance(value, Sequence):
        raise ValueError(f"{name} must be a list with one entry per teacher, got {type(value).__name__}")
    return list(value)


def _check_dense_teachers(hidden, weights, biases, tokens: int, vocab: int, like: torch.Tensor):
    hidden = _as_list("teacher_hidden", hidden)
    if not hidden:
        raise ValueError("teacher_hidden must hold at least one teacher (G = 0)")
    if weights is None:
        raise ValueError("teacher_head_weights must be given with teacher_hidden")
    weights = _as_list("teacher_head_weights", weights)
    if len(weights) != len(hidden):
        raise ValueError(f"teacher_head_weights holds {len(weights)} matrices for {len(hidden)} teacher_hidden")
    biases = [None] * len(hidden) if biases is None else _as_list("teacher_head_biases", biases)
    if len(biases) != len(hidden):
        raise ValueError(f"teacher_head_biases holds {len(biases)} entries for {len(hidden)} teachers")
    for g, (h, w, b) in enumerate(zip(hidden, weights, biases)):
        _check_matrix(f"teacher_hidden[{g}]", h, tokens, None, like)
        _check_matrix(f"teacher_head_weights[{g}]", w, vocab, h.shape[1], like)
        _check_bias(f"teacher_head_biases[{g}]", b, vocab, like)
    # Teachers get no gradient: detached here, so autograd never tracks them.
    return [h.detach() for h in hidden], [w.detach() for w in weights], [None if b is None else b.detach() for b in biases]


def _check_topk(topk, tokens: int, vocab: int, like: torch.Tensor, validate: bool):
    if not isinstance(topk, (tuple, list)) or len(topk) != 2:
        raise ValueError("teacher_topk must be a pair (indices [G, N, K], logprobs [G, N, K])")
    indices, logprobs = topk
    if not isinstance(indices, torch.Tensor) or indices.dtype != torch.int64:
        got = indices.dtype if isinstance(indices, torch.Tensor) else type(indices).__name__
        raise ValueError(f"teacher_topk indices must be an int64 tensor, got {got}")
    if not isinstance(logprobs, torch.Tensor) or logprobs.dtype not in FLOAT_DTYPES:
        got = logprobs.dtype if isinstance(logprobs, torch.Tensor) else type(logprobs).__name__
        raise ValueError(f"teacher_topk logprobs must be a float32, float16 or bfloat16 tensor, got {got}")
    if indices.dim() != 3 or indices.shape[0] == 0 or indices.shape[1] != tokens or indices.shape[2] == 0:
        raise ValueError(f"teacher_topk indices must be [G >= 1, N = {tokens}, K >= 1], got shape {tuple(indices.shape)}")
    if indices.shape[2] > vocab:
        raise ValueError(f"teacher_topk keeps K = {indices.shape[2]} classes of only V = {vocab}")
    if logprobs.shape != indices.shape:
        raise ValueError(f"teacher_topk logprobs shape {tuple(logprobs.shape)} differs from indices {tuple(indices.shape)}")
    if indices.device != like.device or logprobs.device != like.device:
        raise ValueError(f"teacher_topk is on {indices.device}/{logprobs.device}, student_hidden on {like.device}")
    # Reading index values is a host sync; as for targets, only in eager mode.
    if validate and not torch.compiler.is_compiling():
        lowest, highest = (int(v) for v in torch.aminmax(indices))
        if lowest < 0 or highest >= vocab:
            raise ValueError(f"teacher_topk indices must lie in [0, {vocab}), got values in [{lowest}, {highest}]")
        if indices.shape[2] > 1:
            ordered = indices.sort(-1).values
            if bool((ordered[..., 1:] == ordered[..., :-1]).any()):
                raise ValueError("teacher_topk indices repeat a class within a row; they must be distinct")
    return indices, logprobs.detach().to(like.dtype)


def _check_no_gradient(name: str, value) -> None:
    # The chunk loop hands back only the student head's gradients; a tensor that wants
    # one would silently get none.
    if isinstance(value, torch.Tensor) and value.requires_grad:
        raise ValueError(f"{name} gets no gradient from the fused head; pass {name}.detach() (group_kd gives it one)")


def _check_chunk_size(chunk_size) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    return chunk_size


def _check_fused_reduction(reduction) -> None:
    if reduction not in FUSED_REDUCTIONS:
        # "none" would need the per-token upstream gradient before the forward is over;
        # the per-token losses are still returned (kl, ce) by fused_linear_group_kd.
        raise ValueError(f"reduction must be one of {FUSED_REDUCTIONS} for the fused head, got {reduction!r}")


# --------------------------------------------------------------------------- the function


def _linear_into(out: torch.Tensor | None, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """hidden @ weight^T (+ bias), written into ``out`` when given (eager mode).

    Reusing one buffer per chunk matters on the CPU: a fresh [chunk, V] tensor each chunk
    is page-faulted in 4 KiB pages, which costs about as much as the matmul's writes.
    """
    if out is None:
        return F.linear(hidden, weight, bias)
    if bias is None:
        return torch.mm(hidden, weight.t(), out=out)
    return torch.addmm(bias, hidden, weight.t(), out=out)


class _FusedLinearGroupKD(torch.autograd.Function):
    """Forward: the chunk loop above; saves the already-contracted gradients.

    Inputs after the three differentiable tensors are plain data (teachers, target, ...)
    and get no gradient.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, teacher_hidden, teacher_weights, teacher_biases, topk_indices,
                topk_logprobs, target, mix_weights, alphas, members, temperature, ignore_index, error_rule,
                chunk_size, backend, scale):
        tokens, vocab = hidden.shape[0], weight.shape[0]
        want_h, want_w, want_b = ctx.needs_input_grad[:3]
        want_b = want_b and bias is not None
        num_teachers = len(teacher_hidden) if topk_indices is None else topk_indices.shape[0]
        op = op_for(backend)

        loss = hidden.new_empty((tokens,), dtype=torch.float32)
        kl, ce = torch.empty_like(loss), torch.empty_like(loss)
        student_correct = hidden.new_empty((tokens,), dtype=torch.bool)
        teacher_correct = hidden.new_empty((num_teachers, tokens), dtype=torch.bool)
        error_mask = hidden.new_empty((tokens,), dtype=torch.bool)
        grad_h = torch.empty_like(hidden) if want_h else None
        # fp32 accumulators: summing a low-precision weight gradient over many chunks in
        # bf16 would lose the small contributions.
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        grad_b = torch.zeros((vocab,), dtype=torch.float32, device=weight.device) if want_b else None

        rows = min(chunk_size, tokens)
        eager = not torch.compiler.is_compiling()
        student_buf = hidden.new_empty((rows, vocab)) if eager else None
        teacher_buf = hidden.new_empty((num_teachers, rows, vocab)) if eager else None
        for start in range(0, tokens, chunk_size):
            stop = min(start + chunk_size, tokens)
            n = stop - start
            h = hidden[start:stop]
            z_s = _linear_into(None if student_buf is None else student_buf[:n], h, weight, bias)
            if topk_indices is None:
                per_teacher = [
                    _linear_into(None if teacher_buf is None else teacher_buf[g, :n], th[start:stop], tw, tb)
                    for g, (th, tw, tb) in enumerate(zip(teacher_hidden, teacher_weights, teacher_biases))
                ]
                z_t = torch.stack(per_teacher) if teacher_buf is None else teacher_buf[:, :n]
            else:
                if teacher_buf is None:
                    dense = torch.full((num_teachers, n, vocab), -math.inf, dtype=hidden.dtype, device=hidden.device)
                else:
                    dense = teacher_buf[:, :n].fill_(-math.inf)
                # -inf outside the top-K: classes with no teacher mass (0 log 0 = 0)
                z_t = dense.scatter_(-1, topk_indices[:, start:stop], topk_logprobs[:, start:stop])
            outs = op(
                z_s.unsqueeze(0), z_t, target[start:stop], mix_weights, alphas, members,
                temperature, ignore_index, error_rule,
            )
            loss[start:stop], kl[start:stop], ce[start:stop] = outs[0][0], outs[1][0], outs[2][0]
            student_correct[start:stop], teacher_correct[:, start:stop], error_mask[start:stop] = outs[3][0], outs[4], outs[5]
            d = outs[6][0]  # [n, V], d loss_b / d z_s[b], student dtype
            if grad_h is not None:
                if eager:
                    torch.mm(d, weight, out=grad_h[start:stop])
                else:
                    grad_h[start:stop] = d @ weight
            if grad_w is not None:
                if d.dtype == torch.float32:
                    grad_w.addmm_(d.t(), h)
                else:
                    grad_w.add_(d.t() @ h)  # product in the input dtype (fp32 accumulation), sum in fp32
            if grad_b is not None:
                grad_b.add_(d.sum(0, dtype=torch.float32))

        total = loss.sum() * scale
        ctx.save_for_backward(grad_h, grad_w, grad_b, scale)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(kl, ce, student_correct, teacher_correct, error_mask)
        ctx.set_materialize_grads(False)
        return total, kl, ce, student_correct, teacher_correct, error_mask

    @staticmethod
    def backward(ctx, grad_total, *unused):
        grad_h, grad_w, grad_b, scale = ctx.saved_tensors
        if grad_total is None:
            return (None,) * 18
        factor = grad_total.float() * scale
        out_h = None if grad_h is None else (grad_h * factor).to(grad_h.dtype)
        out_w = None if grad_w is None else (grad_w * factor).to(ctx.weight_dtype)
        out_b = None if grad_b is None else (grad_b * factor).to(ctx.weight_dtype)
        return (out_h, out_w, out_b) + (None,) * 15


def fused_linear_group_kd(
    student_hidden: torch.Tensor,
    student_head_weight: torch.Tensor,
    target: torch.Tensor,
    teacher_hidden=None,
    teacher_head_weights=None,
    student_head_bias: torch.Tensor | None = None,
    teacher_head_biases=None,
    teacher_topk=None,
    temperature: float = 4.0,
    alpha: float = 0.9,
    teacher_weights=None,
    ignore_index: int = -100,
    chunk_size: int = 1024,
    reduction: str = "mean",
    backend: str = "auto",
    error_rule: str = "any",
    validate: bool = True,
) -> GroupKDResult:
    """Group KD from hidden states and LM heads, never materialising [N, V] logits.

    Per token b: loss_b = (1 − α)·CE(z_b, y_b) + α·τ²·KL(p̄_b ‖ softmax(z_b / τ)) with
    z_b = W h_b (+ bias) the student's logits and p̄_b the weighted mean of the teachers'
    softmax(z_gb / τ), z_gb = W_g h_gb (+ bias_g); or, with ``teacher_topk``, each
    teacher's top-K log-probabilities renormalised at τ over the kept classes (zero mass
    elsewhere; see the module docstring).

    Args:
        student_hidden: [N, H] (fp32, fp16 or bf16); receives gradient.
        student_head_weight: [V, H], same dtype; receives gradient.
        target: [N] class indices; rows equal to ``ignore_index`` count for nothing.
        teacher_hidden / teacher_head_weights: G tensors [N, H_g] / [V, H_g] (H_g may
            differ per teacher), same dtype; never receive gradient.
        student_head_bias / teacher_head_biases: optional [V] (a list with None entries
            allowed for the teachers).
        teacher_topk: (indices [G, N, K] int64, logprobs [G, N, K]) instead of teacher
            hidden states.
        chunk_size: rows per chunk; peak extra memory is about (G + 2)·chunk·V values.
        reduction: mean (over counted tokens) or sum.
        backend: auto, reference, cpu, triton or cuda: the group-KD op run per chunk.
        temperature, alpha, teacher_weights, ignore_index: as for ``group_kd`` (Python,
            numpy or tensor values), except that alpha and teacher_weights get no
            gradient here (a tensor that requires one is refused).
        validate: check target, top-K index, alpha and teacher-weight values held in
            tensors on the host; False skips those checks (no device sync).

    Returns a GroupKDResult: ``loss`` (scalar, differentiable), per-token ``kl`` and ``ce``
    [N], ``student_correct`` [N], ``teacher_correct`` [G, N], ``error_mask`` [N] (the
    error mask of the one student).
    """
    temperature, ignore_index = check_temperature(temperature), check_ignore_index(ignore_index)
    check_hyperparameters(temperature, alpha, reduction, error_rule)
    _check_fused_reduction(reduction)
    _check_no_gradient("alpha", alpha)
    _check_no_gradient("teacher_weights", teacher_weights)
    chunk_size = _check_chunk_size(chunk_size)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    _check_matrix("student_hidden", student_hidden, None, None, None)
    tokens, width = student_hidden.shape
    _check_matrix("student_head_weight", student_head_weight, None, width, student_hidden)
    vocab = student_head_weight.shape[0]
    _check_bias("student_head_bias", student_head_bias, vocab, student_hidden)
    if (teacher_hidden is None) == (teacher_topk is None):
        raise ValueError("give exactly one of teacher_hidden (with teacher_head_weights) and teacher_topk")
    if teacher_topk is None:
        hidden_t, weights_t, biases_t = _check_dense_teachers(
            teacher_hidden, teacher_head_weights, teacher_head_biases, tokens, vocab, student_hidden)
        topk_indices = topk_logprobs = None
        num_teachers = len(hidden_t)
    else:
        if teacher_head_weights is not None or teacher_head_biases is not None:
            raise ValueError("teacher_head_weights / teacher_head_biases go with teacher_hidden, not teacher_topk")
        topk_indices, topk_logprobs = _check_topk(teacher_topk, tokens, vocab, student_hidden, validate)
        hidden_t, weights_t, biases_t = [], [], []
        num_teachers = topk_indices.shape[0]
    # _check_target reads only the shape [S, B, C] and device of its "student": a
    # zero-stride stand-in, so no [N, V] tensor is ever allocated.
    shape_like = student_hidden.new_empty(()).expand(1, tokens, vocab)
    target, all_counted = _check_target(target, shape_like, ignore_index, validate)
    mix_weights = _teacher_weights(teacher_weights, num_teachers, student_hidden, validate)
    alphas = _per_network("alpha", alpha, 1, student_hidden, 0.0, 1.0, validate)
    members = _constant((1.0,), student_hidden.device)
    concrete = resolve_backend(backend, student_hidden.device)

    if reduction == "sum":
        scale = torch.ones((), dtype=torch.float32, device=student_hidden.device)
    elif all_counted:
        scale = torch.full((), 1.0 / tokens, dtype=torch.float32, device=student_hidden.device)
    else:
        # kept on the device (no host sync); no counted row gives 0 / 0 = NaN, as GroupKDLoss
        scale = 1.0 / (target != ignore_index).sum().float()

    loss, kl, ce, student_correct, teacher_correct, error_mask = _FusedLinearGroupKD.apply(
        student_hidden, student_head_weight, student_head_bias, hidden_t, weights_t, biases_t,
        topk_indices, topk_logprobs, target, mix_weights, alphas, members,
        temperature, ignore_index, ERROR_RULES.index(error_rule), chunk_size, concrete, scale,
    )
    return GroupKDResult(loss, kl, ce, student_correct, teacher_correct, error_mask)


def materialised_group_kd(
    student_hidden: torch.Tensor,
    student_head_weight: torch.Tensor,
    target: torch.Tensor,
    teacher_hidden=None,
    teacher_head_weights=None,
    student_head_bias: torch.Tensor | None = None,
    teacher_head_biases=None,
    teacher_topk=None,
    temperature: float = 4.0,
    alpha: float = 0.9,
    teacher_weights=None,
    ignore_index: int = -100,
    reduction: str = "mean",
    backend: str = "reference",
    error_rule: str = "any",
) -> GroupKDResult:
    """The same loss the plain way: full [N, V] logits by F.linear, then ``group_kd``.

    The specification ``fused_linear_group_kd`` is tested against (with the reference
    backend), and the baseline of the benchmark (with GroupKDLoss's default backend).
    """
    student = F.linear(student_hidden, student_head_weight, student_head_bias)
    vocab = student_head_weight.shape[0]
    if teacher_topk is None:
        biases = teacher_head_biases if teacher_head_biases is not None else [None] * len(teacher_hidden)
        with torch.no_grad():
            teachers = torch.stack([F.linear(h, w, b) for h, w, b in zip(teacher_hidden, teacher_head_weights, biases)])
    else:
        indices, logprobs = teacher_topk
        teachers = torch.full((*indices.shape[:2], vocab), -math.inf, dtype=student.dtype, device=student.device)
        teachers.scatter_(-1, indices, logprobs.to(student.dtype))
    return group_kd(
        student, teachers, target, temperature=temperature, alpha=alpha, teacher_weights=teacher_weights,
        ignore_index=ignore_index, error_rule=error_rule, backend=backend, reduction=reduction,
    )


class FusedLinearGroupKDLoss(nn.Module):
    """Group KD loss computed from hidden states and LM heads in row chunks.

    ``loss(student_hidden [N, H], student_head_weight [V, H], target [N],
    teacher_hidden=[G x [N, H_g]], teacher_head_weights=[G x [V, H_g]],
    student_head_bias=None, teacher_head_biases=None, teacher_topk=None)`` returns the
    scalar loss of ``fused_linear_group_kd`` (docs/design.md §4): per token
    (1 − α)·CE + α·τ²·KL(p̄ ‖ softmax(z / τ)), with peak memory O(chunk_size · V).
    """

    def __init__(
        self,
        temperature: float = 4.0,
        alpha: float = 0.9,
        teacher_weights=None,
        ignore_index: int = -100,
        chunk_size: int = 1024,
        reduction: str = "mean",
        backend: str = "auto",
    ):
        super().__init__()
        check_hyperparameters(temperature, alpha, reduction, "any")
        _check_fused_reduction(reduction)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.temperature = check_temperature(temperature)
        self.alpha = alpha
        self.teacher_weights = teacher_weights
        self.ignore_index = check_ignore_index(ignore_index)
        self.chunk_size = _check_chunk_size(chunk_size)
        self.reduction = reduction
        self.backend = backend

    def forward(
        self,
        student_hidden: torch.Tensor,
        student_head_weight: torch.Tensor,
        target: torch.Tensor,
        teacher_hidden=None,
        teacher_head_weights=None,
        student_head_bias: torch.Tensor | None = None,
        teacher_head_biases=None,
        teacher_topk=None,
    ) -> torch.Tensor:
        return fused_linear_group_kd(
            student_hidden, student_head_weight, target,
            teacher_hidden=teacher_hidden, teacher_head_weights=teacher_head_weights,
            student_head_bias=student_head_bias, teacher_head_biases=teacher_head_biases, teacher_topk=teacher_topk,
            temperature=self.temperature, alpha=self.alpha, teacher_weights=self.teacher_weights,
            ignore_index=self.ignore_index, chunk_size=self.chunk_size, reduction=self.reduction, backend=self.backend,
        ).loss

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, alpha={self.alpha}, ignore_index={self.ignore_index}, "
            f"chunk_size={self.chunk_size}, reduction={self.reduction!r}, backend={self.backend!r}"
        )
