# FaceNet Stack — the two README commands are `make demo` (run the main job on the embedded
# default: no Docker, no accelerator) and `make test`. Everything installs itself into .venv.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch must come from an explicit pin: an open range pulls the newest multi-GB build.
TORCH ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: install test bench demo up down logs clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: install
	$(PY) -m facenet.bench --out build/bench.json
	$(PY) -m services.bench_queue --out build/bench_queue.json

demo: install
	$(PY) -m services.demo

up down logs:
	@echo "make $@: the docker compose stack arrives with issue 5; use 'make demo' for the local stack" >&2; exit 1

clean:
	rm -rf build output .pytest_cache
