// The fastrnn ops as C++ functions: one forward op and one backward op for
// every cell (Elman, LSTM, GRU), the cell named among the arguments, each a
// thin wrapper around the stack of rnn_stack.h. Their schemas are in
// rnn_ops.cpp; the CPU and CUDA kernels of each op are these functions, the
// autograd and autocast kernels are in rnn_autograd.cpp.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/List.h>
#include <c10/util/string_view.h>

#include <optional>
#include <tuple>
#include <vector>

namespace fastrnn {

using at::Tensor;
using std::optional;

// The op pair every cell shares, the cell a value among the arguments (its
// name, cells.h's kName):
//
// forward: output (T, N, D*P), state_n (h_n (L*D, N, P), and for an LSTM
//   c_n (L*D, N, H)), hidden_states (L-1, T, N, D*P) (the outputs of every
//   layer but the last), workspace (L, D, T, N, Ws) (what each step keeps
//   for the backward: Ws = 0 for Elman, 5H for LSTM, 4H for GRU).
std::tuple<Tensor, std::vector<Tensor>, Tensor, Tensor> forward(
    c10::string_view cell, const Tensor& input, at::TensorList hx, at::TensorList weights,
    const optional<Tensor>& lengths, const optional<Tensor>& dropout_mask, int64_t num_layers,
    bool bidirectional, bool has_biases, bool has_projections);

// backward: the gradients of the forward's input, states and weights from
// those of its output and final states (none for zero) and what it returned.
std::tuple<Tensor, std::vector<Tensor>, std::vector<Tensor>> backward(
    c10::string_view cell, const Tensor& input, at::TensorList hx, at::TensorList weights,
    const optional<Tensor>& lengths, const optional<Tensor>& dropout_mask, const Tensor& output,
    const Tensor& hidden_states, const Tensor& workspace, const optional<Tensor>& grad_output,
    const c10::List<optional<Tensor>>& grad_state_n, int64_t num_layers, bool bidirectional,
    bool has_biases, bool has_projections, bool input_grad, bool state_grad);

// One step of a cell (by name): input (N, C) or (C), states
// (h) or (h, c) like it, or none for zeros; the layer's forward op over one
// layer, one direction and one step, called through the dispatcher so that
// autograd, autocast and the transforms' kernels apply; returns the new
// states shaped as the input came. A step that no backward can follow, on
// plain CPU tensors outside autocast, modes, tracing and transforms, runs
// the CPU kernels without the dispatcher (the same kernel, the same bits).
// fastrnn's cells call it from Python in eager mode: one call where the op
// through torch.ops takes several view ops around it, each a Python call.
std::vector<Tensor> cell_step(c10::string_view cell, const Tensor& input, const std::vector<Tensor>& states,
                              const std::vector<Tensor>& weights, bool has_biases);

// A layer's plainest eager call (fastrnn.module's _plain_forward) in one
// call from Python: a padded (T, N, C) input ((N, T, C) with batch_first)
// of the layer's width, T > 0, states of exactly the expected shapes (or
// none, for zeros), one dtype and device throughout. Returns output (as the
// input came), h_n and, for an LSTM, c_n; nothing where the call is not
// that plain or the op refuses it, for the caller's full argument handling.
// Without grad mode the forward keeps no workspace (set_keep_workspace).
std::vector<Tensor> layer_forward(c10::string_view cell, const Tensor& input,
                                  const std::vector<Tensor>& states,
                                  const std::vector<Tensor>& weights, int64_t input_size,
                                  int64_t hidden_size, int64_t proj_size, int64_t num_layers,
                                  bool bidirectional, bool has_biases, bool batch_first);

}  // namespace fastrnn
