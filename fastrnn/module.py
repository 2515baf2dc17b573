"""fastrnn.RNN, LSTM and GRU and the cells RNNCell, LSTMCell and GRUCell:
drop-in replacements for torch.nn's six recurrent layers with fused
recurrences."""

from __future__ import annotations

import logging
import warnings
from typing import Optional, Tuple, Union

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from . import _ops, backend as _backend

_log = logging.getLogger("fastrnn")

_DTYPE_NAMES = {
    torch.float32: "Float",
    torch.float64: "Double",
    torch.float16: "Half",
    torch.bfloat16: "BFloat16",
    torch.int64: "Long",
    torch.int32: "Int",
}

def _exporting_to_onnx():
    # torch.onnx.is_in_onnx_export() costs a microsecond; either exporter
    # traces first (TorchScript's tracer, torch.export), which costs nothing
    # to ask.
    return ((torch._C._get_tracing_state() is not None or torch.compiler.is_exporting())
            and torch.onnx.is_in_onnx_export())


def _dtype_name(dtype):
    return _DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", "").capitalize())


def _unpack(data, batch_sizes):
    """A packed sequence's data (sum of lengths, C) as a padded (T, N, C) in
    sorted order, the rows' lengths on data's device, and the positions
    t * N + n of the packed rows. batch_sizes lives on the CPU, so the
    positions are found there and copied over as integers, without waiting
    (pageable memory is staged before the copy returns): a boolean mask on the
    GPU would wait for the device to count it."""
    T, N = batch_sizes.numel(), int(batch_sizes[0])
    valid = torch.arange(N).unsqueeze(0) < batch_sizes.unsqueeze(1)  # (T, N)
    lengths = valid.sum(0).to(data.device, non_blocking=True)
    rows = valid.flatten().nonzero().squeeze(1).to(data.device, non_blocking=True)
    x = data.new_zeros(T * N, data.shape[-1]).index_put((rows,), data)
    return x.view(T, N, data.shape[-1]), lengths, rows


class _Backend:
    """What fastrnn's layers and cells share: the backend, the choice between
    the fused kernel and torch.nn's implementation, what ran, and the
    torch.nn twin that TorchScript takes."""

    _OWN = ("backend", "last_path", "last_cuda_path")

    def _init_backend(self, backend):
        if backend is not None:
            _backend._check(backend)
        self.backend = backend
        self.last_path = None
        self.last_cuda_path = None
        if not _ops.available() and _backend.resolve(backend) != "torch":
            _ops.warn_missing_extension(stacklevel=4)

    def extra_repr(self):
        s = super().extra_repr()
        if self.backend is not None:
            s += f", backend={self.backend!r}"
        return s

    def __setstate__(self, state):
        super().__setstate__(state)
        for key in self._OWN:
            self.__dict__.setdefault(key, None)

    def __prepare_scriptable__(self):
        # torch.jit.script takes the torch.nn layer with the same parameters
        # (shared, not copied): TorchScript cannot call the fused ops' Python
        # wrapper, and torch.compile or torch.export are the routes that keep it.
        return self._torch_twin()

    def _torch_twin(self):
        cls = self._torch_class()
        twin = cls.__new__(cls)
        nn.Module.__init__(twin)
        for key, value in self.__dict__.items():
            if key not in ("_parameters", "_buffers", "_modules", "training") + self._OWN:
                twin.__dict__[key] = value
        twin.training = self.training
        for name, param in self._parameters.items():
            twin._parameters[name] = param
        if isinstance(twin, nn.RNNBase):
            twin._init_flat_weights()
        return twin

    def _fused_applies(self, data):
        name = _backend.resolve(self.backend)
        if name == "torch" or _exporting_to_onnx():
            return False
        if not _ops.available():
            if name == "fused":
                raise RuntimeError(
                    f"fastrnn's compiled extension is not available ({_ops.extension_error()}), "
                    "so backend='fused' cannot run; build it (README: Build and test) or use "
                    "backend='torch'"
                )
            if not torch.compiler.is_compiling():
                _ops.warn_missing_extension(stacklevel=5)
            return False
        if name == "fused":
            return True
        return data.is_cuda and _ops.cuda_built() and data.dtype in _ops.DTYPES

    def _ran_torch(self):
        # Plain attributes set through __dict__: nn.Module's __setattr__
        # costs microseconds a call.
        self.__dict__["last_path"] = "torch"
        self.__dict__["last_cuda_path"] = None

    def _log_kernel(self, data):
        if self.last_path == "torch":
            _log.debug("fastrnn.%s: torch.nn's implementation (backend %r, %s tensors)",
                       type(self).__name__, _backend.resolve(self.backend), data.device.type)
        elif data.is_cuda:
            _log.debug("fastrnn.%s: fused CUDA kernels, %s path", type(self).__name__,
                       self.last_cuda_path)
        else:
            _log.debug("fastrnn.%s: fused CPU kernels (%s)", type(self).__name__,
                       _ops._C.cpu_isa())

    def _record_cuda_path(self, x):
        if not torch.compiler.is_compiling():
            # The extension records the path per thread; read it on the
            # thread that just ran the forward.
            self.__dict__["last_cuda_path"] = (_ops._C.last_cuda_path()
                                               if x.is_cuda and _ops.cuda_built() else None)


