"""MLflow tracking for rank 0 that never stalls or kills training.

Every record (params, metrics, artifacts) goes into an ordered queue that a
background thread sends. When the server is briefly unreachable the thread
keeps the record, backs off and retries, so the training loop never waits on
HTTP; at the end `close()` flushes what is left (with a deadline) and says
how many records were sent, retried or lost.

The run itself is created (or reopened with --run-id) up front: an MLflow
server that is unreachable at start is a configuration error, reported in
one line, not something to discover after hours of training.
"""

from __future__ import annotations

import os
import queue
import re
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Callable

from facenet.errors import UserError

# MLflow's client retries each HTTP call up to 7 times with exponential backoff
# (minutes). We retry ourselves, off the training thread, so each attempt must
# fail fast. Set before mlflow is imported so its config picks them up.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"  # MLflow 3: open in the model-training view, not GenAI


def resolve_uri(uri: str | None) -> str | None:
    return uri or os.environ.get("FACENET_MLFLOW_URI") or os.environ.get("MLFLOW_TRACKING_URI") or None


def check_reachable(uri: str | None, timeout: float = 5.0) -> None:
    """UserError in one line unless the MLflow server at `uri` answers /health."""
    if not uri or not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as r:
            if r.status == 200:
                return
    except OSError as exc:
        raise UserError(f"MLflow at {uri} is unreachable ({getattr(exc, 'reason', exc)}); start the stack with "
                        "`facenet-cli stack up` or point FACENET_MLFLOW_URI at yours") from None
    raise UserError(f"MLflow at {uri} answered /health with an error")



@dataclass
class TrackerReport:
    sent: int = 0
    retries: int = 0
    lost: list[str] = field(default_factory=list)
    last_error: str | None = None

    def summary(self) -> str:
        if self.lost:
            return (f"MLflow: {len(self.lost)} record(s) could not be sent ({self.last_error}); "
                    f"{self.sent} sent")
        if self.retries:
            return (f"MLflow: all {self.sent} records sent after {self.retries} retr"
                    f"{'y' if self.retries == 1 else 'ies'} (server was briefly unreachable: {self.last_error})")
        return f"MLflow: all {self.sent} records sent"


