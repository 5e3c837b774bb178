"""Celery task events sent on another worker's behalf: what Flower shows of work that is no Celery task of its
own (a node's part of a gang) or whose worker cannot say it any more (a dead worker's task). Flower is a mirror:
a failure to send is said on stdout and never stops the work."""

from __future__ import annotations

from services.queue.app import app


def report_lost_task(task_id: str, job_id: str, why: str, node: str | None = None) -> None:
    """Tell Flower (task events) and the result backend that a task whose worker died has failed, on
    the dead worker's behalf: otherwise it shows STARTED forever beside the attempt that replaced it."""
    from celery.exceptions import WorkerLostError

    exc = WorkerLostError(f"{why} (job {job_id}); the job was sent again")
    try:
        app.backend.mark_as_failure(task_id, exc)
    except Exception as err:  # Flower's view is a mirror: the job itself is already requeued
        print(f"facenet sweep: could not report task {task_id} as lost: {type(err).__name__}: {err}", flush=True)
    send_task_events(node or "facenet-sweep", ("task-failed", {"uuid": task_id, "exception": repr(exc),
                                                               "traceback": ""}))


def send_task_events(hostname: str, *events: tuple[str, dict]) -> None:
    """Celery task events (type, fields) sent as worker `hostname`: what Flower shows of work that is no Celery
    task of its own (a node's part of a gang) or whose worker cannot say it any more (a dead worker's task).
    Flower is a mirror: a failure to send is said on stdout and never stops the work."""
    try:
        with app.connection_for_write() as conn:
            dispatcher = app.events.Dispatcher(conn, hostname=hostname, enabled=True)
            for kind, fields in events:
                dispatcher.send(kind, **fields)
            dispatcher.close()
    except Exception as err:
        print(f"facenet: could not send {', '.join(k for k, _ in events)} to Flower: {type(err).__name__}: {err}",
              flush=True)