class _FusedBase(_Backend, nn.RNNBase):
    """What the three layers share besides the backend: the dropout masks,
    nn's checks and nn's errors for weights of the wrong shape."""

    _torch_forward = None  # nn.RNN.forward, nn.LSTM.forward or nn.GRU.forward
    _gates = 1

    def _torch_class(self):
        return {"RNN_TANH": nn.RNN, "RNN_RELU": nn.RNN, "LSTM": nn.LSTM, "GRU": nn.GRU}[self.mode]

    def _run(self, input, hx):
        data = input.data if isinstance(input, PackedSequence) else input
        if not self._fused_applies(data):
            self._ran_torch()
            if self.mode == "LSTM" and data.device.type == "cpu" and torch.compiler.is_compiling():
                out = _torch_lstm_outside_the_graph(self, input, hx)
            else:
                out = type(self)._torch_forward(self, input, hx)
        else:
            self.__dict__["last_path"] = "fused"
            out = self._plain_forward(input, hx)
            if out is None:
                out = self._fused_forward(input, hx)
        if not torch.compiler.is_compiling() and _log.isEnabledFor(logging.DEBUG):
            self._log_kernel(data)
        return out

    def _weights(self):
        # Looked up on every call, as torch.nn does: functional_call swaps
        # the entries of _parameters without telling _flat_weights; a
        # parametrized weight is not there and is computed on each access.
        params = self._parameters
        try:
            return [params[name] for name in self._flat_weights_names]
        except KeyError:
            return [getattr(self, name) for name in self._flat_weights_names]

    def _dropout_mask(self, x, width, rows=None):
        """(L-1, T, N, D*width) keep-masks scaled by 1/(1-p), or None.

        torch.nn's draws, one for one: it calls dropout on each layer's output
        but the last, as it holds it, (T, N, D*width) or, for packed input,
        the packed rows (sum of lengths, D*width); so one bernoulli tensor of
        that shape per layer, in layer order, then the packed rows scattered
        to their padded places (``rows``). At p = 1 torch.nn multiplies by
        zero without drawing, so the generator is left as it was."""
        if not (self.training and self.dropout > 0 and self.num_layers > 1):
            return None
        T, N = x.shape[0], x.shape[1]
        D = 2 if self.bidirectional else 1
        drops = self.num_layers - 1
        if self.dropout >= 1:
            return x.new_zeros((drops, T, N, D * width))
        keep = 1.0 - self.dropout
        shape = (T * N if rows is None else rows.numel(), D * width)
        mask = torch.stack([x.new_empty(shape).bernoulli_(keep) for _ in range(drops)])
        if rows is not None:
            mask = mask.new_zeros((drops, T * N, D * width)).index_copy_(1, rows, mask)
        return mask.div_(keep).view(drops, T, N, D * width)

    def _plain_forward(self, input, hx):
        """The fused forward of the plainest call, the one a stream makes step
        by step: a padded batch (T, N, C) or (N, T, C) of this layer's
        width, states of exactly the expected shapes or none, one dtype and
        device throughout, no autocast, no dropout mask to draw. torch.nn's
        checks all pass on such a call, so they are skipped, in one call
        into the extension (`_C.layer_forward`, which checks the rest); any
        other call, or one the op refuses, returns None for _fused_forward,
        which runs nn's argument handling in full."""
        # A rebased subclass may check or permute its arguments its own way;
        # a tensor subclass or a torch function mode must see the op called
        # through torch.ops.
        if type(input) is not torch.Tensor or isinstance(type(self), _Rebased) \
                or (self.training and self.dropout > 0 and self.num_layers > 1) \
                or torch.compiler.is_compiling() or torch._C._is_any_autocast_enabled() \
                or torch._C._is_torch_function_mode_enabled():
            return None
        lstm = self.mode == "LSTM"
        try:
            states = [] if hx is None else list(hx) if lstm else [hx]
            out = _ops._C.layer_forward(_LAYER_CELLS[self.mode], input, states, self._weights(),
                                        self.input_size, self.hidden_size, self.proj_size,
                                        self.num_layers, self.bidirectional, self.bias,
                                        self.batch_first)
        except (RuntimeError, TypeError, ValueError, IndexError):
            return None
        if not out:
            return None
        # _record_cuda_path, inline: this call is never compiled.
        self.__dict__["last_cuda_path"] = _ops._C.last_cuda_path() if input.is_cuda else None
        return (out[0], (out[1], out[2])) if lstm else (out[0], out[1])

    def _check_devices(self, x, states, weights):
        # What torch.nn's implementation checks before it runs (RNN.cpp's
        # check_attributes): every state, then every weight, on the input's
        # device. The fused op's meta kernel would otherwise answer a call
        # with one meta tensor among CPU ones.
        for kind, tensors in (("hidden", states), ("parameter", weights)):
            for t in tensors:
                if t.device != x.device:
                    raise RuntimeError(
                        f"Input and {kind} tensors are not at the same device, found input "
                        f"tensor at {x.device} and {kind} tensor at {t.device}")

    def _check_state_dtype(self, state, weight):
        # What torch.nn's first matrix product of a state with weight_hh raises
        # (under autocast the op casts them, as torch.nn's cuDNN path does).
        # (torch.nn's meta kernels let the dtypes differ.)
        if (state.dtype != weight.dtype and not torch._C._is_any_autocast_enabled()
                and not state.is_meta):
            raise RuntimeError(
                "mat1 and mat2 must have the same dtype, but got "
                f"{_dtype_name(state.dtype)} and {_dtype_name(weight.dtype)}"
            )

    def _check_lstm_state_dtypes(self, x, h0, c0, weight):
        """(h0, c0) as the fused LSTM takes them, or torch.nn.LSTM's error.

        On the CPU, for the dtypes oneDNN takes, nn.LSTM runs oneDNN, which
        rejects any state whose dtype is not the input's with a message of its
        own; that message comes first here, then what is wrong. Elsewhere a
        mismatched h_0 fails nn's first matrix product, and a c_0 that the
        weights' dtype holds exactly is promoted in nn's arithmetic, which
        casting it reproduces bit for bit."""
        if (torch._C._is_any_autocast_enabled() or (h0.dtype == weight.dtype == c0.dtype)
                or x.is_meta):
            return h0, c0
        if _nn_lstm_runs_onednn(x):
            why = ("get_mkldnn_dtype: unsupported data type"
                   if any(s.dtype not in (torch.float32, torch.bfloat16, torch.float16)
                          for s in (h0, c0))
                   else "could not create a primitive descriptor for the LSTM forward propagation "
                        "primitive. Run workload with environment variable ONEDNN_VERBOSE=all to "
                        "get additional diagnostic information.")
            raise RuntimeError(
                f"{why} (h_0 is {_dtype_name(h0.dtype)}, c_0 {_dtype_name(c0.dtype)} and the "
                f"weights {_dtype_name(weight.dtype)}: the states must have the weights' dtype)")
        self._check_state_dtype(h0, weight)
        if torch.promote_types(c0.dtype, weight.dtype) == weight.dtype and c0.dtype.is_floating_point:
            return h0, c0.to(weight.dtype)
        self._check_state_dtype(c0, weight)
        return h0, c0

    def _raise_torch_shape_error(self, weights, rows_ih, rows_hh):
        """Raises what torch.nn raises for the first weight of the wrong
        shape, in the order its implementation uses them (per layer and
        direction: weight_ih over all steps, bias_ih, weight_hh on a step,
        bias_hh, weight_hr); returns where every shape is right."""
        D = 2 if self.bidirectional else 1
        P = self.proj_size if self.proj_size > 0 else self.hidden_size
        GH = self._gates * self.hidden_size
        per = len(weights) // (self.num_layers * D)
        for layer in range(self.num_layers):
            in_size = self.input_size if layer == 0 else D * P
            for d in range(D):
                w = weights[(layer * D + d) * per:(layer * D + d + 1) * per]
                w_ih, w_hh = w[0], w[1]
                biases = w[2:4] if self.bias else []
                w_hr = w[-1] if self.proj_size > 0 else None
                uses = [(w_ih, rows_ih, in_size), (biases[0] if biases else None, rows_ih, None),
                        (w_hh, rows_hh, P), (biases[1] if biases else None, rows_hh, None),
                        (w_hr, rows_hh, self.hidden_size)]
                for t, rows, cols in uses:
                    if t is None:
                        continue
                    if cols is not None and t.dim() == 2 and t.shape[1] != cols:
                        raise RuntimeError(
                            f"mat1 and mat2 shapes cannot be multiplied ({rows}x{cols} and "
                            f"{t.shape[1]}x{t.shape[0]})")
                    if cols is None and t.shape != (GH,) and t.dim() == 1:
                        raise RuntimeError(
                            f"The expanded size of the tensor ({GH}) must match the existing "
                            f"size ({t.shape[0]}) at non-singleton dimension 1.  Target sizes: "
                            f"[{rows}, {GH}].  Tensor sizes: [{t.shape[0]}]")

    def _call(self, x, weights, args, rows_ih, rows_hh):
        """The forward op on (input, states, weights, lengths, dropout mask),
        this layer's cell and options added; torch.nn's error for a weight of
        the wrong shape where the op refuses the call."""
        try:
            return _call_op(_forward_op, (_LAYER_CELLS[self.mode], *args, self.num_layers,
                                          self.bidirectional, self.bias, self.proj_size > 0))
        except RuntimeError:
            self._raise_torch_shape_error(weights, rows_ih, rows_hh)
            raise


