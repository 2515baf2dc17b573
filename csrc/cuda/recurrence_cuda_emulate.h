// The CUDA kernels' emulator (recurrence_cuda_kernels.h): the kernel bodies
// of recurrence_cuda_bodies.h run on CPU threads, one std::thread per CUDA
// thread, on exactly the launch that the device would get. For the tests
// only: it checks the kernels' indexing, shared-memory layout,
// synchronisation and the grid barrier's own code where no GPU is present,
// not their speed nor anything else the hardware adds.
//
// Included by one file per storage type (recurrence_cuda_emulate_*.cpp),
// each instantiating Emulator for every cell, so that they compile in
// parallel.
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "cuda/recurrence_cuda_kernels.h"

namespace fastrnn {
namespace cuda {
namespace emulation {

// set_emulator_blocks's value (recurrence_cuda_emulate.cpp).
extern std::atomic<int64_t> wave_blocks_forced;

// Threads the emulator runs at once, about: whole clusters and groups, as
// many as fit.
constexpr int64_t kThreadBudget = 1024;

// Thrown in a thread whose launch another thread stopped.
struct Stopped {};

// What every thread of one wave shares: whether it was stopped, and why.
struct LaunchState {
  std::atomic<bool> stopped{false};
  std::mutex mu;
  std::string error;
  std::vector<std::function<void()>> wake;  // wakes every barrier's waiters

