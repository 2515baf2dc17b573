// The step path's elementwise bodies: per step, the GEMMs run through
// cuBLAS on the torch side and these bodies, one thread per (direction, row,
// unit), on the device (recurrence_cuda_kernels.cuh) and in the emulator.
#pragma once

#include <cstdint>

#include "cells.h"
#include "cuda/recurrence_cuda_items.h"  // input_bias, hidden_bias
#include "cuda/recurrence_cuda_layout.h"
#include "cuda/recurrence_cuda_types.h"
#include "recurrence_params.h"

namespace fastrnn {
namespace cuda {

// ---------------------------------------------------------------------------
// Step path: per step, the GEMMs through cuBLAS on the torch side and these
// elementwise bodies, one thread per (direction, row, unit). States and
// gradients carried between steps are (D, N, ...) arrays in A.

// Forward, element i = n * H + j of direction d at step s: hw (D, N, G*H) =
// h W_hh^T from cuBLAS; h (D, N, P) and c (D, N, H) the states, updated for
// active rows. Without projections the new h goes to y too; with them, to m
// (D, N, H), which project_step_body finishes.
template <typename Cell, typename T>
FASTRNN_HD void forward_step_body(const ForwardParams<T>& p, int64_t s,
                                  const typename AccOf<T>::type* hw,
                                  typename AccOf<T>::type* h, typename AccOf<T>::type* c,
                                  typename AccOf<T>::type* m, int64_t d, int64_t i) {
  using A = typename AccOf<T>::type;
  constexpr int G = Cell::kGates;
  const int64_t N = p.N, H = p.H, P = p.P, GH = G * H;
  const DivMod nj = divmod(i, H);
  const int64_t n = nj.q, j = nj.r;
  const int64_t t = d == 0 ? s : p.T - 1 - s;
  const bool proj = m != nullptr;
  T* out = p.y + (t * N + n) * p.D * P + d * P + j;
  T* saved = saved_width<Cell>(H) ? p.saved + ((d * p.T + t) * N + n) * saved_width<Cell>(H) + j
                                  : nullptr;
  if (!row_active(p.lengths, n, t)) {
    if (!proj) *out = from_acc<T>(A(0));
    for (int k = 0; k < Cell::kSaved + (Cell::kCellState ? 1 : 0); ++k) saved[k * H] = from_acc<T>(A(0));
    if (proj) m[(d * N + n) * H + j] = A(0);
    return;
  }
  A u[G], hwq[G], bh[G], sv[Cell::kSaved > 0 ? Cell::kSaved : 1];
  const T* ut = p.u + ((d * p.T + t) * N + n) * GH + j;
  for (int g = 0; g < G; ++g) {
    u[g] = to_acc(ut[g * H]) + input_bias<Cell>(p, d, g * H + j);
    hwq[g] = hw[(d * N + n) * GH + g * H + j];
    bh[g] = hidden_bias<Cell>(p, d, g * H + j);
  }
  A cv = Cell::kCellState ? c[(d * N + n) * H + j] : A(0);
  A v;
  // h_prev of the unit: without projections P == H, so the state has one per unit.
  Cell::template forward<ScalarMath<A>, A>(u, hwq, bh, proj ? A(0) : h[(d * N + n) * P + j], cv,
                                           v, sv);
  for (int k = 0; k < Cell::kSaved; ++k) saved[k * H] = from_acc<T>(sv[k]);
  if constexpr (Cell::kCellState) {
    c[(d * N + n) * H + j] = cv;
    saved[Cell::kSaved * H] = from_acc<T>(cv);
  }
  if (proj) {
    m[(d * N + n) * H + j] = v;
  } else {
    h[(d * N + n) * P + j] = v;
    *out = from_acc<T>(v);
  }
}

// With projections, element i = n * P + k: hp (D, N, P) = m W_hr^T from
// cuBLAS becomes the state and the output of active rows.
template <typename T>
FASTRNN_HD void project_step_body(const ForwardParams<T>& p, int64_t s,
                                  const typename AccOf<T>::type* hp, typename AccOf<T>::type* h,
                                  int64_t d, int64_t i) {
  using A = typename AccOf<T>::type;
  const DivMod nk = divmod(i, p.P);
  const int64_t t = d == 0 ? s : p.T - 1 - s;
  T* out = p.y + (t * p.N + nk.q) * p.D * p.P + d * p.P + nk.r;
  if (!row_active(p.lengths, nk.q, t)) {
    *out = from_acc<T>(A(0));
    return;
  }
  const A v = hp[(d * p.N) * p.P + i];
  h[(d * p.N) * p.P + i] = v;
  *out = from_acc<T>(v);
}

// Backward with projections, first: element i = n * P + k of dL/dh' = dy +
// dh for active rows (zero for the others) into gp (D, N, P) and p.dhr;
// cuBLAS then makes gm = gp W_hr.
template <typename T>
FASTRNN_HD void unproject_step_body(const BackwardParams<T>& p, int64_t s,
                                    const typename AccOf<T>::type* dh,
                                    typename AccOf<T>::type* gp, int64_t d, int64_t i) {
  using A = typename AccOf<T>::type;
  const DivMod nk = divmod(i, p.P);
  const int64_t t = d == 0 ? p.T - 1 - s : s;
  A g = A(0);
  if (row_active(p.lengths, nk.q, t))
    g = to_acc(p.dy[(t * p.N + nk.q) * p.D * p.P + d * p.P + nk.r]) + dh[d * p.N * p.P + i];
  gp[d * p.N * p.P + i] = g;
  p.dhr[((d * p.T + t) * p.N) * p.P + i] = from_acc<T>(g);
}

// Backward, element i = n * H + j: the cell's backward step from dL/dh' (dy
// + dh, or gm (D, N, H) with projections); dgh into p.dgh and z (D, N, G*H),
// dgi into p.dgi; dc (D, N, H) updated and the part of dL/dh_prev outside
// W_hh into dhd (D, N, P) for active rows; zeros for the others.
template <typename Cell, typename T>
FASTRNN_HD void backward_step_body(const BackwardParams<T>& p, int64_t s,
                                   const typename AccOf<T>::type* dh,
                                   const typename AccOf<T>::type* gm,
                                   typename AccOf<T>::type* z, typename AccOf<T>::type* dc,
                                   typename AccOf<T>::type* dhd, int64_t d, int64_t i) {
  using A = typename AccOf<T>::type;
  constexpr int G = Cell::kGates;
  const int64_t N = p.N, H = p.H, P = p.P, GH = G * H, DP = p.D * P, Ws = saved_width<Cell>(H);
  const DivMod nj = divmod(i, H);
  const int64_t n = nj.q, j = nj.r;
  const int64_t t = d == 0 ? p.T - 1 - s : s;
  const int64_t o = ((d * p.T + t) * N + n) * GH + j;
  A* zr = z + (d * N + n) * GH + j;
  if (!row_active(p.lengths, n, t)) {
    for (int g = 0; g < G; ++g) {
      zr[g * H] = A(0);
      p.dgh[o + g * H] = from_acc<T>(A(0));
      if (Cell::kHiddenBias) p.dgi[o + g * H] = from_acc<T>(A(0));
    }
    return;
  }
  const int64_t oy = (t * N + n) * DP + d * P + j;
  const A gh = gm != nullptr ? gm[(d * N + n) * H + j] : to_acc(p.dy[oy]) + dh[(d * N + n) * P + j];
  const A y = gm != nullptr ? A(0) : to_acc(p.y[oy]);
  const T* saved = Ws ? p.saved + ((d * p.T + t) * N + n) * Ws + j : nullptr;
  A sv[Cell::kSaved > 0 ? Cell::kSaved : 1];
  for (int k = 0; k < Cell::kSaved; ++k) sv[k] = to_acc(saved[k * H]);
  const int64_t prev = prev_step(p.lengths, n, t, d, p.T);
  A cv = A(0), cp = A(0), hp = A(0), dcv = A(0);
  if constexpr (Cell::kCellState) {
    cv = to_acc(saved[Cell::kSaved * H]);
    cp = prev >= 0 ? to_acc(p.saved[((d * p.T + prev) * N + n) * Ws + Cell::kSaved * H + j])
                   : to_acc(p.c0[(d * N + n) * H + j]);
    dcv = dc[(d * N + n) * H + j];
  }
  if constexpr (Cell::kPrevState)
    hp = prev >= 0 ? to_acc(p.y[(prev * N + n) * DP + d * P + j]) : to_acc(p.h0[(d * N + n) * P + j]);
  A dgh[G], dgi[G], dhp = A(0);
  Cell::template backward<ScalarMath<A>, A>(gh, y, sv, hp, cp, cv, dcv, dgh, dgi, dhp);
  for (int g = 0; g < G; ++g) {
    zr[g * H] = dgh[g];
    p.dgh[o + g * H] = from_acc<T>(dgh[g]);
    if (Cell::kHiddenBias) p.dgi[o + g * H] = from_acc<T>(dgi[g]);
  }
  if constexpr (Cell::kCellState) dc[(d * N + n) * H + j] = dcv;
  if constexpr (Cell::kPrevState) dhd[(d * N + n) * P + j] = dhp;
}

// Last: element i = n * P + k, dh = dzw (+ dhd) for active rows, from dzw
// (D, N, P) = z W_hh from cuBLAS; inactive rows keep dh.
template <typename Cell, typename T>
FASTRNN_HD void carry_step_body(const BackwardParams<T>& p, int64_t s,
                                const typename AccOf<T>::type* dzw,
                                const typename AccOf<T>::type* dhd,
                                typename AccOf<T>::type* dh, int64_t d, int64_t i) {
  const int64_t t = d == 0 ? p.T - 1 - s : s;
  if (!row_active(p.lengths, i / p.P, t)) return;
  const int64_t o = d * p.N * p.P + i;
  dh[o] = Cell::kPrevState ? dzw[o] + dhd[o] : dzw[o];
}

}  // namespace cuda
}  // namespace fastrnn
