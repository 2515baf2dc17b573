// The CUDA time-loop kernels: thin __global__ wrappers around the bodies in
// recurrence_cuda_body.h, and their launchers (see recurrence_cuda_kernels.h
// for the four paths).
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/recurrence_cuda_kernels.h"

namespace fastrnn {
namespace cuda {
namespace {

struct DeviceBlock {
  int64_t tid, threads;
  __device__ __forceinline__ void sync() const { __syncthreads(); }
};

// grid (ceil(N / rows), D); shared memory: persistent_smem_bytes.
template <typename T>
__global__ void __launch_bounds__(kMaxThreads, 1)
    forward_persistent_kernel(const ForwardParams<T> p, const int64_t rows) {
  extern __shared__ __align__(16) unsigned char smem[];
  forward_persistent_body(p, rows, blockIdx.x, blockIdx.y, smem,
                          DeviceBlock{threadIdx.x, blockDim.x});
}

template <typename T>
__global__ void __launch_bounds__(kMaxThreads, 1)
    backward_persistent_kernel(const BackwardParams<T> p, const int64_t rows) {
  extern __shared__ __align__(16) unsigned char smem[];
  backward_persistent_body(p, rows, blockIdx.x, blockIdx.y, smem,
                           DeviceBlock{threadIdx.x, blockDim.x});
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
// A member of a 1-D thread-block cluster, as the cluster bodies see it.
struct ClusterBlock {
  int64_t tid, threads, rank, size;
  unsigned char* smem;
  __device__ __forceinline__ unsigned char* peer(int64_t q) const {
    return cooperative_groups::this_cluster().map_shared_rank(smem, static_cast<unsigned>(q));
  }
  __device__ __forceinline__ void cluster_sync() const { cooperative_groups::this_cluster().sync(); }
};
#endif

// grid (cluster * ceil(N / rows), D), clusters of `cluster` blocks along x.
// Compiled to nothing below sm_90, where the cluster path is never chosen.
template <typename T>
__global__ void __launch_bounds__(kMaxThreads, 1)
    forward_cluster_kernel(const ForwardParams<T> p, const int64_t rows) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  extern __shared__ __align__(16) unsigned char smem[];
  const auto cluster = cooperative_groups::this_cluster();
  const int64_t size = cluster.num_blocks();
  forward_cluster_body(p, rows, blockIdx.x / size, blockIdx.y, smem,
                       ClusterBlock{threadIdx.x, blockDim.x, cluster.block_rank(), size, smem});
#endif
}

template <typename T>
__global__ void __launch_bounds__(kMaxThreads, 1)
    backward_cluster_kernel(const BackwardParams<T> p, const int64_t rows) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  extern __shared__ __align__(16) unsigned char smem[];
  const auto cluster = cooperative_groups::this_cluster();
  const int64_t size = cluster.num_blocks();
  backward_cluster_body(p, rows, blockIdx.x / size, blockIdx.y, smem,
                        ClusterBlock{threadIdx.x, blockDim.x, cluster.block_rank(), size, smem});
#endif
}

// A member of a grid group, as the grid bodies see it. group_sync(s) is the
// flag barrier of step s: the counter of the group reaches (s + 1) * size
// when every member has arrived. The fences before the increment and after
// the wait order each member's exchange writes before its arrival and the
// other members' reads after theirs; the block barriers around it hold the
// block's other threads on either side.
struct GridBlock {
  int64_t tid, threads, rank, size;
  unsigned int* counter;
  __device__ __forceinline__ void sync() const { __syncthreads(); }
  __device__ __forceinline__ void group_sync(int64_t s) const {
    __syncthreads();
    if (tid == 0) {
      const unsigned int target = static_cast<unsigned int>((s + 1) * size);
      __threadfence();
      atomicAdd(counter, 1u);
      while (*static_cast<volatile unsigned int*>(counter) < target) {
      }
      __threadfence();
    }
    __syncthreads();
  }
};

// grid (size * groups, D); counters (D, groups), zero at launch; exchange
// (2, D, N, H) in the accumulation type.
template <typename T>
__global__ void __launch_bounds__(kMaxThreads, 1)
    forward_grid_kernel(const ForwardParams<T> p, const int64_t rows, const int64_t size,
                        typename AccOf<T>::type* exchange, unsigned int* counters) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int64_t g = blockIdx.x / size, groups = gridDim.x / size;
  forward_grid_body(p, rows, g, blockIdx.y, exchange, smem,
                    GridBlock{threadIdx.x, blockDim.x, blockIdx.x % size, size,
                              counters + blockIdx.y * groups + g});
}

template <typename T>
__global__ void __launch_bounds__(kMaxThreads, 1)
    backward_grid_kernel(const BackwardParams<T> p, const int64_t rows, const int64_t size,
                         typename AccOf<T>::type* exchange, unsigned int* counters) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int64_t g = blockIdx.x / size, groups = gridDim.x / size;
  backward_grid_body(p, rows, g, blockIdx.y, exchange, smem,
                     GridBlock{threadIdx.x, blockDim.x, blockIdx.x % size, size,
                               counters + blockIdx.y * groups + g});
}

