# The two entry points a newcomer needs: `make serve` and `make test`.
# Each creates the virtual environment in .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Which PyTorch build to install: auto (the CPU build without an NVIDIA GPU, the CUDA build with one), cpu or cuda.
# scripts/install_torch.py decides where it comes from and says so; see the README's "Install".
TORCH_BUILD ?= auto
ARGS ?=
PYTEST_ARGS ?=

.PHONY: serve test clean

# The server alone (with the S3 extra, small): what `make serve` needs.
$(BIN)/.installed: pyproject.toml constraints.txt scripts/install_torch.py
	$(PY) scripts/install_torch.py --check-python
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/python scripts/install_torch.py --build $(TORCH_BUILD)
	$(BIN)/pip install -q -c constraints.txt -e '.[s3]'
	touch $@

# Everything the tests drive besides: pytest, the openai SDK, Ray Serve, a real S3 server, Playwright, fp8.
$(BIN)/.installed-test: $(BIN)/.installed
	$(BIN)/pip install -q -c constraints.txt -e '.[test,bench,ray]'
	touch $@

serve: $(BIN)/.installed
	$(BIN)/stepimage serve $(ARGS)

test: $(BIN)/.installed-test
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
