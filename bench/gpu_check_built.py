"""The dry run's build step (bench/gpu_check.sh): the checkout's extension,
as `make build` made it, with its CUDA emulator and built after every source
it compiles (csrc). Exits 1, saying what to run, where it is missing or older
than a source; it never builds, so it cannot disturb the checkout's build."""

import glob
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    import fastrnn

    if not fastrnn.cuda_built():
        print("fastrnn's extension is missing or has no CUDA build "
              f"({fastrnn._ops.extension_error() or 'built without CUDA'}): run make build")
        return 1
    built = os.path.getmtime(fastrnn._ops._C.__file__)
    sources = []
    for pattern in ("*.h", "*.cpp", "*.cuh", "*.cu"):
        sources += glob.glob(os.path.join(ROOT, "csrc", "**", pattern), recursive=True)
    newer = sorted(os.path.relpath(f, ROOT) for f in sources if os.path.getmtime(f) > built)
    if newer:
        print(f"{fastrnn._ops._C.__file__} is older than {', '.join(newer[:5])}"
              f"{' and more' if len(newer) > 5 else ''}: run make build")
        return 1
    print(f"extension {fastrnn._ops._C.__file__}, built for {fastrnn._ops._built_for().cuda_archs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
