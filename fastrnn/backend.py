"""Which implementation fastrnn's layers run: the fused kernels or torch.nn's.

A layer built with ``backend=...`` runs that backend. A layer built without
one follows, in this order, the innermost :func:`use_backend` block around
the call, then the process-wide default (:func:`set_default_backend`,
``'auto'`` unless changed):

========== ============================ ===========================
backend    CUDA tensors                 CPU tensors
========== ============================ ===========================
``auto``   fused CUDA kernel            torch.nn's implementation
``fused``  fused CUDA kernel            fused C++ kernel
``torch``  torch.nn's implementation    torch.nn's implementation
========== ============================ ===========================

The default and the blocks are process-wide, not per thread.
"""

import contextlib

BACKENDS = ("auto", "fused", "torch")

_default = "auto"
_scoped = None  # the innermost use_backend block's, or None outside any


def _check(name):
    if name not in BACKENDS:
        raise ValueError(f"Unknown backend '{name}'. Select from {', '.join(map(repr, BACKENDS))}.")
    return name


def set_default_backend(name: str) -> None:
    """Sets the backend of every layer built without one, process-wide."""
    global _default
    _default = _check(name)


def get_default_backend() -> str:
    """The process-wide default backend."""
    return _default


@contextlib.contextmanager
def use_backend(name: str):
    """Runs every layer built without a backend with ``name`` inside the block.

    >>> with fastrnn.use_backend("fused"):
    ...     y = model(x)    # every fastrnn layer in model runs its fused kernel
    """
    global _scoped
    _check(name)
    before = _scoped
    _scoped = name
    try:
        yield
    finally:
        _scoped = before


def resolve(layer_backend):
    """The backend a layer built with ``layer_backend`` (None: none) runs now."""
    if layer_backend is not None:
        return layer_backend
    if _scoped is not None:
        return _scoped
    return _default
