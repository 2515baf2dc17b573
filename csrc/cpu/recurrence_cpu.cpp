// The CPU time loop: packs the weights, splits the rows (direction, batch
// element) between threads and runs the kernels of the best instruction set
// available. float16 and bfloat16 run through the float32 kernels: float32
// arithmetic and state carry, rounding only what is stored.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/addmm_cpu_dispatch.h>
#include <ATen/ops/mm_cpu_dispatch.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include <omp.h>

#if defined(__linux__)
#include <pthread.h>
#include <unistd.h>
#include <sys/mman.h>
#endif
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#define FASTRNN_POISON(p, n) ASAN_POISON_MEMORY_REGION(p, n)
#define FASTRNN_UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION(p, n)
#else
#define FASTRNN_POISON(p, n) ((void)(p), (void)(n))
#define FASTRNN_UNPOISON(p, n) ((void)(p), (void)(n))
#endif

#include <algorithm>
#include <array>
#include <atomic>
#include <cstring>
#include <memory>
#include <mutex>
#include <new>
#include <unordered_map>
#include <type_traits>
#include <vector>

#include "cpu/recurrence_cpu.h"
#include "cpu/recurrence_cpu_tiles.h"
#include "recurrence.h"

namespace fastrnn {

// glibc maps an allocation afresh from the kernel where it passes its mmap
// threshold (dynamic, up to 32 MB) or where the heap was trimmed since the
// last call; a buffer of many MB is then faulted in a 4 KB page at a time,
// which costs more than what it holds takes to write: 20 ms for 42 MB here
// (the workspace of an LSTM of hidden 256, batch 64, 128 steps) against 4
// ms in transparent huge pages. An LSTM of hidden 1024, batch 64, 16 steps
// faulted 20 MB in its forward (the packed weights among them) and 16 MB in
// its backward on every call. So a buffer of kFresh or more asks for huge
// pages before anything touches it: a hint, which counts where the kernel's
// setting for them is `madvise` (the usual default) and changes nothing
// else; memory already faulted in stays as it is.
namespace {

void advise_huge_pages(void* data, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr size_t kHuge = size_t{2} << 20, kFresh = 2 * kHuge;
  if (bytes >= kFresh) {
    const auto p = reinterpret_cast<uintptr_t>(data);
    const uintptr_t begin = (p + kHuge - 1) & ~(kHuge - 1), end = (p + bytes) & ~(kHuge - 1);
    madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
  }
#else
  (void)data;
  (void)bytes;
#endif
}

}  // namespace

at::Tensor buffer(at::IntArrayRef sizes, const at::TensorOptions& opt) {
  if (opt.device().type() != c10::DeviceType::CPU || opt.pinned_memory()) return at::empty(sizes, opt);
  // Without the dispatcher: a small call's backward asks for a dozen.
  at::Tensor t = at::detail::empty_cpu(sizes, opt);
  advise_huge_pages(t.data_ptr(), t.nbytes());
  return t;
}

namespace {

// Freed blocks of CPU memory by size, for recycled(): a weight's gradient is
// handed to autograd, added into .grad and freed, the workspace and the gate
// gradients live until the backward, the packed weights for a call, and the
// next call asks for each again at the same size. glibc returns such a
// block to the kernel (past its mmap threshold, or trimming the heap's top),
// and the next one is faulted in a page at a time: GRUCell(256, 512)
// forward+backward at batch 1 took 27-107 minor faults a call, 20-25% of its
// time (785-992 us without them, against 992-1433), and LSTM(32, 256) at
// batch 64, 128 steps about 10700 (its workspace and gate gradients are 34
// MB each), 10-15% of it.
//
// A block asked for afresh first frees the cached blocks given back
// longest ago until the live blocks and the cached ones together are at
// most twice the most that were ever live at once, so that calls of new
// sizes (batches of other lengths) do not keep every old size's blocks on
// top of their own. Twice, not once: a steady loop holds more blocks than
// are live at any one time (an output kept while the next call runs),
// and with a bound of once its first fresh block each call freed a block
// that call needed later, and that one the next (LSTM(32, 1024) at batch
// 64, 128 steps: 49,000 minor faults a forward+backward either way; 8,400
// with twice). Up to kCacheBytes are kept in all, kPerSize blocks of one
// size; a block past that is freed. One instance, never destroyed: a
// tensor may outlive static destruction.
class BlockCache {
 public:
  static constexpr size_t kCacheBytes = size_t{1} << 30, kPerSize = 4;

  static BlockCache& instance() {
    static BlockCache* cache = new BlockCache();
    return *cache;
  }

  // A block of `bytes`: a cached one, or one taken afresh from the CPU
  // allocator (not advised into huge pages, as buffer()'s are: LSTM(32,
  // 1024) at batch 64, 128 steps, its calls interleaved with nn.LSTM's, ran
  // its forward in 1.08-1.25 s with a fresh workspace in huge pages and
  // 0.80-0.87 s without).
  void* take(size_t bytes) {
    std::vector<void*> freed;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      live_ += bytes;
      peak_ = std::max(peak_, live_);
      auto it = free_.find(bytes);
      if (it != free_.end() && !it->second.empty()) {
        void* p = it->second.back().block;
        it->second.pop_back();
        cached_ -= bytes;
        return p;
      }
      while (cached_ > 0 && live_ + cached_ > 2 * peak_) freed.push_back(drop_oldest());
    }
    for (void* p : freed) c10::free_cpu(p);
    try {
      return c10::alloc_cpu(bytes);
    } catch (...) {
      std::lock_guard<std::mutex> lock(mutex_);
      live_ -= bytes;
      throw;
    }
  }

  void give(void* p, size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      live_ -= bytes;
      std::vector<Cached>& blocks = free_[bytes];
      if (cached_ + bytes <= kCacheBytes && blocks.size() < kPerSize) {
        blocks.push_back({p, ++given_});
        cached_ += bytes;
        return;
      }
    }
    c10::free_cpu(p);
  }

  // Frees every cached block; the most ever live starts again from the
  // blocks live now.
  void release() {
    std::vector<void*> freed;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (auto& [bytes, blocks] : free_)
        for (const Cached& c : blocks) freed.push_back(c.block);
      free_.clear();
      cached_ = 0;
      peak_ = live_;
    }
    for (void* p : freed) c10::free_cpu(p);
  }

  // Bytes cached, live, and the most ever live at once.
  std::array<int64_t, 3> stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {int64_t(cached_), int64_t(live_), int64_t(peak_)};
  }

 private:
  struct Cached {
    void* block;
    uint64_t given;  // when it was given back: given_'s count
  };

  BlockCache() {
#if defined(__linux__)
    // A child forked while another thread held the lock would find it held.
    pthread_atfork([] { instance().mutex_.lock(); }, [] { instance().mutex_.unlock(); },
                   [] { instance().mutex_.unlock(); });
#endif
  }

  // Takes the block given back longest ago out of the cache (each size's
  // blocks are in the order given back). Under the lock, cached_ > 0.
  void* drop_oldest() {
    auto oldest = free_.end();
    for (auto it = free_.begin(); it != free_.end(); ++it)
      if (!it->second.empty() &&
          (oldest == free_.end() || it->second.front().given < oldest->second.front().given))
        oldest = it;
    void* p = oldest->second.front().block;
    oldest->second.erase(oldest->second.begin());
    cached_ -= oldest->first;
    return p;
  }

  std::mutex mutex_;
  std::unordered_map<size_t, std::vector<Cached>> free_;
  size_t cached_ = 0, live_ = 0, peak_ = 0;
  uint64_t given_ = 0;
};

}  // namespace

at::Tensor recycled(at::IntArrayRef sizes, const at::TensorOptions& opt) {
  constexpr size_t kMinBytes = size_t{256} << 10;
  const size_t bytes = static_cast<size_t>(c10::multiply_integers(sizes)) *
                       c10::elementSize(c10::typeMetaToScalarType(opt.dtype()));
  // Where buffer() leaves the CPU allocator (another device, pinned memory),
  // its tensor as it is.
  if (opt.device().type() != c10::DeviceType::CPU || opt.pinned_memory() || bytes < kMinBytes)
    return buffer(sizes, opt);
  void* p = BlockCache::instance().take(bytes);
  // Resizable as a tensor of empty() is: a resize_() that grows it takes
  // new memory from the CPU allocator and gives the block back.
  return at::for_blob(p, sizes)
      .deleter([bytes](void* q) { BlockCache::instance().give(q, bytes); })
      .options(opt)
      .resizeable_storage()
      .allocator(c10::GetCPUAllocator())
      .make_tensor();
}

std::array<int64_t, 3> recycled_bytes() { return BlockCache::instance().stats(); }
void release_recycled() { BlockCache::instance().release(); }

