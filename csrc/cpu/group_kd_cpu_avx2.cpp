// The row kernel built for AVX2 + FMA; the build itself is group_kd_cpu_isa.h.
#define ORC_FAST_ISA_AVX2
#include "group_kd_cpu_isa.h"
