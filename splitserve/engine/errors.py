"""Errors the engine raises for bad input; the services map them to gRPC statuses."""
from __future__ import annotations


class InvalidRequestError(ValueError):
    """A request field is out of range. ``field`` names it, for clients and for tests."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class QueueFullError(RuntimeError):
    """The waiting queue is at its bound; the caller should back off and retry."""
