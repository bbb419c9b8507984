// Shared between the CPU op (group_kd_cpu.cpp) and its per-ISA kernel builds
// (group_kd_cpu_avx2.cpp, group_kd_cpu_avx512.cpp). Plain C++ only: the ISA files
// must not pull in torch headers compiled for a wider instruction set than the
// rest of the library (see the note in group_kd_cpu_kernel.h).
#pragma once

#include <cstdint>

#include "../group_kd_params.h"

namespace orc_fast::cpu {

enum class LogitType : int { Float = 0, Half = 1, BFloat16 = 2 };

// Everything the row kernel needs: the tensors' raw pointers and element strides
// (../group_kd_params.h: inputs with unit stride along C, contiguous outputs), sizes
// and scalars.
struct GroupKDParams : GroupKDInputPointers, GroupKDOutputPointers {
  double temperature;
  int64_t ignore_index;
  int64_t error_rule;  // 0 any, 1 all, 2 majority, 3 ensemble
  int64_t num_students;
  int64_t num_teachers;
  int64_t batch;
  int64_t num_classes;
  LogitType logit_type;
};

// Processes rows [row_begin, row_end) of the batch. `scratch` holds
// scratch_floats(num_classes) floats, 64-byte aligned, private to the calling thread.
using RowKernel = void (*)(const GroupKDParams& params, int64_t row_begin, int64_t row_end, float* scratch);

// Per-thread scratch: six class-length fp32 rows (teachers' mean probability, its log,
// two student exponentials, a converted input row, the ensemble probability).
constexpr int64_t kScratchRows = 6;
inline int64_t padded_classes(int64_t num_classes) { return (num_classes + 15) / 16 * 16; }
inline int64_t scratch_floats(int64_t num_classes) { return kScratchRows * padded_classes(num_classes); }

// One build of the kernel per instruction set; nullptr where that build is absent
// (not x86-64, or a compiler without `#pragma GCC target`).
RowKernel row_kernel_default();
RowKernel row_kernel_avx2();
RowKernel row_kernel_avx512();

}  // namespace orc_fast::cpu
