"""Data-root confinement, enforced where each file is opened (not only where a job is submitted).

A queued job names folders; what those folders hold (symlinks, hard links, list lines, a FIFO or a
parent folder swapped in after planning) is under the control of whoever can write them. So every
read and write of a job goes through here, and with data roots set:

- a path must lie beneath a root *as written* (no symlink is followed to get there: a link inside
  the roots, even one that points elsewhere inside them, is refused), and
- it is opened from the root's own descriptor, one resolution by the kernel with
  `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)` where the kernel has it
  (Linux 5.6+; include/uapi/linux/openat2.h), else a walk of `O_NOFOLLOW | O_DIRECTORY` opens, one
  component at a time. Either way a parent folder swapped for a symlink between a check and the
  open is refused: nothing is resolved twice.
- Files must be regular (never a FIFO or device, which could block forever or never end); the
  metadata a job uploads or echoes (manifest, lists, pairs) must also have exactly one link, since a
  hard link to a file outside the roots cannot be told from the file itself. Images may have more
  (hard-linked data sets are common); they are counted in the manifest.

The roots come from FACENET_DATA_ROOTS; the service always sets it, and a standalone `facenet-cli
train` run by a user on their own files is unconfined when it is unset (then only a final symlink
is refused where a regular file is wanted).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import stat

from facenet.errors import InputError

ROOTS_ENV = "FACENET_DATA_ROOTS"
# Set to 1 to use the component walk even where openat2 exists (tests run both).
WALK_ENV = "FACENET_CONFINE_WALK"
HASH_CHUNK = 1 << 20
LINKS_NOTE = "links are not followed inside the data roots"

# openat2(2): include/uapi/linux/openat2.h and the syscall table (437 on every architecture, 5.6+).
_SYS_OPENAT2 = 437
_RESOLVE_NO_MAGICLINKS, _RESOLVE_NO_SYMLINKS, _RESOLVE_BENEATH = 0x02, 0x04, 0x08
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class Refused(InputError):
    """A path outside the data roots, through a link, or not a regular file where one is needed."""


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_openat2_state: list = []  # [callable or None], probed once per process


def _openat2():
    """libc's syscall() bound for openat2, or None where the kernel (or a seccomp filter) lacks it."""
    if not _openat2_state:
        fn = None
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fn = libc.syscall
            fn.restype = ctypes.c_long
            how = _OpenHow(os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, 0, _RESOLVE_BENEATH)
            fd = fn(ctypes.c_long(_SYS_OPENAT2), ctypes.c_int(-100), ctypes.c_char_p(b"."), ctypes.byref(how),
                    ctypes.c_size_t(ctypes.sizeof(how)))
            if fd < 0:
                fn = None  # ENOSYS on old kernels, EPERM under an old container seccomp profile
            else:
                os.close(fd)
        except (OSError, AttributeError):
            fn = None
        _openat2_state.append(fn)
    return None if os.environ.get(WALK_ENV) == "1" else _openat2_state[0]


