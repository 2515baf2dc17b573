// The CUDA time-loop kernels run on CPU threads: the same bodies
// (recurrence_cuda_body.h), one std::thread per CUDA thread and a barrier for
// __syncthreads, shared memory poisoned with NaN before each block; the blocks
// of a cluster or of a grid group run together, with a barrier for the
// group's (cluster_sync, group_sync) and each other's shared memory for
// distributed shared memory. For the
// tests only: it checks the kernels' logic where no GPU is present, not their
// speed nor anything the hardware adds.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "cuda/recurrence_cuda_body.h"

namespace fastrnn {
namespace cuda {

#define FASTRNN_DECLARE_CUDA_EMULATORS(T)                                                        \
  void emulate_forward_persistent(const ForwardParams<T>& p, int64_t rows);                     \
  void emulate_backward_persistent(const BackwardParams<T>& p, int64_t rows);                   \
  void emulate_forward_cluster(const ForwardParams<T>& p, int64_t rows, int64_t cluster);       \
  void emulate_backward_cluster(const BackwardParams<T>& p, int64_t rows, int64_t cluster);     \
  void emulate_forward_grid(const ForwardParams<T>& p, int64_t rows, int64_t size,            \
                            AccOf<T>::type* exchange);                                          \
  void emulate_backward_grid(const BackwardParams<T>& p, int64_t rows, int64_t size,          \
                             AccOf<T>::type* exchange);                                         \
  void emulate_forward_step(const ForwardParams<T>& p, int64_t s, const AccOf<T>::type* hw,     \
                            AccOf<T>::type* state);                                             \
  void emulate_backward_step(const BackwardParams<T>& p, int64_t s, const AccOf<T>::type* dh,   \
                             AccOf<T>::type* dz_acc);                                           \
  void emulate_backward_step_carry(const BackwardParams<T>& p, int64_t s,                       \
                                   const AccOf<T>::type* dzw, AccOf<T>::type* dh);

FASTRNN_DECLARE_CUDA_EMULATORS(float)
FASTRNN_DECLARE_CUDA_EMULATORS(double)
FASTRNN_DECLARE_CUDA_EMULATORS(__half)
FASTRNN_DECLARE_CUDA_EMULATORS(__nv_bfloat16)

}  // namespace cuda
}  // namespace fastrnn
