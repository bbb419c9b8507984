// CPU implementation of orc_fast::group_kd_fused (docs/design.md §3 and 4).
//
// One pass over the logits per batch row, rows spread over threads with
// at::parallel_for; the row kernel (group_kd_cpu_kernel.h) is built three times --
// baseline (this file), AVX2 and AVX512 -- and the widest one the CPU supports (as
// ATen sees it: at::get_cpu_capability(), which honours ATEN_CPU_CAPABILITY) is used.
//
// This file must stay first among the csrc/cpu sources (setup.py links them sorted):
// when the linker merges an inline function defined in several of them, it keeps the
// first copy, and the baseline one runs on every CPU.

// The baseline kernel: ATen's vector types in their portable (DEFAULT) form.
#define CPU_CAPABILITY DEFAULT
#define ORC_FAST_ROW_KERNEL row_kernel_default_impl
#include "group_kd_cpu_kernel.h"

#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mul.h>
#include <c10/core/Allocator.h>
#include <torch/library.h>

#include "../group_kd_common.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <type_traits>
#include <string>
#include <tuple>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace orc_fast::cpu {

RowKernel row_kernel_default() { return &DEFAULT::row_kernel_default_impl; }

namespace {

// The gradient is as large as the student logits and freshly allocated on every call;
// with 4 KiB pages, faulting it in (one kernel entry, memcg charge and page clear per
// page) cost as much as the whole kernel at B=1024, C=32000. Large gradients are
// therefore asked for in transparent huge pages, as c10's allocator does under
// THP_MEM_ALLOC_ENABLE=1. Where THP is off, madvise is a no-op and nothing changes.
struct HugePageAllocator final : c10::Allocator {
  static constexpr size_t kHugePage = size_t{2} << 20;

  static void release(void* data) { std::free(data); }

