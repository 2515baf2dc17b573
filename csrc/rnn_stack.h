// The device-independent forward and backward of a whole stack (all layers
// and directions) of any cell: every GEMM goes through ATen, and only the
// time loop of a layer is handed to the device (recurrence.h). The ops in
// rnn_ops.cpp are thin wrappers around these two.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

#include "rnn_args.h"

namespace fastrnn {

// t's memory seen as a contiguous tensor of `sizes`, made without the
// dispatcher (an alias with a version counter of its own, for the ops'
// kernels below autograd; t contiguous, of as many elements): the shape a
// time loop reads.
at::Tensor shaped(const at::Tensor& t, at::IntArrayRef sizes);

struct StackForward {
  at::Tensor output;         // (T, N, D*P)
  at::Tensor h_n;            // (L*D, N, P)
  at::Tensor c_n;            // (L*D, N, H), LSTM; else undefined
  at::Tensor hidden_states;  // (L-1, T, N, D*P): the outputs of every layer but the last
  at::Tensor workspace;      // (L, D, T, N, Ws): what each step kept for the backward
};

StackForward stack_forward(const Stack& s, const at::Tensor& input, const at::Tensor& hx,
                           const std::optional<at::Tensor>& cx, at::TensorList weights,
                           const std::optional<at::Tensor>& lengths,
                           const std::optional<at::Tensor>& dropout_mask);

// Whether stack_forward keeps the workspace on this thread (true unless
// set); returns the previous setting. The layers' eager calls that no
// backward can follow (no grad mode, nothing requiring grad) turn it off
// around the op: the CPU kernels then write no saved values, and an
// expanded zero of the workspace's shape stands in for it. Never under
// torch.compile, whose compiled forward runs with grad mode off and feeds
// the workspace to its backward.
bool set_keep_workspace(bool keep);

// set_keep_workspace(keep) for a scope; the previous setting comes back
// however the scope ends.
class KeepWorkspace {
 public:
  explicit KeepWorkspace(bool keep) : was_(set_keep_workspace(keep)) {}
  ~KeepWorkspace() { set_keep_workspace(was_); }
  KeepWorkspace(const KeepWorkspace&) = delete;
  KeepWorkspace& operator=(const KeepWorkspace&) = delete;

 private:
  bool was_;
};

struct StackBackward {
  at::Tensor grad_input;  // (T, N, C); zeros where input_grad is false
  at::Tensor grad_hx;     // (L*D, N, P); zeros where state_grad is false
  at::Tensor grad_cx;     // (L*D, N, H), LSTM, alike; else undefined
  std::vector<at::Tensor> grad_weights;
};

// The gradients of every input of stack_forward from those of its outputs
// (grad_output, grad_hn, grad_cn: none for zero) and what it returned
// (hidden_states may be undefined for one layer). Without weight_grad the
// weights' gradients are not computed (and left undefined).
StackBackward stack_backward(const Stack& s, const at::Tensor& input, const at::Tensor& hx,
                             const std::optional<at::Tensor>& cx, at::TensorList weights,
                             const std::optional<at::Tensor>& lengths,
                             const std::optional<at::Tensor>& dropout_mask,
                             const at::Tensor& output, const at::Tensor& hidden_states,
                             const at::Tensor& workspace,
                             const std::optional<at::Tensor>& grad_output,
                             const std::optional<at::Tensor>& grad_hn,
                             const std::optional<at::Tensor>& grad_cn, bool input_grad,
                             bool state_grad, bool weight_grad = true);

// The stack's forward as plain differentiable ATen ops, one step at a time,
// from the same cell definitions: what double backward differentiates, and
// what the ops run under function transforms and forward-mode AD. Its
// workspace is all zeros: nothing reads it.
StackForward stack_forward_by_steps(const Stack& s, const at::Tensor& input, const at::Tensor& hx,
                                    const std::optional<at::Tensor>& cx, at::TensorList weights,
                                    const std::optional<at::Tensor>& lengths,
                                    const std::optional<at::Tensor>& dropout_mask);

}  // namespace fastrnn
