// See recurrence_cuda_paths.h.
#include "cuda/recurrence_cuda_paths.h"

#include <algorithm>

namespace fastrnn {
namespace cuda {
namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Calls fn(Cell{}, T{}) for the problem's cell and a storage type of its size.
template <typename Fn>
auto with_types(const Problem& pr, const Fn& fn) {
  return with_cell(pr.cell, [&](auto cell) {
    if (pr.elem_bytes == 8) return fn(cell, double{});
    if (pr.elem_bytes == 2) return fn(cell, __half{});
    return fn(cell, float{});
  });
}

// Chunks of the dot products a block's items compute: of P (forward) or of
// G*H (the backward's carry).
int64_t dot_chunks_of(const Problem& pr) {
  return with_types(pr, [&](auto cell, auto t) {
    using Cell = decltype(cell);
    using Wt = typename SmemWeightOf<decltype(t)>::type;
    return pr.forward ? row_stride<Wt>(pr.P) / chunk<Wt>()
                      : row_stride<Wt>(Cell::kGates * pr.H) / chunk<Wt>();
  });
}

// Whether the grid path should take a call in automatic mode. Its blocks
// are bound by shared-memory reads, at a quarter (one row a thread) to a
// half (tiles of four rows) of the multiprocessors' multiply-add rate, where
// cuBLAS runs near that rate but pays a few launches a step (a few
// microseconds), so past some multiply-adds a step the per-step GEMM wins.
// On an H200 (bench/gpu_check.sh's forced paths, float32, 512 steps,
// docs/h200/paths.json) the grid's forward against the step path's: 2^23 a
// step (RNN 1024, batch 8) 4.3 against 9.1 ms, 2^24 (LSTM 256, batch 64)
// 8.2 against 11.2, 2^25 (LSTM 1024, batch 8; the grid as the automatic
// choice ran it, forced it refuses the backward) 13.2 against 8.6, 2^26
// (RNN 1024, batch 64) 12.8 against 9.5: the crossing lies near 2^24.4, and
// the bound is 5 * 2^22.
bool grid_pays(const Problem& pr) {
  const int64_t G = with_cell(pr.cell, [](auto c) { return int64_t{decltype(c)::kGates}; });
  return pr.D * pr.N * G * pr.H * pr.P <= (int64_t(5) << 22);
}

Launch make_launch(const Problem& pr, Path path, int64_t rows, int64_t size, int64_t share) {
  Launch l{};
  l.path = path;
  int64_t split = 1, threads = kMaxThreads;
  block_shape(pr, path, rows, share, &split, &threads);
  l.grid_x = size * ceil_div(pr.N, rows);
  l.grid_y = pr.D;
  l.threads = threads;
  l.smem = smem_bytes(pr, path, rows, share);
  l.geometry = Geometry{rows, size, split};
  return l;
}

// The next number of rows a block that makes fewer blocks than `rows` does.
int64_t fewer_blocks(int64_t N, int64_t rows) {
  const int64_t blocks = ceil_div(N, rows);
  return blocks <= 1 ? N + 1 : ceil_div(N, blocks - 1);
}

bool persistent_launch(const DeviceModel& m, const Problem& pr, Launch* out) {
  for (int64_t rows = std::max<int64_t>(1, ceil_div(pr.D * pr.N, m.sms)); rows <= pr.N;
       rows = fewer_blocks(pr.N, rows)) {
    const Launch l = make_launch(pr, Path::persistent, rows, 1, pr.H);
    if (l.smem > m.smem_optin) return false;  // more rows only need more
    if (l.grid_x * l.grid_y <= m.blocks_per_sm(Path::persistent, pr.forward, l.threads, l.smem) * m.sms) {
      *out = l;
      return true;
    }
  }
  return false;
}

bool cluster_launch(const DeviceModel& m, const Problem& pr, int64_t blocks, Launch* out) {
  if (!m.clusters) return false;
  for (int64_t C = 2; C <= 8; C *= 2) {
    if (blocks > 0 && C != blocks) continue;
    const int64_t Hc = share_units(pr.H, C);
    for (int64_t rows = std::max<int64_t>(1, ceil_div(C * pr.D * pr.N, m.sms)); rows <= pr.N;
         rows = fewer_blocks(pr.N, rows)) {
      const Launch l = make_launch(pr, Path::cluster, rows, C, Hc);
      if (l.smem > m.smem_optin) break;
      if (l.grid_x / C * l.grid_y <= m.active_clusters(pr.forward, C, l.threads, l.smem)) {
        *out = l;
        return true;
      }
    }
  }
  return false;
}

// Among the group sizes whose groups all fit on the device at once (with an
// eighth of it to spare), the one whose blocks each run the fewest rounds of
// items a step, then the smallest, since every member adds to the barrier.
bool grid_launch(const DeviceModel& m, const Problem& pr, int64_t blocks, Launch* out) {
  if (!m.cooperative) return false;
  bool found = false;
  int64_t best_rounds = 0;
  for (int64_t G = 1; G * pr.D <= m.sms && G <= pr.H; ++G) {
    if (blocks > 0 && G != blocks) continue;
    if (owned_units(pr.H, G, G - 1) == 0) continue;
    // The barrier's counter reaches T * G, in 32 bits.
    if (pr.T * G >= (int64_t(1) << 31)) break;
    const int64_t Hc = share_units(pr.H, G);
    for (int64_t rows = std::max<int64_t>(1, ceil_div(G * pr.D * pr.N, m.sms)); rows <= pr.N;
         rows = fewer_blocks(pr.N, rows)) {
      const Launch l = make_launch(pr, Path::grid, rows, G, Hc);
      if (l.smem > m.smem_optin) break;
      const int64_t room = m.blocks_per_sm(Path::grid, pr.forward, l.threads, l.smem) * m.sms * 7 / 8;
      if (l.grid_x * l.grid_y > room) continue;
      const int64_t items = row_tiles(rows) * Hc;
      const int64_t rounds = ceil_div(items, l.threads / l.geometry.split);
      if (!found || rounds < best_rounds) {
        *out = l;
        best_rounds = rounds;
        found = true;
      }
      break;
    }
  }
  return found;
}

Launch step_launch(const Problem& pr) {
  Launch l{};
  l.path = Path::step;
  l.grid_x = ceil_div(pr.N * pr.H, kStepThreads);
  l.grid_y = pr.D;
  l.threads = kStepThreads;
  l.geometry = Geometry{0, 0, 1};
  return l;
}

}  // namespace

const char* path_name(Path p) {
  static const char* const names[] = {"auto", "persistent", "cluster", "grid", "step"};
  return names[static_cast<int>(p)];
}

int64_t smem_bytes(const Problem& pr, Path path, int64_t rows, int64_t share) {
  const int64_t buffers = path == Path::grid ? 1 : 2;
  return with_types(pr, [&](auto cell, auto t) {
    using L = SmemLayout<decltype(cell), decltype(t)>;
    return pr.forward ? L::forward(pr.H, pr.P, rows, share, buffers).bytes
                      : L::backward(pr.H, rows, share, buffers).bytes;
  });
}

void block_shape(const Problem& pr, Path path, int64_t rows, int64_t share, int64_t* split,
                 int64_t* threads) {
  const int64_t items = row_tiles(rows) * share, chunks = dot_chunks_of(pr);
  const int64_t limit = block_limit(pr.cell, pr.elem_bytes, path);
  // Lanes per item: while the block has threads to spare and each lane keeps
  // at least eight chunks of its dot products.
  int64_t s = 1;
  while (s < 32 && items * s * 2 <= limit && chunks >= 16 * s) s *= 2;
  *split = s;
  *threads = std::min(limit, std::max<int64_t>(32, ceil_div(items * s, 32) * 32));
}

DeviceModel emulated_device(CellKind cell, int64_t elem_bytes) {
  DeviceModel m;
  m.sms = 132;
  m.smem_optin = 227 * 1024;
  m.clusters = true;
  m.cooperative = true;
  // A thread's registers: what its kernel's bound leaves it, at most 255
  // (allocated as 256).
  const auto per_sm = [cell, elem_bytes](Path path, bool, int64_t threads, int64_t smem) {
    const int64_t regs = std::min<int64_t>(256, 65536 / block_limit(cell, elem_bytes, path));
    return std::min({int64_t{228 * 1024} / (smem + 1024), int64_t{2048} / threads,
                     int64_t{65536} / (threads * regs), int64_t{32}});
  };
  m.blocks_per_sm = per_sm;
  m.active_clusters = [per_sm](bool forward, int64_t size, int64_t threads, int64_t smem) {
    return 8 * (16 * per_sm(Path::cluster, forward, threads, smem) / size);
  };
  return m;
}

Choice choose_launch(const DeviceModel& m, const Problem& pr, Path forced, int64_t blocks) {
  const bool automatic = forced == Path::automatic;
  const std::string H = std::to_string(pr.H);
  Choice c{};
  if (pr.proj) {
    if (!automatic && forced != Path::step)
      c.error = std::string("fastrnn: the ") + path_name(forced) +
                " CUDA path was forced, but LSTM projections take the step path only";
    c.launch = step_launch(pr);
    return c;
  }
  Launch l{};
  if (automatic || forced == Path::persistent) {
    if (persistent_launch(m, pr, &l)) return Choice{l, ""};
    if (!automatic) {
      c.error = "fastrnn: the persistent CUDA path was forced, but W_hh of hidden size " + H +
                " does not fit in one block's shared memory in one wave of the device";
      return c;
    }
  }
  if (automatic || forced == Path::cluster) {
    if (cluster_launch(m, pr, blocks, &l)) return Choice{l, ""};
    if (!automatic) {
      c.error = "fastrnn: the cluster CUDA path was forced, but it needs sm_90 or newer and W_hh "
                "of hidden size " + H + " to fit in a cluster of " +
                std::to_string(blocks > 0 ? blocks : 8) + " blocks in one wave of the device";
      return c;
    }
  }
  if ((automatic && grid_pays(pr)) || forced == Path::grid) {
    if (grid_launch(m, pr, blocks, &l)) return Choice{l, ""};
    if (!automatic) {
      c.error = "fastrnn: the grid CUDA path was forced, but W_hh of hidden size " + H +
                " does not fit in the shared memory of " +
                (blocks > 0 ? std::to_string(blocks) + " blocks"
                            : std::string("the blocks this device can hold at once")) +
                " in " + std::to_string(pr.D) + " direction(s)";
      return c;
    }
  }
  c.launch = step_launch(pr);
  return c;
}

}  // namespace cuda
}  // namespace fastrnn
