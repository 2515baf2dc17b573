// The bodies of the CUDA time-loop kernels, written once for every cell and
// for two callers: the __global__ kernels in recurrence_cuda_kernels.cuh,
// and the emulator in recurrence_cuda_emulate.cpp, which runs the same code
// on CPU threads (one per CUDA thread) so that the tests check the kernels'
// indexing, shared-memory layout, synchronisation and the grid path's own
// barrier on machines without a GPU. The launch geometry every body assumes
// comes from one descriptor (recurrence_cuda_paths.h), used by the device
// launchers and the emulator alike.
//
// A body sees its block through `b`: b.tid and b.threads (threadIdx.x and
// blockDim.x), b.sync() (__syncthreads), b.sync_or(v) (__syncthreads_or:
// whether v held in any thread of the block), b.lane_sum(v, S) (the sum of v
// over the S lanes of an aligned group of a warp, by shuffles), b.spin()
// (once per turn of a wait loop).
// Cluster members also have b.rank,
// b.size, b.peer(q) (member q's shared memory) and b.cluster_sync(); grid
// group members b.rank, b.size and b.counter (their group's barrier
// counter), b.abort (the launch's abort flag) and b.timeout_ns.
#pragma once

#include <cstdint>

#include "cells.h"
#include "cuda/recurrence_cuda_barrier.h"
#include "cuda/recurrence_cuda_items.h"
#include "cuda/recurrence_cuda_layout.h"
#include "cuda/recurrence_cuda_memory.h"
#include "cuda/recurrence_cuda_types.h"
#include "recurrence_params.h"

