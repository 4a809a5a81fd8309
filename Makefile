# halodiff developer entry points. `make test` and `make demo` set themselves up on a fresh machine.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
TORCH_SPEC ?= torch==2.14.1
# The CUDA toolkit root: $CUDA_HOME, else the directory the `nvcc` on PATH really runs from
# (on this machine `nvcc` is a wrapper script that execs the real one), else /usr/local/cuda.
CUDA_HOME ?= $(shell n=$$(command -v nvcc); if [ -n "$$n" ]; then r=$$(sed -n 's|^exec \(/[^ ]*\)/bin/nvcc.*|\1|p' "$$n" | head -1); \
  if [ -n "$$r" ]; then echo "$$r"; else dirname "$$(dirname "$$(readlink -f "$$n")")"; fi; else echo /usr/local/cuda; fi)
TORCH_CUDA_ARCH_LIST ?= 8.0;9.0+PTX
export CUDA_HOME TORCH_CUDA_ARCH_LIST
PYTEST_ARGS ?=

.PHONY: venv install build test test-fast demo bench bench-cpu info clean

# Idempotent: the stamp is rebuilt only when the requirements change.
$(VENV)/.stamp: requirements-dev.txt requirements-nodeps.txt
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check $(TORCH_SPEC)
	$(PIP) install -q --disable-pip-version-check -r requirements-dev.txt
	$(PIP) install -q --disable-pip-version-check --no-deps -r requirements-nodeps.txt
	@touch $@

venv: $(VENV)/.stamp

# Rebuilds the native extension only when csrc/ or setup.py changed (ninja is incremental too).
$(VENV)/.built: $(VENV)/.stamp setup.py CMakeLists.txt $(wildcard csrc/*) 
	CPATH=$$($(PY) -c 'import sysconfig;print(sysconfig.get_paths()["purelib"])')/nvidia/cu13/include \
	  $(PIP) install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
	@touch $@

install: $(VENV)/.built

build: install

test: install
	$(PY) -m pytest -q -ra $(PYTEST_ARGS) tests
	$(PY) -m pytest -q bench --benchmark-disable -p no:cacheprovider

demo: install
	$(PY) -m halodiff demo

bench-cpu: install
	$(PY) -m halodiff bench kernels --out bench_out

info: install
	$(PY) -m halodiff info

clean:
	rm -rf build python/halodiff/*.so *.egg-info python/*.egg-info $(VENV)/.built
