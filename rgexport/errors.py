"""Errors that reach users: each says what was wrong and what to do about it."""

from __future__ import annotations


class RgexportError(Exception):
    """A user-facing error. The CLI prints its message on one line and exits non-zero."""


class ConfigError(RgexportError, ValueError):
    """An impossible or unknown model configuration."""


class CheckpointError(RgexportError):
    """A checkpoint that cannot be read or does not fit its configuration."""


class MissingDependencyError(RgexportError, ImportError):
    """A backend library is not installed; the message names the extra that brings it."""

    def __init__(self, package: str, extra: str, cause: BaseException | None = None):
        detail = f" ({cause})" if cause else ""
        super().__init__(
            f"{package} is not installed{detail}. Install it with: pip install \"rgexport[{extra}]\""
        )
        self.package = package
        self.extra = extra
