// The CUDA time loop: picks the path, guards the device, runs on the current
// stream and checks every launch. The GEMMs of the step path go through ATen,
// so cuBLAS comes with torch. The same loop drives the kernels' CPU emulator
// (recurrence_cuda_emulate.h) for the tests, on CPU tensors.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <atomic>
#include <limits>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "cuda/recurrence_cuda_emulate.h"
#include "cuda/recurrence_cuda_kernels.h"
#include "recurrence.h"

namespace fastrnn {
namespace {

enum class Path { automatic = 0, persistent = 1, cluster = 2, grid = 3, step = 4 };

std::atomic<int> forced_path{static_cast<int>(Path::automatic)};
std::atomic<int64_t> forced_blocks{0};  // blocks per cluster or grid group; 0: chosen per call
std::atomic<bool> emulation{false};
thread_local std::string last_path = "none";

template <typename S>
struct CudaType {
  using type = S;
};
template <>
struct CudaType<at::Half> {
  using type = __half;
};
template <>
struct CudaType<at::BFloat16> {
  using type = __nv_bfloat16;
};

struct DeviceLimits {
  int64_t smem_optin;
  int64_t sms;
  bool clusters;     // sm_90 and newer: thread-block clusters with distributed shared memory
  bool cooperative;  // cooperative launches: every block of a grid resident at once
};

const DeviceLimits& limits(int device) {
  static std::mutex mu;
  static std::vector<DeviceLimits> cache;
  std::lock_guard<std::mutex> lock(mu);
  if (cache.empty()) {
    int count = 0;
    C10_CUDA_CHECK(cudaGetDeviceCount(&count));
    cache.assign(count, DeviceLimits{-1, 0, false, false});
  }
  DeviceLimits& l = cache.at(device);
  if (l.smem_optin < 0) {
    int smem = 0, sms = 0, major = 0, cooperative = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&cooperative, cudaDevAttrCooperativeLaunch, device));
    l = DeviceLimits{smem, sms, major >= 9, cooperative != 0};
  }
  return l;
}

// The emulator plays an H100/H200: 132 multiprocessors, 227 KB of shared
// memory per block.
constexpr DeviceLimits kEmulatedLimits{227 * 1024, 132, true, true};

// Batch rows per block of the persistent path, or 0 where W_hh does not fit
// in one block's shared memory. Enough blocks to cover the multiprocessors,
// as few rows each as that allows: a block's step costs about rows * H * H /
// threads multiply-adds, and a block never waits for another.
int64_t persistent_rows(const DeviceLimits& l, bool is_double, int64_t D, int64_t N, int64_t H) {
  int64_t rows = std::max<int64_t>(1, (D * N + l.sms - 1) / std::max<int64_t>(1, l.sms));
  rows = std::min(rows, std::max<int64_t>(1, 1024 / H));
  rows = std::min(rows, N);
  while (rows > 1 && cuda::persistent_smem_bytes(H, rows, is_double) > l.smem_optin) --rows;
  return cuda::persistent_smem_bytes(H, rows, is_double) <= l.smem_optin ? rows : 0;
}

// Cluster size and rows per block of the cluster path, or {0, 0} where W_hh
// fits no cluster of up to 8 blocks (the portable limit): the smallest
// cluster that fits, with enough blocks to cover the multiprocessors.
std::pair<int64_t, int64_t> cluster_shape(const DeviceLimits& l, bool is_double, int64_t D,
                                          int64_t N, int64_t H) {
  if (!l.clusters) return {0, 0};
  const int64_t forced = forced_blocks.load(std::memory_order_relaxed);
  for (int64_t C = 2; C <= 8; C *= 2) {
    if (forced > 0 && C != forced) continue;
    const int64_t Hc = cuda::cluster_columns(H, C);
    int64_t rows = std::max<int64_t>(1, (C * D * N + l.sms - 1) / std::max<int64_t>(1, l.sms));
    rows = std::min({rows, std::max<int64_t>(1, 1024 / Hc), N});
    while (rows > 1 && cuda::cluster_smem_bytes(H, C, rows, is_double) > l.smem_optin) --rows;
    if (cuda::cluster_smem_bytes(H, C, rows, is_double) <= l.smem_optin) return {C, rows};
  }
  return {0, 0};
}