namespace {

enum class Isa { base = 0, avx2 = 1, avx512 = 2 };

Isa detect_isa() {
#if defined(__x86_64__)
  __builtin_cpu_init();
#if FASTRNN_WITH_AVX512
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw"))
    return Isa::avx512;
#endif
#if FASTRNN_WITH_AVX2
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::avx2;
#endif
#endif
  return Isa::base;
}

std::atomic<int>& isa_slot() {
  static std::atomic<int> slot{static_cast<int>(detect_isa())};
  return slot;
}

Isa current_isa() { return static_cast<Isa>(isa_slot().load(std::memory_order_relaxed)); }

// The kernels of one instruction set, for dtype S and one cell.
template <typename S, typename Cell>
struct Table {
  int64_t (*padded_width)(int64_t);
  void (*pack)(const S*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, S*, int64_t,
               int64_t);
  int64_t (*scratch_per_row)(int64_t, int64_t, bool);
  void (*forward_rows)(const ForwardParams<S>&, int64_t, int64_t, int64_t, const S*, const S*,
                       const S*, const S*, S*, bool);
  void (*backward_rows)(const BackwardParams<S>&, int64_t, int64_t, int64_t, const S*, const S*,
                        S*, bool);
  void (*forward_columns)(const ForwardParams<S>&, int64_t, int64_t, int64_t, int64_t, const S*,
                          const S*, const S*, const S*, S*, S*, S*, S*, S*, bool);
  void (*project_columns)(const ForwardParams<S>&, int64_t, int64_t, int64_t, int64_t, const S*,
                          const S*, const S*, S*, S*, bool);
  void (*backward_columns)(const BackwardParams<S>&, int64_t, int64_t, int64_t, int64_t,
                           const S*, const S*, S*, S*, S*, S*);
  void (*carry_columns)(const BackwardParams<S>&, int64_t, int64_t, int64_t, int64_t, const S*,
                        const S*, S*, S*, S*);
};

#define FASTRNN_ISA_TABLE(isa)                                                               \
  Table<S, Cell>{cpu::isa::padded_width<S>,           cpu::isa::pack<S>,                     \
                 cpu::isa::scratch_per_row<S, Cell>,  cpu::isa::forward_rows<S, Cell>,       \
                 cpu::isa::backward_rows<S, Cell>,    cpu::isa::forward_columns<S, Cell>,    \
                 cpu::isa::project_columns<S, Cell>,  cpu::isa::backward_columns<S, Cell>,   \
                 cpu::isa::carry_columns<S, Cell>}

template <typename S, typename Cell>
Table<S, Cell> kernels(Isa isa) {
  switch (isa) {
#if FASTRNN_WITH_AVX512
    case Isa::avx512: return FASTRNN_ISA_TABLE(avx512);
#endif
#if FASTRNN_WITH_AVX2
    case Isa::avx2: return FASTRNN_ISA_TABLE(avx2);
#endif
    default: return FASTRNN_ISA_TABLE(base);
  }
}

// The multiply-adds a thread's share of a parallel loop should hold before a
// second thread joins: about 10 us of work. Waking a sleeping OpenMP thread
// costs 13-14 us here (OMP_WAIT_POLICY=PASSIVE: torch's mul_ of 40,000
// floats 5.3 us on one thread, 18.2 on two), a spinning one about 1 us; a
// cell's step of 8 rows was cut into four chunks of 2^16 and ran slower on
// two threads than on one. Measured (two threads, cells' calls in
// interleaved blocks, grain 2^16 / 2^20, us): passive RNNCell 64->128
// batch 8 29.3 / 12.3 no-grad, 155 / 85 forward+backward, LSTMCell
// 16->64 batch 32 37.5 / 24.6 and 177 / 106, GRUCell 64->128 batch 8 30.7
// / 17.9; spinning (libgomp's default) RNNCell 64->128 batch 8 14.1 /
// 10.8, others within 5%; 2^21 lost (RNNCell 128->128 batch 64 34.6 ->
// 41.4 us). The calls' table (`--calls`, two threads) against torch.nn's
// RNNCell 64->128 batch 8: 1.80-1.82x -> 2.14-2.21x no-grad, 1.32-1.46x ->
// 1.58-1.66x forward+backward; layers of 128 steps within the noise. Rows
// and units are each one thread's sums in a fixed order, so the grain, like
// the thread count, leaves the bits alone.
constexpr int64_t kThreadGrainMacs = int64_t{1} << 20;

// The grain of a parallel loop over items of `per_item` multiply-adds each:
// how many a thread's share holds before a second thread joins, at least 1.
int64_t thread_grain(int64_t per_item, int64_t macs = kThreadGrainMacs) {
  return std::max<int64_t>(1, macs / std::max<int64_t>(1, per_item));
}

// Packs b (K x blocks*J), b[k][c] = w[d][k * sk + c * sc], of every direction:
// (D, K, blocks * padded_width(J)). Undefined where w is. Large weights are
// packed by every thread, each a range of columns (whole panels): an LSTM's
// W_hh of hidden 1024 is 16 MB to read and write on every call.
template <typename S, typename Cell>
at::Tensor packed(const Table<S, Cell>& k, const std::array<at::Tensor, 2>& w, int64_t D,
                  int64_t sk, int64_t sc, int64_t K, int64_t J, int64_t blocks) {
  if (!w[0].defined()) return at::Tensor();
  const int64_t Jp = blocks * k.padded_width(J);
  at::Tensor out = recycled({D, K, Jp}, w[0].options());
  // Column ranges of kPackColumns, a multiple of every panel width, about
  // 256 KB of a matrix with K of 1024.
  constexpr int64_t kPackColumns = 64;
  const int64_t ranges = (Jp + kPackColumns - 1) / kPackColumns;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, K * kPackColumns));
  at::parallel_for(0, D * ranges, grain, [&](int64_t begin, int64_t end) {
    for (int64_t x = begin; x < end; ++x) {
      const int64_t d = x / ranges, c0 = x % ranges * kPackColumns;
      k.pack(w[d].data_ptr<S>(), sk, sc, K, J, blocks, J, out.data_ptr<S>() + d * K * Jp, c0,
             c0 + kPackColumns);
    }
  });
  return out;
}

// Whether the time loops pack the weights (Kernels::pack) or read them as
// they are stored. Packing reads and writes every weight once, which the
// register blocks repay over many rows and steps and a call of a few does
// not: a cell, a stream of one step. Measured here (one thread, no-grad
// forward, input 64, packed / as stored): LSTM hidden 512 at 1 step 1257 /
// 117 us for batch 1, 1737 / 658 us for batch 16, even at 64 steps of
// batch 1; hidden 128 even at about 32 rows times steps. Where the weights
// pass kColumnSplitBytes, the column split on two threads with each
// thread's slice packed wins from about 8 steps on. A single step reads every
// weight once as stored (the products loop over the weights outermost over
// chunks of rows, dot_gemm), where packing reads it twice and writes it
// once: up to kUnpackedStepRows rows it runs as stored (no-grad, one thread,
// packed / as stored: GRUCell 256->512 batch 64 2.0 / 1.46 ms, batch 128
// 4.2 / 3.5 ms, LSTMCell alike batch 128 5.9 / 5.0 ms, about even at 256).
// The choice changes the order of the sums, so it depends on the shapes
// alone, never on the threads: a result's bits are the same on any number
// of them.
constexpr int64_t kUnpackedRowSteps = 32;
constexpr int64_t kUnpackedLargeSteps = 4;
constexpr int64_t kUnpackedStepRows = 128;

std::atomic<int>& packing_slot() {
  static std::atomic<int> slot{0};  // 0 auto, 1 always, 2 never
  return slot;
}

std::atomic<int>& tiles_slot() {
  static std::atomic<int> slot{0};  // 0 auto, 1 never
  return slot;
}

// The processor's maker, where some of the choices below were measured to
// go the other way: a fixed fact of the machine, so a choice still never
// depends on the number of threads.
enum class Vendor { kIntel, kAmd, kOther };
Vendor cpu_vendor() {
#if defined(__x86_64__) || defined(__i386__)
  static const Vendor vendor = __builtin_cpu_is("intel") ? Vendor::kIntel
                               : __builtin_cpu_is("amd") ? Vendor::kAmd
                                                         : Vendor::kOther;
  return vendor;
#else
  return Vendor::kOther;
#endif
}
bool intel_cpu() { return cpu_vendor() == Vendor::kIntel; }

// The column-split loops (recurrence_cpu_kernels.h): where the weights a
// step reads pass this many bytes and the batch is small, the threads split
// units instead of rows, so that each reads its slice of the weights and
// not all of them every step. About a core's share of L2 here (1 MB on the
// development machine). A call that reads the weights as stored splits
// them too where its rows are fewer than the threads' dot-form blocks
// (stored_row_split_rows()): a cell's step of a few rows streams its weights
// from L3 at what one core draws, and two draw about twice that.
constexpr int64_t kColumnSplitBytes = 512 * 1024;
// Rows per thread from which the row split pays even so: two register blocks
// of rows make enough multiply-adds per weight loaded to stream the weights
// from L3 at the GEMM's pace, and no step waits at a barrier. Measured here
// (LSTM, hidden 256, 2 threads, forward): batch 64 39-43 ms split by rows
// against 50-54 ms by units, batch 16 and 32 about even, batch 1 and 2 (a
// thread with one row or none) 30% slower.
constexpr int64_t kRowSplitRows = 16;
// The same for the weights as stored: a dot-form block of 4 rows a thread
// (dot_gemm; fewer run a row at a time, reading each weight row once a
// row). Measured here (two threads, no-grad, medians of 21 interleaved
// blocks of 100 calls, rows split / units split): RNNCell 256->512 batch 1
// 28.4 / 18.4 us, batch 2 30.9 / 24.2, batch 4 42.4 / 26.4, batch 8 42.9 /
// 47.5, batch 16 76 / 83; LSTMCell alike 96 / 57, 101 / 78, 143 / 81, 144
// / 147, 273 / 278; GRUCell 72 / 53, 77 / 61, 108 / 64, 133 / 138, 218 /
// 290; LSTMCell 128->256 batch 1 30.4 / 20.1, batch 4 46.4 / 29.1, batch 8
// 47.4 / 47.8. On an Intel Xeon (2 MB of L2 a core, weights streamed from
// L3 at 34-35 GB/s a core) the units win at batch 8 too (two threads,
// cells 256->512, rows split / units split): GRUCell 191-211 / 142-149 us,
// LSTMCell 270-291 / 201-207, RNNCell 53 / 44-47; at batch 1 and at
// 64->128 alike. So there it is 8 rows.
int64_t stored_row_split_rows() { return intel_cpu() ? 8 : 4; }

// Whether a direction of T steps of N rows, whose steps read weight_bytes
// of weights, packs them (above). The forward reads the weights of a lone
// row's steps as stored whatever their number where they pass
// kColumnSplitBytes: two threads then split their rows, and a lone row
// streams them as fast either way. Measured here (input 32, batch 1, 128
// steps, no-grad, calls interleaved with torch.nn's, packed / as stored):
// one thread LSTM hidden 1024 44.0 / 35.0 ms, 512 8.5 / 7.6, 256 2.3 /
// 2.1, GRU 1024 29.8 / 27.7, RNN 1024 8.1 / 6.9; two threads LSTM 1024
// 18.2 / 16.4, 512 4.3 / 3.8, 256 1.14 / 0.97, GRU 1024 12.9 / 11.4, RNN
// 1024 4.1 / 3.6. At batch 2 packing still wins on one thread (LSTM 1024
// 43 / 59 ms). The backward (W_hh alone) keeps its panels: its column
// split runs on them.
bool packs(int64_t T, int64_t N, int64_t weight_bytes, bool forward = false) {
  const int mode = packing_slot().load(std::memory_order_relaxed);
  if (mode != 0) return mode == 1;
  if (T == 1) return N > kUnpackedStepRows;
  if (forward && N == 1 && weight_bytes > kColumnSplitBytes) return false;
  return T * N > kUnpackedRowSteps || (weight_bytes > kColumnSplitBytes && T > kUnpackedLargeSteps);
}

// A core's L2 as the system reports it, or 0 where it does not.
int64_t l2_bytes() {
  static const int64_t bytes = [] {
#if defined(_SC_LEVEL2_CACHE_SIZE)
    const long v = sysconf(_SC_LEVEL2_CACHE_SIZE);
    return v > 0 ? static_cast<int64_t>(v) : int64_t{0};
#else
    return int64_t{0};
#endif
  }();
  return bytes;
}

