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

.PHONY: venv build test bench bench-pytest clean

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

clean:
	rm -rf build fastrnn/*.so *.egg-info
