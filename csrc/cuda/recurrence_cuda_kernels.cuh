// The CUDA time-loop kernels: thin __global__ wrappers around the bodies in
// recurrence_cuda_bodies.h and recurrence_cuda_step.h, and their launchers
// (recurrence_cuda_kernels.h).
// Included by one recurrence_cuda_kernels_<T>.cu per storage type, which
// instantiates Kernels<Cell, T> for every cell.
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <mutex>
#include <set>
#include <utility>

#include "cuda/recurrence_cuda_kernels.h"

namespace fastrnn {
namespace cuda {
namespace {

struct DeviceBlock {
  int64_t tid, threads;
  __device__ __forceinline__ void sync() const { __syncthreads(); }
  // The sum over the `lanes` lanes of an aligned group of the warp; every lane
  // of the warp calls it.
  template <typename A>
  __device__ __forceinline__ A lane_sum(A v, int64_t lanes) const {
    for (int o = static_cast<int>(lanes) / 2; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
  }
  __device__ __forceinline__ bool sync_or(bool v) const { return __syncthreads_or(v) != 0; }
  __device__ __forceinline__ void spin() const {}
};

// The block_limit of the path's kernel for Cell and Params (the forward's or
// the backward's, of storage type T).
template <typename Params>
struct StorageBytes;
template <template <typename> class P, typename T>
struct StorageBytes<P<T>> {
  static constexpr int64_t value = sizeof(T);
};
template <typename Cell, typename Params>
constexpr int bound(Path path) {
  return static_cast<int>(block_limit(Cell::kind, StorageBytes<Params>::value, path));
}

// grid (ceil(N / rows), D). Params: the forward's or the backward's.
template <typename Cell, typename Params>
__global__ void __launch_bounds__(bound<Cell, Params>(Path::persistent), 1)
    persistent_kernel(const Params p, const Geometry g) {
  extern __shared__ __align__(16) unsigned char smem[];
  persistent_body<Cell>(p, g, blockIdx.x, blockIdx.y, smem, DeviceBlock{threadIdx.x, blockDim.x});
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
// A member of a 1-D thread-block cluster, as the cluster bodies see it.
struct ClusterBlock : DeviceBlock {
  int64_t rank, size;
  unsigned char* smem;
  __device__ __forceinline__ unsigned char* peer(int64_t q) const {
    return cooperative_groups::this_cluster().map_shared_rank(smem, static_cast<unsigned>(q));
  }
  __device__ __forceinline__ void cluster_sync() const { cooperative_groups::this_cluster().sync(); }
};
#endif

// grid (size * ceil(N / rows), D), clusters of `size` blocks along x. Below
// sm_90 there are no clusters: the kernel traps, and the path choice never
// takes it where the loaded code lacks sm_90 (Kernels::cluster_code).
template <typename Cell, typename Params>
__global__ void __launch_bounds__(bound<Cell, Params>(Path::cluster), 1)
    cluster_kernel(const Params p, const Geometry g) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  extern __shared__ __align__(16) unsigned char smem[];
  const auto cluster = cooperative_groups::this_cluster();
  cluster_body<Cell>(p, g, blockIdx.x / g.size, blockIdx.y, smem,
                     ClusterBlock{{threadIdx.x, blockDim.x}, cluster.block_rank(), g.size, smem});
#else
  __trap();
#endif
}

// A member of a grid group, as the grid bodies and group_barrier see it.
struct GridBlock : DeviceBlock {
  int64_t rank, size;
  unsigned int *counter, *abort;
  int64_t timeout_ns;
};

// grid (size * groups, D); group g is blocks [g * size, (g + 1) * size) of
// its row of the grid. counters: (D, groups) barrier counters; abort: the
// launch's abort flag (GridScratch).
template <typename Cell, typename Params, typename A>
__global__ void __launch_bounds__(bound<Cell, Params>(Path::grid), 1)
    grid_kernel(const Params p, const Geometry g, A* exchange, unsigned int* counters,
                unsigned int* abort, const int64_t timeout_ns) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int64_t grp = blockIdx.x / g.size, groups = gridDim.x / g.size;
  grid_body<Cell>(p, g, grp, blockIdx.y, exchange, smem,
                  GridBlock{{threadIdx.x, blockDim.x}, blockIdx.x % g.size, g.size,
                            counters + blockIdx.y * groups + grp, abort,
                            timeout_ns});
}

// The step path: grid (ceil(N * width / kStepThreads), D), one thread an element.
template <typename Params, typename Fn>
__device__ __forceinline__ void for_element(const Params& p, int64_t width, const Fn& fn) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < p.N * width) fn(static_cast<int64_t>(blockIdx.y), i);
}

template <typename Cell, typename T, typename A>
__global__ void forward_step_kernel(const ForwardParams<T> p, const int64_t s, const A* hw, A* h,
                                    A* c, A* m) {
  for_element(p, p.H, [&](int64_t d, int64_t i) { forward_step_body<Cell>(p, s, hw, h, c, m, d, i); });
}

template <typename T, typename A>
__global__ void project_step_kernel(const ForwardParams<T> p, const int64_t s, const A* hp, A* h) {
  for_element(p, p.P, [&](int64_t d, int64_t i) { project_step_body(p, s, hp, h, d, i); });
}

template <typename T, typename A>
__global__ void unproject_step_kernel(const BackwardParams<T> p, const int64_t s, const A* dh,
                                      A* gp) {
  for_element(p, p.P, [&](int64_t d, int64_t i) { unproject_step_body(p, s, dh, gp, d, i); });
}

template <typename Cell, typename T, typename A>
__global__ void backward_step_kernel(const BackwardParams<T> p, const int64_t s, const A* dh,
                                     const A* gm, A* z, A* dc, A* dhd) {
  for_element(p, p.H, [&](int64_t d, int64_t i) {
    backward_step_body<Cell>(p, s, dh, gm, z, dc, dhd, d, i);
  });
}

template <typename Cell, typename T, typename A>
__global__ void carry_step_kernel(const BackwardParams<T> p, const int64_t s, const A* dzw,
                                  const A* dhd, A* dh) {
  for_element(p, p.P, [&](int64_t d, int64_t i) { carry_step_body<Cell>(p, s, dzw, dhd, dh, d, i); });
}

dim3 step_grid(int64_t N, int64_t width, int64_t D) {
  return dim3(static_cast<unsigned>((N * width + kStepThreads - 1) / kStepThreads),
              static_cast<unsigned>(D));
}

// Raises a kernel's dynamic shared memory limit to the device's opt-in
// maximum, once per device and kernel: setting the exact size before each
// launch would race between host threads launching different shapes.
template <typename Kernel>
cudaError_t allow_smem(Kernel kernel) {
  static std::mutex mu;
  static std::set<std::pair<int, const void*>> done;
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  const auto key = std::make_pair(device, reinterpret_cast<const void*>(kernel));
  std::lock_guard<std::mutex> lock(mu);
  if (done.count(key)) return cudaSuccess;
  int optin = 0;
  err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err != cudaSuccess) return err;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, optin);
  if (err == cudaSuccess) done.insert(key);
  return err;
}

