"""Choosing and observing fastrnn's kernels.

The CUDA time loop takes one of four paths (README: "CUDA paths"), chosen
per call; the CPU kernels run with the best instruction set the processor
has. Both can be forced, process-wide, for benchmarks and tests:

    fastrnn.set_cuda_path("grid", blocks=3)   # or "persistent", "cluster", "step", "auto"
    fastrnn.set_cpu_isa("avx2")               # or "avx512", "base", "auto"
    fastrnn.set_cpu_packing("never")          # or "always", "auto"
    fastrnn.set_cpu_tiles("never")            # or "auto"
    with fastrnn.kernels(cuda_path="step", cpu_isa="base"):
        ...                                   # both restored on exit

Where the processor has AMX-BF16 (Intel Xeon from Sapphire Rapids on), the
CPU kernels run a bfloat16 call's step products on its tiles, and where it
has AVX512-BF16 but no AMX (AMD from Zen 4 on, Intel Cooper Lake) with
VDPBF16PS: x_t and h rounded to bfloat16, as torch.nn's bfloat16 layers
round them, summed in float32; ``set_cpu_tiles("never")`` keeps such calls
on the float32 products of the float32 kernels (h carried unrounded).

The CPU time loops pack the weights into panels where a call's rows times
steps repay it, and read them as stored where they do not (a cell, a call
of one step): ``set_cpu_packing`` forces either, for tests and benchmarks.
The choice depends on the shapes only, never on the thread count, so that
a result's bits do not either.

A forced CUDA path that cannot run a call raises rather than switching.
``fastrnn.last_cuda_path()`` says which path the last CUDA call on this
thread took. The logger ``"fastrnn"`` reports, at DEBUG level, the kernel of
every fused call (``logging.getLogger("fastrnn").setLevel(logging.DEBUG)``).

``kernels(emulate_cuda=True)`` runs the CUDA kernels' code on CPU threads for
CPU tensors: for the tests, which check the CUDA kernels that way on
machines without a GPU; it is slow.
"""

import contextlib
import logging

from . import _ops

log = logging.getLogger("fastrnn")

# The CUDA paths' names, as the extension's one table (path_name in
# csrc/cuda/recurrence_cuda_paths.cpp) has them; a test checks the two agree.
CUDA_PATHS = ("auto", "persistent", "cluster", "grid", "step")
CPU_ISAS = ("avx512", "avx2", "base")


def _extension():
    if not _ops.available():
        raise RuntimeError(f"fastrnn's compiled extension is not available ({_ops.extension_error()})")
    return _ops._C


def _cuda_extension():
    ext = _extension()
    if not ext.cuda_built:
        raise RuntimeError("fastrnn was built without CUDA: rebuild with FASTRNN_CUDA=1")
    return ext


def set_cuda_path(name: str = "auto", blocks: int = 0) -> None:
    """Forces the CUDA time loop's path ('auto' to choose per call again) and,
    for 'cluster' and 'grid', the blocks per cluster or group (0: chosen)."""
    _cuda_extension().set_cuda_path(name, blocks)


def cuda_path():
    """The forced CUDA path and blocks, ('auto', 0) unless set."""
    return tuple(_cuda_extension().cuda_path())


def last_cuda_path(backward: bool = False) -> str:
    """The path the last CUDA time loop on this thread took ('persistent',
    'cluster', 'grid' or 'step'), or 'none' before the first. With
    ``backward=True``, the path the last backward time loop took, on any
    thread: autograd runs a CUDA backward on a thread of its own."""
    if backward:
        return _cuda_extension().last_cuda_backward_path()
    return _cuda_extension().last_cuda_path()


def cpu_isa() -> str:
    """The instruction set the CPU kernels run with: 'avx512', 'avx2' or 'base'."""
    return _extension().cpu_isa()


def available_cpu_isas():
    """The instruction sets this processor can run the CPU kernels with."""
    ext = _extension()
    current = ext.cpu_isa()
    try:
        return tuple(isa for isa in CPU_ISAS if ext.set_cpu_isa(isa))
    finally:
        ext.set_cpu_isa(current)


