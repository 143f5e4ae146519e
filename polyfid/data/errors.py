"""Errors raised by the data layer."""


class DataError(ValueError):
    """Malformed or inconsistent input. The message names the file, frame or key, and
    what was expected."""
