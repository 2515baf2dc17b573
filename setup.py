"""Build of fastrnn's C++/CUDA extension, fastrnn._C.

The extension is built against the torch it will run with, so that torch must
be importable here: install torch first, then `pip install --no-build-isolation .`
(pip's default isolated build environment has no torch, and gets a message
saying so rather than a build against some other torch).

FASTRNN_CUDA=1 forces the CUDA variant, FASTRNN_CUDA=0 the CPU-only one; by
default CUDA is built when the installed torch has CUDA and an nvcc is found.
Nothing here asks for a visible GPU: the toolkit is found from nvcc's real
location. The architectures come from TORCH_CUDA_ARCH_LIST; by default the
visible GPU's, or else 8.0, 9.0 and the newer ones this nvcc knows (10.0,
12.0), with PTX for the newest.
FASTRNN_SANITIZE=address (or thread) builds with AddressSanitizer and UBSan
(or ThreadSanitizer): `make sanitize`, `make tsan`. FASTRNN_LINEINFO=1 keeps
source lines in the device code (compute-sanitizer, profilers).
FASTRNN_CPU_ISAS=native leaves out the CPU kernels this processor cannot run
(on x86-64 without AVX-512, the AVX-512 ones): the sanitizer and compatibility
builds (`make sanitize`, `make tsan`, `make compat`), which test on this
machine alone; by default (`all`) every instruction set is built.
FASTRNN_NO_EXT=1 installs the Python package alone (used by the Makefile, which
builds the extension in place with `setup.py build_ext --inplace`).

A build writes fastrnn/_build_info.py beside the extension: the torch, CUDA,
architectures and CPU instruction sets it was built for, which `import
fastrnn` checks against the running torch and `python -m fastrnn.info` prints.
"""

import glob
import os
import platform
import re
import shutil
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))

NO_TORCH = """
fastrnn builds its C++/CUDA extension against the torch it will run with, and
no torch can be imported in this build environment ({error}).

pip builds in an isolated environment by default, which has no torch (and
would not be yours if it had). Install torch first, then build in your own
environment:

    pip install --no-build-isolation .            (from a checkout)
    pip install --no-build-isolation fastrnn-*.tar.gz

See the README, "Install".
"""


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


def _want_cuda(torch, cuda_home):
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


def _wheel_cuda_includes(torch):
    """Headers of torch's nvidia wheels (cuBLAS, cuSPARSE, ...) that ATen's CUDA headers include."""
    site = os.path.dirname(os.path.dirname(torch.__file__))
    dirs = glob.glob(os.path.join(site, "nvidia", "*", "include"))
    wanted = ("cublas_v2.h", "cusparse.h")
    return sorted(d for d in dirs if any(os.path.isfile(os.path.join(d, h)) for h in wanted))


def _nvcc_archs(cuda_home):
    """The virtual architectures this nvcc compiles for, as numbers (90, 100, ...)."""
    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--list-gpu-arch"],
                             capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return set()
    return {int(m) for m in re.findall(r"compute_(\d+)", out)}


def _default_archs(torch, cuda_home):
    """The visible GPU's architecture, or else 8.0, 9.0 and the newer ones
    this nvcc knows, with PTX for the newest (so that a newer GPU still gets
    code, through the driver's JIT)."""
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return f"{major}.{minor}"
    known = _nvcc_archs(cuda_home)
    archs = ["8.0", "9.0"] + [a for a in ("10.0", "12.0") if int(float(a) * 10) in known]
    archs[-1] += "+PTX"
    return ";".join(archs)


def _ptx_only_flags():
    """FASTRNN_CUDA_PTX_ONLY=1: the device code as PTX alone, for each
    architecture of TORCH_CUDA_ARCH_LIST, where torch would add machine code
    too; an explicit -gencode stops torch from adding its own. For builds
    whose device code never runs (the sanitizer and compatibility builds on
    a machine without a GPU): ptxas, 40% of a kernel file's compile, is
    skipped, and so is its spill check, which the full build keeps. A GPU
    would compile the PTX when it loads."""
    choice = os.environ.get("FASTRNN_CUDA_PTX_ONLY", "0")
    if choice not in ("0", "1"):
        sys.exit(f"FASTRNN_CUDA_PTX_ONLY must be '0' or '1', got {choice!r}")
    if choice == "0":
        return []
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "").replace(",", ";").replace(" ", ";")
    flags = []
    for arch in filter(None, archs.split(";")):
        m = re.fullmatch(r"(\d+)\.(\d+)([af]?)(\+PTX)?", arch)
        if not m:
            sys.exit(f"FASTRNN_CUDA_PTX_ONLY=1 takes TORCH_CUDA_ARCH_LIST as numbers "
                     f"(such as 9.0), got {arch!r}")
        num = m.group(1) + m.group(2) + m.group(3)
        flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    if not flags:
        sys.exit("FASTRNN_CUDA_PTX_ONLY=1 needs TORCH_CUDA_ARCH_LIST")
    return flags


