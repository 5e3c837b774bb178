# FaceNet Stack — the two README commands are `make demo` (run the main job on the embedded
# default: no Docker, no accelerator) and `make test`. Everything installs itself into .venv.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch must come from an explicit pin: an open range pulls the newest multi-GB build.
TORCH ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: install test bench demo up down logs ps urls cli clean

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

# ---- the docker compose stack (Ascend, GPU or CPU host) -------------------------------------------
# `make up` writes .env (random secrets, mode 600) on first run and picks the profile from the host:
# npu if /dev/davinci0 exists, gpu if nvidia-smi works, else cpu. PROFILE=... and NPUS=... override.
COMPOSE ?= docker compose
HOST_PYTHON ?= python3
PROFILE ?= $(shell $(HOST_PYTHON) -m services.compose profile)
NPUS ?= 8
NPU_OVERRIDE := build/compose.npu.yml
COMPOSE_CMD = $(COMPOSE) --env-file .env -f docker-compose.yml $(if $(filter npu,$(PROFILE)),-f $(NPU_OVERRIDE)) --profile $(PROFILE)

up:
	$(HOST_PYTHON) -m services.compose env .env
	@mkdir -p build && $(HOST_PYTHON) -m services.compose npu-override $(NPUS) > $(NPU_OVERRIDE)
	@echo "profile $(PROFILE)$(if $(filter npu,$(PROFILE)), with $(NPUS) NPUs)"
	$(COMPOSE_CMD) up -d --build --wait
	@$(HOST_PYTHON) -m services.compose urls .env

down:
	$(COMPOSE_CMD) down

logs:
	$(COMPOSE_CMD) logs -f --tail=200

ps:
	$(COMPOSE_CMD) ps

urls:
	@$(HOST_PYTHON) -m services.compose urls .env

# facenet-cli inside the stack's network, e.g. make cli ARGS='submit-train --npus 8 --data /data/VGG-Face2 --wait'
cli:
	$(COMPOSE_CMD) --profile tools run --rm cli $(ARGS)

clean:
	rm -rf build output .pytest_cache
