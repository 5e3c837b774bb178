"""Helpers the Makefile runs on the host around docker compose (standard library only: no venv needed).

  python3 -m services.stack.compose env [.env]            write .env with random secrets (mode 0600), add missing keys
  python3 -m services.stack.compose get KEY [.env]        one setting: the environment, else .env, else the default
  python3 -m services.stack.compose set KEY VALUE [.env]  write one setting into .env (make base-images records its tags)
  python3 -m services.stack.compose profile               npu if /dev/davinci0 exists, gpu if nvidia-smi works, else cpu
  python3 -m services.stack.compose npu-override [N]      compose override: worker-npu's chips (N, or all) and npu-smi
  python3 -m services.stack.compose urls [.env]           where MLflow and Flower are, and where the credentials live
  python3 -m services.stack.compose wheelhouse [SET...]   download every wheel the images need (sets: cpu cuda npu mlflow)
  python3 -m services.stack.compose pip-cert              the CA bundle this host's pip uses (for PIP_CA_BUNDLE)

Every setting is read the way compose reads it: a variable in the environment (`MLFLOW_PORT=5811 make
up`) wins over `.env`, which wins over the default here. The Ascend pins (CANN_IMAGE, ASCEND_TORCH,
ASCEND_TORCHVISION, TORCH_NPU) come from images/ascend/pins.env, the one place they are set.
"""

from __future__ import annotations

import os
import platform
import re
import secrets
import shutil
import socket
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ASCEND_PINS = os.path.join(REPO, "images", "ascend", "pins.env")
# Default pins of the CPU/CUDA images; the Makefile's TORCH for the venv is the same pair (a test checks).
DEFAULT_TORCH = "torch==2.14.1 torchvision==0.29.1"

# Written into a new .env as live settings.
ENV_DEFAULTS = {
    # Bind published ports to this address (0.0.0.0 exposes MLflow and Flower to the network).
    "BIND_ADDRESS": "127.0.0.1",
    "MLFLOW_PORT": "5000",
    "FLOWER_PORT": "5555",
    # Host folders: the raw data (mounted read-only) and where datasets live.
    "RAW_DIR": "./raw",
    # Chips of worker-npu: empty = every /dev/davinciN of this host.
    "NPUS": "",
    "GPU_DEVICES": "0",
    "CPU_DEVICES": "0",
    "ASCEND_GID": "1000",
    "FLOWER_USER": "facenet",
    "MLFLOW_TRACKING_USERNAME": "facenet",
    # 1: MLflow's basic-auth app (users send MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD).
    "FACENET_MLFLOW_AUTH": "1",
}
# Written into a new .env commented out: a site sets them for its registry, mirror or offline builds.
# Unset, compose and the Dockerfiles use these defaults (docker-compose.yml repeats them; a test checks).
BUILD_DEFAULTS = {
    # The host name users browse to; empty: BIND_ADDRESS, or this host's name when bound to 0.0.0.0.
    "PUBLIC_HOST": "",
    # Base images: a registry mirror's names, or the stand-ins `make base-images` builds.
    "PYTHON_IMAGE": "python:3.11.11-slim-bookworm",
    "POSTGRES_IMAGE": "postgres:16.6-bookworm",
    # The CUDA image's base (PyPI's torch wheels bundle the CUDA runtime, so a plain Python image does).
    "CUDA_IMAGE": "python:3.11.11-slim-bookworm",
    # Package sources of the image builds; empty = pip's own default (PyPI).
    "PIP_INDEX_URL": "",
    "PIP_EXTRA_INDEX_URL": "",
    "PIP_TRUSTED_HOST": "",
    # Where the CPU and Ascend images get torch (a CPU-only build); empty = from PIP_INDEX_URL.
    "TORCH_INDEX": "https://download.pytorch.org/whl/cpu",
    # torch of the CPU and CUDA images.
    "TORCH": DEFAULT_TORCH,
    # A CA bundle (PEM) for a TLS-intercepting proxy, handed to pip as a build secret (never in a layer).
    "PIP_CA_BUNDLE": "",
    # 1: install only from ./wheelhouse (`make wheelhouse` on a connected host fills it), no index at all.
    "WHEELHOUSE": "0",
}
# MLFLOW_FLASK_SECRET_KEY: the static key MLflow's basic-auth app signs its CSRF tokens with.
SECRETS = ("REDIS_PASSWORD", "POSTGRES_PASSWORD", "FLOWER_PASSWORD", "MLFLOW_TRACKING_PASSWORD",
           "MLFLOW_FLASK_SECRET_KEY")
WHEELHOUSE_DIR = os.path.join(REPO, "wheelhouse")
WHEEL_SETS = ("cpu", "cuda", "npu", "mlflow")