// Blocks per group and rows per block of the grid path, or {0, 0} where
// W_hh fits in no group the device can hold at once. Every block of every
// group and direction gets a multiprocessor of its own (one block of up to
// kMaxThreads threads and the shared memory below always fits one), so the
// cooperative launch cannot be refused for size. Among the group sizes that
// fit, the one whose blocks each compute the fewest tiles a step, rounded up
// to whole passes of kMaxThreads threads (a tile is up to four dot products
// of length H, so a second pass doubles the step); the smallest such group,
// since every member adds to the barrier.
std::pair<int64_t, int64_t> grid_shape(const DeviceLimits& l, bool is_double, int64_t D,
                                       int64_t N, int64_t H, int64_t T) {
  if (!l.cooperative) return {0, 0};
  std::pair<int64_t, int64_t> best{0, 0};
  int64_t best_passes = 0;
  const int64_t forced = forced_blocks.load(std::memory_order_relaxed);
  for (int64_t G = 1; G * D <= l.sms && G <= H; ++G) {
    if (forced > 0 && G != forced) continue;
    const int64_t Hc = cuda::cluster_columns(H, G);
    if (cuda::owned_columns(H, G, G - 1) == 0) continue;  // a member without columns
    // The barrier's counter reaches T * G, in 32 bits.
    if (T * G >= (int64_t(1) << 31)) break;
    const int64_t groups = std::min(N, l.sms / (G * D));
    const int64_t rows = (N + groups - 1) / groups;
    if (cuda::grid_smem_bytes(H, G, rows, is_double) > l.smem_optin) continue;
    const int64_t passes = (cuda::row_tiles(rows) * Hc + cuda::kMaxThreads - 1) / cuda::kMaxThreads;
    if (best.first == 0 || passes < best_passes) {
      best = {G, rows};
      best_passes = passes;
    }
  }
  return best;
}

// Whether the grid path should take a call in automatic mode. Its blocks
// are bound by shared-memory reads, at a quarter (one row a thread) to a
// half (tiles of four rows) of the multiprocessors' multiply-add rate, where
// cuBLAS runs near that rate but pays two launches a step (a few
// microseconds): past about 2^25 multiply-adds a step (hidden 1024 at batch
// 32) the per-step GEMM is expected to win. A model, to be checked against
// bench/gpu_check.sh's forced-path timings.
bool grid_pays(int64_t D, int64_t N, int64_t H) { return D * N * H * H <= (int64_t(1) << 25); }

struct Choice {
  Path path;
  int64_t rows;     // batch rows per block (persistent, cluster, grid)
  int64_t cluster;  // blocks per cluster (cluster) or per group (grid)
};

