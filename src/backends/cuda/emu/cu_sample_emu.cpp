/* The CUDA backend's cu_sample.cu compiled as host C++ against the emulator
 * (cu_emu.h) for tests without a GPU: see tests/test_cuda.c. */
#include "backends/cuda/cu_sample.cu"
