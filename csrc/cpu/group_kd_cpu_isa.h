// One wide-ISA build of the row kernel (group_kd_cpu_kernel.h), chosen at run time by
// group_kd_cpu.cpp. Written once for every instruction set: each ISA translation unit
// (group_kd_cpu_avx2.cpp, group_kd_cpu_avx512.cpp) defines exactly one of
//   ORC_FAST_ISA_AVX2    AVX2 + FMA
//   ORC_FAST_ISA_AVX512  AVX512 (F, BW, VL, DQ)
// and includes this file, once. See the note at the top of group_kd_cpu_kernel.h on why
// the ISA is switched by pragma rather than by compiler flags.
#include "group_kd_cpu.h"

#if defined(ORC_FAST_ISA_AVX2) + defined(ORC_FAST_ISA_AVX512) != 1
#error "define exactly one of ORC_FAST_ISA_AVX2, ORC_FAST_ISA_AVX512 before including group_kd_cpu_isa.h"
#endif

// The accessor declared in group_kd_cpu.h that this build defines.
#ifdef ORC_FAST_ISA_AVX512
#define ORC_FAST_ISA_ROW_KERNEL row_kernel_avx512
#else
#define ORC_FAST_ISA_ROW_KERNEL row_kernel_avx2
#endif

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
// Headers shared with the baseline build come first, compiled for the baseline ISA.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <tuple>
#include <type_traits>
#include <utility>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/irange.h>

#pragma GCC push_options
#ifdef ORC_FAST_ISA_AVX512
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#else
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#endif
#pragma GCC diagnostic push
// GCC 12 flags its own _mm512_undefined_* intrinsics, and ATen's lambda thunks that
// return vector types; neither is reachable from this file's code paths.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wpsabi"
// `#pragma GCC target` does not define the ISA macros that sleef.h (Sleef's vector
// exp/log, called by at::vec) keys its declarations on: define them for that header.
#ifndef __AVX__
#define __AVX__ 1
#define ORC_FAST_DEFINED__AVX__
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#define ORC_FAST_DEFINED__AVX2__
#endif
#ifndef __FMA__
#define __FMA__ 1
#define ORC_FAST_DEFINED__FMA__
#endif
#if defined(ORC_FAST_ISA_AVX512) && !defined(__AVX512F__)
#define __AVX512F__ 1
#define ORC_FAST_DEFINED__AVX512F__
#endif
#include <sleef.h>
#ifdef ORC_FAST_DEFINED__AVX__
#undef __AVX__
#undef ORC_FAST_DEFINED__AVX__
#endif
#ifdef ORC_FAST_DEFINED__AVX2__
#undef __AVX2__
#undef ORC_FAST_DEFINED__AVX2__
#endif
#ifdef ORC_FAST_DEFINED__FMA__
#undef __FMA__
#undef ORC_FAST_DEFINED__FMA__
#endif
#ifdef ORC_FAST_DEFINED__AVX512F__
#undef __AVX512F__
#undef ORC_FAST_DEFINED__AVX512F__
#endif
#ifdef ORC_FAST_ISA_AVX512
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#define ORC_FAST_ROW_KERNEL row_kernel_avx512_impl
#else
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define ORC_FAST_ROW_KERNEL row_kernel_avx2_impl
#endif
#include "group_kd_cpu_kernel.h"
#pragma GCC diagnostic pop
#pragma GCC pop_options

namespace orc_fast::cpu {
RowKernel ORC_FAST_ISA_ROW_KERNEL() { return &CPU_CAPABILITY::ORC_FAST_ROW_KERNEL; }
}  // namespace orc_fast::cpu
#else
// Other compilers and CPUs use the baseline build only.
namespace orc_fast::cpu {
RowKernel ORC_FAST_ISA_ROW_KERNEL() { return nullptr; }
}  // namespace orc_fast::cpu
#endif
