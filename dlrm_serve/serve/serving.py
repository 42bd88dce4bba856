"""Serving logic without a server: settings, requests, one forward pass, replies, metrics.

The TorchServe handler (``handler/dlrm_handler.py``) is a thin adapter over
this module: it turns TorchServe's request items into :class:`Request`
objects (:func:`request_of`), lets :class:`Predictor` answer them, and maps
each :class:`Reply` back.  Everything here is testable in process and imports
neither torch nor TorchServe.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import orjson

from dlrm_serve.serve import oip
from dlrm_serve.runtime.backends import Backend, check_precision
from dlrm_serve.io.codecs import MAX_ROWS, decode_request, fast_request, predictions_body
from dlrm_serve.errors import DLRMServeError, InternalError, InvalidInput
from dlrm_serve.runtime.explain import EXPLAIN_MAX_ROWS
from dlrm_serve.io.features import FeatureBatch, FeatureEncoder
from dlrm_serve.io.replies import ACCEPT_INPUT, BINARY_REPLY_TYPE, encode_predictions
from dlrm_serve.runtime.placement import DEFAULT_MEMORY_SHARE, TABLE_POLICIES, parse_device

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
    "hang_if_marked",
]

logger = logging.getLogger(__name__)

JSON_TYPE = "application/json"
# Where TorchServe puts a request's payload: the raw REST body, a form field
# or TorchServe's own gRPC client input.
BODY_KEYS = ("body", "data")
# Inputs and the header that ask for explanations (gRPC has no explain call, and
# TorchServe passes no query parameters to handlers).
EXPLAIN_KEY = "explain"
METHOD_KEY = "method"
METHOD_HEADER = "x-explain-method"


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


def _device(name: str, v: Any) -> str:
    try:
        parse_device(v)
    except ValueError:
        raise ValueError(f"model-config.yaml: dlrm.{name} must be auto, cpu, cuda or cuda:N, got {v!r}") from None
    return v.strip().lower()


def _tables(name: str, v: Any) -> str:
    if v not in TABLE_POLICIES:
        raise ValueError(f"model-config.yaml: dlrm.{name} must be one of {', '.join(TABLE_POLICIES)}, got {v!r}")
    return v


def _share(name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1:
        raise ValueError(f"model-config.yaml: dlrm.{name} must be a fraction in (0, 1], got {v!r}")
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
    # Placement (dlrm_serve.runtime.placement): auto = the GPU TorchServe gives a GPU archive's worker.
    "device": ("auto", _device),
    "tables": ("auto", _tables),  # on a GPU: auto | device | host
    "gpu_memory_share": (DEFAULT_MEMORY_SHARE, _share),  # share of free GPU memory the tables may take
    "cuda_graphs": (True, _flag),  # torch on CUDA: graphs over padded batch-size buckets
    "explain_max_rows": (EXPLAIN_MAX_ROWS, _positive_int),
    "fault_hang_on": ("", _string),  # TEST-ONLY fault hook, see hang_if_marked; "" (off) in every built archive
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


def hang_if_marked(requests: Sequence[Any], marker: str, seconds: float = 3600.0) -> None:
    """TEST-ONLY fault hook: hang the batch when a request body contains ``marker``.

    ``marker`` is ``dlrm.fault_hang_on`` of model-config.yaml.  build_mar.sh
    never sets it, so on a normal archive it is empty and no request can
    trigger this; the fault tests set it in a copy of an archive to check that
    TorchServe's ``responseTimeout`` restarts a worker whose batch hangs.
    """
    if not marker:
        return
    needle = marker.encode("utf-8")
    for req in requests:
        body = getattr(req, "body", None)
        if isinstance(body, str):
            body = body.encode("utf-8", errors="replace")
        if isinstance(body, (bytes, bytearray)) and needle in body:
            time.sleep(seconds)
            return


# ----- requests and replies ----------------------------------------------------------
@dataclass
class Request:
    """One request's payload.

    ``explain`` is set by TorchServe's explanation routes (or an ``explain``
    input); ``method`` is the explanation method asked for (None: the
    default).  ``grpc`` marks a request that came over TorchServe's gRPC APIs:
    its replies carry ``ts_stream_next: false`` (StreamPredictions ends after
    one answer), and an OIP body from there holds BYTES elements as base64.
    """

    body: Any
    content_type: str | None = None
    explain: bool = False
    grpc: bool = False
    method: str | None = None
    # BINARY_REPLY_TYPE: answer predictions as float32 bytes (dlrm_serve.io.replies), not JSON.
    accept: str | None = None

    @property
    def binary_reply(self) -> bool:
        return any(p.split(";")[0].strip().lower() == BINARY_REPLY_TYPE for p in (self.accept or "").split(","))


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

    @property
    def content_type(self) -> str:
        return BINARY_REPLY_TYPE if isinstance(self.body, bytes) else JSON_TYPE

    def text(self) -> str | bytes:
        # Pre-encoded: TorchServe would otherwise use json.dumps(indent=2).  orjson,
        # not stdlib json: the reply was 11% of a worker's time under LoadGen.
        if isinstance(self.body, (str, bytes)):
            return self.body
        return orjson.dumps(self.body).decode()


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


def _is_enveloped_json(item: dict) -> bool:
    """Whether ``item`` is a decoded JSON body itself, not TorchServe's map of inputs.

    TorchServe's ``body`` request envelope (set with TS_SERVICE_ENVELOPE=body on
    KServe's TorchServe runtime, see docs/kserve.md) hands the handler each
    request's payload instead of the map of inputs.  A map of inputs holds
    ``body``/``data`` or bytes; a JSON body holds ``instances``, ``inputs`` or
    ``dense``/``sparse`` as lists.
    """
    if any(k in item for k in BODY_KEYS):
        return False
    return any(isinstance(item.get(k), list) for k in ("instances", "inputs", "dense", "sparse"))


def _text_input(value: Any) -> str:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "replace").strip()
    return str(value).strip()


def _explain_input(value: Any) -> bool:
    text = _text_input(value).lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no", ""):
        return False
    raise InvalidInput(f"the input 'explain' must be true or false, got {text[:40]!r}")


def request_of(item, context, idx: int) -> Request:
    """One item of TorchServe's ``data`` list as a library request.

    The payload is the input ``body`` or ``data`` (or the only input).  An
    input ``explain`` (true/false) asks for explanations as TorchServe's
    explanation routes do, and an input ``method`` (or REST's header
    ``X-Explain-Method``) picks their method.  Raises :class:`InvalidInput`
    when the item holds several inputs and none is named ``body`` or ``data``.
    """
    explain_header = None if context is None else _header(context, idx, "explain")
    explain = str(explain_header or "").lower() == "true"
    # Every REST inference route of TorchServe adds the header "explain"; its gRPC APIs add none.
    grpc = context is not None and explain_header is None
    header = _header(context, idx, METHOD_HEADER) if context is not None else None
    method = _text_input(header) if header else None
    accept = _header(context, idx, "accept") if context is not None else None
    accept = accept if isinstance(accept, str) else None
    if not isinstance(item, dict):
        return Request(item, None, explain, grpc, method, accept)
    if _is_enveloped_json(item):
        return Request(item, JSON_TYPE, explain, grpc, method, accept)
    if ACCEPT_INPUT in item:  # gRPC's way to ask for a binary reply
        accept = _text_input(item[ACCEPT_INPUT])
        item = {k: v for k, v in item.items() if k != ACCEPT_INPUT}
    options = {k: item[k] for k in (EXPLAIN_KEY, METHOD_KEY) if k in item}
    if EXPLAIN_KEY in options:
        explain = explain or _explain_input(options[EXPLAIN_KEY])
    if METHOD_KEY in options:
        method = _text_input(options[METHOD_KEY])
    if options and len(options) < len(item):
        item = {k: v for k, v in item.items() if k not in options}
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
    return Request(body, ctype, explain, grpc, method, accept)


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
    batch still runs, in one forward pass.  Bodies in the Open Inference
    Protocol (:mod:`dlrm_serve.serve.oip`) are answered in OIP form, every other
    body as ``{"predictions": [...]}``.  Explain requests (``Request.explain``)
    are decoded the same way and answered by :mod:`dlrm_serve.runtime.explain`, at
    most ``explain_max_rows`` rows each.
    """

    def __init__(
        self,
        backend: Backend,
        max_rows: int = MAX_ROWS,
        model_name: str = "dlrm",
        model_version: str = "1.0",
        explain_max_rows: int = EXPLAIN_MAX_ROWS,
    ):
        self.backend = backend
        self.config = backend.config
        self.encoder = FeatureEncoder(self.config)
        self.max_rows = max_rows
        self.model_name = model_name
        self.model_version = model_version
        self.explain_max_rows = explain_max_rows
        self._explainer = None  # made on the first explain request

    def explain(self, batch: FeatureBatch, method: str | None) -> Reply:
        """The reply to one explain request (a 400 when this backend cannot explain)."""
        from dlrm_serve.runtime.explain import explainer_for

        if self._explainer is None:
            self._explainer = explainer_for(self.backend, max_rows=self.explain_max_rows)
        return Reply(200, self._explainer.answer(batch, method))

    def _decode(self, req: Request, kind: str, body: Any) -> tuple[FeatureBatch, "oip.OIPRequest | None"]:
        """``body`` as :func:`oip.classify` returned it for ``req``: model inputs and the OIP request, if any."""
        if kind == "oip":
            # TorchServe's OIP gRPC service hands its JSON over (typed as JSON, or
            # decoded when the worker decodes JSON), BYTES as base64.
            ctype = (req.content_type or "").split(";")[0].strip().lower()
            b64 = req.grpc and (isinstance(req.body, dict) or ctype == JSON_TYPE)
            return oip.decode(body, self.encoder, self.max_rows, base64_bytes=b64)
        return decode_request(body, req.content_type, self.encoder, self.max_rows), None

    def _error(self, req: Request | DLRMServeError, oip_body: bool, e: DLRMServeError) -> Reply:
        if not oip_body:
            reply = Reply.error(e)
        elif isinstance(req, Request) and req.grpc:
            # TorchServe's OIP gRPC frontend ignores the status and reads id,
            # model_name, model_version and outputs from every reply (it drops
            # the worker when they are missing), so the error travels as an
            # output; a batch of one raises instead (see handle).
            reply = Reply(e.status, {
                **oip.response_body(np.zeros(0, np.float32), self.model_name, self.model_version, ""),
                "outputs": [{"name": "error", "datatype": "BYTES", "shape": [1], "data": [e.message]}],
            })
        else:
            reply = Reply(e.status, oip.error_body(e))
        return self._headers(req, reply)

    @staticmethod
    def _headers(req: Request | DLRMServeError, reply: Reply) -> Reply:
        # StreamPredictions ends its stream only on "ts_stream_next: false".  REST
        # must not get it: there TorchServe would answer as the end of a chunked stream.
        if isinstance(req, Request) and req.grpc:
            reply.headers["ts_stream_next"] = "false"
        return reply

    def handle(self, requests: Sequence[Request | DLRMServeError]) -> tuple[list[Reply], BatchStats]:
        """Replies in request order.  An item may already be an error (it gets its reply).

        Raises the request's :class:`DLRMServeError` when the batch is one bad
        request to TorchServe's OIP gRPC service: that way the client gets a
        gRPC status (INVALID_ARGUMENT) with the message.
        """
        stats = BatchStats(requests=len(requests))
        t0 = time.perf_counter()
        replies: list[Reply | None] = [None] * len(requests)
        batches: list[FeatureBatch] = []
        owners: list[tuple[int, "oip.OIPRequest | None"]] = []
        explains: list[tuple[int, FeatureBatch, str | None]] = []
        for i, req in enumerate(requests):
            kind = "other"
            try:
                if isinstance(req, DLRMServeError):
                    raise req
                # The common JSON body, read straight from its bytes; else classified (OIP or not) and decoded.
                batch, parsed = fast_request(req.body, req.content_type, self.encoder, self.max_rows), None
                if batch is None:
                    kind, body = oip.classify(req.body, req.content_type)
                    batch, parsed = self._decode(req, kind, body)
            except DLRMServeError as e:
                is_oip = kind == "oip"
                if is_oip and len(requests) == 1 and req.grpc:
                    raise
                replies[i] = self._error(req, is_oip, e)
                stats.invalid += 1
                continue
            except Exception as e:  # MemoryError included: this request fails alone
                logger.exception("decoding request %d of the batch failed", i)
                # Through _error like any other: the OIP shape for OIP bodies, and gRPC's stream header.
                replies[i] = self._error(req, kind == "oip", InternalError(
                    f"decoding this request failed unexpectedly ({type(e).__name__}); "
                    "the other requests of the batch were answered"
                ))
                stats.invalid += 1
                continue
            if req.explain:
                explains.append((i, batch, req.method))
                continue
            batches.append(batch)
            owners.append((i, parsed))
        t1 = time.perf_counter()
        stats.decode_seconds = t1 - t0
        if batches:
            f = self.config.num_sparse
            merged = FeatureBatch.concat(batches, f)
            probs = self.backend.predict(merged)
            stats.forward_seconds = time.perf_counter() - t1
            stats.rows += merged.batch_size
            start = 0
            for (i, parsed), batch in zip(owners, batches):
                stop = start + batch.batch_size
                if parsed is None and getattr(requests[i], "binary_reply", False):
                    body = encode_predictions(probs[start:stop])
                elif parsed is None:
                    body = predictions_body(probs[start:stop])
                else:
                    body = oip.response_body(probs[start:stop], self.model_name, self.model_version, parsed.id)
                replies[i] = self._headers(requests[i], Reply(200, body))
                start = stop
        t2 = time.perf_counter()
        for i, batch, method in explains:
            try:
                replies[i] = self._headers(requests[i], self.explain(batch, method))
                stats.rows += batch.batch_size
            except DLRMServeError as e:
                replies[i] = self._headers(requests[i], Reply.error(e))
                stats.invalid += 1
        stats.forward_seconds += time.perf_counter() - t2
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