_OUTSIDE_REASON = ("torch.nn's LSTM on the CPU (oneDNN) runs outside the compiled graph, as "
                   "torch.nn.LSTM does; backend='fused' compiles into one graph")


def _disable_compile(fn):
    try:
        return torch.compiler.disable(fn, reason=_OUTSIDE_REASON)
    except TypeError:  # torch before 2.8 takes no reason
        return torch.compiler.disable(fn)


@_disable_compile
def _torch_lstm_outside_the_graph(layer, input, hx):
    """nn.LSTM's forward, run eagerly where torch.compile meets it: on the CPU
    it calls oneDNN's LSTM op, which inductor fails to compile (an
    `aten.mkldnn_rnn_layer` argument that is not a Tensor), and dynamo never
    traces nn.LSTM itself for that reason. So a compiled model breaks its
    graph here, as it would at the torch.nn layer."""
    return nn.LSTM.forward(layer, input, hx)


def _prepare_rnn_gru(layer, input, hx, name, tensor_word):
    """nn.RNN's and nn.GRU's argument handling, in their order, so that every
    error is theirs: (x (T, N, C), hx, lengths, packed rows, packing, batched,
    batch dim)."""
    num_directions = 2 if layer.bidirectional else 1
    if isinstance(input, PackedSequence):
        data, batch_sizes, sorted_indices, unsorted_indices = input
        max_batch_size = int(batch_sizes[0])
        if hx is None:
            hx = torch.zeros(layer.num_layers * num_directions, max_batch_size, layer.hidden_size,
                             dtype=data.dtype, device=data.device)
        else:
            hx = layer.permute_hidden(hx, sorted_indices)
        layer.check_forward_args(data, hx, batch_sizes)
        x, lengths, rows = _unpack(data, batch_sizes)
        return x, hx, lengths, rows, (batch_sizes, sorted_indices, unsorted_indices), True, 1
    if input.dim() not in (2, 3):
        raise ValueError(f"{name}: Expected input to be 2D or 3D, got {input.dim()}D{tensor_word} instead")
    is_batched = input.dim() == 3
    batch_dim = 0 if layer.batch_first else 1
    if not is_batched:
        input = input.unsqueeze(batch_dim)
        if hx is not None:
            if hx.dim() != 2:
                raise RuntimeError(
                    f"For unbatched 2-D input, hx should also be 2-D but got {hx.dim()}-D tensor")
            hx = hx.unsqueeze(1)
    elif hx is not None and hx.dim() != 3:
        raise RuntimeError(
            f"For batched 3-D input, hx should also be 3-D but got {hx.dim()}-D tensor")
    max_batch_size = input.size(0) if layer.batch_first else input.size(1)
    if hx is None:
        hx = torch.zeros(layer.num_layers * num_directions, max_batch_size, layer.hidden_size,
                         dtype=input.dtype, device=input.device)
    layer.check_forward_args(input, hx, None)
    x = input.transpose(0, 1) if layer.batch_first else input
    return x, hx, None, None, None, is_batched, batch_dim


def _finish(layer, output, rows, packing, is_batched, batch_dim):
    """The output as the input came: packed, batch-first, unbatched."""
    if packing is not None:
        batch_sizes, sorted_indices, unsorted_indices = packing
        return PackedSequence(output.reshape(-1, output.shape[-1])[rows], batch_sizes,
                              sorted_indices, unsorted_indices)
    if layer.batch_first:
        output = output.transpose(0, 1)
    if not is_batched:
        output = output.squeeze(batch_dim)
    return output