// A forward's packed weights that fit in three quarters of a core's L2 stay
// there from step to step, so each thread of a row split reads them from
// L2, and no step waits at a barrier: its rows are split from this many a
// thread. Measured on the Xeon (2 MB of L2 a core; two threads, input 32,
// batch 8, no-grad, the builds alternating three times, rows from 4 /
// from 16): LSTM 256 (1.2 MB) 0.86x as long, GRU 256 0.83x, RNN 512
// 0.70x, LSTM 256 at batch 16 0.82x; past L2, rows from 4 took LSTM 512
// (4.7 MB) 1.83x as long, GRU 512 1.53x, LSTM 1024 1.78x. The backward
// keeps the column split there: split by rows too, a forward+backward of
// LSTM 256 and RNN 512 at batch 8 took 1.15x as long (GRU 256 0.90x).
constexpr int64_t kRowSplitRowsInL2 = 4;
// On an AMD EPYC, whose L2 (1 MB a core) holds none of the larger layers'
// weights, L3 gives one core 94 GB/s and two at once 93 each
// (bench/probes/stream_loads.c, 4.7 MB), three times the Xeon's 30: a
// thread of the row split streams all the weights from there at the GEMM's
// pace, so the rows are split from kRowSplitRowsInL2 a thread up to about
// LSTM 1024's weights. Measured there (two threads, input 32, 128 steps,
// no-grad, three processes each alternating, torch.nn over fastrnn in
// each, units split / rows split): batch 8 LSTM 256 (1.2 MB) 1.07x-1.11x /
// 1.22x-1.31x, LSTM 512 0.99x-1.02x / 1.07x-1.22x, LSTM 1024 (16.8 MB)
// 1.09x-1.16x / 1.12x-1.25x, GRU 512 2.84x-3.25x / 3.28x-3.55x, GRU 1024
// 3.94x-4.46x / 4.26x-4.58x, RNN 512 2.81x-3.80x / 3.76x-4.12x, RNN 1024
// 3.62x-3.82x / 3.96x-4.05x; batch 16 LSTM 512 0.95x-0.99x / 1.00x-1.09x,
// GRU 512, GRU 1024 and LSTM 1024 even; RNN 1024 at batch 32 (rows from 48
// a thread before) 1.96x-2.01x / 2.02x-2.12x, at batch 64 100-108 / 91-97
// ms, RNN 512 at batch 64 25-28 / 23-25. Past that, two processes
// each: LSTM 1280 (26.9 MB) 1.10x-1.16x / 1.18x-1.22x, too noisy to call;
// LSTM 1536 (38 MB, past L3's 32) 1.17x-1.33x / 0.85x-0.89x. The
// backward's step (W_hh) likewise; forward+backward at batch 8, two
// processes each, units / rows: LSTM 256 12.6-13.5 / 10.4-10.7 ms, LSTM
// 512 37.5-37.8 / 35.3-36.4, GRU 256 9.2-9.4 / 8.0-8.4, RNN 512 10.2-10.7
// / 9.8, LSTM 1024 147-158 / 144-157; LSTM 256 at batch 16 even.
constexpr int64_t kRowSplitStreamBytes = int64_t{20} << 20;
// Whether a step's packed weights stream from L3 fast enough for a row split
// from kRowSplitRowsInL2 rows a thread (above). The forward asks past L2; the
// backward asks at every size past kColumnSplitBytes, for on AMD its row
// split gains in L2 as well (forward+backward, batch 8, two threads, three
// processes each, units / rows, W_hh 640 KB: LSTM 200 12.1-14.3 / 10.1-10.4
// ms, RNN 400 10.3-11.9 / 6.9-8.1; LSTM 200 at batch 16 20.3-20.5 /
// 17.6-18.1).
bool rows_stream_weights(int64_t weight_bytes) {
  return cpu_vendor() == Vendor::kAmd && weight_bytes <= kRowSplitStreamBytes;
}
// Whether this call's steps of a lone row walk its weights as stored the
// other way round (ForwardParams::flip). The steps of one call alternate
// direction, so that where the weights pass L2 the part a step read last is
// still there for the next; a thread's calls of an odd number of steps (a
// cell's step, a streamed step) alternate too, so that a call starts where
// the one before ended. The same sums: only the order of the outputs
// changes. Measured on an AMD EPYC (1 MB of L2 a core; no-grad, batch 1,
// one process alternating blocks of calls each way, 21 each, medians,
// this / one way): one thread RNNCell 256->512 26.4 / 28.1 us, LSTMCell
// 256->512 92.3 / 94.9, GRUCell 256->512 71.7 / 73.3, LSTMCell 128->256
// 29.9 / 31.5, one step of LSTM 64->256 26.6 / 28.5; two threads
// LSTMCell 256->512 63.6 / 66.1, GRU 64->512 one step 44.9 / 46.9, LSTM
// 256->1024 one step 202 / 211.
bool lone_row_flip(int64_t T) {
  thread_local bool flip = false;
  const bool f = flip;
  if (T & 1) flip = !flip;
  return f;
}

// An Elman cell's forward past that: its step runs in the GEMM's epilogue, so
// the step is almost all products, and a row split, each thread reading all
// of the weights, streams twice the weights from L3 that a column split does.
// Measured on the Xeon (two threads, input 32, no-grad, the builds
// alternating four times, medians of the pairs' ratios, rows from 48 / from
// 16): RNN 1024 (4.3 MB) batch 32 0.82x as long, batch 64 0.93x, RNN 2048
// batch 32 0.73x, RNN 768 batch 48 0.89x, RNN 1024 batch 32 forward+backward
// 0.95x; split by units at batch 96, RNN 1024 ran even (0.99x, rows from 64 /
// 16). The LSTM's and GRU's forwards split by units at 32 and 48 rows ranged
// from 0.91x (LSTM 1024) to 1.08x (GRU 512) as long: they keep 16.
constexpr int64_t kRowSplitRowsElman = 48;

// The same for a bfloat16 call's products on the matrix unit's tiles
// (forward_on_tiles()) whose weights pass what two cores' L2 hold: the
// tiles take a step's products so fast that streaming all the weights to
// each thread costs more than the barrier. Measured on the Xeon (two
// threads, input 32, 32 steps, no-grad, the builds alternating three
// times, medians in ms, rows from 16 a thread / from 64): LSTM 1024 batch
// 32 11.99 / 8.24, batch 64 13.6 / 12.6, GRU 1024 batch 32 11.9 / 7.7,
// batch 64 13.0 / 11.8; at 2.2 MB of weights (RNN 1024, LSTM 512) even at
// batch 32, and RNN 1024 at batch 64 3.3 / 3.8: there kRowSplitRows.
constexpr int64_t kRowSplitRowsTiles = 64;

// Threads for the column-split loops, or 1 where they do not pay: from
// row_split rows a thread on, the rows are split.
int64_t column_threads(int64_t weight_bytes, int64_t rows, int64_t row_split = kRowSplitRows) {
  if (weight_bytes <= kColumnSplitBytes || at::in_parallel_region()) return 1;
  const int64_t nt = at::get_num_threads();
  return rows >= row_split * nt ? 1 : nt;
}

// The slices [begin, begin + size) of `units` columns for `parts` threads,
// each starting on a whole vector of `lanes`: parts + 1 boundaries.
std::vector<int64_t> slices(int64_t units, int64_t parts, int64_t lanes) {
  const int64_t step = (units + parts * lanes - 1) / (parts * lanes) * lanes;
  std::vector<int64_t> b(parts + 1);
  for (int64_t i = 0; i <= parts; ++i) b[i] = std::min(units, i * step);
  return b;
}

// Per direction and slice, b's columns [c0, c1) of every block packed as
// pack() does: b[k][blk * bs + j] = w[d][k * sk + (blk * bs + c0 + j) * sc].
// The slices are packed in parallel, one a thread: the loops that use them
// run where the weights are large and the batch small, so that packing on
// one thread would cost about as much as a step of every row.
template <typename S, typename Cell>
std::vector<at::Tensor> packed_slices(const Table<S, Cell>& k, const std::array<at::Tensor, 2>& w,
                                      int64_t D, int64_t sk, int64_t sc, int64_t K, int64_t bs,
                                      int64_t blocks, const std::vector<int64_t>& b) {
  std::vector<at::Tensor> out;
  if (!w[0].defined()) return out;
  const int64_t parts = static_cast<int64_t>(b.size()) - 1;
  for (int64_t d = 0; d < D; ++d) {
    for (int64_t i = 0; i < parts; ++i) {
      const int64_t J = std::max<int64_t>(b[i + 1] - b[i], 1);
      out.push_back(recycled({K, blocks * k.padded_width(J)}, w[0].options()));
    }
  }
  at::parallel_for(0, D * parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t x = begin; x < end; ++x) {
      const int64_t d = x / parts, i = x % parts, J = b[i + 1] - b[i];
      if (J > 0) k.pack(w[d].data_ptr<S>() + b[i] * sc, sk, sc, K, J, blocks, bs,
                        out[x].data_ptr<S>(), 0, INT64_MAX);
    }
  });
  return out;
}

// Runs fn(tid) on `threads` OpenMP threads at once; fn's barriers
// (#pragma omp barrier) hold them together between phases.
template <typename Fn>
void on_threads(int64_t threads, const Fn& fn) {
#pragma omp parallel num_threads(threads)
  { fn(static_cast<int64_t>(omp_get_thread_num())); }
}

const void* data_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }
template <typename S>
const S* data_or_null(const std::optional<at::Tensor>& t) {
  return t ? t->data_ptr<S>() : nullptr;
}

// Calls fn(d, n0, n1) over the D*N rows, split between threads in contiguous
// runs that never cross a direction. A step of one row costs about G*H*P
// multiply-adds; small problems stay on the calling thread.
template <typename Fn>
void for_each_row_range(int64_t D, int64_t N, int64_t per_row, const Fn& fn) {
  at::parallel_for(0, D * N, thread_grain(per_row), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end;) {
      const int64_t d = i / N, n0 = i % N;
      const int64_t n1 = std::min(N, n0 + (end - i));
      fn(d, n0, n1);
      i += n1 - n0;
    }
  });
}

