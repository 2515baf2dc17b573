// The CUDA time loop: chooses the launch, guards the device, runs on the
// current stream and checks every launch. The GEMMs of the step path go
// through ATen, so cuBLAS comes with torch. The same loop drives the
// kernels' emulator for the tests, on CPU tensors, which this module claims
// while emulation is on.
#include "cuda/recurrence_cuda.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <limits>
#include <map>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <tuple>
#include <vector>

#include "cuda/recurrence_cuda_kernels.h"
#include "cuda/recurrence_cuda_paths.h"
#include "recurrence.h"
#include "rnn_args.h"

namespace fastrnn {
namespace {

using cuda::Launch;
using cuda::Path;

std::atomic<int> forced_path{static_cast<int>(Path::automatic)};
std::atomic<int64_t> forced_blocks{0};
std::atomic<bool> emulation{false};
std::atomic<int64_t> grid_timeout_ns{int64_t{10} * 1000 * 1000 * 1000};
thread_local std::string last_path = "none";
std::mutex last_backward_mu;
std::string last_backward = "none";

void record_backward(Path path) {
  std::lock_guard<std::mutex> lock(last_backward_mu);
  last_backward = cuda::path_name(path);
}

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

Path parse_path(const std::string& name) {
  std::string names;
  for (int i = 0; i < cuda::kPaths; ++i) {
    const Path p = static_cast<Path>(i);
    if (name == cuda::path_name(p)) return p;
    names += std::string(i == 0 ? "" : i + 1 == cuda::kPaths ? " or " : ", ") + cuda::path_name(p);
  }
  TORCH_CHECK(false, "unknown CUDA path '", name, "': expected ", names);
}

// What the chooser needs of a device, queried once per device.
struct DeviceInfo {
  int64_t sms, smem_optin;
  int major;
  bool cooperative;
};

const DeviceInfo& device_info(int device) {
  static std::mutex mu;
  static std::map<int, DeviceInfo> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(device);
  if (it != cache.end()) return it->second;
  // Each field by name: the positional form once swapped the two counts.
  const auto attribute = [device](cudaDeviceAttr what) {
    int value = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, what, device));
    return value;
  };
  DeviceInfo info{};
  info.sms = attribute(cudaDevAttrMultiProcessorCount);
  info.smem_optin = attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin);
  info.major = attribute(cudaDevAttrComputeCapabilityMajor);
  info.cooperative = attribute(cudaDevAttrCooperativeLaunch) != 0;
  return cache.emplace(device, info).first->second;
}

// The device as the chooser sees it, for the kernels of one cell and type:
// the runtime's occupancy of those kernels, and clusters only where the
// loaded code has them.
template <typename Cell, typename T>
cuda::DeviceModel device_model(int device) {
  using K = cuda::Kernels<Cell, T>;
  const DeviceInfo& info = device_info(device);
  cuda::DeviceModel m;
  m.sms = info.sms;
  m.smem_optin = info.smem_optin;
  static const bool cluster_code = K::cluster_code();
  m.clusters = info.major >= 9 && cluster_code;
  m.cooperative = info.cooperative;
  m.blocks_per_sm = &K::blocks_per_sm;
  m.active_clusters = &K::active_clusters;
  return m;
}

