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
