"""The exception family. Every expected failure is a DispatchError; the CLI prints one line.

    DispatchError
    ├── ConfigError       config file or argument is wrong (exit 2)
    ├── ForgeError        the Gitea API answered with an error or could not be reached
    ├── ModelError        the model endpoint failed in a way retries did not fix
    ├── BudgetExceeded    a step, time, token or cost budget ran out
    └── LockHeld          another process holds the lock for this work
"""

from __future__ import annotations


class DispatchError(Exception):
    """Base of every error dispatch expects and reports without a traceback."""

    exit_code = 1


class ConfigError(DispatchError):
    """Raised when the config file, an environment override or an argument is invalid."""

    exit_code = 2


class ForgeError(DispatchError):
    """Raised when a forge call fails: carries method, URL (never credentials), status and message."""

    def __init__(self, method: str, url: str, status: int | None, message: str) -> None:
        self.method = method
        self.url = url
        self.status = status
        self.message = message
        where = f"{method} {url}"
        head = f"{status} for {where}" if status else f"cannot reach {where}"
        super().__init__(f"{head}: {message}" if message else head)


class ModelError(DispatchError):
    """Raised when the model endpoint keeps failing after retries."""


class BudgetExceeded(DispatchError):
    """Raised when a run hits its step, wall-clock, token or cost budget."""


class LockHeld(DispatchError):
    """Raised when another live process holds the lock for the requested work."""
