"""The compose stack and images, checked without a Docker engine: the compose-spec schema, hadolint,
and what each service runs, mounts and exposes."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from tests.conftest import REPO

COMPOSE = os.path.join(REPO, "docker-compose.yml")
DOCKERFILES = sorted(f for f in os.listdir(os.path.join(REPO, "images")) if f.endswith(".Dockerfile"))
ALWAYS = {"redis", "postgres", "mlflow", "flower", "worker-preprocess"}
NPU_MOUNTS = ["/usr/local/Ascend/driver:/usr/local/Ascend/driver:ro", "/usr/local/dcmi:/usr/local/dcmi:ro",
              "/etc/ascend_install.info:/etc/ascend_install.info:ro"]
NPU_MANAGEMENT = ["/dev/davinci_manager", "/dev/devmm_svm", "/dev/hisi_hdc"]


def _tool(name: str) -> str:
    found = shutil.which(name) or os.path.join(os.path.dirname(sys.executable), name)
    assert os.path.exists(found), f"{name} is a test dependency (pip install -e '.[test]')"
    return found


def load(path: str = COMPOSE) -> dict:
    with open(path, encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def fake_host(tmp_path, chips, npu_smi: str = "/usr/local/sbin/npu-smi") -> dict:
    """A host's /dev as `make up` reads it: /dev/davinciN for each chip id and the management node (a folder of
    this test's, handed over by FACENET_HOST_DEV), and where that host keeps npu-smi (NPU_SMI)."""
    dev = tmp_path / f"dev-{'-'.join(map(str, chips)) or 'none'}"
    dev.mkdir(exist_ok=True)
    for name in [f"davinci{i}" for i in chips] + ["davinci_manager", "devmm_svm", "hisi_hdc"]:
        (dev / name).touch()
    return {"FACENET_HOST_DEV": str(dev), "NPU_SMI": npu_smi}


def npu_override_run(wanted: str, host: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.stack.compose", "npu-override", *([wanted] if wanted else [])],
                          cwd=REPO, capture_output=True, text=True, env={**os.environ, **host})


def npu_override(n: int, tmp_path, host: dict | None = None, wanted: str | None = None) -> str:
    """The override `make up NPUS=wanted` writes on `host` (default: an 8-chip host asked for n chips)."""
    proc = npu_override_run(str(n) if wanted is None else wanted, host or fake_host(tmp_path, range(8)))
    assert proc.returncode == 0, proc.stderr
    path = tmp_path / f"compose.npu{n}-{len(list(tmp_path.iterdir()))}.yml"
    path.write_text(proc.stdout)
    return str(path)


def merged_npu_worker(n: int, tmp_path, host: dict | None = None, wanted: str | None = None) -> dict:
    """worker-npu as compose merges base + override: lists join, mappings override key by key."""
    base = load()["services"]["worker-npu"]
    over = load(npu_override(n, tmp_path, host, wanted))["services"]["worker-npu"]
    return {**base, "devices": base["devices"] + over["devices"], "volumes": base["volumes"] + over.get("volumes", []),
            "environment": {**base["environment"], **over["environment"]}}


def profile_services(profile: str) -> set[str]:
    services = load()["services"]
    return {name for name, svc in services.items() if not svc.get("profiles") or profile in svc["profiles"]}