// The launch of a call, chosen once per device, cell, type and shape.
template <typename Cell, typename T>
Launch choose(bool on_device, int device, const cuda::Problem& pr) {
  const Path forced = static_cast<Path>(forced_path.load(std::memory_order_relaxed));
  const int64_t blocks = forced_blocks.load(std::memory_order_relaxed);
  using Key = std::tuple<bool, int, bool, int64_t, int64_t, int64_t, int64_t, int64_t, bool, int,
                         int64_t>;
  const Key key{on_device, device, pr.forward, pr.T, pr.N, pr.H, pr.P, pr.D, pr.proj,
                static_cast<int>(forced), blocks};
  static std::mutex mu;
  static std::map<Key, cuda::Choice> cache;
  cuda::Choice c;
  {
    std::lock_guard<std::mutex> lock(mu);
    auto it = cache.find(key);
    if (it != cache.end()) {
      c = it->second;
    } else {
      c = cuda::choose_launch(on_device ? device_model<Cell, T>(device)
                                        : cuda::emulated_device(Cell::kind, sizeof(T)),
                              pr, forced, blocks);
      if (cache.size() > 4096) cache.clear();
      cache.emplace(key, c);
    }
  }
  TORCH_CHECK(c.error.empty(), c.error);
  return c.launch;
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

template <typename P>
void set_weights(P& p, const std::array<at::Tensor, 2>& w_hh, const std::array<at::Tensor, 2>& w_hr,
                 int64_t D) {
  using T = std::remove_const_t<std::remove_pointer_t<decltype(p.h0)>>;
  for (int64_t d = 0; d < 2; ++d) {
    p.w_hh[d] = d < D ? reinterpret_cast<const T*>(w_hh[d].data_ptr()) : nullptr;
    p.w_hr[d] = d < D && w_hr[d].defined() ? reinterpret_cast<const T*>(w_hr[d].data_ptr()) : nullptr;
  }
}

template <typename T>
T* data_or_null(const at::Tensor& t) {
  return t.defined() ? reinterpret_cast<T*>(t.data_ptr()) : nullptr;
}
template <typename T>
T* data_or_null(const std::optional<at::Tensor>& t) {
  return t ? reinterpret_cast<T*>(t->data_ptr()) : nullptr;
}

// W of every direction stacked, (D, ...), transposed or not, in the
// accumulation type: the step path's GEMM operands.
at::Tensor stacked(const std::array<at::Tensor, 2>& w, int64_t D, bool transpose,
                   at::ScalarType acc) {
  std::vector<at::Tensor> ws;
  for (int64_t d = 0; d < D; ++d) ws.push_back(transpose ? w[d].t() : w[d]);
  return at::stack(ws).to(acc).contiguous();
}

// Whether a single-kernel launch ran: false where the device refused a
// cooperative launch (its blocks do not all fit at once now), which leaves
// the call to the step path under 'auto'; a forced path raises instead, as
// every forced path that cannot run a call does. Any other error raises.
bool launched(cudaError_t err) {
  if (err == cudaErrorCooperativeLaunchTooLarge) {
    (void)cudaGetLastError();  // not sticky: clear it
    TORCH_CHECK(static_cast<Path>(forced_path.load(std::memory_order_relaxed)) == Path::automatic,
                "fastrnn: the grid CUDA path was forced, but the device refused its cooperative "
                "launch: its blocks do not all fit on the device at once now (beside another "
                "process's kernels, say); fastrnn.set_cuda_path('auto') lets such a call take "
                "the step path");
    return false;
  }
  C10_CUDA_CHECK(err);
  return true;
}

// Runs the emulator, its errors (a body's b.fail) raised as torch errors.
template <typename Run>
void emulated(const Run& run) {
  try {
    run();
  } catch (const std::runtime_error& e) {
    TORCH_CHECK(false, e.what());
  }
}

// Raises if a grid launch's barrier timed out: its abort flag, read after
// the launch. On the device that waits for the kernel, except while the
// stream is being captured into a CUDA graph, where nothing may wait: there
// a timeout is not reported (the launch still ends instead of hanging).
void check_abort(const at::Tensor& abort_flag, bool on_device) {
  if (on_device) {
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    C10_CUDA_CHECK(cudaStreamIsCapturing(c10::cuda::getCurrentCUDAStream(), &capture));
    if (capture != cudaStreamCaptureStatusNone) return;
  }
  TORCH_CHECK(abort_flag.item<int32_t>() == 0,
              "fastrnn: a grid-path barrier timed out: not every block of the group is resident "
              "(another process or kernel holding multiprocessors?); the call was stopped and its "
              "results are not valid; set FASTRNN_CUDA_PATH=step or fastrnn.set_cuda_path('step') "
              "to avoid the grid path");
}

// Runs the call's persistent, cluster or grid launch l on the device or the
// emulator; false where the device refused a cooperative launch. The grid
// path's scratch: the exchange buffer (2, D, N, S) in the accumulation
// type, real columns [0, width) NaN so that a read of a value never written
// shows, padding zero; the barrier counters (D, groups) and the abort flag,
// zero; all made on the current stream, so that nothing waits for the
// device before the launch.
template <typename Cell, typename T, typename Params>
bool single_kernel(const Launch& l, const Params& p, bool on_device, const at::TensorOptions& acc,
                   int64_t width, int64_t S) {
  using A = typename cuda::AccOf<T>::type;
  at::Tensor exchange, counters;
  cuda::GridScratch<A> grid{nullptr, nullptr, nullptr, grid_timeout_ns.load()};
  // The barrier counters, one per direction and group, then the abort flag.
  const int64_t flags = p.D * (l.grid_x / std::max<int64_t>(1, l.geometry.size));
  if (l.path == Path::grid) {
    exchange = at::full({2, p.D, p.N, S}, std::numeric_limits<double>::quiet_NaN(), acc);
    if (S > width) exchange.narrow(3, width, S - width).zero_();
    counters = at::zeros({flags + 1}, acc.dtype(at::kInt));
    grid.exchange = exchange.data_ptr<A>();
    grid.counters = reinterpret_cast<unsigned int*>(counters.data_ptr<int32_t>());
    grid.abort = grid.counters + flags;
  }
  if (on_device) {
    if (!launched(cuda::Kernels<Cell, T>::run(l, p, grid, c10::cuda::getCurrentCUDAStream())))
      return false;
  } else {
    emulated([&] { cuda::Emulator<Cell, T>::run(l, p, grid); });
  }
  if (l.path == Path::grid) check_abort(counters[flags], on_device);
  return true;
}

// Calls one step-path kernel on the device (checked) or the emulator.
#define FASTRNN_STEP(on_device, name, ...)                                                    \
  do {                                                                                       \
    if (on_device)                                                                           \
      C10_CUDA_CHECK(K::name(__VA_ARGS__, c10::cuda::getCurrentCUDAStream()));               \
    else                                                                                     \
      E::name(__VA_ARGS__);                                                                  \
  } while (0)

template <typename Cell, typename S>
void forward_typed(const ForwardLoop& a) {
  using T = typename CudaType<S>::type;
  using A = typename cuda::AccOf<T>::type;
  using K = cuda::Kernels<Cell, T>;
  using E = cuda::Emulator<Cell, T>;
  const bool on_device = a.u.is_cuda();
  const int device = on_device ? a.u.get_device() : -1;
  const int64_t D = a.u.size(0), T_ = a.u.size(1), N = a.u.size(2);
  const int64_t H = a.u.size(3) / Cell::kGates, P = a.h0.size(2);
  const bool proj = a.w_hr[0].defined();
  const cuda::Problem pr{Cell::kind, true, T_, N, H, P, D, static_cast<int64_t>(sizeof(T)), proj};
  Launch l = choose<Cell, T>(on_device, device, pr);
  ForwardParams<T> p;
  p.T = T_; p.N = N; p.H = H; p.P = P; p.D = D;
  p.u = data_or_null<const T>(a.u);
  set_weights(p, a.w_hh, a.w_hr, D);
  for (int64_t d = 0; d < 2; ++d) {
    p.b_ih[d] = d < D ? data_or_null<const T>(a.b_ih[d]) : nullptr;
    p.b_hh[d] = d < D ? data_or_null<const T>(a.b_hh[d]) : nullptr;
  }
  p.h0 = data_or_null<const T>(a.h0);
  p.c0 = data_or_null<const T>(a.c0);
  p.lengths = data_or_null<const int64_t>(a.lengths);
  p.y = data_or_null<T>(a.y);
  p.hn = data_or_null<T>(a.hn);
  p.cn = data_or_null<T>(a.cn);
  p.saved = data_or_null<T>(a.saved);
  const auto acc = a.u.options().dtype(acc_type(a.u.scalar_type()));
  if (l.path != Path::step &&
      single_kernel<Cell, T>(l, p, on_device, acc, P,
                             cuda::SmemLayout<Cell, T>::forward(H, P, 1, 1, 1).Ss)) {
    last_path = cuda::path_name(l.path);
    return;
  }
  last_path = cuda::path_name(Path::step);
  const at::ScalarType acc_t = acc_type(a.u.scalar_type());
  const at::Tensor w = stacked(a.w_hh, D, true, acc_t);                 // (D, P, G*H) W_hh^T
  const at::Tensor wr = proj ? stacked(a.w_hr, D, true, acc_t) : at::Tensor();  // (D, H, P)
  at::Tensor h = a.h0.to(acc_t).contiguous().clone();                          // (D, N, P)
  at::Tensor c = Cell::kCellState ? a.c0.to(acc_t).contiguous().clone() : at::Tensor();  // (D, N, H)
  at::Tensor hw = at::empty({D, N, Cell::kGates * H}, acc);                   // (D, N, G*H)
  at::Tensor m = proj ? at::empty({D, N, H}, acc) : at::Tensor();             // (D, N, H)
  at::Tensor hp = proj ? at::empty({D, N, P}, acc) : at::Tensor();            // (D, N, P)
  for (int64_t s = 0; s < T_; ++s) {
    at::bmm_out(hw, h, w);
    FASTRNN_STEP(on_device, forward_step, p, s, hw.data_ptr<A>(), h.data_ptr<A>(),
                 data_or_null<A>(c), data_or_null<A>(m));
    if (proj) {
      at::bmm_out(hp, m, wr);
      FASTRNN_STEP(on_device, project_step, p, s, hp.data_ptr<A>(), h.data_ptr<A>());
    }
  }
  a.hn.copy_(h);
  if (Cell::kCellState) a.cn.copy_(c);
}

template <typename Cell, typename S>
void backward_typed(const BackwardLoop& a) {
  using T = typename CudaType<S>::type;
  using A = typename cuda::AccOf<T>::type;
  using K = cuda::Kernels<Cell, T>;
  using E = cuda::Emulator<Cell, T>;
  const bool on_device = a.dgh.is_cuda();
  const int device = on_device ? a.dgh.get_device() : -1;
  const int64_t D = a.dgh.size(0), T_ = a.dgh.size(1), N = a.dgh.size(2);
  const int64_t GH = a.dgh.size(3), H = GH / Cell::kGates, P = a.h0.size(2);
  const bool proj = a.w_hr[0].defined();
  const cuda::Problem pr{Cell::kind, false, T_, N, H, P, D, static_cast<int64_t>(sizeof(T)), proj};
  Launch l = choose<Cell, T>(on_device, device, pr);
  BackwardParams<T> p;
  p.T = T_; p.N = N; p.H = H; p.P = P; p.D = D;
  p.dy = data_or_null<const T>(a.dy);
  p.dhn = data_or_null<const T>(a.dhn);
  p.dcn = data_or_null<const T>(a.dcn);
  p.y = data_or_null<const T>(a.y);
  p.h0 = data_or_null<const T>(a.h0);
  p.c0 = data_or_null<const T>(a.c0);
  p.saved = data_or_null<const T>(a.saved);
  set_weights(p, a.w_hh, a.w_hr, D);
  p.lengths = data_or_null<const int64_t>(a.lengths);
  p.dgh = data_or_null<T>(a.dgh);
  p.dgi = data_or_null<T>(a.dgi);
  p.dhr = data_or_null<T>(a.dhr);
  p.dh0 = data_or_null<T>(a.dh0);
  p.dc0 = data_or_null<T>(a.dc0);
  const auto acc = a.dgh.options().dtype(acc_type(a.dgh.scalar_type()));
  if (l.path != Path::step &&
      single_kernel<Cell, T>(l, p, on_device, acc, GH,
                             cuda::SmemLayout<Cell, T>::backward(H, 1, 1, 1).Ms)) {
    last_path = cuda::path_name(l.path);
    record_backward(l.path);
    return;
  }
  last_path = cuda::path_name(Path::step);
  record_backward(Path::step);
  const at::ScalarType acc_t = acc_type(a.dgh.scalar_type());
  const at::Tensor w = stacked(a.w_hh, D, false, acc_t);                  // (D, G*H, P)
  const at::Tensor wr = proj ? stacked(a.w_hr, D, false, acc_t) : at::Tensor();  // (D, P, H)
  at::Tensor dh = a.dhn ? a.dhn->to(acc_t).contiguous().clone() : at::zeros({D, N, P}, acc);
  at::Tensor dc = !Cell::kCellState ? at::Tensor()
                  : a.dcn           ? a.dcn->to(acc_t).contiguous().clone()
                                    : at::zeros({D, N, H}, acc);
  at::Tensor z = at::empty({D, N, GH}, acc);                                  // (D, N, G*H)
  at::Tensor dzw = at::empty({D, N, P}, acc);                                 // (D, N, P)
  at::Tensor dhd = Cell::kPrevState ? at::empty({D, N, P}, acc) : at::Tensor();
  at::Tensor gp = proj ? at::empty({D, N, P}, acc) : at::Tensor();
  at::Tensor gm = proj ? at::empty({D, N, H}, acc) : at::Tensor();
  for (int64_t s = 0; s < T_; ++s) {
    if (proj) {
      FASTRNN_STEP(on_device, unproject_step, p, s, dh.data_ptr<A>(), gp.data_ptr<A>());
      at::bmm_out(gm, gp, wr);
    }
    FASTRNN_STEP(on_device, backward_step, p, s, dh.data_ptr<A>(), data_or_null<const A>(gm),
                 z.data_ptr<A>(), data_or_null<A>(dc), data_or_null<A>(dhd));
    at::bmm_out(dzw, z, w);
    FASTRNN_STEP(on_device, carry_step, p, s, dzw.data_ptr<A>(), data_or_null<const A>(dhd),
                 dh.data_ptr<A>());
  }
  a.dh0.copy_(dh);
  if (Cell::kCellState) a.dc0.copy_(dc);
}

template <typename Fn>
void dispatch(CellKind cell, at::ScalarType dtype, const Fn& fn) {
  with_cell(cell, [&](auto c) {
    using Cell = decltype(c);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fastrnn_cuda",
                                    [&] { fn.template operator()<Cell, scalar_t>(); });
  });
}