// Zeroed scratch of `count` elements for one call's loops: a slice of this
// thread's arena where it fits, else a tensor of its own. A call of a few
// rows (a cell's step, a streamed step) spent on two ATen allocations and
// fills about as long as on its arithmetic. Slices are taken and given back
// in stack order, by the objects' lifetimes; the loops' worker threads use
// the calling thread's slice. Under AddressSanitizer whatever of the arena
// is not in a slice is poisoned, so that a read or write past a slice is
// reported as one past a tensor would be.
template <typename S>
class ZeroScratch {
 public:
  ZeroScratch(int64_t count, const at::TensorOptions& opt) {
    Arena& a = arena();
    const size_t bytes = (static_cast<size_t>(count) * sizeof(S) + 63) & ~size_t{63};
    if (a.used + bytes <= kArenaBytes) {
      mark_ = a.used;
      ptr_ = reinterpret_cast<S*>(a.data.get() + a.used);
      a.used += bytes;
      FASTRNN_UNPOISON(ptr_, static_cast<size_t>(count) * sizeof(S));
      std::memset(static_cast<void*>(ptr_), 0, static_cast<size_t>(count) * sizeof(S));
    } else {
      owned_ = at::zeros({count}, opt);
      ptr_ = owned_.data_ptr<S>();
    }
  }
  ~ZeroScratch() {
    if (owned_.defined()) return;
    Arena& a = arena();
    FASTRNN_POISON(a.data.get() + mark_, a.used - mark_);
    a.used = mark_;
  }
  ZeroScratch(const ZeroScratch&) = delete;
  ZeroScratch& operator=(const ZeroScratch&) = delete;
  S* data() const { return ptr_; }

 private:
  static constexpr size_t kArenaBytes = size_t{64} << 10;
  struct Arena {
    struct Free {
      void operator()(unsigned char* p) const { ::operator delete[](p, std::align_val_t{64}); }
    };
    Arena() { FASTRNN_POISON(data.get(), kArenaBytes); }
    ~Arena() { FASTRNN_UNPOISON(data.get(), kArenaBytes); }
    std::unique_ptr<unsigned char[], Free> data{
        static_cast<unsigned char*>(::operator new[](kArenaBytes, std::align_val_t{64}))};
    size_t used = 0;
  };
  static Arena& arena() {
    static thread_local Arena a;
    return a;
  }
  S* ptr_ = nullptr;
  size_t mark_ = 0;
  at::Tensor owned_;
};

// Gives each row range of the D*N rows its scratch (per_row elements a row)
// and calls run(d, n0, n1, scratch) over them in parallel.
template <typename S, typename Run>
void run_rows(int64_t D, int64_t N, int64_t per_row, int64_t work_per_row,
              const at::TensorOptions& opt, const Run& run) {
  const ZeroScratch<S> scratch(D * N * per_row, opt);
  S* sp = scratch.data();
  for_each_row_range(D, N, work_per_row, [&](int64_t d, int64_t n0, int64_t n1) {
    run(d, n0, n1, sp + (d * N + n0) * per_row);
  });
}

// The bias the kernels add to u into bu, zeroed, (D, G*Hp): per gate block
// of Hp (H padded), b_ih plus b_hh where the cell does not keep b_hh apart;
// zero without biases and in the padding.
template <typename S, typename Cell>
void input_bias(const ForwardLoop& a, int64_t D, int64_t H, int64_t Hp, S* bu) {
  if (!a.b_ih[0].defined()) return;
  for (int64_t d = 0; d < D; ++d) {
    const S* bi = a.b_ih[d].data_ptr<S>();
    const S* bh = a.b_hh[d].data_ptr<S>();
    S* out = bu + d * Cell::kGates * Hp;
    for (int64_t g = 0; g < Cell::kGates; ++g)
      for (int64_t j = 0; j < H; ++j)
        out[g * Hp + j] = Cell::kHiddenBias ? bi[g * H + j] : bi[g * H + j] + bh[g * H + j];
  }
}

// Direction d of packed weights (D, K, J), or null where there are none.
template <typename S>
const S* direction(const at::Tensor& packed, int64_t d) {
  return packed.defined() ? packed.data_ptr<S>() + d * packed.size(1) * packed.size(2) : nullptr;
}

// The column-split forward of every direction on `nt` threads, each with
// its slice of the weights packed, or, unless `pack`, reading its rows of
// them as stored (a step too short to repay packing: the threads then
// share the weights' traffic, which a few rows' step is bound by).
// tiles: each thread's slice of the weights for the products on the matrix
// unit (forward_on_tiles()), or null.
template <typename S, typename Cell>
void forward_columns_loop(const Table<S, Cell>& k, const ForwardParams<S>& p,
                          const ForwardLoop& a, const S* bu, int64_t nt, bool pack,
                          const TileProducts* tiles = nullptr) {
  constexpr int64_t G = Cell::kGates;
  const int64_t D = p.D, T = p.T, N = p.N, H = p.H, P = p.P, lanes = k.padded_width(1);
  const int64_t Hp = k.padded_width(H), Pp = k.padded_width(P);
  const bool proj = a.w_hr[0].defined();
  const std::vector<int64_t> ub = slices(H, nt, lanes), pb = slices(P, nt, lanes);
  // W_hh^T's columns are W_hh's rows, per gate block of H; W_ih^T's and
  // W_hr^T's, W_ih's and W_hr's.
  using Slices = std::vector<at::Tensor>;
  const Slices wf = pack ? packed_slices(k, a.w_hh, D, 1, P, P, H, G, ub) : Slices();
  const Slices wi = pack ? packed_slices(k, a.w_ih, D, 1, p.C, p.C, H, G, ub) : Slices();
  const Slices wr = pack ? packed_slices(k, a.w_hr, D, 1, H, H, P, 1, pb) : Slices();
  // Thread tid's weights of direction d: its packed slice, or the whole.
  const auto mine = [&](const std::vector<at::Tensor>& sl, const std::array<at::Tensor, 2>& w,
                        int64_t d, int64_t tid) {
    return pack ? sl[d * nt + tid].template data_ptr<S>() : w[d].template data_ptr<S>();
  };
  // The states and each thread's scratch: the calling thread's arena where
  // they fit (a few rows' step), as the row loops' scratch.
  const auto opt = a.h0.options();
  const int64_t ldg = (G + Cell::kInputApart) * k.padded_width(ub[1] - ub[0]);
  const int64_t ldt = k.padded_width(pb[1] - pb[0]);
  const ZeroScratch<S> state(D * 2 * N * Pp, opt), cells(D * N * Hp, opt);
  const ZeroScratch<S> mem(proj ? N * Hp : 0, opt), gates(nt * N * ldg, opt), tmp(nt * N * ldt, opt);
  // Each thread's copy of the state's rows for its packed step (Columns::own_ld()).
  const int64_t ldr = Pp + lanes;
  const ZeroScratch<S> rows(pack ? nt * N * ldr : 0, opt);
  S* st = state.data();
  S* cs = cells.data();
  S* m = proj ? mem.data() : nullptr;
  for (int64_t d = 0; d < D; ++d)
    for (int64_t n = 0; n < N; ++n) {
      std::memcpy(st + (d * 2 * N + n) * Pp, p.h0 + (d * N + n) * P, sizeof(S) * P);
      if (Cell::kCellState)
        std::memcpy(cs + (d * N + n) * Hp, p.c0 + (d * N + n) * H, sizeof(S) * H);
    }
  on_threads(nt, [&](int64_t tid) {
    const int64_t j0 = ub[tid], nu = ub[tid + 1] - j0, k0 = pb[tid], np = pb[tid + 1] - k0;
    ForwardParams<S> pt = p;
    pt.tiles = tiles != nullptr ? tiles + tid : nullptr;
    for (int64_t d = 0; d < D; ++d) {
      S* sd = st + d * 2 * N * Pp;
      S* csd = cs + d * N * Hp;
      for (int64_t s = 0; s < T; ++s) {
        const int64_t t = d == 0 ? s : T - 1 - s;
        const S* prev = sd + (s & 1) * N * Pp;
        S* next = sd + ((s + 1) & 1) * N * Pp;
        if (nu > 0)
          k.forward_columns(pt, d, t, j0, nu, mine(wf, a.w_hh, d, tid), mine(wi, a.w_ih, d, tid),
                            bu + d * G * Hp, prev, next, csd,
                            m, gates.data() + tid * N * ldg,
                            pack ? rows.data() + tid * N * ldr : nullptr, pack);
        if (proj) {
#pragma omp barrier
          if (np > 0)
            k.project_columns(p, d, t, k0, np, mine(wr, a.w_hr, d, tid), m, prev, next,
                              tmp.data() + tid * N * ldt, pack);
        }
#pragma omp barrier
      }
    }
  });
  for (int64_t d = 0; d < D; ++d)
    for (int64_t n = 0; n < N; ++n) {
      std::memcpy(p.hn + (d * N + n) * P, st + ((d * 2 + (T & 1)) * N + n) * Pp, sizeof(S) * P);
      if (Cell::kCellState)
        std::memcpy(p.cn + (d * N + n) * H, cs + (d * N + n) * Hp, sizeof(S) * H);
    }
}

