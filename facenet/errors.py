"""Errors the user caused and can fix: shown as one line, never as a traceback."""


class UserError(Exception):
    """Bad input (a value, a path, a device request) described in one line."""
