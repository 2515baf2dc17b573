# `make test` and `make bench` do all the set-up on a fresh machine: a
# virtualenv in .venv (reused once complete), torch and the other
# dependencies, the extension built in place (ninja, incremental), then the
# tests or the benchmark report.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.14.1
DEPS := ninja pybind11 setuptools wheel numpy pytest pytest-xdist pytest-benchmark hypothesis tqdm matplotlib \
	onnx onnxscript onnxruntime
READY := $(VENV)/.fastrnn-ready

# The package's Python files beside an extension built elsewhere, all but the
# record of what that extension was built for.
copy_py = for f in fastrnn/*.py; do [ "$$(basename $$f)" = _build_info.py ] || cp $$f $(1)/fastrnn/; done

.PHONY: venv build test test-deep bench bench-pytest sanitize tsan compat clean

venv: $(READY)

$(READY): Makefile pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q $(TORCH_SPEC) $(DEPS)
	FASTRNN_NO_EXT=1 $(PY) -m pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e .
	touch $@

build: $(READY)
	$(PY) setup.py -q build_ext --inplace

# make test: every test but those marked deep (pyproject.toml's addopts);
# make test-deep: those, the rest of each option product and the GPU check's
# dry run (CI runs both).
#
# The tests run in TEST_JOBS processes (pytest-xdist), each with torch's
# default threads: most of a test is Python and dispatch on one core, so
# two processes on two cores take about 0.55 of one's time. Waiting OpenMP
# threads sleep instead of spinning (OMP_WAIT_POLICY), or the processes'
# threads take each other's cores.
TEST_JOBS ?= 2
PYTEST := OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest -n $(TEST_JOBS)
test: build
	$(PYTEST) tests

test-deep: build
	$(PYTEST) tests -m deep

# --roofline: on the CPU, each row's multiply-adds a second as a percentage
# of this machine's FMA peak, probed in the same run (ignored on CUDA);
# --calls: what one small call costs, cells and one-step layers, against
# torch.nn and ONNX Runtime (CPU).
bench: build
	$(PY) -m fastrnn.bench --roofline --calls $(ARGS)

bench-pytest: build
	$(PY) -m pytest bench

# The extension built with AddressSanitizer and UBSan into build/sanitize
# (device code as PTX for sm_90 alone, FASTRNN_CUDA_PTX_ONLY, as in tsan
# and compat: it never runs on these machines), and the CPU tests and the
# CUDA kernels' emulator tests run against it; any report fails the run.
# FASTRNN_CPU_ISAS=native (here and in compat): only the CPU kernels this
# processor runs, as the tests run nothing else; on an AVX2 machine the
# AVX-512 kernels' file alone took 5.4 minutes of a core to compile under
# ASan. tsan runs the emulator's tests alone: the plain CPU kernels (=base).
# --capture=sys: pytest captures Python's output only, so that a report the
# sanitizer writes to file descriptor 2 before it ends the process is seen.
SAN_DIR := build/sanitize
SAN_ENV := LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libubsan.so)" \
	ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
	PYTHONPATH=$(SAN_DIR)
sanitize: $(READY)
	FASTRNN_CPU_ISAS=native FASTRNN_SANITIZE=address TORCH_CUDA_ARCH_LIST=9.0 FASTRNN_CUDA_PTX_ONLY=1 $(PY) setup.py -q build_ext --build-lib $(SAN_DIR) --build-temp build/sanitize-tmp
	$(call copy_py,$(SAN_DIR))
	$(SAN_ENV) $(PY) -P -c "import fastrnn, sys; assert '$(SAN_DIR)' in fastrnn._ops._C.__file__, fastrnn._ops._C.__file__"
	$(SAN_ENV) OMP_WAIT_POLICY=PASSIVE $(PY) -P -m pytest -n $(TEST_JOBS) tests -q --capture=sys -p no:cacheprovider -o pythonpath=$(SAN_DIR) \
		$(TOOLING_TESTS) -k "not compile and not ddp and not export and not trace and not onnx and not jit_script"
# Tests of the tooling around the extension (the benchmark's report, the
# README's commands, the GPU check's script, the CUDA build's spill check,
# the examples' scripts): they call the kernels through paths the other
# tests cover, so the sanitizer and compat runs leave them out (make test
# runs them).
TOOLING_TESTS := --ignore=tests/test_bench.py --ignore=tests/test_readme.py \
	--ignore=tests/test_gpu_check.py --ignore=tests/test_cuda_build.py \
	--ignore=tests/test_examples.py

# The CUDA kernels' emulator under ThreadSanitizer, which models the C++
# memory model (weaker than x86's): the grid path's barrier and exchange,
# the clusters' and every block's synchronisation run concurrently on
# host atomics and host barriers, and a missing release or acquire is a
# reported race. One torch thread: OpenMP is not instrumented.
TSAN_DIR := build/tsan
TSAN_ENV := LD_PRELOAD="$$(gcc -print-file-name=libtsan.so)" TSAN_OPTIONS=halt_on_error=1:exitcode=66 \
	OMP_NUM_THREADS=1 PYTHONPATH=$(TSAN_DIR)
tsan: $(READY)
	FASTRNN_CPU_ISAS=base FASTRNN_SANITIZE=thread TORCH_CUDA_ARCH_LIST=9.0 FASTRNN_CUDA_PTX_ONLY=1 $(PY) setup.py -q build_ext --build-lib $(TSAN_DIR) --build-temp build/tsan-tmp
	$(call copy_py,$(TSAN_DIR))
	$(TSAN_ENV) $(PY) -P -c "import fastrnn, sys; assert '$(TSAN_DIR)' in fastrnn._ops._C.__file__, fastrnn._ops._C.__file__"
	$(TSAN_ENV) $(PY) -P -m pytest -n $(TEST_JOBS) tests/test_cuda_emulation.py -q --capture=sys -p no:cacheprovider -o pythonpath=$(TSAN_DIR) \
		-k "$(TSAN_TESTS)"
# Every path's barriers and exchanges (several-row blocks, clusters, grid
# groups, the barrier's timeout), with lengths, without the step path (cuBLAS).
TSAN_TESTS ?= grid_groups or several_rows or barrier or cluster_of_eight or \
	(with_lengths and not step and not relu and not proj)

# The oldest torch the project supports in practice: the GPU machines carry
# torch 2.11, and bench/gpu_check.sh builds against it. A second virtualenv
# with that torch, the CUDA extension built against it into build/compat
# (sm_90, the GPU machines' architecture), and the tests run against that
# build.
COMPAT_TORCH ?= torch==2.11.0
COMPAT_VENV := .venv-compat
COMPAT_PY := $(COMPAT_VENV)/bin/python
COMPAT_DIR := build/compat
COMPAT_READY := $(COMPAT_VENV)/.fastrnn-ready

$(COMPAT_READY): Makefile
	test -x $(COMPAT_PY) || $(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_PY) -m pip install --disable-pip-version-check -q $(COMPAT_TORCH) $(DEPS)
	touch $@

compat: $(COMPAT_READY)
	FASTRNN_CPU_ISAS=native TORCH_CUDA_ARCH_LIST=9.0 FASTRNN_CUDA_PTX_ONLY=1 $(COMPAT_PY) setup.py -q build_ext --build-lib $(COMPAT_DIR) --build-temp build/compat-tmp
	$(call copy_py,$(COMPAT_DIR))
	PYTHONPATH=$(COMPAT_DIR) $(COMPAT_PY) -P -c "import fastrnn, torch; \
		assert '$(COMPAT_DIR)' in fastrnn._ops._C.__file__, fastrnn._ops._C.__file__; \
		print('torch', torch.__version__, 'extension', fastrnn._ops._C.__file__)"
	PYTHONPATH=$(COMPAT_DIR) OMP_WAIT_POLICY=PASSIVE $(COMPAT_PY) -P -m pytest -n $(TEST_JOBS) tests -q -p no:cacheprovider -o pythonpath=$(COMPAT_DIR) \
		$(TOOLING_TESTS)

clean:
	rm -rf build fastrnn/*.so *.egg-info
