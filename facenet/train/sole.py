"""One trainer per output folder and rank, and a journal that says so.

Each training process holds an exclusive lock on OUTPUT/trainer.rank<R>.lock (flock: the kernel drops it when
the process dies, however it dies) for its whole life. A second trainer of the same folder and rank (a second
attempt of one job whose first has not died yet, two users' runs into one folder) waits for it a bounded time,
then exits with BUSY_EXIT (EX_TEMPFAIL) without having written anything: the queue tries such an attempt again
later, as it does a crash. Every take, drop and give-up ("busy") is appended to OUTPUT/trainers.jsonl (pid, attempt,
wall and monotonic times, how long it waited and for whom), which an observer can read without trusting the job
registry: any wait or give-up there means two trainers of one folder were alive at once (services/bench/chaos.py
counts them). A kill -9 leaves no "dropped" line: the kernel drops the lock all the same.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import stat
import sys
import time
from contextlib import contextmanager

from facenet.errors import UserError, one_line, unwritable
from facenet.runenv import ATTEMPT_ENV, TRAINER_LOCK_WAIT_ENV

JOURNAL = "trainers.jsonl"
WAIT_SECONDS = 20.0  # a fenced trainer is SIGKILLed: its lock goes within a second; this is slack for a loaded host
BUSY_EXIT = 75  # EX_TEMPFAIL
_FLAGS = os.O_CLOEXEC | os.O_NOFOLLOW
_NO_FLOCK = (errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP)


class TrainerBusy(Exception):
    """Another live process holds this folder's and rank's lock (`holder`: what it wrote of itself)."""

    def __init__(self, message: str, holder: dict):
        super().__init__(message)
        self.holder = holder


def lock_path(output: str, rank: int) -> str:
    return os.path.join(output, f"trainer.rank{rank}.lock")


@contextmanager
def sole_trainer(output: str, rank: int, wait: float | None = None):
    """Hold OUTPUT's lock for rank `rank` while the body runs (TrainerBusy after `wait` seconds of another
    holder; default FACENET_TRAINER_LOCK_WAIT, else WAIT_SECONDS), journaling the take, the drop, or the give-up.
    UserError, in one line, for a folder it cannot write or a lock path that is not a plain file of its own."""
    if wait is None:
        wait = float(os.environ.get(TRAINER_LOCK_WAIT_ENV) or WAIT_SECONDS)
    path = lock_path(output, rank)
    fd = _open_lock(output, path)
    me = {"rank": rank, "pid": os.getpid(), "attempt": os.environ.get(ATTEMPT_ENV)}
    try:
        try:
            waited, waited_for = _lock(fd, path, wait)
        except TrainerBusy as exc:
            _journal(output, {"event": "busy", **me, "waited": round(wait, 3), "waited_for": exc.holder})
            raise
        except OSError as exc:
            if exc.errno not in _NO_FLOCK:
                raise unwritable(exc, path, "--output") from None
            # A file system without flock (Lustre mounted noflock, some NFS setups): the attempt's fence still
            # keeps trainers apart; this second guard is off, and said so.
            print(f"warning: {one_line(path)}: {exc.strerror}; training without the one-trainer-per-folder lock",
                  file=sys.stderr, flush=True)
            waited, waited_for = 0.0, None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(me).encode(), 0)
        except OSError as exc:  # a full disk
            raise unwritable(exc, path, "--output") from None
        _journal(output, {"event": "got", **me, "waited": round(waited, 3), "waited_for": waited_for})
        try:
            yield
        finally:
            _journal(output, {"event": "dropped", **me})
    finally:
        os.close(fd)  # the lock goes with it (and with any forked DataLoader worker still holding the file)


def _open_lock(output: str, path: str) -> int:
    """The lock file, opened without following a link, and refused unless it is a regular file with one link (a
    hard link planted there would be truncated and written through, a FIFO would not lock)."""
    try:
        os.makedirs(output, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | _FLAGS, 0o600)
    except OSError as exc:
        raise unwritable(exc, path, "--output") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        os.close(fd)
        raise UserError(f"{one_line(path)}: not a regular file of its own ({st.st_nlink} links); remove it "
                        "(a trainer makes it)")
    return fd


def _lock(fd: int, path: str, wait: float) -> tuple[float, dict | None]:
    """Take the lock on `fd`; (seconds waited, what the holder it waited for had written) or TrainerBusy."""
    start = time.monotonic()
    holder = None
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return (0.0 if holder is None else time.monotonic() - start), holder  # 0: nobody held it
        except BlockingIOError:
            if holder is None:
                holder = _holder(fd)
            if time.monotonic() - start > wait:
                raise TrainerBusy(f"{path} is held by another trainer ({holder}) for {wait:.0f} s; not starting "
                                  "a second one in the same folder", holder) from None
            time.sleep(0.2)


def _holder(fd: int) -> dict:
    """What the lock's holder wrote of itself ({"unknown": true} when nothing readable)."""
    try:
        said = json.loads(os.pread(fd, 512, 0) or b"null")
    except ValueError:
        said = None
    return said if isinstance(said, dict) and said else {"unknown": True}


def _journal(output: str, record: dict) -> None:
    """One JSON line, appended in one write (O_APPEND: on a local file system lines of several processes never
    interleave; NFS gives no such promise across hosts)."""
    line = json.dumps({**record, "time": round(time.time(), 3), "mono": round(time.monotonic(), 3)}) + "\n"
    try:
        fd = os.open(os.path.join(output, JOURNAL), os.O_WRONLY | os.O_APPEND | os.O_CREAT | _FLAGS, 0o600)
    except OSError:
        return  # the lock is what keeps trainers apart; the journal only tells of it
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def journal(output: str) -> list[dict]:
    """The records of OUTPUT's journal, oldest first ([] when there is none)."""
    try:
        with open(os.path.join(output, JOURNAL), encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except FileNotFoundError:
        return []
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:  # a line cut short by a full disk: the others still count
            continue
    return records