def _open_beneath(dirfd: int, rel: str, flags: int, mode: int = 0) -> int:
    """Open `rel` (no `..`, no leading /) beneath the folder `dirfd`, following no symlink at any component."""
    fn = _openat2()
    if fn is not None:
        how = _OpenHow(flags | os.O_CLOEXEC, mode, _RESOLVE_BENEATH | _RESOLVE_NO_SYMLINKS | _RESOLVE_NO_MAGICLINKS)
        fd = fn(ctypes.c_long(_SYS_OPENAT2), ctypes.c_int(dirfd), ctypes.c_char_p(os.fsencode(rel)),
                ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)))
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), rel)
        return fd
    parts = rel.split(os.sep)
    fd, opened = dirfd, []
    try:
        for part in parts[:-1]:
            fd = os.open(part, _DIR_FLAGS, dir_fd=fd)
            opened.append(fd)
        return os.open(parts[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=fd)
    finally:
        for f in opened:
            os.close(f)


class Roots:
    def __init__(self, roots: list[str]):
        given = [os.path.abspath(os.path.expanduser(r)) for r in roots]
        # The folders themselves are the operator's: a root that is a symlink is followed, once, here.
        self.roots = [os.path.realpath(r) for r in given]
        self._forms = sorted({(g, r) for g, r in zip(given, self.roots)} | {(r, r) for r in self.roots},
                             key=lambda f: -len(f[0]))

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

    def locate(self, path: str, what: str = "path") -> tuple[str, str]:
        """(the root's real folder, `path` relative to it, "." for the root itself) by the path as written;
        Refused when it is not beneath a root."""
        if not self.roots:
            raise Refused(f"{what} {shown(path)}: no data roots are configured, so jobs may read nothing; "
                          f"set {ROOTS_ENV} to the folders jobs may use")
        absolute = os.path.abspath(os.path.expanduser(path))
        for form, real in self._forms:
            if absolute == form or absolute.startswith(form.rstrip(os.sep) + os.sep):
                return real, os.path.relpath(absolute, form)
        real = os.path.realpath(absolute)
        where = shown(path) if real == absolute else f"{shown(path)} (resolves to {shown(real)})"
        raise Refused(f"{what} {where}: outside the data roots ({', '.join(self.roots)}); set {ROOTS_ENV} to allow it")

    def check(self, path: str, what: str = "path") -> str:
        """`path` made absolute beneath its root, or Refused naming it (before saying anything about whether
        it exists) when it is outside the roots or a component of it that exists is a symbolic link."""
        root, rel = self.locate(path, what)
        if rel == ".":
            return root
        link = self._first_link(root, rel)
        if link is not None:
            raise Refused(f"{what} {shown(path)}: {self._link_note(link)}")
        return os.path.join(root, rel)

    def _link_note(self, link: str) -> str:
        try:
            target = os.path.realpath(link)
        except OSError:  # changing under us (the link is being swapped): say only what it is
            return f"{shown(link)} is a symbolic link ({LINKS_NOTE})"
        where = "outside the data roots" if not self.contains(target) else LINKS_NOTE
        return f"{shown(link)} is a symbolic link (to {shown(target)}, {where})"

    def open(self, path: str, flags: int, what: str = "file", mode: int = 0) -> int:
        """An fd of `path` opened beneath its root (see the module docstring), or Refused."""
        root, rel = self.locate(path, what)
        if rel == ".":
            return os.open(root, flags | os.O_CLOEXEC, mode)
        rootfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            return _open_beneath(rootfd, rel, flags, mode)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.EXDEV, errno.ENOTDIR):
                link = self._first_link(root, rel)
                if link is not None:
                    raise Refused(f"{what} {shown(path)}: {self._link_note(link)}") from None
                if exc.errno == errno.ELOOP:
                    raise Refused(f"{what} {shown(path)}: a symbolic link (swapped in while it was opened)") from None
            raise OSError(exc.errno, exc.strerror, path) from None
        finally:
            os.close(rootfd)

    @staticmethod
    def _first_link(root: str, rel: str) -> str | None:
        """The first component of `rel` beneath `root` that is a symbolic link, None when none is (or the
        rest does not exist)."""
        here = root
        for part in rel.split(os.sep):
            here = os.path.join(here, part)
            try:
                if stat.S_ISLNK(os.lstat(here).st_mode):
                    return here
            except (FileNotFoundError, NotADirectoryError):
                return None
        return None


def shown(path: str) -> str:
    """`path` for a one-line message: quoted with escapes when it holds line breaks or control characters."""
    return path if path.isprintable() else repr(path)


def parse_roots(raw: str) -> list[str]:
    """FACENET_DATA_ROOTS ('a:b') -> absolute folders; an empty value gives [] (every path refused)."""
    return [os.path.abspath(os.path.expanduser(r)) for r in raw.split(os.pathsep) if r.strip()]


def check(path: str, roots: Roots | None, what: str = "path") -> str:
    return roots.check(path, what) if roots is not None else os.path.abspath(os.path.expanduser(path))


