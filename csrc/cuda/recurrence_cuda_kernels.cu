// The CUDA time-loop kernels: thin __global__ wrappers around the bodies in
// recurrence_cuda_body.h, and their launchers (see recurrence_cuda_kernels.h
// for the three paths).
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
__global__ void __launch_bounds__(1024)
    forward_persistent_kernel(const ForwardParams<T> p, const int64_t rows) {
  extern __shared__ __align__(16) unsigned char smem[];
  forward_persistent_body(p, rows, blockIdx.x, blockIdx.y, smem,
                          DeviceBlock{threadIdx.x, blockDim.x});
}

template <typename T>
__global__ void __launch_bounds__(1024)
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
__global__ void __launch_bounds__(1024)
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
__global__ void __launch_bounds__(1024)
    backward_cluster_kernel(const BackwardParams<T> p, const int64_t rows) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  extern __shared__ __align__(16) unsigned char smem[];
  const auto cluster = cooperative_groups::this_cluster();
  const int64_t size = cluster.num_blocks();
  backward_cluster_body(p, rows, blockIdx.x / size, blockIdx.y, smem,
                        ClusterBlock{threadIdx.x, blockDim.x, cluster.block_rank(), size, smem});
#endif
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