// The kernels compute the input term x W_ih^T themselves, step by step in
// the recurrent GEMM: a pass over a precomputed u through memory costs more
// than the multiply-adds.
// tiles: the steps' products on the matrix unit (forward_on_tiles()), of
// all the units (tile_threads 1, rows split between threads) or of each of
// tile_threads slices of them (the column-split loop); null: the kernels'
// own.
template <typename S, typename Cell>
void forward_typed(const ForwardLoop& a, const TileProducts* tiles = nullptr,
                   int64_t tile_threads = 1) {
  const Table<S, Cell> k = kernels<S, Cell>(current_isa());
  const int64_t D = a.h0.size(0), T = a.y.size(0), N = a.y.size(1), P = a.h0.size(2);
  const int64_t H = a.w_hh[0].size(0) / Cell::kGates, C = a.x.size(2);
  const bool proj = a.w_hr[0].defined();
  // What a step reads of the weights: W_ih and W_hh.
  const int64_t weight_bytes = Cell::kGates * H * (P + C) * static_cast<int64_t>(sizeof(S));
  const bool pack = tiles == nullptr && packs(T, N, weight_bytes, true);
  const bool rows_from_l2_or_l3 =
      weight_bytes <= l2_bytes() / 4 * 3 || rows_stream_weights(weight_bytes);
  const int64_t row_split = !pack               ? stored_row_split_rows()
                            : rows_from_l2_or_l3 ? kRowSplitRowsInL2
                            : Cell::kGates == 1  ? kRowSplitRowsElman
                                                 : kRowSplitRows;
  const int64_t nt = tiles != nullptr ? tile_threads : column_threads(weight_bytes, D * N, row_split);
  const bool columns = nt > 1;
  // W_hh (G*H, P) read as W_hh^T, G blocks of H columns; W_ih (G*H, C) alike;
  // W_hr (P, H) as W_hr^T.
  const bool rows_packed = pack && !columns;
  const at::Tensor wf = rows_packed ? packed(k, a.w_hh, D, 1, P, P, H, Cell::kGates) : at::Tensor();
  const at::Tensor wi = rows_packed ? packed(k, a.w_ih, D, 1, C, C, H, Cell::kGates) : at::Tensor();
  const at::Tensor wr = rows_packed ? packed(k, a.w_hr, D, 1, H, H, P, 1) : at::Tensor();
  ForwardParams<S> p;
  p.T = T; p.N = N; p.H = H; p.P = P; p.D = D;
  p.u = nullptr;
  p.x = a.x.data_ptr<S>();
  p.C = C;
  for (int64_t d = 0; d < 2; ++d) {
    p.w_hh[d] = p.w_hr[d] = p.b_ih[d] = nullptr;
    // kHiddenBias cells add b_hh inside the cell; bu carries the rest.
    p.b_hh[d] = Cell::kHiddenBias && d < D ? static_cast<const S*>(data_or_null(a.b_hh[d])) : nullptr;
  }
  const int64_t Hp = k.padded_width(H);
  const ZeroScratch<S> bias(D * Cell::kGates * Hp, a.h0.options());
  input_bias<S, Cell>(a, D, H, Hp, bias.data());
  const S* bu = bias.data();
  p.h0 = a.h0.data_ptr<S>();
  p.c0 = static_cast<const S*>(data_or_null(a.c0));
  p.lengths = data_or_null<int64_t>(a.lengths);
  p.y = a.y.data_ptr<S>();
  p.hn = a.hn.data_ptr<S>();
  p.cn = a.cn.defined() ? a.cn.data_ptr<S>() : nullptr;
  p.saved = a.saved.defined() ? a.saved.data_ptr<S>() : nullptr;
  if (!pack && N == 1) p.flip = lone_row_flip(T);
  if (columns) return forward_columns_loop(k, p, a, bu, nt, pack, tiles);
  p.tiles = tiles;
  run_rows<S>(D, N, k.scratch_per_row(H, P, proj), T * Cell::kGates * H * (P + C),
              a.h0.options(), [&](int64_t d, int64_t n0, int64_t n1, S* scratch) {
                if (pack)
                  k.forward_rows(p, d, n0, n1, direction<S>(wf, d), direction<S>(wi, d),
                                 direction<S>(wr, d), bu + d * Cell::kGates * Hp, scratch,
                                 true);
                else
                  k.forward_rows(p, d, n0, n1, a.w_hh[d].data_ptr<S>(), a.w_ih[d].data_ptr<S>(),
                                 proj ? a.w_hr[d].data_ptr<S>() : nullptr,
                                 bu + d * Cell::kGates * Hp, scratch, false);
              });
}

// The column-split backward of every direction on `nt` threads; tiles:
// each thread's slice of W_hh for the carry on the matrix unit
// (backward_on_tiles()), or null.
template <typename S, typename Cell>
void backward_columns_loop(const Table<S, Cell>& k, const BackwardParams<S>& p,
                           const BackwardLoop& a, int64_t nt,
                           const TileProducts* tiles = nullptr) {
  const int64_t D = p.D, T = p.T, N = p.N, H = p.H, P = p.P, GH = Cell::kGates * H;
  const int64_t lanes = k.padded_width(1), Hp = k.padded_width(H), Pp = k.padded_width(P);
  const bool proj = a.w_hr[0].defined();
  const std::vector<int64_t> ub = slices(H, nt, lanes), pb = slices(P, nt, lanes);
  // The carry's slice is W_hh's columns [k0, k0 + np); the projection's W_hr's
  // columns [j0, j0 + nu), both as stored.
  // The last step's carry only makes the initial state's gradient.
  const int64_t carries = p.state_grad ? T : T - 1;
  const auto wb = carries > 0 && tiles == nullptr ? packed_slices(k, a.w_hh, D, P, 1, GH, P, 1, pb)
                                                  : std::vector<at::Tensor>();
  const auto wr = packed_slices(k, a.w_hr, D, H, 1, P, H, 1, ub);
  // The states' gradients and each thread's scratch: the calling thread's
  // arena where they fit (a few rows' step), as the forward's.
  const auto opt = a.dgh.options();
  const int64_t ldm = k.padded_width(ub[1] - ub[0]), ldt = k.padded_width(pb[1] - pb[0]);
  const ZeroScratch<S> dh(D * 2 * N * Pp, opt), dc(D * N * Hp, opt);
  const ZeroScratch<S> gp(proj ? nt * N * Pp : 0, opt), gm(proj ? nt * N * ldm : 0, opt);
  const ZeroScratch<S> tmp(nt * N * ldt, opt);
  // Each thread's copy of a step's gate gradients for its carry (Columns::own_ld()).
  const int64_t ldr = k.padded_width(GH) + lanes;
  const ZeroScratch<S> rows(carries > 0 && tiles == nullptr ? nt * N * ldr : 0, opt);
  S* dhp = dh.data();
  S* dcp = dc.data();
  for (int64_t d = 0; d < D; ++d)
    for (int64_t n = 0; n < N; ++n) {
      if (p.dhn) std::memcpy(dhp + (d * 2 * N + n) * Pp, p.dhn + (d * N + n) * P, sizeof(S) * P);
      if (Cell::kCellState && p.dcn)
        std::memcpy(dcp + (d * N + n) * Hp, p.dcn + (d * N + n) * H, sizeof(S) * H);
    }
  on_threads(nt, [&](int64_t tid) {
    const int64_t j0 = ub[tid], nu = ub[tid + 1] - j0, k0 = pb[tid], np = pb[tid + 1] - k0;
    BackwardParams<S> pt = p;
    pt.tiles = tiles != nullptr ? tiles + tid : nullptr;
    for (int64_t d = 0; d < D; ++d) {
      S* dhd = dhp + d * 2 * N * Pp;
      for (int64_t s = 0; s < T; ++s) {
        const int64_t t = d == 0 ? T - 1 - s : s;
        const S* cur = dhd + (s & 1) * N * Pp;
        S* next = dhd + ((s + 1) & 1) * N * Pp;
        if (nu > 0 || (proj && j0 == 0))
          k.backward_columns(p, d, t, j0, nu, proj ? wr[d * nt + tid].template data_ptr<S>() : nullptr,
                             cur, next, dcp + d * N * Hp, proj ? gp.data() + tid * N * Pp : nullptr,
                             proj ? gm.data() + tid * N * ldm : nullptr);
#pragma omp barrier
        if (s == carries) break;
        if (np > 0)
          k.carry_columns(pt, d, t, k0, np,
                          tiles ? nullptr : wb[d * nt + tid].template data_ptr<S>(), cur, next,
                          tmp.data() + tid * N * ldt, tiles ? nullptr : rows.data() + tid * N * ldr);
        // Without projections a thread's carry slice is its units (P == H,
        // the same slices), and the next step's first phase reads and
        // writes dh in that slice alone: the one barrier before the carry,
        // which reads every unit's dgh, is all a step needs. The
        // projection's first phase reads all of dh.
        if (proj) {
#pragma omp barrier
        }
      }
    }
  });
  for (int64_t d = 0; d < D && p.state_grad; ++d)
    for (int64_t n = 0; n < N; ++n) {
      std::memcpy(p.dh0 + (d * N + n) * P, dhp + ((d * 2 + (T & 1)) * N + n) * Pp, sizeof(S) * P);
      if (Cell::kCellState)
        std::memcpy(p.dc0 + (d * N + n) * H, dcp + (d * N + n) * Hp, sizeof(S) * H);
    }
}

// tiles: the carry's products on the matrix unit (backward_on_tiles()), of
// all of W_hh's columns (tile_threads 1) or of each of tile_threads slices
// of them (the column-split loop); null: the kernels' own.
template <typename S, typename Cell>
void backward_typed(const BackwardLoop& a, const TileProducts* tiles = nullptr,
                    int64_t tile_threads = 1) {
  const Table<S, Cell> k = kernels<S, Cell>(current_isa());
  const int64_t D = a.dgh.size(0), T = a.dgh.size(1), N = a.dgh.size(2);
  const int64_t GH = a.dgh.size(3), H = GH / Cell::kGates, P = a.h0.size(2);
  const bool proj = a.w_hr[0].defined();
  const int64_t weight_bytes = GH * P * static_cast<int64_t>(sizeof(S));
  const bool pack = tiles == nullptr && packs(T, N, weight_bytes);
  const int64_t nt = tiles != nullptr ? tile_threads
                     : pack          ? column_threads(weight_bytes, D * N,
                                                      rows_stream_weights(weight_bytes)
                                                          ? kRowSplitRowsInL2
                                                          : kRowSplitRows)
                                     : 1;
  // W_hh (G*H, P) and W_hr (P, H) as stored.
  const bool rows_packed = pack && nt == 1;
  // W_hh is not read where its one product would make the initial state's
  // gradient alone.
  const bool carry = T > 1 || a.state_grad;
  const at::Tensor wb = rows_packed && carry ? packed(k, a.w_hh, D, P, 1, GH, P, 1) : at::Tensor();
  const at::Tensor wr = rows_packed ? packed(k, a.w_hr, D, H, 1, P, H, 1) : at::Tensor();
  BackwardParams<S> p;
  p.T = T; p.N = N; p.H = H; p.P = P; p.D = D;
  p.dy = a.dy.data_ptr<S>();
  p.dhn = data_or_null<S>(a.dhn);
  p.dcn = data_or_null<S>(a.dcn);
  p.y = a.y.data_ptr<S>();
  p.h0 = a.h0.data_ptr<S>();
  p.c0 = static_cast<const S*>(data_or_null(a.c0));
  p.saved = static_cast<const S*>(data_or_null(a.saved));
  for (int64_t d = 0; d < 2; ++d) p.w_hh[d] = p.w_hr[d] = nullptr;
  p.lengths = data_or_null<int64_t>(a.lengths);
  p.dgh = a.dgh.data_ptr<S>();
  p.dgi = a.dgi.defined() ? a.dgi.data_ptr<S>() : nullptr;
  p.dhr = a.dhr.defined() ? a.dhr.data_ptr<S>() : nullptr;
  p.dh0 = a.dh0.data_ptr<S>();
  p.dc0 = a.dc0.defined() ? a.dc0.data_ptr<S>() : nullptr;
  p.state_grad = a.state_grad;
  if (nt > 1) return backward_columns_loop(k, p, a, nt, tiles);
  p.tiles = tiles;
  run_rows<S>(D, N, k.scratch_per_row(H, P, proj), T * Cell::kGates * H * P, a.dgh.options(),
              [&](int64_t d, int64_t n0, int64_t n1, S* scratch) {
                if (pack)
                  k.backward_rows(p, d, n0, n1, direction<S>(wb, d), direction<S>(wr, d), scratch,
                                  true);
                else
                  k.backward_rows(p, d, n0, n1, a.w_hh[d].data_ptr<S>(),
                                  proj ? a.w_hr[d].data_ptr<S>() : nullptr, scratch, false);
              });
}

