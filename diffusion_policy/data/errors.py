"""Errors raised by the data layer; each message names the offending path, key or value."""


class DatasetError(ValueError):
    """A dataset store is malformed or a request does not match its contents."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """A dataset store is absent from the path it was looked for at."""