// The path for this call: persistent where W_hh fits one block, else a
// cluster where it fits one, else the grid where it fits the device and
// pays, else the step path; a forced path that cannot run is an error rather
// than a silent switch. Each path's shape is worked out only when that path
// is considered.
Choice choose(const DeviceLimits& l, bool is_double, int64_t D, int64_t T, int64_t N, int64_t H) {
  static const char* const names[] = {"auto", "persistent", "cluster", "grid", "step"};
  const Path forced = static_cast<Path>(forced_path.load(std::memory_order_relaxed));
  const bool automatic = forced == Path::automatic;
  const int64_t blocks = forced_blocks.load(std::memory_order_relaxed);
  auto take = [&](Choice c) {
    last_path = names[static_cast<int>(c.path)];
    return c;
  };
  if (automatic || forced == Path::persistent) {
    const int64_t rows = persistent_rows(l, is_double, D, N, H);
    TORCH_CHECK(automatic || rows > 0, "fastrnn: the persistent CUDA path was forced, but W_hh of "
                "hidden size ", H, " does not fit in one block's shared memory");
    if (rows > 0) return take(Choice{Path::persistent, rows, 0});
  }
  if (automatic || forced == Path::cluster) {
    const auto [C, rows] = cluster_shape(l, is_double, D, N, H);
    TORCH_CHECK(automatic || C > 0, "fastrnn: the cluster CUDA path was forced, but it needs sm_90 "
                "or newer and W_hh of hidden size ", H, " to fit in a cluster of ",
                blocks > 0 ? blocks : 8, " blocks");
    if (C > 0) return take(Choice{Path::cluster, rows, C});
  }
  if ((automatic && grid_pays(D, N, H)) || forced == Path::grid) {
    const auto [G, rows] = grid_shape(l, is_double, D, N, H, T);
    TORCH_CHECK(automatic || G > 0, "fastrnn: the grid CUDA path was forced, but W_hh of hidden "
                "size ", H, " does not fit in the shared memory of ",
                blocks > 0 ? std::to_string(blocks) + " blocks"
                           : std::string("the blocks this device can hold at once"),
                " in ", D, " direction(s)");
    if (G > 0) return take(Choice{Path::grid, rows, G});
  }
  return take(Choice{Path::step, 0, 0});
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// The grid path's scratch: the exchange buffer (2, D, N, H) in the
// accumulation type, NaN so that a read of a value never written shows, and
// the barrier counters (D, groups), zero. Both on the current stream, so
// nothing waits for the device.
std::pair<at::Tensor, at::Tensor> grid_scratch(const at::TensorOptions& acc, int64_t D, int64_t N,
                                               int64_t H, const Choice& c) {
  const int64_t groups = (N + c.rows - 1) / c.rows;
  return {at::full({2, D, N, H}, std::numeric_limits<double>::quiet_NaN(), acc),
          at::zeros({D, groups}, acc.dtype(at::kInt))};
}

// How the time loop reaches its kernels: launched on the GPU, on the current
// stream, each launch checked...
struct DeviceLaunch {
  cudaStream_t stream;
  template <typename P>
  void forward_persistent(const P& p, int64_t rows) const {
    C10_CUDA_CHECK(cuda::launch_forward_persistent(p, rows, stream));
  }
  template <typename P>
  void backward_persistent(const P& p, int64_t rows) const {
    C10_CUDA_CHECK(cuda::launch_backward_persistent(p, rows, stream));
  }
  template <typename P>
  void forward_cluster(const P& p, int64_t rows, int64_t cluster) const {
    C10_CUDA_CHECK(cuda::launch_forward_cluster(p, rows, cluster, stream));
  }
  template <typename P>
  void backward_cluster(const P& p, int64_t rows, int64_t cluster) const {
    C10_CUDA_CHECK(cuda::launch_backward_cluster(p, rows, cluster, stream));
  }
  template <typename P, typename A>
  void forward_grid(const P& p, int64_t rows, int64_t size, A* exchange, unsigned int* counters) const {
    C10_CUDA_CHECK(cuda::launch_forward_grid(p, rows, size, exchange, counters, stream));
  }
  template <typename P, typename A>
  void backward_grid(const P& p, int64_t rows, int64_t size, A* exchange, unsigned int* counters) const {
    C10_CUDA_CHECK(cuda::launch_backward_grid(p, rows, size, exchange, counters, stream));
  }
  template <typename P, typename A>
  void forward_step(const P& p, int64_t s, const A* hw, A* state) const {
    C10_CUDA_CHECK(cuda::launch_forward_step(p, s, hw, state, stream));
  }
  template <typename P, typename A>
  void backward_step(const P& p, int64_t s, const A* dh, A* dz) const {
    C10_CUDA_CHECK(cuda::launch_backward_step(p, s, dh, dz, stream));
  }
  template <typename P, typename A>
  void backward_step_carry(const P& p, int64_t s, const A* dzw, A* dh) const {
    C10_CUDA_CHECK(cuda::launch_backward_step_carry(p, s, dzw, dh, stream));
  }
};

// ...or run by the emulator on CPU threads.
struct EmulatedLaunch {
  template <typename P>
  void forward_persistent(const P& p, int64_t rows) const {
    cuda::emulate_forward_persistent(p, rows);
  }
  template <typename P>
  void backward_persistent(const P& p, int64_t rows) const {
    cuda::emulate_backward_persistent(p, rows);
  }
  template <typename P>
  void forward_cluster(const P& p, int64_t rows, int64_t cluster) const {
    cuda::emulate_forward_cluster(p, rows, cluster);
  }
  template <typename P>
  void backward_cluster(const P& p, int64_t rows, int64_t cluster) const {
    cuda::emulate_backward_cluster(p, rows, cluster);
  }
  template <typename P, typename A>
  void forward_grid(const P& p, int64_t rows, int64_t size, A* exchange, unsigned int*) const {
    cuda::emulate_forward_grid(p, rows, size, exchange);
  }
  template <typename P, typename A>
  void backward_grid(const P& p, int64_t rows, int64_t size, A* exchange, unsigned int*) const {
    cuda::emulate_backward_grid(p, rows, size, exchange);
  }
  template <typename P, typename A>
  void forward_step(const P& p, int64_t s, const A* hw, A* state) const {
    cuda::emulate_forward_step(p, s, hw, state);
  }
  template <typename P, typename A>
  void backward_step(const P& p, int64_t s, const A* dh, A* dz) const {
    cuda::emulate_backward_step(p, s, dh, dz);
  }
  template <typename P, typename A>
  void backward_step_carry(const P& p, int64_t s, const A* dzw, A* dh) const {
    cuda::emulate_backward_step_carry(p, s, dzw, dh);
  }
};

template <typename Launch>
void forward_loop(const Launch& launch, const DeviceLimits& l, const at::Tensor& u,
                  const at::Tensor& w_hh_t, const at::Tensor& h0,
                  const std::optional<at::Tensor>& lengths, const at::Tensor& y,
                  const at::Tensor& hn, bool relu) {
  const int64_t D = u.size(0), T = u.size(1), N = u.size(2), H = u.size(3);
  const Choice c = choose(l, u.scalar_type() == at::kDouble, D, T, N, H);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "fastrnn_forward_cuda", [&] {
    using T_ = typename CudaType<scalar_t>::type;
    ForwardParams<T_> p;
    p.T = T; p.N = N; p.H = H; p.D = D;
    p.u = reinterpret_cast<const T_*>(u.data_ptr<scalar_t>());
    p.w_hh_t = reinterpret_cast<const T_*>(w_hh_t.data_ptr<scalar_t>());
    p.h0 = reinterpret_cast<const T_*>(h0.data_ptr<scalar_t>());
    p.lengths = lengths ? lengths->data_ptr<int64_t>() : nullptr;
    p.y = reinterpret_cast<T_*>(y.data_ptr<scalar_t>());
    p.hn = reinterpret_cast<T_*>(hn.data_ptr<scalar_t>());
    p.relu = relu;
    if (c.path == Path::persistent) {
      launch.forward_persistent(p, c.rows);
      return;
    }
    if (c.path == Path::cluster) {
      launch.forward_cluster(p, c.rows, c.cluster);
      return;
    }
    using A = typename cuda::AccOf<T_>::type;
    const auto acc = u.options().dtype(acc_type(u.scalar_type()));
    if (c.path == Path::grid) {
      auto [exchange, counters] = grid_scratch(acc, D, N, H, c);
      launch.forward_grid(p, c.rows, c.cluster, exchange.template data_ptr<A>(),
                          reinterpret_cast<unsigned int*>(counters.template data_ptr<int32_t>()));
      return;
    }
    const at::Tensor w = w_hh_t.to(acc);                 // (D, H, H) W_hh^T
    at::Tensor state = h0.to(acc).contiguous().clone();  // (D, N, H)
    at::Tensor hw = at::empty({D, N, H}, acc);           // (D, N, H)
    for (int64_t s = 0; s < T; ++s) {
      at::bmm_out(hw, state, w);
      launch.forward_step(p, s, hw.data_ptr<A>(), state.data_ptr<A>());
    }
    hn.copy_(state);
  });
}

