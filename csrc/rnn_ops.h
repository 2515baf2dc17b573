// The fastrnn ops as C++ functions: one forward op and one backward op per
// cell type (Elman, LSTM, GRU), each a thin wrapper around the stack of
// rnn_stack.h. Their schemas are in rnn_ops.cpp; the CPU and CUDA kernels of
// each op are these functions, the autograd and autocast kernels are in
// rnn_autograd.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>
#include <vector>

namespace fastrnn {

using at::Tensor;
using std::optional;

// output (T, N, D*H), h_n (L*D, N, H), hidden_states (L-1, T, N, D*H)
std::tuple<Tensor, Tensor, Tensor> rnn_forward(const Tensor& input, const Tensor& hx,
                                               at::TensorList weights,
                                               const optional<Tensor>& lengths,
                                               const optional<Tensor>& dropout_mask,
                                               int64_t num_layers, bool bidirectional,
                                               bool has_biases, bool relu);
std::tuple<Tensor, Tensor, std::vector<Tensor>> rnn_backward(
    const Tensor& input, const Tensor& hx, at::TensorList weights,
    const optional<Tensor>& lengths, const optional<Tensor>& dropout_mask, const Tensor& output,
    const Tensor& hidden_states, const optional<Tensor>& grad_output,
    const optional<Tensor>& grad_hn, int64_t num_layers, bool bidirectional, bool has_biases,
    bool relu, bool input_grad);

// output (T, N, D*P), h_n (L*D, N, P), c_n (L*D, N, H),
// hidden_states (L-1, T, N, D*P), workspace (L, D, T, N, 5H)
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lstm_forward(
    const Tensor& input, const Tensor& hx, const Tensor& cx, at::TensorList weights,
    const optional<Tensor>& lengths, const optional<Tensor>& dropout_mask, int64_t num_layers,
    bool bidirectional, bool has_biases, bool has_projections);
std::tuple<Tensor, Tensor, Tensor, std::vector<Tensor>> lstm_backward(
    const Tensor& input, const Tensor& hx, const Tensor& cx, at::TensorList weights,
    const optional<Tensor>& lengths, const optional<Tensor>& dropout_mask, const Tensor& output,
    const Tensor& hidden_states, const Tensor& workspace, const optional<Tensor>& grad_output,
    const optional<Tensor>& grad_hn, const optional<Tensor>& grad_cn, int64_t num_layers,
    bool bidirectional, bool has_biases, bool has_projections, bool input_grad);

// output (T, N, D*H), h_n (L*D, N, H), hidden_states (L-1, T, N, D*H),
// workspace (L, D, T, N, 4H)
std::tuple<Tensor, Tensor, Tensor, Tensor> gru_forward(const Tensor& input, const Tensor& hx,
                                                       at::TensorList weights,
                                                       const optional<Tensor>& lengths,
                                                       const optional<Tensor>& dropout_mask,
                                                       int64_t num_layers, bool bidirectional,
                                                       bool has_biases);
std::tuple<Tensor, Tensor, std::vector<Tensor>> gru_backward(
    const Tensor& input, const Tensor& hx, at::TensorList weights,
    const optional<Tensor>& lengths, const optional<Tensor>& dropout_mask, const Tensor& output,
    const Tensor& hidden_states, const Tensor& workspace, const optional<Tensor>& grad_output,
    const optional<Tensor>& grad_hn, int64_t num_layers, bool bidirectional, bool has_biases,
    bool input_grad);

// One step of a cell (CellKind as an integer): input (N, C) or (C), states
// (h) or (h, c) like it, or none for zeros; the layer's forward op over one
// layer, one direction and one step, called through the dispatcher so that
// autograd, autocast and the transforms' kernels apply; returns the new
// states shaped as the input came. fastrnn's cells call it from Python in
// eager mode: one call where the op through torch.ops takes several view
// ops around it, each a Python call.
std::vector<Tensor> cell_step(int64_t kind, const Tensor& input, const std::vector<Tensor>& states,
                              const std::vector<Tensor>& weights, bool has_biases);

}  // namespace fastrnn
