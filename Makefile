# blockmig: `make test` and `make demo` set up a fresh Debian 12 machine themselves.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
APT_PACKAGES := nbdkit libnbd-bin python3-libnbd fio qemu-utils fuse3 e2fsprogs util-linux \
                iproute2 kmod procps qemu-system-x86 linux-image-amd64 busybox-static nbd-client cpio
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install apt venv test lint typecheck bench-nbd bench-migration bench-file-io bench bench-quick demo clean

install: apt venv

# Install the real NBD peers the tests run against (skipped when all are present).
apt:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing: $$missing"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	fi

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $@

test: install
	$(PY) -m pytest -q --durations=15

lint: venv
	$(VENV)/bin/ruff check emulator control bench blockmig tests
	$(VENV)/bin/ruff format --check emulator control bench blockmig tests
	$(VENV)/bin/mypy

bench-nbd: install
	$(PY) -m bench.nbd_server

bench-migration: install
	$(PY) -m bench.migration

bench-file-io: install
	$(PY) -m bench.file_io

# Read-through overhead over an emulated fabric, three phases per fio profile, peers;
# JSON and timeline PNGs under bench/results/.
bench: install
	$(PY) -m bench.suite --out bench/results

bench-quick: install
	$(PY) -m bench.suite --quick --out bench/results

# The story end to end: two arrays, a volume with known data, fio with verify on a real
# block device (nbdfuse + loop), a live migration to the other array, checks, overhead.
demo: install
	$(PY) -m control.cli demo $(DEMO_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .hypothesis .cache
