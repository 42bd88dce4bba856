"""Serving logic without a server: settings, requests, one forward pass, replies, metrics.

The TorchServe handler (``handler/dlrm_handler.py``) is a thin adapter over
this module: it turns TorchServe's request items into :class:`Request`
objects (:func:`request_of`), lets :class:`Predictor` answer them, and maps
each :class:`Reply` back.  Everything here is testable in process and imports
neither torch nor TorchServe.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from .backends import Backend, check_precision
from .codecs import MAX_ROWS, decode_request, predictions_body
from .errors import DLRMServeError, InvalidInput
from .features import FeatureBatch, FeatureEncoder

__all__ = [
    "Request",
    "Reply",
    "BatchStats",
    "Predictor",
    "MetricsWindow",
    "read_settings",
    "request_of",
    "content_type_of",
    "SETTINGS",
]

JSON_TYPE = "application/json"
# Where TorchServe puts a request's payload: the raw REST body, a form field
# or TorchServe's own gRPC client input.
BODY_KEYS = ("body", "data")


# ----- settings: the ``dlrm:`` section of model-config.yaml ------------------------
def _string(name: str, v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError(f"model-config.yaml: dlrm.{name} must be a string, got {v!r}")
    return v


def _positive_int(name: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"model-config.yaml: dlrm.{name} must be a positive integer, got {v!r}")
    return v


def _count(name: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"model-config.yaml: dlrm.{name} must be an integer >= 0, got {v!r}")
    return v


def _flag(name: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"model-config.yaml: dlrm.{name} must be true or false, got {v!r}")
    return v


def _seconds(name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 3600:
        raise ValueError(f"model-config.yaml: dlrm.{name} must be seconds in [0, 3600], got {v!r}")
    return float(v)


def _precision(name: str, v: Any) -> str:
    try:
        return check_precision(v)
    except ValueError as e:
        raise ValueError(f"model-config.yaml: dlrm.{name}: {e}") from None


# key -> (default, checker).  One line per setting; the checker names the key.
SETTINGS: dict[str, tuple[Any, Callable[[str, Any], Any]]] = {
    "backend": ("torch", _string),
    "max_rows": (MAX_ROWS, _positive_int),
    "threads": (0, _count),  # 0 = cpu count / workers
    "touch_tables": (False, _flag),
    "metrics_interval": (1.0, _seconds),
    # fp32 when absent, so archives built before the key existed serve as they did;
    # build_mar.sh writes "auto" (bf16 on CPUs with native bf16) unless told otherwise.
    "precision": ("fp32", _precision),
}


def read_settings(model_yaml_config: dict | None, cpu_count: int | None = None) -> dict:
    """The ``dlrm:`` section of model-config.yaml, checked, with defaults filled in."""
    yaml_config = model_yaml_config or {}
    section = yaml_config.get("dlrm") or {}
    if not isinstance(section, dict):
        raise ValueError(f"model-config.yaml: 'dlrm' must be a mapping, got {section!r}")
    unknown = sorted(set(section) - set(SETTINGS))
    if unknown:
        raise ValueError(
            f"model-config.yaml: unknown keys {unknown} in 'dlrm' (known: {', '.join(sorted(SETTINGS))})"
        )
    out = {k: check(k, section[k]) if k in section else default for k, (default, check) in SETTINGS.items()}
    if out["threads"] == 0:
        # Share the cores between the workers so they do not oversubscribe them.
        workers = yaml_config.get("maxWorkers") or yaml_config.get("minWorkers") or 1
        out["threads"] = max(1, (cpu_count or os.cpu_count() or 1) // max(1, int(workers)))
    return out


# ----- requests and replies ----------------------------------------------------------
@dataclass
class Request:
    """One request's payload.  ``explain`` is set by TorchServe's explanation routes."""

    body: Any
    content_type: str | None = None
    explain: bool = False


@dataclass
class Reply:
    """One answer: an HTTP status, a JSON-able body and extra response headers."""

    status: int
    body: Any
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == 200

    @classmethod
    def error(cls, e: DLRMServeError) -> "Reply":
        return cls(e.status, e.to_dict())

    def text(self) -> str:
        # Pre-encoded: TorchServe would otherwise use json.dumps(indent=2),
        # whose pure-Python path costs milliseconds for 1024 predictions.
        return self.body if isinstance(self.body, str) else json.dumps(self.body, separators=(",", ":"))


def _header(context, idx: int, name: str) -> Any:
    """Request header ``name`` of request ``idx``, whatever its case; None if absent."""
    get_all = getattr(context, "get_all_request_header", None)
    headers = get_all(idx) if get_all is not None else None
    if isinstance(headers, dict):
        for key, value in headers.items():
            if isinstance(key, str) and key.lower() == name:
                return value
        return None
    for key in (name.title(), name):
        value = context.get_request_header(idx, key)
        if value is not None:
            return value
    return None


def content_type_of(key: str | None, context, idx: int) -> str | None:
    """The content type of request ``idx``'s input ``key``, or None (gRPC sends none)."""
    if context is None:
        return None
    # TorchServe records each input's content type under the input's name ...
    if key is not None:
        per_input = context.get_request_header(idx, key)
        if isinstance(per_input, dict) and per_input.get("content-type"):
            return per_input["content-type"]
    # ... and passes the HTTP headers with the case the client used.
    value = _header(context, idx, "content-type")
    return value if isinstance(value, str) and value else None


