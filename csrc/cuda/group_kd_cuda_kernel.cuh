// The CUDA kernel of orc_fast::group_kd_fused (DESIGN.md sections 3 and 4; issue 4).
// Device code only, no torch: group_kd_cuda.cu launches it, and tests/cuda_emulator/
// compiles it for the CPU (ORC_FAST_EMULATE_CUDA) to check it where no GPU is.
//
// One thread group per batch row b (a warp for C <= 2048, else a block of 256 or 512
// threads); the group handles all S students and G teachers of its row:
//
//   pass 1  per network, one sweep over its C logits: an online softmax (running max,
//           running sums of exp(x - max) and exp((x - max) / tau)) and a running argmax
//           per thread, merged across the group with warp shuffles (and shared memory
//           between warps). Per-network constants land in shared memory.
//   pass 2  over the columns, last first (the tail read last in pass 1 is still in L2):
//           the teachers' mean probability p̄ for a 16-byte vector of columns, then
//           for up to four students at once the gradient (written in the logits' dtype)
//           and the KL terms.
//   pass 3  only for error_rule = ensemble: the argmax of the members' mean softmax.
//
// Loads and stores are 16-byte vectors where every row starts 16-byte aligned (checked
// on the host), scalar otherwise; arithmetic is fp32; all offsets are 64-bit. A
// masked-out (-inf) max is shifted by 0 so no -inf - -inf appears; NaN compares as the
// maximum in argmax, like torch.argmax. Nothing here synchronises with the host.

#pragma once

#ifndef ORC_FAST_EMULATE_CUDA
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math_constants.h>
#endif

#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace orc_fast::cuda_kernels {

constexpr int kStudentTile = 4;  // students handled together in pass 2 (registers)
constexpr int kStatWords = 5;    // one RowStats in the inter-warp scratch

struct Params {
  const void* student;
  int64_t student_stride_s;
  int64_t student_stride_b;
  const void* teachers;
  int64_t teacher_stride_g;
  int64_t teacher_stride_b;
  const int64_t* target;
  const float* teacher_weights;
  const float* alpha;
  const float* error_members;
  float temperature;
  float inv_temperature;
  int64_t ignore_index;
  int error_rule;  // 0 any, 1 all, 2 majority, 3 ensemble
  int num_students;
  int num_teachers;
  int num_classes;
  int64_t batch;
  float* loss;
  float* kl;
  float* ce;
  bool* student_correct;
  bool* teacher_correct;
  bool* error_mask;
  void* grad;
};

// ---- element conversion and vector memory access -------------------------------------

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// K elements at p (16-byte aligned when K * sizeof(T) == 16) as fp32.
template <typename T, int K>
__device__ __forceinline__ void load_floats(const T* __restrict__ p, float (&out)[K]) {
  if constexpr (K * sizeof(T) == 16) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    T values[K];
    memcpy(values, &raw, sizeof(raw));
#pragma unroll
    for (int k = 0; k < K; ++k) out[k] = to_float(values[k]);
  } else {
#pragma unroll
    for (int k = 0; k < K; ++k) out[k] = to_float(p[k]);
  }
}

template <typename T, int K>
__device__ __forceinline__ void store_floats(T* __restrict__ p, const float (&in)[K]) {
  if constexpr (K * sizeof(T) == 16) {
    T values[K];
#pragma unroll
    for (int k = 0; k < K; ++k) values[k] = from_float<T>(in[k]);
    uint4 raw;
    memcpy(&raw, values, sizeof(raw));
    *reinterpret_cast<uint4*>(p) = raw;
  } else {
#pragma unroll
    for (int k = 0; k < K; ++k) p[k] = from_float<T>(in[k]);
  }
}

// ---- online softmax statistics and argmax ------------------------------------------------

// Is candidate (v1, i1) a better argmax than (v2, i2)? torch.argmax order: a NaN beats
// any number, then the larger value, then the lower index. (-inf, INT_MAX) is "none".
__device__ __forceinline__ bool better(float v1, int i1, float v2, int i2) {
  const bool nan1 = v1 != v1, nan2 = v2 != v2;
  if (nan1 || nan2) return nan1 && (!nan2 || i1 < i2);
  if (v1 != v2) return v1 > v2;
  return i1 < i2;
}

struct RowStats {
  float max;   // running max, NaN counted as +inf (so a NaN row ends NaN below)
  float sum1;  // sum exp(x - max)
  float sumt;  // sum exp((x - max) / tau)
  float best;  // argmax value
  int best_index;
};

