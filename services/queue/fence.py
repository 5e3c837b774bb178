"""Self-fencing: the local deadline until which an attempt (or its part on a gang node) may act for its job,
whatever Redis does.

An attempt holds its job while its heartbeat key lives in Redis (the TTL), and cannot know when a stalled Redis
(port open, no answer), a slow link or a half-open socket will let that key expire. It does know when it last
renewed it: a renewal *sent* at local monotonic time t keeps the key until at least t + TTL, since Redis sets
the expiry when the request arrives. So the attempt acts only until t + LEASE_SAFETY x TTL on its own clock:
past that, its trainer is killed, by a watchdog thread here that does no I/O and by the trainer itself (told
each new deadline through a pipe, facenet.train.launch.watch_supervisor), and the attempt writes nothing more.
The rest of the TTL is the margin for that kill; only after it may a sweeper requeue the job.

Deadlines are CLOCK_MONOTONIC readings (time.monotonic() on Linux): one clock for every process on the host,
which is where a trainer runs beside the worker that started it (a container shares the host's clock unless it
is given a time namespace, which compose never does).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Callable

# The share of the heartbeat TTL an attempt may act on one renewal: 18 s of the default 30, leaving 12 s for
# the kill to land before the key can expire (and a sweeper requeue the job).
LEASE_SAFETY = 0.6
WATCH_SECONDS = 0.1


class Fence:
    """One attempt's (or gang node part's) deadline. `renewed` moves it on after a renewal that succeeded,
    `holds` says whether it has not passed, `channel` hands it to a trainer about to start, `guard` names a
    process group to SIGKILL the moment it passes; `on_expiry` callbacks run then too (in the watchdog thread:
    they must not block)."""

    def __init__(self, hold_seconds: float, sent_at: float, name: str):
        """`sent_at`: the monotonic time the claim that started the hold was sent."""
        self.hold = hold_seconds
        self._deadline = sent_at + hold_seconds
        self._lock = threading.Lock()
        self._pipes: list[int] = []
        self._groups: list[int] = []
        self._callbacks: list[Callable[[], None]] = []
        self.expired = threading.Event()
        self._closed = threading.Event()
        threading.Thread(target=self._watch, daemon=True, name=f"fence-{name}").start()

    @property
    def deadline(self) -> float:
        return self._deadline

    def holds(self) -> bool:
        """True while the deadline has not passed (on this host's monotonic clock)."""
        return not self.expired.is_set() and time.monotonic() < self._deadline

    def renewed(self, sent_at: float, hold: float | None = None) -> None:
        """A renewal sent at monotonic `sent_at` succeeded: act until sent_at + `hold` (default: the fence's own
        hold), never less than already granted, and never again once the deadline passed (even before the
        watchdog saw it: a process stopped and resumed must not extend a deadline that ran out meanwhile)."""
        with self._lock:
            if self.expired.is_set() or time.monotonic() >= self._deadline:
                return
            self._deadline = max(self._deadline, sent_at + (self.hold if hold is None else hold))
            line = _line(self._deadline)
            for fd in list(self._pipes):
                try:
                    os.write(fd, line)
                except BlockingIOError:  # the trainer is not reading (stopped): it keeps the last deadline it read
                    pass
                except OSError:  # it exited
                    self._pipes.remove(fd)
                    os.close(fd)

    def channel(self) -> tuple[int, str]:
        """A pipe for a trainer about to start: (its read end, to pass to the process; the FENCE_ENV value, which
        names that descriptor and the deadline now). Every later deadline is written to the pipe, non-blocking:
        a trainer that stops reading is never waited for."""
        read, write = os.pipe()
        os.set_blocking(write, False)
        with self._lock:
            self._pipes.append(write)
            return read, f"{read}:{_line(self._deadline).decode().strip()}"

    def guard(self, pgid: int) -> None:
        """Kill process group `pgid` (a trainer's) when the deadline passes; at once if it already has."""
        with self._lock:
            self._groups.append(pgid)
            passed = self.expired.is_set()
        if passed:
            _kill_group(pgid)

    def unguard(self, pgid: int) -> None:
        """Group `pgid` has ended and was reaped: its id may be reused, never kill it."""
        with self._lock:
            if pgid in self._groups:
                self._groups.remove(pgid)

    def on_expiry(self, fn: Callable[[], None]) -> None:
        self._callbacks.append(fn)

    def _watch(self) -> None:
        # Nothing here waits on the network or a disk: only the clock, so a stalled Redis cannot hold it.
        while not self._closed.wait(WATCH_SECONDS):
            if time.monotonic() < self._deadline:
                continue
            with self._lock:
                self.expired.set()
                groups = list(self._groups)
            for pgid in groups:
                _kill_group(pgid)
            for fn in self._callbacks:
                fn()
            return

    def close(self) -> None:
        """Stop watching (the attempt is over) and close the trainers' pipes."""
        self._closed.set()
        with self._lock:
            for fd in self._pipes:
                os.close(fd)
            self._pipes.clear()


def _line(deadline: float) -> bytes:
    """A deadline as the trainer reads it (facenet/train/launch.py _Fence): seconds of CLOCK_MONOTONIC, one line."""
    return f"{deadline:.3f}\n".encode()


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
