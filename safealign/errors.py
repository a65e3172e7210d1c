"""User-facing errors: each names the file/line or config key and what was expected."""

from __future__ import annotations


class SafealignError(Exception):
    """Base class for errors that should be shown to the user without a traceback."""


class DataError(SafealignError, ValueError):
    """Malformed input data. Always names the file and, where there is one, the line or row."""

    def __init__(self, path: object, message: str, line: int | None = None) -> None:
        where = f"{path}:{line}" if line is not None else f"{path}"
        super().__init__(f"{where}: {message}")
        self.path, self.line = path, line


class ConfigError(SafealignError, ValueError):
    """Invalid configuration. Names the key and what was expected."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"config key '{key}': {message}")
        self.key = key


class NonFiniteLossError(SafealignError, RuntimeError):
    """A NaN/inf loss: names the step and batch so the run can be diagnosed."""
