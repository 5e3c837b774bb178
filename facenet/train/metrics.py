"""Honest measurement: global throughput over steady-state steps, and progress events."""

from __future__ import annotations

import json
import os
import time

from facenet.runenv import HEARTBEAT_ENV


class EpochClock:
    """Times one epoch's steady state: from the end of step `warmup` to the last step.

    The caller synchronizes the device before `start()`/`stop()` so queued
    kernels are inside the window. Steps before the window (data-loader
    start-up, kernel selection, graph compilation) are left out, as the
    insightface callback skips its first window.
    """

    def __init__(self, warmup: int, steps_per_epoch: int):
        # Keep at least half of a short epoch in the window.
        self.warmup = min(warmup, steps_per_epoch // 2)
        self.images = 0
        self.seconds = 0.0
        self._t0: float | None = None

    def start(self) -> None:
        self._t0 = time.perf_counter()

    def count(self, n: int) -> None:
        if self._t0 is not None:
            self.images += n

    def stop(self) -> None:
        if self._t0 is not None:
            self.seconds = time.perf_counter() - self._t0


class EventLog:
    """Append-only JSON lines a supervisor can tail (one per logged step and per epoch). Every run appends, a new
    one too (its `start` event begins its part): a file cut back to nothing under a supervisor that follows it
    from where it had read would hide the new run's events (a queued job's retry without a checkpoint)."""

    def __init__(self, path: str | None):
        self.path = path
        self._fh = None
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self._fh = open(path, "a", encoding="utf-8", buffering=1)

    def emit(self, event: str, **fields) -> None:
        if self._fh is None:
            return
        record = {"event": event, "time": round(time.time(), 3), **fields}
        self._fh.write(json.dumps(record, sort_keys=True) + "\n")

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def modelzoo_block(fps: float, train_acc: float | None, e2e_seconds: float) -> str:
    """The ModelZoo scripts' closing lines, which existing dashboards grep for."""
    acc = "n/a" if train_acc is None else f"{train_acc:.4f}"
    return (f"Final Performance images/sec : {fps:.2f}\n"
            f"Final Train Accuracy : {acc}\n"
            f"E2E Training Duration sec : {int(round(e2e_seconds))}")


class Liveness:
    """Touches the file FACENET_TRAINER_HEARTBEAT names (set by the service) from the training and evaluation loops, at
    most every 2 s: a trainer whose loop stops (hung, stopped, a rank stuck) stops touching it, and the
    service stops it after FACENET_TRAINER_STALL_SECONDS. Beaten by the loop itself, not a thread, so a
    frozen loop cannot look alive."""

    def __init__(self) -> None:
        self.path: str | None = None  # read at the first beat, not at import
        self.last = 0.0

    def beat(self) -> None:
        now = time.monotonic()
        if now - self.last < 2.0:
            return
        self.last = now
        if self.path is None:
            self.path = os.environ.get(HEARTBEAT_ENV, "")
        if self.path:
            try:
                os.utime(self.path)
            except FileNotFoundError:
                open(self.path, "a").close()
            except OSError:
                pass


LIVENESS = Liveness()
