"""The fastrnn ops, as Python sees them.

The schemas live in C++ (csrc/rnn_ops.cpp, `TORCH_LIBRARY(fastrnn, m)`); this
module loads the extension and adds what torch needs around them: the fake
(meta) kernels that torch.compile traces with. The autograd of the forward op
(whose backward is the backward op) is registered in C++, so that a call
costs no Python beyond the module's own argument handling.

    torch.ops.fastrnn.rnn_forward(input (T, N, C), hx (L*D, N, H), weights,
        lengths (N,) or None, dropout_mask (L-1, T, N, D*H) or None,
        num_layers, bidirectional, has_biases, relu)
      -> output (T, N, D*H), h_n (L*D, N, H), hidden_states (L-1, T, N, D*H)

`weights` is nn.RNN's flat list: per layer and direction, weight_ih (H, C_l),
weight_hh (H, H) and, with biases, bias_ih (H,) and bias_hh (H,).
"""

import torch

try:
    from . import _C  # noqa: F401  (loading it registers torch.ops.fastrnn)

    EXTENSION_ERROR = None
except ImportError as exc:  # the package still works, through nn.RNN
    _C = None
    EXTENSION_ERROR = exc


def available():
    """True when the compiled extension is loaded."""
    return _C is not None


def cuda_built():
    """True when the extension was compiled with its CUDA kernels."""
    return _C is not None and bool(_C.cuda_built)


def _fake_outputs(input, hx, num_layers, bidirectional, width, cx=None, saved=0):
    """output (T, N, D*P), h_n (L*D, N, P), [c_n (L*D, N, H)], hidden_states
    (L-1, T, N, D*P), [workspace (L, D, T, N, saved*H)] for P = hx's width."""
    T, N = input.shape[0], input.shape[1]
    D = 2 if bidirectional else 1
    P, H = hx.shape[2], width
    out = [input.new_empty((T, N, D * P)), input.new_empty((num_layers * D, N, P))]
    if cx is not None:
        out.append(input.new_empty((num_layers * D, N, H)))
    out.append(input.new_empty((num_layers - 1, T, N, D * P)))
    if saved:
        out.append(input.new_empty((num_layers, D, T, N, saved * H)))
    return tuple(out)


def _fake_grads(input, hx, weights, cx=None):
    """grad_input, grad_hx, [grad_cx], grad_weights."""
    out = [input.new_empty(input.shape), hx.new_empty(hx.shape)]
    if cx is not None:
        out.append(cx.new_empty(cx.shape))
    return (*out, [w.new_empty(w.shape) for w in weights])


def _fake_forward(input, hx, weights, lengths, dropout_mask, num_layers, bidirectional,
                  has_biases, relu):
    return _fake_outputs(input, hx, num_layers, bidirectional, hx.shape[2])


def _fake_backward(input, hx, weights, lengths, dropout_mask, output, hidden_states,
                   grad_output, grad_hn, num_layers, bidirectional, has_biases, relu,
                   input_grad=True):
    return _fake_grads(input, hx, weights)


def _fake_lstm_forward(input, hx, cx, weights, lengths, dropout_mask, num_layers, bidirectional,
                       has_biases, has_projections):
    # An LSTM step keeps its gates i, f, g, o and its state c.
    return _fake_outputs(input, hx, num_layers, bidirectional, cx.shape[2], cx=cx, saved=5)


def _fake_lstm_backward(input, hx, cx, weights, lengths, dropout_mask, output, hidden_states,
                        workspace, grad_output, grad_hn, grad_cn, num_layers, bidirectional,
                        has_biases, has_projections, input_grad=True):
    return _fake_grads(input, hx, weights, cx=cx)


def _fake_gru_forward(input, hx, weights, lengths, dropout_mask, num_layers, bidirectional,
                      has_biases):
    # A GRU step keeps r, z, n and h_prev W_hn^T + b_hn.
    return _fake_outputs(input, hx, num_layers, bidirectional, hx.shape[2], saved=4)


def _fake_gru_backward(input, hx, weights, lengths, dropout_mask, output, hidden_states, workspace,
                       grad_output, grad_hn, num_layers, bidirectional, has_biases,
                       input_grad=True):
    return _fake_grads(input, hx, weights)


if _C is not None:
    for _name, _fake in (("rnn_forward", _fake_forward), ("rnn_backward", _fake_backward),
                         ("lstm_forward", _fake_lstm_forward),
                         ("lstm_backward", _fake_lstm_backward),
                         ("gru_forward", _fake_gru_forward), ("gru_backward", _fake_gru_backward)):
        torch.library.register_fake(f"fastrnn::{_name}")(_fake)