def test_compose_file_and_npu_override_follow_the_compose_spec(tmp_path):
    files = [COMPOSE, npu_override(8, tmp_path), npu_override(4, tmp_path)]
    proc = subprocess.run([_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", *files],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES + ["base/python.Dockerfile", "base/postgres.Dockerfile"])
def test_dockerfiles_pass_hadolint(dockerfile):
    proc = subprocess.run([_tool("hadolint"), os.path.join(REPO, "images", dockerfile)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfiles_install_dependencies_before_the_source_and_run_as_non_root():
    assert set(DOCKERFILES) == {"ascend.Dockerfile", "cpu.Dockerfile", "cuda.Dockerfile", "mlflow.Dockerfile"}
    for name in DOCKERFILES:
        text = open(os.path.join(REPO, "images", name), encoding="utf-8").read()
        assert re.search(r"^FROM \$\{\w+_IMAGE\}$", text, re.M), name
        if name != "ascend.Dockerfile":  # the Ascend base is a pin of images/ascend/pins.env, not a default here
            assert re.search(r"^ARG \w+_IMAGE=\S+:\S+", text, re.M), name
        assert ":latest" not in text, f"{name}: pin the base tag"
        assert re.findall(r"^USER (\S+)", text, re.M)[-1] == "10001", name
        assert not re.search(r"(PASSWORD|SECRET|TOKEN)\s*=", text), f"{name}: no secrets baked in"
        # Every pip install goes through images/pip-install.sh with the CA secret and the wheelhouse.
        assert not re.search(r"^\s*(&& )?pip install", text, re.M), name
        for run in re.findall(r"^RUN .*?(?<!\\)$", text, re.M | re.S):
            if "pip-install" in run:
                assert "--mount=type=secret,id=pip_ca" in run and "source=wheelhouse,target=/wheelhouse" in run, run
        for arg in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_TRUSTED_HOST", "WHEELHOUSE"):
            assert re.search(rf"^ARG {arg}=", text, re.M), (name, arg)
        if name != "mlflow.Dockerfile":  # the dependency layer comes before the source is copied
            deps = re.search(r"pip-install [^\n]*\.( |$)", text, re.M)
            assert deps and text.index("COPY pyproject.toml") < deps.start() < text.index("COPY facenet"), name
    ascend = open(os.path.join(REPO, "images", "ascend.Dockerfile"), encoding="utf-8").read()
    assert "HwHiAiUser" in ascend and "ARG ASCEND_GID" in ascend
    # The pins have no second copy in the Dockerfile: bare ARGs that compose fills from pins.env.
    for arg in ("CANN_IMAGE", "ASCEND_TORCH", "ASCEND_TORCHVISION", "TORCH_NPU"):
        assert re.search(rf"^ARG {arg}$", ascend, re.M), arg
    assert not re.search(r"torch(_npu)?==\d", ascend)
    ignore = open(os.path.join(REPO, ".dockerignore"), encoding="utf-8").read().split()
    assert {".env", ".venv", ".git"} <= set(ignore) and "wheelhouse" not in ignore


def test_ascend_pins_are_a_row_of_torchnpus_compatibility_table():
    from services.stack.compose import ascend_pins

    pins = ascend_pins()
    assert set(pins) == {"CANN_IMAGE", "ASCEND_TORCH", "ASCEND_TORCHVISION", "TORCH_NPU"}
    with open(os.path.join(REPO, "images", "ascend", "compat.json"), encoding="utf-8") as fh:
        compat = json.load(fh)
    assert "COMPATIBILITY" in compat["source"]["table"] and "Ascend/pytorch" in compat["source"]["table"]
    tag = re.fullmatch(r"quay\.io/ascend/cann:(\d+\.\d+\.(?:\d+|rc\d+))-\w+-ubuntu22\.04-py3\.11", pins["CANN_IMAGE"])
    assert tag, f"CANN_IMAGE {pins['CANN_IMAGE']}: a published quay.io/ascend/cann tag with Python 3.11"
    cann = re.sub(r"\.rc(\d+)$", r".RC\1", tag.group(1))
    row = {"torch_npu": pins["TORCH_NPU"], "torch": pins["ASCEND_TORCH"], "cann": cann}
    assert any({k: r[k] for k in row} == row for r in compat["rows"]), f"{row} is no row of the table"
    assert pins["CANN_IMAGE"] in compat["cann_images"][cann]
    # torch_npu's version starts with its torch's (2.9.0.post2 goes with torch 2.9.0).
    assert pins["TORCH_NPU"].split(".post")[0] == pins["ASCEND_TORCH"]
    assert compat["torchvision"][pins["ASCEND_TORCH"]] == pins["ASCEND_TORCHVISION"]


def test_compose_defaults_and_the_torch_pin_agree_with_the_helper_and_makefile():
    from services.stack.compose import BUILD_DEFAULTS, DEFAULT_TORCH, ENV_DEFAULTS

    text = open(COMPOSE, encoding="utf-8").read()
    defaults = {**ENV_DEFAULTS, **BUILD_DEFAULTS}
    for name, default in re.findall(r"\$\{(\w+):?-([^}]*)\}", text):
        # Exceptions: PUBLIC_HOST's default is computed; an empty PIP_CA_BUNDLE means the empty file.
        if name in defaults and name not in ("PUBLIC_HOST", "PIP_CA_BUNDLE"):
            assert default == defaults[name], (name, default, defaults[name])
    makefile = open(os.path.join(REPO, "Makefile"), encoding="utf-8").read()
    assert re.search(rf"^TORCH \?= {re.escape(DEFAULT_TORCH)}$", makefile, re.M)
    for name in ("cpu.Dockerfile", "cuda.Dockerfile"):
        text = open(os.path.join(REPO, "images", name), encoding="utf-8").read()
        assert f'ARG TORCH="{DEFAULT_TORCH}"' in text, name
    for name in ("cpu.Dockerfile", "mlflow.Dockerfile"):
        text = open(os.path.join(REPO, "images", name), encoding="utf-8").read()
        assert f"ARG PYTHON_IMAGE={BUILD_DEFAULTS['PYTHON_IMAGE']}" in text, name


def test_profiles_pick_the_device_workers():
    assert profile_services("npu") == ALWAYS | {"worker-npu"}
    assert profile_services("gpu") == ALWAYS | {"worker-gpu"}
    assert profile_services("cpu") == ALWAYS | {"worker-cpu"}
    assert profile_services("nodes") == ALWAYS | {"worker-cpu2"}  # with cpu: `make up NODES=2`


def test_every_service_runs_a_local_stack_entrypoint_with_healthcheck_restart_and_dependencies():
    from services.stack import local as local_stack
    from services.stack.entrypoints import SERVICES

    compose = load()
    used = set()
    for name, svc in compose["services"].items():
        if name == "cli":
            assert svc["entrypoint"] == ["facenet-cli"] and svc["profiles"] == ["tools"]
            continue
        assert "healthcheck" in svc and svc.get("restart") == "unless-stopped", name
        if name == "postgres":
            continue
        cmd = svc["command"]
        assert cmd[:3] == ["python", "-m", "services.stack.entrypoints"] and cmd[3] in SERVICES, (name, cmd)
        used.add(cmd[3])
        health = svc["healthcheck"]["test"]
        assert health[:5] == ["CMD", "python", "-m", "services.stack.entrypoints", "healthcheck"], name
        for dep in (svc.get("depends_on") or {}).values():
            assert dep == {"condition": "service_healthy"}, name
    # The local stack runs exactly these entrypoints, so tests exercise the containers' commands.
    local = {"worker-device" if n == "worker-cpu" else n for n in local_stack.ORDER}
    assert local <= used and used == set(SERVICES)
    assert compose["services"]["mlflow"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    for worker in ("worker-preprocess", "worker-npu", "worker-gpu", "worker-cpu", "worker-cpu2"):
        svc = compose["services"][worker]
        assert set(svc["depends_on"]) == {"redis", "mlflow"}
        assert "${RAW_DIR:-./raw}:/raw:ro" in svc["volumes"], worker
    assert set(compose["volumes"]) >= {"data", "prep", "runs", "artifacts", "redis-data", "postgres-data"}


def test_entrypoints_build_the_service_commands_from_the_compose_environment(tmp_path, monkeypatch):
    from services.stack.entrypoints import service_command

    env_values = {"REDIS_PASSWORD": "r", "POSTGRES_PASSWORD": "p", "FLOWER_PASSWORD": "f",
                  "MLFLOW_TRACKING_PASSWORD": "m", "MLFLOW_FLASK_SECRET_KEY": "k"}
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("FACENET_", "MLFLOW_", "ASCEND_"))}
    services = load()["services"]
    services["worker-npu"] = merged_npu_worker(6, tmp_path)  # what `make up NPUS=6` runs: base + override
    for name, svc in services.items():
        if name in ("postgres", "cli"):
            continue
        env = {k: interpolate(str(v), env_values) for k, v in (svc.get("environment") or {}).items()}
        for k in ("FACENET_REDIS_DATA", "FACENET_FLOWER_DB", "FACENET_MLFLOW_AUTH_DIR"):
            if k in env:
                env[k] = str(tmp_path / name / os.path.basename(env[k]))
        # Each service sees its own environment only (a fresh copy: nothing leaks from the previous one).
        monkeypatch.setattr(os, "environ", {**clean, **env})
        cmd, extra = service_command(svc["command"][3])
        assert cmd and os.path.basename(cmd[0]).startswith(("python", "redis-server")), (name, cmd)
        if name == "mlflow":
            # psycopg2 is the driver the mlflow image installs; a bare postgresql:// picks psycopg 3. The URI
            # (with the database password) goes in the environment, not on the command line `ps` shows.
            assert extra["MLFLOW_BACKEND_STORE_URI"] == "postgresql+psycopg2://mlflow:p@postgres:5432/mlflow"
            assert not any("postgres" in arg for arg in cmd) and "--backend-store-uri" not in cmd
            assert "--serve-artifacts" in cmd and "--allowed-hosts" in cmd
            # MLflow's basic auth is on by default in the compose stack.
            assert "--app-name" in cmd and cmd[cmd.index("--app-name") + 1] == "basic-auth"
            assert extra["MLFLOW_AUTH_ADMIN_PASSWORD"] == "m"
        if name == "worker-npu":  # the override's FACENET_DEVICES: 6 chips, one job slot each
            assert env["FACENET_DEVICES"] == "0-5" and "ASCEND_RT_VISIBLE_DEVICES" not in env
            assert cmd[cmd.index("-Q") + 1] == "train.npu" and cmd[cmd.index("-c") + 1] == "6"
        if name in ("worker-gpu", "worker-cpu"):  # the compose file's own default: device 0
            assert cmd[cmd.index("-c") + 1] == "1", (name, cmd)


def interpolate(value: str, env: dict) -> str:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR-default} and ${VAR:?error} interpolation."""
    def one(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if name in env:
            return env[name]
        if op in (":-", "-"):
            return arg
        raise KeyError(f"{name} unset: {arg}")
    return re.sub(r"\$\{(\w+)(?:(:-|:\?|-)([^}]*))?\}", one, value)


def test_no_secret_is_hard_coded_and_only_mlflow_and_flower_are_published():
    compose = load()
    for name, svc in compose["services"].items():
        for key, value in (svc.get("environment") or {}).items():
            if re.search(r"PASSWORD|SECRET|BASIC_AUTH|REDIS_URL", key):
                assert "${" in str(value), f"{name}.{key} must come from .env"
                with pytest.raises(KeyError):  # unset secrets stop compose instead of defaulting
                    interpolate(str(value), {})
        ports = svc.get("ports", [])
        if name in ("mlflow", "flower"):
            assert len(ports) == 1 and ports[0].startswith("${BIND_ADDRESS:-127.0.0.1}:"), name
        else:
            assert not ports, f"{name} must not be published"
    gitignore = open(os.path.join(REPO, ".gitignore"), encoding="utf-8").read().split()
    assert ".env" in gitignore


@pytest.mark.parametrize("n", [8, 4])
def test_npu_worker_gets_every_device_and_mount_for_n_chips(n, tmp_path):
    w = merged_npu_worker(n, tmp_path)
    chips = [d.split(":")[0] for d in w["devices"] if re.match(r"/dev/davinci\d", d)]
    assert chips == [f"/dev/davinci{i}" for i in range(n)]
    assert [d.split(":")[0] for d in w["devices"] if not re.match(r"/dev/davinci\d", d)] == NPU_MANAGEMENT
    for mount in NPU_MOUNTS + ["/usr/local/sbin/npu-smi:/usr/local/bin/npu-smi:ro"]:
        assert mount in w["volumes"]
    assert "ipc" not in w and w["shm_size"]  # not the host's IPC namespace: the container's own /dev/shm
    assert w["environment"]["FACENET_DEVICE_TYPE"] == "npu"
    assert w["environment"]["FACENET_DEVICES"] == f"0-{n - 1}"
    from facenet.runenv import parse_devices

    assert len(parse_devices(w["environment"]["FACENET_DEVICES"])) == n
    assert w["build"]["args"]["ASCEND_GID"] == "${ASCEND_GID:-1000}"


def clean_env(**extra: str) -> dict:
    """This process' environment without any compose setting, plus `extra`."""
    from services.stack.compose import BUILD_DEFAULTS, ENV_DEFAULTS, SECRETS, ascend_pins

    drop = set(ENV_DEFAULTS) | set(BUILD_DEFAULTS) | set(SECRETS) | set(ascend_pins()) | {"MAKEFLAGS", "MFLAGS"}
    return {**{k: v for k, v in os.environ.items() if k not in drop}, **extra}


def helper(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.stack.compose", *args], cwd=REPO, capture_output=True, text=True,
                          env=clean_env(**env))


def test_make_up_helpers_write_private_secrets_once_and_detect_the_profile(tmp_path):
    env_file = tmp_path / ".env"
    run = helper
    assert run("env", str(env_file)).returncode == 0
    first = env_file.read_text()
    assert os.stat(env_file).st_mode & 0o077 == 0
    values = dict(line.split("=", 1) for line in first.splitlines() if "=" in line and not line.startswith("#"))
    for key in ("REDIS_PASSWORD", "POSTGRES_PASSWORD", "FLOWER_PASSWORD", "MLFLOW_TRACKING_PASSWORD",
                "MLFLOW_FLASK_SECRET_KEY"):
        assert len(values[key]) >= 24
    assert values["BIND_ADDRESS"] == "127.0.0.1"
    assert run("env", str(env_file)).returncode == 0 and env_file.read_text() == first  # secrets are kept
    expected = "npu" if os.path.exists("/dev/davinci0") else None
    assert run("profile").stdout.strip() in ({expected} if expected else {"gpu", "cpu"})
    bad = npu_override_run("0", fake_host(tmp_path, range(8)))
    assert bad.returncode != 0 and "NPUS=0" in bad.stderr
    assert "MLflow  http://127.0.0.1:5000" in run("urls", str(env_file)).stdout
    # Image settings go in commented out, so a later release's defaults still apply until a site sets one.
    assert "#PYTHON_IMAGE=python:3.11.11-slim-bookworm" in first and "#WHEELHOUSE=0" in first


def test_npu_override_follows_the_chips_the_host_has(tmp_path):
    """NPUS unset: every chip of the host (a 4-chip host gets 4, not 8 device nodes that do not exist); NPUS=N:
    the first N, refused beyond what the host has; chips numbered from 4 keep their host paths and are 0..N-1
    inside; npu-smi is mounted from where this host keeps it, and left out (with a warning) where it has none."""
    four = merged_npu_worker(4, tmp_path, fake_host(tmp_path, range(4)), wanted="")
    assert [d.split(":")[0] for d in four["devices"] if re.match(r"/dev/davinci\d", d)] == \
        [f"/dev/davinci{i}" for i in range(4)]
    assert four["environment"]["FACENET_DEVICES"] == "0-3"
    upper = merged_npu_worker(4, tmp_path, fake_host(tmp_path, range(4, 8), npu_smi="/opt/x/npu-smi"), wanted="auto")
    assert [d for d in upper["devices"] if re.match(r"/dev/davinci\d", d)] == \
        [f"/dev/davinci{i}:/dev/davinci{i}" for i in range(4, 8)]
    assert upper["environment"]["FACENET_DEVICES"] == "0-3" and "/opt/x/npu-smi:/usr/local/bin/npu-smi:ro" in upper["volumes"]
    two = merged_npu_worker(2, tmp_path, fake_host(tmp_path, range(8)))
    assert len([d for d in two["devices"] if re.match(r"/dev/davinci\d", d)]) == 2
    too_many = npu_override_run("6", fake_host(tmp_path, range(4)))
    assert too_many.returncode != 0 and "NPUS=6: this host has 4 chip(s)" in too_many.stderr
    none = npu_override_run("", fake_host(tmp_path, []))
    assert none.returncode != 0 and "no /dev/davinciN chip" in none.stderr
    no_tool = npu_override_run("", {**fake_host(tmp_path, range(2)), "NPU_SMI": "", "PATH": "/nonexistent"})
    if not any(os.access(p, os.X_OK) for p in ("/usr/local/sbin/npu-smi", "/usr/local/bin/npu-smi")):
        assert no_tool.returncode == 0 and "npu-smi not found" in no_tool.stderr and "volumes" not in no_tool.stdout


def test_settings_come_from_the_environment_then_env_file_then_defaults(tmp_path):
    env_file = str(tmp_path / ".env")
    assert helper("env", env_file).returncode == 0
    assert helper("get", "MLFLOW_PORT", env_file).stdout.strip() == "5000"
    assert helper("set", "MLFLOW_PORT", "5900", env_file).returncode == 0
    assert helper("get", "MLFLOW_PORT", env_file).stdout.strip() == "5900"
    assert helper("get", "MLFLOW_PORT", env_file, MLFLOW_PORT="5811").stdout.strip() == "5811"
    # `set` replaces a commented-out default in place and keeps the file private.
    assert helper("set", "PYTHON_IMAGE", "mirror.example/python:3.11", env_file).returncode == 0
    text = open(env_file, encoding="utf-8").read()
    assert "PYTHON_IMAGE=mirror.example/python:3.11" in text and "#PYTHON_IMAGE=" not in text
    assert os.stat(env_file).st_mode & 0o077 == 0
    assert helper("get", "CANN_IMAGE", env_file).stdout.strip().startswith("quay.io/ascend/cann:")
    assert helper("get", "MLFLOW_PUBLIC_URL", env_file, BIND_ADDRESS="10.1.2.3").stdout.strip() == "http://10.1.2.3:5900"
    assert helper("get", "NOPE", env_file).returncode == 2
    # make urls follows the environment (what compose publishes), not only .env.
    make = subprocess.run(["make", "--no-print-directory", "urls", f"ENV_FILE={env_file}"], cwd=REPO,
                          capture_output=True, text=True, env=clean_env(MLFLOW_PORT="5811", FLOWER_PORT="5812"))
    assert make.returncode == 0, make.stderr
    assert "MLflow  http://127.0.0.1:5811" in make.stdout and "Flower  http://127.0.0.1:5812" in make.stdout
    assert "FACENET_MLFLOW_URI=http://127.0.0.1:5811" in make.stdout


def _compose_config(tmp_path, profile: str, *files: str, **env: str) -> dict:
    """What `docker compose config` renders, as make runs it (pins, then .env, then the environment)."""
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("docker compose (v2) is not installed: .ci/run installs it")
    env_file = str(tmp_path / ".env")
    assert helper("env", env_file).returncode == 0
    args = ["docker", "compose", "--env-file", os.path.join(REPO, "images", "ascend", "pins.env"), "--env-file",
            env_file, "-f", COMPOSE]
    for f in files:
        args += ["-f", f]
    for name in profile.split(","):
        args += ["--profile", name]
    proc = subprocess.run(args + ["config", "--format", "json"], cwd=REPO, capture_output=True, text=True,
                          env=clean_env(**env))
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_compose_renders_the_cpu_profile_with_overrides_from_the_environment(tmp_path):
    cfg = _compose_config(tmp_path, "cpu", MLFLOW_PORT="5811", RAW_DIR="/srv/raw", PUBLIC_HOST="gpu-box.lan")
    assert set(cfg["services"]) == ALWAYS | {"worker-cpu"}
    mlflow = cfg["services"]["mlflow"]
    assert [(p["host_ip"], p["published"], p["target"]) for p in mlflow["ports"]] == [("127.0.0.1", "5811", 5000)]
    assert mlflow["environment"]["FACENET_MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg2://mlflow:")
    assert "gpu-box.lan:*" in mlflow["environment"]["FACENET_MLFLOW_ALLOWED_HOSTS"].split(",")
    worker = cfg["services"]["worker-cpu"]
    assert worker["environment"]["FACENET_MLFLOW_PUBLIC_URI"] == "http://gpu-box.lan:5811"
    assert worker["environment"]["FACENET_MLFLOW_URI"] == "http://mlflow:5000"
    assert {"type": "bind", "source": "/srv/raw", "target": "/raw", "read_only": True} in \
        [{k: v[k] for k in ("type", "source", "target", "read_only") if k in v} for v in worker["volumes"]]
    build = cfg["services"]["redis"]["build"]
    assert build["args"]["PYTHON_IMAGE"] == "python:3.11.11-slim-bookworm" and build["args"]["WHEELHOUSE"] == "0"
    assert cfg["secrets"]["pip_ca"]["file"].endswith("images/ca-none.pem")
    # A mirror and a CA bundle reach every build as args and the pip_ca secret.
    cfg = _compose_config(tmp_path, "cpu", PIP_INDEX_URL="https://mirror.example/simple", WHEELHOUSE="1",
                          PYTHON_IMAGE="mirror.example/python:3.11", POSTGRES_IMAGE="mirror.example/postgres:16",
                          PIP_CA_BUNDLE="/etc/ssl/certs/ca-certificates.crt")
    for name in ("redis", "mlflow"):
        args = cfg["services"][name]["build"]["args"]
        assert args["PIP_INDEX_URL"] == "https://mirror.example/simple" and args["WHEELHOUSE"] == "1"
        assert args["PYTHON_IMAGE"] == "mirror.example/python:3.11"
        assert cfg["services"][name]["build"]["secrets"][0]["source"] == "pip_ca"
    assert cfg["services"]["postgres"]["image"] == "mirror.example/postgres:16"
    assert cfg["secrets"]["pip_ca"]["file"] == "/etc/ssl/certs/ca-certificates.crt"


def test_compose_renders_a_second_local_node_and_a_host_of_a_cluster(tmp_path):
    """`make up NODES=2`: worker-cpu2, a second CPU device worker with a name of its own, both sharing the cores
    (CPU_THREADS_PER_NODE). CLUSTER=1 (docker-compose.cluster.yml): Redis and MLflow published on the head's
    cluster address, device workers on the host's network reaching them there and advertising this host's
    address, the data, crops and runs on the shared file system; without the three settings compose refuses."""
    cfg = _compose_config(tmp_path, "cpu,nodes", CPU_THREADS_PER_NODE="1")
    assert set(cfg["services"]) == ALWAYS | {"worker-cpu", "worker-cpu2"}
    one, two = (cfg["services"][w]["environment"] for w in ("worker-cpu", "worker-cpu2"))
    assert two["FACENET_NODE_NAME"] == "node2" and "FACENET_NODE_NAME" not in one
    assert one["FACENET_CPU_THREADS"] == two["FACENET_CPU_THREADS"] == "1"
    assert one["FACENET_REDIS_URL"] == two["FACENET_REDIS_URL"] and two["FACENET_MLFLOW_URI"] == "http://mlflow:5000"

    cluster = os.path.join(REPO, "docker-compose.cluster.yml")
    where = {"HEAD_ADDRESS": "10.0.0.1", "NODE_ADDRESS": "10.0.0.2", "SHARED_DIR": "/mnt/shared"}
    cfg = _compose_config(tmp_path, "npu", cluster, npu_override(8, tmp_path), **where)
    secrets = dict(line.split("=", 1) for line in open(tmp_path / ".env", encoding="utf-8").read().splitlines()
                   if "=" in line and not line.startswith("#"))
    npu = cfg["services"]["worker-npu"]
    assert npu["network_mode"] == "host"
    assert npu["environment"]["FACENET_REDIS_URL"] == f"redis://:{secrets['REDIS_PASSWORD']}@10.0.0.1:6379/0"
    assert npu["environment"]["FACENET_MLFLOW_URI"] == "http://10.0.0.1:5000"
    assert npu["environment"]["FACENET_NODE_ADDRESS"] == "10.0.0.2" and npu["environment"]["FACENET_DEVICES"] == "0-7"
    assert npu["environment"]["HCCL_IF_IP"] == "10.0.0.2"  # HCCL's NIC: the advertised one, not the first by name
    assert npu["environment"]["FACENET_WORKER_DOCTOR"] == "1"  # checks its chips before it takes jobs
    assert [(p["host_ip"], p["published"]) for p in cfg["services"]["redis"]["ports"]] == [("10.0.0.1", "6379")]
    assert ("10.0.0.1", "5000") in [(p["host_ip"], p["published"]) for p in cfg["services"]["mlflow"]["ports"]]
    assert "10.0.0.1:*" in cfg["services"]["mlflow"]["environment"]["FACENET_MLFLOW_ALLOWED_HOSTS"].split(",")
    for name in ("data", "prep", "runs"):
        assert cfg["volumes"][name]["driver_opts"] == {"type": "none", "o": "bind", "device": f"/mnt/shared/{name}"}
    for missing in where:
        env_file = str(tmp_path / ".env")
        proc = subprocess.run(["docker", "compose", "--env-file", env_file, "-f", COMPOSE, "-f", cluster, "--profile",
                               "cpu", "config"], cwd=REPO, capture_output=True, text=True,
                              env=clean_env(**{k: v for k, v in where.items() if k != missing}))
        assert proc.returncode != 0 and missing in proc.stderr, (missing, proc.stderr)
    # `make join` on a host without the head's .env refuses, instead of generating other secrets.
    join = subprocess.run(["make", "--no-print-directory", "join", f"ENV_FILE={tmp_path / 'absent.env'}"], cwd=REPO,
                          capture_output=True, text=True, env=clean_env(**where))
    assert join.returncode != 0 and "copy the head host's .env here first" in join.stderr, join.stderr
    assert not (tmp_path / "absent.env").exists()


def test_compose_renders_the_gpu_profile(tmp_path):
    cfg = _compose_config(tmp_path, "gpu", GPU_DEVICES="0-3", CUDA_IMAGE="mirror.example/cuda-python:3.11")
    assert set(cfg["services"]) == ALWAYS | {"worker-gpu"}
    gpu = cfg["services"]["worker-gpu"]
    assert gpu["environment"]["FACENET_DEVICE_TYPE"] == "cuda" and gpu["environment"]["FACENET_DEVICES"] == "0-3"
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"
    assert gpu["build"]["args"]["CUDA_IMAGE"] == "mirror.example/cuda-python:3.11"


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_compose_renders_the_npu_profile_for_n_chips(n, tmp_path):
    from services.stack.compose import ascend_pins

    cfg = _compose_config(tmp_path, "npu", npu_override(n, tmp_path))
    assert set(cfg["services"]) == ALWAYS | {"worker-npu"}
    npu = cfg["services"]["worker-npu"]
    chips = sorted(d["source"] for d in npu["devices"] if re.fullmatch(r"/dev/davinci\d+", d["source"]))
    assert chips == sorted(f"/dev/davinci{i}" for i in range(n))
    assert npu["environment"]["FACENET_DEVICES"] == f"0-{n - 1}"
    assert "ASCEND_RT_VISIBLE_DEVICES" not in npu["environment"]  # the container sees only its chips, from 0
    assert any(v["source"] == "/usr/local/sbin/npu-smi" and v["target"] == "/usr/local/bin/npu-smi"
               for v in npu["volumes"])
    args = npu["build"]["args"]
    for key, value in ascend_pins().items():  # the pins reach the build from images/ascend/pins.env
        assert args[key] == value, key