def _has_avx512():
    """Whether this processor has what the AVX-512 kernels run with (the
    extension's own test: AVX512F, DQ, VL and BW), from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f
                          if line.startswith("flags")), [])
    except OSError:
        return True  # no way to tell: keep them
    return {"avx512f", "avx512dq", "avx512vl", "avx512bw"} <= set(flags)


def _cpu_isas():
    """The CPU kernels' instruction sets this build compiles (FASTRNN_CPU_ISAS)."""
    choice = os.environ.get("FASTRNN_CPU_ISAS", "all")
    if choice not in ("all", "native", "base"):
        sys.exit(f"FASTRNN_CPU_ISAS must be 'all', 'native' or 'base', got {choice!r}")
    if choice == "base" or platform.machine() not in ("x86_64", "AMD64"):
        return ("base",)
    if choice == "native" and not _has_avx512():
        return ("avx2", "base")
    return ("avx512", "avx2", "base")


def _version():
    """fastrnn/_version.py's, the one place the version is written."""
    with open(os.path.join(ROOT, "fastrnn", "_version.py")) as f:
        return re.search(r'__version__ = "([^"]+)"', f.read()).group(1)


def _build_info(torch, use_cuda, compile_args):
    """The text of fastrnn/_build_info.py."""
    nvcc = compile_args.get("nvcc") if isinstance(compile_args, dict) else None
    fields = {
        "version": _version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda": use_cuda,
        "cuda_archs": (os.environ.get("TORCH_CUDA_ARCH_LIST", "")
                       + (" (PTX only)" if _ptx_only_flags() else "")) if use_cuda else None,
        "cpu_isas": _cpu_isas(),
        "sanitize": os.environ.get("FASTRNN_SANITIZE", ""),
        "nvcc_flags": list(nvcc) if use_cuda and nvcc else None,
    }
    lines = ['"""What fastrnn._C beside this file was built for: written by setup.py,',
             'read by fastrnn._ops (the torch check at import) and fastrnn.info."""', ""]
    lines += [f"{k} = {v!r}" for k, v in fields.items()]
    return "\n".join(lines) + "\n"


# A kernel that spills registers to local memory fails the build, for every
# architecture built: each kernel's thread bound leaves it the registers it
# needs (block_limit in csrc/cuda/recurrence_cuda_paths.h).
PTXAS_FLAGS = ["-Xptxas=--warn-on-spills,--warning-as-error"]


def extensions():
    if os.environ.get("FASTRNN_NO_EXT"):
        return [], {}
    try:
        import torch
    except ImportError as exc:
        if any(cmd in sys.argv for cmd in ("sdist", "egg_info", "dist_info")):
            return [], {}  # metadata and source archives need no torch
        sys.exit(NO_TORCH.format(error=exc))
    cuda_home = _find_cuda_home()
    if cuda_home:
        # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
        os.environ["CUDA_HOME"] = cuda_home
    use_cuda = _want_cuda(torch, cuda_home)
    from torch.utils import cpp_extension as ce

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    sources += sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    # at::parallel_for is a header template over OpenMP: without -fopenmp it
    # runs on one thread. The runtime is the libgomp torch already loads.
    # -g0: the platform's default flags ask for host debug information,
    # two thirds of the library's size.
    cxx = ["-O3", "-g0", "-fno-math-errno", "-fopenmp", "-Wno-psabi"]
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
        # -g1: the line tables the reports' stacks need, without the types
        # and variables of full -g (a third of each file's compile time).
        cxx = ["-O1", "-g1", "-fno-omit-frame-pointer", "-fopenmp", "-Wno-psabi"] + san
        link = link + san
    # No effect off x86-64, which has neither anyway.
    if "avx512" not in _cpu_isas():
        cxx.append("-DFASTRNN_NO_AVX512")
    if "avx2" not in _cpu_isas():
        cxx.append("-DFASTRNN_NO_AVX2")
    include_dirs = [os.path.join(ROOT, "csrc")]

    class BuildExt(ce.BuildExtension):
        """torch's build, then _build_info.py beside each extension built."""

        def run(self):
            super().run()
            for ext in self.extensions:
                folder = os.path.dirname(self.get_ext_fullpath(ext.name))
                os.makedirs(folder, exist_ok=True)
                with open(os.path.join(folder, "_build_info.py"), "w") as f:
                    f.write(_build_info(torch, use_cuda, ext.extra_compile_args))

    cmdclass = {"build_ext": BuildExt}
    if not use_cuda:
        return [ce.CppExtension("fastrnn._C", sources, include_dirs=include_dirs,
                                extra_compile_args={"cxx": cxx}, extra_link_args=link)], \
            {"cmdclass": cmdclass}

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", _default_archs(torch, cuda_home))
    if not os.path.isfile(os.path.join(cuda_home, "include", "cublas_v2.h")):
        include_dirs += _wheel_cuda_includes(torch)
    sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
    sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    nvcc = ["-O3", "--expt-relaxed-constexpr"] + PTXAS_FLAGS + _ptx_only_flags()
    if os.environ.get("FASTRNN_LINEINFO"):
        # Source lines in device code, for compute-sanitizer and profilers
        # (bench/gpu_check.sh); a fifth more of a library that is mostly
        # device code.
        nvcc.append("-lineinfo")
    return [ce.CUDAExtension("fastrnn._C", sources, include_dirs=include_dirs,
                             define_macros=[("FASTRNN_WITH_CUDA", "1")],
                             extra_compile_args={"cxx": cxx, "nvcc": nvcc},
                             extra_link_args=link)], {"cmdclass": cmdclass}


ext_modules, extra = extensions()
setup(ext_modules=ext_modules, **extra)
