// The CPU loss kernels for any CPU: at::vec's portable vectors (NEON on aarch64, plain C++ elsewhere).
#define CPU_CAPABILITY DEFAULT
#define CPU_CAPABILITY_DEFAULT
#include "../loss_kernel.h"
