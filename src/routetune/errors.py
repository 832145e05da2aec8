"""routetune's error types. All are ValueError subclasses so callers can catch bad input uniformly."""

from __future__ import annotations

from pathlib import Path


class RoutetuneError(ValueError):
    """Base class: bad input or a state routetune refuses to work from."""


class ConfigError(RoutetuneError):
    """A config key is unknown, missing or has a wrong value. The message names the dotted key."""


class DataError(RoutetuneError):
    """A data file is missing or malformed. The message names file:line when a line is at fault."""

    def __init__(self, message: str, path: str | Path | None = None, line: int | None = None):
        self.path = str(path) if path is not None else None
        self.line = line
        where = ""
        if self.path is not None:
            where = f"{self.path}:{line}: " if line is not None else f"{self.path}: "
        super().__init__(where + message)


class ModelError(RoutetuneError):
    """A model name, alias or folder cannot be resolved or loaded."""


class RunError(RoutetuneError):
    """A run folder is missing, incomplete, or would be overwritten."""
