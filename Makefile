# FaceNet Stack — the two README commands are `make demo` (run the main job on the embedded
# default: no Docker, no accelerator) and `make test`. Everything installs itself into .venv.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch must come from an explicit pin: an open range pulls the newest multi-GB build.
TORCH ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: install install-ascend-torch test test-ascend-torch bench bench-outage bench-nodes bench-verify bench-align bench-scale bench-pack demo chaos env-file up join down logs ps urls cli wheelhouse base-images clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[test,onnx]'
	touch $@

# TEST_WORKERS: processes the suite runs in side by side (pytest-xdist; 0 = one process, in file order). Most tests
# wait on processes and services; tests/conftest.py hands out the longest first and keeps each module that shares
# a stack or a trained model on one worker.
TEST_WORKERS ?= 3
XDIST = $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder)
test: install
	$(PY) -m pytest -q $(XDIST) $(PYTEST_ARGS)

# The Ascend image's torch (images/ascend/pins.env) in a venv of its own, running the trainer's tests on the CPU:
# an API the code uses that this older torch lacks fails here, not on the NPU host. (PyPI's build: the CPU index
# is not reachable from every host; on a CPU it runs the same.)
# The venv lives in the user's cache, named by a hash of the pins and pyproject.toml: a second checkout, or a
# fresh clone on the same host (CI), reuses it instead of installing ~3 GB again, and a change of either makes a new
# one. It holds the dependencies only (the project is installed, then removed, as the CPU image does); its tests
# import this checkout's code through PYTHONPATH, so one venv serves every checkout.
ASCEND_KEY := $(shell ($(PYTHON) --version; cat images/ascend/pins.env pyproject.toml) 2>&1 | sha256sum | cut -c1-12)
ASCEND_VENV ?= $(or $(FACENET_CACHE),$(HOME)/.cache/facenet-stack)/venv-ascend-$(ASCEND_KEY)
ASCEND_PY := $(ASCEND_VENV)/bin/python
pin = $(shell sed -n 's/^$(1)=//p' images/ascend/pins.env)
ASCEND_TESTS ?= tests/test_ascend.py tests/test_devices.py tests/test_spec_and_data.py tests/test_fast_path.py \
	tests/test_train.py::test_learns_real_faces_with_amp_and_logs_to_mlflow \
	tests/test_train.py::test_two_process_gloo_ddp_reads_disjoint_samples
# Each use touches the venv's .used; another key's venv (older pins or pyproject) unused for 14 days is removed
# (~3 GB each), unless a make holds its lock.
install-ascend-torch:
	@mkdir -p $(dir $(ASCEND_VENV)) && flock $(ASCEND_VENV).lock $(MAKE) --no-print-directory $(ASCEND_VENV)/.installed-$(ASCEND_KEY)
	@touch $(ASCEND_VENV)/.used
	@for old in $(dir $(ASCEND_VENV))venv-ascend-*; do \
	    [ -d "$$old" ] && [ "$$old" != "$(ASCEND_VENV)" ] || continue; \
	    [ -z "$$(find "$$old" -maxdepth 1 \( -name .used -o -name '.installed-*' \) -mtime -14 -print -quit)" ] || continue; \
	    flock -n "$$old.lock" rm -rf "$$old" && rm -f "$$old.lock" && echo "removed $$old (unused for 14 days)" || true; \
	done
	@echo "Ascend torch venv: $(ASCEND_VENV)"
# Named by the key too, so that ASCEND_VENV=DIR is brought up to date when the pins change.
$(ASCEND_VENV)/.installed-$(ASCEND_KEY):
	test -x $(ASCEND_PY) || $(PYTHON) -m venv $(ASCEND_VENV)
	$(ASCEND_PY) -m pip install --quiet --upgrade pip
	$(ASCEND_PY) -m pip install --quiet torch==$(call pin,ASCEND_TORCH) torchvision==$(call pin,ASCEND_TORCHVISION)
	$(ASCEND_PY) -m pip install --quiet '.[test]'
	$(ASCEND_PY) -m pip uninstall --quiet -y facenet-stack
	rm -rf build/lib build/bdist.* *.egg-info
	touch $@

