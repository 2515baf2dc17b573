"""What fastrnn is and was built with: `python -m fastrnn.info`.

Prints the package and torch versions, whether the compiled extension loaded
(and why not), what it was built for (torch, CUDA, architectures, CPU
instruction sets), and which kernels this machine runs.
"""

import os
import sys

import torch

import fastrnn
from fastrnn import _ops


def report():
    """The lines `python -m fastrnn.info` prints."""
    lines = [f"fastrnn {fastrnn.__version__} at {os.path.dirname(fastrnn.__file__)}"]
    device = "none"
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        device = f"{torch.cuda.get_device_name()} (sm_{major}{minor})"
    lines.append(f"torch {torch.__version__}, CUDA {torch.version.cuda}, CUDA device: {device}")
    if _ops.available():
        lines.append(f"extension: loaded, {_ops._C.__file__}")
    else:
        lines.append(f"extension: NOT LOADED: {_ops.extension_error()}")
    info = _ops._built_for()
    if info is None:
        lines.append("built for: unknown (no fastrnn/_build_info.py beside the extension)")
    else:
        cuda = f"yes, architectures {info.cuda_archs}" if info.cuda else "no"
        lines.append(f"built for: torch {info.torch}, CUDA {info.torch_cuda}; CUDA kernels: {cuda}; "
                     f"CPU instruction sets: {', '.join(info.cpu_isas)}"
                     + (f"; sanitizer: {info.sanitize}" if info.sanitize else ""))
    mismatch = _ops._torch_mismatch(info)
    if mismatch:
        lines.append(f"MISMATCH: {mismatch}")
    if _ops.available():
        lines.append(f"CPU kernels run with: {fastrnn.cpu_isa()} "
                     f"(this processor can run: {', '.join(fastrnn.available_cpu_isas())})")
        unit = {"amx": "on AMX tiles", "avx512_bf16": "with AVX512-BF16"}.get(
            _ops._C.cpu_tiles_unit(), "no")
        lines.append(f"bfloat16 products in bfloat16: {unit} (setting: {fastrnn.cpu_tiles()})")
        if _ops.cuda_built():
            name, blocks = fastrnn.cuda_path()
            lines.append(f"CUDA path: {name}" + (f", {blocks} blocks" if blocks else "")
                         + (" (forced)" if name != "auto" else " (chosen per call)"))
    lines.append(f"default backend: {fastrnn.get_default_backend()}")
    return lines


def main():
    print("\n".join(report()))
    return 0 if _ops.available() else 1


if __name__ == "__main__":
    sys.exit(main())
