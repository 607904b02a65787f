# The same words every Python service uses: run, test, lint, bench.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
APT_TOOLS := storescu:dcmtk dciodvfy:dicom3tools Orthanc:orthanc ojph_compress:openjph-tools \
             redis-server:redis-server \
             chromium:chromium npm:npm \
             /usr/share/orthanc/plugins/libOrthancDicomWeb.so:orthanc-dicomweb
PYTEST_ARGS ?=

.PHONY: run test lint format bench tools venv clean viewer-demo

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the CPU build of torch that lies on disk; installed first so monai's requirement is met
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $(STAMP)

venv: $(STAMP)

# Debian tools the tests use: dcmtk (storescu, img2dcm), dicom3tools (dciodvfy), Orthanc; the viewer
# test (tests/test_viewer.py) also needs chromium, npm and Orthanc's DICOMweb plugin.
tools:
	@missing=""; for pair in $(APT_TOOLS); do \
	  { command -v $${pair%%:*} || [ -e $${pair%%:*} ]; } >/dev/null 2>&1 \
	    || missing="$$missing $${pair##*:}"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi

run: $(STAMP)
	$(VENV)/bin/dermpacs serve --config config/dermpacs.toml

test: $(STAMP) tools
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The viewer test's study in Orthanc + OHIF for a person to look at (docs/viewing.md); Ctrl-C stops.
VIEWER_PORT ?= 3000
viewer-demo: $(STAMP) tools
	$(PY) -m tests.viewer.demo --port $(VIEWER_PORT)

# The benchmark suite (docs/benchmarks.md): receive, inference, end to end; bounded in time
# (45–55 minutes), results in bench/results/, tables written into docs/benchmarks.md.
# BENCH_SHORT=1: a handful of small photos, checks the harness works, asserts no times.
BENCH_SHORT ?=
BENCH_ARGS ?=
bench: $(STAMP) tools
	$(PY) -m bench $(if $(BENCH_SHORT),--short) $(BENCH_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check dermpacs workers tests bench
	$(VENV)/bin/ruff format --check dermpacs workers tests bench
	$(VENV)/bin/mypy

format: $(STAMP)
	$(VENV)/bin/ruff format dermpacs workers tests bench
	$(VENV)/bin/ruff check --fix dermpacs workers tests bench

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
