// The time loop of one layer of an Elman RNN, for all its directions at once:
// the only part of fastrnn that differs between CPU and CUDA.
//
// Letters used in every shape comment of this project:
//   T time steps, N batch, C input features, H hidden features,
//   L layers, D directions (1, or 2 when bidirectional).
//
// Direction 0 runs forward in time, direction 1 backward. A batch row n is
// active at step t when t < lengths[n] (packed sequences); an inactive row
// keeps its state, and its output is zero. Rows never interact, so the
// kernels may split them between threads or thread blocks freely.
//
// These structs know nothing of torch: sizes and strides in elements, raw
// pointers, all sizes int64.
#pragma once

#include <cstdint>

namespace fastrnn {

template <typename scalar_t>
struct ForwardParams {
  int64_t T, N, H, D;
  const scalar_t* u;        // (D, T, N, H) x W_ih^T + b_ih + b_hh, contiguous
  const scalar_t* w_hh_t;   // (D, H, H) W_hh transposed: w_hh_t[d][k][j] = W_hh[d][j][k]
  const scalar_t* h0;       // (D, N, H) contiguous
  const int64_t* lengths;   // (N) or nullptr: every row active at every step
  scalar_t* y;              // (T, N, D*H) contiguous; direction d writes columns [d*H, (d+1)*H)
  scalar_t* hn;             // (D, N, H) contiguous, the last state of every row
  bool relu;                // act = relu, else tanh
};

template <typename scalar_t>
struct BackwardParams {
  int64_t T, N, H, D;
  const scalar_t* dy;       // (T, N, D*H) gradient of this layer's output, contiguous
  const scalar_t* dhn;      // (D, N, H) gradient of h_n, or nullptr for zero
  const scalar_t* y;        // (T, N, D*H) this layer's output saved by the forward
  const scalar_t* w_hh;     // (D, H, H) W_hh as stored: w_hh[d][j][k] weighs h[k] into unit j
  const int64_t* lengths;   // (N) or nullptr
  scalar_t* dz;             // (D, T, N, H) gradient of the pre-activation, contiguous
  scalar_t* dh0;            // (D, N, H) gradient of h0, contiguous
  bool relu;
};

}  // namespace fastrnn
