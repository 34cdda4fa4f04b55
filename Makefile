# GANHead: one-step set-up, tests and the demo pipeline.
#   make demo   runs the main job (synthetic data -> pictures under outputs/demo/)
#   make test   passes the tests (the full suite, what CI runs)
#   make test-fast  the edit loop: every test not marked slow (end-to-end runs)
#   make lint   ruff on the whole tree (configured in pyproject.toml)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: setup test test-fast lint demo clean-demo

setup: $(STAMP)

# The stamp depends on the files that define the install, so editing them reinstalls.
$(STAMP): requirements.txt setup.py pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PIP) install -r requirements.txt
	$(PIP) install --no-deps -e .
	@touch $(STAMP)

test: setup
	$(PY) -m pytest -q tests

test-fast: setup
	$(PY) -m pytest -q -m "not slow" tests

lint: setup
	$(VENV)/bin/ruff check .

demo: setup
	$(PY) tools/demo.py --out outputs/demo --data data/demo

clean-demo:
	rm -rf outputs/demo
