// The time loop of one layer of a recurrent stack, for all its directions
// at once: the only part of fastrnn that differs between CPU and CUDA. A
// time loop takes its cell (cells.h) as a template parameter.
//
// Letters used in every shape comment of this project:
//   T time steps, N batch, C input features, H hidden units of a cell,
//   P the width of the state h and of the output (H, or an LSTM's proj_size),
//   G gates of the cell (1 Elman, 4 LSTM, 3 GRU), L layers,
//   D directions (1, or 2 when bidirectional),
//   Ws = (kSaved + kCellState) * H values a forward step keeps per row for
//   the backward: the cell's saved values, then its state c.
//
// Direction 0 runs forward in time, direction 1 backward. A batch row n is
// active at step t when t < lengths[n] (packed sequences); an inactive row
// keeps its state, and its output and saved values are zero. Rows never
// interact, so the kernels may split them between threads or thread blocks
// freely.
//
// These structs know nothing of torch: sizes in elements, raw pointers, all
// sizes int64. Weights come per direction, as the layer stores them.
#pragma once

#include <cstdint>

#include "cells.h"

namespace fastrnn {

struct TileProducts;  // the CPU's bfloat16 step products (cpu/recurrence_cpu_tiles.h)

template <typename scalar_t>
struct ForwardParams {
  int64_t T, N, H, P, D;
  const scalar_t* u;          // (D, T, N, G*H) x W_ih^T, contiguous (CUDA)
  const scalar_t* x = nullptr;  // (T, N, C) the layer's input, contiguous (CPU: its kernels
  int64_t C = 0;                // compute x W_ih^T in the recurrent GEMM)
  const scalar_t* w_hh[2];    // per direction (G*H, P): w_hh[d][g*H + j][k] weighs h[k] into gate g of unit j
  const scalar_t* b_ih[2];    // per direction (G*H), or nullptr without biases: added to u
  const scalar_t* b_hh[2];    // per direction (G*H), or nullptr: added to u too, but by
                              // kHiddenBias cells inside the cell
  const scalar_t* w_hr[2];    // per direction (P, H) with projections; else nullptr (P == H)
  const scalar_t* h0;         // (D, N, P) contiguous
  const scalar_t* c0;         // (D, N, H) contiguous, kCellState cells
  const int64_t* lengths;     // (N) or nullptr: every row active at every step
  scalar_t* y;                // (T, N, D*P) contiguous; direction d writes columns [d*P, (d+1)*P)
  scalar_t* hn;               // (D, N, P) contiguous, the last state of every row
  scalar_t* cn;               // (D, N, H) contiguous, kCellState cells
  scalar_t* saved;            // (D, T, N, Ws) contiguous, or nullptr where Ws == 0
  // CPU, float32 from bfloat16 tensors: where not null, each step's products
  // run on the matrix unit's tiles in bfloat16 instead of the kernels' own.
  const TileProducts* tiles = nullptr;
  // CPU: every step walks a lone row's weights as stored the other way round
  // (steps alternate direction from one to the next; so do a thread's calls).
  bool flip = false;
};

template <typename scalar_t>
struct BackwardParams {
  int64_t T, N, H, P, D;
  const scalar_t* dy;         // (T, N, D*P) gradient of this layer's output, contiguous
  const scalar_t* dhn;        // (D, N, P) gradient of h_n, or nullptr for zero
  const scalar_t* dcn;        // (D, N, H) gradient of c_n, or nullptr for zero (kCellState)
  const scalar_t* y;          // (T, N, D*P) this layer's output saved by the forward
  const scalar_t* h0;         // (D, N, P) (kPrevState cells)
  const scalar_t* c0;         // (D, N, H) (kCellState cells)
  const scalar_t* saved;      // (D, T, N, Ws) as the forward wrote it, or nullptr where Ws == 0
  const scalar_t* w_hh[2];    // per direction (G*H, P), as stored
  const scalar_t* w_hr[2];    // per direction (P, H) with projections; else nullptr
  const int64_t* lengths;     // (N) or nullptr
  scalar_t* dgh;              // (D, T, N, G*H) gradient of the hidden-side pre-activations
  scalar_t* dgi;              // (D, T, N, G*H) of the input-side ones (kHiddenBias cells); else nullptr
  scalar_t* dhr;              // (D, T, N, P) gradient of the projection's output (projections); else nullptr
  scalar_t* dh0;              // (D, N, P) gradient of h0
  scalar_t* dc0;              // (D, N, H) gradient of c0 (kCellState cells)
  // CPU, float32 from bfloat16 tensors: where not null, the carry dgh W_hh
  // runs on the matrix unit's tiles in bfloat16 (cpu/recurrence_cpu_tiles.h).
  const TileProducts* tiles = nullptr;
  // False where no initial state needs a gradient: the CPU kernels then
  // leave dh0 and dc0 unwritten and skip the last step's product with W_hh
  // (all there is of a single step's but the gates' gradients).
  bool state_grad = true;
};

// The weight gradients of one direction of a layer over its R = T * N rows,
// in one pass (the CPU's, for a few rows: a cell's step, a short call).
// Rows in the order of the layer's output (row r is step r / N of batch
// row r % N); direction 0: the state before row r is h0's row r for the
// first N rows, else y's row r - N.
template <typename scalar_t>
struct WeightGradParams {
  int64_t R, N, C, P, GH;
  const scalar_t* dgi;        // (R, G*H) gradient of the input-side pre-activations
  const scalar_t* dgh;        // (R, G*H) of the hidden-side ones (dgi but for kHiddenBias cells)
  const scalar_t* x;          // (R, C) the layer's input
  const scalar_t* h0;         // (N, P)
  const scalar_t* y;          // (R, P) the layer's output
  const scalar_t* w_ih;       // (G*H, C), for dx
  scalar_t* dw_ih;            // (G*H, C) out
  scalar_t* dw_hh;            // (G*H, P) out
  scalar_t* db_ih;            // (G*H) out, or nullptr without biases
  scalar_t* db_hh;            // (G*H) out, or nullptr (with db_ih)
  scalar_t* dx;               // (R, C) out, or nullptr where the input needs no gradient
};

// Values a step keeps per row and unit-block for the backward: the cell's
// saved values and its state c.
template <typename Cell>
FASTRNN_HD constexpr int64_t saved_width(int64_t H) {
  return (Cell::kSaved + (Cell::kCellState ? 1 : 0)) * H;
}

// Whether row n runs step t.
FASTRNN_HD bool row_active(const int64_t* lengths, int64_t n, int64_t t) {
  return lengths == nullptr || t < lengths[n];
}

// The step that ran before step t of row n in direction d, or -1 where the
// state before t is the initial one. Lengths are prefixes: direction 0 runs
// [0, length), direction 1 runs it backwards from length - 1.
FASTRNN_HD int64_t prev_step(const int64_t* lengths, int64_t n, int64_t t, int64_t d, int64_t T) {
  const int64_t q = d == 0 ? t - 1 : t + 1;
  return q >= 0 && q < T && row_active(lengths, n, q) ? q : -1;
}

}  // namespace fastrnn