# Left out (nothing of torch in them, and CI's 8 minutes for this): doctor's failures and the unfit worker
# (queue plumbing), and the stand-in torch_npu that cannot load.
ASCEND_SKIP ?= not says_what_fails and not worker_that_fails and not torch_npu_without_cann
test-ascend-torch: install-ascend-torch
	@$(ASCEND_PY) -c 'import torch, torchvision; print("Ascend torch on the CPU:", torch.__version__, torchvision.__version__)'
	PYTHONPATH=$(CURDIR) $(ASCEND_PY) -m pytest -q -p no:cacheprovider $(XDIST) -k "$(ASCEND_SKIP)" $(ASCEND_TESTS) $(ASCEND_PYTEST_ARGS)

# BENCH_DIR: where the JSON goes; BENCH_ARGS / BENCH_QUEUE_ARGS: extra flags (see --help of each)
BENCH_DIR ?= build
bench: install
	$(PY) -m facenet.bench --out $(BENCH_DIR)/bench.json $(BENCH_ARGS)
	$(PY) -m services.bench.jobs --out $(BENCH_DIR)/bench_queue.json $(BENCH_QUEUE_ARGS)

# Each loss on 30 real people (ORL faces), verified on 10 others: ~6 min on 2 cores.
bench-outage: install
	$(PY) -m services.bench.outage --out $(BENCH_DIR)/bench_outage.json $(BENCH_OUTAGE_ARGS)

# One job on 1 node and on 2 (two local CPU device workers), same global batch: scaling and time to all ranks.
bench-nodes: install
	$(PY) -m services.bench.nodes --out $(BENCH_DIR)/bench_nodes.json $(BENCH_NODES_ARGS)

bench-verify: install
	$(PY) -m facenet.bench.verify_bench --out build/bench_verify.json

# Box crops against --align crops of the same photos (ORL, and the sample people), same training budget.
bench-align: install
	$(PY) -m facenet.bench.verify_bench --compare-align --losses softmax,arcface --out build/bench_align.json

# Data preparation (plan, shard records, finalize, dataset, samplers, loader, pairs) against the number of
# photos on a synthetic VGGFace2-layout tree of hard links: time, peak RSS and fitted exponent per stage.
# BENCH_SCALE_ARGS='--photos 2k,100k,1M,3.31M' for the full curve (default 2k).
bench-scale: install
	$(PY) -m facenet.bench.scale --out $(BENCH_DIR)/bench_scale.json $(BENCH_SCALE_ARGS)

# The loader alone from files and from a pack (facenet-cli pack) of the same crops, in one process.
# BENCH_PACK_ARGS='--cold' drops the page cache before each pass (root only).
bench-pack: install
	$(PY) -m facenet.bench.pack_bench --out $(BENCH_DIR)/bench_pack.json $(BENCH_PACK_ARGS)

demo: install
	$(PY) -m services.stack.demo

# Jobs through a real local stack while workers, trainers and Redis are killed and MLflow stopped, at
# seeded random times; checks nothing was lost and writes build/chaos.json (README: Reliability).
CHAOS_SEED ?= 1
CHAOS_JOBS ?= 4
chaos: install
	@mkdir -p build
	$(PY) -m services.bench.chaos --seed $(CHAOS_SEED) --jobs $(CHAOS_JOBS) --out build/chaos.json

# ---- the docker compose stack (Ascend, GPU or CPU host) -------------------------------------------
# `make up` writes $(ENV_FILE) (random secrets, mode 600) on first run and picks the profile from the host:
# npu if /dev/davinci0 exists, gpu if nvidia-smi works, else cpu. Every setting of .env can be given in
# make's environment instead (`MLFLOW_PORT=5811 RAW_DIR=/srv/raw make up`), as compose itself reads it;
# `python3 -m services.stack.compose get KEY` resolves one the same way (environment, .env, default).
COMPOSE ?= docker compose
HOST_PYTHON ?= python3
ENV_FILE ?= .env
setting = $(shell $(HOST_PYTHON) -m services.stack.compose get $(1) $(ENV_FILE))
PROFILE ?= $(shell $(HOST_PYTHON) -m services.stack.compose profile)
NPUS ?= $(call setting,NPUS)
NPU_OVERRIDE := build/compose.npu.yml
# worker-npu's chips and npu-smi on this host (only the npu profile reads the file; elsewhere there are no chips).
NPU_OVERRIDE_CMD = mkdir -p build && if [ "$(PROFILE)" = npu ]; then \
	$(HOST_PYTHON) -m services.stack.compose npu-override $(NPUS) > $(NPU_OVERRIDE).tmp && mv $(NPU_OVERRIDE).tmp $(NPU_OVERRIDE); fi
