# adapt: the two commands of the README.
#   make demo   set up .venv, then run the embedded sunglasses demo (train, sample, evaluate)
#   make test   set up .venv with test extras, then run the test suite (unit and recipe tests, a few minutes)
#   make test-integration   the off-path tests: real signals, a real full filesystem, accelerate launch (CI runs them)
#   make test-slow          SD-sized architectures and the GPU check's CPU path (CI runs them)
#   make test-floors        all three test sets in .venv-floors, on the lowest versions pyproject.toml allows,
#                           torch 2.4 included (CI runs it)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_PIN ?= torch==2.13.0
PIP := $(BIN)/python -m pip -q --disable-pip-version-check

.PHONY: demo test test-integration test-slow test-floors setup setup-test clean

# A torch already importable by $(PYTHON) (e.g. a user's CUDA build) is reused through
# --system-site-packages; otherwise the pinned CPU build is installed into the venv.
$(BIN)/python:
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
		echo "using the torch already installed for $(PYTHON)"; $(PYTHON) -m venv --system-site-packages $(VENV); \
	else $(PYTHON) -m venv $(VENV); fi

$(VENV)/.installed: $(BIN)/python pyproject.toml
	@$(BIN)/python -c "import torch" 2>/dev/null || { echo "installing $(TORCH_PIN) (CPU)"; $(PIP) install "$(TORCH_PIN)"; }
	@$(PIP) install -e ".[test]"
	@touch $@

setup setup-test: $(VENV)/.installed

demo: $(VENV)/.installed
	@PATH="$(CURDIR)/$(BIN):$$PATH" bash recipes/demo.sh

test: $(VENV)/.installed
	@$(BIN)/python -m pytest -q

test-integration: $(VENV)/.installed
	@$(BIN)/python -m pytest -q -m integration

test-slow: $(VENV)/.installed
	@$(BIN)/python -m pytest -q -m slow

# The lower bounds in pyproject.toml, torch's included, installed exactly (.ci/floors.txt). ADAPT_TEST_FLOORS
# tells the one test with pinned losses that the tiny random pipeline's seeded init differs in these versions.
FLOORS := .venv-floors
$(FLOORS)/.installed: pyproject.toml .ci/floors.txt
	@$(PYTHON) -m venv $(FLOORS)
	@$(FLOORS)/bin/python -m pip -q --disable-pip-version-check install -c .ci/floors.txt -e ".[test]"
	@touch $@

test-floors: $(FLOORS)/.installed
	@ADAPT_TEST_FLOORS=1 $(FLOORS)/bin/python -m pytest -q -m "slow or not slow"

clean:
	rm -rf runs/demo
