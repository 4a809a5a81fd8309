# halodiff developer entry points. `make test` and `make demo` set themselves up on a fresh machine.
#   make demo        the main job; builds only what can run here (CPU ops, + the present GPU's CUDA kernels)
#   make test        the whole suite; builds every CUDA kernel for CUDA_ARCHS (the compile check) first
#   make test-fast   the inner loop: tests not marked slow, stop at the first failure
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := scripts/pip-quiet.sh $(VENV)/bin/pip
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
# The CUDA toolkit root: $CUDA_HOME, else the directory the `nvcc` on PATH really runs from
# (on this machine `nvcc` is a wrapper script that execs the real one), else /usr/local/cuda.
CUDA_HOME ?= $(shell n=$$(command -v nvcc); if [ -n "$$n" ]; then r=$$(sed -n 's|^exec \(/[^ ]*\)/bin/nvcc.*|\1|p' "$$n" | head -1); \
  if [ -n "$$r" ]; then echo "$$r"; else dirname "$$(dirname "$$(readlink -f "$$n")")"; fi; else echo /usr/local/cuda; fi)
# CUDA archs `make test` / `make build` compile every .cu for (+PTX: newer GPUs JIT compute_90).
CUDA_ARCHS ?= 8.0;9.0+PTX
# What `make demo` builds CUDA kernels for: the GPUs of this machine (none: the CPU ops only, in a fraction of
# the time). Override, e.g. `make demo DEMO_CUDA_ARCHS="8.0;9.0"`, or DEMO_CUDA_ARCHS= for CPU only.
DEMO_CUDA_ARCHS ?= $(shell nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | sort -u | paste -sd';')
export CUDA_HOME
PYTEST_ARGS ?=
# `make test` runs the test files on TEST_JOBS pytest-xdist workers (whole files per worker, so module fixtures and
# rank pools are built once); TEST_JOBS=1 runs them in this process, one after another.
TEST_JOBS ?= 2
XDIST := $(if $(filter-out 0 1,$(TEST_JOBS)),-n $(TEST_JOBS) --dist loadfile,)
# The benchmark smoke run disables timing, so pytest-benchmark warns once per benchmark that its fixture went
# unused: expected here, nothing to act on.
SMOKE_QUIET := -W "ignore::pytest_benchmark.logger.PytestBenchmarkWarning"
NODEPS := $(abspath $(VENV))/nodeps
CPU_SRC := setup.py $(wildcard csrc/*.cpp csrc/*.h)
CUDA_SRC := $(wildcard csrc/*.cu csrc/*.cuh csrc/cuda/*.cpp)

.PHONY: venv install build build-cpu build-cuda test test-fast demo bench-cpu info clean

# Idempotent: the stamp is rebuilt only when the requirements change. The package is installed editable
# without extensions; the extensions are built in place below (ninja, incremental, objects in build/native).
# streamdiffusion (a test-only reference that pins an old diffusers) goes to its own folder on sys.path, so
# pip's resolver never sees its pins.
$(VENV)/.stamp: requirements-dev.txt requirements-nodeps.txt setup.py pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install $(TORCH_SPEC)
	$(PIP) install -r requirements-dev.txt
	$(PIP) install --no-deps --upgrade --target $(NODEPS) -r requirements-nodeps.txt
	@echo $(NODEPS) > $$($(PY) -c 'import sysconfig;print(sysconfig.get_paths()["purelib"])')/halodiff-test-nodeps.pth
	HALODIFF_SKIP_NATIVE=1 $(PIP) install --no-build-isolation --no-deps -e .
	@touch $@

venv: $(VENV)/.stamp

# $(1): CUDA archs ("" = the CPU extension only). ninja's per-file command lines are dropped from the output
# (errors and warnings stay).
define build_native
	@echo "building halodiff's native ops: $(if $(1),CPU + CUDA for $(1),CPU only)"
	@set -o pipefail; CPATH=$$($(PY) -c 'import sysconfig;print(sysconfig.get_paths()["purelib"])')/nvidia/cu13/include \
	  TORCH_CUDA_ARCH_LIST="$(1)" $(if $(1),,SKIP_CUDA_BUILD=1) \
	  $(PY) -W ignore setup.py -q build_ext --inplace --build-temp build/native 2>&1 | { grep -v -e '^\[[0-9]*/[0-9]*\] ' -e 'No CUDA runtime is found' || true; }
endef

$(VENV)/.built-cpu: $(VENV)/.stamp $(CPU_SRC)
	$(call build_native,)
	@touch $@

# Rebuilt when the sources or the archs change.
$(VENV)/.cuda-archs-$(subst ;,_,$(subst +,p,$(CUDA_ARCHS))): $(VENV)/.built-cpu $(CUDA_SRC)
	$(call build_native,$(CUDA_ARCHS))
	@rm -f $(VENV)/.cuda-archs-* && touch $@

build-cpu: $(VENV)/.built-cpu

build-cuda: $(VENV)/.cuda-archs-$(subst ;,_,$(subst +,p,$(CUDA_ARCHS)))

install build: build-cuda

test:
	@t0=$$SECONDS; $(MAKE) --no-print-directory venv; t1=$$SECONDS; \
	$(MAKE) --no-print-directory build-cuda; t2=$$SECONDS; \
	$(PY) -m pytest -q -ra $(XDIST) $(PYTEST_ARGS) tests; rc=$$?; t3=$$SECONDS; \
	[ $$rc -eq 0 ] && { $(PY) -m pytest -q bench --benchmark-disable -p no:cacheprovider $(SMOKE_QUIET); rc=$$?; }; t4=$$SECONDS; \
	echo "make test: setup $$((t1 - t0)) s, build $$((t2 - t1)) s, tests $$((t3 - t2)) s, bench smoke $$((t4 - t3)) s"; \
	exit $$rc

test-fast: build-cuda
	$(PY) -m pytest -q -x -m "not slow" $(PYTEST_ARGS) tests

demo: venv
	@if [ -n "$(DEMO_CUDA_ARCHS)" ]; then $(MAKE) --no-print-directory build-cuda CUDA_ARCHS="$(DEMO_CUDA_ARCHS)"; \
	else $(MAKE) --no-print-directory build-cpu; fi
	$(PY) -m halodiff demo

bench-cpu: build-cpu
	$(PY) -m halodiff bench kernels --out bench_out

info: build-cpu
	$(PY) -m halodiff info

clean:
	rm -rf build python/halodiff/*.so *.egg-info python/*.egg-info $(VENV)/.built* $(VENV)/.cuda-archs-*
