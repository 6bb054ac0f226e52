// Torch-free portability macro shared by the CPU and CUDA kernels: every formula in csrc/math is
// written once and compiled for both the host and the device.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define RD_HOST_DEVICE __host__ __device__
#define RD_DEVICE_ARRAY __device__
#else
#define RD_HOST_DEVICE
#define RD_DEVICE_ARRAY
#endif

#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
#define RD_ON_DEVICE 1
#else
#define RD_ON_DEVICE 0
#endif
