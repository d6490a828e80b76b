# mmpipe: two commands for a fresh machine (Python 3.11, pip, gcc):
#   make run    create .venv, install, build a tiny model unless MODEL is set, run the demo
#   make test   install and run the test suite (real redis-server, real processes, CPU only)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
MODEL  ?=
PYTEST_ARGS ?=

.PHONY: install run demo test test-slow test-gpu bench lint proto clean

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo ">> installing mmpipe and its dependencies into $(VENV) (first time: a few minutes, torch is large)"
	$(PIP) install --disable-pip-version-check -q -e '.[test]'
	@touch $@

install: $(VENV)/.installed

run: install
	$(PY) -m mmpipe.cli demo $(if $(MODEL),--model $(MODEL),)

demo: run

test: install
	$(PY) -m pytest -q -m "not slow and not gpu" $(PYTEST_ARGS)

test-slow: install
	$(PY) -m pytest -q -m "slow" $(PYTEST_ARGS)

test-gpu: install
	$(PY) -m pytest -q -m "gpu" $(PYTEST_ARGS)

bench: install
	$(PY) bench/engine_bench.py --out BENCHMARKS.json

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
