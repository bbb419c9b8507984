// Raw pointers and strides of orc_fast::group_kd_fused's tensors, shared by the CPU
// row kernel's parameters (cpu/group_kd_cpu.h) and the CUDA kernel's (cuda/
// group_kd_cuda_kernel.cuh), which add their own scalars. Plain C++ only: it is
// compiled by nvcc, by the g++ CUDA emulator (tests/cuda_emulator) and by the per-ISA
// CPU kernel builds, none of which may pull in torch here.
#pragma once

#include <cstdint>

namespace orc_fast {

// Inputs: student [S,B,C] and teachers [G,B,C] with unit stride along C (rows walked
// with the strides below); target [B]; teacher_weights [G], alpha [S], error_members
// [S] contiguous fp32.
struct GroupKDInputPointers {
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
};

// Outputs (contiguous): loss/kl/ce [S,B] fp32, student_correct [S,B], teacher_correct
// [G,B], error_mask [B] bool, grad [S,B,C] in the logits' type.
struct GroupKDOutputPointers {
  float* loss;
  float* kl;
  float* ce;
  bool* student_correct;
  bool* teacher_correct;
  bool* error_mask;
  void* grad;
};

}  // namespace orc_fast
