// The work of a block of the single-kernel paths, shared by all three: work
// items (a tile of rows and one unit), the dot products of a tile, and each
// step's forward and backward on the items of a block's share, with the
// loads of initial states and stores of final ones.
#pragma once

#include <cstdint>

#include "cells.h"
#include "cuda/recurrence_cuda_layout.h"
#include "cuda/recurrence_cuda_memory.h"
#include "cuda/recurrence_cuda_types.h"
#include "recurrence_params.h"

namespace fastrnn {
namespace cuda {

// Partial dot products of the nr rows of x (stride xs, A) with one weight
// row w (Wt), over the chunks first, first + step, ... below chunks. Added
// to out[q] for q < nr.
template <typename A, typename Wt>
FASTRNN_HD void dot_chunks(const A* x, int64_t xs, int64_t nr, const Wt* w, int64_t chunks,
                           int64_t first, int64_t step, A (&out)[kRowTile]) {
  constexpr int64_t CE = chunk<Wt>();
  A acc[kRowTile][CE];
  FASTRNN_UNROLL
  for (int q = 0; q < kRowTile; ++q)
    FASTRNN_UNROLL
    for (int64_t l = 0; l < CE; ++l) acc[q][l] = A(0);
  for (int64_t ch = first; ch < chunks; ch += step) {
    A wv[CE];
    load_weights<A>(w + ch * CE, wv);
    FASTRNN_UNROLL
    for (int q = 0; q < kRowTile; ++q) {
      if (q >= nr) break;
      A xv[CE];
      load_state<A, CE>(x + q * xs + ch * CE, xv);
      FASTRNN_UNROLL
      for (int64_t l = 0; l < CE; ++l) acc[q][l] += xv[l] * wv[l];
    }
  }
  FASTRNN_UNROLL
  for (int q = 0; q < kRowTile; ++q) {
    A sum = acc[q][0];
    FASTRNN_UNROLL
    for (int64_t l = 1; l < CE; ++l) sum += acc[q][l];
    out[q] += sum;
  }
}

// ---------------------------------------------------------------------------
// Work of a block. An item is a tile of up to kRowTile rows and one unit (or
// column) of the block's share; `split` lanes of a warp share an item,
// splitting its dot products by chunks and adding their parts with
// b.lane_sum. Every thread runs the same number of rounds (lanes past the
// last item too), so that every lane of a warp reaches every shuffle. The
// lane 0 of an item's group owns it: it alone writes what the item computes,
// in every loop of a kernel, so the elements an item owns need no barrier
// from one step to the next.
struct Items {
  int64_t R;      // rows of the block
  int64_t units;  // units (columns) of the block's share
  int64_t split;  // lanes per item
  FASTRNN_HD int64_t count() const { return row_tiles(R) * units; }
  template <class Block>
  FASTRNN_HD int64_t groups(const Block& b) const { return b.threads / split; }
  template <class Block>
  FASTRNN_HD int64_t rounds(const Block& b) const {
    return (count() + groups(b) - 1) / groups(b);
  }
};

struct Item {
  bool valid;
  int64_t r0, nr, c;  // first row, rows, unit of the share
  int64_t lane;       // lane within the item's group
};

template <class Block>
FASTRNN_HD Item item_of(const Items& it, int64_t round, const Block& b) {
  const int64_t i = round * it.groups(b) + b.tid / it.split;
  Item x;
  x.lane = b.tid - (b.tid / it.split) * it.split;
  x.valid = i < it.count();  // never for a member without units (units 0)
  const DivMod tc = divmod(x.valid ? i : 0, it.units > 0 ? it.units : 1);
  x.r0 = tc.q * kRowTile;
  x.c = tc.r;
  x.nr = tile_rows(x.r0, it.R);
  return x;
}

// ---------------------------------------------------------------------------
// The forward of the persistent, cluster and grid paths. A block owns rows
// [n0, n0 + R) of direction d and the units [j0, j0 + nj) of its share (all
// H of them on the persistent path); w holds, for each gate g and each unit
// c of the share, the row W_hh[g*H + j0 + c] (stride Wst: row g * nj_stride
// + c); state (R, Ss) holds h of the previous step, every unit; cs (R, csw)
// the share's cell states (kCellState). publish(r, j, v) hands on the new
// state of unit j of row r.

template <typename A, typename Cell>
struct UnitInputs {
  A u[Cell::kGates][kRowTile];
};

// What the cell adds to the input term of gate g, unit j: b_ih, and b_hh
// unless the cell keeps it apart (kHiddenBias); zero without biases.
template <typename Cell, typename T>
FASTRNN_HD typename AccOf<T>::type input_bias(const ForwardParams<T>& p, int64_t d, int64_t m) {
  using A = typename AccOf<T>::type;
  if (p.b_ih[d] == nullptr) return A(0);
  return Cell::kHiddenBias ? to_acc(p.b_ih[d][m]) : to_acc(p.b_ih[d][m]) + to_acc(p.b_hh[d][m]);
}

// b_hh of gate g, unit j, for the kHiddenBias cells (zero for the others).
template <typename Cell, typename T>
FASTRNN_HD typename AccOf<T>::type hidden_bias(const ForwardParams<T>& p, int64_t d, int64_t m) {
  using A = typename AccOf<T>::type;
  return Cell::kHiddenBias && p.b_hh[d] != nullptr ? to_acc(p.b_hh[d][m]) : A(0);
}

// The input terms of an item's rows at step t, for its lane 0 (zero for
// the other lanes, which never read them).
template <typename Cell, typename T>
FASTRNN_HD void load_inputs(const ForwardParams<T>& p, int64_t t, int64_t d, int64_t n0,
                            const Item& x, int64_t j0,
                            UnitInputs<typename AccOf<T>::type, Cell>& in) {
  using A = typename AccOf<T>::type;
  const int64_t GH = Cell::kGates * p.H, j = j0 + x.c;
  A bias[Cell::kGates];
  FASTRNN_UNROLL
  for (int g = 0; g < Cell::kGates; ++g)
    bias[g] = x.valid && x.lane == 0 ? input_bias<Cell>(p, d, g * p.H + j) : A(0);
  FASTRNN_UNROLL
  for (int q = 0; q < kRowTile; ++q) {
    const bool ok = x.valid && x.lane == 0 && q < x.nr;
    const T* u = p.u + ((d * p.T + t) * p.N + n0 + x.r0 + q) * GH + j;
    FASTRNN_UNROLL
    for (int g = 0; g < Cell::kGates; ++g) in.u[g][q] = ok ? to_acc(u[g * p.H]) + bias[g] : A(0);
  }
}

template <typename Cell, typename T, typename Wt, class Block, class Publish>
FASTRNN_HD void forward_items(const ForwardParams<T>& p, int64_t t, int64_t d, int64_t n0,
                              const Items& it, int64_t j0, int64_t nj_stride, const Wt* w,
                              int64_t Wst, const typename AccOf<T>::type* state, int64_t Ss,
                              typename AccOf<T>::type* cs, int64_t csw,
                              UnitInputs<typename AccOf<T>::type, Cell>& ahead, int64_t t_next,
                              const Block& b, const Publish& publish) {
  using A = typename AccOf<T>::type;
  constexpr int G = Cell::kGates;
  const int64_t H = p.H, chunks = Ss / chunk<Wt>();
  const int64_t rounds = it.rounds(b);
  for (int64_t round = 0; round < rounds; ++round) {
    const Item x = item_of(it, round, b);
    UnitInputs<A, Cell> in;
    if (round == 0) in = ahead;
    else load_inputs<Cell>(p, t, d, n0, x, j0, in);
    // The next step's input terms of the first item, loaded now so that
    // their trip to global memory overlaps this step's arithmetic.
    if (round == 0 && t_next >= 0 && x.lane == 0) load_inputs<Cell>(p, t_next, d, n0, x, j0, ahead);
    A hw[G][kRowTile];
    FASTRNN_UNROLL
    for (int g = 0; g < G; ++g) {
      FASTRNN_UNROLL
      for (int q = 0; q < kRowTile; ++q) hw[g][q] = A(0);
      if (x.valid)
        dot_chunks<A>(state + x.r0 * Ss, Ss, x.nr, w + (g * nj_stride + x.c) * Wst, chunks,
                      x.lane, it.split, hw[g]);
      FASTRNN_UNROLL
      for (int q = 0; q < kRowTile; ++q) hw[g][q] = b.lane_sum(hw[g][q], it.split);
    }
    if (!x.valid || x.lane != 0) continue;
    const int64_t j = j0 + x.c;
    FASTRNN_UNROLL
    for (int q = 0; q < kRowTile; ++q) {
      if (q >= x.nr) break;
      const int64_t r = x.r0 + q, n = n0 + r;
      T* out = p.y + (t * p.N + n) * p.D * p.P + d * p.P + j;
      T* saved = saved_width<Cell>(H) ? p.saved + ((d * p.T + t) * p.N + n) * saved_width<Cell>(H) + j
                                      : nullptr;
      A v;
      if (row_active(p.lengths, n, t)) {
        A u[G], hwq[G], bh[G], sv[Cell::kSaved > 0 ? Cell::kSaved : 1];
        FASTRNN_UNROLL
        for (int g = 0; g < G; ++g) {
          u[g] = in.u[g][q];
          hwq[g] = hw[g][q];
          bh[g] = hidden_bias<Cell>(p, d, g * H + j);
        }
        A c = Cell::kCellState ? cs[r * csw + x.c] : A(0);
        Cell::template forward<ScalarMath<A>, A>(u, hwq, bh, state[r * Ss + j], c, v, sv);
        *out = from_acc<T>(v);
        FASTRNN_UNROLL
        for (int k = 0; k < Cell::kSaved; ++k) saved[k * H] = from_acc<T>(sv[k]);
        if constexpr (Cell::kCellState) {
          cs[r * csw + x.c] = c;
          saved[Cell::kSaved * H] = from_acc<T>(c);
        }
      } else {
        v = state[r * Ss + j];
        *out = from_acc<T>(A(0));
        for (int k = 0; k < Cell::kSaved + (Cell::kCellState ? 1 : 0); ++k)
          saved[k * H] = from_acc<T>(A(0));
      }
      publish(r, j, v);
    }
  }
}

// The first step's input terms of this thread's first item.
template <typename Cell, typename T, class Block>
FASTRNN_HD void first_inputs(const ForwardParams<T>& p, int64_t t, int64_t d, int64_t n0,
                             const Items& it, int64_t j0,
                             UnitInputs<typename AccOf<T>::type, Cell>& ahead, const Block& b) {
  load_inputs<Cell>(p, t, d, n0, item_of(it, 0, b), j0, ahead);
}

// h0 of rows [n0, n0 + R) into state (R, Ss), every unit, padding zero; the
// share's c0 into cs (R, csw).
template <typename Cell, typename T, class Block>
FASTRNN_HD void load_initial_state(const ForwardParams<T>& p, int64_t d, int64_t n0, int64_t R,
                                   typename AccOf<T>::type* state, int64_t Ss,
                                   typename AccOf<T>::type* cs, int64_t csw, int64_t j0,
                                   int64_t nj, const Block& b) {
  using A = typename AccOf<T>::type;
  for (int64_t i = b.tid; i < R * Ss; i += b.threads) {
    const DivMod rk = divmod(i, Ss);
    state[i] = rk.r < p.P ? to_acc(p.h0[(d * p.N + n0 + rk.q) * p.P + rk.r]) : A(0);
  }
  if constexpr (Cell::kCellState) {
    for (int64_t i = b.tid; i < R * nj; i += b.threads) {
      const DivMod rc = divmod(i, nj);
      cs[rc.q * csw + rc.r] = to_acc(p.c0[(d * p.N + n0 + rc.q) * p.H + j0 + rc.r]);
    }
  }
}

// h_n (and c_n) of the share's units from state (R, Ss) and cs (R, csw).
template <typename Cell, typename T, class Block>
FASTRNN_HD void store_final_state(const ForwardParams<T>& p, int64_t d, int64_t n0, int64_t R,
                                  const typename AccOf<T>::type* state, int64_t Ss,
                                  const typename AccOf<T>::type* cs, int64_t csw, int64_t j0,
                                  int64_t nj, const Block& b) {
  for (int64_t i = b.tid; i < R * nj; i += b.threads) {
    const DivMod rc = divmod(i, nj);
    const int64_t o = (d * p.N + n0 + rc.q) * p.H + j0 + rc.r;
    p.hn[o] = from_acc<T>(state[rc.q * Ss + j0 + rc.r]);
    if constexpr (Cell::kCellState) p.cn[o] = from_acc<T>(cs[rc.q * csw + rc.r]);
  }
}

// ---------------------------------------------------------------------------
// The backward of the persistent, cluster and grid paths, two phases a step.
// Phase 1 (dz_items): for each item of the share, the cell's backward step
// from dL/dh' = dy + dh: dgh (and dgi) into global memory, dgh handed to
// publish(r, m, v) for the carry, dc kept, dh replaced by the part of
// dL/dh_prev outside W_hh. Phase 2 (carry_items), after a barrier that
// makes dz complete: dh[r][c] += dz[r] . W_hh[:, k0 + c] over all G*H.

template <typename A, typename Cell>
struct GradInputs {
  A dy[kRowTile], y[kRowTile];
  A saved[Cell::kSaved > 0 ? Cell::kSaved : 1][kRowTile];
  A c[kRowTile], c_prev[kRowTile], h_prev[kRowTile];
};

template <typename Cell, typename T>
FASTRNN_HD void load_grad_inputs(const BackwardParams<T>& p, int64_t t, int64_t d, int64_t n0,
                                 const Item& x, int64_t j0,
                                 GradInputs<typename AccOf<T>::type, Cell>& in) {
  using A = typename AccOf<T>::type;
  const int64_t N = p.N, H = p.H, DP = p.D * p.P, Ws = saved_width<Cell>(H), j = j0 + x.c;
  FASTRNN_UNROLL
  for (int q = 0; q < kRowTile; ++q) {
    const int64_t n = n0 + x.r0 + q;
    const bool ok = x.valid && x.lane == 0 && q < x.nr && row_active(p.lengths, n, t);
    const int64_t o = (t * N + n) * DP + d * p.P + j;
    in.dy[q] = ok ? to_acc(p.dy[o]) : A(0);
    in.y[q] = ok ? to_acc(p.y[o]) : A(0);
    const T* saved = Ws ? p.saved + ((d * p.T + t) * N + n) * Ws + j : nullptr;
    FASTRNN_UNROLL
    for (int k = 0; k < Cell::kSaved; ++k) in.saved[k][q] = ok ? to_acc(saved[k * H]) : A(0);
    const int64_t prev = ok ? prev_step(p.lengths, n, t, d, p.T) : -1;
    if constexpr (Cell::kCellState) {
      in.c[q] = ok ? to_acc(saved[Cell::kSaved * H]) : A(0);
      in.c_prev[q] = !ok ? A(0)
                     : prev >= 0 ? to_acc(p.saved[((d * p.T + prev) * N + n) * Ws + Cell::kSaved * H + j])
                                 : to_acc(p.c0[(d * N + n) * H + j]);
    }
    if constexpr (Cell::kPrevState) {
      in.h_prev[q] = !ok ? A(0)
                     : prev >= 0 ? to_acc(p.y[(prev * N + n) * DP + d * p.P + j])
                                 : to_acc(p.h0[(d * N + n) * p.P + j]);
    }
  }
}

template <typename Cell, typename T, class Block, class Publish>
FASTRNN_HD void dz_items(const BackwardParams<T>& p, int64_t t, int64_t d, int64_t n0,
                         const Items& it, int64_t j0, typename AccOf<T>::type* dh, int64_t dhs,
                         typename AccOf<T>::type* dc, int64_t dcs,
                         GradInputs<typename AccOf<T>::type, Cell>& ahead, int64_t t_next,
                         const Block& b, const Publish& publish) {
  using A = typename AccOf<T>::type;
  constexpr int G = Cell::kGates;
  const int64_t H = p.H, GH = G * H;
  const int64_t rounds = it.rounds(b);
  for (int64_t round = 0; round < rounds; ++round) {
    const Item x = item_of(it, round, b);
    if (!x.valid || x.lane != 0) continue;
    GradInputs<A, Cell> in;
    if (round == 0) in = ahead;
    else load_grad_inputs<Cell>(p, t, d, n0, x, j0, in);
    const int64_t j = j0 + x.c;
    FASTRNN_UNROLL
    for (int q = 0; q < kRowTile; ++q) {
      if (q >= x.nr) break;
      const int64_t r = x.r0 + q, n = n0 + r;
      const int64_t o = ((d * p.T + t) * p.N + n) * GH + j;
      if (!row_active(p.lengths, n, t)) {
        FASTRNN_UNROLL
        for (int g = 0; g < G; ++g) {
          p.dgh[o + g * H] = from_acc<T>(A(0));
          if (Cell::kHiddenBias) p.dgi[o + g * H] = from_acc<T>(A(0));
          publish(r, g * H + j, A(0));
        }
        continue;
      }
      A sv[Cell::kSaved > 0 ? Cell::kSaved : 1], dgh[G], dgi[G], dhd = A(0);
      FASTRNN_UNROLL
      for (int k = 0; k < Cell::kSaved; ++k) sv[k] = in.saved[k][q];
      A dcv = Cell::kCellState ? dc[r * dcs + x.c] : A(0);
      Cell::template backward<ScalarMath<A>, A>(in.dy[q] + dh[r * dhs + x.c], in.y[q], sv,
                                                in.h_prev[q], in.c_prev[q], in.c[q], dcv, dgh,
                                                dgi, dhd);
      FASTRNN_UNROLL
      for (int g = 0; g < G; ++g) {
        p.dgh[o + g * H] = from_acc<T>(dgh[g]);
        if (Cell::kHiddenBias) p.dgi[o + g * H] = from_acc<T>(dgi[g]);
        publish(r, g * H + j, dgh[g]);
      }
      if (Cell::kCellState) dc[r * dcs + x.c] = dcv;
      dh[r * dhs + x.c] = dhd;
    }
  }
  // The next step's inputs of the first item, ahead of the carry's arithmetic.
  const Item first = item_of(it, 0, b);
  if (t_next >= 0 && first.lane == 0) load_grad_inputs<Cell>(p, t_next, d, n0, first, j0, ahead);
}

// dh[r][c] += z[r] . wt[c] for the share's columns and the rows active at t:
// z (R, Ms) holds dgh of every gate and unit, wt (nk, Mst) the share's
// columns of W_hh (wt[c][m] = W_hh[m][k0 + c]).
template <typename A, typename Wt, class Block>
FASTRNN_HD void carry_items(const int64_t* lengths, int64_t t, int64_t n0, const Items& it,
                            const A* z, int64_t Ms, const Wt* wt, int64_t Mst, A* dh,
                            int64_t dhs, const Block& b) {
  const int64_t chunks = Ms / chunk<Wt>();
  const int64_t rounds = it.rounds(b);
  for (int64_t round = 0; round < rounds; ++round) {
    const Item x = item_of(it, round, b);
    A s[kRowTile] = {};
    if (x.valid) dot_chunks<A>(z + x.r0 * Ms, Ms, x.nr, wt + x.c * Mst, chunks, x.lane, it.split, s);
    FASTRNN_UNROLL
    for (int q = 0; q < kRowTile; ++q) s[q] = b.lane_sum(s[q], it.split);
    if (!x.valid || x.lane != 0) continue;
    FASTRNN_UNROLL
    for (int q = 0; q < kRowTile; ++q) {
      if (q >= x.nr) break;
      if (row_active(lengths, n0 + x.r0 + q, t)) dh[(x.r0 + q) * dhs + x.c] += s[q];
    }
  }
}

// dh_n (and dc_n) of the share into dh (R, dhs) and dc (R, dcs), by the
// threads that own them; and dh0 (dc0) back out.
template <typename Cell, typename T, class Block>
FASTRNN_HD void load_final_grads(const BackwardParams<T>& p, int64_t d, int64_t n0,
                                 const Items& it, int64_t k0, typename AccOf<T>::type* dh,
                                 int64_t dhs, typename AccOf<T>::type* dc, int64_t dcs,
                                 const Block& b) {
  using A = typename AccOf<T>::type;
  for (int64_t round = 0; round < it.rounds(b); ++round) {
    const Item x = item_of(it, round, b);
    if (!x.valid || x.lane != 0) continue;
    for (int64_t q = 0; q < x.nr; ++q) {
      const int64_t r = x.r0 + q, n = n0 + r;
      dh[r * dhs + x.c] = p.dhn != nullptr ? to_acc(p.dhn[(d * p.N + n) * p.P + k0 + x.c]) : A(0);
      if constexpr (Cell::kCellState)
        dc[r * dcs + x.c] = p.dcn != nullptr ? to_acc(p.dcn[(d * p.N + n) * p.H + k0 + x.c]) : A(0);
    }
  }
}

template <typename Cell, typename T, class Block>
FASTRNN_HD void store_initial_grads(const BackwardParams<T>& p, int64_t d, int64_t n0,
                                    const Items& it, int64_t k0,
                                    const typename AccOf<T>::type* dh, int64_t dhs,
                                    const typename AccOf<T>::type* dc, int64_t dcs,
                                    const Block& b) {
  for (int64_t round = 0; round < it.rounds(b); ++round) {
    const Item x = item_of(it, round, b);
    if (!x.valid || x.lane != 0) continue;
    for (int64_t q = 0; q < x.nr; ++q) {
      const int64_t r = x.r0 + q, n = n0 + r;
      p.dh0[(d * p.N + n) * p.P + k0 + x.c] = from_acc<T>(dh[r * dhs + x.c]);
      if constexpr (Cell::kCellState)
        p.dc0[(d * p.N + n) * p.H + k0 + x.c] = from_acc<T>(dc[r * dcs + x.c]);
    }
  }
}

}  // namespace cuda
}  // namespace fastrnn
