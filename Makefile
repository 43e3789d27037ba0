# The two entry points of the README: `make demo` (the main job: kopru compare) and `make test`.
# Each creates .venv on first use; torch is pinned to the CPU wheel this machine installs quickly.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PIN ?= torch==2.13.0

.PHONY: demo test lint clean

# pip byte-compiles every installed file one at a time (about 50 of the install's 80 s here); compileall does it on
# every core. Compiled it must be: where PYTHONDONTWRITEBYTECODE is set (here, and in many Docker images) nothing
# compiled on first import is kept, and every worker process would compile transformers again. compileall exits 1
# on the few files written for newer Pythons (torch's py312 tests), which pip skips silently too.
$(BIN)/kopru: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --no-compile --upgrade pip
	$(BIN)/pip install -q --no-compile $(TORCH_PIN)
	$(BIN)/pip install -q --no-compile -e '.[test]'
	$(BIN)/python -m compileall -q -j 0 $(VENV)/lib > /dev/null 2>&1 || true
	touch $(BIN)/kopru

# Every core: right after the install the load average is still high, and the CLI's default (the idle CPUs)
# would then take one thread: 12 min 20 s on 2 cores against 10 min 24 s with both (same hour, same figures).
demo: $(BIN)/kopru
	$(BIN)/kopru compare --output runs/compare --threads $(shell nproc)

# The second pass: the tests of figures that come out of training (marked `trained`), again as a CPU with only
# generic kernels computes them, so that a margin tuned on this machine's rounding fails here, not on a user's.
test: $(BIN)/kopru
	$(BIN)/ruff check src tests scripts examples
	$(BIN)/python -m pytest -q -n 2 tests
	$(BIN)/python scripts/cpu_profile.py generic $(BIN)/python -m pytest -q -n 2 -m trained tests

lint: $(BIN)/kopru
	$(BIN)/ruff check src tests scripts examples

clean:
	rm -rf $(VENV) build src/*.egg-info
