"""The service's side of MLflow: one run per job, created before the trainer starts.

The trainer (rank 0) logs params, metrics, checkpoints and the model into
the run it is given; the service creates that run (so the job knows its run
id from the start and a resumed attempt continues it), attaches the dataset
manifest and the training log, and ends the run KILLED on cancel.
"""

from __future__ import annotations

import os
import sys

from facenet.errors import UserError
from facenet.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, check_reachable  # noqa: F401 (used by services)


def client(uri: str):
    # Fail-fast HTTP settings come from facenet.tracking, imported above before mlflow is.
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def experiment_id(c, name: str) -> str:
    """The experiment's id, created with the model-training view tag when new (MLflow 3 shows untagged
    experiments in its GenAI overview)."""
    exp = c.get_experiment_by_name(name)
    if exp is None:
        try:
            return c.create_experiment(name, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except Exception:  # another job created it in between
            exp = c.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
        c.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return exp.experiment_id


def find_or_create_run(uri: str, experiment: str, name: str, tags: dict, job_id: str) -> tuple[str, bool]:
    """(the job's run, whether this call made it): one created earlier (by an attempt that died, or a create call
    whose answer was lost while the server restarted) is reused, so a job never gets two runs. Two attempts may
    both find none (one of them cut off from Redis, its create delivered late): the oldest run with the job's tag
    is the job's run, and one made here that is not the oldest is deleted again."""
    c = client(uri)
    exp_id = experiment_id(c, experiment)
    found = _job_runs(c, exp_id, job_id)
    if found:
        return found[0], False
    made = c.create_run(exp_id, run_name=name, tags=tags).info.run_id
    return _settle(c, exp_id, job_id, made), True


def drop_if_not_oldest(uri: str, experiment: str, job_id: str, run_id: str) -> None:
    """Delete run `run_id` of job `job_id` unless it is the job's oldest run: what an attempt that made a run and
    then found the job taken over leaves behind (the oldest may already be its successor's)."""
    c = client(uri)
    _settle(c, experiment_id(c, experiment), job_id, run_id)


def _job_runs(c, exp_id: str, job_id: str) -> list[str]:
    """The ids of job `job_id`'s live runs, oldest first (start time, then id: one order on every worker)."""
    runs = c.search_runs([exp_id], filter_string=f"tags.job_id = '{job_id}'", max_results=100)
    return [r.info.run_id for r in sorted(runs, key=lambda r: (r.info.start_time or 0, r.info.run_id))]


def _settle(c, exp_id: str, job_id: str, made: str) -> str:
    oldest = (_job_runs(c, exp_id, job_id) or [made])[0]
    if oldest != made:
        c.delete_run(made)
    return oldest


def end_run(uri: str, run_id: str, status: str) -> None:
    """Set a run's final status (KILLED, FAILED) unless the trainer already ended it."""
    c = client(uri)
    if c.get_run(run_id).info.status in ("RUNNING", "SCHEDULED"):
        c.set_terminated(run_id, status=status)


def end_job_run(uri: str | None, job: dict | None, status: str) -> None:
    """End job `job`'s run (if it has one and MLflow is configured) with `status`, before the job itself is
    marked ended: whoever sees the job ended finds its run ended. An MLflow error is said on stderr, not
    raised: the job's own status is what counts."""
    if uri and job and job.get("mlflow_run_id"):
        try:
            end_run(uri, job["mlflow_run_id"], status)
        except Exception as exc:
            print(f"MLflow run not marked {status}: {type(exc).__name__}: {exc}", file=sys.stderr)


def log_file(uri: str, run_id: str, path: str, artifact_path: str) -> None:
    if os.path.exists(path):
        client(uri).log_artifact(run_id, path, artifact_path)


def run_url(uri: str, experiment_id_: str, run_id: str) -> str:
    return f"{uri.rstrip('/')}/#/experiments/{experiment_id_}/runs/{run_id}"


def list_runs(uri: str, experiment: str, limit: int = 100, browse_uri: str | None = None) -> list[dict]:
    """Runs of `experiment`, newest first, as plain dicts (run_id, name, status, params, metrics, tags);
    `url` links each run at `browse_uri` (what a browser reaches), default `uri`."""
    c = client(uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        raise UserError(f"no MLflow experiment {experiment!r} at {uri}")
    runs = c.search_runs([exp.experiment_id], max_results=limit, order_by=["attributes.start_time DESC"])
    out = []
    for run in runs:
        out.append({"run_id": run.info.run_id, "name": run.info.run_name, "status": run.info.status,
                    "start_time": run.info.start_time, "end_time": run.info.end_time,
                    "experiment_id": run.info.experiment_id,
                    "url": run_url(browse_uri or uri, run.info.experiment_id, run.info.run_id),
                    "params": dict(run.data.params), "metrics": dict(run.data.metrics),
                    "tags": {k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.")}})
    return out