__device__ __forceinline__ RowStats empty_stats() { return {-CUDART_INF_F, 0.f, 0.f, -CUDART_INF_F, INT_MAX}; }

// Fold K logits starting at column c0 into one thread's statistics.
template <int K>
__device__ __forceinline__ void accumulate(RowStats& st, const float (&x)[K], int c0, float inv_tau, bool need_sum1) {
  float chunk_max = -CUDART_INF_F;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    chunk_max = fmaxf(chunk_max, x[k] != x[k] ? CUDART_INF_F : x[k]);
    if (better(x[k], c0 + k, st.best, st.best_index)) {
      st.best = x[k];
      st.best_index = c0 + k;
    }
  }
  if (chunk_max > st.max) {  // rescale; exp(-inf) = 0 when the old max was -inf
    const float delta = st.max - chunk_max;
    st.sum1 *= __expf(delta);
    st.sumt *= __expf(delta * inv_tau);
    st.max = chunk_max;
  }
  const float shift = st.max == -CUDART_INF_F ? 0.f : st.max;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const float d = x[k] - shift;
    if (need_sum1) st.sum1 += __expf(d);
    st.sumt += __expf(d * inv_tau);
  }
}

__device__ __forceinline__ void merge(RowStats& a, const RowStats& b, float inv_tau) {
  if (better(b.best, b.best_index, a.best, a.best_index)) {
    a.best = b.best;
    a.best_index = b.best_index;
  }
  const float m = fmaxf(a.max, b.max);
  if (m == -CUDART_INF_F) return;  // both empty or all -inf: sums stay 0
  const float da = a.max - m, db = b.max - m;
  a.sum1 = a.sum1 * __expf(da) + b.sum1 * __expf(db);
  a.sumt = a.sumt * __expf(da * inv_tau) + b.sumt * __expf(db * inv_tau);
  a.max = m;
}

// ---- reductions over the thread group of one row ---------------------------------------------

template <int kGroup>
__device__ __forceinline__ void group_sync() {
  if constexpr (kGroup == 32) {
    __syncwarp();
  } else {
    __syncthreads();
  }
}

// Every thread of the group gets the merged statistics. Block groups go through
// `scratch` ([kGroup / 32][kStatWords] words of shared memory).
template <int kGroup>
__device__ RowStats reduce_stats(RowStats st, float inv_tau, float* scratch) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    RowStats other;
    other.max = __shfl_xor_sync(0xffffffffu, st.max, offset);
    other.sum1 = __shfl_xor_sync(0xffffffffu, st.sum1, offset);
    other.sumt = __shfl_xor_sync(0xffffffffu, st.sumt, offset);
    other.best = __shfl_xor_sync(0xffffffffu, st.best, offset);
    other.best_index = __shfl_xor_sync(0xffffffffu, st.best_index, offset);
    merge(st, other, inv_tau);
  }
  if constexpr (kGroup > 32) {
    const int warp = threadIdx.x / 32;
    if (threadIdx.x % 32 == 0) {
      float* slot = scratch + warp * kStatWords;
      slot[0] = st.max;
      slot[1] = st.sum1;
      slot[2] = st.sumt;
      slot[3] = st.best;
      slot[4] = __int_as_float(st.best_index);
    }
    __syncthreads();
    st = {scratch[0], scratch[1], scratch[2], scratch[3], __float_as_int(scratch[4])};
#pragma unroll
    for (int w = 1; w < kGroup / 32; ++w) {
      const float* slot = scratch + w * kStatWords;
      merge(st, RowStats{slot[0], slot[1], slot[2], slot[3], __float_as_int(slot[4])}, inv_tau);
    }
    __syncthreads();  // scratch is free again
  }
  return st;
}

template <int kGroup>
__device__ float reduce_sum(float value, float* scratch) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_xor_sync(0xffffffffu, value, offset);
  if constexpr (kGroup > 32) {
    if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = value;
    __syncthreads();
    value = scratch[0];
#pragma unroll
    for (int w = 1; w < kGroup / 32; ++w) value += scratch[w];
    __syncthreads();
  }
  return value;
}

