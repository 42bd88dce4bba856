"""The client's retry policy: which failures are sent again, and how long to wait.

Predictions are idempotent, so a request that may not have been answered is
sent again (:func:`retryable`); the wait doubles per attempt, with jitter, up
to a cap (:func:`backoff_s`).
"""

from __future__ import annotations

import random

from dlrm_serve.client.transports import WORKER_DIED
from dlrm_serve.errors import AuthError, ServerError

__all__ = ["DEFAULT_RETRIES", "WORKER_DIED_RETRIES", "retryable", "retry_reason", "backoff_s"]

DEFAULT_RETRIES = 8
# A request whose worker died this many times is likely what kills it (a
# poison request): stop sending it, instead of taking down a worker per try.
WORKER_DIED_RETRIES = 2


def retryable(err: BaseException) -> bool:
    """Whether a failed prediction may have gone unanswered, so sending it again is right.

    Yes for a full queue or unreachable server (503), a timeout (504) and a
    worker that died with the request (TorchServe's "Worker died.", REST 507,
    gRPC ``RESOURCE_EXHAUSTED``).  No for anything the request itself caused
    (4xx), token refusals (handled apart) and other server errors, which
    would fail again.
    """
    if not isinstance(err, ServerError) or isinstance(err, AuthError):
        return False
    return err.status in (503, 504) or WORKER_DIED in err.message.lower()


def retry_reason(err: ServerError) -> str:
    """A short name for why a request was sent again (``stats["retry_reasons"]``)."""
    if err.status == 504:
        return "timeout"
    if WORKER_DIED in err.message.lower():
        return "worker died"
    return "connection" if "cannot reach" in err.message or "connection" in err.message.lower() else "unavailable"


def backoff_s(attempt: int, base_s: float, cap_s: float) -> float:
    """The wait before try ``attempt + 1``: ``base_s * 2**attempt`` capped at ``cap_s``, times a jitter in [0.5, 1)."""
    return min(cap_s, base_s * (2**attempt)) * random.uniform(0.5, 1.0)
