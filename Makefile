# The README's two commands: `make demo` (train a small model offline, then generate) and `make test`.
# Each creates .venv on first use and installs what it needs, so both work on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check
JOBS ?= 2

.PHONY: demo test install install-test bench-cpu clean

$(VENV)/.base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) -e .
	touch $@

# torch==2.13.0 is pinned in the test extra: on these machines pip takes a CPU build from local disk.
$(VENV)/.test: $(VENV)/.base
	$(PIP) -e '.[test,bench]'
	touch $@

install: $(VENV)/.base
install-test: $(VENV)/.test

demo: $(VENV)/.base
	$(PY) -m aigc_jax demo

test: $(VENV)/.test
	$(PY) -m pytest -q -n $(JOBS) tests

bench-cpu: $(VENV)/.test
	$(PY) benchmarks/run_cpu.py

clean:
	rm -rf $(VENV) .pytest_cache
