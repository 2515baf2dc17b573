"""The fastrnn ops, as Python sees them.

The schemas live in C++ (csrc/rnn_ops.cpp, `TORCH_LIBRARY(fastrnn, m)`): one
forward and one backward op per cell type, `torch.ops.fastrnn.{rnn,lstm,gru}_
{forward,backward}`. This module loads the extension and adds what torch
needs around them: the fake (meta) kernels that torch.compile traces with.
The autograd of the forward ops (whose backward is the backward op) is
registered in C++, so that a call costs no Python beyond the module's own
argument handling.

    torch.ops.fastrnn.rnn_forward(input (T, N, C), hx (L*D, N, H), weights,
        lengths (N,) or None, dropout_mask (L-1, T, N, D*H) or None,
        num_layers, bidirectional, has_biases, relu)
      -> output (T, N, D*H), h_n (L*D, N, H), hidden_states (L-1, T, N, D*H)
    torch.ops.fastrnn.lstm_forward(input, hx (L*D, N, P), cx (L*D, N, H),
        weights, lengths, dropout_mask, num_layers, bidirectional, has_biases,
        has_projections)
      -> output (T, N, D*P), h_n, c_n, hidden_states, workspace (L, D, T, N, 5H)
    torch.ops.fastrnn.gru_forward(input, hx, weights, lengths, dropout_mask,
        num_layers, bidirectional, has_biases)
      -> output, h_n, hidden_states, workspace (L, D, T, N, 4H)

`weights` is torch.nn's flat list (`_flat_weights`): per layer and
direction, weight_ih (G*H, C_l), weight_hh (G*H, P), with biases bias_ih
(G*H,) and bias_hh (G*H,), with projections weight_hr (P, H); G is 1, 4 or 3.
"""

import importlib.util
import os
import warnings

import torch

# The dtypes the fused kernels take, on every device (csrc/rnn_args.cpp has
# the same list): float16 and bfloat16 with float32 arithmetic and state.
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _built_for():
    """fastrnn/_build_info.py, which the build wrote beside the extension, or
    None (an extension built some other way, or none)."""
    try:
        from . import _build_info
    except ImportError:
        return None
    return _build_info


def _torch_mismatch(info):
    """What differs between the torch the extension was built for and this
    one, with what to do about it; None where nothing does."""
    if info is None or (info.torch, info.torch_cuda) == (torch.__version__, torch.version.cuda):
        return None
    return (f"fastrnn's extension was built for PyTorch {info.torch} with CUDA {info.torch_cuda}, "
            f"and this is PyTorch {torch.__version__} with CUDA {torch.version.cuda}: rebuild it "
            "against this torch, in this environment, with `pip install --no-build-isolation .` "
            "(from a checkout or an unpacked source archive)")


def _load():
    """(the extension module or None, why it is None, a torch mismatch)."""
    here = os.path.dirname(os.path.abspath(__file__))
    mismatch = _torch_mismatch(_built_for())
    if importlib.util.find_spec("fastrnn._C") is None:
        return None, (f"no compiled extension fastrnn._C next to {here}: build it with "
                      "`python setup.py build_ext --inplace`, or install fastrnn with "
                      "`pip install --no-build-isolation .` into this environment"), None
    try:
        from . import _C
    except ImportError as exc:
        why = f"fastrnn._C failed to load ({exc})"
        return None, f"{why}; {mismatch}" if mismatch else why, None
    return _C, None, mismatch


_C, _EXTENSION_ERROR, _MISMATCH = _load()
_warned_missing = False


def warn_missing_extension(stacklevel=2):
    """Warns, once a process, that the fused kernels are not available and why."""
    global _warned_missing
    if not _warned_missing:
        _warned_missing = True
        warnings.warn(f"fastrnn's compiled extension is not available: {_EXTENSION_ERROR}. "
                      "fastrnn's layers run through torch.nn's implementation.",
                      RuntimeWarning, stacklevel=stacklevel + 1)


if _C is None:
    warn_missing_extension(stacklevel=3)
elif _MISMATCH:
    warnings.warn(_MISMATCH, RuntimeWarning, stacklevel=2)


def available():
    """True when the compiled extension is loaded."""
    return _C is not None


def cuda_built():
    """True when the extension was compiled with its CUDA kernels."""
    return _C is not None and bool(_C.cuda_built)


def extension_error():
    """Why the compiled extension is not available (None when it is)."""
    return _EXTENSION_ERROR


def _check_devices(input, hx, cx, weights, lengths=None, dropout_mask=None):
    """The C++ ops' device checks (csrc/rnn_args.cpp), in the meta kernel too:
    the dispatcher picks the meta kernel when any argument is on the meta
    device, and that kernel must not hand a CPU caller empty CPU tensors."""
    named = [("hx", hx), ("cx", cx), ("lengths", lengths), ("dropout_mask", dropout_mask)]
    named += [(f"weights[{i}]", w) for i, w in enumerate(weights)]
    for name, t in named:
        if t is not None and t.device != input.device:
            raise RuntimeError(f"{name} must be on the input's device {input.device}, got {t.device}")


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
    _check_devices(input, hx, None, weights, lengths, dropout_mask)
    return _fake_outputs(input, hx, num_layers, bidirectional, hx.shape[2])


def _fake_backward(input, hx, weights, lengths, dropout_mask, output, hidden_states,
                   grad_output, grad_hn, num_layers, bidirectional, has_biases, relu,
                   input_grad=True):
    _check_devices(input, hx, None, weights, lengths, dropout_mask)
    return _fake_grads(input, hx, weights)


def _fake_lstm_forward(input, hx, cx, weights, lengths, dropout_mask, num_layers, bidirectional,
                       has_biases, has_projections):
    _check_devices(input, hx, cx, weights, lengths, dropout_mask)
    # An LSTM step keeps its gates i, f, g, o and its state c.
    return _fake_outputs(input, hx, num_layers, bidirectional, cx.shape[2], cx=cx, saved=5)


def _fake_lstm_backward(input, hx, cx, weights, lengths, dropout_mask, output, hidden_states,
                        workspace, grad_output, grad_hn, grad_cn, num_layers, bidirectional,
                        has_biases, has_projections, input_grad=True):
    _check_devices(input, hx, cx, weights, lengths, dropout_mask)
    return _fake_grads(input, hx, weights, cx=cx)


def _fake_gru_forward(input, hx, weights, lengths, dropout_mask, num_layers, bidirectional,
                      has_biases):
    _check_devices(input, hx, None, weights, lengths, dropout_mask)
    # A GRU step keeps r, z, n and h_prev W_hn^T + b_hn.
    return _fake_outputs(input, hx, num_layers, bidirectional, hx.shape[2], saved=4)


def _fake_gru_backward(input, hx, weights, lengths, dropout_mask, output, hidden_states, workspace,
                       grad_output, grad_hn, num_layers, bidirectional, has_biases,
                       input_grad=True):
    _check_devices(input, hx, None, weights, lengths, dropout_mask)
    return _fake_grads(input, hx, weights)


if _C is not None:
    for _name, _fake in (("rnn_forward", _fake_forward), ("rnn_backward", _fake_backward),
                         ("lstm_forward", _fake_lstm_forward),
                         ("lstm_backward", _fake_lstm_backward),
                         ("gru_forward", _fake_gru_forward), ("gru_backward", _fake_gru_backward)):
        torch.library.register_fake(f"fastrnn::{_name}")(_fake)

    from . import _transforms

    _transforms.register()

    if cuda_built() and os.environ.get("FASTRNN_CUDA_PATH"):
        _C.set_cuda_path(os.environ["FASTRNN_CUDA_PATH"])