bool half_type(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }

// A half type's tensor in float32 for the float32 kernels: a contiguous
// one in a recycled() block (a workspace's conversion into fresh memory
// spent more on faulting its pages in than on converting: LSTM 32->256,
// batch 64, 128 steps, 10 ms against 2.5).
at::Tensor to_float(const at::Tensor& t) {
  if (!t.defined()) return t;
  if (!t.is_contiguous()) return t.to(at::kFloat);
  return recycled(t.sizes(), t.options().dtype(at::kFloat)).copy_(t);
}
std::optional<at::Tensor> to_float(const std::optional<at::Tensor>& t) {
  return t ? std::optional<at::Tensor>(to_float(*t)) : std::nullopt;
}
std::array<at::Tensor, 2> to_float(const std::array<at::Tensor, 2>& w) {
  return {to_float(w[0]), to_float(w[1])};
}
// An output the kernels write whole (every row of every step, zeros where
// a row is past its length): float32 memory of its shape rather than a
// conversion of what it holds.
at::Tensor float_output(const at::Tensor& t) {
  return t.defined() && t.is_contiguous() ? recycled(t.sizes(), t.options().dtype(at::kFloat))
                                          : to_float(t);
}
void copy_back(const at::Tensor& to, const at::Tensor& from) {
  if (to.defined()) to.copy_(from);
}

template <typename S>
void weight_grads_typed(const WeightGradLoop& a) {
  WeightGradParams<S> p;
  p.R = a.dgi.size(0);
  p.GH = a.dgi.size(1);
  p.N = a.h0.size(0);
  p.P = a.h0.size(1);
  p.C = a.x.size(1);
  p.dgi = a.dgi.data_ptr<S>();
  p.dgh = a.dgh.data_ptr<S>();
  p.x = a.x.data_ptr<S>();
  p.h0 = a.h0.data_ptr<S>();
  p.y = a.y.data_ptr<S>();
  p.w_ih = a.w_ih.data_ptr<S>();
  p.dw_ih = a.dw_ih.data_ptr<S>();
  p.dw_hh = a.dw_hh.data_ptr<S>();
  p.db_ih = a.db_ih.defined() ? a.db_ih.data_ptr<S>() : nullptr;
  p.db_hh = a.db_hh.defined() ? a.db_hh.data_ptr<S>() : nullptr;
  p.dx = a.dx.defined() ? a.dx.data_ptr<S>() : nullptr;
  auto weight_grads = cpu::base::weight_grads<S>;
  auto input_grad = cpu::base::input_grad<S>;
#if FASTRNN_WITH_AVX512
  if (current_isa() == Isa::avx512) {
    weight_grads = cpu::avx512::weight_grads<S>;
    input_grad = cpu::avx512::input_grad<S>;
  }
#endif
#if FASTRNN_WITH_AVX2
  if (current_isa() == Isa::avx2) {
    weight_grads = cpu::avx2::weight_grads<S>;
    input_grad = cpu::avx2::input_grad<S>;
  }
#endif
  // A unit's gradients, and a row of dx, are each one thread's sum in a
  // fixed order: the same bits on any number of threads. Small calls stay
  // on the calling thread. A unit's weights are written as well as summed
  // into, which a few rows cannot hide: each written weight counts as 8
  // multiply-adds (RNNCell 256->512 at batch 1 on two threads, forward+
  // backward: 203-221 us with the unit loop split, 293-320 on one thread).
  const int64_t per_unit = (p.R + 8) * (p.C + p.P);
  at::parallel_for(0, p.GH, thread_grain(per_unit, kThreadGrainMacs / 2),
                   [&](int64_t j0, int64_t j1) { weight_grads(p, j0, j1); });
  // dx in tasks of up to four rows by kInputGradColumns columns, columns
  // outermost, so that a thread reads its columns of W_ih and a lone row's
  // columns are split between threads (by rows, one row read all of W_ih
  // on one thread). Each weight read counts as 4 multiply-adds. Measured
  // (LSTMCell 256->512, two threads, what the input's gradient adds to
  // the backward op in the profiler, 100 calls, three runs, by rows / by
  // columns): batch 1 82-145 / 38-59 us, batch 8 132-188 / 94-135 us.
  if (p.dx) {
    constexpr int64_t kInputGradRows = 4, kInputGradColumns = 64;
    const int64_t row_blocks = (p.R + kInputGradRows - 1) / kInputGradRows;
    const int64_t column_blocks = (p.C + kInputGradColumns - 1) / kInputGradColumns;
    const int64_t per_task =
        (std::min(p.R, kInputGradRows) + 4) * p.GH * std::min(p.C, kInputGradColumns);
    at::parallel_for(0, row_blocks * column_blocks, thread_grain(per_task),
                     [&](int64_t t0, int64_t t1) {
                       for (int64_t t = t0; t < t1; ++t) {
                         const int64_t r0 = t % row_blocks * kInputGradRows;
                         const int64_t c0 = t / row_blocks * kInputGradColumns;
                         input_grad(p, r0, std::min(p.R, r0 + kInputGradRows), c0,
                                    std::min(p.C, c0 + kInputGradColumns));
                       }
                     });
  }
}

// The narrow products' kernels of the instruction set this call runs.
template <typename S>
struct NarrowKernels {
  void (*weight_grad)(const S*, int64_t, int64_t, const S*, int64_t, int64_t, const S*, int64_t,
                      int64_t, S*, int64_t, int64_t);
  void (*input_grad)(const S*, int64_t, const S*, int64_t, S*, bool, int64_t, int64_t);
};

template <typename S>
NarrowKernels<S> narrow_kernels() {
#if FASTRNN_WITH_AVX512
  if (current_isa() == Isa::avx512)
    return {cpu::avx512::narrow_weight_grad<S>, cpu::avx512::narrow_input_grad<S>};
#endif
#if FASTRNN_WITH_AVX2
  if (current_isa() == Isa::avx2)
    return {cpu::avx2::narrow_weight_grad<S>, cpu::avx2::narrow_input_grad<S>};
#endif
  return {cpu::base::narrow_weight_grad<S>, cpu::base::narrow_input_grad<S>};
}

// Units (dW) or rows (dx) go to threads in blocks of kNarrowBlock, a
// multiple of every tile's results (kTileAccumulators / NV), so that only
// the last block of all has a ragged tail. Each result is one thread's sum
// in a fixed order: the same bits on any number of threads.
constexpr int64_t kNarrowBlock = 24;

template <typename S>
void narrow_weight_grad_typed(const at::Tensor& g, const at::Tensor& a, const at::Tensor& b,
                              const at::Tensor& dw) {
  const int64_t R = g.size(0), GH = g.size(1), C = a.size(1), Ra = a.size(0);
  const auto k = narrow_kernels<S>();
  const S* gp = g.data_ptr<S>();
  const S* ap = a.data_ptr<S>();
  const S* bp = b.defined() ? b.data_ptr<S>() : nullptr;
  const int64_t lda = a.stride(0), ldb = b.defined() ? b.stride(0) : 0;
  S* out = dw.data_ptr<S>();
  const int64_t blocks = (GH + kNarrowBlock - 1) / kNarrowBlock;
  const int64_t per_block = kNarrowBlock * R * C;
  at::parallel_for(0, blocks, thread_grain(per_block),
                   [&](int64_t b0, int64_t b1) {
                     k.weight_grad(gp, R, GH, ap, lda, Ra, bp, ldb, C, out, b0 * kNarrowBlock,
                                   std::min(GH, b1 * kNarrowBlock));
                   });
}

