// The CUDA group-KD kernel (csrc/cuda/group_kd_cuda_kernel.cuh) compiled for the CPU.
//
// Where no GPU is, this checks the kernel's logic: indexing, the online softmax, the
// warp-shuffle and shared-memory reductions, the per-row shared slots and the
// barriers. Every CUDA thread of a block is an OS thread; __syncthreads and __syncwarp
// are std::barriers; a warp shuffle is a write to a per-block exchange array between two
// warp barriers. Blocks run one after another. Shared memory starts NaN-filled, so a
// read of a slot nobody wrote shows. The fast-math intrinsics become their accurate
// libm versions, so only the logic is checked here, not the GPU's rounding.
//
// Thread-block clusters (the split kernel) run their blocks together, with a barrier over
// the cluster and each block's shared memory reachable from the others.
//
// Built and driven by tests/test_cuda_emulated.py through ctypes (run_group_kd below).

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#define ORC_FAST_EMULATE_CUDA 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define CUDART_INF_F INFINITY
#define CUDART_NAN_F NAN

struct Dim3 {
  unsigned x = 0, y = 0, z = 0;
};
thread_local Dim3 threadIdx;
thread_local Dim3 blockIdx;

struct uint4 {
  unsigned x, y, z, w;
};

struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};

inline float __half2float(__half h) {
  _Float16 value;
  std::memcpy(&value, &h.bits, 2);
  return static_cast<float>(value);
}
inline __half __float2half_rn(float x) {
  const _Float16 value = static_cast<_Float16>(x);
  __half h;
  std::memcpy(&h.bits, &value, 2);
  return h;
}
inline float __bfloat162float(__nv_bfloat16 h) {
  const uint32_t bits = static_cast<uint32_t>(h.bits) << 16;
  float x;
  std::memcpy(&x, &bits, 4);
  return x;
}
inline __nv_bfloat16 __float2bfloat16_rn(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  __nv_bfloat16 h;
  if ((bits & 0x7fffffffu) > 0x7f800000u) {
    h.bits = 0x7fc0;
  } else {
    bits += 0x7fffu + ((bits >> 16) & 1u);  // round to nearest even
    h.bits = static_cast<uint16_t>(bits >> 16);
  }
  return h;
}

inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __int_as_float(int i) {
  float f;
  std::memcpy(&f, &i, 4);
  return f;
}
inline int __float_as_int(float f) {
  int i;
  std::memcpy(&i, &f, 4);
  return i;
}
inline int min(int a, int b) { return a < b ? a : b; }

// One block's threads, barriers and shared memory.
struct BlockContext {
  BlockContext(int threads, size_t shared_words)
      : block(threads), exchange(threads), shared(shared_words + 1, NAN) {
    for (int w = 0; w < (threads + 31) / 32; ++w) warps.push_back(std::make_unique<std::barrier<>>(32));
  }
  std::barrier<> block;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<uint32_t> exchange;
  std::vector<float> shared;
};
thread_local BlockContext* current_block = nullptr;

// A cluster of blocks that run together (sm_90 thread-block clusters).
struct ClusterContext {
  ClusterContext(int blocks, int threads, size_t shared_words) : barrier(blocks * threads) {
    for (int b = 0; b < blocks; ++b) members.push_back(std::make_unique<BlockContext>(threads, shared_words));
  }
  std::barrier<> barrier;
  std::vector<std::unique_ptr<BlockContext>> members;
};
thread_local ClusterContext* current_cluster = nullptr;
thread_local int current_cluster_rank = 0;

inline float* emulated_shared_memory() { return current_block->shared.data(); }
inline void cluster_sync() { current_cluster->barrier.arrive_and_wait(); }
inline unsigned cluster_rank() { return static_cast<unsigned>(current_cluster_rank); }
inline float* cluster_shared(float* address, int rank) {
  const std::ptrdiff_t offset = address - current_block->shared.data();
  return current_cluster->members[rank]->shared.data() + offset;
}
inline void __syncthreads() { current_block->block.arrive_and_wait(); }
inline void __syncwarp() { current_block->warps[threadIdx.x / 32]->arrive_and_wait(); }

template <typename V>
V __shfl_xor_sync(unsigned, V value, int offset) {
  static_assert(sizeof(V) == 4, "32-bit shuffles only");
  uint32_t bits;
  std::memcpy(&bits, &value, 4);
  current_block->exchange[threadIdx.x] = bits;
  __syncwarp();
  const uint32_t other = current_block->exchange[threadIdx.x ^ static_cast<unsigned>(offset)];
  __syncwarp();
  V result;
  std::memcpy(&result, &other, 4);
  return result;
}

#include "group_kd_cuda_kernel.cuh"

namespace kernels = orc_fast::cuda_kernels;