def set_cpu_isa(name: str) -> None:
    """Forces the CPU kernels' instruction set ('auto' for the best)."""
    if not _extension().set_cpu_isa(name):
        raise RuntimeError(f"this processor cannot run the '{name}' CPU kernels; it has "
                           f"{', '.join(available_cpu_isas())}")


def empty_cpu_cache() -> None:
    """Frees the CPU buffers that fused calls freed and fastrnn keeps for the
    next calls (outputs, saved values, gate and weight gradients of 256 KB
    or more: up to 1 GB, and at most twice what the calls held at once)."""
    _extension().release_recycled()


def cpu_cache_bytes():
    """``(cached, live, peak)``: the bytes of those CPU buffers kept for the
    next calls, those in use now, and the most in use at once since the
    process began or ``empty_cpu_cache()`` last ran."""
    return tuple(_extension().recycled_bytes())


CPU_PACKINGS = ("auto", "always", "never")


def set_cpu_packing(name: str) -> None:
    """Whether the CPU time loops pack the weights: 'auto' (where a call's
    rows times steps repay it), 'always' or 'never'."""
    if name not in CPU_PACKINGS:
        raise ValueError(f"Unknown packing '{name}'. Select from {', '.join(map(repr, CPU_PACKINGS))}.")
    _extension().set_cpu_packing(name)


def cpu_packing() -> str:
    """The CPU time loops' packing: 'auto' unless set."""
    return _extension().cpu_packing()


CPU_TILES = ("auto", "never")


def set_cpu_tiles(name: str) -> None:
    """Whether bfloat16 calls on the CPU run their steps' products in
    bfloat16 where the processor can (AMX tiles, or AVX512-BF16's
    VDPBF16PS; 'auto', the default) or on the float32 kernels ('never')."""
    if name not in CPU_TILES:
        raise ValueError(f"Unknown tiles setting '{name}'. Select from {', '.join(map(repr, CPU_TILES))}.")
    _extension().set_cpu_tiles(name)


def cpu_tiles() -> str:
    """The bfloat16 tiles' setting: 'auto' unless set."""
    return _extension().cpu_tiles()


def cpu_tiles_available() -> bool:
    """Whether this processor runs bfloat16 products in bfloat16: it has
    AMX-BF16 and the operating system lets this process use the tile
    state, or it has AVX512-BF16; and the AVX-512 kernels are in use.
    ``python -m fastrnn.info`` says which."""
    return bool(_extension().cpu_tiles_available())


@contextlib.contextmanager
def kernels(cuda_path=None, blocks=0, cpu_isa=None, emulate_cuda=None, cpu_packing=None,
            cpu_tiles=None):
    """Forces the CUDA path (and its blocks), the CPU instruction set, CUDA
    emulation, the CPU packing and the bfloat16 tiles inside the block,
    restoring each on exit; None leaves one as it is."""
    ext = _extension()
    saved_path = ext.cuda_path() if ext.cuda_built else None
    saved_isa = ext.cpu_isa()
    saved_packing = ext.cpu_packing()
    saved_tiles = ext.cpu_tiles()
    saved_emulation = ext.cuda_emulation() if ext.cuda_built else None
    try:
        if cuda_path is not None:
            set_cuda_path(cuda_path, blocks)
        if cpu_isa is not None:
            set_cpu_isa(cpu_isa)
        if emulate_cuda is not None:
            _cuda_extension().set_cuda_emulation(bool(emulate_cuda))
        if cpu_packing is not None:
            set_cpu_packing(cpu_packing)
        if cpu_tiles is not None:
            set_cpu_tiles(cpu_tiles)
        yield
    finally:
        if saved_path is not None:
            ext.set_cuda_path(*saved_path)
            ext.set_cuda_emulation(saved_emulation)
        ext.set_cpu_isa(saved_isa)
        ext.set_cpu_packing(saved_packing)
        ext.set_cpu_tiles(saved_tiles)
