# `make demo` and `make test` create or refresh .venv (pip) when it is missing or older than
# pyproject.toml / constraints.txt, then run.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.graphsel-installed
JOBS   ?= 2

.PHONY: demo test test-fast bench venv clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -c constraints.txt -e '.[test,bench]'
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/graphsel demo

test: $(STAMP)
	$(PY) -m pytest -n $(JOBS) -q

test-fast: $(STAMP)
	$(PY) -m pytest -n $(JOBS) -q -m "not zoo and not slow"

bench: $(STAMP)
	$(PY) -m benchmarks.run_all

clean:
	rm -rf $(VENV) build dist *.egg-info graphsel-out .pytest_cache .hypothesis