def _fused_single_state(layer, input, hx, name, tensor_word):
    """The fused forward of the layers with one state (RNN, GRU): torch.nn's
    argument handling, the op, the output as the input came."""
    x, hx, lengths, rows, packing, is_batched, batch_dim = _prepare_rnn_gru(
        layer, input, hx, name, tensor_word)
    _check_steps(x)
    weights = layer._weights()
    layer._check_devices(x, (hx,), weights)
    layer._check_state_dtype(hx, weights[0])
    out = layer._call(
        x, weights, (x, [hx], weights, lengths, layer._dropout_mask(x, layer.hidden_size, rows)),
        x.shape[0] * x.shape[1], x.shape[1])
    h_n = out[1][0]
    layer._record_cuda_path(x)
    output = _finish(layer, out[0], rows, packing, is_batched, batch_dim)
    if packing is not None:
        return output, layer.permute_hidden(h_n, packing[2])
    return output, (h_n if is_batched else h_n.squeeze(1))


def _nn_lstm_runs_onednn(x):
    """Whether nn.LSTM runs oneDNN for this input (RNN.cpp's use_mkldnn)."""
    if not (x.device.type == "cpu" and x.numel() and torch._C._get_mkldnn_enabled()):
        return False
    if x.dtype == torch.float32:
        return True
    if x.dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return (x.dtype == torch.float16 and not torch.is_grad_enabled()
            and torch.ops.mkldnn._is_mkldnn_fp16_supported())


def _check_steps(x):
    if x.shape[0] == 0:
        raise RuntimeError("Expected sequence length to be larger than 0 in RNN")


class RNN(_FusedBase):
    r"""An Elman RNN with a fused recurrence, interchangeable with :class:`torch.nn.RNN`.

    ``h_t = act(x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh)``, ``act`` tanh or relu.
    The arguments, parameters (names, shapes, initialisation), ``repr``,
    ``state_dict`` and errors are nn.RNN's; see :class:`torch.nn.RNN`.

    Args:
        backend: ``'auto'`` (the fused kernel for CUDA tensors, nn.RNN's own
            implementation for CPU tensors), ``'fused'`` (the fused kernel on
            CPU and CUDA alike) or ``'torch'`` (always nn.RNN's implementation).
            None (the default): the backend of the enclosing
            :func:`fastrnn.use_backend` block, else the process-wide default
            (:func:`fastrnn.set_default_backend`, ``'auto'`` unless changed).

    After each call, ``last_path`` says which ran (``'fused'`` or ``'torch'``)
    and, after a fused call on CUDA, ``last_cuda_path`` which CUDA time loop
    ran its forward (``'persistent'``, ``'cluster'``, ``'grid'`` or
    ``'step'``), else None (both are left as they were under torch.compile).

    It derives from ``nn.RNNBase``, not ``nn.RNN``, so that torch.compile
    traces it (dynamo stops at every nn.RNN instance).
    """

    _torch_forward = nn.RNN.forward

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1,
                 nonlinearity: str = "tanh", bias: bool = True, batch_first: bool = False,
                 dropout: float = 0.0, bidirectional: bool = False, device=None, dtype=None,
                 *, backend: Optional[str] = None, **kwargs) -> None:
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        if kwargs:
            raise TypeError(f"RNN.__init__() got an unexpected keyword argument '{next(iter(kwargs))}'")
        self.nonlinearity = nonlinearity
        if nonlinearity == "tanh":
            mode = "RNN_TANH"
        elif nonlinearity == "relu":
            mode = "RNN_RELU"
        else:
            raise ValueError(f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or 'relu'.")
        super().__init__(mode, input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, device=device, dtype=dtype)
        self._init_backend(backend)

    def forward(self, input: Union[Tensor, PackedSequence], hx: Optional[Tensor] = None
                ) -> Tuple[Union[Tensor, PackedSequence], Tensor]:
        """Runs the RNN over ``input`` from ``hx`` (zeros when None).

        input: (L, N, H_in), (N, L, H_in) with batch_first, (L, H_in) unbatched,
        or a PackedSequence; hx: (D * num_layers, N, H_out) or (D * num_layers,
        H_out) unbatched. Returns ``(output, h_n)`` as :class:`torch.nn.RNN`
        does: output (L, N, D * H_out) (packed if the input was), h_n like hx.
        """
        return self._run(input, hx)

    def _fused_forward(self, input, hx):
        return _fused_single_state(self, input, hx, "RNN", " tensor")


class GRU(_FusedBase):
    r"""A GRU with a fused recurrence, interchangeable with :class:`torch.nn.GRU`.

    PyTorch's gate order and formulas (r, z, n, with the reset gate applied to
    ``h W_hn^T + b_hn``), so that weights move between the two unchanged. The
    arguments, parameters, ``repr``, ``state_dict`` and errors are nn.GRU's;
    see :class:`torch.nn.GRU`. ``backend``, ``last_path`` and
    ``last_cuda_path`` as for :class:`fastrnn.RNN`.
    """

    _torch_forward = nn.GRU.forward
    _gates = 3

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 device=None, dtype=None, *, backend: Optional[str] = None, **kwargs) -> None:
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        if kwargs:
            raise TypeError(f"GRU.__init__() got an unexpected keyword argument '{next(iter(kwargs))}'")
        super().__init__("GRU", input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, device=device, dtype=dtype)
        self._init_backend(backend)

    def forward(self, input: Union[Tensor, PackedSequence], hx: Optional[Tensor] = None
                ) -> Tuple[Union[Tensor, PackedSequence], Tensor]:
        """Runs the GRU over ``input`` from ``hx`` (zeros when None); shapes and
        return value as :class:`torch.nn.GRU`'s: ``(output, h_n)``."""
        return self._run(input, hx)

    def _fused_forward(self, input, hx):
        return _fused_single_state(self, input, hx, "GRU", "")


