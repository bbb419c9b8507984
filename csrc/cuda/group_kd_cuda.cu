// CUDA implementation of orc_fast::group_kd_fused (docs/design.md §3 and 4):
// checks, output allocation and the launch of the kernel in group_kd_cuda_kernel.cuh,
// registered for the CUDA dispatch key.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <tuple>

#include "../group_kd_common.h"
#include "group_kd_cuda_kernel.cuh"

namespace orc_fast::cuda_kernels {
namespace {

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

// ---- a cluster per row (sm_90, large rows) ----

constexpr int kSplitGroup = 512;                   // threads of one block of a cluster
constexpr int64_t kSplitMinRowBytes = 256 * 1024;  // below this one block per row stays in L2
constexpr int64_t kSliceBytes = 64 * 1024;         // logits of one block's slice, all networks
constexpr int kPortableClusterSize = 8;            // every sm_90 part runs clusters of 8
constexpr int kMaxClusterSize = 16;                // H100/H200 run 16 when allowed (asked first)

// Blocks per row for the cluster kernel, 0 for one thread group per row.
// ORC_FAST_CUDA_SPLIT=0 turns the cluster kernel off, =k (2..16) forces k blocks a row.
int split_cluster_size(int64_t row_bytes, int vectors) {
  const char* setting = std::getenv("ORC_FAST_CUDA_SPLIT");
  if (setting != nullptr && std::string(setting) == "0") return 0;
  int size = 0;
  if (setting != nullptr && std::atoi(setting) >= 2) {
    size = std::atoi(setting);
  } else if (row_bytes >= kSplitMinRowBytes) {
    size = static_cast<int>((row_bytes + kSliceBytes - 1) / kSliceBytes);
  }
  size = std::min(size, kMaxClusterSize);
  size = std::min(size, vectors);  // every block gets at least one vector
  return size >= 2 ? size : 0;
}

template <typename T, int kVec>
cudaLaunchConfig_t split_config(const Params& params, int cluster_size, cudaStream_t stream,
                                cudaLaunchAttribute* attribute) {
  const int S = params.num_students, G = params.num_teachers;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(params.batch * cluster_size));
  config.blockDim = dim3(kSplitGroup);
  config.dynamicSmemBytes =
      sizeof(float) * (scratch_words<kSplitGroup>() + slot_words(S, G) + split_extra_words(S, G));
  config.stream = stream;
  attribute->id = cudaLaunchAttributeClusterDimension;
  attribute->val.clusterDim.x = cluster_size;
  attribute->val.clusterDim.y = 1;
  attribute->val.clusterDim.z = 1;
  config.attrs = attribute;
  config.numAttrs = 1;
  return config;
}

// Can clusters of this size run this kernel here? Asked once per device and shape class.
template <typename T, int kVec>
bool split_fits(const Params& params, int cluster_size, int device, cudaStream_t stream) {
  static std::mutex mutex;
  static std::map<std::tuple<int, int, int, int, int>, bool> known;
  const size_t shared = sizeof(float) * (scratch_words<kSplitGroup>() + slot_words(params.num_students,
                                                                                     params.num_teachers) +
                                         split_extra_words(params.num_students, params.num_teachers));
  if (shared > 48 * 1024) return false;
  const auto key = std::make_tuple(device, cluster_size, static_cast<int>(shared / 1024),
                                   static_cast<int>(sizeof(T)), kVec);
  const std::lock_guard<std::mutex> lock(mutex);
  const auto found = known.find(key);
  if (found != known.end()) return found->second;
  if (cluster_size > kPortableClusterSize) {
    const cudaError_t allowed = cudaFuncSetAttribute(group_kd_split_kernel<T, kSplitGroup, kVec>,
                                                     cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
    if (allowed != cudaSuccess) {
      (void)cudaGetLastError();
      known[key] = false;
      return false;
    }
  }
  cudaLaunchAttribute attribute;
  cudaLaunchConfig_t config = split_config<T, kVec>(params, cluster_size, stream, &attribute);
  config.gridDim = dim3(static_cast<unsigned>(cluster_size));
  int clusters = 0;
  const cudaError_t status =
      cudaOccupancyMaxActiveClusters(&clusters, group_kd_split_kernel<T, kSplitGroup, kVec>, &config);
  if (status != cudaSuccess) (void)cudaGetLastError();  // clear it: fall back to one block a row
  const bool fits = status == cudaSuccess && clusters > 0;
  known[key] = fits;
  return fits;
}

template <typename T, int kVec>
void launch_split(const Params& params, int cluster_size, cudaStream_t stream) {
  TORCH_CHECK(params.batch * cluster_size <= INT_MAX, "group_kd_fused (CUDA): batch too large for one launch: ",
              params.batch);
  cudaLaunchAttribute attribute;
  const cudaLaunchConfig_t config = split_config<T, kVec>(params, cluster_size, stream, &attribute);
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, group_kd_split_kernel<T, kSplitGroup, kVec>, params, cluster_size));
}