def open_regular(path: str, roots: Roots | None, what: str = "file", single_link: bool = False) -> int:
    """A read-only fd of `path`: beneath the roots through no symlink, a regular file (never a FIFO or device,
    which could block forever or never end), and with `single_link` a file with exactly one name."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    if roots is None:
        try:
            fd = os.open(os.path.abspath(os.path.expanduser(path)), flags)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise Refused(f"{what} {shown(path)}: a symbolic link") from None
            raise
    else:
        fd = roots.open(path, flags, what)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise Refused(f"{what} {shown(path)}: not a regular file")
    if single_link and st.st_nlink != 1:
        os.close(fd)
        raise Refused(f"{what} {shown(path)}: has {st.st_nlink} hard links; a file a job uploads or quotes must "
                      "have exactly one (a hard link to a file elsewhere cannot be told from it)")
    os.set_blocking(fd, True)
    return fd


def read_bytes(path: str, roots: Roots | None, what: str = "file", max_bytes: int | None = None,
               single_link: bool = False) -> bytes:
    fd = open_regular(path, roots, what, single_link)
    with os.fdopen(fd, "rb") as fh:
        if max_bytes is not None:
            size = os.fstat(fh.fileno()).st_size
            if size > max_bytes:
                raise Refused(f"{what} {shown(path)}: {size} bytes, more than the {max_bytes} allowed")
            # One byte past what fstat said tells a file that grew while read; reading max_bytes + 1 would
            # reserve the whole bound (4 GiB for a .bin) whatever the file's size.
            data = fh.read(size + 1)
            if len(data) > size:
                data += fh.read(max_bytes + 1 - len(data))
            if len(data) > max_bytes:  # grew while read
                raise Refused(f"{what} {shown(path)}: more than the {max_bytes} bytes allowed")
            return data
        return fh.read()


def read_range(path: str, roots: Roots | None, what: str, offset: int, length: int) -> bytes:
    """`length` bytes of `path` from `offset` (fewer where the file ends): one part of a big file (a plan's
    items, a packed shard) read without reading the rest."""
    fd = open_regular(path, roots, what)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


def read_text(path: str, roots: Roots | None, what: str = "file", max_bytes: int = 1 << 30,
              single_link: bool = False) -> str:
    return read_bytes(path, roots, what, max_bytes, single_link).decode("utf-8")


def read_metadata(path: str, roots: Roots | None, what: str, max_bytes: int = 256 << 20) -> bytes:
    """A file a job uploads (manifest) or quotes in messages (lists, pairs): confined, regular, one link."""
    return read_bytes(path, roots, what, max_bytes, single_link=roots is not None)


def sha256_file(path: str, roots: Roots | None = None, what: str = "file") -> str:
    """Streamed: memory stays at one chunk whatever the file (a crop symlinked to /dev/zero is refused)."""
    h = hashlib.sha256()
    with os.fdopen(open_regular(path, roots, what), "rb") as fh:
        for chunk in iter(lambda: fh.read(HASH_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def open_dir(folder: str, roots: Roots | None, what: str = "folder", create: bool = False) -> int:
    """An fd of `folder` reached beneath its root through no symlink; with `create`, missing folders on the
    way are made (each one by its parent's fd, so a folder swapped for a link is never written through)."""
    if roots is None:
        if create:
            os.makedirs(folder, exist_ok=True)
        return os.open(os.path.abspath(os.path.expanduser(folder)), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    if not create:
        return roots.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, what)
    root, rel = roots.locate(folder, what)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    here = root
    try:
        for part in ([] if rel == "." else rel.split(os.sep)):
            here = os.path.join(here, part)
            with contextlib.suppress(FileExistsError):
                os.mkdir(part, 0o777, dir_fd=fd)
            try:
                nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR) and os.path.islink(here):
                    raise Refused(f"{what} {shown(folder)}: {roots._link_note(here)}") from None
                raise
            os.close(fd)
            fd = nfd
        return fd
    except BaseException:
        os.close(fd)
        raise


def scandir(folder: str, roots: Roots | None, what: str = "folder") -> list[tuple[str, str]]:
    """(name, kind) of each entry of `folder`, kind one of "dir", "file", "link", "other", read through the
    folder's own fd (so a folder swapped for a link between listing and opening lists nothing outside)."""
    fd = open_dir(folder, roots, what)
    try:
        with os.scandir(fd) as it:
            return [(e.name, "link" if e.is_symlink() else "dir" if e.is_dir(follow_symlinks=False)
                     else "file" if e.is_file(follow_symlinks=False) else "other") for e in it]
    finally:
        os.close(fd)


def ensure_dir(folder: str, roots: Roots | None, what: str = "folder") -> str:
    """makedirs beneath the roots through no symlink (a symlinked OUT/.preprocess is refused before anything
    is written through it); the folder's path."""
    os.close(open_dir(folder, roots, what, create=True))
    return check(folder, roots, what)


def remove(folder: str, name: str, roots: Roots | None, what: str = "folder") -> None:
    """Unlink `name` in `folder`, reached beneath the roots through no symlink (by the folder's fd, so a link
    swapped in for the folder is never followed); nothing when either is not there."""
    if not os.path.isdir(folder):
        return
    dir_fd = open_dir(folder, roots, what)
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    finally:
        os.close(dir_fd)


@contextlib.contextmanager
def confined_write(path: str, roots: Roots | None, what: str = "output", fsync: bool = False):
    """atomic_write into a folder reached beneath the roots through no symlink; the temp file is created
    exclusively and renamed by the folder's fd, so nothing is written through a link swapped in meanwhile."""
    from facenet.fsutil import atomic_write

    folder = os.path.dirname(os.path.abspath(os.path.expanduser(path)))
    dir_fd = open_dir(folder, roots, what, create=True)
    try:
        with atomic_write(os.path.join(folder, os.path.basename(path)), fsync=fsync, dir_fd=dir_fd) as fh:
            yield fh
    finally:
        os.close(dir_fd)


def write_bytes(path: str, data: bytes, roots: Roots | None, what: str = "output", fsync: bool = False) -> None:
    with confined_write(path, roots, what, fsync) as fh:
        fh.write(data)
