// The CUDA kernel of orc_fast::group_kd_fused (docs/design.md §3 and 4).
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
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math_constants.h>
#endif

#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "../group_kd_params.h"

namespace orc_fast::cuda_kernels {

#if !defined(ORC_FAST_EMULATE_CUDA) && (!defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900)
// Thread-block clusters (sm_90): barrier over the cluster, and another block's shared memory.
__device__ __forceinline__ void cluster_sync() { cooperative_groups::this_cluster().sync(); }
__device__ __forceinline__ unsigned cluster_rank() { return cooperative_groups::this_cluster().block_rank(); }
__device__ __forceinline__ float* cluster_shared(float* address, int rank) {
  return cooperative_groups::this_cluster().map_shared_rank(address, rank);
}
#endif

constexpr int kStudentTile = 4;  // students handled together in pass 2 (registers)
constexpr int kStatWords = 5;    // one RowStats in the inter-warp scratch

// The tensors' pointers and strides (../group_kd_params.h), then sizes and scalars.
struct Params : GroupKDInputPointers, GroupKDOutputPointers {
  float temperature;
  float inv_temperature;
  int64_t ignore_index;
  int error_rule;  // 0 any, 1 all, 2 majority, 3 ensemble
  int num_students;
  int num_teachers;
  int num_classes;
  int64_t batch;
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
__device__ void reduce_argmax(float& best, int& best_index, float* scratch) {
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
}

// ---- per-row state in shared memory -------------------------------------------------------

// Per-row constants, [2G + 7S] words.
struct RowSlot {
  float* teacher_shift;  // [G] max (0 when -inf)
  float* teacher_coef;   // [G] w_g / sum exp((t - max) / tau)
  float* student_shift;  // [S]
  float* inv_sum1;       // [S]
  float* inv_sumt;       // [S]
  float* log_sumt;       // [S]
  float* ce;             // [S]
  float* correct;        // [S] 1 / 0
  float* kl;             // [S] KL summed over the columns this thread group covered
};

__host__ __device__ inline int slot_words(int num_students, int num_teachers) {
  return 2 * num_teachers + 7 * num_students;
}

__device__ inline RowSlot make_slot(float* words, int S, int G) {
  return RowSlot{words,
                 words + G,
                 words + 2 * G,
                 words + 2 * G + S,
                 words + 2 * G + 2 * S,
                 words + 2 * G + 3 * S,
                 words + 2 * G + 4 * S,
                 words + 2 * G + 5 * S,
                 words + 2 * G + 6 * S};
}

template <int kGroup>
__host__ __device__ constexpr int block_threads() {
  return kGroup == 32 ? 256 : kGroup;
}

template <int kGroup>
__host__ __device__ constexpr int scratch_words() {
  return kGroup == 32 ? 0 : (kGroup / 32) * kStatWords;
}

// The columns one thread group covers: vectors [vector_begin, vector_end) of kVec
// elements, then single columns [tail_begin, tail_end).
struct ColumnRange {
  int vector_begin, vector_end, tail_begin, tail_end;
};

template <typename T>
__device__ __forceinline__ const T* teacher_row(const Params& p, int g, int64_t row) {
  return static_cast<const T*>(p.teachers) + static_cast<int64_t>(g) * p.teacher_stride_g + row * p.teacher_stride_b;
}

template <typename T>
__device__ __forceinline__ const T* student_row(const Params& p, int s, int64_t row) {
  return static_cast<const T*>(p.student) + static_cast<int64_t>(s) * p.student_stride_s + row * p.student_stride_b;
}

template <typename T>
__device__ __forceinline__ T* grad_row(const Params& p, int s, int64_t row) {
  return static_cast<T*>(p.grad) + (static_cast<int64_t>(s) * p.batch + row) * p.num_classes;
}

// Pass 1 for one network row over `range`: this thread's share, then merged over the group.
template <typename T, int kGroup, int kVec>
__device__ RowStats scan_statistics(const T* logits, const ColumnRange& range, int lane, float inv_tau,
                                    bool need_sum1, float* scratch) {
  RowStats st = empty_stats();
  int v = range.vector_begin + lane;
  // Two vectors in flight per thread before their exps.
  for (; v + kGroup < range.vector_end; v += 2 * kGroup) {
    float x0[kVec], x1[kVec];
    load_floats<T, kVec>(logits + v * kVec, x0);
    load_floats<T, kVec>(logits + (v + kGroup) * kVec, x1);
    accumulate<kVec>(st, x0, v * kVec, inv_tau, need_sum1);
    accumulate<kVec>(st, x1, (v + kGroup) * kVec, inv_tau, need_sum1);
  }
  if (v < range.vector_end) {
    float x0[kVec];
    load_floats<T, kVec>(logits + v * kVec, x0);
    accumulate<kVec>(st, x0, v * kVec, inv_tau, need_sum1);
  }
  for (int c = range.tail_begin + lane; c < range.tail_end; c += kGroup) {
    float x0[1] = {to_float(logits[c])};
    accumulate<1>(st, x0, c, inv_tau, need_sum1);
  }
  return reduce_stats<kGroup>(st, inv_tau, scratch);
}

// Turn a network's merged statistics into its slot constants (one thread of the group).
template <typename T>
__device__ void finish_network(const Params& p, const RowSlot& slot, int n, int64_t row, int64_t target,
                               bool bad_target, const RowStats& st, bool write_correct) {
  const int G = p.num_teachers;
  const int64_t B = p.batch;
  const float shift = st.max == -CUDART_INF_F ? 0.f : st.max;
  const bool correct = static_cast<int64_t>(st.best_index) == target;
  if (n < G) {
    slot.teacher_shift[n] = shift;
    slot.teacher_coef[n] = p.teacher_weights[n] / st.sumt;
    if (write_correct) p.teacher_correct[static_cast<int64_t>(n) * B + row] = correct;
  } else {
    const int s = n - G;
    slot.student_shift[s] = shift;
    slot.inv_sum1[s] = 1.f / st.sum1;
    slot.inv_sumt[s] = 1.f / st.sumt;
    slot.log_sumt[s] = __logf(st.sumt);
    const float target_logit = bad_target ? CUDART_NAN_F : to_float(student_row<T>(p, s, row)[target]);
    // log-sum-exp minus the target logit; the difference first, exactly.
    slot.ce[s] = (shift - target_logit) + __logf(st.sum1);
    slot.correct[s] = correct ? 1.f : 0.f;
    if (write_correct) p.student_correct[static_cast<int64_t>(s) * B + row] = correct;
  }
}

// Pass 2 over `range`: p̄, the gradient of every student, and slot.kl[s] = the KL terms
// summed over the range (written by lane 0). Columns go last first: the ones read last
// in pass 1 are the likeliest still in L2.
template <typename T, int kGroup, int kVec>
__device__ void write_gradients(const Params& p, const RowSlot& slot, int64_t row, int64_t target, bool bad_target,
                                const ColumnRange& range, int lane, float* scratch) {
  const int S = p.num_students, G = p.num_teachers;
  const float inv_tau = p.inv_temperature, tau = p.temperature;
  const T* teachers = teacher_row<T>(p, 0, row);
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
        load_floats<T, K>(teachers + static_cast<int64_t>(g) * p.teacher_stride_g + c0, t);
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
          load_floats<T, K>(student_row<T>(p, s, row) + c0, x);
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
          store_floats<T, K>(grad_row<T>(p, s, row) + c0, g);
        }
      }
    };
    for (int c = range.tail_begin + lane; c < range.tail_end; c += kGroup) columns(std::integral_constant<int, 1>{}, c);
    for (int v = range.vector_end - 1 - lane; v >= range.vector_begin; v -= kGroup) {
      columns(std::integral_constant<int, kVec>{}, v * kVec);
    }