template <typename Launch>
void backward_loop(const Launch& launch, const DeviceLimits& l, const at::Tensor& dy,
                   const std::optional<at::Tensor>& dhn, const at::Tensor& y,
                   const at::Tensor& w_hh, const std::optional<at::Tensor>& lengths,
                   const at::Tensor& dz, const at::Tensor& dh0, bool relu) {
  const int64_t D = dz.size(0), T = dz.size(1), N = dz.size(2), H = dz.size(3);
  const Choice c = choose(l, dz.scalar_type() == at::kDouble, D, T, N, H);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dz.scalar_type(), "fastrnn_backward_cuda", [&] {
    using T_ = typename CudaType<scalar_t>::type;
    BackwardParams<T_> p;
    p.T = T; p.N = N; p.H = H; p.D = D;
    p.dy = reinterpret_cast<const T_*>(dy.data_ptr<scalar_t>());
    p.dhn = dhn ? reinterpret_cast<const T_*>(dhn->data_ptr<scalar_t>()) : nullptr;
    p.y = reinterpret_cast<const T_*>(y.data_ptr<scalar_t>());
    p.w_hh = reinterpret_cast<const T_*>(w_hh.data_ptr<scalar_t>());
    p.lengths = lengths ? lengths->data_ptr<int64_t>() : nullptr;
    p.dz = reinterpret_cast<T_*>(dz.data_ptr<scalar_t>());
    p.dh0 = reinterpret_cast<T_*>(dh0.data_ptr<scalar_t>());
    p.relu = relu;
    if (c.path == Path::persistent) {
      launch.backward_persistent(p, c.rows);
      return;
    }
    if (c.path == Path::cluster) {
      launch.backward_cluster(p, c.rows, c.cluster);
      return;
    }
    using A = typename cuda::AccOf<T_>::type;
    const auto acc = dz.options().dtype(acc_type(dz.scalar_type()));
    if (c.path == Path::grid) {
      auto [exchange, counters] = grid_scratch(acc, D, N, H, c);
      launch.backward_grid(p, c.rows, c.cluster, exchange.template data_ptr<A>(),
                           reinterpret_cast<unsigned int*>(counters.template data_ptr<int32_t>()));
      return;
    }
    const at::Tensor w = w_hh.to(acc);  // (D, H, H)
    at::Tensor dh = dhn ? dhn->to(acc).contiguous().clone() : at::zeros({D, N, H}, acc);  // (D, N, H)
    at::Tensor dz_acc = at::empty({D, N, H}, acc);  // (D, N, H)
    at::Tensor dzw = at::empty({D, N, H}, acc);     // (D, N, H)
    for (int64_t s = 0; s < T; ++s) {
      launch.backward_step(p, s, dh.data_ptr<A>(), dz_acc.data_ptr<A>());
      at::bmm_out(dzw, dz_acc, w);
      launch.backward_step_carry(p, s, dzw.data_ptr<A>(), dh.data_ptr<A>());
    }
    dh0.copy_(dh);
  });
}

}  // namespace