template <typename T, int kGroup, int kVec>
void emulate_launch(const kernels::Params& params) {
  constexpr int threads = kGroup == 32 ? 256 : kGroup;
  constexpr int rows_per_block = threads / kGroup;
  const int64_t blocks = (params.batch + rows_per_block - 1) / rows_per_block;
  const size_t shared_words = kernels::scratch_words<kGroup>() +
                              rows_per_block * kernels::slot_words(params.num_students, params.num_teachers);
  for (int64_t block = 0; block < blocks; ++block) {
    BlockContext context(threads, shared_words);
    std::vector<std::thread> workers;
    workers.reserve(threads);
    for (int t = 0; t < threads; ++t) {
      workers.emplace_back([&, t] {
        threadIdx.x = t;
        blockIdx.x = static_cast<unsigned>(block);
        current_block = &context;
        kernels::group_kd_kernel<T, kGroup, kVec>(params);
      });
    }
    for (auto& worker : workers) worker.join();
  }
}

// The cluster kernel: one cluster of `cluster_size` blocks per row, clusters one after another.
template <typename T, int kGroup, int kVec>
void emulate_split_launch(const kernels::Params& params, int cluster_size) {
  const size_t shared_words = kernels::scratch_words<kGroup>() +
                              kernels::slot_words(params.num_students, params.num_teachers) +
                              kernels::split_extra_words(params.num_students, params.num_teachers);
  for (int64_t row = 0; row < params.batch; ++row) {
    ClusterContext cluster(cluster_size, kGroup, shared_words);
    std::vector<std::thread> workers;
    workers.reserve(static_cast<size_t>(cluster_size) * kGroup);
    for (int rank = 0; rank < cluster_size; ++rank) {
      for (int t = 0; t < kGroup; ++t) {
        workers.emplace_back([&, rank, t] {
          threadIdx.x = t;
          blockIdx.x = static_cast<unsigned>(row * cluster_size + rank);
          current_block = cluster.members[rank].get();
          current_cluster = &cluster;
          current_cluster_rank = rank;
          kernels::group_kd_split_kernel<T, kGroup, kVec>(params, cluster_size);
        });
      }
    }
    for (auto& worker : workers) worker.join();
  }
}

template <typename T, int kGroup>
void emulate_vec(const kernels::Params& params, bool vectorised, int cluster_size) {
  constexpr int kVec = static_cast<int>(16 / sizeof(T));
  if (cluster_size > 0) {
    if (vectorised) {
      emulate_split_launch<T, kGroup, kVec>(params, cluster_size);
    } else {
      emulate_split_launch<T, kGroup, 1>(params, cluster_size);
    }
  } else if (vectorised) {
    emulate_launch<T, kGroup, kVec>(params);
  } else {
    emulate_launch<T, kGroup, 1>(params);
  }
}

template <typename T>
int emulate_group(const kernels::Params& params, int group, bool vectorised, int cluster_size) {
  switch (group) {
    case 32:
      if (cluster_size > 0) return 1;  // cluster blocks are whole thread groups
      emulate_vec<T, 32>(params, vectorised, 0);
      return 0;
    case 64: emulate_vec<T, 64>(params, vectorised, cluster_size); return 0;  // two warps: cheap to emulate
    case 256: emulate_vec<T, 256>(params, vectorised, cluster_size); return 0;
    case 512: emulate_vec<T, 512>(params, vectorised, cluster_size); return 0;
    default: return 1;
  }
}

extern "C" int run_group_kd(const void* student, int64_t student_stride_s, int64_t student_stride_b,
                            const void* teachers, int64_t teacher_stride_g, int64_t teacher_stride_b,
                            const int64_t* target, const float* teacher_weights, const float* alpha,
                            const float* error_members, float temperature, int64_t ignore_index, int error_rule,
                            int num_students, int num_teachers, int num_classes, int64_t batch, float* loss,
                            float* kl, float* ce, bool* student_correct, bool* teacher_correct, bool* error_mask,
                            void* grad, int dtype, int group, int vectorised, int cluster_size) {
  kernels::Params p{};
  p.student = student;
  p.student_stride_s = student_stride_s;
  p.student_stride_b = student_stride_b;
  p.teachers = teachers;
  p.teacher_stride_g = teacher_stride_g;
  p.teacher_stride_b = teacher_stride_b;
  p.target = target;
  p.teacher_weights = teacher_weights;
  p.alpha = alpha;
  p.error_members = error_members;
  p.temperature = temperature;
  p.inv_temperature = static_cast<float>(1.0 / temperature);
  p.ignore_index = ignore_index;
  p.error_rule = error_rule;
  p.num_students = num_students;
  p.num_teachers = num_teachers;
  p.num_classes = num_classes;
  p.batch = batch;
  p.loss = loss;
  p.kl = kl;
  p.ce = ce;
  p.student_correct = student_correct;
  p.teacher_correct = teacher_correct;
  p.error_mask = error_mask;
  p.grad = grad;
  switch (dtype) {
    case 0: return emulate_group<float>(p, group, vectorised != 0, cluster_size);
    case 1: return emulate_group<__half>(p, group, vectorised != 0, cluster_size);
    case 2: return emulate_group<__nv_bfloat16>(p, group, vectorised != 0, cluster_size);
    default: return 2;
  }
}