template <typename Kernel, typename... Args>
cudaError_t launch_plain(Kernel kernel, const Launch& l, cudaStream_t stream, Args... args) {
  cudaError_t err = allow_smem(kernel);
  if (err != cudaSuccess) return err;
  kernel<<<dim3(static_cast<unsigned>(l.grid_x), static_cast<unsigned>(l.grid_y)),
           static_cast<unsigned>(l.threads), static_cast<size_t>(l.smem), stream>>>(args...);
  return cudaGetLastError();
}

// The launch configuration of clusters of `size` blocks along x, for a
// launch and for the occupancy query alike.
struct ClusterConfig {
  cudaLaunchConfig_t config = {};
  cudaLaunchAttribute attribute[1] = {};
  ClusterConfig(int64_t grid_x, int64_t grid_y, int64_t threads, int64_t smem, int64_t size,
                cudaStream_t stream) {
    config.gridDim = dim3(static_cast<unsigned>(grid_x), static_cast<unsigned>(grid_y));
    config.blockDim = dim3(static_cast<unsigned>(threads));
    config.dynamicSmemBytes = static_cast<size_t>(smem);
    config.stream = stream;
    attribute[0].id = cudaLaunchAttributeClusterDimension;
    attribute[0].val.clusterDim.x = static_cast<unsigned>(size);
    attribute[0].val.clusterDim.y = 1;
    attribute[0].val.clusterDim.z = 1;
    config.attrs = attribute;
    config.numAttrs = 1;
  }
  ClusterConfig(const ClusterConfig&) = delete;  // config.attrs points into this object
  ClusterConfig& operator=(const ClusterConfig&) = delete;
};