namespace fastrnn {
namespace cuda {

// ---------------------------------------------------------------------------
// Persistent path: block (bx, d) owns batch rows [bx * rows, ...) of
// direction d and all H units; all T steps; W_hh and the rows' state in
// shared memory; blocks never wait for each other.

template <typename Cell, typename T, class Block>
FASTRNN_HD void forward_persistent_body(const ForwardParams<T>& p, const Geometry& g, int64_t bx,
                                        int64_t d, unsigned char* smem, const Block& b) {
  using A = typename AccOf<T>::type;
  using Wt = typename SmemWeightOf<T>::type;
  const int64_t T_ = p.T, H = p.H;
  const auto l = SmemLayout<Cell, T>::forward(H, p.P, g.rows, H, 2);
  const int64_t n0 = bx * g.rows, R = rows_in_block(n0, g.rows, p.N);
  Wt* w = reinterpret_cast<Wt*>(smem + l.w);       // (G*H, Wst): rows of W_hh
  A* state = reinterpret_cast<A*>(smem + l.state);  // (2, rows, Ss)
  A* cs = reinterpret_cast<A*>(smem + l.cs);        // (rows, H)
  const Items it{R, H, g.split};
  zero_fill(w, Cell::kGates * H * l.Wst, b);
  zero_fill(state, 2 * g.rows * l.Ss, b);
  b.sync();
  load_matrix(p.w_hh[d], p.P, 0, Cell::kGates * H, 0, p.P, false, w, l.Wst, b);
  load_initial_state<Cell>(p, d, n0, R, state, l.Ss, cs, H, 0, H, b);
  UnitInputs<A, Cell> ahead;
  first_inputs<Cell>(p, d == 0 ? 0 : T_ - 1, d, n0, it, 0, ahead, b);
  b.sync();
  for (int64_t s = 0; s < T_; ++s) {
    const int64_t t = d == 0 ? s : T_ - 1 - s;
    const int64_t t_next = s + 1 < T_ ? (d == 0 ? s + 1 : T_ - 2 - s) : -1;
    const A* prev = state + (s & 1) * g.rows * l.Ss;
    A* next = state + ((s + 1) & 1) * g.rows * l.Ss;
    forward_items<Cell>(p, t, d, n0, it, 0, H, w, l.Wst, prev, l.Ss, cs, H, ahead, t_next, b,
                        [&](int64_t r, int64_t j, A v) { next[r * l.Ss + j] = v; });
    b.sync();
  }
  store_final_state<Cell>(p, d, n0, R, state + (T_ & 1) * g.rows * l.Ss, l.Ss, cs, H, 0, H, b);
}

template <typename Cell, typename T, class Block>
FASTRNN_HD void backward_persistent_body(const BackwardParams<T>& p, const Geometry& g,
                                         int64_t bx, int64_t d, unsigned char* smem,
                                         const Block& b) {
  using A = typename AccOf<T>::type;
  using Wt = typename SmemWeightOf<T>::type;
  const int64_t T_ = p.T, H = p.H, GH = Cell::kGates * H;
  const auto l = SmemLayout<Cell, T>::backward(H, g.rows, H, 2);
  const int64_t n0 = bx * g.rows, R = rows_in_block(n0, g.rows, p.N);
  Wt* wt = reinterpret_cast<Wt*>(smem + l.wt);  // (H, Mst): wt[k][m] = W_hh[m][k]
  A* z = reinterpret_cast<A*>(smem + l.z);      // (2, rows, Ms): dgh of the step
  A* dh = reinterpret_cast<A*>(smem + l.dh);    // (rows, H)
  A* dc = reinterpret_cast<A*>(smem + l.dc);    // (rows, H)
  const Items it{R, H, g.split};
  const auto time = [&](int64_t s) { return d == 0 ? T_ - 1 - s : s; };
  zero_fill(wt, H * l.Mst, b);
  zero_fill(z, 2 * g.rows * l.Ms, b);
  b.sync();
  load_matrix(p.w_hh[d], p.P, 0, GH, 0, p.P, true, wt, l.Mst, b);
  load_final_grads<Cell>(p, d, n0, it, 0, dh, H, dc, H, b);
  GradInputs<A, Cell> ahead;
  load_grad_inputs<Cell>(p, time(0), d, n0, item_of(it, 0, b), 0, ahead);
  b.sync();
  for (int64_t s = 0; s < T_; ++s) {
    const int64_t t = time(s);
    A* zs = z + (s & 1) * g.rows * l.Ms;
    dz_items<Cell>(p, t, d, n0, it, 0, dh, H, dc, H, ahead, s + 1 < T_ ? time(s + 1) : -1, b,
                   [&](int64_t r, int64_t m, A v) { zs[r * l.Ms + m] = v; });
    b.sync();
    carry_items(p.lengths, t, n0, it, zs, l.Ms, wt, l.Mst, dh, H, b);
  }
  store_initial_grads<Cell>(p, d, n0, it, 0, dh, H, dc, H, b);
}

// ---------------------------------------------------------------------------
// Cluster path (sm_90): W_hh too large for one block's shared memory is
// split by units between the `size` blocks of a thread-block cluster.
// Member q owns units [q * Hc, ...) (owned_units); every member keeps a full
// copy of its rows' state (forward) or dz (backward), and writes each value
// it computes into every member's copy through distributed shared memory;
// one cluster barrier a step makes the next buffer complete everywhere.

template <typename Cell, typename T, class Block>
FASTRNN_HD void forward_cluster_body(const ForwardParams<T>& p, const Geometry& g, int64_t grp,
                                     int64_t d, unsigned char* smem, const Block& b) {
  using A = typename AccOf<T>::type;
  using Wt = typename SmemWeightOf<T>::type;
  const int64_t T_ = p.T, H = p.H, Hc = share_units(H, b.size);
  const int64_t j0 = b.rank * Hc, nj = owned_units(H, b.size, b.rank);
  const auto l = SmemLayout<Cell, T>::forward(H, p.P, g.rows, Hc, 2);
  const int64_t n0 = grp * g.rows, R = rows_in_block(n0, g.rows, p.N);
  Wt* w = reinterpret_cast<Wt*>(smem + l.w);       // (G*Hc, Wst)
  A* state = reinterpret_cast<A*>(smem + l.state);  // (2, rows, Ss), the same offset in every member
  A* cs = reinterpret_cast<A*>(smem + l.cs);        // (rows, Hc)
  const Items it{R, nj, g.split};
  zero_fill(w, Cell::kGates * Hc * l.Wst, b);
  zero_fill(state, 2 * g.rows * l.Ss, b);
  b.sync();
  for (int gate = 0; gate < Cell::kGates; ++gate)
    load_matrix(p.w_hh[d], p.P, gate * H + j0, nj, 0, p.P, false, w + gate * Hc * l.Wst, l.Wst, b);
  load_initial_state<Cell>(p, d, n0, R, state, l.Ss, cs, Hc, j0, nj, b);
  UnitInputs<A, Cell> ahead;
  first_inputs<Cell>(p, d == 0 ? 0 : T_ - 1, d, n0, it, j0, ahead, b);
  b.cluster_sync();  // every member started and initialised before any peer writes
  for (int64_t s = 0; s < T_; ++s) {
    const int64_t t = d == 0 ? s : T_ - 1 - s;
    const int64_t t_next = s + 1 < T_ ? (d == 0 ? s + 1 : T_ - 2 - s) : -1;
    const A* prev = state + (s & 1) * g.rows * l.Ss;
    const int64_t next = l.state + ((s + 1) & 1) * g.rows * l.Ss * static_cast<int64_t>(sizeof(A));
    forward_items<Cell>(p, t, d, n0, it, j0, Hc, w, l.Wst, prev, l.Ss, cs, Hc, ahead, t_next, b,
                        [&](int64_t r, int64_t j, A v) {
                          for (int64_t m = 0; m < b.size; ++m)
                            reinterpret_cast<A*>(b.peer(m) + next)[r * l.Ss + j] = v;
                        });
    b.cluster_sync();
  }
  store_final_state<Cell>(p, d, n0, R, state + (T_ & 1) * g.rows * l.Ss, l.Ss, cs, Hc, j0, nj, b);
}

template <typename Cell, typename T, class Block>
FASTRNN_HD void backward_cluster_body(const BackwardParams<T>& p, const Geometry& g, int64_t grp,
                                      int64_t d, unsigned char* smem, const Block& b) {
  using A = typename AccOf<T>::type;
  using Wt = typename SmemWeightOf<T>::type;
  const int64_t T_ = p.T, H = p.H, GH = Cell::kGates * H, Hc = share_units(H, b.size);
  const int64_t k0 = b.rank * Hc, nk = owned_units(H, b.size, b.rank);
  const auto l = SmemLayout<Cell, T>::backward(H, g.rows, Hc, 2);
  const int64_t n0 = grp * g.rows, R = rows_in_block(n0, g.rows, p.N);
  Wt* wt = reinterpret_cast<Wt*>(smem + l.wt);  // (Hc, Mst): wt[c][m] = W_hh[m][k0 + c]
  A* dh = reinterpret_cast<A*>(smem + l.dh);    // (rows, Hc)
  A* dc = reinterpret_cast<A*>(smem + l.dc);    // (rows, Hc)
  const Items it{R, nk, g.split};
  const auto time = [&](int64_t s) { return d == 0 ? T_ - 1 - s : s; };
  zero_fill(wt, Hc * l.Mst, b);
  zero_fill(reinterpret_cast<A*>(smem + l.z), 2 * g.rows * l.Ms, b);
  b.sync();
  load_matrix(p.w_hh[d], p.P, 0, GH, k0, nk, true, wt, l.Mst, b);
  load_final_grads<Cell>(p, d, n0, it, k0, dh, Hc, dc, Hc, b);
  GradInputs<A, Cell> ahead;
  load_grad_inputs<Cell>(p, time(0), d, n0, item_of(it, 0, b), k0, ahead);
  b.cluster_sync();
  for (int64_t s = 0; s < T_; ++s) {
    const int64_t t = time(s);
    const int64_t buf = l.z + (s & 1) * g.rows * l.Ms * static_cast<int64_t>(sizeof(A));
    dz_items<Cell>(p, t, d, n0, it, k0, dh, Hc, dc, Hc, ahead, s + 1 < T_ ? time(s + 1) : -1, b,
                   [&](int64_t r, int64_t m, A v) {
                     for (int64_t q = 0; q < b.size; ++q)
                       reinterpret_cast<A*>(b.peer(q) + buf)[r * l.Ms + m] = v;
                   });
    b.cluster_sync();
    carry_items(p.lengths, t, n0, it, reinterpret_cast<const A*>(smem + buf), l.Ms, wt, l.Mst,
                dh, Hc, b);
  }
  store_initial_grads<Cell>(p, d, n0, it, k0, dh, Hc, dc, Hc, b);
}

// ---------------------------------------------------------------------------
// Grid path: W_hh too large for one cluster's shared memory, or a device
// without clusters. W_hh is split by units between the `size` blocks of a
// group, placed anywhere on the device and all resident at once (a
// cooperative launch guarantees it; a block that waited for a
// multiprocessor held by its own group would never start). Each step the
// members publish their units of the new state (forward) or of dz
// (backward) in an exchange buffer in global memory, (2, D, N, S) in A with
// rows padded like shared memory's and double-buffered by the parity of the
// step, then meet at the group's flag barrier (group_barrier), which also
// orders the writes before it against the reads after it. Each member then
// copies the buffer's rows into its shared memory, 16 bytes at a time.
//
// Why one barrier a step is enough: a member rewrites a buffer two steps
// after it was filled, past a barrier that every member reaches only once it
// has copied that buffer into its shared memory.

template <typename Cell, typename T, class Block>
FASTRNN_HD void forward_grid_body(const ForwardParams<T>& p, const Geometry& g, int64_t grp,
                                  int64_t d, typename AccOf<T>::type* exchange,
                                  unsigned char* smem, const Block& b) {
  using A = typename AccOf<T>::type;
  using Wt = typename SmemWeightOf<T>::type;
  const int64_t T_ = p.T, H = p.H, Hc = share_units(H, b.size);
  const int64_t j0 = b.rank * Hc, nj = owned_units(H, b.size, b.rank);
  const auto l = SmemLayout<Cell, T>::forward(H, p.P, g.rows, Hc, 1);
  const int64_t n0 = grp * g.rows, R = rows_in_block(n0, g.rows, p.N);
  const int64_t buffer = p.D * p.N * l.Ss, rows0 = (d * p.N + n0) * l.Ss;  // a buffer; our rows in one
  Wt* w = reinterpret_cast<Wt*>(smem + l.w);       // (G*Hc, Wst)
  A* state = reinterpret_cast<A*>(smem + l.state);  // (rows, Ss): h of the previous step
  A* cs = reinterpret_cast<A*>(smem + l.cs);        // (rows, Hc)
  const Items it{R, nj, g.split};
  zero_fill(w, Cell::kGates * Hc * l.Wst, b);
  b.sync();
  for (int gate = 0; gate < Cell::kGates; ++gate)
    load_matrix(p.w_hh[d], p.P, gate * H + j0, nj, 0, p.P, false, w + gate * Hc * l.Wst, l.Wst, b);
  load_initial_state<Cell>(p, d, n0, R, state, l.Ss, cs, Hc, j0, nj, b);
  UnitInputs<A, Cell> ahead;
  first_inputs<Cell>(p, d == 0 ? 0 : T_ - 1, d, n0, it, j0, ahead, b);
  for (int64_t s = 0; s < T_; ++s) {
    const int64_t t = d == 0 ? s : T_ - 1 - s;
    const int64_t t_next = s + 1 < T_ ? (d == 0 ? s + 1 : T_ - 2 - s) : -1;
    if (s > 0) gather_rows(exchange + ((s + 1) & 1) * buffer + rows0, state, R, l.Ss, b);
    b.sync();
    A* next = exchange + (s & 1) * buffer + rows0;
    forward_items<Cell>(p, t, d, n0, it, j0, Hc, w, l.Wst, state, l.Ss, cs, Hc, ahead, t_next, b,
                        [&](int64_t r, int64_t j, A v) { next[r * l.Ss + j] = v; });
    if (!group_barrier(b, s)) return;
  }
  gather_rows(exchange + ((T_ - 1) & 1) * buffer + rows0, state, R, l.Ss, b);
  b.sync();
  store_final_state<Cell>(p, d, n0, R, state, l.Ss, cs, Hc, j0, nj, b);
}

template <typename Cell, typename T, class Block>
FASTRNN_HD void backward_grid_body(const BackwardParams<T>& p, const Geometry& g, int64_t grp,
                                   int64_t d, typename AccOf<T>::type* exchange,
                                   unsigned char* smem, const Block& b) {
  using A = typename AccOf<T>::type;
  using Wt = typename SmemWeightOf<T>::type;
  const int64_t T_ = p.T, H = p.H, GH = Cell::kGates * H, Hc = share_units(H, b.size);
  const int64_t k0 = b.rank * Hc, nk = owned_units(H, b.size, b.rank);
  const auto l = SmemLayout<Cell, T>::backward(H, g.rows, Hc, 1);
  const int64_t n0 = grp * g.rows, R = rows_in_block(n0, g.rows, p.N);
  const int64_t buffer = p.D * p.N * l.Ms, rows0 = (d * p.N + n0) * l.Ms;
  Wt* wt = reinterpret_cast<Wt*>(smem + l.wt);  // (Hc, Mst)
  A* z = reinterpret_cast<A*>(smem + l.z);      // (rows, Ms): dgh of the step, every gate and unit
  A* dh = reinterpret_cast<A*>(smem + l.dh);    // (rows, Hc)
  A* dc = reinterpret_cast<A*>(smem + l.dc);    // (rows, Hc)
  const Items it{R, nk, g.split};
  const auto time = [&](int64_t s) { return d == 0 ? T_ - 1 - s : s; };
  zero_fill(wt, Hc * l.Mst, b);
  b.sync();
  load_matrix(p.w_hh[d], p.P, 0, GH, k0, nk, true, wt, l.Mst, b);
  load_final_grads<Cell>(p, d, n0, it, k0, dh, Hc, dc, Hc, b);
  GradInputs<A, Cell> ahead;
  load_grad_inputs<Cell>(p, time(0), d, n0, item_of(it, 0, b), k0, ahead);
  b.sync();
  for (int64_t s = 0; s < T_; ++s) {
    const int64_t t = time(s);
    A* mine = exchange + (s & 1) * buffer + rows0;
    dz_items<Cell>(p, t, d, n0, it, k0, dh, Hc, dc, Hc, ahead, s + 1 < T_ ? time(s + 1) : -1, b,
                   [&](int64_t r, int64_t m, A v) { mine[r * l.Ms + m] = v; });
    if (!group_barrier(b, s)) return;
    gather_rows(mine, z, R, l.Ms, b);
    b.sync();
    carry_items(p.lengths, t, n0, it, z, l.Ms, wt, l.Mst, dh, Hc, b);
  }
  store_initial_grads<Cell>(p, d, n0, it, k0, dh, Hc, dc, Hc, b);
}

// The path bodies by the params they take: the forward's or the backward's.
template <typename Cell, typename T, class Block>
FASTRNN_HD void persistent_body(const ForwardParams<T>& p, const Geometry& g, int64_t bx,
                                int64_t d, unsigned char* smem, const Block& b) {
  forward_persistent_body<Cell>(p, g, bx, d, smem, b);
}
template <typename Cell, typename T, class Block>
FASTRNN_HD void persistent_body(const BackwardParams<T>& p, const Geometry& g, int64_t bx,
                                int64_t d, unsigned char* smem, const Block& b) {
  backward_persistent_body<Cell>(p, g, bx, d, smem, b);
}
template <typename Cell, typename T, class Block>
FASTRNN_HD void cluster_body(const ForwardParams<T>& p, const Geometry& g, int64_t grp,
                             int64_t d, unsigned char* smem, const Block& b) {
  forward_cluster_body<Cell>(p, g, grp, d, smem, b);
}
template <typename Cell, typename T, class Block>
FASTRNN_HD void cluster_body(const BackwardParams<T>& p, const Geometry& g, int64_t grp,
                             int64_t d, unsigned char* smem, const Block& b) {
  backward_cluster_body<Cell>(p, g, grp, d, smem, b);
}
template <typename Cell, typename T, class Block>
FASTRNN_HD void grid_body(const ForwardParams<T>& p, const Geometry& g, int64_t grp, int64_t d,
                          typename AccOf<T>::type* exchange, unsigned char* smem, const Block& b) {
  forward_grid_body<Cell>(p, g, grp, d, exchange, smem, b);
}
template <typename Cell, typename T, class Block>
FASTRNN_HD void grid_body(const BackwardParams<T>& p, const Geometry& g, int64_t grp, int64_t d,
                          typename AccOf<T>::type* exchange, unsigned char* smem, const Block& b) {
  backward_grid_body<Cell>(p, g, grp, d, exchange, smem, b);
}

}  // namespace cuda
}  // namespace fastrnn
