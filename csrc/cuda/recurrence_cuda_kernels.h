// Launchers of the CUDA time loops (recurrence_cuda_kernels.cu). They know nothing of
// torch: the torch side (recurrence_cuda.cpp) picks the path, guards the
// device, passes the current stream and checks the error each returns, which
// is cudaGetLastError() right after the launch.
//
// Four paths:
//  - persistent: one kernel runs all T steps. A thread block owns a few batch
//    rows of one direction and keeps W_hh and its rows' state in shared
//    memory for the whole sequence; rows never interact, so blocks never wait
//    for each other. Used when W_hh fits in one block's shared memory.
//  - cluster (sm_90): one kernel runs all T steps; W_hh is split by columns
//    between the blocks of a thread-block cluster (2, 4 or 8), which exchange
//    each step's state through distributed shared memory. Used when W_hh
//    fits in a cluster's shared memory but not in one block's.
//  - grid: one cooperative kernel runs all T steps; W_hh is split by columns
//    between the blocks of a group placed anywhere on the device, which
//    exchange each step's state through global memory and a flag barrier.
//    Used when W_hh fits in the shared memory of the whole device but no
//    cluster, and the step is small enough that the kernel beats the GEMM.
//  - step: per step, the hidden-state GEMM through cuBLAS (on the torch side)
//    and one fused elementwise kernel from here. Used for everything else.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/recurrence_cuda_body.h"

namespace fastrnn {
namespace cuda {

#define FASTRNN_DECLARE_CUDA_LAUNCHERS(scalar_t)                                                \
  cudaError_t launch_forward_persistent(const ForwardParams<scalar_t>& p, int64_t rows,        \
                                        cudaStream_t stream);                                  \
  cudaError_t launch_backward_persistent(const BackwardParams<scalar_t>& p, int64_t rows,      \
                                         cudaStream_t stream);                                 \
  /* The cluster path (sm_90 only): clusters of `cluster` blocks, `rows` rows each. */        \
  cudaError_t launch_forward_cluster(const ForwardParams<scalar_t>& p, int64_t rows,           \
                                     int64_t cluster, cudaStream_t stream);                    \
  cudaError_t launch_backward_cluster(const BackwardParams<scalar_t>& p, int64_t rows,         \
                                      int64_t cluster, cudaStream_t stream);                   \
  /* The grid path: groups of `size` blocks, `rows` rows each, all resident at once;        */ \
  /* exchange (2, D, N, H) in the accumulation type, counters (D, groups) zero at launch.   */ \
  cudaError_t launch_forward_grid(const ForwardParams<scalar_t>& p, int64_t rows, int64_t size, \
                                  AccOf<scalar_t>::type* exchange, unsigned int* counters,     \
                                  cudaStream_t stream);                                        \
  cudaError_t launch_backward_grid(const BackwardParams<scalar_t>& p, int64_t rows,            \
                                   int64_t size, AccOf<scalar_t>::type* exchange,              \
                                   unsigned int* counters, cudaStream_t stream);               \
  /* Step s of the step path, forward: state (D, N, H) in the accumulation type holds h     */ \
  /* before the step and after it; hw (D, N, H) = state W_hh^T from cuBLAS.                 */ \
  cudaError_t launch_forward_step(const ForwardParams<scalar_t>& p, int64_t s,                 \
                                  const AccOf<scalar_t>::type* hw,                             \
                                  AccOf<scalar_t>::type* state, cudaStream_t stream);          \
  /* Step s of the step path, backward, first half: dz of the step into p.dz and into      */  \
  /* dz_acc (D, N, H), from dh (D, N, H), the gradient of the state after the step.        */  \
  cudaError_t launch_backward_step(const BackwardParams<scalar_t>& p, int64_t s,               \
                                   const AccOf<scalar_t>::type* dh,                            \
                                   AccOf<scalar_t>::type* dz_acc, cudaStream_t stream);        \
  /* Second half: dh = dz W_hh (dzw, from cuBLAS) for active rows; inactive rows keep dh. */  \
  cudaError_t launch_backward_step_carry(const BackwardParams<scalar_t>& p, int64_t s,         \
                                         const AccOf<scalar_t>::type* dzw,                     \
                                         AccOf<scalar_t>::type* dh, cudaStream_t stream);

FASTRNN_DECLARE_CUDA_LAUNCHERS(float)
FASTRNN_DECLARE_CUDA_LAUNCHERS(double)
FASTRNN_DECLARE_CUDA_LAUNCHERS(__half)
FASTRNN_DECLARE_CUDA_LAUNCHERS(__nv_bfloat16)

}  // namespace cuda
}  // namespace fastrnn