class LSTM(_FusedBase):
    r"""An LSTM with a fused recurrence, interchangeable with :class:`torch.nn.LSTM`.

    PyTorch's gate order and formulas (i, f, g, o), with ``proj_size``
    projections, so that weights move between the two unchanged. The
    arguments, parameters, ``repr``, ``state_dict``, the ``(h_0, c_0)``
    convention and the errors are nn.LSTM's; see :class:`torch.nn.LSTM`.
    ``backend``, ``last_path`` and ``last_cuda_path`` as for
    :class:`fastrnn.RNN`. On CUDA, projections take the per-step path.
    """

    _torch_forward = nn.LSTM.forward
    _gates = 4

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 proj_size: int = 0, device=None, dtype=None, *,
                 backend: Optional[str] = None) -> None:
        super().__init__("LSTM", input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, proj_size, device=device, dtype=dtype)
        self._init_backend(backend)

    get_expected_cell_size = nn.LSTM.get_expected_cell_size
    check_forward_args = nn.LSTM.check_forward_args
    permute_hidden = nn.LSTM.permute_hidden

    def forward(self, input: Union[Tensor, PackedSequence],
                hx: Optional[Tuple[Tensor, Tensor]] = None
                ) -> Tuple[Union[Tensor, PackedSequence], Tuple[Tensor, Tensor]]:
        """Runs the LSTM over ``input`` from ``hx = (h_0, c_0)`` (zeros when
        None); shapes and return value as :class:`torch.nn.LSTM`'s:
        ``(output, (h_n, c_n))``."""
        return self._run(input, hx)

    def _fused_forward(self, input, hx):
        # nn.LSTM.forward's argument handling, in its order.
        num_directions = 2 if self.bidirectional else 1
        real_hidden_size = self.proj_size if self.proj_size > 0 else self.hidden_size
        packing, rows, lengths = None, None, None
        is_batched, batch_dim = True, 1
        if isinstance(input, PackedSequence):
            data, batch_sizes, sorted_indices, unsorted_indices = input
            max_batch_size = int(batch_sizes[0])
            if hx is None:
                hx = (torch.zeros(self.num_layers * num_directions, max_batch_size,
                                  real_hidden_size, dtype=data.dtype, device=data.device),
                      torch.zeros(self.num_layers * num_directions, max_batch_size,
                                  self.hidden_size, dtype=data.dtype, device=data.device))
            else:
                hx = self.permute_hidden(hx, sorted_indices)
            # nn.LSTM leaves a packed call's states unchecked, and fails later
            # on whatever operation their shape breaks; this names the state.
            self.check_forward_args(data, hx, batch_sizes)
            x, lengths, rows = _unpack(data, batch_sizes)
            packing = (batch_sizes, sorted_indices, unsorted_indices)
        else:
            if input.dim() not in (2, 3):
                raise ValueError(f"LSTM: Expected input to be 2D or 3D, got {input.dim()}D instead")
            is_batched = input.dim() == 3
            batch_dim = 0 if self.batch_first else 1
            if not is_batched:
                input = input.unsqueeze(batch_dim)
            max_batch_size = input.size(0) if self.batch_first else input.size(1)
            if hx is None:
                hx = (torch.zeros(self.num_layers * num_directions, max_batch_size,
                                  real_hidden_size, dtype=input.dtype, device=input.device),
                      torch.zeros(self.num_layers * num_directions, max_batch_size,
                                  self.hidden_size, dtype=input.dtype, device=input.device))
                self.check_forward_args(input, hx, None)
            else:
                if is_batched:
                    if hx[0].dim() != 3 or hx[1].dim() != 3:
                        raise RuntimeError(
                            "For batched 3-D input, hx and cx should also be 3-D but got "
                            f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors")
                else:
                    if hx[0].dim() != 2 or hx[1].dim() != 2:
                        raise RuntimeError(
                            "For unbatched 2-D input, hx and cx should also be 2-D but got "
                            f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors")
                    hx = (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
                self.check_forward_args(input, hx, None)
            x = input.transpose(0, 1) if self.batch_first else input
        _check_steps(x)
        weights = self._weights()
        h0, c0 = hx
        self._check_devices(x, hx, weights)
        h0, c0 = self._check_lstm_state_dtypes(x, h0, c0, weights[0])
        output, (h_n, c_n), _, _ = self._call(
            x, weights,
            (x, [h0, c0], weights, lengths, self._dropout_mask(x, real_hidden_size, rows)),
            x.shape[0] * x.shape[1], x.shape[1])
        self._record_cuda_path(x)
        output = _finish(self, output, rows, packing, is_batched, batch_dim)
        if packing is not None:
            return output, self.permute_hidden((h_n, c_n), packing[2])
        if not is_batched:
            return output, (h_n.squeeze(1), c_n.squeeze(1))
        return output, (h_n, c_n)


class _FusedCell(_Backend):
    """What the three cells share: nn's argument handling and one step of the
    layer's fused op (one layer, one direction, one step: both products, the
    biases and the cell's step), through the extension's cell_step in eager
    mode (one call from Python) and through the op itself under
    torch.compile; arguments the op refuses go to nn's cell."""

    _name = ""       # "RNNCell", "LSTMCell", "GRUCell", as nn's messages say
    _cell = ""       # the ops' name of the cell: "lstm", "gru" (RNNCell: _cell_name())
    _pair = False    # LSTMCell: hx is (h, c)
    _torch_cell = None  # nn.RNNCell, nn.LSTMCell or nn.GRUCell

    def _torch_class(self):
        return self._torch_cell

    def _weights(self):
        # The parameters as they are now: torch.func.functional_call swaps
        # the entries of _parameters; a parametrized weight is not there
        # and is computed on access.
        params = self._parameters
        try:
            if self.bias:
                return [params["weight_ih"], params["weight_hh"], params["bias_ih"],
                        params["bias_hh"]]
            return [params["weight_ih"], params["weight_hh"]]
        except KeyError:
            names = _CELL_WEIGHTS if self.bias else _CELL_WEIGHTS[:2]
            return [getattr(self, name) for name in names]

    def _cell_name(self):
        """The ops' name of the cell, or None where the op cannot run it."""
        return self._cell

    def _run(self, input, hx):
        fused = self._eager_step(input, hx)
        if fused is _NOT_PLAIN:
            fused = self._checked_step(input, hx)
        if fused is None:
            # What the op does not take (another dtype or device among the
            # arguments, a shape nn rejects, a nonlinearity it does not know,
            # a backend that is not the fused one) runs through nn's own
            # implementation: its result, or its error.
            self._ran_torch()
            return self._torch_cell.forward(self, input, hx)
        if self._promotes and torch._C._is_any_autocast_enabled():
            fused = self._promoted(fused, input, hx)
        return fused

    def _eager_step(self, input, hx):
        """The common call, where _checked_step would come to _fused_step's
        call of the extension, tested in one expression: a plain tensor, the
        fused backend, no compile, export or torch function mode, states of
        the input's dim. A small step's call costs about 5 us, and the
        method calls and tests this skips about 0.3-0.4 of it. The step (None
        where the extension refuses it), or _NOT_PLAIN for every other call,
        which _checked_step takes from the start."""
        backend = self.backend
        if backend is None:
            backend = _backend.resolve(None)
        if not (_cell_step is not None and type(input) is Tensor and backend != "torch"
                and (backend == "fused" or (input.is_cuda and _ops.cuda_built()
                                            and input.dtype in _ops.DTYPES))
                and not torch.compiler.is_compiling()
                and not torch._C._is_torch_function_mode_enabled()
                and not _exporting_to_onnx()):
            return _NOT_PLAIN
        dim = input.dim()
        if dim != 2 and dim != 1:
            return _NOT_PLAIN
        if hx is None:
            states = ()
        elif self._pair:
            if type(hx) is not tuple or len(hx) != 2:
                return _NOT_PLAIN
            h, c = states = hx
            if type(h) is not Tensor or type(c) is not Tensor or h.dim() != dim \
                    or c.dim() != dim:
                return _NOT_PLAIN
        else:
            if type(hx) is not Tensor or hx.dim() != dim:
                return _NOT_PLAIN
            states = (hx,)
        name = self._cell_name()
        if name is None:
            return _NOT_PLAIN
        return self._extension_step(name, input, states)

    def _checked_step(self, input, hx):
        """The fused step after nn's checks, or None where nn's cell must run
        (the fused backend does not apply, or the op does not take the
        arguments)."""
        if not self._fused_applies(input):
            return None
        dim = input.dim()
        states = () if hx is None else tuple(hx) if self._pair else (hx,)
        if (dim != 2 and dim != 1) or (states and (len(states) != (2 if self._pair else 1)
                                                   or states[0].dim() != dim
                                                   or states[-1].dim() != dim)):
            # nn's checks, in its order and words; what passes them but the
            # op does not take (states of another form) runs nn's cell.
            if dim != 2 and dim != 1:
                raise ValueError(f"{self._name}: Expected input to be 1D or 2D, got {dim}D instead")
            for i, h in enumerate(states):
                h_dim = h.dim()
                if h_dim != 2 and h_dim != 1:
                    what = f"hx[{i}]" if self._pair else "hidden"
                    raise ValueError(
                        f"{self._name}: Expected {what} to be 1D or 2D, got {h_dim}D instead")
            return None
        return self._fused_step(input, states, dim)

    # Under autocast, nn's LSTMCell and GRUCell end their step with the
    # state they were given (c, or h), which promotes the autocast dtype's
    # gates back to the state's dtype; nn's RNNCell returns the autocast
    # dtype. The layers' ops follow the layers instead.
    _promotes = False

    def _promoted(self, fused, input, hx):
        given = input if hx is None else (hx[1] if self._pair else hx)
        outs = fused if self._pair else (fused,)
        dtype = torch.promote_types(outs[0].dtype, given.dtype)
        outs = tuple(t.to(dtype) for t in outs)
        return outs if self._pair else outs[0]

    def _fused_step(self, input, states, dim):
        """The step through the layer's fused op from the given states (none
        for zeros; each of input's dim, as many as the cell takes), or None
        where the op does not take the arguments as they are."""
        name = self._cell_name()
        if name is None:
            return None
        if torch.compiler.is_compiling() or type(input) is not torch.Tensor \
                or torch._C._is_torch_function_mode_enabled():
            # What torch.compile traces, and what a tensor subclass or a
            # torch function mode must see: the op through torch.ops.
            return self._traced_step(name, input, states, dim)
        return self._extension_step(name, input, states)

    def _extension_step(self, name, input, states):
        """The eager step: one call into the extension, which shapes the step
        and calls the op through the dispatcher (autograd, autocast, vmap and
        the other transforms apply there as for the op itself), or, for a
        step no backward can follow on the CPU, the kernel itself. None where
        it refuses the arguments."""
        try:
            out = _cell_step(name, input, states, self._weights(), self.bias)
        except (RuntimeError, TypeError, ValueError, IndexError):
            return None
        # Plain attributes set through __dict__ (nn.Module's __setattr__
        # costs microseconds a call); the CUDA path as _record_cuda_path.
        d = self.__dict__
        d["last_path"] = "fused"
        d["last_cuda_path"] = _ops._C.last_cuda_path() if input.is_cuda else None
        return tuple(out) if self._pair else out[0]

    def _traced_step(self, name, input, states, dim):
        """_fused_step as torch.compile traces it: the op itself, and the view
        ops around it in Python."""
        x = input.unsqueeze(0) if dim == 2 else input.reshape(1, 1, -1)
        n = x.shape[1]
        if not states:
            zeros = x.new_zeros((1, n, self.hidden_size))
            states = (zeros, zeros) if self._pair else (zeros,)
        else:
            states = tuple(h.unsqueeze(0) if dim == 2 else h.reshape(1, 1, -1) for h in states)
        try:
            out = _forward_op(name, x, list(states), self._weights(), None, None, 1,
                              False, self.bias, False)
        except (RuntimeError, TypeError, ValueError, IndexError):
            return None
        self.__dict__["last_path"] = "fused"
        new = tuple(h[0] if dim == 2 else h[0, 0] for h in out[1])
        return new if self._pair else new[0]


# _FusedCell._eager_step's answer for a call that is not the plain one.
_NOT_PLAIN = object()

# The forward op's one overload and the cells' eager step, looked up once:
# calling the overload skips the packet's overload resolution on every call.
_forward_op = torch.ops.fastrnn.forward.default if _ops.available() else None
_cell_step = _ops._C.cell_step if _ops.available() else None


def _call_op(op, args):
    """A layer's fused op on args. In an eager call without grad mode no
    backward can follow, so the forward keeps no workspace for one (on the
    CPU: the saved values of a long sequence are several times its output,
    and faulting in a fresh allocation of them can cost a third of the
    forward). Under torch.compile the op always keeps it: the compiled
    forward runs without grad mode and hands it to the backward."""
    if torch.compiler.is_compiling() or torch.is_grad_enabled():
        return op(*args)
    keep = _ops._C.set_keep_workspace(False)
    try:
        return op(*args)
    finally:
        _ops._C.set_keep_workspace(keep)


# The ops' name of each layer mode's cell (fastrnn._ops.CELLS).
_LAYER_CELLS = {"RNN_TANH": "rnn_tanh", "RNN_RELU": "rnn_relu", "LSTM": "lstm", "GRU": "gru"}
_CELL_WEIGHTS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")


class RNNCell(_FusedCell, nn.RNNCell):
    r"""An Elman RNN cell with a fused step, interchangeable with :class:`torch.nn.RNNCell`.

    ``h' = act(x W_ih^T + b_ih + h W_hh^T + b_hh)``, ``act`` tanh or relu,
    for one step of a loop of the caller's. The arguments, parameters
    (names, shapes, initialisation), ``repr``, ``state_dict``, return value
    and errors are nn.RNNCell's, and it is an instance of nn.RNNCell;
    ``backend``, ``last_path`` and ``last_cuda_path`` as for
    :class:`fastrnn.RNN`. A fused call is one op: the layer's fused op over
    one step. Where that op does not take the arguments as they are (mixed
    dtypes or devices, a shape nn rejects), nn.RNNCell's implementation runs,
    with its result or its error.
    """

    _name, _gates, _torch_cell = "RNNCell", 1, nn.RNNCell

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True,
                 nonlinearity: str = "tanh", device=None, dtype=None, *,
                 backend: Optional[str] = None) -> None:
        super().__init__(input_size, hidden_size, bias, nonlinearity, device=device, dtype=dtype)
        self._init_backend(backend)

    def _cell_name(self):
        # None for a nonlinearity nn does not know: nn's cell raises its error.
        nonlinearity = self.nonlinearity
        return "rnn_tanh" if nonlinearity == "tanh" else "rnn_relu" if nonlinearity == "relu" \
            else None

    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> Tensor:
        """One step from ``hx`` (zeros when None): input (N, H_in) or (H_in),
        hx (N, H) or (H); returns h' like hx, as :class:`torch.nn.RNNCell`."""
        return self._run(input, hx)


class LSTMCell(_FusedCell, nn.LSTMCell):
    r"""An LSTM cell with a fused step, interchangeable with :class:`torch.nn.LSTMCell`.

    PyTorch's gate order and formulas (i, f, g, o). Everything else as for
    :class:`fastrnn.RNNCell`; ``hx`` is the pair ``(h, c)`` and the result
    ``(h', c')``.
    """

    _name, _cell, _gates, _pair, _torch_cell = "LSTMCell", "lstm", 4, True, nn.LSTMCell
    _promotes = True

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None,
                 dtype=None, *, backend: Optional[str] = None) -> None:
        super().__init__(input_size, hidden_size, bias, device=device, dtype=dtype)
        self._init_backend(backend)

    def forward(self, input: Tensor, hx: Optional[Tuple[Tensor, Tensor]] = None
                ) -> Tuple[Tensor, Tensor]:
        """One step from ``hx = (h, c)`` (zeros when None); returns ``(h', c')``,
        as :class:`torch.nn.LSTMCell`."""
        return self._run(input, hx)


class GRUCell(_FusedCell, nn.GRUCell):
    r"""A GRU cell with a fused step, interchangeable with :class:`torch.nn.GRUCell`.

    PyTorch's gate order and formulas (r, z, n). Everything else as for
    :class:`fastrnn.RNNCell`.
    """

    _name, _cell, _gates, _torch_cell = "GRUCell", "gru", 3, nn.GRUCell
    _promotes = True

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None,
                 dtype=None, *, backend: Optional[str] = None) -> None:
        super().__init__(input_size, hidden_size, bias, device=device, dtype=dtype)
        self._init_backend(backend)

    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> Tensor:
        """One step from ``hx`` (zeros when None); returns h', as
        :class:`torch.nn.GRUCell`."""
        return self._run(input, hx)