def request_of(item, context, idx: int) -> Request:
    """One item of TorchServe's ``data`` list as a library request.

    Raises :class:`InvalidInput` when the item holds several inputs and none
    is named ``body`` or ``data``.
    """
    explain = context is not None and str(_header(context, idx, "explain") or "").lower() == "true"
    if not isinstance(item, dict):
        return Request(item, None, explain)
    if not item:
        # TorchServe parses form bodies (curl -d sends one) into fields and
        # drops a TSV line or binary data that does not look like a=b.
        raise InvalidInput(
            "the request has no body (or a form body without fields): send the payload "
            "with its own Content-Type (with curl, --data-binary and -H 'Content-Type: ...')"
        )
    key = next((k for k in BODY_KEYS if k in item), None)
    if key is None and len(item) == 1:
        key = next(iter(item))
    if key is None:
        names = sorted(str(k) for k in item)[:8]
        raise InvalidInput(
            f"the request has several inputs {names} and none is named 'body' or 'data'; "
            "send one payload (gRPC: the input 'data')"
        )
    body = item[key]
    ctype = content_type_of(key, context, idx)
    base = (ctype or "").split(";")[0].strip().lower()
    if base == JSON_TYPE and not isinstance(body, (dict, list, bytes, bytearray)):
        # TorchServe already decoded a JSON scalar (a string, number or null);
        # give the codec the JSON text back so it reports what was sent.
        body = json.dumps(body).encode()
    return Request(body, ctype, explain)


# ----- the predictor -----------------------------------------------------------------
@dataclass
class BatchStats:
    """What one dynamic batch did, for metrics."""

    requests: int = 0
    rows: int = 0
    invalid: int = 0
    decode_seconds: float = 0.0
    forward_seconds: float = 0.0


class Predictor:
    """Turns a list of requests into a list of replies, one per request.

    A request that cannot be decoded gets its own 4xx reply; the rest of the
    batch still runs, in one forward pass.
    """

    def __init__(self, backend: Backend, max_rows: int = MAX_ROWS):
        self.backend = backend
        self.config = backend.config
        self.encoder = FeatureEncoder(self.config)
        self.max_rows = max_rows

    def handle(self, requests: Sequence[Request | DLRMServeError]) -> tuple[list[Reply], BatchStats]:
        """Replies in request order.  An item may already be an error (it gets its reply)."""
        stats = BatchStats(requests=len(requests))
        t0 = time.perf_counter()
        replies: list[Reply | None] = [None] * len(requests)
        batches: list[FeatureBatch] = []
        owners: list[int] = []
        for i, req in enumerate(requests):
            try:
                if isinstance(req, DLRMServeError):
                    raise req
                batch = decode_request(req.body, req.content_type, self.encoder, self.max_rows)
            except DLRMServeError as e:
                replies[i] = Reply.error(e)
                stats.invalid += 1
                continue
            batches.append(batch)
            owners.append(i)
        t1 = time.perf_counter()
        stats.decode_seconds = t1 - t0
        if batches:
            f = self.config.num_sparse
            merged = FeatureBatch.concat(batches, f)
            probs = self.backend.predict(merged)
            stats.forward_seconds = time.perf_counter() - t1
            stats.rows = merged.batch_size
            start = 0
            for i, batch in zip(owners, batches):
                stop = start + batch.batch_size
                replies[i] = Reply(200, predictions_body(probs[start:stop]))
                start = stop
        return replies, stats  # every slot is filled: an error reply or predictions


# ----- metrics -------------------------------------------------------------------------
class MetricsWindow:
    """Batch statistics summed until the next report, so a worker reports once per interval.

    Each TorchServe metric is a log line that the frontend parses; reporting
    after every batch would cost more than small batches themselves.
    """

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic):
        self.interval = interval
        self.clock = clock
        self._reset(float("-inf"))  # the first batch reports at once

    def _reset(self, since: float) -> None:
        self.since = since
        self.batches = self.rows = self.invalid = 0
        self.decode_s = self.forward_s = 0.0

    def add(self, stats: BatchStats) -> bool:
        """Count one batch; True when the interval is over and a report is due."""
        self.batches += 1
        self.rows += stats.rows
        self.invalid += stats.invalid
        self.decode_s += stats.decode_seconds
        self.forward_s += stats.forward_seconds
        return self.clock() - self.since >= self.interval

    def report(self, metrics, dimensions: list) -> None:
        """Write the window to TorchServe's metrics cache and start a new one.

        Counters DLRMRowsScored, DLRMInvalidRequests; gauge DLRMRowsPerBatch;
        times DLRMDecodeTime and DLRMForwardTime (ms, mean per batch).
        """
        from ts.metrics.metric_type_enum import MetricTypes  # only inside a TorchServe worker

        n = max(1, self.batches)
        metrics.add_counter("DLRMRowsScored", self.rows, None, list(dimensions))
        metrics.add_counter("DLRMInvalidRequests", self.invalid, None, list(dimensions))
        metrics.add_metric("DLRMRowsPerBatch", round(self.rows / n, 1), "count", None, list(dimensions), MetricTypes.GAUGE)
        metrics.add_time("DLRMDecodeTime", round(self.decode_s / n * 1e3, 3), None, "ms", list(dimensions))
        metrics.add_time("DLRMForwardTime", round(self.forward_s / n * 1e3, 3), None, "ms", list(dimensions))
        self._reset(self.clock())
