# The two entry points a newcomer needs: `make serve` and `make test`.
# Each creates the virtual environment in .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# On a machine without an NVIDIA GPU, pin the CPU build of torch (a plain `torch`
# requirement would pull the multi-gigabyte CUDA build). GPU hosts get the CUDA build.
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)
CONSTRAINTS := $(if $(HAS_GPU),,-c constraints-cpu.txt)
ARGS ?=
PYTEST_ARGS ?=

.PHONY: serve test lint clean

$(BIN)/.installed: pyproject.toml constraints-cpu.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(CONSTRAINTS) -e '.[test,bench,ray]'
	touch $@

serve: $(BIN)/.installed
	$(BIN)/stepimage serve $(ARGS)

test: $(BIN)/.installed
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