_FUSED = {nn.RNN: RNN, nn.LSTM: LSTM, nn.GRU: GRU, nn.RNNCell: RNNCell, nn.LSTMCell: LSTMCell,
          nn.GRUCell: GRUCell}
_COPIED = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
           "_state_dict_hooks", "_load_state_dict_pre_hooks", "_forward_hooks_with_kwargs",
           "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called")


def _fused_twin(layer, backend):
    """The fastrnn layer or cell of a torch.nn one: the same options and
    training mode, its very Parameter objects (so that an optimizer built on
    the model still holds them), its hooks."""
    cls = _FUSED[type(layer)]
    if issubclass(cls, _FusedCell):
        kw = dict(bias=layer.bias, device="meta", backend=backend)
        if cls is RNNCell:
            kw["nonlinearity"] = layer.nonlinearity
        twin = cls(layer.input_size, layer.hidden_size, **kw)
        for name in list(twin._parameters):
            setattr(twin, name, getattr(layer, name))
        return _copy_state(layer, twin)
    kw = dict(num_layers=layer.num_layers, bias=layer.bias, batch_first=layer.batch_first,
              dropout=layer.dropout, bidirectional=layer.bidirectional, device="meta",
              backend=backend)
    if cls is RNN:
        kw["nonlinearity"] = layer.nonlinearity
    if cls is LSTM:
        kw["proj_size"] = layer.proj_size
    twin = cls(layer.input_size, layer.hidden_size, **kw)
    for name in layer._flat_weights_names:
        setattr(twin, name, getattr(layer, name))
    twin._init_flat_weights()
    return _copy_state(layer, twin)


