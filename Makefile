# The README's two commands: `make demo` and `make test`. Both create the venv first.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
COMPILED := $(VENV)/.compiled
# The tests exercise the optional integrations too (lm-evaluation-harness, the Dask runner,
# the MLflow tracker, the onnxruntime-genai bundle: a 49 MB wheel, 164 MB installed).
EXTRAS := dev,lm-eval,dask,mlflow,genai
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: install demo data test lint format clean

# pip byte-compiles what it installs on one core, and nothing here needs most of it; where
# PYTHONDONTWRITEBYTECODE=1 (these machines) no import writes what it compiles either, so
# without .pyc files every process compiles torch and transformers again (the suite took
# 15 min). So pip compiles nothing, and `install` byte-compiles the venv on every core
# (47 s on this Xeon), for whoever runs `unbottle` from it. Two files of torch and whenever
# are Python 3.12 syntax and fail to compile, as they do under pip: not an error.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --no-compile -c constraints.txt -e '.[$(EXTRAS)]'
	touch $(STAMP)

$(COMPILED): $(STAMP)
	$(PY) -m compileall -q -j 0 $(VENV)/lib > /dev/null || true
	touch $(COMPILED)

install: $(COMPILED)

data: install
	unbottle data demo

demo: data
	unbottle run

lint: $(STAMP)
	ruff check .
	ruff format --check .

format: $(STAMP)
	ruff check --fix .
	ruff format .

# One pytest run; it exits 5 when it collects nothing: that is a failure here, not a pass.
#
# The tests compile only what they import (a sixth of the venv's modules), on first import,
# into one tree in the venv (PYTHONPYCACHEPREFIX; every process they start inherits it),
# instead of the whole venv ahead: `make test` does not wait for `install`'s compileall.
#
# One torch thread per process (OMP_NUM_THREADS=1): two workers each on two threads
# oversubscribe the two cores, and torch's threads spin while they wait for each other
# (the GPTQ loop ran 100x slower so, core/compression/calibration.py). One run each on the
# Xeon VM: the parallel phase took 7 min 10 s (11 min 50 s of CPU) against 8 min 5 s.
define pytest_phase
	OMP_NUM_THREADS=1 PYTHONPYCACHEPREFIX=$(abspath $(VENV))/pycache PYTHONDONTWRITEBYTECODE= \
	UNBOTTLE_REQUIRE_EXTRAS=1 $(PY) -m pytest $(1); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc
endef

# The suite spends about half its time waiting on subprocesses and servers, so most of it
# runs on two workers (pytest-xdist; 7 min of pytest in all against 9 on 2 cores; three
# workers were slower, 8 min 19 s against 7 min 10 s on this Xeon: CPU-bound).
# `loadgroup` keeps each plugin test module on one worker, which installs its plugin once.
# The tests marked `serial` run after, alone: they time the server's event loop.
PYTEST_WORKERS ?= 2

test: lint
	$(call pytest_phase,-n $(PYTEST_WORKERS) --dist loadgroup -m "not serial")
	$(call pytest_phase,-m serial)

clean:
	rm -rf artifacts metrics .prefect
