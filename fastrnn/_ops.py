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


def _fake_forward(input, hx, weights, lengths, dropout_mask, num_layers, bidirectional,
                  has_biases, relu):
    T, N = input.shape[0], input.shape[1]
    D = 2 if bidirectional else 1
    H = hx.shape[2]
    return (
        input.new_empty((T, N, D * H)),
        input.new_empty((num_layers * D, N, H)),
        input.new_empty((num_layers - 1, T, N, D * H)),
    )


def _fake_backward(input, hx, weights, lengths, dropout_mask, output, hidden_states,
                   grad_output, grad_hn, num_layers, bidirectional, has_biases, relu,
                   input_grad=True):
    return (
        input.new_empty(input.shape),
        hx.new_empty(hx.shape),
        [w.new_empty(w.shape) for w in weights],
    )


if _C is not None:
    torch.library.register_fake("fastrnn::rnn_forward")(_fake_forward)
    torch.library.register_fake("fastrnn::rnn_backward")(_fake_backward)