def read_env(path: str) -> dict:
    """KEY=VALUE lines of a .env-style file (comments and blank lines skipped, one pair of quotes removed)."""
    values = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                line = line.strip()
                if line and not line.startswith("#") and "=" in line:
                    k, v = line.split("=", 1)
                    v = v.strip()
                    if len(v) >= 2 and v[0] == v[-1] and v[0] in "'\"":
                        v = v[1:-1]
                    values[k.strip()] = v
    return values


def ascend_pins() -> dict:
    return read_env(ASCEND_PINS)


def settings(path: str = ".env", environ: dict | None = None) -> dict:
    """Every setting as compose sees it: defaults < Ascend pins < .env < the environment (`environ`,
    default this process')."""
    environ = os.environ if environ is None else environ
    values = {**ENV_DEFAULTS, **BUILD_DEFAULTS, **ascend_pins(), **read_env(path)}
    for key in list(values) + [k for k in SECRETS if k not in values]:
        if key in environ:
            values[key] = environ[key]
    values["PUBLIC_HOST"] = public_host(values)
    return values


def public_host(values: dict) -> str:
    """The host name in the URLs users open: PUBLIC_HOST, else where the ports are bound."""
    if values.get("PUBLIC_HOST"):
        return values["PUBLIC_HOST"]
    bind = values.get("BIND_ADDRESS", "127.0.0.1")
    if bind in ("", "0.0.0.0", "::"):
        return socket.getfqdn() or "127.0.0.1"
    return bind


def write_env(path: str = ".env") -> bool:
    """Create `path` with fresh secrets, or add missing keys to it; True if it was written."""
    values = read_env(path)
    text = open(path, encoding="utf-8").read() if os.path.exists(path) else ""
    missing = {k: v for k, v in ENV_DEFAULTS.items() if k not in values}
    missing.update({k: secrets.token_urlsafe(24) for k in SECRETS if k not in values})
    commented = [k for k in BUILD_DEFAULTS if k not in values and not re.search(rf"^#\s*{k}=", text, re.M)]
    if not missing and not commented and os.path.exists(path):
        os.chmod(path, 0o600)
        return False
    lines = [] if values else ["# generated by `make up`: the stack's secrets and settings; keep private (mode 600).",
                               "# A variable of the same name in make's environment overrides a line here."]
    lines += [f"{k}={v}" for k, v in missing.items()]
    if commented:
        lines.append("# Image builds (README: Air-gapped and mirrored hosts); uncomment to change a default.")
        lines += [f"#{k}={BUILD_DEFAULTS[k]}" for k in commented]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a") as fh:
        if text and not text.endswith("\n"):
            fh.write("\n")
        fh.write("\n".join(lines) + "\n")
    os.chmod(path, 0o600)
    return True


def set_env(key: str, value: str, path: str = ".env") -> None:
    """Set KEY=VALUE in `path` (replacing a live or commented-out line), keeping mode 600."""
    if not re.fullmatch(r"[A-Z][A-Z0-9_]*", key) or "\n" in value:
        raise SystemExit(f"set {key!r}: keys are UPPER_CASE and values one line")
    lines = open(path, encoding="utf-8").read().splitlines() if os.path.exists(path) else []
    out, done = [], False
    for line in lines:
        if re.match(rf"^#?\s*{key}=", line):
            if not done:
                out.append(f"{key}={value}")
                done = True
            continue
        out.append(line)
    if not done:
        out.append(f"{key}={value}")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write("\n".join(out) + "\n")
    os.chmod(path, 0o600)


def detect_profile() -> str:
    if os.path.exists("/dev/davinci0"):
        return "npu"
    if shutil.which("nvidia-smi"):
        try:
            if subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=20).returncode == 0:
                return "gpu"
        except (OSError, subprocess.TimeoutExpired):
            pass
    return "cpu"


NPU_SMI_IN_CONTAINER = "/usr/local/bin/npu-smi"


def host_chips(dev: str = "/dev") -> list[int]:
    """The Ascend chips this host has: the ids of its /dev/davinciN nodes (davinci_manager is not a chip)."""
    try:
        names = os.listdir(dev)
    except OSError:
        return []
    return sorted(int(m.group(1)) for m in map(re.compile(r"^davinci(\d+)$").match, names) if m)


