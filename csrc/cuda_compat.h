// The one switch between nvcc and the CPU emulation (csrc/sim): kernel files
// include this header and use GF_LAUNCH / GF_EXTERN_SHARED, so the same source
// builds with nvcc and, with GUIDER_FAST_CUDA_SIM defined, with g++.
#pragma once

#ifdef GUIDER_FAST_CUDA_SIM
#include "sim/cuda_sim.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
// kernel<<<grid, block, shmem, stream>>>(args...)
#define GF_LAUNCH(kernel, grid, block, shmem, stream) kernel<<<grid, block, shmem, stream>>>
// The block's dynamic shared memory as `type* name`.
#define GF_EXTERN_SHARED(type, name) extern __shared__ type name[]
#endif

// Full unrolling keeps small per-thread arrays in registers under nvcc (g++ has no use for it).
#ifdef __CUDACC__
#define GF_UNROLL _Pragma("unroll")
#else
#define GF_UNROLL
#endif