  c10::DataPtr allocate(size_t nbytes) override {
    void* data = nullptr;
#if defined(__linux__)
    const size_t rounded = (nbytes + kHugePage - 1) / kHugePage * kHugePage;
    TORCH_CHECK(posix_memalign(&data, kHugePage, rounded) == 0, "group_kd_fused: out of memory allocating ",
                nbytes, " bytes for the gradient");
    madvise(data, rounded, MADV_HUGEPAGE);
#else
    data = std::malloc(nbytes);
    TORCH_CHECK(data != nullptr || nbytes == 0, "group_kd_fused: out of memory allocating ", nbytes, " bytes");
#endif
    return {data, data, &release, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &release; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

at::Tensor empty_gradient(at::IntArrayRef sizes, const at::TensorOptions& options) {
  constexpr int64_t kHugePageThreshold = int64_t{8} << 20;  // bytes; smaller ones come from the heap
  const int64_t nbytes = c10::multiply_integers(sizes) * static_cast<int64_t>(options.dtype().itemsize());
  if (nbytes < kHugePageThreshold) return at::empty(sizes, options);
  static HugePageAllocator allocator;
  return at::detail::empty_generic(sizes, &allocator, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   options.dtype().toScalarType(), std::nullopt);
}

RowKernel select_row_kernel() {
  // Not cached: ATEN_CPU_CAPABILITY is read once by ATen, and this is a string compare.
  const std::string capability = at::get_cpu_capability();
  if (capability == "AVX512") {
    if (RowKernel kernel = row_kernel_avx512()) return kernel;
  }
  if (capability == "AVX512" || capability == "AVX2") {
    if (RowKernel kernel = row_kernel_avx2()) return kernel;
  }
  return row_kernel_default();
}

LogitType logit_type_of(const at::Tensor& logits) {
  switch (logits.scalar_type()) {
    case at::kFloat: return LogitType::Float;
    case at::kHalf: return LogitType::Half;
    case at::kBFloat16: return LogitType::BFloat16;
    default: TORCH_CHECK(false, "group_kd_fused: logits must be float32, float16 or bfloat16, got ", logits.scalar_type());
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_kd_fused_cpu(
    const at::Tensor& student_in, const at::Tensor& teachers_in, const at::Tensor& target_in,
    const at::Tensor& teacher_weights_in, const at::Tensor& alpha_in, const at::Tensor& error_members_in,
    double temperature, int64_t ignore_index, int64_t error_rule) {
  namespace common = orc_fast::group_kd_common;
  TORCH_CHECK(student_in.device().is_cpu() && teachers_in.device().is_cpu() && target_in.device().is_cpu(),
              "group_kd_fused (CPU): student, teachers and target must be CPU tensors");
  const common::Sizes sizes = common::check_inputs(
      student_in, teachers_in, target_in, teacher_weights_in, alpha_in, error_members_in, temperature, error_rule,
      [](int64_t /*S*/, int64_t G, int64_t C) {
        TORCH_CHECK(G >= 1, "group_kd_fused: need at least one teacher (G = 0)");
        TORCH_CHECK(C >= 1, "group_kd_fused: need at least one class (C = 0)");
      },
      [](const at::Tensor& tensor, const char* name) {
        TORCH_CHECK(tensor.device().is_cpu(), "group_kd_fused: ", name, " must be a CPU tensor, got ",
                    tensor.device());
      });
  const LogitType logit_type = logit_type_of(student_in);
  const int64_t S = sizes.S, B = sizes.B, C = sizes.C, G = sizes.G;

  const common::Inputs in =
      common::prepare_inputs(student_in, teachers_in, target_in, teacher_weights_in, alpha_in, error_members_in);
  const common::Outputs out = common::allocate_outputs(sizes, in.student, &empty_gradient);
  if (B == 0) return out.as_tuple();

  GroupKDParams params{};
  static_cast<GroupKDInputPointers&>(params) = in.pointers();
  static_cast<GroupKDOutputPointers&>(params) = out.pointers();
  params.temperature = temperature;
  params.ignore_index = ignore_index;
  params.error_rule = error_rule;
  params.num_students = S;
  params.num_teachers = G;
  params.batch = B;
  params.num_classes = C;
  params.logit_type = logit_type;

  const RowKernel kernel = select_row_kernel();
  // Enough logits per task that waking a thread pays off (~32k logits, a few microseconds).
  const int64_t logits_per_row = (S + G) * C;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / logits_per_row);
  at::parallel_for(0, B, grain, [&](int64_t row_begin, int64_t row_end) {
    at::Tensor scratch = at::empty({scratch_floats(C)}, in.student.options().dtype(at::kFloat));
    kernel(params, row_begin, row_end, scratch.data_ptr<float>());
  });
  return out.as_tuple();
}

// ---- backward helper: grad_student = per_sample_grad * grad_loss[..., None] ----
// The fused op's backward only scales its saved gradient, but a fresh [S, B, C] output
// from a plain multiply costs as much as the whole forward in 4 KiB page faults at
// vocabulary sizes; this writes it into huge pages like the forward's gradient.
// Arithmetic in fp32, output in the gradient's dtype (as (grad * scale).to(dtype)).

template <typename T>
void scale_rows(const T* in, T* out, const float* scale, int64_t row_begin, int64_t row_end, int64_t C) {
  using Vec = at::vec::Vectorized<float>;
  constexpr int64_t kChunk = 1024;
  float buffer[kChunk];
  for (int64_t row = row_begin; row < row_end; ++row) {
    const Vec factor(scale[row]);
    const T* src = in + row * C;
    T* dst = out + row * C;
    for (int64_t start = 0; start < C; start += kChunk) {
      const int64_t n = std::min(kChunk, C - start);
      const float* values = buffer;
      float* results = buffer;
      if constexpr (std::is_same_v<T, float>) {
        values = src + start;
        results = dst + start;
      } else {
        at::vec::convert(src + start, buffer, n);
      }
      int64_t i = 0;
      for (; i + Vec::size() <= n; i += Vec::size()) (Vec::loadu(values + i) * factor).store(results + i);
      if (i < n) (Vec::loadu(values + i, n - i) * factor).store(results + i, n - i);
      if constexpr (!std::is_same_v<T, float>) at::vec::convert(buffer, dst + start, n);
    }
  }
}

at::Tensor group_kd_scale_grad_cpu(const at::Tensor& per_sample_grad_in, const at::Tensor& grad_loss_in) {
  TORCH_CHECK(per_sample_grad_in.device().is_cpu() && grad_loss_in.device().is_cpu(),
              "group_kd_scale_grad (CPU): expected CPU tensors");
  TORCH_CHECK(per_sample_grad_in.dim() == 3, "group_kd_scale_grad: per_sample_grad must be [S, B, C], got ",
              per_sample_grad_in.sizes());
  const int64_t S = per_sample_grad_in.size(0), B = per_sample_grad_in.size(1), C = per_sample_grad_in.size(2);
  TORCH_CHECK(grad_loss_in.dim() == 2 && grad_loss_in.size(0) == S && grad_loss_in.size(1) == B,
              "group_kd_scale_grad: grad_loss must be [", S, ", ", B, "], got ", grad_loss_in.sizes());
  TORCH_CHECK(at::isFloatingType(grad_loss_in.scalar_type()), "group_kd_scale_grad: grad_loss must be floating point");
  const LogitType type = logit_type_of(per_sample_grad_in);
  const at::Tensor grad = per_sample_grad_in.contiguous();
  const at::Tensor scale = grad_loss_in.to(at::kFloat).contiguous();
  at::Tensor out = empty_gradient(grad.sizes(), grad.options());
  const int64_t rows = S * B;
  if (rows == 0 || C == 0) return out;
  const float* scale_data = scale.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / C);
  at::parallel_for(0, rows, grain, [&](int64_t row_begin, int64_t row_end) {
    switch (type) {
      case LogitType::Float:
        scale_rows(grad.const_data_ptr<float>(), out.data_ptr<float>(), scale_data, row_begin, row_end, C);
        break;
      case LogitType::Half:
        scale_rows(grad.const_data_ptr<c10::Half>(), out.data_ptr<c10::Half>(), scale_data, row_begin, row_end, C);
        break;
      case LogitType::BFloat16:
        scale_rows(grad.const_data_ptr<c10::BFloat16>(), out.data_ptr<c10::BFloat16>(), scale_data, row_begin,
                   row_end, C);
        break;
    }
  });
  return out;
}

// Any other device (and meta tensors under torch.compile): the plain formula.
at::Tensor group_kd_scale_grad_composite(const at::Tensor& per_sample_grad, const at::Tensor& grad_loss) {
  return at::mul(per_sample_grad, grad_loss.unsqueeze(-1)).to(per_sample_grad.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(orc_fast, CompositeExplicitAutograd, m) {
  m.impl("group_kd_scale_grad", &group_kd_scale_grad_composite);
}

TORCH_LIBRARY_IMPL(orc_fast, CPU, m) {
  m.impl("group_kd_fused", &group_kd_fused_cpu);
  m.impl("group_kd_scale_grad", &group_kd_scale_grad_cpu);
}

}  // namespace orc_fast::cpu
