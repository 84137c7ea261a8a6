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

.PHONY: setup build test demo data cuda-check isa-check bench clean mutation

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

# Real data: Fashion-MNIST from Debian's dataset-fashion-mnist (its IDX files in
# /usr/share/datasets/fashion-mnist; `--data fashion-mnist`). Installs it when run as root,
# else prints the command. Or put the four IDX files in $$PYGEN_DATA/fashion-mnist.
FASHION_DIR := /usr/share/datasets/fashion-mnist
data:
	@if [ -f $(FASHION_DIR)/t10k-images-idx3-ubyte.gz ] || [ -f $(FASHION_DIR)/t10k-images-idx3-ubyte ]; then \
	  echo "data: Fashion-MNIST is installed in $(FASHION_DIR)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist; \
	else \
	  echo "data: run: sudo apt install dataset-fashion-mnist"; \
	fi

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
BENCH_SUITES ?= gaussian diffusion coupling schedulers noise
bench: build
	@mkdir -p $(BENCH_OUT)
	@for s in $(BENCH_SUITES); do \
	  $(BIN)/python -m pytest benchmarks/bench_$$s.py -q --benchmark-group-by=group \
	    --benchmark-columns=median,iqr,ops --benchmark-json=$(BENCH_OUT)/cpu-$$s.json || exit 1; \
	done
	@for s in $(BENCH_SUITES); do $(BIN)/python benchmarks/summarize.py $(BENCH_OUT)/cpu-$$s.json; echo; done

# make mutation  - mutation testing (mutmut 3, configured in [tool.mutmut] of pyproject.toml) of
# pygen/models, pygen/train, pygen/sampling.py and pygen/metrics; prints per file and in total
# mutants, killed, survived, timeout and the score killed / (killed + survived). Installs mutmut
# into $(VENV) if missing. Runs in a scratch copy ($(MUTATION_DIR), rebuilt each time) so the work
# tree gets no mutants/: the compiled pygen/_C*.so and kernels/ (pygen.kernels) are placed in the
# copy's pygen/, and SKBUILD_EDITABLE_SKIP switches off the editable install's import redirect to
# this tree. One worker, niced, one torch thread (MUTATION_CHILDREN, MUTATION_THREADS). A subset:
#   make mutation MUTANTS='pygen.train.* pygen.models.base.*'
# Survivors: cd $(MUTATION_DIR) && $(abspath $(BIN))/mutmut results; ... mutmut show NAME
MUTATION_DIR ?= /tmp/pygen-mutation
MUTATION_CHILDREN ?= 1
MUTATION_THREADS ?= 1
MUTANTS ?=
define MUTATION_SCORE
import collections, glob, json
from mutmut.stats import status_by_exit_code as status
def row(name, c):
    k, s = c["killed"], c["survived"]
    print(f"{name:36} {sum(c.values()):6} {k:6} {s:8} {c['timeout']:7} {c['no tests']:8} {c['not checked']:11}  "
          + (f"{100 * k / (k + s):.1f}%" if k + s else "-"))
print(f"{'file':36} {'total':>6} {'killed':>6} {'survived':>8} {'timeout':>7} {'no tests':>8} {'not checked':>11}  score")
total = collections.Counter()
for meta in sorted(glob.glob("mutants/pygen/**/*.py.meta", recursive=True)):
    c = collections.Counter(status[e] for e in json.load(open(meta))["exit_code_by_key"].values())
    total.update(c)
    if c["not checked"] < sum(c.values()):
        row(meta[len("mutants/"):-len(".meta")], c)
row("all", total)
endef
export MUTATION_SCORE
mutation: build
	@$(BIN)/python -c "import mutmut" 2>/dev/null || $(BIN)/pip install -q "mutmut>=3.8,<4"
	rm -rf $(MUTATION_DIR) && mkdir -p $(MUTATION_DIR)
	cp -r pygen kernels tests pyproject.toml $(MUTATION_DIR)/
	rm -rf $(MUTATION_DIR)/pygen/kernels && cp -r kernels $(MUTATION_DIR)/pygen/kernels
	find $(MUTATION_DIR) -name __pycache__ -prune -exec rm -rf {} +
	cp "$$($(BIN)/python -c 'import pygen._C as c; print(c.__file__)')" $(MUTATION_DIR)/pygen/
	cd $(MUTATION_DIR) && export SKBUILD_EDITABLE_SKIP="$$($(abspath $(BIN))/python -c "import sys; \
	  print(':'.join(f.path for f in sys.meta_path if type(f).__name__ == 'ScikitBuildRedirectingFinder' and f.path))")" \
	  OMP_NUM_THREADS=$(MUTATION_THREADS) MKL_NUM_THREADS=$(MUTATION_THREADS) && \
	  $(abspath $(BIN))/python -c "import pygen; assert pygen.__file__.startswith('$(MUTATION_DIR)/'), pygen.__file__" && \
	  { nice -n 10 $(abspath $(BIN))/mutmut run --max-children $(MUTATION_CHILDREN) $(foreach m,$(MUTANTS),'$(m)'); rc=$$?; \
	    $(abspath $(BIN))/python -c "$$MUTATION_SCORE"; exit $$rc; }

clean:
	rm -rf build $(VENV)/.built
