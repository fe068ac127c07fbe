"""What can go wrong in ``dhow rollout``, each with its exit status."""

from __future__ import annotations

__all__ = ["ServerRefused", "Unreachable", "UsageError"]


class UsageError(Exception):
    """A wrong value on the command line (exit 2)."""


class ServerRefused(Exception):
    """The server answered with an error status (exit 1)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Unreachable(Exception):
    """No HTTP answer came back (exit 2)."""
