"""Data-root confinement, checked where each file is opened (not only where a job is submitted).

A queued job names folders; what those folders hold (symlinks, list lines,
a FIFO swapped in after planning) is under the control of whoever can write
them. So every read and write of a job goes through here: the path is
resolved (symlinks and `..` included) and must lie inside a data root, and
files are opened without following a final symlink and must be regular
files. The roots come from FACENET_DATA_ROOTS; the service always sets it,
and a standalone `facenet-cli train` run by a user on their own files is
unconfined when it is unset.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat

from facenet.errors import InputError

ROOTS_ENV = "FACENET_DATA_ROOTS"
HASH_CHUNK = 1 << 20


class Refused(InputError):
    """A path outside the data roots, or not a regular file where one is needed."""


class Roots:
    def __init__(self, roots: list[str]):
        self.roots = [os.path.realpath(os.path.expanduser(r)) for r in roots]

    @classmethod
    def from_env(cls, environ=None) -> "Roots | None":
        """The roots FACENET_DATA_ROOTS names; None when it is unset (unconfined). Set but empty fails closed."""
        raw = (os.environ if environ is None else environ).get(ROOTS_ENV)
        if raw is None:
            return None
        return cls(parse_roots(raw))

    def __repr__(self) -> str:
        return os.pathsep.join(self.roots)

    def contains(self, real: str) -> bool:
        return any(real == r or real.startswith(r.rstrip(os.sep) + os.sep) for r in self.roots)

    def check(self, path: str, what: str = "path") -> str:
        """The resolved `path`, or Refused naming it (before saying anything about whether it exists)."""
        real = os.path.realpath(os.path.expanduser(path))
        if not self.roots:
            raise Refused(f"{what} {shown(path)}: no data roots are configured, so jobs may read nothing; "
                          f"set {ROOTS_ENV} to the folders jobs may use")
        if not self.contains(real):
            where = shown(path) if real == os.path.abspath(path) else f"{shown(path)} (resolves to {shown(real)})"
            raise Refused(f"{what} {where}: outside the data roots ({', '.join(self.roots)}); "
                          f"set {ROOTS_ENV} to allow it")
        return real


def shown(path: str) -> str:
    """`path` for a one-line message: quoted with escapes when it holds line breaks or control characters."""
    return path if path.isprintable() else repr(path)


def parse_roots(raw: str) -> list[str]:
    """FACENET_DATA_ROOTS ('a:b') -> absolute folders; an empty value gives [] (every path refused)."""
    return [os.path.abspath(os.path.expanduser(r)) for r in raw.split(os.pathsep) if r.strip()]


def check(path: str, roots: Roots | None, what: str = "path") -> str:
    return roots.check(path, what) if roots is not None else os.path.abspath(os.path.expanduser(path))


def open_regular(path: str, roots: Roots | None, what: str = "file") -> int:
    """A read-only fd of `path`: inside the roots, no final symlink, a regular file (never a FIFO or device,
    which could block forever or never end)."""
    real = check(path, roots, what)
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == 40:  # ELOOP: the last component turned into a symlink after the check
            raise Refused(f"{what} {shown(path)}: a symbolic link (swapped in while it was opened)") from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise Refused(f"{what} {shown(path)}: not a regular file")
    os.set_blocking(fd, True)
    return fd


def read_bytes(path: str, roots: Roots | None, what: str = "file", max_bytes: int | None = None) -> bytes:
    fd = open_regular(path, roots, what)
    with os.fdopen(fd, "rb") as fh:
        if max_bytes is not None:
            size = os.fstat(fh.fileno()).st_size
            if size > max_bytes:
                raise Refused(f"{what} {path}: {size} bytes, more than the {max_bytes} allowed")
            data = fh.read(max_bytes + 1)
            if len(data) > max_bytes:  # grew while read
                raise Refused(f"{what} {path}: more than the {max_bytes} bytes allowed")
            return data
        return fh.read()


def read_text(path: str, roots: Roots | None, what: str = "file", max_bytes: int = 1 << 30) -> str:
    return read_bytes(path, roots, what, max_bytes).decode("utf-8")


def sha256_file(path: str, roots: Roots | None = None, what: str = "file") -> str:
    """Streamed: memory stays at one chunk whatever the file (a crop symlinked to /dev/zero is refused)."""
    h = hashlib.sha256()
    with os.fdopen(open_regular(path, roots, what), "rb") as fh:
        for chunk in iter(lambda: fh.read(HASH_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def ensure_dir(folder: str, roots: Roots | None, what: str = "folder") -> str:
    """makedirs, checking first that the deepest folder that exists resolves inside the roots and then
    that the result does: a symlinked OUT/.preprocess pointing elsewhere is refused before anything is
    written through it."""
    if roots is not None:
        existing = os.path.abspath(folder)
        while not os.path.exists(existing) and os.path.dirname(existing) != existing:
            existing = os.path.dirname(existing)
        roots.check(existing, what)
    os.makedirs(folder, exist_ok=True)
    return check(folder, roots, what)


@contextlib.contextmanager
def confined_write(path: str, roots: Roots | None, what: str = "output", fsync: bool = False):
    """atomic_write into a folder that resolves inside the roots; the temp file is created exclusively
    and never through a symlink."""
    from facenet.fsutil import atomic_write

    folder = ensure_dir(os.path.dirname(os.path.abspath(path)), roots, what)
    with atomic_write(os.path.join(folder, os.path.basename(path)), fsync=fsync) as fh:
        yield fh


def write_bytes(path: str, data: bytes, roots: Roots | None, what: str = "output", fsync: bool = False) -> None:
    with confined_write(path, roots, what, fsync) as fh:
        fh.write(data)
