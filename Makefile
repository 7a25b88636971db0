# vmferry: `make demo` and `make test` install what is missing, then run.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
GUEST := build/guest

.PHONY: deps venv guest test lint check demo bench faults clean install

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
# A short --basetemp: a state directory's QMP socket paths must fit a unix socket's 108 bytes,
# and /tmp/pytest-of-root/pytest-NNN/popen-gwN/... grows with every run on a machine.
test: venv guest lint
	@bt=$$(mktemp -d /tmp/vft.XXXXXX); \
	  $(VENV)/bin/pytest -q -ra --durations=15 -n $(JOBS) --dist loadfile --basetemp=$$bt tests; \
	  rc=$$?; rm -rf $$bt; \
	  if [ $$rc -eq 5 ]; then echo "pytest: no tests were collected"; exit 0; fi; exit $$rc

# The fast inner loop: lint, types, layer contracts and tests/unit (no QEMU, no daemons).
check: lint
	@bt=$$(mktemp -d /tmp/vft.XXXXXX); \
	  $(VENV)/bin/pytest -q -p no:cacheprovider --basetemp=$$bt tests/unit; rc=$$?; rm -rf $$bt; \
	  if [ $$rc -eq 5 ]; then echo "pytest: no tests were collected"; exit 0; fi; exit $$rc

demo: venv guest
	$(PY) -m vmferry.demo

bench: venv guest
	$(PY) bench/migrate_bench.py
	$(PY) bench/migrate_bench.py --cli --json build/bench/migrate-cli.json
	$(PY) bench/cli_bench.py

# Storage migration (--copy-storage-all) against the bare-QMP NBD floor; see bench/README.md.
.PHONY: bench-storage
bench-storage: venv guest
	$(PY) bench/storage_bench.py

.PHONY: bench-converge
bench-converge: venv guest
	$(PY) bench/converge_bench.py

# --tls vs plain and --tunnelled vs direct hops, side by side (bench/README.md).
.PHONY: bench-stream
bench-stream: venv guest
	$(PY) bench/stream_bench.py

.PHONY: bench-evacuate
bench-evacuate: venv guest
	$(PY) bench/evacuate_bench.py

# The whole fault matrix (needs root: network namespaces); writes docs/faults.md.
faults: venv guest
	$(PY) -m tests.faults.matrix

clean:
	rm -rf build .demo

# `make install` (as root): vmferry in its own virtualenv PREFIX, `vmferry`/`vmferryd` in BINDIR,
# the systemd unit, a default SYSCONFDIR/vmferry/vmferryd.toml unless one exists, the state
# directory and the images root. DESTDIR stages it all elsewhere (packaging, tests): the
# installed scripts and the unit name the final paths. PIP_OPTS, e.g. `--no-deps
# --no-build-isolation --no-index`, installs without a network. Then:
#   systemctl daemon-reload && systemctl enable --now vmferryd
PREFIX ?= /opt/vmferry
BINDIR ?= /usr/local/bin
SYSCONFDIR ?= /etc
UNITDIR ?= /etc/systemd/system
STATEDIR ?= /var/lib/vmferry/state
IMAGESDIR ?= /var/lib/vmferry/images
PYTHON ?= python3
PIP_OPTS ?=

install:
	@test -n "$(DESTDIR)" || test "$$(id -u)" = 0 || { echo "make install: run as root (or set DESTDIR)"; exit 1; }
	$(PYTHON) -m venv --clear $(DESTDIR)$(PREFIX)
	@# Built from a copy: setuptools would write build/ and *.egg-info into the tree.
	tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	  cp -r pyproject.toml src "$$tmp/" && rm -rf "$$tmp"/src/*.egg-info && \
	  $(DESTDIR)$(PREFIX)/bin/python -m pip install -q --disable-pip-version-check $(PIP_OPTS) "$$tmp"
	@# A staged venv names DESTDIR in its scripts: point them at where it will live.
	@if [ -n "$(DESTDIR)" ]; then \
	  grep -rlI -- "$(DESTDIR)$(PREFIX)" $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(PREFIX)/pyvenv.cfg \
	    | xargs -r sed -i "s|$(DESTDIR)$(PREFIX)|$(PREFIX)|g"; fi
	install -d $(DESTDIR)$(BINDIR)
	ln -sfn $(PREFIX)/bin/vmferry $(DESTDIR)$(BINDIR)/vmferry
	ln -sfn $(PREFIX)/bin/vmferryd $(DESTDIR)$(BINDIR)/vmferryd
	install -d $(DESTDIR)$(UNITDIR)
	sed -e "s|@PREFIX@|$(PREFIX)|g" -e "s|@SYSCONFDIR@|$(SYSCONFDIR)|g" \
	    -e "s|@STATEDIR@|$(STATEDIR)|g" dist/systemd/vmferryd.service.in \
	    > $(DESTDIR)$(UNITDIR)/vmferryd.service
	chmod 0644 $(DESTDIR)$(UNITDIR)/vmferryd.service
	install -d -m 0755 $(DESTDIR)$(SYSCONFDIR)/vmferry
	@# Never overwrite the admin's configuration.
	test -e $(DESTDIR)$(SYSCONFDIR)/vmferry/vmferryd.toml || \
	  install -m 0644 dist/vmferryd.toml $(DESTDIR)$(SYSCONFDIR)/vmferry/vmferryd.toml
	install -d -m 0700 $(DESTDIR)$(STATEDIR)
	install -d -m 0755 $(DESTDIR)$(IMAGESDIR)
