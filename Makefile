# Two targets do everything on a fresh machine: `make demo` and `make test`.
# Each creates .venv (Python 3.11) and installs what it needs the first time.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: setup.py | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-test: setup.py | $(BIN)/python
	$(BIN)/pip install -q -e ".[test]"
	touch $@ $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/mindport demo

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest tests

clean:
	rm -rf $(VENV) build *.egg-info
