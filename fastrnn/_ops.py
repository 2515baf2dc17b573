"""The fastrnn ops, as Python sees them.

The schemas live in C++ (csrc/rnn_ops.cpp, `TORCH_LIBRARY(fastrnn, m)`): one
forward and one backward op that every cell shares, the cell named by its
first argument, `torch.ops.fastrnn.forward` and `torch.ops.fastrnn.backward`.
This module loads the extension and adds what torch needs around them: the
fake (meta) kernels that torch.compile traces with. The autograd of the
forward op (whose backward is the backward op) is registered in C++, so that
a call costs no Python beyond the module's own argument handling.

    torch.ops.fastrnn.forward(cell, input (T, N, C), hx [h_0 (L*D, N, P)]
        or, for an LSTM, [h_0, c_0 (L*D, N, H)], weights,
        lengths (N,) or None, dropout_mask (L-1, T, N, D*P) or None,
        num_layers, bidirectional, has_biases, has_projections=False)
      -> output (T, N, D*P), state_n [h_n] or [h_n, c_n],
         hidden_states (L-1, T, N, D*P), workspace (L, D, T, N, Ws)
    torch.ops.fastrnn.backward(cell, input, hx, weights, lengths, dropout_mask,
        output, hidden_states, workspace, grad_output or None,
        grad_state_n [grad_h_n or None, (grad_c_n or None)], num_layers,
        bidirectional, has_biases, has_projections=False, input_grad=True,
        state_grad=True)
      -> grad_input, grad_hx (one per state), grad_weights

Without input_grad the input's gradient, without state_grad the initial
states', are not computed and come back as zeros (what the autograd of the
forward op asks for where they need none).

`cell` is "rnn_tanh", "rnn_relu", "lstm" or "gru" (`CELLS`). `weights` is
torch.nn's flat list (`_flat_weights`): per layer and direction, weight_ih
(G*H, C_l), weight_hh (G*H, P), with biases bias_ih (G*H,) and bias_hh
(G*H,), with projections weight_hr (P, H); G is the cell's gates. Ws is the
values a step keeps for the backward per hidden unit (0, 5 and 4 for
Elman, LSTM and GRU) times H.
"""

import importlib.util
import os
import warnings
from typing import NamedTuple

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


class Cell(NamedTuple):
    gates: int
    states: int
    saved: int  # values a step keeps for the backward, per hidden unit


CELLS = {}


def cell_traits(cell):
    """CELLS[cell], or the C++ ops' error for a name that is no cell."""
    try:
        return CELLS[cell]
    except KeyError:
        raise RuntimeError(f"unknown cell '{cell}': expected rnn_tanh, rnn_relu, lstm or gru") from None


def _check_devices(input, hx, cx, weights, lengths=None, dropout_mask=None):
    """The C++ ops' device checks (csrc/rnn_args.cpp), in the meta kernel too:
    the dispatcher picks the meta kernel when any argument is on the meta
    device, and that kernel must not hand a CPU caller empty CPU tensors."""
    named = [("hx", hx), ("cx", cx), ("lengths", lengths), ("dropout_mask", dropout_mask)]
    named += [(f"weights[{i}]", w) for i, w in enumerate(weights)]
    for name, t in named:
        if t is not None and t.device != input.device:
            raise RuntimeError(f"{name} must be on the input's device {input.device}, got {t.device}")


def _fake_forward(cell, input, hx, weights, lengths, dropout_mask, num_layers, bidirectional,
                  has_biases, has_projections=False):
    _check_devices(input, hx[0], hx[1] if len(hx) > 1 else None, weights, lengths, dropout_mask)
    T, N = input.shape[0], input.shape[1]
    D = 2 if bidirectional else 1
    P = hx[0].shape[2]
    H = hx[-1].shape[2]  # c's width for an LSTM (P < H with projections), else P
    state_n = [input.new_empty((num_layers * D, N, h.shape[2])) for h in hx]
    return (input.new_empty((T, N, D * P)), state_n,
            input.new_empty((num_layers - 1, T, N, D * P)),
            input.new_empty((num_layers, D, T, N, cell_traits(cell).saved * H)))


def _fake_backward(cell, input, hx, weights, lengths, dropout_mask, output, hidden_states,
                   workspace, grad_output, grad_state_n, num_layers, bidirectional, has_biases,
                   has_projections=False, input_grad=True, state_grad=True):
    _check_devices(input, hx[0], hx[1] if len(hx) > 1 else None, weights, lengths, dropout_mask)
    return (input.new_empty(input.shape), [h.new_empty(h.shape) for h in hx],
            [w.new_empty(w.shape) for w in weights])


if _C is not None:
    # What each cell is to the ops, from the cells' own definitions
    # (csrc/cells.h): its gates, its states (h, or h and c) and the values a
    # step keeps per hidden unit for the backward.
    CELLS = {name: Cell(*traits) for name, traits in _C.cells().items()}
    torch.library.register_fake("fastrnn::forward")(_fake_forward)
    torch.library.register_fake("fastrnn::backward")(_fake_backward)

    from . import _transforms

    _transforms.register()

    if cuda_built() and os.environ.get("FASTRNN_CUDA_PATH"):
        _C.set_cuda_path(os.environ["FASTRNN_CUDA_PATH"])