#pragma unroll
    for (int j = 0; j < kStudentTile; ++j) {
      if (j < count) {  // uniform over the group
        const float kl = reduce_sum<kGroup>(kl_sum[j], scratch);
        if (lane == 0) slot.kl[s0 + j] = kl;
      }
    }
  }
}

// The ensemble rule: this group's argmax of sum_s member_s softmax(z_s) over `range`,
// merged over the group (every thread gets it).
template <typename T, int kGroup, int kVec>
__device__ void ensemble_argmax(const Params& p, const RowSlot& slot, int64_t row, const ColumnRange& range, int lane,
                                float* scratch, float& best, int& best_index) {
  const int S = p.num_students;
  best = -CUDART_INF_F;
  best_index = INT_MAX;
  auto columns = [&](auto width, int c0) {
    constexpr int K = decltype(width)::value;
    float ensemble[K];
#pragma unroll
    for (int k = 0; k < K; ++k) ensemble[k] = 0.f;
    for (int s = 0; s < S; ++s) {
      // member * probability, as the reference computes it (a NaN of a non-member counts).
      const float member = p.error_members[s] > 0.f ? 1.f : 0.f;
      float x[K];
      load_floats<T, K>(student_row<T>(p, s, row) + c0, x);
      const float shift = slot.student_shift[s], inv1 = slot.inv_sum1[s];
#pragma unroll
      for (int k = 0; k < K; ++k) ensemble[k] += member * (__expf(x[k] - shift) * inv1);
    }
#pragma unroll
    for (int k = 0; k < K; ++k) {
      if (better(ensemble[k], c0 + k, best, best_index)) {
        best = ensemble[k];
        best_index = c0 + k;
      }
    }
  };
  for (int v = range.vector_begin + lane; v < range.vector_end; v += kGroup) {
    columns(std::integral_constant<int, kVec>{}, v * kVec);
  }
  for (int c = range.tail_begin + lane; c < range.tail_end; c += kGroup) columns(std::integral_constant<int, 1>{}, c);
  reduce_argmax<kGroup>(best, best_index, scratch);
}