// grid (ceil(N * H / kStepThreads), D).
template <typename T>
__global__ void forward_step_kernel(const ForwardParams<T> p, const int64_t s,
                                    const typename AccOf<T>::type* hw,
                                    typename AccOf<T>::type* state) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < p.N * p.H) forward_step_body(p, s, hw, state, blockIdx.y, i);
}

template <typename T>
__global__ void backward_step_kernel(const BackwardParams<T> p, const int64_t s,
                                     const typename AccOf<T>::type* dh,
                                     typename AccOf<T>::type* dz_acc) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < p.N * p.H) backward_step_body(p, s, dh, dz_acc, blockIdx.y, i);
}

template <typename T>
__global__ void backward_step_carry_kernel(const BackwardParams<T> p, const int64_t s,
                                           const typename AccOf<T>::type* dzw,
                                           typename AccOf<T>::type* dh) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < p.N * p.H) backward_step_carry_body(p, s, dzw, dh, blockIdx.y, i);
}

// One launch of a persistent kernel: grid (ceil(N / rows), D), its shared
// memory raised past the 48 KB default where needed.
template <typename T, typename Params>
cudaError_t launch_persistent(void (*kernel)(const Params, const int64_t), const Params& p,
                              int64_t rows, cudaStream_t stream) {
  const size_t smem = persistent_smem_bytes(p.H, rows, sizeof(typename AccOf<T>::type) == 8);
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>((p.N + rows - 1) / rows), static_cast<unsigned>(p.D));
  kernel<<<grid, persistent_threads(rows, p.H), smem, stream>>>(p, rows);
  return cudaGetLastError();
}

template <typename T, typename Params>
cudaError_t launch_cluster(void (*kernel)(const Params, const int64_t), const Params& p,
                           int64_t rows, int64_t cluster, cudaStream_t stream) {
  const bool is_double = sizeof(typename AccOf<T>::type) == 8;
  const size_t smem = cluster_smem_bytes(p.H, cluster, rows, is_double);
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(cluster * ((p.N + rows - 1) / rows)),
                        static_cast<unsigned>(p.D));
  config.blockDim = dim3(persistent_threads(rows, cluster_columns(p.H, cluster)));
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeClusterDimension;
  attribute[0].val.clusterDim.x = static_cast<unsigned>(cluster);
  attribute[0].val.clusterDim.y = 1;
  attribute[0].val.clusterDim.z = 1;
  config.attrs = attribute;
  config.numAttrs = 1;
  err = cudaLaunchKernelEx(&config, kernel, p, rows);
  if (err != cudaSuccess) return err;
  return cudaGetLastError();
}

// One cooperative launch of a grid kernel: every block resident at once, or
// cudaErrorCooperativeLaunchTooLarge and nothing runs.
template <typename T, typename Params>
cudaError_t launch_grid(void (*kernel)(const Params, const int64_t, const int64_t,
                                       typename AccOf<T>::type*, unsigned int*),
                        const Params& p, int64_t rows, int64_t size,
                        typename AccOf<T>::type* exchange, unsigned int* counters,
                        cudaStream_t stream) {
  const size_t smem = grid_smem_bytes(p.H, size, rows, sizeof(typename AccOf<T>::type) == 8);
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(size * ((p.N + rows - 1) / rows)),
                  static_cast<unsigned>(p.D));
  const dim3 block(persistent_threads(rows, cluster_columns(p.H, size)));
  Params params = p;
  int64_t rows_ = rows, size_ = size;
  void* args[] = {&params, &rows_, &size_, &exchange, &counters};
  err = cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kernel), grid, block, args, smem,
                                    stream);
  if (err != cudaSuccess) return err;
  return cudaGetLastError();
}