template <int kGroup>
__device__ int reduce_argmax(float best, int best_index, float* scratch) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float other = __shfl_xor_sync(0xffffffffu, best, offset);
    const int other_index = __shfl_xor_sync(0xffffffffu, best_index, offset);
    if (better(other, other_index, best, best_index)) {
      best = other;
      best_index = other_index;
    }
  }
  if constexpr (kGroup > 32) {
    if (threadIdx.x % 32 == 0) {
      scratch[2 * (threadIdx.x / 32)] = best;
      scratch[2 * (threadIdx.x / 32) + 1] = __int_as_float(best_index);
    }
    __syncthreads();
    best = scratch[0];
    best_index = __float_as_int(scratch[1]);
#pragma unroll
    for (int w = 1; w < kGroup / 32; ++w) {
      if (better(scratch[2 * w], __float_as_int(scratch[2 * w + 1]), best, best_index)) {
        best = scratch[2 * w];
        best_index = __float_as_int(scratch[2 * w + 1]);
      }
    }
    __syncthreads();
  }
  return best_index;
}

// ---- the kernel -------------------------------------------------------------------------------

// Per-row constants in shared memory, [2G + 6S] words.
struct RowSlot {
  float* teacher_shift;  // [G] max (0 when -inf)
  float* teacher_coef;   // [G] w_g / sum exp((t - max) / tau)
  float* student_shift;  // [S]
  float* inv_sum1;       // [S]
  float* inv_sumt;       // [S]
  float* log_sumt;       // [S]
  float* ce;             // [S]
  float* correct;        // [S] 1 / 0
};

__host__ __device__ inline int slot_words(int num_students, int num_teachers) {
  return 2 * num_teachers + 6 * num_students;
}

template <int kGroup>
__host__ __device__ constexpr int block_threads() {
  return kGroup == 32 ? 256 : kGroup;
}

template <int kGroup>
__host__ __device__ constexpr int scratch_words() {
  return kGroup == 32 ? 0 : (kGroup / 32) * kStatWords;
}

