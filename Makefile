# The README's two commands: `make demo` (train a small model offline, then generate) and `make test`.
# Each creates .venv on first use and installs what it needs, so both work on a fresh machine.
# Installs are pinned by .ci/constraints.txt: the exact versions the test suite last passed with (`make lock`).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
LOCK ?= .ci/constraints.txt
PIP := $(PY) -m pip install -q --disable-pip-version-check $(if $(wildcard $(LOCK)),-c $(LOCK))
JOBS ?= 2
# A test module's expensive fixtures (servers, HF models, the 8-device training runs) are built once: a module's
# tests stay on one worker instead of each worker building the fixture again. (pytest-xdist's loadgroup, which could
# spread single tests, does not group under pytest 9: it renames node ids through an attribute pytest 9 dropped.)
DIST ?= loadfile

.PHONY: demo test install install-test bench-cpu lock clean

$(VENV)/.base: pyproject.toml $(wildcard $(LOCK))
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
	$(PY) -m pytest -q -n $(JOBS) --dist $(DIST) tests

bench-cpu: $(VENV)/.test
	$(PY) benchmarks/run_cpu.py

# After changing dependencies: `make clean && make install-test LOCK= && make test && make lock` re-resolves the
# ranges in pyproject.toml, proves the suite passes with what was resolved, and records it.
lock: $(VENV)/.test
	$(PY) -m pip freeze --exclude-editable --disable-pip-version-check | sort > .ci/constraints.txt

clean:
	rm -rf $(VENV) .pytest_cache
