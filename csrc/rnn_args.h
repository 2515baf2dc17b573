// The arguments of the fastrnn ops: the sizes of a stack read from them and
// checked against each other with named messages, and named access to the
// weights of each layer and direction. Shapes use the letters of
// recurrence_params.h.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <optional>
#include <string>

#include "cells.h"

namespace fastrnn {

// The dtypes every fastrnn op takes, on every device: float32, float64,
// float16 and bfloat16 (the last two with float32 arithmetic and state).
bool supported_dtype(at::ScalarType t);

// Every cell the ops take.
inline constexpr CellKind kCellKinds[] = {CellKind::rnn_tanh, CellKind::rnn_relu, CellKind::lstm,
                                          CellKind::gru};
// The cell the ops name: "rnn_tanh", "rnn_relu", "lstm" or "gru" (each
// cell's kName); anything else is an error that lists them.
CellKind cell_kind(c10::string_view name);
const char* cell_name(CellKind cell);
// The states a cell carries: h, and c for cells with kCellState.
int64_t cell_states(CellKind cell);
// Checks that hx holds the cell's states, h (and c).
void check_states(CellKind cell, at::TensorList hx);

// Sizes and options of a stack of `cell` layers.
struct Stack {
  CellKind cell;
  int64_t G;                // gates of the cell
  int64_t Ws;               // values a step keeps per row for the backward
  int64_t T, N, C, H, P, L, D;
  bool biases, proj;
  bool cell_state;   // the cell carries a second state c (cx, c_n)
  bool hidden_bias;  // b_hh enters the cell apart from b_ih, and the input-side
                     // gradient of the gates differs from the hidden-side one
  // The weights of one cell (layer, direction), nn's flat order: w_ih, w_hh,
  // then b_ih, b_hh with biases, then w_hr with projections.
  int64_t per_cell() const { return 2 + (biases ? 2 : 0) + (proj ? 1 : 0); }
  int64_t DP() const { return D * P; }
  int64_t in_size(int64_t l) const { return l == 0 ? C : D * P; }
};

// The weights of layer l, direction d, by name; undefined where the stack
// has none of that kind.
struct CellWeights {
  at::Tensor w_ih;  // (G*H, C) or (G*H, D*P)
  at::Tensor w_hh;  // (G*H, P)
  at::Tensor b_ih;  // (G*H)
  at::Tensor b_hh;  // (G*H)
  at::Tensor w_hr;  // (P, H)
};
CellWeights cell_weights(at::TensorList weights, const Stack& s, int64_t l, int64_t d);
// The index in the flat list of the first weight of layer l, direction d.
int64_t first_weight(const Stack& s, int64_t l, int64_t d);

// Reads and checks the arguments every op of a stack shares. hx holds the
// cell's states: h, and for an LSTM c.
Stack check_args(CellKind cell, const at::Tensor& input, at::TensorList hx, at::TensorList weights,
                 const std::optional<at::Tensor>& lengths,
                 const std::optional<at::Tensor>& dropout_mask, int64_t num_layers,
                 bool bidirectional, bool has_biases, bool has_projections);

// Checks of the tensors a backward op takes besides the forward's arguments.
void check_shape(const at::Tensor& t, const std::string& name, const char* letters,
                 at::IntArrayRef expected);
void check_like(const at::Tensor& t, const std::string& name, const at::Tensor& input);

}  // namespace fastrnn
