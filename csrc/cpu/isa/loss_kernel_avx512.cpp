// The CPU loss kernels for x86-64 with AVX-512 (F, BW, VL, DQ) and FMA: twice the AVX2 lanes, which the
// conversions of float16/bfloat16 data and the one-pass gradient (two sweeps over each sample) need more than
// the memory-bound float32 forward does. The build compiles this file alone with its flags in cpu/isa/flags.txt,
// and cpu/loss_kernel.cpp calls it only on such CPUs and only where ATen itself runs its AVX-512 kernels.
#if defined(__x86_64__) || defined(_M_X64)
#if !defined(__AVX512F__) || !defined(__AVX512BW__) || !defined(__AVX512VL__) || !defined(__AVX512DQ__) || \
    !defined(__FMA__)
#error "compile cpu/isa/loss_kernel_avx512.cpp with its flags in cpu/isa/flags.txt"
#endif
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include "../loss_kernel.h"
#endif
