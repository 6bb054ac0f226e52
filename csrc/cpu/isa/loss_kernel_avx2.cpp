// The CPU loss kernels for x86-64 with AVX2, FMA and F16C; the build compiles this file alone with its flags in
// cpu/isa/flags.txt, and cpu/loss_kernel.cpp calls it only on such CPUs.
#if defined(__x86_64__) || defined(_M_X64)
#if !defined(__AVX2__) || !defined(__FMA__) || !defined(__F16C__)
#error "compile cpu/isa/loss_kernel_avx2.cpp with its flags in cpu/isa/flags.txt"
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "../loss_kernel.h"
#endif
