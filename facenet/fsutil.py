"""Files that appear whole or not at all, the host's usable cores, and a free local port."""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil

from facenet.errors import UserError


@contextlib.contextmanager
def atomic_write(path: str, fsync: bool = False, dir_fd: int | None = None):
    """Yield a binary file handle; on success it replaces PATH in one rename.

    The data goes to a hidden `.NAME.tmp-<pid>.<random>` beside PATH first, so
    readers (and a process killed midway) never see a partial file; leftovers of
    dead writers are recognisable by that name and pid. The random part makes the
    name unguessable: a link planted for a known pid in a shared folder is never
    in the way (O_EXCL|O_NOFOLLOW already refuses to follow one). With `dir_fd` (PATH's folder,
    already open) every step goes through that descriptor, not the folder's path.
    """
    folder, name = os.path.split(os.path.abspath(path))
    if dir_fd is None:
        os.makedirs(folder, exist_ok=True)
        tmp, final = os.path.join(folder, _temp_name(name)), path
    else:
        tmp, final = _temp_name(name), name
    made = False  # a file of this name that we did not create is never removed
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666, dir_fd=dir_fd)
        made = True
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
        os.replace(tmp, final, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException as exc:
        if made:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp, dir_fd=dir_fd)
        if _disk_full(exc):
            raise UserError(f"cannot write {path}: no space left on its disk ({_free_mib(folder)} MiB free); "
                            "free some space and run again (what was written before is intact)") from None
        raise


def _temp_name(name: str) -> str:
    return f".{name}.tmp-{os.getpid()}.{secrets.token_hex(6)}"


def _disk_full(exc: BaseException | None) -> bool:
    """ENOSPC or EDQUOT anywhere in the chain (torch's zip writer reports it as a RuntimeError whose
    context is the OSError)."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def _free_mib(folder: str) -> int:
    try:
        return shutil.disk_usage(folder).free // 2**20
    except OSError:
        return 0


def write_atomic(path: str, data: bytes, fsync: bool = False) -> None:
    with atomic_write(path, fsync) as fh:
        fh.write(data)


def cpu_cores() -> int:
    """Cores this process may run on (the affinity mask, not the machine's total)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def remove_stale_temp_files(out: str) -> int:
    """Delete temp files left by killed writers (their pid is gone). Returns how many."""
    removed = 0
    for folder, _, files in os.walk(out):
        for name in files:
            if ".tmp-" not in name:
                continue
            try:
                pid = int(name.rsplit(".tmp-", 1)[1].split(".")[0])
            except ValueError:
                continue
            if not _alive(pid):
                try:
                    os.remove(os.path.join(folder, name))
                    removed += 1
                except FileNotFoundError:
                    pass
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