// Outputs of a row from its slot (one thread): loss, KL, CE and the error mask.
__device__ inline void write_row_outputs(const Params& p, const RowSlot& slot, int64_t row, int64_t target,
                                         bool bad_target, int ensemble_index) {
  const int S = p.num_students;
  const int64_t B = p.batch;
  const float tau = p.temperature;
  int members = 0, wrong = 0;
  for (int s = 0; s < S; ++s) {
    const int64_t out = static_cast<int64_t>(s) * B + row;
    const float kl = bad_target ? CUDART_NAN_F : slot.kl[s];
    const float ce = slot.ce[s];
    const float a = p.alpha[s];
    p.kl[out] = kl;
    p.ce[out] = ce;
    p.loss[out] = (1.f - a) * ce + a * tau * tau * kl;
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

// An ignored row: its gradient columns in `range` are zeroed; `outputs` says whether this
// group also writes the row's zeros and falses.
template <typename T, int kGroup, int kVec>
__device__ void ignore_row(const Params& p, int64_t row, const ColumnRange& range, int lane, bool outputs) {
  const int S = p.num_students, G = p.num_teachers;
  const int64_t B = p.batch;
  for (int s = 0; s < S; ++s) {
    T* grad = grad_row<T>(p, s, row);
    float zeros[kVec];
#pragma unroll
    for (int k = 0; k < kVec; ++k) zeros[k] = 0.f;
    for (int v = range.vector_begin + lane; v < range.vector_end; v += kGroup) {
      store_floats<T, kVec>(grad + v * kVec, zeros);
    }
    for (int c = range.tail_begin + lane; c < range.tail_end; c += kGroup) grad[c] = from_float<T>(0.f);
  }
  if (outputs && lane == 0) {
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
}

// ---- one thread group per row ------------------------------------------------------------

// At most 64 registers a thread: 32 warps an SM keep enough loads in flight.
template <typename T, int kGroup, int kVec>
__global__ void __launch_bounds__(kGroup == 32 ? 256 : kGroup, kGroup == 512 ? 2 : 4)
    group_kd_kernel(const Params p) {
  constexpr int kRowsPerBlock = block_threads<kGroup>() / kGroup;
#ifdef ORC_FAST_EMULATE_CUDA
  float* shared = emulated_shared_memory();
#else
  extern __shared__ float shared[];
#endif
  const int S = p.num_students, G = p.num_teachers, C = p.num_classes;
  const int group = threadIdx.x / kGroup;
  const int lane = threadIdx.x % kGroup;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + group;
  if (row >= p.batch) return;  // only in warp groups: uniform over the warp

  float* scratch = shared;
  const RowSlot slot = make_slot(shared + scratch_words<kGroup>() + group * slot_words(S, G), S, G);
  const ColumnRange range{0, C / kVec, (C / kVec) * kVec, C};
  const int64_t target = p.target[row];
  if (target == p.ignore_index) {  // ignored row: nothing is read; zeros and false out
    ignore_row<T, kGroup, kVec>(p, row, range, lane, true);
    return;
  }
  // A target outside [0, C) is never read: that row's loss, KL, CE and gradient are NaN.
  const bool bad_target = target < 0 || target >= C;

  // pass 1: statistics of every network row
  for (int n = 0; n < G + S; ++n) {
    const bool is_teacher = n < G;
    const T* logits = is_teacher ? teacher_row<T>(p, n, row) : student_row<T>(p, n - G, row);
    const RowStats st = scan_statistics<T, kGroup, kVec>(logits, range, lane, p.inv_temperature, !is_teacher, scratch);
    if (lane == 0) finish_network<T>(p, slot, n, row, target, bad_target, st, true);
  }
  group_sync<kGroup>();  // the slot is written

  // pass 2: p̄, gradient, KL; pass 3 for the ensemble rule
  write_gradients<T, kGroup, kVec>(p, slot, row, target, bad_target, range, lane, scratch);
  float ensemble_best = -CUDART_INF_F;
  int ensemble_index = INT_MAX;
  if (p.error_rule == 3) {
    ensemble_argmax<T, kGroup, kVec>(p, slot, row, range, lane, scratch, ensemble_best, ensemble_index);
  }
  if (lane == 0) write_row_outputs(p, slot, row, target, bad_target, ensemble_index);
}

// ---- a thread-block cluster per row (sm_90) ------------------------------------------------
//
// With one group per row, the rows in flight (two blocks an SM) times the row's bytes
// exceed L2 for LLM vocabularies, so pass 2 reads the row from HBM again. Here the
// k blocks of a cluster split the row's columns: each computes its slice's statistics,
// the blocks swap them through distributed shared memory and merge them in the same
// order (the same result everywhere), and pass 2 re-reads only the block's own slice,
// read moments ago and still in L2. HBM then sees about one read of the logits and one
// write of the gradient.

// Shared words of the split kernel beyond the scratch and the slot: per-network slice
// statistics [G + S][kStatWords] and the slice's ensemble argmax (2 words).
__host__ __device__ inline int split_extra_words(int num_students, int num_teachers) {
  return (num_students + num_teachers) * kStatWords + 2;
}

// The columns of cluster block `rank` out of `cluster_size`: whole vectors, the scalar tail
// to the last block.
__host__ __device__ inline ColumnRange split_range(int num_classes, int vec, int rank, int cluster_size) {
  const int vectors = num_classes / vec;
  const int per_block = (vectors + cluster_size - 1) / cluster_size;
  const int begin = rank * per_block < vectors ? rank * per_block : vectors;
  const int end = begin + per_block < vectors ? begin + per_block : vectors;
  const bool last = rank == cluster_size - 1;
  return ColumnRange{begin, end, last ? vectors * vec : num_classes, num_classes};
}

template <typename T, int kGroup, int kVec>
__global__ void __launch_bounds__(kGroup, 1024 / kGroup) group_kd_split_kernel(const Params p, int cluster_size) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  __trap();  // clusters need sm_90; the host never launches this kernel below it
#else
#ifdef ORC_FAST_EMULATE_CUDA
  float* shared = emulated_shared_memory();
#else
  extern __shared__ float shared[];
#endif
  const int S = p.num_students, G = p.num_teachers, C = p.num_classes;
  const int lane = threadIdx.x;
  const int rank = static_cast<int>(cluster_rank());
  const int64_t row = static_cast<int64_t>(blockIdx.x) / cluster_size;
  float* scratch = shared;
  const RowSlot slot = make_slot(shared + scratch_words<kGroup>(), S, G);
  float* partial = shared + scratch_words<kGroup>() + slot_words(S, G);  // [G + S][kStatWords]
  float* partial_ensemble = partial + (G + S) * kStatWords;             // best, index
  const ColumnRange range = split_range(C, kVec, rank, cluster_size);
  const int64_t target = p.target[row];
  if (target == p.ignore_index) {  // the whole cluster leaves together
    ignore_row<T, kGroup, kVec>(p, row, range, lane, rank == 0);
    return;
  }
  const bool bad_target = target < 0 || target >= C;

  // pass 1 on this block's slice; the slice statistics go to `partial`
  for (int n = 0; n < G + S; ++n) {
    const bool is_teacher = n < G;
    const T* logits = is_teacher ? teacher_row<T>(p, n, row) : student_row<T>(p, n - G, row);
    const RowStats st = scan_statistics<T, kGroup, kVec>(logits, range, lane, p.inv_temperature, !is_teacher, scratch);
    if (lane == 0) {
      float* out = partial + n * kStatWords;
      out[0] = st.max;
      out[1] = st.sum1;
      out[2] = st.sumt;
      out[3] = st.best;
      out[4] = __int_as_float(st.best_index);
    }
  }
  cluster_sync();  // every block's slice statistics are in its shared memory
  for (int n = lane; n < G + S; n += kGroup) {
    RowStats st = empty_stats();
    for (int r = 0; r < cluster_size; ++r) {  // the same order in every block: the same result
      const float* in = cluster_shared(partial, r) + n * kStatWords;
      merge(st, RowStats{in[0], in[1], in[2], in[3], __float_as_int(in[4])}, p.inv_temperature);
    }
    finish_network<T>(p, slot, n, row, target, bad_target, st, rank == 0);
  }
  __syncthreads();  // the slot is written

  write_gradients<T, kGroup, kVec>(p, slot, row, target, bad_target, range, lane, scratch);
  if (p.error_rule == 3) {
    float best;
    int best_index;
    ensemble_argmax<T, kGroup, kVec>(p, slot, row, range, lane, scratch, best, best_index);
    if (lane == 0) {
      partial_ensemble[0] = best;
      partial_ensemble[1] = __int_as_float(best_index);
    }
  }
  cluster_sync();  // every block's slot.kl and ensemble candidate are final
  if (rank == 0 && lane == 0) {
    for (int s = 0; s < S; ++s) {
      float kl = 0.f;
      for (int r = 0; r < cluster_size; ++r) kl += cluster_shared(slot.kl, r)[s];
      slot.kl[s] = kl;
    }
    float best = -CUDART_INF_F;
    int best_index = INT_MAX;
    if (p.error_rule == 3) {
      for (int r = 0; r < cluster_size; ++r) {
        const float* in = cluster_shared(partial_ensemble, r);
        if (better(in[0], __float_as_int(in[1]), best, best_index)) {
          best = in[0];
          best_index = __float_as_int(in[1]);
        }
      }
    }
    write_row_outputs(p, slot, row, target, bad_target, best_index);
  }
  cluster_sync();  // no block leaves while block 0 still reads its shared memory
#endif
}

}  // namespace orc_fast::cuda_kernels
