"""Where the service finds Redis, MLflow and Flower, and the limits it runs under.

Order: FACENET_* environment variables, then the `stack.json` that
`facenet-cli stack up` wrote into the state directory (FACENET_STATE_DIR,
default ~/.facenet/stack), then defaults. So with no flags every command
finds the local stack, and compose (or a user) points elsewhere with the
environment.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from facenet.errors import InputError, UserError

DEVICE_TYPES = ("npu", "cuda", "cpu")
STACK_FILE = "stack.json"


def default_state_dir() -> str:
    return os.path.abspath(os.path.expanduser(os.environ.get("FACENET_STATE_DIR") or "~/.facenet/stack"))


def read_stack_file(state_dir: str) -> dict | None:
    try:
        with open(os.path.join(state_dir, STACK_FILE), encoding="utf-8") as fh:
            return json.load(fh)
    except (FileNotFoundError, ValueError):
        return None


def _int_env(name: str, default: int) -> int:
    return int(_float_env(name, default, integer=True))


def _float_env(name: str, default: float, integer: bool = False) -> float:
    """A positive number from the environment (UserError naming the variable otherwise)."""
    raw = os.environ.get(name)
    if raw in (None, ""):
        return default
    try:
        value = int(raw) if integer else float(raw)
    except ValueError:
        raise UserError(f"{name}={raw!r}: must be {'an integer' if integer else 'a number'}") from None
    if not 0 < value < 1e12:
        raise UserError(f"{name}={raw!r}: must be positive")
    return value


@dataclass
class Settings:
    state_dir: str
    redis_url: str
    mlflow_uri: str | None
    flower_url: str | None
    # The MLflow address users open in a browser, when it differs from the one services use
    # (compose: http://mlflow:5000 inside, the published port outside).
    mlflow_public_uri: str | None = None
    # Data paths jobs may read and write; empty = none (every path refused: confinement fails closed).
    data_roots: list[str] = field(default_factory=list)
    # Where train jobs keep checkpoints, events and logs (shared by every worker that may resume them).
    runs_dir: str = ""
    experiment: str = "facenet"
    # The longest a job may run; Redis' visibility timeout must exceed it or long jobs run twice.
    max_job_seconds: int = 7 * 24 * 3600
    max_attempts: int = 3
    heartbeat_ttl: int = 30
    sweep_seconds: int = 10
    # Ended jobs: their records and logs expire after this, and at most `job_history` are kept.
    job_retention_seconds: int = 30 * 86400
    job_history: int = 10000
    # A preprocessing stage (plan, one shard, finalize) that runs longer is stopped and its job failed.
    stage_time_limit: int = 3600
    # A trainer that writes no output for this long is taken as hung: stopped, and its attempt counted.
    trainer_stall_seconds: int = 1800
    # How long an attempt (and its trainer, at start) waits for an MLflow server that does not answer.
    mlflow_wait_seconds: int = 600
    from_stack_file: bool = False
    # MLflow basic auth (the local stack's generated login, or the environment's).
    mlflow_username: str | None = None
    mlflow_password: str | None = None

    @property
    def visibility_timeout(self) -> int:
        return self.max_job_seconds + 3600

    @property
    def mlflow_browse_uri(self) -> str | None:
        """Where a user's browser finds MLflow: FACENET_MLFLOW_PUBLIC_URI, else the tracking URI."""
        return self.mlflow_public_uri or self.mlflow_uri

    @property
    def redis_display(self) -> str:
        """The Redis URL without its password, for messages."""
        from urllib.parse import urlsplit

        u = urlsplit(self.redis_url)
        return f"{u.scheme}://{u.hostname}:{u.port or 6379}{u.path}"


def export_mlflow_login(username: str | None, password: str | None, replace: bool = False) -> None:
    """An MLflow login into this process's environment, where MLflow's client (and every process started from
    here) reads it; one already there is kept unless `replace`."""
    if username and password:
        for key, value in (("MLFLOW_TRACKING_USERNAME", username), ("MLFLOW_TRACKING_PASSWORD", password)):
            if replace:
                os.environ[key] = value
            else:
                os.environ.setdefault(key, value)


def load_settings() -> Settings:
    """The settings; with the local stack's login for MLflow exported to this process's environment."""
    s = _load_settings()
    export_mlflow_login(s.mlflow_username, s.mlflow_password)
    return s


def use_stack_login_for(uri: str | None) -> None:
    """The local stack's MLflow login exported to this process's environment when `uri` is that stack's own
    MLflow (a standalone `facenet-cli train` or `evaluate --mlflow-uri` logging to it); never for another
    server, which must not be sent the stack's password."""
    s = _load_settings()
    if uri and s.mlflow_uri and uri.rstrip("/") == s.mlflow_uri.rstrip("/"):
        export_mlflow_login(s.mlflow_username, s.mlflow_password)


