"""Fused group-KD loss in Triton: ``orc_fast::group_kd_triton`` (docs/design.md §3-4).

One program handles ROWS samples b with all S students and G teachers of each, as 3-D
tiles [ROWS, networks, BLOCK_C] (networks padded to a power of two and masked):

* small C (the whole padded row fits one tile): the logits are loaded once and the
  softmax statistics, loss parts, masks and student gradient all come from registers;
  many rows per program keep the launch count low (CIFAR: C = 10 or 100).
* large C (LLM vocabularies, up to 256k): two passes over C per row. Pass 1 keeps an
  online (running max, running sum) softmax per network plus a running argmax; pass 2
  (in reverse, so the chunks read last in pass 1 are still in L2) rebuilds the teachers'
  mean probability chunk by chunk, writes the gradient and accumulates KL and the
  ensemble argmax. Arithmetic is fp32 whatever the logits' dtype.

Masked lanes load -inf, so they add nothing to any max or sum; a max that stays -inf (an
all -inf row) is replaced by 0 before it is subtracted, so no -inf - -inf appears.
Argmax follows torch.argmax: the first NaN if there is one, else the first maximum.
All offsets are 64-bit. Nothing here reads data on the host: no sync in forward.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from orc_fast.ops import register_autograd_and_fake

# Argmax bookkeeping packs "is it a NaN" and the class index into one int32 key:
# a NaN at class c has key c, a (non-NaN) maximum at class c has key c + _NAN_FREE, and
# _NO_CANDIDATE marks "nothing seen yet". Needs C < 2**30.
_NAN_FREE = 1 << 30
_NO_CANDIDATE = (1 << 31) - 1

# Tile heuristics (elements of the [ROWS, networks, BLOCK_C] teacher + student tiles).
_TILE_ELEMENTS = 4096  # single-chunk path: the whole padded row set lives in registers
_ELEMENTS_PER_WARP = 512  # single-chunk path: about 16 logits per thread
_CHUNK_WARPS = 8  # chunked path
_CHUNK_VALUES_PER_THREAD = 64  # chunked path: logits per thread over all networks of a chunk
_MAX_ROWS = 64
_MIN_PROGRAMS = 256  # about two programs per SM on an H100 before rows get packed
_MIN_BLOCK_C = 16


@triton.jit
def _chunk_argmax(values, cols, NAN_FREE: tl.constexpr, NO_CANDIDATE: tl.constexpr):
    """Per network of a [R, N, BC] tile: (max with NaN as +inf, argmax key) over the last axis."""
    is_nan = values != values
    key_values = tl.where(is_nan, float("inf"), values)
    chunk_max = tl.max(key_values, axis=2)
    candidates = tl.where(
        is_nan, cols, tl.where(key_values == chunk_max[:, :, None], cols + NAN_FREE, NO_CANDIDATE)
    )
    return chunk_max, tl.min(candidates, axis=2)


@triton.jit
def _argmax_merge(run_max, run_key, chunk_max, chunk_key, NAN_FREE: tl.constexpr, NO_CANDIDATE: tl.constexpr):
    """Merge two argmax candidates in any order: a NaN beats a number, then larger, then lower index."""
    run_nan = run_key < NAN_FREE
    chunk_nan = chunk_key < NAN_FREE
    earlier = chunk_key < run_key
    take = (
        (run_key == NO_CANDIDATE)
        | (chunk_nan & (~run_nan | earlier))
        | (~run_nan & ~chunk_nan & (chunk_key != NO_CANDIDATE)
           & ((chunk_max > run_max) | ((chunk_max == run_max) & earlier)))
    )
    return tl.where(take, chunk_max, run_max), tl.where(take, chunk_key, run_key)


@triton.jit
def _argmax_index(key, NAN_FREE: tl.constexpr):
    return tl.where(key >= NAN_FREE, key - NAN_FREE, key)


@triton.jit
def _load_tile(base, net_stride, row_offset, nets, net_ok, cols, row_active, C):
    """[R, N, BC] fp32 tile of logits; masked lanes are -inf (out of every max and sum)."""
    mask = row_active[:, None, None] & net_ok[None, :, None] & (cols < C)
    pointers = base + nets[None, :, None].to(tl.int64) * net_stride + row_offset[:, None, None] + cols
    return tl.load(pointers, mask=mask, other=float("-inf")).to(tl.float32)


@triton.jit
def _safe_shift(running_max):
    # An all -inf row keeps max -inf; shifting by 0 instead avoids -inf - -inf = NaN.
    return tl.where(running_max == float("-inf"), 0.0, running_max)


@triton.jit
def _group_kd_kernel(
    student_ptr, teacher_ptr, target_ptr, teacher_weight_ptr, alpha_ptr, member_ptr,
    loss_ptr, kl_ptr, ce_ptr, student_correct_ptr, teacher_correct_ptr, error_mask_ptr, grad_ptr,
    stride_student_s, stride_student_b, stride_teacher_g, stride_teacher_b,
    S, G, B, C,
    temperature, inv_temperature, ignore_index,
    ERROR_RULE: tl.constexpr, ROWS: tl.constexpr, S_BLOCK: tl.constexpr, G_BLOCK: tl.constexpr,
    BLOCK_C: tl.constexpr, SINGLE_CHUNK: tl.constexpr,
    NAN_FREE: tl.constexpr, NO_CANDIDATE: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)  # [R] sample index b
    row_ok = rows < B
    target = tl.load(target_ptr + rows, mask=row_ok, other=ignore_index)
    valid = row_ok & (target != ignore_index)
    bad_target = valid & ((target < 0) | (target >= C))  # never read: the row becomes NaN
    # Ignored rows read nothing; their outputs are zeros.
    row_active = valid

    students = tl.arange(0, S_BLOCK)
    student_ok = students < S
    teachers = tl.arange(0, G_BLOCK)
    teacher_ok = teachers < G
    student_rows = rows * stride_student_b  # int64
    teacher_rows = rows * stride_teacher_b

    teacher_weight = tl.load(teacher_weight_ptr + teachers, mask=teacher_ok, other=0.0)
    alpha = tl.load(alpha_ptr + students, mask=student_ok, other=0.0)
    member = tl.load(member_ptr + students, mask=student_ok, other=0.0)
    is_member = (member > 0) & student_ok

    lanes = tl.arange(0, BLOCK_C)[None, None, :]
    ce_weight = (1.0 - alpha)[None, :, None]  # d loss / d CE
    kd_grad_weight = (alpha * temperature)[None, :, None]  # alpha * tau^2 * (1 / tau)
    target3 = target[:, None, None]

    if SINGLE_CHUNK:
        # ---- the whole row in one tile: read every logit once --------------------------
        t = _load_tile(teacher_ptr, stride_teacher_g, teacher_rows, teachers, teacher_ok, lanes, row_active, C)
        t_max, t_key = _chunk_argmax(t, lanes, NAN_FREE, NO_CANDIDATE)
        t_shift = _safe_shift(t_max)
        t_exp = tl.exp((t - t_shift[:, :, None]) * inv_temperature)
        t_sum = tl.sum(t_exp, axis=2)
        t_coef = tl.where(teacher_ok[None, :], teacher_weight[None, :] / t_sum, 0.0)
        mean_prob = tl.sum(t_exp * t_coef[:, :, None], axis=1)  # [R, BC]

        x = _load_tile(student_ptr, stride_student_s, student_rows, students, student_ok, lanes, row_active, C)
        s_max, s_key = _chunk_argmax(x, lanes, NAN_FREE, NO_CANDIDATE)
        s_shift = _safe_shift(s_max)
        shifted = x - s_shift[:, :, None]
        e1 = tl.exp(shifted)
        et = tl.exp(shifted * inv_temperature)
        s_sum1 = tl.sum(e1, axis=2)
        s_sumt = tl.sum(et, axis=2)
        inv_sum1 = tl.where(student_ok[None, :], 1.0 / s_sum1, 0.0)
        inv_sumt = tl.where(student_ok[None, :], 1.0 / s_sumt, 0.0)
        log_sumt = tl.log(s_sumt)

        prob1 = e1 * inv_sum1[:, :, None]
        grad = ce_weight * (prob1 - tl.where(lanes == target3, 1.0, 0.0)) \
            + kd_grad_weight * (et * inv_sumt[:, :, None] - mean_prob[:, None, :])
        grad = tl.where(bad_target[:, None, None], float("nan"), grad)
        grad = tl.where(valid[:, None, None], grad, 0.0)
        grad_offsets = (students[None, :, None].to(tl.int64) * B + rows[:, None, None]) * C + lanes
        grad_mask = row_ok[:, None, None] & student_ok[None, :, None] & (lanes < C)
        tl.store(grad_ptr + grad_offsets, grad.to(grad_ptr.dtype.element_ty), mask=grad_mask)

        pbar = mean_prob[:, None, :]
        log_q = shifted * inv_temperature - log_sumt[:, :, None]
        # 0 * log 0 = 0; a NaN mean probability stays NaN.
        kl_terms = tl.where(pbar == 0.0, 0.0, pbar * (tl.log(pbar) - log_q))
        kl = tl.sum(kl_terms, axis=2)
        if ERROR_RULE == 3:
            ensemble = tl.sum(prob1 * tl.where(is_member, 1.0, 0.0)[None, :, None], axis=1)  # [R, BC]
            e_max, e_key = _chunk_argmax(ensemble[:, None, :], lanes, NAN_FREE, NO_CANDIDATE)
            ensemble_key = e_key
    else:
        # ---- pass 1: online softmax statistics and argmax per network -----------------
        t_max = tl.full((ROWS, G_BLOCK), float("-inf"), tl.float32)
        t_sum = tl.zeros((ROWS, G_BLOCK), tl.float32)
        t_key = tl.full((ROWS, G_BLOCK), NO_CANDIDATE, tl.int32)
        s_max = tl.full((ROWS, S_BLOCK), float("-inf"), tl.float32)
        s_sum1 = tl.zeros((ROWS, S_BLOCK), tl.float32)
        s_sumt = tl.zeros((ROWS, S_BLOCK), tl.float32)
        s_key = tl.full((ROWS, S_BLOCK), NO_CANDIDATE, tl.int32)
        for start in range(0, C, BLOCK_C):
            cols = start + lanes
            t = _load_tile(teacher_ptr, stride_teacher_g, teacher_rows, teachers, teacher_ok, cols, row_active, C)
            c_max, c_key = _chunk_argmax(t, cols, NAN_FREE, NO_CANDIDATE)
            new_max = tl.maximum(t_max, c_max)
            _, t_key = _argmax_merge(t_max, t_key, c_max, c_key, NAN_FREE, NO_CANDIDATE)
            shift = _safe_shift(new_max)
            t_sum = t_sum * tl.exp((t_max - shift) * inv_temperature) \
                + tl.sum(tl.exp((t - shift[:, :, None]) * inv_temperature), axis=2)
            t_max = new_max

            x = _load_tile(student_ptr, stride_student_s, student_rows, students, student_ok, cols, row_active, C)
            c_max, c_key = _chunk_argmax(x, cols, NAN_FREE, NO_CANDIDATE)
            new_max = tl.maximum(s_max, c_max)
            _, s_key = _argmax_merge(s_max, s_key, c_max, c_key, NAN_FREE, NO_CANDIDATE)
            shift = _safe_shift(new_max)
            rescale = s_max - shift
            shifted = x - shift[:, :, None]
            s_sum1 = s_sum1 * tl.exp(rescale) + tl.sum(tl.exp(shifted), axis=2)
            s_sumt = s_sumt * tl.exp(rescale * inv_temperature) + tl.sum(tl.exp(shifted * inv_temperature), axis=2)
            s_max = new_max

        t_shift = _safe_shift(t_max)
        t_coef = tl.where(teacher_ok[None, :], teacher_weight[None, :] / t_sum, 0.0)
        s_shift = _safe_shift(s_max)
        inv_sum1 = tl.where(student_ok[None, :], 1.0 / s_sum1, 0.0)
        inv_sumt = tl.where(student_ok[None, :], 1.0 / s_sumt, 0.0)
        log_sumt = tl.log(s_sumt)
        member_weight = tl.where(is_member, 1.0, 0.0)[None, :, None]

        # ---- pass 2 (last chunk first): mean teacher probability, gradient, KL --------
        kl = tl.zeros((ROWS, S_BLOCK), tl.float32)
        ensemble_max = tl.full((ROWS, 1), float("-inf"), tl.float32)
        ensemble_key = tl.full((ROWS, 1), NO_CANDIDATE, tl.int32)
        num_chunks = tl.cdiv(C, BLOCK_C)
        for step in range(0, num_chunks):
            cols = (num_chunks - 1 - step) * BLOCK_C + lanes
            t = _load_tile(teacher_ptr, stride_teacher_g, teacher_rows, teachers, teacher_ok, cols, row_active, C)
            mean_prob = tl.sum(tl.exp((t - t_shift[:, :, None]) * inv_temperature) * t_coef[:, :, None], axis=1)

            x = _load_tile(student_ptr, stride_student_s, student_rows, students, student_ok, cols, row_active, C)
            shifted = x - s_shift[:, :, None]
            prob1 = tl.exp(shifted) * inv_sum1[:, :, None]
            probt = tl.exp(shifted * inv_temperature) * inv_sumt[:, :, None]
            pbar = mean_prob[:, None, :]
            grad = ce_weight * (prob1 - tl.where(cols == target3, 1.0, 0.0)) + kd_grad_weight * (probt - pbar)
            grad = tl.where(bad_target[:, None, None], float("nan"), grad)
            grad = tl.where(valid[:, None, None], grad, 0.0)
            grad_offsets = (students[None, :, None].to(tl.int64) * B + rows[:, None, None]) * C + cols
            grad_mask = row_ok[:, None, None] & student_ok[None, :, None] & (cols < C)
            tl.store(grad_ptr + grad_offsets, grad.to(grad_ptr.dtype.element_ty), mask=grad_mask)

            log_q = shifted * inv_temperature - log_sumt[:, :, None]
            kl_terms = tl.where(pbar == 0.0, 0.0, pbar * (tl.log(pbar) - log_q))
            kl += tl.sum(kl_terms, axis=2)
            if ERROR_RULE == 3:
                ensemble = tl.sum(prob1 * member_weight, axis=1)  # [R, BC]
                e_max, e_key = _chunk_argmax(ensemble[:, None, :], cols, NAN_FREE, NO_CANDIDATE)
                ensemble_max, ensemble_key = _argmax_merge(
                    ensemble_max, ensemble_key, e_max, e_key, NAN_FREE, NO_CANDIDATE
                )

    # ---- per-row outputs ------------------------------------------------------------
    out_s = students[None, :].to(tl.int64) * B + rows[:, None]  # [R, S_BLOCK]
    out_mask = row_ok[:, None] & student_ok[None, :]
    gather_ok = valid[:, None] & student_ok[None, :] & ~bad_target[:, None]
    safe_target = tl.where(gather_ok, target[:, None], 0)
    target_logit = tl.load(
        student_ptr + students[None, :].to(tl.int64) * stride_student_s + student_rows[:, None] + safe_target,
        mask=gather_ok, other=float("nan"),
    ).to(tl.float32)
    ce = (s_shift - target_logit) + tl.log(s_sum1)  # log-sum-exp minus the target logit, exactly ordered
    kl = tl.where(bad_target[:, None], float("nan"), kl)
    loss = (1.0 - alpha)[None, :] * ce + (alpha * temperature * temperature)[None, :] * kl
    valid2 = valid[:, None]
    tl.store(loss_ptr + out_s, tl.where(valid2, loss, 0.0), mask=out_mask)
    tl.store(kl_ptr + out_s, tl.where(valid2, kl, 0.0), mask=out_mask)
    tl.store(ce_ptr + out_s, tl.where(valid2, ce, 0.0), mask=out_mask)
    student_correct = valid2 & (_argmax_index(s_key, NAN_FREE).to(tl.int64) == target[:, None])
    tl.store(student_correct_ptr + out_s, student_correct, mask=out_mask)

    out_g = teachers[None, :].to(tl.int64) * B + rows[:, None]
    teacher_correct = valid2 & (_argmax_index(t_key, NAN_FREE).to(tl.int64) == target[:, None])
    tl.store(teacher_correct_ptr + out_g, teacher_correct, mask=row_ok[:, None] & teacher_ok[None, :])

    wrong = (~student_correct) & is_member[None, :]
    num_wrong = tl.sum(wrong.to(tl.int32), axis=1)  # [R]
    num_members = tl.sum(is_member.to(tl.int32), axis=0)
    if ERROR_RULE == 0:  # any
        error = num_wrong > 0
    elif ERROR_RULE == 1:  # all
        error = (num_wrong == num_members) & (num_members > 0)
    elif ERROR_RULE == 2:  # majority
        error = 2 * num_wrong > num_members
    else:  # ensemble: argmax of the members' mean tau = 1 probability
        ensemble_pred = tl.sum(_argmax_index(ensemble_key, NAN_FREE), axis=1).to(tl.int64)
        error = (ensemble_pred != target) & (num_members > 0)
    tl.store(error_mask_ptr + rows, error & valid, mask=row_ok)


def launch_config(num_students: int, num_teachers: int, batch: int, num_classes: int, element_size: int = 4,
                  block_c: int | None = None, rows: int | None = None, num_warps: int | None = None) -> dict:
    """Tile shape for one call; the arguments override the heuristics (tests force the chunked path)."""
    s_block = triton.next_power_of_2(num_students)
    g_block = triton.next_power_of_2(num_teachers)
    networks = s_block + g_block
    full_row = max(triton.next_power_of_2(num_classes), _MIN_BLOCK_C)
    if block_c is None:
        if full_row * networks <= _TILE_ELEMENTS:
            block_c = full_row
        else:
            # Each thread of 8 warps takes one 16-byte vector of every network row, fewer
            # elements when there are many networks (registers).
            per_thread = max(1, min(16 // element_size, _floor_power_of_2(_CHUNK_VALUES_PER_THREAD // networks)))
            block_c = per_thread * 32 * _CHUNK_WARPS
            if num_warps is None:
                num_warps = _CHUNK_WARPS
    block_c = triton.next_power_of_2(block_c)
    single_chunk = block_c >= num_classes
    if rows is None:
        rows = 1
        if single_chunk:
            # Pack rows while the grid still has enough programs to fill the GPU.
            rows = min(_MAX_ROWS, _TILE_ELEMENTS // (block_c * networks), max(1, batch // _MIN_PROGRAMS))
    rows = _floor_power_of_2(max(1, rows))
    if num_warps is None:
        num_warps = min(8, max(1, _floor_power_of_2(rows * block_c * networks // _ELEMENTS_PER_WARP)))
    return dict(ROWS=rows, S_BLOCK=s_block, G_BLOCK=g_block, BLOCK_C=block_c, SINGLE_CHUNK=single_chunk,
                num_warps=num_warps)


def _floor_power_of_2(n: int) -> int:
    return 1 << (max(1, int(n)).bit_length() - 1)


def group_kd_triton_launch(student, teachers, target, teacher_weights, alpha, error_members,
                           temperature: float, ignore_index: int, error_rule: int,
                           block_c: int | None = None, rows: int | None = None, num_warps: int | None = None):
    """Allocate the outputs and launch the kernel (the op's body; tests call it to pick tiles)."""
    # Tile shapes are Python ints: under torch.compile with dynamic shapes this specialises
    # (guards) on S, G, B and C instead of failing on symbolic sizes.
    num_students, batch, num_classes = (int(size) for size in student.shape)
    num_teachers = int(teachers.shape[0])
    if num_classes >= _NAN_FREE:
        raise ValueError(f"the Triton group-KD kernel supports C < 2**30, got C = {num_classes}")
    device = student.device
    loss = torch.empty((num_students, batch), dtype=torch.float32, device=device)
    kl = torch.empty_like(loss)
    ce = torch.empty_like(loss)
    student_correct = torch.empty((num_students, batch), dtype=torch.bool, device=device)
    teacher_correct = torch.empty((num_teachers, batch), dtype=torch.bool, device=device)
    error_mask = torch.empty((batch,), dtype=torch.bool, device=device)
    grad = torch.empty((num_students, batch, num_classes), dtype=student.dtype, device=device)

    config = launch_config(num_students, num_teachers, batch, num_classes, student.element_size(),
                           block_c, rows, num_warps)
    grid = (triton.cdiv(batch, config["ROWS"]),)
    wrap_triton(_group_kd_kernel)[grid](
        student, teachers, target, teacher_weights, alpha, error_members,
        loss, kl, ce, student_correct, teacher_correct, error_mask, grad,
        student.stride(0), student.stride(1), teachers.stride(0), teachers.stride(1),
        num_students, num_teachers, batch, num_classes,
        float(temperature), 1.0 / float(temperature), int(ignore_index),
        ERROR_RULE=int(error_rule), NAN_FREE=_NAN_FREE, NO_CANDIDATE=_NO_CANDIDATE, **config,
    )
    return loss, kl, ce, student_correct, teacher_correct, error_mask, grad


@triton_op("orc_fast::group_kd_triton", mutates_args=())
def group_kd_triton(
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
    """The fused op (contract in orc_fast/ops.py); student/teachers need unit class stride."""
    return group_kd_triton_launch(
        student, teachers, target, teacher_weights, alpha, error_members, temperature, ignore_index, error_rule
    )


register_autograd_and_fake(group_kd_triton, fake=False)


def compile_for_target(dtype: str, num_students: int, num_teachers: int, batch: int, num_classes: int,
                       error_rule: int = 0, arch: int = 90):
    """Compile the kernel for an NVIDIA target as a launch on these shapes would (no GPU needed).

    ``dtype`` is Triton's name of the logits' type (fp32, fp16, bf16). Strides and C are
    assumed 16-byte friendly when C % 16 == 0, as a launch would specialise them. Used by
    the tests to catch kernels that only the interpreter accepts.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if not isinstance(_group_kd_kernel, triton.runtime.jit.JITFunction):
        raise RuntimeError("compile_for_target needs Triton out of interpreter mode (TRITON_INTERPRET unset)")
    element_size = {"fp32": 4, "fp16": 2, "bf16": 2}[dtype]
    config = launch_config(num_students, num_teachers, batch, num_classes, element_size)
    num_warps = config.pop("num_warps")
    constants = dict(config, ERROR_RULE=error_rule, NAN_FREE=_NAN_FREE, NO_CANDIDATE=_NO_CANDIDATE)
    pointer_types = {"student_ptr": f"*{dtype}", "teacher_ptr": f"*{dtype}", "grad_ptr": f"*{dtype}",
                     "target_ptr": "*i64", "student_correct_ptr": "*i1", "teacher_correct_ptr": "*i1",
                     "error_mask_ptr": "*i1"}
    names = _group_kd_kernel.arg_names
    signature = {}
    for name in names:
        if name in constants:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = pointer_types.get(name, "*fp32")
        elif name in ("temperature", "inv_temperature"):
            signature[name] = "fp32"
        else:
            signature[name] = "i64" if name.startswith("stride") else "i32"
    aligned = [n for n in names
               if n.endswith("_ptr") or ((n.startswith("stride") or n == "C") and num_classes % 16 == 0)]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    source = ASTSource(fn=_group_kd_kernel, signature=signature, constexprs=constants, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
