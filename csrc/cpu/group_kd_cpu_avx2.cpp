// The row kernel built for AVX2 + FMA, chosen at run time (group_kd_cpu.cpp).
// See the note at the top of group_kd_cpu_kernel.h on why the ISA is switched by pragma.
#include "group_kd_cpu.h"

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
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
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
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define ORC_FAST_ROW_KERNEL row_kernel_avx2_impl
#include "group_kd_cpu_kernel.h"
#pragma GCC diagnostic pop
#pragma GCC pop_options

namespace orc_fast::cpu {
RowKernel row_kernel_avx2() { return &AVX2::row_kernel_avx2_impl; }
}  // namespace orc_fast::cpu
#else
// Other compilers and CPUs use the baseline build only.
namespace orc_fast::cpu {
RowKernel row_kernel_avx2() { return nullptr; }
}  // namespace orc_fast::cpu
#endif
