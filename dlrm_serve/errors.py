"""One small exception family for everything dlrm-serve reports to a user.

Each error carries a user-facing ``message`` and the HTTP ``status`` it maps
to.  The mapping to a wire answer happens once, at the boundary (the
TorchServe handler, the client, the command line).
"""

from __future__ import annotations

__all__ = [
    "DLRMServeError",
    "InvalidInput",
    "ArtifactError",
    "ConfigError",
    "ServerError",
    "AuthError",
    "InternalError",
    "DeviceError",
]


class DLRMServeError(Exception):
    """Base of the family: a message for the user and an HTTP status."""

    status: int = 500

    def __init__(self, message: str, *, status: int | None = None):
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status

    @property
    def type(self) -> str:
        return type(self).__name__

    def to_dict(self) -> dict:
        """The JSON error body: ``{"code", "type", "message"}``."""
        return {"code": self.status, "type": self.type, "message": self.message}


class InvalidInput(DLRMServeError, ValueError):
    """A request or data row that cannot be decoded (HTTP 400).

    ``row`` and ``field`` locate the problem when it is known; the message
    already names them, they are kept for programs that want them.
    """

    status = 400

    def __init__(self, message: str, *, row: int | None = None, field: str | None = None):
        where = []
        if row is not None:
            where.append(f"instance {row}")
        if field is not None:
            where.append(f"field {field}")
        full = f"{', '.join(where)}: {message}" if where else message
        super().__init__(full)
        self.row = row
        self.field = field
        self.reason = message

    def shifted(self, rows: int) -> "InvalidInput":
        """The same error with its row index moved by ``rows`` (for chunked input)."""
        row = None if self.row is None else self.row + rows
        return InvalidInput(self.reason, row=row, field=self.field)


class ArtifactError(DLRMServeError, ValueError):
    """Artifacts (weights, config, checkpoints) that are missing or inconsistent."""

    status = 500


class ConfigError(ArtifactError):
    """A ``dlrm.json`` that is missing or is not a valid config (the one error of
    :func:`dlrm_serve.artifacts.load_config`)."""


class ServerError(DLRMServeError):
    """An answer from a server that is not a prediction (client side)."""


class AuthError(ServerError):
    """A missing, wrong or expired token (client side)."""

    status = 401


class InternalError(DLRMServeError):
    """An unexpected failure while serving one request (HTTP 500).

    Its message names what failed without the internal exception text;
    the traceback goes to the worker's log.
    """

    status = 500


class DeviceError(DLRMServeError, ValueError):
    """A device (CUDA) that was asked for but is not usable here; the message says what was found."""

    status = 500