template <typename Kernel, typename Params>
cudaError_t launch_cluster(Kernel kernel, const Launch& l, cudaStream_t stream, const Params& p) {
  cudaError_t err = allow_smem(kernel);
  if (err != cudaSuccess) return err;
  ClusterConfig c(l.grid_x, l.grid_y, l.threads, l.smem, l.geometry.size, stream);
  err = cudaLaunchKernelEx(&c.config, kernel, p, l.geometry);
  if (err != cudaSuccess) return err;
  return cudaGetLastError();
}

// A step-path kernel over `width` elements of each of N rows and D
// directions, one thread an element.
template <typename Kernel, typename... Args>
cudaError_t launch_step(Kernel kernel, int64_t N, int64_t width, int64_t D, cudaStream_t stream,
                        const Args&... args) {
  kernel<<<step_grid(N, width, D), kStepThreads, 0, stream>>>(args...);
  return cudaGetLastError();
}

// One cooperative launch: every block resident at once, or
// cudaErrorCooperativeLaunchTooLarge and nothing runs.
template <typename Kernel, typename Params, typename A>
cudaError_t launch_grid(Kernel kernel, const Launch& l, cudaStream_t stream, const Params& p,
                        const GridScratch<A>& grid) {
  cudaError_t err = allow_smem(kernel);
  if (err != cudaSuccess) return err;
  Params params = p;
  Geometry geometry = l.geometry;
  A* exchange = grid.exchange;
  unsigned int* counters = grid.counters;
  unsigned int* abort = grid.abort;
  int64_t timeout = grid.timeout_ns;
  void* args[] = {&params, &geometry, &exchange, &counters, &abort, &timeout};
  err = cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kernel),
                                    dim3(static_cast<unsigned>(l.grid_x), static_cast<unsigned>(l.grid_y)),
                                    dim3(static_cast<unsigned>(l.threads)), args,
                                    static_cast<size_t>(l.smem), stream);
  if (err != cudaSuccess) return err;
  return cudaGetLastError();
}

template <typename Kernel>
int64_t occupancy(Kernel kernel, int64_t threads, int64_t smem) {
  if (allow_smem(kernel) != cudaSuccess) return 0;
  int blocks = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, static_cast<int>(threads),
                                                    static_cast<size_t>(smem)) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return blocks;
}

}  // namespace

// The single-kernel launch l of the forward or the backward.
template <typename Cell, typename Params, typename A>
cudaError_t launch_path(const Launch& l, const Params& p, const GridScratch<A>& grid,
                        cudaStream_t stream) {
  switch (l.path) {
    case Path::persistent: return launch_plain(persistent_kernel<Cell, Params>, l, stream, p, l.geometry);
    case Path::cluster: return launch_cluster(cluster_kernel<Cell, Params>, l, stream, p);
    case Path::grid: return launch_grid(grid_kernel<Cell, Params, A>, l, stream, p, grid);
    default: return cudaErrorInvalidValue;
  }
}

template <typename Cell, typename T>
cudaError_t Kernels<Cell, T>::run(const Launch& l, const ForwardParams<T>& p,
                                  const GridScratch<A>& grid, cudaStream_t stream) {
  return launch_path<Cell>(l, p, grid, stream);
}

template <typename Cell, typename T>
cudaError_t Kernels<Cell, T>::run(const Launch& l, const BackwardParams<T>& p,
                                  const GridScratch<A>& grid, cudaStream_t stream) {
  return launch_path<Cell>(l, p, grid, stream);
}