bool claims(const at::Tensor& t) { return t.is_cuda() || (emulation.load() && t.is_cpu()); }

// A time loop on t's device (guarded) for its cell and t's dtype.
template <typename Fn>
void on_device_of(CellKind cell, const at::Tensor& t, const Fn& fn) {
  std::optional<c10::cuda::CUDAGuard> guard;
  if (t.is_cuda()) guard.emplace(t.device());
  dispatch(cell, t.scalar_type(), fn);
}

void forward_cuda(CellKind cell, const ForwardLoop& a) {
  on_device_of(cell, a.u, [&]<typename Cell, typename S>() { forward_typed<Cell, S>(a); });
}

void backward_cuda(CellKind cell, const BackwardLoop& a) {
  on_device_of(cell, a.dgh, [&]<typename Cell, typename S>() { backward_typed<Cell, S>(a); });
}

const bool registered = [] {
  register_device_loops(DeviceLoops{&claims, &forward_cuda, &backward_cuda});
  if (const char* ms = std::getenv("FASTRNN_GRID_TIMEOUT_MS"))
    grid_timeout_ns.store(std::max<int64_t>(1, std::atoll(ms)) * 1000 * 1000);
  return true;
}();

}  // namespace

bool set_cuda_path(const std::string& name, int64_t blocks) {
  const Path p = parse_path(name);
  TORCH_CHECK(blocks >= 0, "blocks must be 0 (chosen per call) or positive, got ", blocks);
  TORCH_CHECK(blocks == 0 || p == Path::cluster || p == Path::grid,
              "blocks applies to the cluster and grid paths only, got path '", name, "'");
  forced_path.store(static_cast<int>(p), std::memory_order_relaxed);
  forced_blocks.store(blocks, std::memory_order_relaxed);
  return true;
}