def npu_override(wanted: str = "", dev: str = "/dev", npu_smi: str | None = None) -> str:
    """The chips a worker-npu container gets: NPUS of them (empty or auto: every chip this host has), each
    mapped at its host path, and npu-smi from wherever the host keeps it. Inside the container the runtime
    numbers the chips it sees from 0 (vllm-ascend's install guide maps one /dev/davinciN and uses device 0), so
    FACENET_DEVICES is 0..N-1 and no ASCEND_RT_VISIBLE_DEVICES is set. The base file carries the management
    devices and the driver mounts."""
    chips = host_chips(dev)
    if wanted in ("", "auto"):
        if not chips:
            raise SystemExit(f"NPUS: no /dev/davinciN chip on this host ({dev}); set NPUS=N, or PROFILE=cpu/gpu")
        n = len(chips)
    else:
        try:
            n = int(wanted)
        except ValueError:
            raise SystemExit(f"NPUS={wanted!r}: a number of chips, 1 to 16, or auto") from None
        if not 1 <= n <= 16:
            raise SystemExit(f"NPUS={n}: an Ascend node has 1 to 16 chips")
        if chips and n > len(chips):
            raise SystemExit(f"NPUS={n}: this host has {len(chips)} chip(s) ({', '.join(f'davinci{i}' for i in chips)})")
    use = chips[:n] if chips else list(range(n))  # no chips here (a render on another host): davinci0..N-1
    devices = "".join(f"      - /dev/davinci{i}:/dev/davinci{i}\n" for i in use)
    # facenet.npu_smi is standard library only, as this module must be (the host's python runs it).
    from facenet.npu_smi import NPU_SMI_PLACES, search

    tool = npu_smi if npu_smi is not None else search()
    volumes = f"    volumes:\n      - {tool}:{NPU_SMI_IN_CONTAINER}:ro\n" if tool else ""
    if not tool:
        print(f"warning: npu-smi not found on this host (PATH, {', '.join(NPU_SMI_PLACES)}): the worker's doctor "
              "and the NPU system metrics will not see the chips", file=sys.stderr)
    return ("# generated by `make up` (python3 -m services.stack.compose npu-override [N]): one entry per chip\n"
            "services:\n  worker-npu:\n    devices:\n" + devices + volumes +
            f"    environment:\n      FACENET_DEVICES: \"0-{n - 1}\"\n")


def mlflow_public_url(values: dict) -> str:
    return f"http://{values['PUBLIC_HOST']}:{values['MLFLOW_PORT']}"


def urls(path: str = ".env") -> str:
    env = settings(path)
    host = env["PUBLIC_HOST"]
    auth = " (user MLFLOW_TRACKING_USERNAME, password MLFLOW_TRACKING_PASSWORD)" \
        if env.get("FACENET_MLFLOW_AUTH") == "1" else ""
    return (f"MLflow  {mlflow_public_url(env)}{auth}\n"
            f"Flower  http://{host}:{env['FLOWER_PORT']} (user FLOWER_USER, password FLOWER_PASSWORD)\n"
            f"credentials: {os.path.abspath(path)} (mode 600)\n"
            "submit jobs: make cli ARGS='submit-train --npus 8 --data /data/VGG-Face2 --wait'\n"
            f"facenet-cli on this host: FACENET_MLFLOW_URI={mlflow_public_url(env)}"
            + (f" MLFLOW_TRACKING_USERNAME=... MLFLOW_TRACKING_PASSWORD=... (from {os.path.basename(path)})"
               if auth else "") + " facenet-cli runs")


# ---- the wheelhouse: every wheel the images install, for builds with no index (WHEELHOUSE=1) --------------

def project_requirements() -> list[str]:
    """pyproject.toml's [project] dependencies (a tiny parser: no tomllib on Python 3.10)."""
    text = open(os.path.join(REPO, "pyproject.toml"), encoding="utf-8").read()
    block = re.search(r"^dependencies = \[(.*?)^\]", text, re.M | re.S)
    return re.findall(r'^\s*"([^"]+)"', block.group(1), re.M) if block else []


def image_requirements(name: str) -> list[str]:
    with open(os.path.join(REPO, "images", "requirements", f"{name}.txt"), encoding="utf-8") as fh:
        return [line.split("#")[0].strip() for line in fh if line.split("#")[0].strip()]


def wheel_sets(values: dict) -> dict[str, list[str]]:
    """Per image set, the pip requirements to download."""
    # `pip install .` builds the project in an isolated env. pip evaluates environment markers with the
    # interpreter that downloads, so what another 3.11.x needs comes too (redis: async-timeout < 3.11.3).
    build = ["setuptools>=68", "wheel", "async-timeout>=4.0.3"]
    base = project_requirements() + build
    npu_torch = [f"torch=={values['ASCEND_TORCH']}", f"torchvision=={values['ASCEND_TORCHVISION']}"]
    return {
        "cpu": values["TORCH"].split() + base + image_requirements("cpu"),
        "cuda": values["TORCH"].split() + base + image_requirements("cuda"),
        "npu": npu_torch + [f"torch_npu=={values['TORCH_NPU']}"] + base,
        "mlflow": image_requirements("mlflow") + build,
    }