def _load_settings() -> Settings:
    state_dir = default_state_dir()
    stack = read_stack_file(state_dir) or {}
    env = os.environ.get
    roots = env("FACENET_DATA_ROOTS")
    if roots is None:
        roots_list = stack.get("data_roots", [])
    else:
        from facenet.confine import parse_roots

        roots_list = parse_roots(roots)
    return Settings(
        state_dir=state_dir,
        redis_url=env("FACENET_REDIS_URL") or stack.get("redis_url") or "redis://127.0.0.1:6379/0",
        mlflow_uri=env("FACENET_MLFLOW_URI") or env("MLFLOW_TRACKING_URI") or stack.get("mlflow_uri"),
        flower_url=env("FACENET_FLOWER_URL") or stack.get("flower_url"),
        mlflow_public_uri=env("FACENET_MLFLOW_PUBLIC_URI") or None,
        data_roots=roots_list,
        runs_dir=os.path.abspath(env("FACENET_RUNS_DIR") or stack.get("runs_dir") or os.path.join(state_dir, "runs")),
        experiment=env("FACENET_EXPERIMENT") or "facenet",
        max_job_seconds=_int_env("FACENET_MAX_JOB_SECONDS", 7 * 24 * 3600),
        max_attempts=_int_env("FACENET_MAX_ATTEMPTS", 3),
        heartbeat_ttl=_int_env("FACENET_HEARTBEAT_TTL", 30),
        sweep_seconds=_int_env("FACENET_SWEEP_SECONDS", 10),
        job_retention_seconds=int(86400 * _float_env("FACENET_JOB_RETENTION_DAYS", 30)),
        job_history=_int_env("FACENET_JOB_HISTORY", 10000),
        stage_time_limit=_int_env("FACENET_STAGE_TIME_LIMIT", 3600),
        trainer_stall_seconds=_int_env("FACENET_TRAINER_STALL_SECONDS", 1800),
        mlflow_wait_seconds=_int_env("FACENET_MLFLOW_WAIT_SECONDS", 600),
        from_stack_file=bool(stack) and not env("FACENET_REDIS_URL"),
        mlflow_username=env("MLFLOW_TRACKING_USERNAME") or stack.get("mlflow_username"),
        mlflow_password=env("MLFLOW_TRACKING_PASSWORD") or stack.get("mlflow_password"),
    )


def check_path_allowed(path: str, roots: list[str], what: str) -> str:
    """Absolute, symlink-resolved `path`, or InputError if it lies outside every data root. No roots
    configured refuses every path (fail closed): set FACENET_DATA_ROOTS, or use the local stack."""
    from facenet.confine import Roots

    return Roots(roots).check(path, what)


DEFAULT_DATA_ROOT = "~/facenet-data"


def default_data_roots() -> list[str]:
    """What the local stack confines jobs to unless told otherwise: one data folder it creates for the user
    (FACENET_DATA_HOME, default ~/facenet-data), never the whole home or temp dir, which hold the stack's own
    secrets and whatever else the user keeps there."""
    return [os.path.abspath(os.path.expanduser(os.environ.get("FACENET_DATA_HOME") or DEFAULT_DATA_ROOT))]


def check_roots_hold_no_state(roots: list[str], state_dir: str) -> None:
    """UserError when a data root holds the stack's state folder (its secrets, stack.json, Redis and MLflow
    stores) or lies inside it: a job may read anything beneath a root, so the two never overlap."""
    state = os.path.realpath(state_dir)
    for root in roots:
        real = os.path.realpath(root)
        if real in ("/", "/proc", "/sys", "/dev") or real.startswith(("/proc/", "/sys/", "/dev/")):
            # /proc/<pid>/environ holds every service's credentials, /dev the devices: never job data.
            raise InputError(f"data root {root}: the whole file system or a kernel folder (/proc, /sys, /dev); "
                            "name the folders that hold data")
        if state == real or state.startswith(real.rstrip(os.sep) + os.sep):
            raise InputError(f"data root {root} holds the stack's state folder {state_dir} (secrets, Redis and MLflow "
                            "stores), which jobs could then read; name narrower data folders (--data-root, "
                            "FACENET_DATA_ROOTS) or move the state (FACENET_STATE_DIR)")
        if real.startswith(state.rstrip(os.sep) + os.sep):
            raise InputError(f"data root {root} is inside the stack's state folder {state_dir}; keep data elsewhere")