dim3 step_grid(int64_t N, int64_t H, int64_t D) {
  return dim3(static_cast<unsigned>((N * H + kStepThreads - 1) / kStepThreads),
              static_cast<unsigned>(D));
}

}  // namespace

#define FASTRNN_DEFINE_CUDA_LAUNCHERS(T)                                                      \
  cudaError_t launch_forward_persistent(const ForwardParams<T>& p, int64_t rows,             \
                                        cudaStream_t stream) {                               \
    return launch_persistent<T>(forward_persistent_kernel<T>, p, rows, stream);              \
  }                                                                                          \
  cudaError_t launch_backward_persistent(const BackwardParams<T>& p, int64_t rows,           \
                                         cudaStream_t stream) {                              \
    return launch_persistent<T>(backward_persistent_kernel<T>, p, rows, stream);             \
  }                                                                                          \
  cudaError_t launch_forward_cluster(const ForwardParams<T>& p, int64_t rows, int64_t cluster, \
                                     cudaStream_t stream) {                                  \
    return launch_cluster<T>(forward_cluster_kernel<T>, p, rows, cluster, stream);           \
  }                                                                                          \
  cudaError_t launch_backward_cluster(const BackwardParams<T>& p, int64_t rows,              \
                                      int64_t cluster, cudaStream_t stream) {                \
    return launch_cluster<T>(backward_cluster_kernel<T>, p, rows, cluster, stream);          \
  }                                                                                          \
  cudaError_t launch_forward_grid(const ForwardParams<T>& p, int64_t rows, int64_t size,      \
                                  AccOf<T>::type* exchange, unsigned int* counters,          \
                                  cudaStream_t stream) {                                     \
    return launch_grid<T>(forward_grid_kernel<T>, p, rows, size, exchange, counters, stream); \
  }                                                                                          \
  cudaError_t launch_backward_grid(const BackwardParams<T>& p, int64_t rows, int64_t size,    \
                                   AccOf<T>::type* exchange, unsigned int* counters,         \
                                   cudaStream_t stream) {                                    \
    return launch_grid<T>(backward_grid_kernel<T>, p, rows, size, exchange, counters, stream); \
  }                                                                                          \
  cudaError_t launch_forward_step(const ForwardParams<T>& p, int64_t s,                      \
                                  const AccOf<T>::type* hw, AccOf<T>::type* state,           \
                                  cudaStream_t stream) {                                     \
    forward_step_kernel<T><<<step_grid(p.N, p.H, p.D), kStepThreads, 0, stream>>>(p, s, hw,  \
                                                                                  state);    \
    return cudaGetLastError();                                                               \
  }                                                                                          \
  cudaError_t launch_backward_step(const BackwardParams<T>& p, int64_t s,                    \
                                   const AccOf<T>::type* dh, AccOf<T>::type* dz_acc,         \
                                   cudaStream_t stream) {                                    \
    backward_step_kernel<T><<<step_grid(p.N, p.H, p.D), kStepThreads, 0, stream>>>(p, s, dh, \
                                                                                   dz_acc);  \
    return cudaGetLastError();                                                               \
  }                                                                                          \
  cudaError_t launch_backward_step_carry(const BackwardParams<T>& p, int64_t s,              \
                                         const AccOf<T>::type* dzw, AccOf<T>::type* dh,      \
                                         cudaStream_t stream) {                              \
    backward_step_carry_kernel<T>                                                            \
        <<<step_grid(p.N, p.H, p.D), kStepThreads, 0, stream>>>(p, s, dzw, dh);              \
    return cudaGetLastError();                                                               \
  }

FASTRNN_DEFINE_CUDA_LAUNCHERS(float)
FASTRNN_DEFINE_CUDA_LAUNCHERS(double)
FASTRNN_DEFINE_CUDA_LAUNCHERS(__half)
FASTRNN_DEFINE_CUDA_LAUNCHERS(__nv_bfloat16)

}  // namespace cuda
}  // namespace fastrnn
