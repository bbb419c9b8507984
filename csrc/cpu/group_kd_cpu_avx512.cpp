// The row kernel built for AVX512 (F, BW, VL, DQ); the build itself is group_kd_cpu_isa.h.
#define ORC_FAST_ISA_AVX512
#include "group_kd_cpu_isa.h"