std::tuple<std::string, int64_t> cuda_path() {
  return {cuda::path_name(static_cast<Path>(forced_path.load())), forced_blocks.load()};
}

std::string last_cuda_path() { return last_path; }

std::string last_cuda_backward_path() {
  std::lock_guard<std::mutex> lock(last_backward_mu);
  return last_backward;
}

void set_cuda_emulation(bool on) { emulation.store(on); }

bool cuda_emulation() { return emulation.load(); }

void set_grid_timeout_ms(int64_t ms) {
  TORCH_CHECK(ms > 0, "the grid barrier's timeout must be positive, got ", ms, " ms");
  grid_timeout_ns.store(ms * 1000 * 1000);
}

void set_emulator_blocks(int64_t blocks) {
  TORCH_CHECK(blocks >= 0, "blocks must be 0 or positive, got ", blocks);
  cuda::set_emulator_blocks(blocks);
}

std::tuple<std::string, std::vector<int64_t>, std::string> choose_emulated_launch(
    const std::string& cell, bool forward, int64_t T, int64_t N, int64_t H, int64_t P, int64_t D,
    int64_t elem_bytes, bool proj, const std::string& path, int64_t blocks) {
  TORCH_CHECK(elem_bytes == 2 || elem_bytes == 4 || elem_bytes == 8, "elem_bytes must be 2, 4 or 8");
  const cuda::Problem pr{cell_kind(cell), forward, T, N, H, P, D, elem_bytes, proj};
  const cuda::Choice c = cuda::choose_launch(
      cuda::emulated_device(pr.cell, elem_bytes), pr, parse_path(path), blocks);
  const Launch& l = c.launch;
  const int64_t bound =
      l.path == Path::step ? cuda::kStepThreads : cuda::block_limit(pr.cell, elem_bytes, l.path);
  return {cuda::path_name(l.path),
          {l.grid_x, l.grid_y, l.threads, l.smem, l.geometry.rows, l.geometry.size, l.geometry.split,
           bound},
          c.error};
}

}  // namespace fastrnn