def _copy_state(layer, twin):
    """The twin with the layer's training mode and hooks."""
    twin.train(layer.training)
    for attr in _COPIED:
        if attr in layer.__dict__:
            twin.__dict__[attr] = layer.__dict__[attr]
    return twin


class _Rebased(type):
    """The metaclass of a torch.nn layer subclass rebased onto fastrnn's
    layer: the subclass's own methods first, then fastrnn's layer, then the
    torch.nn layer and the rest, so that a ``super().forward`` in the
    subclass reaches the fused forward, and ``isinstance(layer, nn.LSTM)``
    still holds."""

    def mro(cls):
        order = super().mro()
        base = cls.__dict__["_fastrnn_torch_class"]
        fused = [k for k in _FUSED[base].__mro__ if k not in order]
        at = order.index(base)
        return order[:at] + fused + order[at:]


_REBASED = {}


def _rebased_class(cls):
    """The rebased twin of a subclass ``cls`` of nn.RNN, nn.LSTM or nn.GRU
    (one per class, made on first use)."""
    if cls not in _REBASED:
        base = next(k for k in cls.__mro__ if k in _FUSED)
        namespace = {"_fastrnn_torch_class": base, "_fastrnn_original": cls,
                     "__module__": cls.__module__, "__qualname__": cls.__qualname__,
                     "__reduce_ex__": _reduce_rebased}
        _REBASED[cls] = _Rebased(cls.__name__, (cls,), namespace)
    return _REBASED[cls]


