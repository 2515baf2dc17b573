"""fastrnn: a fused C++/CUDA Elman RNN, interchangeable with torch.nn.RNN."""

from . import _ops
from ._ops import available, cuda_built
from .module import RNN
from .reference import rnn_reference

__version__ = "0.1.0"
__all__ = ["RNN", "available", "cuda_built", "rnn_reference", "__version__"]