template <typename S>
void narrow_input_grad_typed(const at::Tensor& g, const at::Tensor& w, const at::Tensor& dx,
                             bool add) {
  const int64_t R = g.size(0), GH = g.size(1), C = w.size(1);
  const auto k = narrow_kernels<S>();
  const S* gp = g.data_ptr<S>();
  const S* wp = w.data_ptr<S>();
  S* out = dx.data_ptr<S>();
  const int64_t blocks = (R + kNarrowBlock - 1) / kNarrowBlock;
  const int64_t per_block = kNarrowBlock * GH * C;
  at::parallel_for(0, blocks, thread_grain(per_block),
                   [&](int64_t b0, int64_t b1) {
                     k.input_grad(gp, GH, wp, C, out, add, b0 * kNarrowBlock,
                                  std::min(R, b1 * kNarrowBlock));
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

void set_cpu_packing(const std::string& name) {
  int mode;
  if (name == "auto") mode = 0;
  else if (name == "always") mode = 1;
  else if (name == "never") mode = 2;
  else TORCH_CHECK(false, "unknown packing '", name, "': expected auto, always or never");
  packing_slot().store(mode, std::memory_order_relaxed);
}

void set_cpu_tiles(const std::string& name) {
  int mode;
  if (name == "auto") mode = 0;
  else if (name == "never") mode = 1;
  else TORCH_CHECK(false, "unknown tiles setting '", name, "': expected auto or never");
  tiles_slot().store(mode, std::memory_order_relaxed);
}

const char* cpu_tiles() { return tiles_slot().load(std::memory_order_relaxed) != 0 ? "never" : "auto"; }

bool cpu_tiles_available() { return current_isa() == Isa::avx512 && cpu::tiles_available(); }

const char* cpu_tiles_unit() { return cpu_tiles_available() ? cpu::tile_unit() : "none"; }

const char* cpu_packing() {
  switch (packing_slot().load(std::memory_order_relaxed)) {
    case 1: return "always";
    case 2: return "never";
    default: return "auto";
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

at::Tensor tile_matmul(const at::Tensor& a, const at::Tensor& w, const std::optional<at::Tensor>& c) {
  TORCH_CHECK(cpu_tiles_available(), "tile_matmul: this processor has no bfloat16 products");
  TORCH_CHECK(a.dim() == 2 && w.dim() == 2 && a.size(1) == w.size(0) &&
                  a.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat,
              "tile_matmul: expected float32 a (R, K) and w (K, J)");
  const int64_t R = a.size(0), K = a.size(1), J = w.size(1), Jp = (J + 15) / 16 * 16;
  TORCH_CHECK(!c || (c->sizes() == at::IntArrayRef({R, J}) && c->scalar_type() == at::kFloat),
              "tile_matmul: c must be float32 (R, J)");
  const at::Tensor wc = w.contiguous(), ac = a.contiguous();
  TileProducts t;
  t.kp = cpu::tile_depth(K, 0);
  t.ldg = Jp;
  const at::Tensor b = at::empty({t.kp * Jp}, w.options().dtype(at::kBFloat16));
  cpu::tile_pack_rows(wc.data_ptr<float>(), J, K, J, t.kp, static_cast<uint16_t*>(b.data_ptr()), 0,
                      Jp);
  t.b[0] = static_cast<const uint16_t*>(b.data_ptr());
  at::Tensor out = at::zeros({R, Jp}, a.options());
  if (c) out.narrow(1, 0, J).copy_(*c);
  cpu::tile_gemm(t, 0, R, ac.data_ptr<float>(), K, K, out.data_ptr<float>(), Jp, c.has_value());
  return out.narrow(1, 0, J).contiguous();
}

double cpu_fma_rate(double seconds, int64_t threads, int64_t trials) {
  TORCH_CHECK(seconds > 0 && threads >= 1 && trials >= 1,
              "cpu_fma_rate: seconds, threads and trials must be positive");
  int64_t (*probe)(int64_t, float*) = cpu::base::fma_probe_entry;
#if FASTRNN_WITH_AVX512
  if (current_isa() == Isa::avx512) probe = cpu::avx512::fma_probe_entry;
#endif
#if FASTRNN_WITH_AVX2
  if (current_isa() == Isa::avx2) probe = cpu::avx2::fma_probe_entry;
#endif
  // Rounds for about `seconds`, from a short calibration.
  float sink = 0.f;
  int64_t rounds = 1 << 16;
  for (;;) {
    const double t0 = omp_get_wtime();
    probe(rounds, &sink);
    const double dt = omp_get_wtime() - t0;
    if (dt >= seconds / 8 || rounds > (int64_t{1} << 40)) {
      rounds = std::max<int64_t>(1, static_cast<int64_t>(rounds * seconds / std::max(dt, 1e-9)));
      break;
    }
    rounds *= 4;
  }
  double best = 0;
  std::vector<float> sinks(threads);
  for (int64_t trial = 0; trial < trials; ++trial) {
    int64_t done = 0;
    const double t0 = omp_get_wtime();
#pragma omp parallel for num_threads(threads) reduction(+ : done) schedule(static, 1)
    for (int64_t i = 0; i < threads; ++i) done += probe(rounds, &sinks[i]);
    const double dt = omp_get_wtime() - t0;
    best = std::max(best, static_cast<double>(done) / dt);
  }
  return best;
}

// Whether a bfloat16 call's steps run their products on the matrix unit:
// AMX-BF16 present and allowed (cpu::tiles_available(), set_cpu_tiles()),
// the AVX-512 kernels for the cell's step, no projections, and a call long
// enough to repay packing the weights (packs() of the forward's weights or
// the backward's W_hh, as for the kernels' own panels: a cell's step or a
// short call reads them as stored in float32).
bool tiles_apply(int64_t T, int64_t N, int64_t weight_bytes, bool proj, bool forward) {
  return tiles_slot().load(std::memory_order_relaxed) == 0 && current_isa() == Isa::avx512 &&
         !proj && cpu::tiles_available() && packs(T, N, weight_bytes, forward);
}

// One TileProducts per slice of `units` (boundaries b, as slices() gives
// them), each `blocks` blocks of the slice's padded width, kp deep, and the
// bfloat16 tensor (D, all slices' tiles) their b[d] point into, which the
// caller packs and keeps alive.
template <typename Cell>
[[nodiscard]] at::Tensor tile_slices(const Table<float, Cell>& k, const std::vector<int64_t>& b, int64_t blocks,
                       int64_t kp, int64_t D, const at::TensorOptions& opt,
                       std::vector<TileProducts>& tiles) {
  const int64_t parts = static_cast<int64_t>(b.size()) - 1;
  tiles.assign(parts, TileProducts{});
  std::vector<int64_t> at(parts + 1, 0);  // each slice's offset in a direction's tiles
  for (int64_t i = 0; i < parts; ++i) {
    tiles[i].kp = kp;
    tiles[i].ldg = blocks * k.padded_width(b[i + 1] - b[i]);
    at[i + 1] = at[i] + kp * tiles[i].ldg;
  }
  const at::Tensor out = recycled({D, at[parts]}, opt.dtype(at::kBFloat16));
  uint16_t* b0 = static_cast<uint16_t*>(out.data_ptr());
  for (int64_t d = 0; d < D; ++d)
    for (int64_t i = 0; i < parts; ++i) tiles[i].b[d] = b0 + d * at[parts] + at[i];
  return out;
}

// The forward of f (float32 copies of bfloat16 tensors) with each step's
// products [x_t | h] [W_ih | W_hh]^T on the matrix unit's tiles in bfloat16
// (recurrence_cpu_tiles.h): x_t and the weights are bfloat16 values, h is
// rounded to bfloat16 for the product as torch.nn's bfloat16 layers round
// their state, and the sums are float32, as oneDNN's bfloat16 RNNs take
// them; the cell's step runs on them in float32, as for float32 tensors.
// False, having done nothing, where tiles_apply() does not hold.
bool forward_on_tiles(CellKind cell, const ForwardLoop& f) {
  bool done = false;
  with_cell(cell, [&](auto c) {
    using Cell = decltype(c);
    constexpr int64_t G = Cell::kGates, apart = Cell::kInputApart;
    const int64_t D = f.h0.size(0), T = f.y.size(0), N = f.y.size(1), P = f.h0.size(2);
    const int64_t H = f.w_hh[0].size(0) / G, C = f.x.size(2);
    const int64_t weight_bytes = G * H * (P + C) * int64_t{sizeof(float)};
    if (!tiles_apply(T, N, weight_bytes, f.w_hr[0].defined(), true)) return;
    const Table<float, Cell> k = kernels<float, Cell>(Isa::avx512);
    // Split by units where the float32 kernels would split bfloat16's
    // weights (half the bytes): each thread packs and reads its slice.
    const int64_t nt = column_threads(
        weight_bytes / 2, D * N,
        weight_bytes / 2 > 2 * l2_bytes() ? kRowSplitRowsTiles : kRowSplitRows);
    const std::vector<int64_t> ub = slices(H, nt, k.padded_width(1));
    const int64_t kp = cpu::tile_depth(C, P);
    std::vector<TileProducts> tiles;
    const at::Tensor b = tile_slices(k, ub, G + apart, kp, D, f.x.options(), tiles);
    for (TileProducts& t : tiles) {
      t.C = C;
      t.P = P;
      const int64_t jp = t.ldg / (G + apart);
      t.hidden_from = (G - apart) * jp;
      t.input_from = G * jp;
    }
    // Every slice's column tiles to the threads, a few at a time.
    const int64_t col_tiles = b.size(1) / kp / 16;
    at::parallel_for(0, D * col_tiles, std::max<int64_t>(1, (int64_t{1} << 14) / kp),
                     [&](int64_t begin, int64_t end) {
                       for (int64_t x = begin; x < end;) {
                         const int64_t d = x / col_tiles;
                         int64_t col = (x % col_tiles) * 16, i = 0;
                         while (col >= tiles[i].ldg) col -= tiles[i++].ldg;
                         const int64_t n = std::min((tiles[i].ldg - col) / 16,
                                                    std::min(end - x, col_tiles - x % col_tiles));
                         const int64_t j0 = ub[i];
                         cpu::tile_pack(f.w_ih[d].data_ptr<float>() + j0 * C,
                                        f.w_hh[d].data_ptr<float>() + j0 * P, G, apart, H,
                                        ub[i + 1] - j0, tiles[i].ldg / (G + apart), C, P, kp,
                                        const_cast<uint16_t*>(tiles[i].b[d]), col, col + n * 16);
                         x += n;
                       }
                     });
    forward_typed<float, Cell>(f, tiles.data(), nt);
    done = true;
  });
  return done;
}

void forward_recurrence_cpu(CellKind cell, const ForwardLoop& a) {
  if (half_type(a.h0.scalar_type())) {
    ForwardLoop f{to_float(a.x), to_float(a.w_ih), at::Tensor(), to_float(a.w_hh),
                  to_float(a.b_ih), to_float(a.b_hh), to_float(a.w_hr), to_float(a.h0),
                  to_float(a.c0), a.lengths, float_output(a.y), to_float(a.hn), to_float(a.cn),
                  float_output(a.saved)};
    if (a.h0.scalar_type() != at::kBFloat16 || !forward_on_tiles(cell, f))
      forward_recurrence_cpu(cell, f);
    copy_back(a.y, f.y);
    copy_back(a.hn, f.hn);
    copy_back(a.cn, f.cn);
    copy_back(a.saved, f.saved);
    return;
  }
  with_cell(cell, [&](auto c) {
    using Cell = decltype(c);
    AT_DISPATCH_FLOATING_TYPES(a.h0.scalar_type(), "fastrnn_forward_cpu",
                               [&] { forward_typed<scalar_t, Cell>(a); });
  });
}

// The backward of f (float32 copies of bfloat16 tensors) with each step's
// carry dgh W_hh on the matrix unit's tiles: dgh rounded to bfloat16 (as
// it is stored for the weights' gradients), the sums float32. False,
// having done nothing, where tiles_apply() does not hold for W_hh (packs()
// of the backward, as the float32 kernels decide theirs) or no step
// carries.
bool backward_on_tiles(CellKind cell, const BackwardLoop& f) {
  bool done = false;
  with_cell(cell, [&](auto c) {
    using Cell = decltype(c);
    const int64_t D = f.dgh.size(0), T = f.dgh.size(1), N = f.dgh.size(2);
    const int64_t GH = f.dgh.size(3), P = f.h0.size(2);
    if (!(T > 1 || f.state_grad)) return;
    if (!tiles_apply(T, N, GH * P * int64_t{sizeof(float)}, f.w_hr[0].defined(), false)) return;
    const Table<float, Cell> k = kernels<float, Cell>(Isa::avx512);
    const int64_t weight_bytes = GH * P * int64_t{sizeof(float)} / 2;
    const int64_t nt = column_threads(weight_bytes, D * N);
    const std::vector<int64_t> pb = slices(P, nt, k.padded_width(1));
    const int64_t kp = cpu::tile_depth(GH, 0);
    std::vector<TileProducts> tiles;
    const at::Tensor b = tile_slices(k, pb, 1, kp, D, f.dgh.options(), tiles);
    at::parallel_for(0, D * nt, 1, [&](int64_t begin, int64_t end) {
      for (int64_t x = begin; x < end; ++x) {
        const int64_t d = x / nt, i = x % nt;
        cpu::tile_pack_rows(f.w_hh[d].data_ptr<float>() + pb[i], P, GH, pb[i + 1] - pb[i], kp,
                            const_cast<uint16_t*>(tiles[i].b[d]), 0, tiles[i].ldg);
      }
    });
    backward_typed<float, Cell>(f, tiles.data(), nt);
    done = true;
  });
  return done;
}

void backward_recurrence_cpu(CellKind cell, const BackwardLoop& a) {
  if (half_type(a.dgh.scalar_type())) {
    BackwardLoop f{to_float(a.dy), to_float(a.dhn), to_float(a.dcn), to_float(a.y),
                   to_float(a.h0), to_float(a.c0), to_float(a.saved), to_float(a.w_hh),
                   to_float(a.w_hr), a.lengths, float_output(a.dgh), float_output(a.dgi),
                   to_float(a.dhr), to_float(a.dh0), to_float(a.dc0)};
    if (a.dgh.scalar_type() != at::kBFloat16 || !backward_on_tiles(cell, f))
      backward_recurrence_cpu(cell, f);
    copy_back(a.dgh, f.dgh);
    copy_back(a.dgi, f.dgi);
    copy_back(a.dhr, f.dhr);
    copy_back(a.dh0, f.dh0);
    copy_back(a.dc0, f.dc0);
    return;
  }
  with_cell(cell, [&](auto c) {
    using Cell = decltype(c);
    AT_DISPATCH_FLOATING_TYPES(a.dgh.scalar_type(), "fastrnn_backward_cpu",
                               [&] { backward_typed<scalar_t, Cell>(a); });
  });
}

namespace {

// Lanes of one vector of the kernels this call runs, for dtype t.
int64_t vector_lanes(at::ScalarType t) {
  const int64_t bytes = current_isa() == Isa::avx512 ? 64 : current_isa() == Isa::avx2 ? 32 : 16;
  return bytes / static_cast<int64_t>(c10::elementSize(t));
}

// A matrix of rows any distance apart: (rows, C) with unit column stride.
bool unit_rows(const at::Tensor& t) { return t.dim() == 2 && (t.size(1) <= 1 || t.stride(1) == 1); }

}  // namespace

// Measured on an AMD EPYC (AVX-512, one thread, 8192 rows, G*H 1024 and
// 4096, GFMA/s, narrow tiles / ATen's GEMM, which is MKL; the probe's
// float32 peak 58, float64's half that): g^T z float32 C 16 27-31 / 14, C 32 42-53
// / 24, C 64 47-55 / 32-33, C 256 (dW_hh of hidden 256) 49-53 / 43-46, C
// 512 52 / 49, C 1024 50 / 48; float64 C 32 19-21 / 6, C 256 26 / 19, C
// 1024 15 / 23. dx float32 C 16 (one vector: a broadcast for every
// multiply-add) 13 / 16-17, C 32 45-47 / 26-27, C 64 51-54 / 32-35, C 256
// 51 / 39-42, C 512 53 / 45, C 1024 41 / 46; float64 C 16 22-24 / 4, C 512
// 27 / 22. Two threads alike (C 32: 87-104 / 42-60). On an Intel Xeon,
// whose cores have two 512-bit FMA units (probe 115), MKL runs g^T z
// faster from a few vectors on: float32 C 32 77 / 73, C 256 80 / 92
// (G*H 1024 over 1024 and 8192 rows); LSTM 256, one thread, 128 steps,
// forward+backward with W_hh's gradient in MKL: batch 64 100-108 ms ->
// 90-92, batch 8 11.2-12.4 -> 10.3-11.0, at 64 and 128 units and in the
// GRU within the noise. So there the narrow tiles take up to 12 vectors.
// dx alike: forward+backward with dx in the tiles / in MKL, the two
// alternating call by call in one process (medians of the ratio over 9-227
// pairs, one thread / two): input 32, 64 and 128 0.99-1.02x; LSTM 256->1024
// (batch 16, 64 steps) 1.02x / 1.04x, GRU 256->256 (batch 64) 0.99x /
// 1.02x, LSTM 512->512 (batch 32, 64 steps) 1.05x / 1.11x.
// With the AVX2 kernels (16 registers: tiles of 12 accumulators, 7 loads
// for 12 multiply-adds) on an AMD EPYC of AVX2 alone (Zen 3, 512 KB of L2
// a core), MKL wins float32 at every width: forward+backward, 128 steps,
// the two alternating call by call in one process, medians of the ratio,
// tiles / MKL, one thread: GRU 32->256 batch 64 200 / 151 ms (1.32x), LSTM
// 32->256 batch 8 35.8 / 26.2 (1.38x), LSTM 256->256 batch 32 255 / 175
// (1.47x), LSTM 32->128 batch 64 1.22x, RNN 32->128 1.22x, LSTM and GRU
// 32->64 batch 64 1.18x and 1.19x; with only the 32 input columns in the
// tiles 0.97x-1.0x of all in MKL; two threads GRU 32->256 1.30x, LSTM
// 32->256 batch 8 1.33x, LSTM 32->64 0.97x within the spread. float64 the
// other way: GRU 32->64 batch 64 0.94x, LSTM 32->128 batch 16 1.02x, so it
// keeps the tiles.
namespace {
int64_t narrow_vectors(at::ScalarType t) {
  if (current_isa() == Isa::avx2 && t == at::kFloat) return 0;
  return intel_cpu() ? 12 : 32;
}
}  // namespace
bool narrow_weight_grad_pays(const at::Tensor& x, int64_t C) {
  return C <= narrow_vectors(x.scalar_type()) * vector_lanes(x.scalar_type());
}
bool narrow_input_grad_pays(const at::Tensor& x, int64_t C) {
  const int64_t lanes = vector_lanes(x.scalar_type());
  return C > lanes && C <= narrow_vectors(x.scalar_type()) * lanes;
}

at::Tensor narrow_weight_grad_cpu(const at::Tensor& g, const at::Tensor& a, const at::Tensor& b) {
  TORCH_INTERNAL_ASSERT(g.dim() == 2 && g.is_contiguous() && unit_rows(a) &&
                        g.scalar_type() == a.scalar_type() &&
                        g.size(0) == a.size(0) + (b.defined() ? b.size(0) : 0));
  TORCH_INTERNAL_ASSERT(!b.defined() || (unit_rows(b) && b.size(1) == a.size(1) &&
                                         b.scalar_type() == a.scalar_type()));
  at::Tensor dw = recycled({g.size(1), a.size(1)}, a.options());
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "fastrnn_narrow_weight_grad_cpu",
                             [&] { narrow_weight_grad_typed<scalar_t>(g, a, b, dw); });
  return dw;
}

void narrow_input_grad_cpu(const at::Tensor& dgi, const at::Tensor& w_ih, const at::Tensor& dx,
                           bool add) {
  TORCH_INTERNAL_ASSERT(dgi.dim() == 2 && w_ih.dim() == 2 && dx.dim() == 2 &&
                        dgi.size(1) == w_ih.size(0) && dx.size(0) == dgi.size(0) &&
                        dx.size(1) == w_ih.size(1) && dgi.is_contiguous() &&
                        w_ih.is_contiguous() && dx.is_contiguous() &&
                        dgi.scalar_type() == w_ih.scalar_type() &&
                        dx.scalar_type() == dgi.scalar_type());
  AT_DISPATCH_FLOATING_TYPES(dgi.scalar_type(), "fastrnn_narrow_input_grad_cpu",
                             [&] { narrow_input_grad_typed<scalar_t>(dgi, w_ih, dx, add); });
}

void weight_grads_cpu(const WeightGradLoop& a) {
  AT_DISPATCH_FLOATING_TYPES(a.dgi.scalar_type(), "fastrnn_weight_grads_cpu",
                             [&] { weight_grads_typed<scalar_t>(a); });
}

namespace {

// MKL's number of threads for the calling thread (0: the process's), which
// returns the one before: mkl_set_num_threads_local of MKL's C interface
// (the lower-case symbol is the Fortran one, which takes a pointer).
// torch's library exports it where torch links MKL (and sets it in
// torch.set_num_threads); elsewhere it is null.
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));

// MKL on one thread while it lives.
class OneMklThread {
 public:
  OneMklThread() {
    if (MKL_Set_Num_Threads_Local) before_ = MKL_Set_Num_Threads_Local(1);
  }
  ~OneMklThread() {
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(before_);
  }
  OneMklThread(const OneMklThread&) = delete;
  OneMklThread& operator=(const OneMklThread&) = delete;

 private:
  int before_ = 0;
};

}  // namespace

// MKL splits a product's inner dimension between threads where the output
// is small beside it (seen on Xeons: dx of an LSTM of 200 units over 51
// rows; dW over 2560 rows in float64), and which of its kernels it runs,
// and so the order of each sum, follows the product's shape: the same
// product cut into tiles narrower than 512 rows or columns gives other
// bits. So the output is cut by its shape alone, along its longer side,
// into tiles of about 1024 (an even number of them from 512 on, for two
// and four threads, at most 8), and each tile is one GEMM with MKL on one
// thread. Narrower tiles cost: one thread, 4096 x 8192 x 1024, tiles of
// 1024 0.96-1.06 of one call, of 512 1.05-1.09; 1024 x 8192 x 1024, tiles
// of 128 1.29-2.72. A GRU's W_hh gradient at hidden 256 (768 rows) in one
// tile took 15-18% longer on two threads than in the narrow tiles.
void product_cpu(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool add) {
  constexpr int64_t kTile = 1024, kTiles = 8;
  TORCH_INTERNAL_ASSERT(out.is_cpu() && out.dim() == 2 && a.dim() == 2 && b.dim() == 2 &&
                        a.size(0) == out.size(0) && b.size(1) == out.size(1) &&
                        a.size(1) == b.size(0));
  const bool by_rows = out.size(0) >= out.size(1);
  const int64_t extent = out.size(by_rows ? 0 : 1);
  const int64_t tiles =
      extent < kTile / 2 ? 1 : std::clamp<int64_t>((extent / kTile + 1) / 2 * 2, 2, kTiles);
  const int64_t size = (extent + tiles - 1) / tiles;
  // The views are made here: a thread of OpenMP's pool has none of this
  // thread's autograd state, and the tensors may require gradients.
  std::vector<std::array<at::Tensor, 3>> work;
  for (int64_t start = 0; start < extent; start += size) {
    const int64_t len = std::min(size, extent - start);
    work.push_back(by_rows ? std::array<at::Tensor, 3>{out.narrow(0, start, len),
                                                       a.narrow(0, start, len), b}
                           : std::array<at::Tensor, 3>{out.narrow(1, start, len), a,
                                                       b.narrow(1, start, len)});
  }
  const auto run = [&](int64_t i) {
    const OneMklThread one;
    auto& [o, x, y] = work[i];
    if (add) {
      at::cpu::addmm_(o, x, y);
    } else {
      at::cpu::mm_out(o, x, y);
    }
  };
  at::parallel_for(0, static_cast<int64_t>(work.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) run(i);
  });
}

}  // namespace fastrnn