template <typename T, int kGroup, int kVec>
// At most 64 registers a thread: 32 warps an SM keep enough loads in flight.
__global__ void __launch_bounds__(kGroup == 32 ? 256 : kGroup, kGroup == 512 ? 2 : 4) group_kd_kernel(const Params p) {
  constexpr int kRowsPerBlock = block_threads<kGroup>() / kGroup;
#ifdef ORC_FAST_EMULATE_CUDA
  float* shared = emulated_shared_memory();
#else
  extern __shared__ float shared[];
#endif
  const int S = p.num_students, G = p.num_teachers, C = p.num_classes;
  const int64_t B = p.batch;
  const int group = threadIdx.x / kGroup;
  const int lane = threadIdx.x % kGroup;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + group;
  if (row >= B) return;  // only in warp groups: uniform over the warp

  float* scratch = shared;
  float* words = shared + scratch_words<kGroup>() + group * slot_words(S, G);
  RowSlot slot{words, words + G, words + 2 * G, words + 2 * G + S, words + 2 * G + 2 * S,
               words + 2 * G + 3 * S, words + 2 * G + 4 * S, words + 2 * G + 5 * S};

  const T* student = static_cast<const T*>(p.student);
  const T* teachers = static_cast<const T*>(p.teachers);
  T* grad = static_cast<T*>(p.grad);
  const int64_t target = p.target[row];
  const bool valid = target != p.ignore_index;

  if (!valid) {  // ignored row: nothing is read; zeros and false out
    for (int s = 0; s < S; ++s) {
      T* grad_row = grad + (static_cast<int64_t>(s) * B + row) * C;
      float zeros[kVec];
#pragma unroll
      for (int k = 0; k < kVec; ++k) zeros[k] = 0.f;
      const int num_vectors = C / kVec;
      for (int v = lane; v < num_vectors; v += kGroup) store_floats<T, kVec>(grad_row + v * kVec, zeros);
      for (int c = num_vectors * kVec + lane; c < C; c += kGroup) grad_row[c] = from_float<T>(0.f);
    }
    if (lane == 0) {
      for (int s = 0; s < S; ++s) {
        const int64_t out = static_cast<int64_t>(s) * B + row;
        p.loss[out] = 0.f;
        p.kl[out] = 0.f;
        p.ce[out] = 0.f;
        p.student_correct[out] = false;
      }
      for (int g = 0; g < G; ++g) p.teacher_correct[static_cast<int64_t>(g) * B + row] = false;
      p.error_mask[row] = false;
    }
    return;
  }

  // A target outside [0, C) is never read: that row's loss, KL, CE and gradient are NaN.
  const bool bad_target = target < 0 || target >= C;
  const float inv_tau = p.inv_temperature;
  const int num_vectors = C / kVec;
  const int tail_start = num_vectors * kVec;

  // ---- pass 1: statistics of every network row -------------------------------------------
  for (int n = 0; n < G + S; ++n) {
    const bool is_teacher = n < G;
    const T* logits = is_teacher
        ? teachers + static_cast<int64_t>(n) * p.teacher_stride_g + row * p.teacher_stride_b
        : student + static_cast<int64_t>(n - G) * p.student_stride_s + row * p.student_stride_b;
    RowStats st = empty_stats();
    int v = lane;
    // Two vectors in flight per thread before their exps.
    for (; v + kGroup < num_vectors; v += 2 * kGroup) {
      float x0[kVec], x1[kVec];
      load_floats<T, kVec>(logits + v * kVec, x0);
      load_floats<T, kVec>(logits + (v + kGroup) * kVec, x1);
      accumulate<kVec>(st, x0, v * kVec, inv_tau, !is_teacher);
      accumulate<kVec>(st, x1, (v + kGroup) * kVec, inv_tau, !is_teacher);
    }
    if (v < num_vectors) {
      float x0[kVec];
      load_floats<T, kVec>(logits + v * kVec, x0);
      accumulate<kVec>(st, x0, v * kVec, inv_tau, !is_teacher);
    }
    for (int c = tail_start + lane; c < C; c += kGroup) {
      float x0[1] = {to_float(logits[c])};
      accumulate<1>(st, x0, c, inv_tau, !is_teacher);
    }
    st = reduce_stats<kGroup>(st, inv_tau, scratch);
    if (lane == 0) {
      const float shift = st.max == -CUDART_INF_F ? 0.f : st.max;
      const bool correct = static_cast<int64_t>(st.best_index) == target;
      if (is_teacher) {
        slot.teacher_shift[n] = shift;
        slot.teacher_coef[n] = p.teacher_weights[n] / st.sumt;
        p.teacher_correct[static_cast<int64_t>(n) * B + row] = correct;
      } else {
        const int s = n - G;
        slot.student_shift[s] = shift;
        slot.inv_sum1[s] = 1.f / st.sum1;
        slot.inv_sumt[s] = 1.f / st.sumt;
        slot.log_sumt[s] = __logf(st.sumt);
        const float target_logit = bad_target ? CUDART_NAN_F : to_float(logits[target]);
        // log-sum-exp minus the target logit; the difference first, exactly.
        slot.ce[s] = (shift - target_logit) + __logf(st.sum1);
        slot.correct[s] = correct ? 1.f : 0.f;
        p.student_correct[static_cast<int64_t>(s) * B + row] = correct;
      }
    }
  }
  group_sync<kGroup>();  // the slot is written

  // ---- pass 2: p̄, gradient, KL (and the ensemble) ---------------------------------------
  const float tau = p.temperature;
  const T* teacher_row = teachers + row * p.teacher_stride_b;

  for (int s0 = 0; s0 < S; s0 += kStudentTile) {
    const int count = min(kStudentTile, S - s0);
    float kl_sum[kStudentTile];
#pragma unroll
    for (int j = 0; j < kStudentTile; ++j) kl_sum[j] = 0.f;

    // K columns from c0: everything pass 2 does for them.
    auto columns = [&](auto width, int c0) {
      constexpr int K = decltype(width)::value;
      float mean_prob[K];
#pragma unroll
      for (int k = 0; k < K; ++k) mean_prob[k] = 0.f;
#pragma unroll 4
      for (int g = 0; g < G; ++g) {
        float t[K];
        load_floats<T, K>(teacher_row + static_cast<int64_t>(g) * p.teacher_stride_g + c0, t);
        const float coef = slot.teacher_coef[g], t_shift = slot.teacher_shift[g];
#pragma unroll
        for (int k = 0; k < K; ++k) mean_prob[k] += coef * __expf((t[k] - t_shift) * inv_tau);
      }
#pragma unroll
      for (int j = 0; j < kStudentTile; ++j) {
        if (j < count) {
          // Per-student constants come from shared memory (broadcast reads): registers
          // stay free for occupancy.
          const int s = s0 + j;
          const float shift = slot.student_shift[s], inv1 = slot.inv_sum1[s], invt = slot.inv_sumt[s];
          const float logt = slot.log_sumt[s];
          const float a = p.alpha[s];
          const float ce_weight = 1.f - a, kd_weight = a * tau;  // alpha tau^2 * d(z / tau)
          float x[K], g[K];
          load_floats<T, K>(student + static_cast<int64_t>(s) * p.student_stride_s + row * p.student_stride_b + c0, x);
#pragma unroll
          for (int k = 0; k < K; ++k) {
            const float d = x[k] - shift;
            const float prob1 = __expf(d) * inv1;
            const float probt = __expf(d * inv_tau) * invt;
            const float onehot = static_cast<int64_t>(c0 + k) == target ? 1.f : 0.f;
            const float value = ce_weight * (prob1 - onehot) + kd_weight * (probt - mean_prob[k]);
            g[k] = bad_target ? CUDART_NAN_F : value;
            // 0 log 0 = 0; a NaN p̄ stays NaN.
            kl_sum[j] += mean_prob[k] == 0.f ? 0.f : mean_prob[k] * (__logf(mean_prob[k]) - (d * inv_tau - logt));
          }
          store_floats<T, K>(grad + (static_cast<int64_t>(s) * B + row) * C + c0, g);
        }
      }
    };
    for (int c = tail_start + lane; c < C; c += kGroup) columns(std::integral_constant<int, 1>{}, c);
    for (int v = num_vectors - 1 - lane; v >= 0; v -= kGroup) columns(std::integral_constant<int, kVec>{}, v * kVec);

#pragma unroll
    for (int j = 0; j < kStudentTile; ++j) {
      if (j < count) {  // uniform over the group
        const float kl_row = reduce_sum<kGroup>(kl_sum[j], scratch);
        if (lane == 0) {
          const int s = s0 + j;
          const int64_t out = static_cast<int64_t>(s) * B + row;
          const float kl = bad_target ? CUDART_NAN_F : kl_row;
          const float ce = slot.ce[s];
          const float a = p.alpha[s];
          p.kl[out] = kl;
          p.ce[out] = ce;
          p.loss[out] = (1.f - a) * ce + a * tau * tau * kl;
        }
      }
    }
  }

  // ---- error mask ------------------------------------------------------------------------
  // The ensemble rule sweeps the students once more: the argmax of sum_s member_s softmax(z_s).
  const bool ensemble_rule = p.error_rule == 3;
  int ensemble_index = INT_MAX;
  if (ensemble_rule) {
    float ensemble_best = -CUDART_INF_F;
    auto columns = [&](auto width, int c0) {
      constexpr int K = decltype(width)::value;
      float ensemble[K];
#pragma unroll
      for (int k = 0; k < K; ++k) ensemble[k] = 0.f;
      for (int s = 0; s < S; ++s) {
        // member * probability, as the reference computes it (a NaN of a non-member counts).
        const float member = p.error_members[s] > 0.f ? 1.f : 0.f;
        float x[K];
        load_floats<T, K>(student + static_cast<int64_t>(s) * p.student_stride_s + row * p.student_stride_b + c0, x);
        const float shift = slot.student_shift[s], inv1 = slot.inv_sum1[s];
#pragma unroll
        for (int k = 0; k < K; ++k) ensemble[k] += member * (__expf(x[k] - shift) * inv1);
      }
#pragma unroll
      for (int k = 0; k < K; ++k) {
        if (better(ensemble[k], c0 + k, ensemble_best, ensemble_index)) {
          ensemble_best = ensemble[k];
          ensemble_index = c0 + k;
        }
      }
    };
    for (int v = lane; v < num_vectors; v += kGroup) columns(std::integral_constant<int, kVec>{}, v * kVec);
    for (int c = tail_start + lane; c < C; c += kGroup) columns(std::integral_constant<int, 1>{}, c);
    ensemble_index = reduce_argmax<kGroup>(ensemble_best, ensemble_index, scratch);
  }
  if (lane == 0) {
    int members = 0, wrong = 0;
    for (int s = 0; s < S; ++s) {
      const bool is_member = p.error_members[s] > 0.f;
      members += is_member;
      wrong += is_member && slot.correct[s] == 0.f;
    }
    bool error;
    switch (p.error_rule) {
      case 0: error = wrong > 0; break;
      case 1: error = wrong == members && members > 0; break;
      case 2: error = 2 * wrong > members; break;
      default: error = static_cast<int64_t>(ensemble_index) != target && members > 0; break;
    }
    p.error_mask[row] = error;
  }
}

}  // namespace orc_fast::cuda_kernels