// Compute capability major of a device, cached (no sync).
int capability_major(int device) {
  static std::mutex mutex;
  static std::map<int, int> known;
  const std::lock_guard<std::mutex> lock(mutex);
  const auto found = known.find(device);
  if (found != known.end()) return found->second;
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  known[device] = major;
  return major;
}

template <typename T>
void dispatch(const Params& params, bool aligned, int device, cudaStream_t stream) {
  const int S = params.num_students, G = params.num_teachers, C = params.num_classes;
  // Large rows on sm_90: a cluster of blocks per row (see group_kd_split_kernel).
  if (capability_major(device) >= 9) {
    const int vec = aligned ? static_cast<int>(16 / sizeof(T)) : 1;
    int cluster_size = split_cluster_size(static_cast<int64_t>(S + G) * C * sizeof(T), C / vec);
    constexpr int kVec = static_cast<int>(16 / sizeof(T));
    // A non-portable size the device refuses falls back to the portable one.
    if (cluster_size > kPortableClusterSize &&
        !(aligned ? split_fits<T, kVec>(params, cluster_size, device, stream)
                  : split_fits<T, 1>(params, cluster_size, device, stream))) {
      cluster_size = kPortableClusterSize;
    }
    if (cluster_size >= 2) {
      if (aligned && split_fits<T, kVec>(params, cluster_size, device, stream)) {
        launch_split<T, kVec>(params, cluster_size, stream);
        return;
      }
      if (!aligned && split_fits<T, 1>(params, cluster_size, device, stream)) {
        launch_split<T, 1>(params, cluster_size, stream);
        return;
      }
    }
  }
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

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_kd_fused_cuda(
    const at::Tensor& student_in, const at::Tensor& teachers_in, const at::Tensor& target_in,
    const at::Tensor& teacher_weights_in, const at::Tensor& alpha_in, const at::Tensor& error_members_in,
    double temperature, int64_t ignore_index, int64_t error_rule) {
  namespace common = orc_fast::group_kd_common;
  TORCH_CHECK(student_in.is_cuda(), "group_kd_fused (CUDA): student must be a CUDA tensor");
  const at::Device device = student_in.device();
  TORCH_CHECK(teachers_in.device() == device && target_in.device() == device,
              "group_kd_fused (CUDA): student, teachers and target must be on the same device");
  const common::Sizes sizes = common::check_inputs(
      student_in, teachers_in, target_in, teacher_weights_in, alpha_in, error_members_in, temperature, error_rule,
      [](int64_t S, int64_t G, int64_t C) {
        TORCH_CHECK(S >= 1 && G >= 1 && C >= 1, "group_kd_fused: need S, G, C >= 1, got S = ", S, ", G = ", G,
                    ", C = ", C);
        TORCH_CHECK(C < (int64_t{1} << 30) && S < (int64_t{1} << 20) && G < (int64_t{1} << 20),
                    "group_kd_fused (CUDA): sizes out of range: S = ", S, ", G = ", G, ", C = ", C);
      },
      [&device](const at::Tensor& tensor, const char* name) {
        TORCH_CHECK(tensor.device() == device, "group_kd_fused: ", name, " must be on ", device, ", got ",
                    tensor.device());
      });
  const auto dtype = student_in.scalar_type();
  const int64_t S = sizes.S, B = sizes.B, C = sizes.C, G = sizes.G;

  const c10::cuda::CUDAGuard guard(device);
  const common::Inputs in =
      common::prepare_inputs(student_in, teachers_in, target_in, teacher_weights_in, alpha_in, error_members_in);
  const common::Outputs out = common::allocate_outputs(
      sizes, in.student, [](at::IntArrayRef shape, const at::TensorOptions& options) { return at::empty(shape, options); });
  if (B == 0) return out.as_tuple();

  Params params{};
  static_cast<GroupKDInputPointers&>(params) = in.pointers();
  static_cast<GroupKDOutputPointers&>(params) = out.pointers();
  params.temperature = static_cast<float>(temperature);
  params.inv_temperature = static_cast<float>(1.0 / temperature);
  params.ignore_index = ignore_index;
  params.error_rule = static_cast<int>(error_rule);
  params.num_students = static_cast<int>(S);
  params.num_teachers = static_cast<int>(G);
  params.num_classes = static_cast<int>(C);
  params.batch = B;

  // 16-byte vectors need every row of student, teachers and gradient to start aligned.
  const bool aligned = rows_aligned(in.student) && rows_aligned(in.teachers) && rows_aligned(out.grad);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  switch (dtype) {
    case at::kFloat: dispatch<float>(params, aligned, device.index(), stream); break;
    case at::kHalf: dispatch<__half>(params, aligned, device.index(), stream); break;
    default: dispatch<__nv_bfloat16>(params, aligned, device.index(), stream); break;
  }
  return out.as_tuple();
}

}  // namespace
}  // namespace orc_fast::cuda_kernels

TORCH_LIBRARY_IMPL(orc_fast, CUDA, m) {
  m.impl("group_kd_fused", &orc_fast::cuda_kernels::group_kd_fused_cuda);
}
