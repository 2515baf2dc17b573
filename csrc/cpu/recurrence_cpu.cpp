// The CPU time loop: splits the rows (direction, batch element) between
// threads and runs the kernels of the best instruction set available.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <atomic>
#include <type_traits>

#include "cpu/recurrence_cpu.h"
#include "recurrence.h"

namespace fastrnn {
namespace {

enum class Isa { base = 0, avx2 = 1, avx512 = 2 };

Isa detect_isa() {
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw"))
    return Isa::avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::avx2;
#endif
  return Isa::base;
}

std::atomic<int>& isa_slot() {
  static std::atomic<int> slot{static_cast<int>(detect_isa())};
  return slot;
}

Isa current_isa() { return static_cast<Isa>(isa_slot().load(std::memory_order_relaxed)); }

// The kernels of one instruction set.
#define FASTRNN_ISA_CASE(isa)                                                   \
  case Isa::isa:                                                                \
    return Table<S>{cpu::isa::padded_width, cpu::isa::pack, cpu::isa::forward_rows, \
                    cpu::isa::backward_rows};

template <typename S>
struct Table {
  int64_t (*padded_width)(int64_t, bool);
  void (*pack)(const S*, int64_t, int64_t, S*);
  void (*forward_rows)(const ForwardParams<S>&, int64_t, int64_t, int64_t, const S*, S*);
  void (*backward_rows)(const BackwardParams<S>&, int64_t, int64_t, int64_t, const S*, S*);
};

template <typename S>
Table<S> kernels(Isa isa) {
  switch (isa) {
#if defined(__x86_64__)
    FASTRNN_ISA_CASE(avx512)
    FASTRNN_ISA_CASE(avx2)
#endif
    default:
      break;
  }
  return Table<S>{cpu::base::padded_width, cpu::base::pack, cpu::base::forward_rows,
                  cpu::base::backward_rows};
}

// w (D, K, J) -> (D, K, padded_width(J)), each direction packed for the time loop.
template <typename S>
at::Tensor packed(const Table<S>& k, const at::Tensor& w) {
  const int64_t D = w.size(0), K = w.size(1), J = w.size(2);
  const int64_t Jp = k.padded_width(J, std::is_same_v<S, double>);
  at::Tensor out = at::empty({D, K, Jp}, w.options());
  for (int64_t d = 0; d < D; ++d)
    k.pack(w.data_ptr<S>() + d * K * J, K, J, out.data_ptr<S>() + d * K * Jp);
  return out;
}

// Calls fn(d, n0, n1) over the D*N rows, split between threads in contiguous
// runs that never cross a direction. A step of one row costs about H*H
// multiply-adds; small problems stay on the calling thread.
template <typename Fn>
void for_each_row_range(int64_t D, int64_t N, int64_t T, int64_t H, const Fn& fn) {
  const int64_t rows = D * N;
  const int64_t per_row = std::max<int64_t>(1, T * H * H);
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / per_row);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end;) {
      const int64_t d = i / N, n0 = i % N;
      const int64_t n1 = std::min(N, n0 + (end - i));
      fn(d, n0, n1);
      i += n1 - n0;
    }
  });
}

// Packs w (D, H, H) for the kernels of k, gives every row range its scratch,
// and calls run(d, n0, n1, packed weights of direction d, scratch) over the
// D*N rows in parallel.
template <typename S, typename Run>
void run_rows(const Table<S>& k, const at::Tensor& w, int64_t T, int64_t N, const Run& run) {
  const at::Tensor wp = packed(k, w);  // (D, H, Hp)
  const int64_t D = wp.size(0), H = wp.size(1), Hp = wp.size(2);
  at::Tensor scratch = at::empty({D, N, 2 * Hp}, w.options());
  const S* weights = wp.data_ptr<S>();
  S* s = scratch.data_ptr<S>();
  for_each_row_range(D, N, T, H, [&](int64_t d, int64_t n0, int64_t n1) {
    run(d, n0, n1, weights + d * H * Hp, s + (d * N + n0) * 2 * Hp);
  });
}

}  // namespace

const char* cpu_isa() {
  switch (current_isa()) {
    case Isa::avx512: return "avx512";
    case Isa::avx2: return "avx2";
    default: return "base";
  }
}

bool set_cpu_isa(const std::string& name) {
  const Isa best = detect_isa();
  Isa want;
  if (name == "avx512") want = Isa::avx512;
  else if (name == "avx2") want = Isa::avx2;
  else if (name == "base") want = Isa::base;
  else if (name == "auto") want = best;
  else TORCH_CHECK(false, "unknown CPU instruction set '", name, "': expected avx512, avx2, base or auto");
  if (static_cast<int>(want) > static_cast<int>(best)) return false;
  isa_slot().store(static_cast<int>(want), std::memory_order_relaxed);
  return true;
}

void forward_recurrence_cpu(const at::Tensor& u, const at::Tensor& w_hh_t, const at::Tensor& h0,
                            const std::optional<at::Tensor>& lengths, const at::Tensor& y,
                            const at::Tensor& hn, bool relu) {
  const int64_t D = u.size(0), T = u.size(1), N = u.size(2), H = u.size(3);
  const Isa isa = current_isa();
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "fastrnn_forward_cpu", [&] {
    const Table<scalar_t> k = kernels<scalar_t>(isa);
    ForwardParams<scalar_t> p;
    p.T = T; p.N = N; p.H = H; p.D = D;
    p.u = u.data_ptr<scalar_t>();
    p.w_hh_t = w_hh_t.data_ptr<scalar_t>();
    p.h0 = h0.data_ptr<scalar_t>();
    p.lengths = lengths ? lengths->data_ptr<int64_t>() : nullptr;
    p.y = y.data_ptr<scalar_t>();
    p.hn = hn.data_ptr<scalar_t>();
    p.relu = relu;
    run_rows(k, w_hh_t, T, N, [&](int64_t d, int64_t n0, int64_t n1, const scalar_t* w,
                                 scalar_t* scratch) {
      k.forward_rows(p, d, n0, n1, w, scratch);
    });
  });
}

void backward_recurrence_cpu(const at::Tensor& dy, const std::optional<at::Tensor>& dhn,
                             const at::Tensor& y, const at::Tensor& w_hh,
                             const std::optional<at::Tensor>& lengths, const at::Tensor& dz,
                             const at::Tensor& dh0, bool relu) {
  const int64_t D = dz.size(0), T = dz.size(1), N = dz.size(2), H = dz.size(3);
  const Isa isa = current_isa();
  AT_DISPATCH_FLOATING_TYPES(dz.scalar_type(), "fastrnn_backward_cpu", [&] {
    const Table<scalar_t> k = kernels<scalar_t>(isa);
    BackwardParams<scalar_t> p;
    p.T = T; p.N = N; p.H = H; p.D = D;
    p.dy = dy.data_ptr<scalar_t>();
    p.dhn = dhn ? dhn->data_ptr<scalar_t>() : nullptr;
    p.y = y.data_ptr<scalar_t>();
    p.w_hh = w_hh.data_ptr<scalar_t>();
    p.lengths = lengths ? lengths->data_ptr<int64_t>() : nullptr;
    p.dz = dz.data_ptr<scalar_t>();
    p.dh0 = dh0.data_ptr<scalar_t>();
    p.relu = relu;
    run_rows(k, w_hh, T, N, [&](int64_t d, int64_t n0, int64_t n1, const scalar_t* w,
                               scalar_t* scratch) {
      k.backward_rows(p, d, n0, n1, w, scratch);
    });
  });
}

}  // namespace fastrnn
