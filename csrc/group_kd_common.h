// Host-side code shared by the CPU (cpu/group_kd_cpu.cpp) and CUDA (cuda/group_kd_cuda.cu)
// implementations of orc_fast::group_kd_fused: input checks, input preparation (unit
// stride along classes, contiguous small vectors) and output allocation. What differs
// between the backends -- device checks, size limits, the gradient's allocator -- is
// passed in by the caller.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <tuple>

#include "group_kd_params.h"

namespace orc_fast::group_kd_common {

using Result = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

struct Sizes {
  int64_t S, B, C, G;
};

// A [size] fp32 vector; check_device(tensor, name) checks its device first.
template <typename CheckDevice>
inline void check_vector(const at::Tensor& tensor, const char* name, int64_t size, CheckDevice&& check_device) {
  check_device(tensor, name);
  TORCH_CHECK(tensor.scalar_type() == at::kFloat, "group_kd_fused: ", name, " must be float32, got ",
              tensor.scalar_type());
  TORCH_CHECK(tensor.dim() == 1 && tensor.size(0) == size, "group_kd_fused: ", name, " must have shape [", size,
              "], got ", tensor.sizes());
}

// Checks the op's arguments (after the caller's checks of the logits' and target's
// devices). check_sizes(S, G, C) holds the backend's limits on the sizes;
// check_vector_device(tensor, name) checks where teacher_weights, alpha and
// error_members live.
template <typename CheckSizes, typename CheckVectorDevice>
inline Sizes check_inputs(const at::Tensor& student, const at::Tensor& teachers, const at::Tensor& target,
                          const at::Tensor& teacher_weights, const at::Tensor& alpha,
                          const at::Tensor& error_members, double temperature, int64_t error_rule,
                          CheckSizes&& check_sizes, CheckVectorDevice&& check_vector_device) {
  TORCH_CHECK(student.dim() == 3, "group_kd_fused: student must be [S, B, C], got ", student.sizes());
  TORCH_CHECK(teachers.dim() == 3, "group_kd_fused: teachers must be [G, B, C], got ", teachers.sizes());
  TORCH_CHECK(teachers.scalar_type() == student.scalar_type(), "group_kd_fused: teachers dtype ",
              teachers.scalar_type(), " differs from student dtype ", student.scalar_type());
  const auto dtype = student.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "group_kd_fused: logits must be float32, float16 or bfloat16, got ", dtype);
  const Sizes sizes{student.size(0), student.size(1), student.size(2), teachers.size(0)};
  TORCH_CHECK(teachers.size(1) == sizes.B && teachers.size(2) == sizes.C, "group_kd_fused: teachers' [B, C] ",
              teachers.sizes().slice(1), " does not match student's ", student.sizes().slice(1));
  check_sizes(sizes.S, sizes.G, sizes.C);
  TORCH_CHECK(target.scalar_type() == at::kLong && target.dim() == 1 && target.size(0) == sizes.B,
              "group_kd_fused: target must be int64 [", sizes.B, "], got ", target.scalar_type(), " ",
              target.sizes());
  check_vector(teacher_weights, "teacher_weights", sizes.G, check_vector_device);
  check_vector(alpha, "alpha", sizes.S, check_vector_device);
  check_vector(error_members, "error_members", sizes.S, check_vector_device);
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0,
              "group_kd_fused: temperature must be finite and > 0, got ", temperature);
  TORCH_CHECK(error_rule >= 0 && error_rule <= 3, "group_kd_fused: error_rule must be 0..3, got ", error_rule);
  return sizes;
}

// The inputs as the kernels take them: rows are walked with their own strides, but
// classes need unit stride; the small vectors are contiguous.
struct Inputs {
  at::Tensor student, teachers, target, teacher_weights, alpha, error_members;

  GroupKDInputPointers pointers() const {
    GroupKDInputPointers p{};
    p.student = student.data_ptr();
    p.student_stride_s = student.stride(0);
    p.student_stride_b = student.stride(1);
    p.teachers = teachers.data_ptr();
    p.teacher_stride_g = teachers.stride(0);
    p.teacher_stride_b = teachers.stride(1);
    p.target = target.data_ptr<int64_t>();
    p.teacher_weights = teacher_weights.data_ptr<float>();
    p.alpha = alpha.data_ptr<float>();
    p.error_members = error_members.data_ptr<float>();
    return p;
  }
};

inline Inputs prepare_inputs(const at::Tensor& student, const at::Tensor& teachers, const at::Tensor& target,
                             const at::Tensor& teacher_weights, const at::Tensor& alpha,
                             const at::Tensor& error_members) {
  const int64_t C = student.size(2);
  return {(student.stride(2) == 1 || C == 1) ? student : student.contiguous(),
          (teachers.stride(2) == 1 || C == 1) ? teachers : teachers.contiguous(),
          target.contiguous(),
          teacher_weights.contiguous(),
          alpha.contiguous(),
          error_members.contiguous()};
}

struct Outputs {
  at::Tensor loss, kl, ce, student_correct, teacher_correct, error_mask, grad;

  GroupKDOutputPointers pointers() const {
    GroupKDOutputPointers p{};
    p.loss = loss.data_ptr<float>();
    p.kl = kl.data_ptr<float>();
    p.ce = ce.data_ptr<float>();
    p.student_correct = student_correct.data_ptr<bool>();
    p.teacher_correct = teacher_correct.data_ptr<bool>();
    p.error_mask = error_mask.data_ptr<bool>();
    p.grad = grad.data_ptr();
    return p;
  }

  Result as_tuple() const { return {loss, kl, ce, student_correct, teacher_correct, error_mask, grad}; }
};

// loss, kl, ce [S,B] fp32; student_correct [S,B], teacher_correct [G,B], error_mask [B]
// bool, on the student's device; grad [S,B,C] in the student's dtype from
// allocate_gradient(sizes, options).
template <typename AllocateGradient>
inline Outputs allocate_outputs(const Sizes& sizes, const at::Tensor& student, AllocateGradient&& allocate_gradient) {
  const auto per_sample = student.options().dtype(at::kFloat);
  const auto flags = student.options().dtype(at::kBool);
  Outputs out;
  out.loss = at::empty({sizes.S, sizes.B}, per_sample);
  out.kl = at::empty({sizes.S, sizes.B}, per_sample);
  out.ce = at::empty({sizes.S, sizes.B}, per_sample);
  out.student_correct = at::empty({sizes.S, sizes.B}, flags);
  out.teacher_correct = at::empty({sizes.G, sizes.B}, flags);
  out.error_mask = at::empty({sizes.B}, flags);
  out.grad = allocate_gradient(at::IntArrayRef{sizes.S, sizes.B, sizes.C}, student.options());
  return out;
}

}  // namespace orc_fast::group_kd_common
