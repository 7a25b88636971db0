# vmferry: `make demo` and `make test` install what is missing, then run.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
GUEST := build/guest

.PHONY: deps venv guest test lint check demo bench faults clean

deps:
	@bash scripts/install-deps.sh

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

venv: deps $(VENV)/.installed

guest: deps
	@bash guest/build.sh $(GUEST)

lint: venv
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports --no-logo --no-cache

# Test files run in parallel on JOBS workers (pytest-xdist), each file on one worker:
# a file's tests share module-scoped daemons and may use fixed ports (the demo's).
# JOBS=0 runs everything in this process.
JOBS ?= 2

# Everything: tests/unit, tests/e2e (real daemons and QEMU) and the CI subset of tests/faults.
test: venv guest lint
	@$(VENV)/bin/pytest -q -ra --durations=15 -n $(JOBS) --dist loadfile tests; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest: no tests were collected"; exit 0; fi; exit $$rc

# The fast inner loop: lint, types, layer contracts and tests/unit (no QEMU, no daemons).
check: lint
	@$(VENV)/bin/pytest -q -p no:cacheprovider tests/unit; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest: no tests were collected"; exit 0; fi; exit $$rc

demo: venv guest
	$(PY) -m vmferry.demo

bench: venv guest
	$(PY) bench/migrate_bench.py

.PHONY: bench-converge
bench-converge: venv guest
	$(PY) bench/converge_bench.py

.PHONY: bench-evacuate
bench-evacuate: venv guest
	$(PY) bench/evacuate_bench.py

# The whole fault matrix (needs root: network namespaces); writes docs/faults.md.
faults: venv guest
	$(PY) -m tests.faults.matrix

clean:
	rm -rf build .demo
