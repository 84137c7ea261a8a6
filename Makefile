# make demo  - set up from a fresh clone and run `pygen demo` (four families trained, sampled, scored)
# make test  - set up from a fresh clone and run the tests (+ benchmark smoke, isa and nvcc checks)
#
# Everything lives in $(VENV). torch comes from TORCH_SPEC and your pip index (this
# workplace's index serves the CPU build; elsewhere add e.g. --index-url
# https://download.pytorch.org/whl/cpu to TORCH_SPEC); on a GPU machine install CUDA torch
# yourself first, or point VENV at an environment that has it: setup skips torch when the
# venv already imports it.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
NVCC ?= $(shell command -v nvcc 2>/dev/null)
CUDA_ARCH_FLAGS := -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90a,code=sm_90a
SOURCES := $(shell find csrc -type f) CMakeLists.txt pyproject.toml

.PHONY: setup build test demo cuda-check isa-check bench clean

setup: $(VENV)/.deps

$(VENV)/.deps: requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -r requirements-dev.txt
	touch $@

build: $(VENV)/.built

$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	$(BIN)/pip install -q --no-build-isolation -e .
	touch $@

test: build
	$(BIN)/python -m pytest -q tests
	PYGEN_BENCH_QUICK=1 $(BIN)/python -m pytest -q benchmarks --benchmark-disable
	@$(MAKE) --no-print-directory isa-check
	@if [ -n "$(NVCC)" ]; then $(MAKE) --no-print-directory cuda-check; \
	else echo "nvcc not found: skipping the CUDA compile check"; fi

demo: build
	$(BIN)/python -m pygen demo

# Compile every CUDA source for sm_80 and sm_90a without torch: the .cu files include
# no torch headers, so this runs anywhere nvcc does, GPU or not. Then compile the torch
# binding with its CUDA half switched on (it needs no CUDA headers, so the CPU torch
# headers suffice): nothing CUDA-side goes unbuilt on a machine without a GPU.
cuda-check: setup
	@set -e; for f in csrc/cuda/*.cu; do \
	  echo "nvcc $$f ($(CUDA_ARCH_FLAGS))"; \
	  $(NVCC) -std=c++17 -O3 -Icsrc -Icsrc/include --expt-relaxed-constexpr -Werror all-warnings \
	    $(CUDA_ARCH_FLAGS) -c $$f -o /dev/null; \
	done
	@echo "g++ -fsyntax-only -DPYGEN_WITH_CUDA csrc/ops.cpp"
	@$(CXX) -std=c++17 -fsyntax-only -Wall -DPYGEN_WITH_CUDA -Icsrc -Icsrc/include \
	  $$($(BIN)/python -c "import sysconfig, pybind11; from torch.utils import cpp_extension as c; \
	  print(' '.join('-isystem ' + p for p in c.include_paths() + [pybind11.get_include(), sysconfig.get_paths()['include']]))") \
	  csrc/ops.cpp
	@echo "cuda-check: all CUDA sources and the CUDA binding compile"

# The CPU kernels are compiled once per ISA and linked together: any inline function with
# external linkage (a weak symbol) would be merged across the builds, so baseline code
# could run an AVX-512 copy. Check that the widest build defines none.
CPU_KERNELS := $(shell sed -n 's/.*set(PYGEN_CPU_KERNELS \(.*\))/\1/p' CMakeLists.txt)
isa-check:
	@set -e; tmp=$$(mktemp -d); for f in $(CPU_KERNELS); do \
	  $(CXX) -std=c++17 -O3 -ffp-contract=off -fno-math-errno -fno-trapping-math -mavx512f -mavx512dq \
	    -Icsrc -Icsrc/cpu -Icsrc/include -DPYGEN_CPU_ISA=avx512 -c $$f -o $$tmp/k.o; \
	  weak=$$(nm -C $$tmp/k.o | grep -E ' [WV] ' | grep -v __gxx_personality || true); \
	  if [ -n "$$weak" ]; then echo "isa-check: $$f defines weak symbols:"; echo "$$weak"; exit 1; fi; \
	done; rm -rf $$tmp; echo "isa-check: per-ISA CPU kernels define no shared (weak) symbols"

# The CPU suites (about 12 minutes on 2 cores; schedulers about 4): JSON per suite in $(BENCH_OUT), then the
# Markdown tables. One suite: make bench BENCH_SUITES=diffusion
BENCH_OUT ?= /tmp/pygen-bench
BENCH_SUITES ?= gaussian diffusion coupling schedulers
bench: build
	@mkdir -p $(BENCH_OUT)
	@for s in $(BENCH_SUITES); do \
	  $(BIN)/python -m pytest benchmarks/bench_$$s.py -q --benchmark-group-by=group \
	    --benchmark-columns=median,iqr,ops --benchmark-json=$(BENCH_OUT)/cpu-$$s.json || exit 1; \
	done
	@for s in $(BENCH_SUITES); do $(BIN)/python benchmarks/summarize.py $(BENCH_OUT)/cpu-$$s.json; echo; done

clean:
	rm -rf build $(VENV)/.built
