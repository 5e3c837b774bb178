"""Errors the user caused and can fix: shown as one line, never as a traceback."""


class UserError(Exception):
    """Bad input (a value, a path, a device request) described in one line."""


class InputError(UserError):
    """A value or path given to a command that it refuses before doing anything (exit status 2)."""


def one_line(text: object) -> str:
    """`text` safe to print as one line of a log or a job's error: line breaks and other control
    characters (which a file name or a list line may hold) shown as escapes, never acted on."""
    s = str(text)
    if s.isprintable():
        return s
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in s)


def clipped(text: object, limit: int = 80) -> str:
    """`text` on one line (one_line) and at most `limit` characters, "..." marking a cut: how a value or a
    name from outside is quoted in a message."""
    s = one_line(text)
    return s if len(s) <= limit else s[:limit - 3] + "..."


def first_line(exc: BaseException, limit: int = 160) -> str:
    """The first line of an exception's text (its type's name when it has none), clipped: what a one-line
    error quotes of a library's exception."""
    return clipped((str(exc).strip().splitlines() or [type(exc).__name__])[0], limit)


def unwritable(exc: OSError, path: str | None = None, flags: str = "--output, --events or --json-out") -> UserError:
    """`exc` from writing `path` as one line: the file named is `path` when given (an atomic write's error names
    its hidden temp file, a full disk none), else the OSError's own; `flags`: where the user chose that path."""
    return UserError(f"cannot write {one_line(path or exc.filename or 'an output file')}: {exc.strerror or exc} "
                     f"(a path from {flags})")
