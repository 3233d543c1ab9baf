/* The CUDA backend's cu_attn.cu compiled as host C++ against the emulator
 * (cu_emu.h) for tests without a GPU: see tests/test_cuda.c. */
#include "backends/cuda/cu_attn.cu"
