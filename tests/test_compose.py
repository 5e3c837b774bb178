"""The compose stack and images, checked without a Docker engine: the compose-spec schema, hadolint,
and what each service runs, mounts and exposes."""

from __future__ import annotations

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
              "/usr/local/bin/npu-smi:/usr/local/bin/npu-smi:ro", "/etc/ascend_install.info:/etc/ascend_install.info:ro"]
NPU_MANAGEMENT = ["/dev/davinci_manager", "/dev/devmm_svm", "/dev/hisi_hdc"]


def _tool(name: str) -> str:
    found = shutil.which(name) or os.path.join(os.path.dirname(sys.executable), name)
    assert os.path.exists(found), f"{name} is a test dependency (pip install -e '.[test]')"
    return found


def load(path: str = COMPOSE) -> dict:
    with open(path, encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def npu_override(n: int, tmp_path) -> str:
    out = subprocess.run([sys.executable, "-m", "services.compose", "npu-override", str(n)], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    path = tmp_path / f"compose.npu{n}.yml"
    path.write_text(out)
    return str(path)


def merged_npu_worker(n: int, tmp_path) -> dict:
    """worker-npu as compose merges base + override: device lists join, mappings override key by key."""
    base = load()["services"]["worker-npu"]
    over = load(npu_override(n, tmp_path))["services"]["worker-npu"]
    return {**base, "devices": base["devices"] + over["devices"],
            "environment": {**base["environment"], **over["environment"]}}


def profile_services(profile: str) -> set[str]:
    services = load()["services"]
    return {name for name, svc in services.items() if not svc.get("profiles") or profile in svc["profiles"]}


def test_compose_file_and_npu_override_follow_the_compose_spec(tmp_path):
    files = [COMPOSE, npu_override(8, tmp_path), npu_override(4, tmp_path)]
    proc = subprocess.run([_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", *files],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_dockerfiles_pass_hadolint(dockerfile):
    proc = subprocess.run([_tool("hadolint"), os.path.join(REPO, "images", dockerfile)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfiles_install_dependencies_before_the_source_and_run_as_non_root():
    assert set(DOCKERFILES) == {"ascend.Dockerfile", "cpu.Dockerfile", "cuda.Dockerfile", "mlflow.Dockerfile"}
    for name in DOCKERFILES:
        text = open(os.path.join(REPO, "images", name), encoding="utf-8").read()
        assert re.search(r"^FROM \$\{\w+\}$", text, re.M) and re.search(r"^ARG \w+_IMAGE=\S+:\S+", text, re.M), name
        assert ":latest" not in text, f"{name}: pin the base tag"
        assert re.findall(r"^USER (\S+)", text, re.M)[-1] == "10001", name
        assert not re.search(r"(PASSWORD|SECRET|TOKEN)\s*=", text), f"{name}: no secrets baked in"
        if name != "mlflow.Dockerfile":  # the dependency layer comes before the source is copied
            assert text.index("COPY pyproject.toml") < text.index("pip install .") < text.index("COPY facenet")
    ascend = open(os.path.join(REPO, "images", "ascend.Dockerfile"), encoding="utf-8").read()
    assert '".[npu]"' in ascend and "HwHiAiUser" in ascend and "ARG ASCEND_GID" in ascend
    assert not re.search(r"torch(_npu)?==", ascend)  # the pair is pinned in one place: the npu extra
    pyproject = open(os.path.join(REPO, "pyproject.toml"), encoding="utf-8").read()
    assert re.search(r'npu = \["torch==([\d.]+)", "torch_npu==\1"\]', pyproject)
    ignore = open(os.path.join(REPO, ".dockerignore"), encoding="utf-8").read().split()
    assert {".env", ".venv", ".git"} <= set(ignore)


def test_profiles_pick_the_device_workers():
    assert profile_services("npu") == ALWAYS | {"worker-npu"}
    assert profile_services("gpu") == ALWAYS | {"worker-gpu"}
    assert profile_services("cpu") == ALWAYS | {"worker-cpu"}


def test_every_service_runs_a_local_stack_entrypoint_with_healthcheck_restart_and_dependencies():
    from services import stack as local_stack
    from services.entrypoints import SERVICES

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
        assert cmd[:3] == ["python", "-m", "services.entrypoints"] and cmd[3] in SERVICES, (name, cmd)
        used.add(cmd[3])
        health = svc["healthcheck"]["test"]
        assert health[:5] == ["CMD", "python", "-m", "services.entrypoints", "healthcheck"], name
        for dep in (svc.get("depends_on") or {}).values():
            assert dep == {"condition": "service_healthy"}, name
    # The local stack runs exactly these entrypoints, so tests exercise the containers' commands.
    local = {"worker-device" if n == "worker-cpu" else n for n in local_stack.ORDER}
    assert local <= used and used == set(SERVICES)
    assert compose["services"]["mlflow"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    for worker in ("worker-preprocess", "worker-npu", "worker-gpu", "worker-cpu"):
        svc = compose["services"][worker]
        assert set(svc["depends_on"]) == {"redis", "mlflow"}
        assert "${RAW_DIR:-./raw}:/raw:ro" in svc["volumes"], worker
    assert set(compose["volumes"]) >= {"data", "prep", "runs", "artifacts", "redis-data", "postgres-data"}


def test_entrypoints_build_the_service_commands_from_the_compose_environment(tmp_path, monkeypatch):
    from services.entrypoints import service_command

    env_values = {"REDIS_PASSWORD": "r", "POSTGRES_PASSWORD": "p", "FLOWER_PASSWORD": "f",
                  "MLFLOW_TRACKING_PASSWORD": "m"}
    for name, svc in load()["services"].items():
        if name in ("postgres", "cli"):
            continue
        env = {k: interpolate(str(v), env_values) for k, v in (svc.get("environment") or {}).items()}
        env.setdefault("FACENET_DEVICES", "0-7")
        for k in ("FACENET_REDIS_DATA", "FACENET_FLOWER_DB", "FACENET_MLFLOW_AUTH_DIR"):
            if k in env:
                env[k] = str(tmp_path / name / os.path.basename(env[k]))
        monkeypatch.setattr(os, "environ", {**os.environ, **env})
        cmd, _ = service_command(svc["command"][3])
        assert cmd and os.path.basename(cmd[0]).startswith(("python", "redis-server")), (name, cmd)
        if name == "mlflow":
            assert cmd[cmd.index("--backend-store-uri") + 1] == "postgresql://mlflow:p@postgres:5432/mlflow"
            assert "--serve-artifacts" in cmd and "--allowed-hosts" in cmd
        if name == "worker-npu":
            assert cmd[cmd.index("-Q") + 1] == "train.npu" and cmd[cmd.index("-c") + 1] == "8"


def interpolate(value: str, env: dict) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error} interpolation."""
    def one(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if name in env:
            return env[name]
        if op == ":-":
            return arg
        raise KeyError(f"{name} unset: {arg}")
    return re.sub(r"\$\{(\w+)(?:(:-|:\?)([^}]*))?\}", one, value)


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
    for mount in NPU_MOUNTS:
        assert mount in w["volumes"]
    assert w["ipc"] == "host"
    assert w["environment"]["FACENET_DEVICE_TYPE"] == "npu"
    assert w["environment"]["FACENET_DEVICES"] == f"0-{n - 1}"
    from services.config import parse_devices

    assert len(parse_devices(w["environment"]["FACENET_DEVICES"])) == n
    assert w["build"]["args"]["ASCEND_GID"] == "${ASCEND_GID:-1000}"


def test_make_up_helpers_write_private_secrets_once_and_detect_the_profile(tmp_path):
    env_file = tmp_path / ".env"
    run = lambda *a: subprocess.run([sys.executable, "-m", "services.compose", *a], cwd=REPO,  # noqa: E731
                                    capture_output=True, text=True)
    assert run("env", str(env_file)).returncode == 0
    first = env_file.read_text()
    assert os.stat(env_file).st_mode & 0o077 == 0
    values = dict(line.split("=", 1) for line in first.splitlines() if "=" in line and not line.startswith("#"))
    for key in ("REDIS_PASSWORD", "POSTGRES_PASSWORD", "FLOWER_PASSWORD", "MLFLOW_TRACKING_PASSWORD"):
        assert len(values[key]) >= 24
    assert values["BIND_ADDRESS"] == "127.0.0.1"
    assert run("env", str(env_file)).returncode == 0 and env_file.read_text() == first  # secrets are kept
    expected = "npu" if os.path.exists("/dev/davinci0") else None
    assert run("profile").stdout.strip() in ({expected} if expected else {"gpu", "cpu"})
    bad = run("npu-override", "0")
    assert bad.returncode != 0 and "NPUS=0" in bad.stderr
    assert "MLflow  http://127.0.0.1:5000" in run("urls", str(env_file)).stdout
