// The launchers of the CUDA time-loop kernels, and their emulator with the
// same interface. Both know nothing of torch: the torch side
// (recurrence_cuda.cpp) picks the launch (recurrence_cuda_paths.h), guards
// the device, passes the current stream and checks the error each launcher
// returns. Instantiated per storage type T (float, double, __half,
// __nv_bfloat16) and cell, one file per T: recurrence_cuda_kernels_<T>.cu
// and recurrence_cuda_emulate.cpp.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/recurrence_cuda_bodies.h"
#include "cuda/recurrence_cuda_step.h"
#include "cuda/recurrence_cuda_paths.h"

namespace fastrnn {
namespace cuda {

// What a launch of the grid path needs besides its params: the exchange
// buffer (2, D, N, S) in A with S the padded row of the state (forward) or of
// dz (backward), real columns NaN and padding zero; the barrier counters (D,
// groups), zero; the abort flag, zero (nonzero once a barrier timed out);
// how long a barrier may wait.
template <typename A>
struct GridScratch {
  A* exchange;
  unsigned int* counters;
  unsigned int* abort;
  int64_t timeout_ns;
};

template <typename Cell, typename T>
struct Kernels {
  using A = typename AccOf<T>::type;
  // The persistent, cluster or grid path's kernel for all T steps, forward
  // or backward, as launch describes it.
  static cudaError_t run(const Launch& launch, const ForwardParams<T>& p,
                         const GridScratch<A>& grid, cudaStream_t stream);
  static cudaError_t run(const Launch& launch, const BackwardParams<T>& p,
                         const GridScratch<A>& grid, cudaStream_t stream);
  // Step s of the step path (the bodies of the same names in
  // recurrence_cuda_step.h), one thread per element.
  static cudaError_t forward_step(const ForwardParams<T>& p, int64_t s, const A* hw, A* h, A* c,
                                  A* m, cudaStream_t stream);
  static cudaError_t project_step(const ForwardParams<T>& p, int64_t s, const A* hp, A* h,
                                  cudaStream_t stream);
  static cudaError_t unproject_step(const BackwardParams<T>& p, int64_t s, const A* dh, A* gp,
                                    cudaStream_t stream);
  static cudaError_t backward_step(const BackwardParams<T>& p, int64_t s, const A* dh,
                                   const A* gm, A* z, A* dc, A* dhd, cudaStream_t stream);
  static cudaError_t carry_step(const BackwardParams<T>& p, int64_t s, const A* dzw, const A* dhd,
                                A* dh, cudaStream_t stream);
  // The device's residency for the path's kernels: blocks a multiprocessor
  // holds, clusters the device holds; and whether the cluster kernels carry
  // sm_90 code (a build for older architectures compiles them to a trap).
  static int64_t blocks_per_sm(Path path, bool forward, int64_t threads, int64_t smem);
  static int64_t active_clusters(bool forward, int64_t size, int64_t threads, int64_t smem);
  static bool cluster_code();
};

// The same, run on CPU threads (recurrence_cuda_emulate.cpp): one std::thread
// per CUDA thread, shared memory poisoned with NaN, every block of a cluster
// or grid group (and as many whole groups as fit a budget of threads) at
// once, __syncthreads and cluster barriers as host barriers, shuffles
// through a per-warp exchange, the grid path's own barrier code on
// the __atomic builtins. An exception in a thread stops every thread of the
// launch and comes back as an exception.
template <typename Cell, typename T>
struct Emulator {
  using A = typename AccOf<T>::type;
  static void run(const Launch& launch, const ForwardParams<T>& p, const GridScratch<A>& grid);
  static void run(const Launch& launch, const BackwardParams<T>& p, const GridScratch<A>& grid);
  static void forward_step(const ForwardParams<T>& p, int64_t s, const A* hw, A* h, A* c, A* m);
  static void project_step(const ForwardParams<T>& p, int64_t s, const A* hp, A* h);
  static void unproject_step(const BackwardParams<T>& p, int64_t s, const A* dh, A* gp);
  static void backward_step(const BackwardParams<T>& p, int64_t s, const A* dh, const A* gm,
                            A* z, A* dc, A* dhd);
  static void carry_step(const BackwardParams<T>& p, int64_t s, const A* dzw, const A* dhd,
                         A* dh);
};

// Blocks the emulator runs at once, at most (whole clusters and groups
// always together, so a group larger than this never completes its first
// barrier: how the tests reach the grid barrier's timeout). 0: a budget of
// threads.
void set_emulator_blocks(int64_t blocks);

#define FASTRNN_FOR_EACH_CELL(X, T) \
  X(ElmanTanh, T)                   \
  X(ElmanRelu, T)                   \
  X(Lstm, T)                        \
  X(Gru, T)

}  // namespace cuda
}  // namespace fastrnn
