/* The CUDA backend's cu_attn_tc.cu compiled as host C++ against the
 * emulator (cu_emu.h, which also models WMMA) for tests without a GPU:
 * see tests/test_cuda.c. */
#include "backends/cuda/cu_attn_tc.cu"
