"""Build of fastrnn's C++/CUDA extension, fastrnn._C.

FASTRNN_CUDA=1 forces the CUDA variant, FASTRNN_CUDA=0 the CPU-only one; by
default CUDA is built when the installed torch has CUDA and an nvcc is found.
Nothing here asks for a visible GPU: the toolkit is found from nvcc's real
location and the architectures come from TORCH_CUDA_ARCH_LIST (default
"8.0;9.0").
FASTRNN_SANITIZE=1 builds with AddressSanitizer and UBSan (`make sanitize`).
FASTRNN_NO_EXT=1 installs the Python package alone (used by the Makefile, which
builds the extension in place with `setup.py build_ext --inplace`).
"""

import glob
import os
import re
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _toolkit_root(nvcc):
    """The real toolkit root behind an nvcc that may be a wrapper script."""
    real = os.path.realpath(nvcc)
    candidates = [os.path.dirname(os.path.dirname(real))]
    try:
        with open(real, "rb") as f:
            head = f.read(4096)
        if head.startswith(b"#!"):
            # A shell wrapper: the nvcc it execs names the real toolkit.
            for path in re.findall(rb"(/[^\s'\"]+)/bin/nvcc", head):
                candidates.insert(0, path.decode())
    except OSError:
        pass
    for root in candidates:
        if os.path.isfile(os.path.join(root, "include", "cuda_runtime.h")):
            return root
    return None


def _find_cuda_home():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")):
        return home
    nvcc = shutil.which("nvcc")
    if nvcc:
        return _toolkit_root(nvcc)
    for root in sorted(glob.glob("/usr/local/cuda*"), reverse=True):
        if os.path.isfile(os.path.join(root, "bin", "nvcc")):
            return root
    return None


def _want_cuda(cuda_home):
    import torch

    forced = os.environ.get("FASTRNN_CUDA")
    if forced is not None:
        want = forced.strip().lower() not in ("0", "false", "no", "off", "")
        if want and (torch.version.cuda is None or cuda_home is None):
            sys.exit(
                "FASTRNN_CUDA=1 needs a CUDA build of torch and an nvcc "
                f"(torch.version.cuda={torch.version.cuda}, CUDA toolkit={cuda_home})"
            )
        return want
    return torch.version.cuda is not None and cuda_home is not None


def _wheel_cuda_includes():
    """Headers of torch's nvidia wheels (cuBLAS, cuSPARSE, ...) that ATen's CUDA headers include."""
    import torch

    site = os.path.dirname(os.path.dirname(torch.__file__))
    dirs = glob.glob(os.path.join(site, "nvidia", "*", "include"))
    wanted = ("cublas_v2.h", "cusparse.h")
    return sorted(d for d in dirs if any(os.path.isfile(os.path.join(d, h)) for h in wanted))


def extensions():
    if os.environ.get("FASTRNN_NO_EXT"):
        return [], {}
    cuda_home = _find_cuda_home()
    if cuda_home:
        # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
        os.environ["CUDA_HOME"] = cuda_home
    use_cuda = _want_cuda(cuda_home)
    from torch.utils import cpp_extension as ce

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    sources += sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    # at::parallel_for is a header template over OpenMP: without -fopenmp it
    # runs on one thread. The runtime is the libgomp torch already loads.
    cxx = ["-O3", "-fno-math-errno", "-fopenmp", "-Wno-psabi"]
    link = ["-fopenmp"]
    sanitize = os.environ.get("FASTRNN_SANITIZE", "")
    if sanitize:
        # make sanitize: AddressSanitizer and UndefinedBehaviorSanitizer, every
        # report fatal (FASTRNN_SANITIZE=address); make tsan: ThreadSanitizer
        # (FASTRNN_SANITIZE=thread). The C++ sources only: the CUDA
        # emulator's code is C++, the device code never runs here.
        if sanitize == "thread":
            san = ["-fsanitize=thread"]
        elif sanitize in ("address", "1"):
            san = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all"]
        else:
            sys.exit(f"FASTRNN_SANITIZE must be 'address' or 'thread', got {sanitize!r}")
        cxx = ["-O1", "-g", "-fno-omit-frame-pointer", "-fopenmp", "-Wno-psabi"] + san
        link = link + san
    include_dirs = [os.path.join(ROOT, "csrc")]
    if not use_cuda:
        return [
            ce.CppExtension(
                "fastrnn._C",
                sources,
                include_dirs=include_dirs,
                extra_compile_args={"cxx": cxx},
                extra_link_args=link,
            )
        ], {"cmdclass": {"build_ext": ce.BuildExtension}}

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    if not os.path.isfile(os.path.join(cuda_home, "include", "cublas_v2.h")):
        include_dirs += _wheel_cuda_includes()
    sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
    sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    nvcc = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
    return [
        ce.CUDAExtension(
            "fastrnn._C",
            sources,
            include_dirs=include_dirs,
            define_macros=[("FASTRNN_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=link,
        )
    ], {"cmdclass": {"build_ext": ce.BuildExtension}}


ext_modules, extra = extensions()
setup(ext_modules=ext_modules, **extra)