  void stop(const std::string& why) {
    {
      std::lock_guard<std::mutex> lock(mu);
      if (error.empty()) error = why;
    }
    stopped.store(true);
    for (auto& w : wake) w();
  }
};

class Barrier {
 public:
  Barrier(int64_t count, LaunchState* st) : count_(count), st_(st) {}
  void wait() {
    std::unique_lock<std::mutex> lock(mu_);
    if (st_->stopped.load()) throw Stopped{};
    const int64_t gen = generation_;
    if (++arrived_ == count_) {
      arrived_ = 0;
      ++generation_;
      cv_.notify_all();
    } else {
      cv_.wait(lock, [&] { return generation_ != gen || st_->stopped.load(); });
      if (generation_ == gen) throw Stopped{};
    }
  }
  // wait(), and whether v held in any of the waiting threads.
  bool wait_or(bool v) {
    std::unique_lock<std::mutex> lock(mu_);
    if (st_->stopped.load()) throw Stopped{};
    const int64_t gen = generation_;
    any_ = any_ || v;
    if (++arrived_ == count_) {
      arrived_ = 0;
      result_ = any_;
      any_ = false;
      ++generation_;
      cv_.notify_all();
    } else {
      cv_.wait(lock, [&] { return generation_ != gen || st_->stopped.load(); });
      if (generation_ == gen) throw Stopped{};
    }
    // No thread can end the next generation before this one has read it.
    return result_;
  }
  void wake() {
    std::lock_guard<std::mutex> lock(mu_);
    cv_.notify_all();
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  const int64_t count_;
  LaunchState* st_;
  int64_t arrived_ = 0;
  int64_t generation_ = 0;
  bool any_ = false, result_ = false;
};

// The 32 lanes of a warp, for shuffles: each lane posts its value, all meet,
// each reads its partner's, all meet again.
struct Warp {
  explicit Warp(LaunchState* st) : barrier(32, st) {}
  Barrier barrier;
  double slots[32];
};

// One block's shared memory (NaN: a read of shared memory never written
// shows in the results), its barrier and its warps.
struct BlockState {
  BlockState(int64_t threads, int64_t smem_bytes, LaunchState* st)
      : smem((smem_bytes + 7) / 8), barrier(threads, st) {
    std::memset(smem.data(), 0xff, smem.size() * sizeof(double));
    for (int64_t w = 0; w < threads / 32; ++w) warps.emplace_back(st);
  }
  unsigned char* shared() { return reinterpret_cast<unsigned char*>(smem.data()); }
  std::vector<double> smem;
  Barrier barrier;
  std::deque<Warp> warps;
};

struct HostBlock {
  int64_t tid, threads;
  BlockState* state;
  LaunchState* st;
  void sync() const { state->barrier.wait(); }
  bool sync_or(bool v) const { return state->barrier.wait_or(v); }
  template <typename A>
  A lane_sum(A v, int64_t lanes) const {
    if (lanes == 1) return v;
    Warp& w = state->warps[tid / 32];
    const int64_t lane = tid % 32;
    for (int64_t o = lanes / 2; o > 0; o /= 2) {
      w.slots[lane] = static_cast<double>(v);
      w.barrier.wait();
      v += static_cast<A>(w.slots[lane ^ o]);
      w.barrier.wait();
    }
    return v;
  }
  void spin() const {
    if (st->stopped.load()) throw Stopped{};
    std::this_thread::yield();
  }
};

struct HostClusterBlock : HostBlock {
  int64_t rank, size;
  const std::vector<unsigned char*>* members;
  Barrier* cluster;
  unsigned char* peer(int64_t q) const { return (*members)[q]; }
  void cluster_sync() const { cluster->wait(); }
};

struct HostGridBlock : HostBlock {
  int64_t rank, size;
  unsigned int *counter, *abort;
  int64_t timeout_ns;
};

// Where a thread of a wave runs: its block (bx, by), the block's rank q in
// its group of `size` and the group's first block in the wave, and the
// wave's shared pieces.
struct Where {
  int64_t bx, by, q, tid;
  BlockState* block;
  const std::vector<unsigned char*>* group_smem;  // the shared memory of the group's blocks
  Barrier* group;                                 // a barrier over the group's threads
  LaunchState* st;
};

// Runs run(where) for every thread of the launch l: groups of `size`
// consecutive blocks along x (1: independent blocks), every block of a
// group at once, in waves of whole groups within the thread budget; for the
// grid path, waves of set_emulator_blocks blocks where that is set, which
// may split a group.
template <typename Run>
void run_launch(const Launch& l, int64_t size, bool grid, const Run& run) {
  std::vector<std::pair<int64_t, int64_t>> blocks;  // (bx, by), group by group
  for (int64_t by = 0; by < l.grid_y; ++by)
    for (int64_t bx = 0; bx < l.grid_x; ++bx) blocks.emplace_back(bx, by);
  const int64_t forced = wave_blocks_forced.load();
  const int64_t wave = grid && forced > 0
                           ? forced
                           : size * std::max<int64_t>(1, kThreadBudget / (size * l.threads));
  for (size_t first = 0; first < blocks.size(); first += wave) {
    const size_t last = std::min(blocks.size(), first + static_cast<size_t>(wave));
    LaunchState st;
    std::deque<BlockState> states;
    for (size_t i = first; i < last; ++i) states.emplace_back(l.threads, l.smem, &st);
    // Per group in the wave (or its part in the wave): its blocks' shared
    // memory and a barrier over all their threads.
    std::vector<std::vector<unsigned char*>> group_smem;
    std::deque<Barrier> groups;
    std::vector<int64_t> group_of(last - first);
    for (size_t i = first; i < last; ++i) {
      const bool starts = i == first || blocks[i].first % size == 0;
      if (starts) {
        group_smem.emplace_back();
        int64_t members = 0;
        for (size_t j = i; j < last && (j == i || blocks[j].first % size != 0); ++j) ++members;
        groups.emplace_back(members * l.threads, &st);
      }
      group_of[i - first] = static_cast<int64_t>(group_smem.size()) - 1;
      group_smem.back().push_back(states[i - first].shared());
    }
    for (auto& b : states) {
      st.wake.push_back([p = &b.barrier] { p->wake(); });
      for (auto& w : b.warps) st.wake.push_back([p = &w.barrier] { p->wake(); });
    }
    for (auto& g : groups) st.wake.push_back([p = &g] { p->wake(); });
    std::vector<std::thread> pool;
    pool.reserve((last - first) * l.threads);
    for (size_t i = first; i < last; ++i) {
      const int64_t k = i - first;
      for (int64_t tid = 0; tid < l.threads; ++tid) {
        const Where w{blocks[i].first, blocks[i].second, blocks[i].first % size, tid, &states[k],
                      &group_smem[group_of[k]], &groups[group_of[k]], &st};
        pool.emplace_back([&run, w, &st] {
          try {
            run(w);
          } catch (const Stopped&) {
          } catch (const std::exception& e) {
            st.stop(e.what());
          }
        });
      }
    }
    for (auto& t : pool) t.join();
    if (!st.error.empty()) throw std::runtime_error(st.error);
  }
}

template <typename Cell, typename Params, typename A>
void emulate(const Launch& l, const Params& p, const GridScratch<A>& grid) {
  const Geometry g = l.geometry;
  switch (l.path) {
    case Path::persistent:
      run_launch(l, 1, false, [&](const Where& w) {
        persistent_body<Cell>(p, g, w.bx, w.by, w.block->shared(),
                              HostBlock{w.tid, l.threads, w.block, w.st});
      });
      return;
    case Path::cluster:
      run_launch(l, g.size, false, [&](const Where& w) {
        cluster_body<Cell>(p, g, w.bx / g.size, w.by, w.block->shared(),
                           HostClusterBlock{{w.tid, l.threads, w.block, w.st}, w.q, g.size,
                                            w.group_smem, w.group});
      });
      return;
    case Path::grid: {
      const int64_t groups = l.grid_x / g.size;
      run_launch(l, g.size, true, [&](const Where& w) {
        const int64_t grp = w.bx / g.size;
        grid_body<Cell>(p, g, grp, w.by, grid.exchange, w.block->shared(),
                        HostGridBlock{{w.tid, l.threads, w.block, w.st}, w.q, g.size,
                                      grid.counters + w.by * groups + grp,
                                      grid.abort, grid.timeout_ns});
      });
      return;
    }
    default:
      throw std::runtime_error("fastrnn: the step path has no single kernel to emulate");
  }
}

template <typename Fn>
void for_each_element(int64_t D, int64_t count, const Fn& fn) {
  for (int64_t d = 0; d < D; ++d)
    for (int64_t i = 0; i < count; ++i) fn(d, i);
}

}  // namespace emulation

template <typename Cell, typename T>
void Emulator<Cell, T>::run(const Launch& l, const ForwardParams<T>& p, const GridScratch<A>& grid) {
  emulation::emulate<Cell>(l, p, grid);
}

template <typename Cell, typename T>
void Emulator<Cell, T>::run(const Launch& l, const BackwardParams<T>& p, const GridScratch<A>& grid) {
  emulation::emulate<Cell>(l, p, grid);
}

template <typename Cell, typename T>
void Emulator<Cell, T>::forward_step(const ForwardParams<T>& p, int64_t s, const A* hw, A* h,
                                     A* c, A* m) {
  emulation::for_each_element(p.D, p.N * p.H, [&](int64_t d, int64_t i) {
    forward_step_body<Cell>(p, s, hw, h, c, m, d, i);
  });
}

template <typename Cell, typename T>
void Emulator<Cell, T>::project_step(const ForwardParams<T>& p, int64_t s, const A* hp, A* h) {
  emulation::for_each_element(p.D, p.N * p.P, [&](int64_t d, int64_t i) {
    project_step_body(p, s, hp, h, d, i);
  });
}

template <typename Cell, typename T>
void Emulator<Cell, T>::unproject_step(const BackwardParams<T>& p, int64_t s, const A* dh,
                                       A* gp) {
  emulation::for_each_element(p.D, p.N * p.P, [&](int64_t d, int64_t i) {
    unproject_step_body(p, s, dh, gp, d, i);
  });
}

template <typename Cell, typename T>
void Emulator<Cell, T>::backward_step(const BackwardParams<T>& p, int64_t s, const A* dh,
                                      const A* gm, A* z, A* dc, A* dhd) {
  emulation::for_each_element(p.D, p.N * p.H, [&](int64_t d, int64_t i) {
    backward_step_body<Cell>(p, s, dh, gm, z, dc, dhd, d, i);
  });
}

template <typename Cell, typename T>
void Emulator<Cell, T>::carry_step(const BackwardParams<T>& p, int64_t s, const A* dzw,
                                   const A* dhd, A* dh) {
  emulation::for_each_element(p.D, p.N * p.P, [&](int64_t d, int64_t i) {
    carry_step_body<Cell>(p, s, dzw, dhd, dh, d, i);
  });
}

#define FASTRNN_INSTANTIATE_EMULATOR(Cell, T) template struct Emulator<Cell, T>;

}  // namespace cuda
}  // namespace fastrnn