template <typename Cell, typename T>
cudaError_t Kernels<Cell, T>::forward_step(const ForwardParams<T>& p, int64_t s, const A* hw,
                                           A* h, A* c, A* m, cudaStream_t stream) {
  return launch_step(forward_step_kernel<Cell, T, A>, p.N, p.H, p.D, stream, p, s, hw, h, c, m);
}

template <typename Cell, typename T>
cudaError_t Kernels<Cell, T>::project_step(const ForwardParams<T>& p, int64_t s, const A* hp,
                                           A* h, cudaStream_t stream) {
  return launch_step(project_step_kernel<T, A>, p.N, p.P, p.D, stream, p, s, hp, h);
}

template <typename Cell, typename T>
cudaError_t Kernels<Cell, T>::unproject_step(const BackwardParams<T>& p, int64_t s, const A* dh,
                                             A* gp, cudaStream_t stream) {
  return launch_step(unproject_step_kernel<T, A>, p.N, p.P, p.D, stream, p, s, dh, gp);
}

template <typename Cell, typename T>
cudaError_t Kernels<Cell, T>::backward_step(const BackwardParams<T>& p, int64_t s, const A* dh,
                                            const A* gm, A* z, A* dc, A* dhd,
                                            cudaStream_t stream) {
  return launch_step(backward_step_kernel<Cell, T, A>, p.N, p.H, p.D, stream, p, s, dh, gm, z, dc,
                     dhd);
}

template <typename Cell, typename T>
cudaError_t Kernels<Cell, T>::carry_step(const BackwardParams<T>& p, int64_t s, const A* dzw,
                                         const A* dhd, A* dh, cudaStream_t stream) {
  return launch_step(carry_step_kernel<Cell, T, A>, p.N, p.P, p.D, stream, p, s, dzw, dhd, dh);
}

template <typename Cell, typename T>
int64_t Kernels<Cell, T>::blocks_per_sm(Path path, bool forward, int64_t threads, int64_t smem) {
  using F = ForwardParams<T>;
  using B = BackwardParams<T>;
  switch (path) {
    case Path::persistent:
      return forward ? occupancy(persistent_kernel<Cell, F>, threads, smem)
                     : occupancy(persistent_kernel<Cell, B>, threads, smem);
    case Path::cluster:
      return forward ? occupancy(cluster_kernel<Cell, F>, threads, smem)
                     : occupancy(cluster_kernel<Cell, B>, threads, smem);
    case Path::grid:
      return forward ? occupancy(grid_kernel<Cell, F, A>, threads, smem)
                     : occupancy(grid_kernel<Cell, B, A>, threads, smem);
    default: return 0;
  }
}

template <typename Cell, typename T>
int64_t Kernels<Cell, T>::active_clusters(bool forward, int64_t size, int64_t threads,
                                          int64_t smem) {
  const auto fwd = cluster_kernel<Cell, ForwardParams<T>>;
  const auto bwd = cluster_kernel<Cell, BackwardParams<T>>;
  if ((forward ? allow_smem(fwd) : allow_smem(bwd)) != cudaSuccess) return 0;
  const ClusterConfig c(size, 1, threads, smem, size, nullptr);
  int clusters = 0;
  const void* kernel = forward ? reinterpret_cast<const void*>(fwd) : reinterpret_cast<const void*>(bwd);
  if (cudaOccupancyMaxActiveClusters(&clusters, kernel, &c.config) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return clusters;
}

// The code a kernel runs was compiled for __CUDA_ARCH__ = ptxVersion * 10:
// a build for sm_80 with PTX runs on an H100 as JIT-compiled sm_90 code
// (binaryVersion 90) whose cluster kernels are traps (ptxVersion 80).
template <typename Cell, typename T>
bool Kernels<Cell, T>::cluster_code() {
  cudaFuncAttributes attr;
  if (cudaFuncGetAttributes(&attr, cluster_kernel<Cell, ForwardParams<T>>) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return attr.binaryVersion >= 90 && attr.ptxVersion >= 90;
}

#define FASTRNN_INSTANTIATE_KERNELS(Cell, T) template struct Kernels<Cell, T>;

}  // namespace cuda
}  // namespace fastrnn