def _reduce_rebased(self, protocol):
    # Pickled as its original class, which can be imported, and rebased again.
    return _new_rebased, (type(self)._fastrnn_original,), self.__getstate__()


def _new_rebased(cls):
    return object.__new__(_rebased_class(cls))


def _rebase(layer, backend):
    """Rebases a subclass instance in place: same object, parameters, hooks
    and attributes; only its class changes."""
    layer.__class__ = _rebased_class(type(layer))
    layer.__dict__.update(backend=backend, last_path=None, last_cuda_path=None)
    return layer


def _rnn_kind(module):
    """'layer' for a torch.nn recurrent layer or cell, 'subclass' for a subclass of
    one (not yet rebased), else None."""
    if type(module) in _FUSED:
        return "layer"
    if isinstance(module, tuple(_FUSED)) and not isinstance(module, _Backend):
        return "subclass"
    return None


def replace_rnn(model: nn.Module, backend: Optional[str] = None, *,
                subclasses: bool = False) -> nn.Module:
    """Swaps every torch.nn.RNN, LSTM and GRU, and every RNNCell, LSTMCell and
    GRUCell, in ``model`` for the fastrnn layer or cell with the same
    options, weights (the same Parameter objects), device, dtype, hooks and
    training mode, in place, and returns the model (the new layer where
    ``model`` itself is one). ``backend`` as for :class:`fastrnn.RNN`.

    A subclass of a torch.nn layer (one that adds methods, or whose forward
    calls ``super().forward``) is left alone unless ``subclasses=True``: then
    it is rebased in place, its own methods first and fastrnn's layer in
    place of the torch.nn layer beneath them, so that its parent's forward is
    the fused one (it stays an instance of its class and of the torch.nn
    layer). A subclass that computes its forward without its parent's gets
    nothing from this. Layers left alone are named in a warning.

    >>> model = fastrnn.replace_rnn(model)
    >>> with fastrnn.use_backend("fused"):
    ...     y = model(x)      # the fused kernels, on the CPU too
    """
    if backend is not None:
        _backend._check(backend)
    swapped, left = [], []
    model = _replace(model, "", backend, subclasses, swapped, left)
    if left:
        names = ", ".join(f"{name or '(the model)'} ({type(m).__module__}.{type(m).__qualname__})"
                          for name, m in left)
        warnings.warn(
            f"fastrnn.replace_rnn swapped {len(swapped)} layer(s) and left {len(left)} alone, "
            f"subclasses of torch.nn's layers: {names}. replace_rnn(model, subclasses=True) "
            "rebases them onto fastrnn's layers.", UserWarning, stacklevel=2)
    _log.info("fastrnn.replace_rnn: %d layer(s) swapped%s", len(swapped),
              f" ({', '.join(n or '(the model)' for n in swapped)})" if swapped else "")
    return model


def _replace(module, name, backend, subclasses, swapped, left):
    kind = _rnn_kind(module)
    if kind == "layer":
        swapped.append(name)
        return _fused_twin(module, backend)
    if kind == "subclass":
        if not subclasses:
            left.append((name, module))
            return module
        swapped.append(name)
        return _rebase(module, backend)
    for child_name, child in list(module.named_children()):
        new = _replace(child, f"{name}.{child_name}" if name else child_name, backend, subclasses,
                       swapped, left)
        if new is not child:
            setattr(module, child_name, new)
    return module


def restore_rnn(model: nn.Module) -> nn.Module:
    """The inverse of :func:`replace_rnn`: every fastrnn layer and cell in
    ``model`` becomes the torch.nn layer with the same options, Parameter
    objects, hooks and training mode, and every rebased subclass its own
    class again; in place, returning the model (the torch.nn layer where
    ``model`` itself is a fastrnn layer)."""
    if isinstance(type(model), _Rebased):
        model.__class__ = type(model)._fastrnn_original
        for key in ("backend", "last_path", "last_cuda_path"):
            model.__dict__.pop(key, None)
        return model
    if type(model) in _FUSED.values():
        return model._torch_twin()
    for child_name, child in list(model.named_children()):
        new = restore_rnn(child)
        if new is not child:
            setattr(model, child_name, new)
    return model
