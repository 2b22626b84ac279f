"""Errors that reach the user as one line: what went wrong, where, and how to fix it.

Library code raises these; the CLI prints ``str(error)`` on stderr and exits non-zero,
without a traceback. Anything else that escapes is a bug in segrec.
"""

from __future__ import annotations


class SegrecError(Exception):
    """A user-facing error. The message is one line naming what, where and the fix."""

    exit_code = 2


class InputError(SegrecError):
    """An input file or flag is unusable (missing, malformed, inconsistent)."""


class WorkspaceError(SegrecError):
    """The workspace is missing something a command needs, or is unreadable."""


class ConfigError(SegrecError):
    """A configuration value (flag, environment, segrec.toml) is invalid."""


class LLMError(SegrecError):
    """An LLM backend failed in a way that retrying will not fix."""


class TransientLLMError(LLMError):
    """An LLM call that may succeed if retried (timeout, HTTP 429/5xx, dropped connection).

    ``retry_after`` is how long the server asked us to wait (its Retry-After), if it said.
    """

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after