bool set_cuda_path(const std::string& name, int64_t blocks) {
  Path p;
  if (name == "auto") p = Path::automatic;
  else if (name == "persistent") p = Path::persistent;
  else if (name == "cluster") p = Path::cluster;
  else if (name == "grid") p = Path::grid;
  else if (name == "step") p = Path::step;
  else TORCH_CHECK(false, "unknown CUDA path '", name, "': expected auto, persistent, cluster, grid or step");
  TORCH_CHECK(blocks >= 0, "blocks must be 0 (chosen per call) or positive, got ", blocks);
  TORCH_CHECK(blocks == 0 || p == Path::cluster || p == Path::grid,
              "blocks applies to the cluster and grid paths only, got path '", name, "'");
  forced_path.store(static_cast<int>(p), std::memory_order_relaxed);
  forced_blocks.store(blocks, std::memory_order_relaxed);
  return true;
}

std::string last_cuda_path() { return last_path; }

void set_cuda_emulation(bool on) { emulation.store(on, std::memory_order_relaxed); }

bool cuda_emulation() { return emulation.load(std::memory_order_relaxed); }

void forward_recurrence_cuda(const at::Tensor& u, const at::Tensor& w_hh_t, const at::Tensor& h0,
                             const std::optional<at::Tensor>& lengths, const at::Tensor& y,
                             const at::Tensor& hn, bool relu) {
  if (!u.is_cuda()) {
    forward_loop(EmulatedLaunch{}, kEmulatedLimits, u, w_hh_t, h0, lengths, y, hn, relu);
    return;
  }
  const c10::cuda::CUDAGuard guard(u.device());
  forward_loop(DeviceLaunch{c10::cuda::getCurrentCUDAStream()}, limits(u.get_device()), u, w_hh_t,
               h0, lengths, y, hn, relu);
}

void backward_recurrence_cuda(const at::Tensor& dy, const std::optional<at::Tensor>& dhn,
                              const at::Tensor& y, const at::Tensor& w_hh,
                              const std::optional<at::Tensor>& lengths, const at::Tensor& dz,
                              const at::Tensor& dh0, bool relu) {
  if (!dz.is_cuda()) {
    backward_loop(EmulatedLaunch{}, kEmulatedLimits, dy, dhn, y, w_hh, lengths, dz, dh0, relu);
    return;
  }
  const c10::cuda::CUDAGuard guard(dz.device());
  backward_loop(DeviceLaunch{c10::cuda::getCurrentCUDAStream()}, limits(dz.get_device()), dy, dhn,
                y, w_hh, lengths, dz, dh0, relu);
}

}  // namespace fastrnn