# NODES=2: a second CPU device worker on this host (two "nodes" for jobs over several nodes, profile nodes).
# CLUSTER=1: one stack over several hosts (docker-compose.cluster.yml: HEAD_ADDRESS, NODE_ADDRESS, SHARED_DIR);
# `make join` on each other host starts its device worker only (README: Several nodes).
NODES ?= 1
CLUSTER ?=
ifeq ($(filter 1 2,$(NODES)),)
$(error NODES=$(NODES): 1, or 2 for a second CPU node on this host; more hosts: CLUSTER=1 and make join)
endif
# Ascend pins first, then .env, then the environment (PUBLIC_HOST resolved from BIND_ADDRESS here).
COMPOSE_CMD = PUBLIC_HOST=$(call setting,PUBLIC_HOST) $(COMPOSE) --env-file images/ascend/pins.env \
	--env-file $(ENV_FILE) -f docker-compose.yml $(if $(CLUSTER),-f docker-compose.cluster.yml) \
	$(if $(filter npu,$(PROFILE)),-f $(NPU_OVERRIDE)) --profile $(PROFILE) $(if $(filter 2,$(NODES)),--profile nodes)

# .env first: compose refuses to start without the secrets it holds.
env-file:
	@$(HOST_PYTHON) -m services.stack.compose env $(ENV_FILE)

up: env-file
	@$(NPU_OVERRIDE_CMD)
	@echo "profile $(PROFILE)$(if $(filter npu,$(PROFILE)), with $(if $(NPUS),$(NPUS),every) NPU(s) of this host)"
	$(COMPOSE_CMD) up -d --build --wait
	@$(HOST_PYTHON) -m services.stack.compose urls $(ENV_FILE)

# Another host joins the head's stack: its device worker only, with the head's .env (the same secrets).
join: CLUSTER := 1
join:
	@test -f $(ENV_FILE) || { echo "error: $(ENV_FILE): copy the head host's .env here first (the stack's secrets)" >&2; exit 2; }
	@$(NPU_OVERRIDE_CMD)
	$(COMPOSE_CMD) up -d --build --wait --no-deps worker-$(PROFILE)

down: env-file
	$(COMPOSE_CMD) down

logs: env-file
	$(COMPOSE_CMD) logs -f --tail=200

ps: env-file
	$(COMPOSE_CMD) ps

urls:
	@$(HOST_PYTHON) -m services.stack.compose urls $(ENV_FILE)

# facenet-cli inside the stack's network, e.g. make cli ARGS='submit-train --npus 8 --data /data/VGG-Face2 --wait'
cli: env-file
	@$(COMPOSE_CMD) --profile tools run --rm cli $(ARGS)

# Every wheel the images need, downloaded with this host's own pip configuration into ./wheelhouse;
# then WHEELHOUSE=1 (in .env or the environment) builds with `pip --no-index` from it.
WHEEL_SETS ?= mlflow cpu $(if $(filter gpu,$(PROFILE)),cuda) $(if $(filter npu,$(PROFILE)),npu)
wheelhouse:
	$(HOST_PYTHON) -m services.stack.compose wheelhouse $(WHEEL_SETS)

# A host that reaches no container registry: stand-ins for the python and postgres base images from
# Debian packages (debootstrap; needs root), recorded as PYTHON_IMAGE and POSTGRES_IMAGE in $(ENV_FILE).
BASE_PYTHON_TAG ?= facenet-base/python:3.11-bookworm
BASE_POSTGRES_TAG ?= facenet-base/postgres:15-bookworm
base-images:
	images/base/build.sh $(BASE_PYTHON_TAG) $(BASE_POSTGRES_TAG)
	@$(HOST_PYTHON) -m services.stack.compose env $(ENV_FILE) >/dev/null
	@$(HOST_PYTHON) -m services.stack.compose set PYTHON_IMAGE $(BASE_PYTHON_TAG) $(ENV_FILE)
	@$(HOST_PYTHON) -m services.stack.compose set POSTGRES_IMAGE $(BASE_POSTGRES_TAG) $(ENV_FILE)
	@echo "$(ENV_FILE): PYTHON_IMAGE=$(BASE_PYTHON_TAG) POSTGRES_IMAGE=$(BASE_POSTGRES_TAG)"

clean:
	rm -rf build output .pytest_cache
