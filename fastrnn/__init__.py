"""fastrnn: fused C++/CUDA recurrences, interchangeable with torch.nn.RNN,
torch.nn.LSTM, torch.nn.GRU and their cells."""

from ._version import __version__
from . import _ops
from ._ops import available, cuda_built
from .backend import get_default_backend, set_default_backend, use_backend
from .kernels import (available_cpu_isas, cpu_cache_bytes, cpu_isa, cpu_packing, cpu_tiles,
                      cpu_tiles_available, cuda_path, empty_cpu_cache, kernels, last_cuda_path,
                      set_cpu_isa, set_cpu_packing, set_cpu_tiles, set_cuda_path)
from .module import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNCell, replace_rnn, restore_rnn
from .reference import gru_reference, lstm_reference, rnn_reference

__all__ = ["RNN", "LSTM", "GRU", "RNNCell", "LSTMCell", "GRUCell", "replace_rnn", "restore_rnn",
           "available", "cuda_built", "set_default_backend", "get_default_backend", "use_backend",
           "kernels", "set_cuda_path", "cuda_path", "last_cuda_path", "set_cpu_isa", "cpu_isa",
           "set_cpu_packing", "cpu_packing", "set_cpu_tiles", "cpu_tiles", "cpu_tiles_available",
           "available_cpu_isas", "empty_cpu_cache",
           "cpu_cache_bytes", "rnn_reference",
           "lstm_reference", "gru_reference", "__version__"]
