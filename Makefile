# `make test` and `make bench` do all the set-up on a fresh machine: a
# virtualenv in .venv (reused once complete), torch and the other
# dependencies, the extension built in place (ninja, incremental), then the
# tests or the benchmark report.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.14.1
DEPS := ninja pybind11 setuptools wheel numpy pytest pytest-benchmark hypothesis tqdm matplotlib
READY := $(VENV)/.fastrnn-ready

.PHONY: venv build test bench bench-pytest sanitize compat clean

venv: $(READY)

$(READY): Makefile pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q $(TORCH_SPEC) $(DEPS)
	FASTRNN_NO_EXT=1 $(PY) -m pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e .
	touch $@

build: $(READY)
	$(PY) setup.py -q build_ext --inplace

test: build
	$(PY) -m pytest tests

bench: build
	$(PY) -m fastrnn.bench

bench-pytest: build
	$(PY) -m pytest bench

# The CPU extension built with AddressSanitizer and UBSan into build/sanitize,
# and the CPU tests run against it; any report fails the run.
SAN_DIR := build/sanitize
SAN_ENV := LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libubsan.so)" \
	ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
	PYTHONPATH=$(SAN_DIR)
sanitize: $(READY)
	FASTRNN_CUDA=0 FASTRNN_SANITIZE=1 $(PY) setup.py -q build_ext --build-lib $(SAN_DIR) --build-temp build/sanitize-tmp
	cp fastrnn/*.py $(SAN_DIR)/fastrnn/
	$(SAN_ENV) $(PY) -P -c "import fastrnn, sys; assert '$(SAN_DIR)' in fastrnn._ops._C.__file__, fastrnn._ops._C.__file__"
	$(SAN_ENV) $(PY) -P -m pytest tests -q -p no:cacheprovider -o pythonpath=$(SAN_DIR) \
		-k "not cuda and not compile and not ddp and not export and not trace"

# The oldest torch the project supports in practice: the GPU machines carry
# torch 2.11, and bench/gpu_check.sh builds against it. A second virtualenv
# with that torch, the CUDA extension built against it into build/compat,
# and the tests run against that build.
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
	$(COMPAT_PY) setup.py -q build_ext --build-lib $(COMPAT_DIR) --build-temp build/compat-tmp
	cp fastrnn/*.py $(COMPAT_DIR)/fastrnn/
	PYTHONPATH=$(COMPAT_DIR) $(COMPAT_PY) -P -c "import fastrnn, torch; \
		assert '$(COMPAT_DIR)' in fastrnn._ops._C.__file__, fastrnn._ops._C.__file__; \
		print('torch', torch.__version__, 'extension', fastrnn._ops._C.__file__)"
	PYTHONPATH=$(COMPAT_DIR) $(COMPAT_PY) -P -m pytest tests -q -p no:cacheprovider -o pythonpath=$(COMPAT_DIR)

clean:
	rm -rf build fastrnn/*.so *.egg-info
