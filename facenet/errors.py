"""Errors the user caused and can fix: shown as one line, never as a traceback."""


class UserError(Exception):
    """Bad input (a value, a path, a device request) described in one line."""


class InputError(UserError):
    """A value or path given to a command that it refuses before doing anything (exit status 2)."""
