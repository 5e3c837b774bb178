"""Process helpers for every room: the one way a process group is stopped (a trainer and its ranks, a stack
service, a chaos victim) and the one way the end of a process that is not our child is awaited."""

from __future__ import annotations

import os
import signal
import subprocess
import time

KILL_GRACE_SECONDS = 10


def wait_ended(pid: int, timeout: float) -> bool:
    """Return once process `pid` is gone or a zombie (True), or after `timeout` (False). A service is not our
    child, and whoever reaps it (init, a container's pid 1) may take its time: 2 s a process here, which
    psutil's wait() spends for nothing."""
    import psutil

    deadline = time.monotonic() + timeout
    try:
        proc = psutil.Process(pid)
        while proc.status() != psutil.STATUS_ZOMBIE:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
    except psutil.Error:
        pass
    return True


def _ended(target: int | subprocess.Popen, timeout: float) -> bool:
    if isinstance(target, int):
        return wait_ended(target, timeout)
    try:
        target.wait(timeout=timeout)  # our child: reaped here
        return True
    except subprocess.TimeoutExpired:
        return False


def stop_group(target: int | subprocess.Popen, grace: float = KILL_GRACE_SECONDS) -> None:
    """Stop the process group `target` leads (a Popen of ours, or the pid of a leader that is not our child):
    SIGTERM, SIGKILL after `grace` seconds (at once with grace 0), and a last SIGKILL for what outlived the
    leader in its group (torchrun's ranks, a service's children). Returns once the leader ended, or the
    waits (grace, then 30 s) ran out."""
    pid = target if isinstance(target, int) else target.pid
    steps = ((signal.SIGTERM, grace), (signal.SIGKILL, 30)) if grace else ((signal.SIGKILL, 30),)
    for sig, wait in steps:
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            pass
        if _ended(target, wait):
            break
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
