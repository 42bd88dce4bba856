"""One small exception family for everything dlrm-serve reports to a user.

Each error carries a user-facing ``message`` and the HTTP ``status`` it maps
to.  The mapping to a wire answer happens once, at each boundary (the
TorchServe handler, the KServe predictor, the client, the command line: the
CLI prints ``message`` and exits 2 for any error of the family, and lets
anything else show as the internal error it is).

The base class is never raised itself; every raise names what went wrong::

    DLRMServeError                 500  base: message + status, never raised bare
    ├── InvalidInput               400  a request or data row that cannot be decoded (names row and field)
    ├── UsageError                 400  an argument or option value that is not valid (a call, a flag)
    ├── Unsupported                400  a valid request this model or backend cannot answer
    ├── NotReady                   503  the model is not (yet) loaded; retry later
    ├── ArtifactError              500  weights, config or checkpoints missing or inconsistent
    │   └── ConfigError            500  a config file (dlrm.json, model-config.yaml, config.properties)
    │                                   that is missing or not valid
    ├── DeviceError                500  a device (CUDA) asked for but not usable here
    ├── ToolchainError             500  a tool or optional package dlrm-serve needs is missing or broken
    │                                   (torchserve's jar, grpcio-tools, protoc, kserve)
    ├── LaunchError                500  a test TorchServe (or one of its processes) did not start or answer
    ├── ServerError                500  client side: a server answer that is not a prediction
    │   └── AuthError              401  client side: a missing, wrong or expired token
    └── InternalError              500  an unexpected failure while serving one request

``InvalidInput``, ``UsageError``, ``Unsupported``, ``ArtifactError`` (and so
``ConfigError``) and ``DeviceError`` also subclass ``ValueError``, so callers
that caught ``ValueError`` before the family existed still catch them.
"""

from __future__ import annotations

__all__ = [
    "DLRMServeError",
    "InvalidInput",
    "UsageError",
    "Unsupported",
    "NotReady",
    "ArtifactError",
    "ConfigError",
    "DeviceError",
    "ToolchainError",
    "LaunchError",
    "ServerError",
    "AuthError",
    "InternalError",
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


class UsageError(DLRMServeError, ValueError):
    """An argument or option value that is not valid (HTTP 400); the message names it."""

    status = 400


class Unsupported(DLRMServeError, ValueError):
    """A well-formed request that this model or backend cannot answer (HTTP 400),
    for example explanations from an ONNX archive; the message says what can."""

    status = 400


class NotReady(DLRMServeError):
    """The model is not loaded (yet, or its load failed): HTTP 503, retry later."""

    status = 503


class ArtifactError(DLRMServeError, ValueError):
    """Artifacts (weights, config, checkpoints) that are missing or inconsistent."""

    status = 500


class ConfigError(ArtifactError):
    """A config that is missing or not valid: ``dlrm.json`` (the one error of
    :func:`dlrm_serve.artifacts.load_config`), a model-config.yaml, a
    config.properties, or a :class:`~dlrm_serve.config.DLRMConfig` built with bad fields."""


class ToolchainError(DLRMServeError):
    """A tool or optional package that dlrm-serve needs is missing or broken:
    torchserve's jar (the gRPC protocol files), grpcio-tools, protoc, kserve.
    The message says what to install."""

    status = 500


class LaunchError(DLRMServeError):
    """A test TorchServe (``dlrm_serve.testing``) did not start, or one of its
    processes or management calls failed."""

    status = 500


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
