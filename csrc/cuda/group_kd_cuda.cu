// CUDA implementation of orc_fast::group_kd_fused (DESIGN.md sections 3 and 4; issue 4).
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

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAStream.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math_constants.h>

#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>

namespace orc_fast::cuda_kernels {
namespace {

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
  extern __shared__ float shared[];
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

// ---- host side ----------------------------------------------------------------------------------

template <typename T, int kGroup, int kVec>
void launch(const Params& params, size_t shared_bytes, cudaStream_t stream) {
  constexpr int threads = block_threads<kGroup>();
  constexpr int rows_per_block = threads / kGroup;
  const int64_t blocks = (params.batch + rows_per_block - 1) / rows_per_block;
  TORCH_CHECK(blocks <= INT_MAX, "group_kd_fused (CUDA): batch too large for one launch: ", params.batch);
  group_kd_kernel<T, kGroup, kVec><<<static_cast<unsigned>(blocks), threads, shared_bytes, stream>>>(params);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int kGroup>
void launch_aligned_or_not(const Params& params, bool aligned, size_t shared_bytes, cudaStream_t stream) {
  if (aligned) {
    launch<T, kGroup, static_cast<int>(16 / sizeof(T))>(params, shared_bytes, stream);
  } else {
    launch<T, kGroup, 1>(params, shared_bytes, stream);
  }
}

template <typename T>
void dispatch(const Params& params, bool aligned, cudaStream_t stream) {
  const int S = params.num_students, G = params.num_teachers, C = params.num_classes;
  auto shared_bytes = [&](int group) {
    const int threads = group == 32 ? 256 : group;
    const int scratch = group == 32 ? 0 : (group / 32) * kStatWords;
    return sizeof(float) * static_cast<size_t>(scratch + (threads / group) * slot_words(S, G));
  };
  const int group = C <= 2048 ? 32 : (C <= 16384 ? 256 : 512);
  const size_t bytes = shared_bytes(group);
  TORCH_CHECK(bytes <= 48 * 1024, "group_kd_fused (CUDA): S = ", S, " students and G = ", G,
              " teachers need more shared memory than one block has (", bytes, " bytes)");
  if (group == 32) {
    launch_aligned_or_not<T, 32>(params, aligned, bytes, stream);
  } else if (group == 256) {
    launch_aligned_or_not<T, 256>(params, aligned, bytes, stream);
  } else {
    launch_aligned_or_not<T, 512>(params, aligned, bytes, stream);
  }
}

// Does every [*, b, :] row of a 3-D tensor start on a 16-byte boundary?
bool rows_aligned(const at::Tensor& logits) {
  const int64_t bytes = logits.element_size();
  auto aligned_stride = [&](int dim) { return logits.size(dim) == 1 || (logits.stride(dim) * bytes) % 16 == 0; };
  return reinterpret_cast<uintptr_t>(logits.data_ptr()) % 16 == 0 && aligned_stride(0) && aligned_stride(1);
}

void check_vector(const at::Tensor& tensor, const char* name, int64_t size, const at::Device& device) {
  TORCH_CHECK(tensor.device() == device, "group_kd_fused: ", name, " must be on ", device, ", got ", tensor.device());
  TORCH_CHECK(tensor.scalar_type() == at::kFloat, "group_kd_fused: ", name, " must be float32, got ",
              tensor.scalar_type());
  TORCH_CHECK(tensor.dim() == 1 && tensor.size(0) == size, "group_kd_fused: ", name, " must have shape [", size,
              "], got ", tensor.sizes());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_kd_fused_cuda(
    const at::Tensor& student_in, const at::Tensor& teachers_in, const at::Tensor& target_in,
    const at::Tensor& teacher_weights_in, const at::Tensor& alpha_in, const at::Tensor& error_members_in,
    double temperature, int64_t ignore_index, int64_t error_rule) {
  TORCH_CHECK(student_in.is_cuda(), "group_kd_fused (CUDA): student must be a CUDA tensor");
  const at::Device device = student_in.device();
  TORCH_CHECK(teachers_in.device() == device && target_in.device() == device,
              "group_kd_fused (CUDA): student, teachers and target must be on the same device");
  TORCH_CHECK(student_in.dim() == 3, "group_kd_fused: student must be [S, B, C], got ", student_in.sizes());
  TORCH_CHECK(teachers_in.dim() == 3, "group_kd_fused: teachers must be [G, B, C], got ", teachers_in.sizes());
  TORCH_CHECK(teachers_in.scalar_type() == student_in.scalar_type(), "group_kd_fused: teachers dtype ",
              teachers_in.scalar_type(), " differs from student dtype ", student_in.scalar_type());
  const auto dtype = student_in.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "group_kd_fused: logits must be float32, float16 or bfloat16, got ", dtype);
  const int64_t S = student_in.size(0), B = student_in.size(1), C = student_in.size(2);
  const int64_t G = teachers_in.size(0);
  TORCH_CHECK(teachers_in.size(1) == B && teachers_in.size(2) == C, "group_kd_fused: teachers' [B, C] ",
              teachers_in.sizes().slice(1), " does not match student's ", student_in.sizes().slice(1));
  TORCH_CHECK(S >= 1 && G >= 1 && C >= 1, "group_kd_fused: need S, G, C >= 1, got S = ", S, ", G = ", G, ", C = ", C);
  TORCH_CHECK(C < (int64_t{1} << 30) && S < (int64_t{1} << 20) && G < (int64_t{1} << 20),
              "group_kd_fused (CUDA): sizes out of range: S = ", S, ", G = ", G, ", C = ", C);
  TORCH_CHECK(target_in.scalar_type() == at::kLong && target_in.dim() == 1 && target_in.size(0) == B,
              "group_kd_fused: target must be int64 [", B, "], got ", target_in.scalar_type(), " ", target_in.sizes());
  check_vector(teacher_weights_in, "teacher_weights", G, device);
  check_vector(alpha_in, "alpha", S, device);
  check_vector(error_members_in, "error_members", S, device);
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0,
              "group_kd_fused: temperature must be finite and > 0, got ", temperature);
  TORCH_CHECK(error_rule >= 0 && error_rule <= 3, "group_kd_fused: error_rule must be 0..3, got ", error_rule);

  const c10::cuda::CUDAGuard guard(device);
  // Rows are walked with their own strides; classes need unit stride.
  const at::Tensor student = (student_in.stride(2) == 1 || C == 1) ? student_in : student_in.contiguous();
  const at::Tensor teachers = (teachers_in.stride(2) == 1 || C == 1) ? teachers_in : teachers_in.contiguous();
  const at::Tensor target = target_in.contiguous();
  const at::Tensor teacher_weights = teacher_weights_in.contiguous();
  const at::Tensor alpha = alpha_in.contiguous();
  const at::Tensor error_members = error_members_in.contiguous();

  const auto per_sample = student.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({S, B}, per_sample);
  at::Tensor kl = at::empty({S, B}, per_sample);
  at::Tensor ce = at::empty({S, B}, per_sample);
  at::Tensor student_correct = at::empty({S, B}, student.options().dtype(at::kBool));
  at::Tensor teacher_correct = at::empty({G, B}, student.options().dtype(at::kBool));
  at::Tensor error_mask = at::empty({B}, student.options().dtype(at::kBool));
  at::Tensor grad = at::empty({S, B, C}, student.options());
  if (B == 0) return {loss, kl, ce, student_correct, teacher_correct, error_mask, grad};

  Params params{};
  params.student = student.data_ptr();
  params.student_stride_s = student.stride(0);
  params.student_stride_b = student.stride(1);
  params.teachers = teachers.data_ptr();
  params.teacher_stride_g = teachers.stride(0);
  params.teacher_stride_b = teachers.stride(1);
  params.target = target.data_ptr<int64_t>();
  params.teacher_weights = teacher_weights.data_ptr<float>();
  params.alpha = alpha.data_ptr<float>();
  params.error_members = error_members.data_ptr<float>();
  params.temperature = static_cast<float>(temperature);
  params.inv_temperature = static_cast<float>(1.0 / temperature);
  params.ignore_index = ignore_index;
  params.error_rule = static_cast<int>(error_rule);
  params.num_students = static_cast<int>(S);
  params.num_teachers = static_cast<int>(G);
  params.num_classes = static_cast<int>(C);
  params.batch = B;
  params.loss = loss.data_ptr<float>();
  params.kl = kl.data_ptr<float>();
  params.ce = ce.data_ptr<float>();
  params.student_correct = student_correct.data_ptr<bool>();
  params.teacher_correct = teacher_correct.data_ptr<bool>();
  params.error_mask = error_mask.data_ptr<bool>();
  params.grad = grad.data_ptr();

  // 16-byte vectors need every row of student, teachers and gradient to start aligned.
  const bool aligned = rows_aligned(student) && rows_aligned(teachers) && rows_aligned(grad);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  switch (dtype) {
    case at::kFloat: dispatch<float>(params, aligned, stream); break;
    case at::kHalf: dispatch<__half>(params, aligned, stream); break;
    default: dispatch<__nv_bfloat16>(params, aligned, stream); break;
  }
  return {loss, kl, ce, student_correct, teacher_correct, error_mask, grad};
}

}  // namespace
}  // namespace orc_fast::cuda_kernels

TORCH_LIBRARY_IMPL(orc_fast, CUDA, m) {
  m.impl("group_kd_fused", &orc_fast::cuda_kernels::group_kd_fused_cuda);
}
