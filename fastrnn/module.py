"""fastrnn.RNN: a drop-in replacement for torch.nn.RNN."""

import warnings

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from . import _ops

BACKENDS = ("auto", "fused", "torch")

_DTYPE_NAMES = {
    torch.float32: "Float",
    torch.float64: "Double",
    torch.float16: "Half",
    torch.bfloat16: "BFloat16",
}

_warned_missing_extension = False


def _warn_missing_extension():
    global _warned_missing_extension
    if not _warned_missing_extension:
        _warned_missing_extension = True
        warnings.warn(
            f"fastrnn's compiled extension is not available ({_ops.EXTENSION_ERROR}); "
            "fastrnn.RNN runs through torch.nn.RNN",
            RuntimeWarning,
            stacklevel=3,
        )


class RNN(nn.RNNBase):
    r"""An Elman RNN with a fused recurrence, interchangeable with :class:`torch.nn.RNN`.

    Takes nn.RNN's arguments (``input_size, hidden_size, num_layers=1,
    nonlinearity='tanh', bias=True, batch_first=False, dropout=0.0,
    bidirectional=False, device=None, dtype=None``) with the same meaning,
    parameters, initialisation and state_dict, and one more:

    backend:
        ``'auto'`` (default): the fused kernel for CUDA tensors, nn.RNN's own
        implementation for CPU tensors and for anything the fused kernel does not
        cover. ``'fused'``: the fused kernel on CPU and CUDA alike.
        ``'torch'``: always nn.RNN's implementation.

    After each call, ``last_path`` says which ran: ``'fused'`` or ``'torch'``;
    after a fused call on CUDA, ``last_cuda_path`` says which CUDA time loop
    ran its forward (``'persistent'``, ``'cluster'``, ``'grid'`` or
    ``'step'``; see the README), else None (it is left as it was under
    torch.compile).

    It derives from ``nn.RNNBase``, not ``nn.RNN``, so that torch.compile
    traces it (dynamo stops at every nn.RNN instance).
    """

    def __init__(self, *args, backend="auto", **kwargs):
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        if len(args) > 3:
            self.nonlinearity = args[3]
            args = args[:3] + args[4:]
        else:
            self.nonlinearity = kwargs.pop("nonlinearity", "tanh")
        if self.nonlinearity == "tanh":
            mode = "RNN_TANH"
        elif self.nonlinearity == "relu":
            mode = "RNN_RELU"
        else:
            raise ValueError(
                f"Unknown nonlinearity '{self.nonlinearity}'. Select from 'tanh' or 'relu'."
            )
        if backend not in BACKENDS:
            raise ValueError(f"Unknown backend '{backend}'. Select from {', '.join(map(repr, BACKENDS))}.")
        self.backend = backend
        self.last_path = None
        self.last_cuda_path = None
        super().__init__(mode, *args, **kwargs)

    def extra_repr(self):
        s = super().extra_repr()
        if self.backend != "auto":
            s += f", backend={self.backend!r}"
        return s

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("backend", "auto")
        self.__dict__.setdefault("last_path", None)
        self.__dict__.setdefault("last_cuda_path", None)

    def _fused_applies(self, data):
        if self.backend == "torch":
            return False
        if not _ops.available():
            _warn_missing_extension()
            return False
        if self.backend == "fused":
            return True
        return data.is_cuda and _ops.cuda_built() and data.dtype in _DTYPE_NAMES

    def forward(self, input, hx=None):
        data = input.data if isinstance(input, PackedSequence) else input
        if not self._fused_applies(data):
            self.last_path = "torch"
            self.last_cuda_path = None
            return nn.RNN.forward(self, input, hx)
        self.last_path = "fused"
        return self._fused_forward(input, hx)

    def _fused_forward(self, input, hx):
        # The argument handling and checks below are nn.RNN.forward's, in its
        # order, so that every error is the one nn.RNN raises.
        num_directions = 2 if self.bidirectional else 1
        is_packed = isinstance(input, PackedSequence)
        lengths = None
        if is_packed:
            data, batch_sizes, sorted_indices, unsorted_indices = input
            max_batch_size = int(batch_sizes[0])
            if hx is None:
                hx = torch.zeros(self.num_layers * num_directions, max_batch_size,
                                 self.hidden_size, dtype=data.dtype, device=data.device)
            else:
                hx = self.permute_hidden(hx, sorted_indices)
            self.check_forward_args(data, hx, batch_sizes)
            # Packed (sum of lengths, C) -> padded (T, N, C) in sorted order.
            # batch_sizes lives on the CPU, so the positions t * N + n of the
            # packed rows are found there and copied over as integers, without
            # waiting (pageable memory is staged before the copy returns): a
            # boolean mask on the GPU would wait for the device to count it.
            T = batch_sizes.numel()
            valid = torch.arange(max_batch_size).unsqueeze(0) < batch_sizes.unsqueeze(1)  # (T, N)
            lengths = valid.sum(0).to(data.device, non_blocking=True)
            rows = valid.flatten().nonzero().squeeze(1).to(data.device, non_blocking=True)
            x = data.new_zeros(T * max_batch_size, data.shape[-1]).index_put((rows,), data)
            x = x.view(T, max_batch_size, data.shape[-1])
        else:
            if input.dim() not in (2, 3):
                raise ValueError(f"RNN: Expected input to be 2D or 3D, got {input.dim()}D tensor instead")
            is_batched = input.dim() == 3
            batch_dim = 0 if self.batch_first else 1
            if not is_batched:
                input = input.unsqueeze(batch_dim)
                if hx is not None:
                    if hx.dim() != 2:
                        raise RuntimeError(
                            f"For unbatched 2-D input, hx should also be 2-D but got {hx.dim()}-D tensor"
                        )
                    hx = hx.unsqueeze(1)
            elif hx is not None and hx.dim() != 3:
                raise RuntimeError(
                    f"For batched 3-D input, hx should also be 3-D but got {hx.dim()}-D tensor"
                )
            max_batch_size = input.size(0) if self.batch_first else input.size(1)
            if hx is None:
                hx = torch.zeros(self.num_layers * num_directions, max_batch_size,
                                 self.hidden_size, dtype=input.dtype, device=input.device)
            self.check_forward_args(input, hx, None)
            x = input.transpose(0, 1) if self.batch_first else input

        if x.shape[0] == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
        weights = [getattr(self, name) for name in self._flat_weights_names]
        if hx.dtype != weights[0].dtype and not torch._C._is_any_autocast_enabled():
            # What nn.RNN's first matrix product of hx with weight_hh raises
            # (under autocast the op casts them, as nn.RNN's cuDNN path does).
            raise RuntimeError(
                "mat1 and mat2 must have the same dtype, but got "
                f"{_DTYPE_NAMES.get(hx.dtype, hx.dtype)} and "
                f"{_DTYPE_NAMES.get(weights[0].dtype, weights[0].dtype)}"
            )
        dropout_mask = None
        if self.training and self.dropout > 0 and self.num_layers > 1:
            T, N = x.shape[0], x.shape[1]
            keep = 1.0 - self.dropout
            dropout_mask = torch.empty(self.num_layers - 1, T, N, num_directions * self.hidden_size,
                                       dtype=x.dtype, device=x.device).bernoulli_(keep)
            if keep > 0:
                dropout_mask = dropout_mask / keep
        output, h_n, _ = torch.ops.fastrnn.rnn_forward(
            x, hx, weights, lengths, dropout_mask, self.num_layers, self.bidirectional,
            self.bias, self.mode == "RNN_RELU",
        )
        if not torch.compiler.is_compiling():
            # The extension records the path per thread; read it on the
            # thread that just ran the forward.
            self.last_cuda_path = (_ops._C.last_cuda_path()
                                   if x.is_cuda and _ops.cuda_built() else None)
        if is_packed:
            output = PackedSequence(output.reshape(-1, output.shape[-1])[rows], batch_sizes,
                                    sorted_indices, unsorted_indices)
            return output, self.permute_hidden(h_n, unsorted_indices)
        if self.batch_first:
            output = output.transpose(0, 1)
        if not is_batched:
            output = output.squeeze(batch_dim)
            h_n = h_n.squeeze(1)
        return output, h_n