def index_answers(url: str) -> bool:
    """Does a package index answer at all? (pip retries an unreachable one for minutes.)"""
    import urllib.request

    if not url:
        return False
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/", timeout=10):
            return True
    except OSError:
        return False


def wheelhouse(sets: list[str], dest: str = WHEELHOUSE_DIR, arch: str | None = None, path: str = ".env") -> int:
    """`pip download` (with this host's own pip configuration) every wheel of `sets` for CPython 3.11 on
    linux/ARCH into DEST. Returns pip's exit status."""
    values = settings(path)
    arch = arch or os.environ.get("WHEELHOUSE_ARCH") or platform.machine()
    arch = {"amd64": "x86_64", "arm64": "aarch64"}.get(arch, arch)
    unknown = [s for s in sets if s not in WHEEL_SETS]
    if unknown:
        raise SystemExit(f"wheelhouse: unknown set {', '.join(unknown)}; choose from {' '.join(WHEEL_SETS)}")
    os.makedirs(dest, exist_ok=True)
    target = ["--python-version", "3.11", "--implementation", "cp", "--only-binary=:all:"]
    # Every manylinux tag up to glibc 2.35 (the CANN images' Ubuntu 22.04; Debian bookworm has 2.36).
    for tag in [f"manylinux_2_{minor}" for minor in range(35, 16, -1)] + ["manylinux2014", "linux"]:
        target += ["--platform", f"{tag}_{arch}"]
    index = []
    if index_answers(values["TORCH_INDEX"]):
        index = ["--extra-index-url", values["TORCH_INDEX"]]
    elif values["TORCH_INDEX"]:
        print(f"wheelhouse: TORCH_INDEX {values['TORCH_INDEX']} does not answer; torch comes from pip's own "
              "indexes", flush=True)
    requirements = wheel_sets(values)
    for name in sets:
        # The CPU and Ascend sets prefer TORCH_INDEX's CPU-only torch where that index is reachable.
        extra = index if name in ("cpu", "npu") else []
        cmd = [sys.executable, "-m", "pip", "download", "--dest", dest, *target, *extra, *requirements[name]]
        print(f"wheelhouse [{name}]: pip download {' '.join(requirements[name])}", flush=True)
        rc = subprocess.run(cmd).returncode
        if rc:
            print(f"wheelhouse: pip download failed for set {name!r} (exit {rc}); see pip's message above",
                  file=sys.stderr)
            return rc
    wheels = [f for f in os.listdir(dest) if f.endswith(".whl")]
    size = sum(os.path.getsize(os.path.join(dest, f)) for f in wheels)
    print(f"wheelhouse: {len(wheels)} wheels, {size / 2**30:.2f} GiB in {dest} for CPython 3.11 linux/{arch}; "
          "build with WHEELHOUSE=1 (in .env or make's environment)")
    return 0


def pip_cert() -> str:
    """The CA bundle this host's pip trusts (`pip config list`'s cert, else PIP_CERT), or ''."""
    out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    found = re.findall(r"^\S*\.cert='([^']+)'", out, re.M) + [os.environ.get("PIP_CERT", "")]
    return next((c for c in found if c and os.path.isfile(c)), "")


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "env":
        path = rest[0] if rest else ".env"
        if write_env(path):  # quiet when nothing changed: `make cli ARGS='... --json'` output stays JSON
            print(f"wrote {path} (mode 600)")
    elif cmd == "get" and rest:
        key = rest[0]
        values = settings(rest[1] if len(rest) > 1 else ".env")
        if key == "MLFLOW_PUBLIC_URL":
            print(mlflow_public_url(values))
        elif key in values:
            print(values[key])
        else:
            print(f"unknown setting {key!r}", file=sys.stderr)
            return 2
    elif cmd == "set" and len(rest) >= 2:
        set_env(rest[0], rest[1], rest[2] if len(rest) > 2 else ".env")
    elif cmd == "pip-cert":
        print(pip_cert())
    elif cmd == "profile":
        print(detect_profile())
    elif cmd == "npu-override":
        print(npu_override(rest[0] if rest else "", os.environ.get("FACENET_HOST_DEV", "/dev"),
                           os.environ.get("NPU_SMI") or None), end="")
    elif cmd == "urls":
        print(urls(rest[0] if rest else ".env"))
    elif cmd == "wheelhouse":
        return wheelhouse(rest or ["cpu", "mlflow"])
    else:
        print(f"unknown command {' '.join(argv)!r}\n{__doc__.strip()}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