class Tracker:
    """One MLflow run, written from a background thread."""

    def __init__(self, uri: str, experiment: str, run_id: str | None = None, run_name: str | None = None,
                 tags: dict[str, str] | None = None, connect_timeout: float = 15.0):
        import mlflow
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self._mlflow = mlflow
        mlflow.set_tracking_uri(uri)  # log_model goes through the fluent API
        self.client = MlflowClient(tracking_uri=uri)
        self.report = TrackerReport()
        self._queue: queue.Queue[tuple[str, Callable[[], Any]] | None] = queue.Queue()
        self._deadline: float | None = None  # set by close(): stop retrying there
        self.run_id = self._with_retries(lambda: self._open_run(experiment, run_id, run_name, tags or {}),
                                         connect_timeout)
        self._thread = threading.Thread(target=self._worker, name="mlflow-tracker", daemon=True)
        self._thread.start()
        self._system = None

    def start_system_metrics(self, interval: float = 10.0, resume: bool = False, chips: list | None = None) -> None:
        """MLflow's own system metrics for this run (CPU, memory, disk, network; NVIDIA GPUs with pynvml), and
        `chips`' monitors beside them on the same cadence (Ascend chips: facenet.npu_smi's).

        Its own thread and client; a failure to start is reported, never fatal."""
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._system = SystemMetricsMonitor(self.run_id, sampling_interval=interval, resume_logging=resume,
                                                tracking_uri=self.uri)
            for make in chips or []:
                try:
                    self._system.monitors.append(make())
                except Exception as exc:  # npu-smi missing: the other metrics still go
                    self.report.last_error = f"chip metrics not started: {_one_line(exc)}"
            self._system.start()
        except Exception as exc:  # psutil missing, an old MLflow: training goes on without them
            self.report.last_error = f"system metrics not started: {_one_line(exc)}"
            self._system = None

    # -- set-up ------------------------------------------------------------
    def _open_run(self, experiment: str, run_id: str | None, run_name: str | None, tags: dict) -> str:
        if run_id:
            run = self.client.get_run(run_id)
            self.client.update_run(run_id, status="RUNNING")
            for k, v in tags.items():
                self.client.set_tag(run_id, k, v)
            return run.info.run_id
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            exp_id = self.client.create_experiment(experiment, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        else:
            exp_id = exp.experiment_id
            if exp.tags.get(EXPERIMENT_KIND_TAG) is None:
                self.client.set_experiment_tag(exp_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return self.client.create_run(exp_id, run_name=run_name, tags=tags).info.run_id

    def _with_retries(self, fn: Callable[[], Any], timeout: float):
        deadline = time.monotonic() + timeout
        delay = 0.5
        while True:
            try:
                return fn()
            except Exception as exc:
                if refused_login(exc):
                    raise UserError(f"MLflow at {self.uri} refused our login ({_one_line(exc)}): {LOGIN_HINT}") \
                        from None
                if not _transient(exc):
                    raise UserError(f"MLflow at {self.uri}: {_one_line(exc)}") from None
                err = exc
            if time.monotonic() + delay > deadline:
                raise UserError(f"MLflow tracking server {self.uri} is unreachable: {_one_line(err)}") from None
            if delay == 0.5:
                print(f"MLflow at {self.uri} is not answering ({_one_line(err)}); retrying for {timeout:.0f} s",
                      flush=True)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)

    # -- records (non-blocking) -------------------------------------------
    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, _param_value(v)) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):  # the REST API takes at most 100 params per batch
            chunk = items[i:i + 100]
            self._put("params", lambda chunk=chunk: self.client.log_batch(self.run_id, params=chunk))

    def log_metrics(self, metrics: dict[str, float], step: int, timestamp_ms: int | None = None) -> None:
        """Queue one step's metrics. With the `timestamp_ms` they were first logged with, sending them again
        is harmless: MLflow's SQL stores keep one copy of an identical (key, value, step, timestamp)."""
        from mlflow.entities import Metric

        ts = int(time.time() * 1000) if timestamp_ms is None else int(timestamp_ms)
        items = [Metric(k, float(v), ts, step) for k, v in metrics.items() if v is not None]
        self._put(f"metrics@{step}", lambda: self.client.log_batch(self.run_id, metrics=items))

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        self._put(f"artifact {os.path.basename(path)}",
                  lambda: self.client.log_artifact(self.run_id, path, artifact_path))

    def log_text(self, text: str, artifact_file: str) -> None:
        self._put(f"text {artifact_file}", lambda: self.client.log_text(self.run_id, text, artifact_file))

    def log_model(self, model, example, pip_requirements: list[str]) -> None:
        """Queue mlflow.pytorch.log_model for the run (sent in order, like everything else).

        MLflow 3 saves it as a torch.export program (pt2): no pickle, and
        `example` (a numpy input batch) fixes the signature.
        """

        def send():
            import mlflow.pytorch

            with self._mlflow.start_run(run_id=self.run_id, nested=False):
                mlflow.pytorch.log_model(model, name="model", input_example=example,
                                         pip_requirements=pip_requirements)

        self._put("model", send)

    def _put(self, what: str, fn: Callable[[], Any]) -> None:
        self._queue.put((what, fn))

    # -- sending -----------------------------------------------------------
    def _worker(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                self._queue.task_done()
                return
            what, fn = item
            delay = 1.0
            while True:
                try:
                    fn()
                    self.report.sent += 1
                    break
                except Exception as exc:
                    self.report.last_error = _one_line(exc)
                    if not _transient(exc) or time.monotonic() >= self._give_up_at():
                        self.report.lost.append(what)
                        break
                    self.report.retries += 1
                    time.sleep(delay)
                    delay = min(delay * 2, 30.0)
            self._queue.task_done()

    def _give_up_at(self) -> float:
        # While training runs, keep retrying; once close() set a deadline, stop there.
        return self._deadline if self._deadline is not None else float("inf")

    def close(self, status: str = "FINISHED", timeout: float = 300.0,
              waiting: Callable[[], None] = lambda: None) -> TrackerReport:
        """Flush queued records (up to `timeout` s), end the run with `status`, report. `waiting` is called
        every 2 s meanwhile (the trainer's liveness beat: the flush is bounded here, not by the stall
        detector)."""
        self._deadline = time.monotonic() + timeout
        if self._system is not None:
            try:
                self._system.finish()
            except Exception as exc:
                self.report.last_error = f"system metrics: {_one_line(exc)}"
            self._system = None
        end = lambda: self.client.set_terminated(self.run_id, status=status)  # noqa: E731
        self._put("end run", end)
        self._queue.put(None)
        give_up = time.monotonic() + timeout + 60
        while self._thread.is_alive() and time.monotonic() < give_up:
            waiting()
            self._thread.join(2.0)
        while not self._queue.empty():  # records the thread never reached
            item = self._queue.get_nowait()
            if item is not None:
                self.report.lost.append(item[0])
        return self.report


# Server-side answers that will not change on retry (a bad request, a missing run).
_PERMANENT_CODES = {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "BAD_REQUEST", "RESOURCE_ALREADY_EXISTS",
                    "INVALID_STATE", "PERMISSION_DENIED", "UNAUTHENTICATED", "FEATURE_DISABLED"}


_REFUSED_LOGIN = re.compile(r"error code (401|403)\b")
LOGIN_HINT = ("set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to its login (the local stack's are in "
              "STATE/secrets.env)")


def refused_login(exc: BaseException) -> bool:
    """The server answered 401/403: our login is missing or wrong. Waiting does not mend that."""
    return _REFUSED_LOGIN.search(str(exc)) is not None


def _transient(exc: BaseException) -> bool:
    """Worth retrying: connection refused/reset, timeouts, 5xx. Not: the server said no."""
    from mlflow.exceptions import MlflowException, RestException

    if refused_login(exc):
        return False
    if isinstance(exc, RestException):  # the server answered
        return exc.error_code not in _PERMANENT_CODES
    if isinstance(exc, MlflowException):  # raised client-side: only a failed HTTP request is worth a retry
        return "API request to" in str(exc)
    return isinstance(exc, (ConnectionError, TimeoutError)) or type(exc).__module__.startswith(("requests", "urllib3"))


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else str(value)
    return text[:6000]  # MLflow's param value limit


def _one_line(exc: BaseException) -> str:
    raw = str(exc)
    for needle, short in (("Connection refused", "connection refused"), ("timed out", "timed out"),
                          ("Name or service not known", "unknown host"), ("Connection reset", "connection reset")):
        if needle in raw:
            return short
    text = raw.strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__
