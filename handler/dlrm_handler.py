"""TorchServe handler for dlrm-serve: a thin adapter over ``dlrm_serve.serving``.

It finds the artifacts in the unpacked archive, reads the free-form ``dlrm:``
section of model-config.yaml, and per dynamic batch maps TorchServe's request
items to :class:`~dlrm_serve.serving.Request`, lets the
:class:`~dlrm_serve.serving.Predictor` decode them and run one forward pass,
and maps each reply back (per-request HTTP status, JSON body).  Decoding,
validation and the model live in the library, which ships inside the archive.

``dlrm:`` keys (all optional)::

    dlrm:
      backend: torch        # or onnxruntime (needs dlrm.onnx in the archive)
      max_rows: 8192        # most rows one request may carry
      threads: 1            # intra-op threads per worker; 0 = cpu count / maxWorkers
      touch_tables: false   # read every table page once at load (memory-mapped
                            # tables then start fully mapped, as after traffic)
      metrics_interval: 1.0 # seconds between metric reports per worker; 0 = every batch

Metrics (dimensions ModelName, Level, Backend, Provider): counters DLRMRowsScored and
DLRMInvalidRequests; gauges DLRMRowsPerBatch, DLRMDecodeTime and
DLRMForwardTime (ms), averaged over the batches of the interval.  Each metric
is a log line that the frontend parses, so a worker sums its batches and
reports once per interval instead of after every batch.
"""

from __future__ import annotations

import json
import logging
import os
import time

from ts.metrics.dimension import Dimension
from ts.metrics.metric_type_enum import MetricTypes
from ts.torch_handler.base_handler import BaseHandler
from ts.utils.util import PredictionException

import dlrm_serve
from dlrm_serve.backends import load_backend
from dlrm_serve.codecs import MAX_ROWS
from dlrm_serve.errors import DLRMServeError, InvalidInput
from dlrm_serve.memory import touch_backend_tables
from dlrm_serve.serving import Predictor, Reply, Request

__all__ = ["DLRMHandler", "new_window", "read_settings", "request_of", "content_type_of"]

logger = logging.getLogger(__name__)

# Where TorchServe puts a request's payload: the raw REST body, a form field
# or TorchServe's own gRPC client input.
BODY_KEYS = ("body", "data")
JSON_TYPE = "application/json"


def read_settings(model_yaml_config: dict | None, cpu_count: int | None = None) -> dict:
    """The ``dlrm:`` section of model-config.yaml, checked, with defaults filled in."""
    yaml_config = model_yaml_config or {}
    section = yaml_config.get("dlrm") or {}
    if not isinstance(section, dict):
        raise ValueError(f"model-config.yaml: 'dlrm' must be a mapping, got {section!r}")
    known = {"backend", "max_rows", "threads", "touch_tables", "metrics_interval"}
    unknown = sorted(set(section) - known)
    if unknown:
        raise ValueError(f"model-config.yaml: unknown keys {unknown} in 'dlrm' (known: {', '.join(sorted(known))})")
    backend = section.get("backend", "torch")
    if not isinstance(backend, str):
        raise ValueError(f"model-config.yaml: dlrm.backend must be a string, got {backend!r}")
    max_rows = section.get("max_rows", MAX_ROWS)
    if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows <= 0:
        raise ValueError(f"model-config.yaml: dlrm.max_rows must be a positive integer, got {max_rows!r}")
    threads = section.get("threads", 0)
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        raise ValueError(f"model-config.yaml: dlrm.threads must be an integer >= 0, got {threads!r}")
    interval = section.get("metrics_interval", 1.0)
    if isinstance(interval, bool) or not isinstance(interval, (int, float)) or not 0 <= interval <= 3600:
        raise ValueError(f"model-config.yaml: dlrm.metrics_interval must be seconds in [0, 3600], got {interval!r}")
    if threads == 0:
        # Share the cores between the workers so they do not oversubscribe them.
        workers = yaml_config.get("maxWorkers") or yaml_config.get("minWorkers") or 1
        threads = max(1, (cpu_count or os.cpu_count() or 1) // max(1, int(workers)))
    touch = section.get("touch_tables", False)
    if not isinstance(touch, bool):
        raise ValueError(f"model-config.yaml: dlrm.touch_tables must be true or false, got {touch!r}")
    return {
        "backend": backend,
        "max_rows": max_rows,
        "threads": threads,
        "touch_tables": touch,
        "metrics_interval": float(interval),
    }


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
    get_all = getattr(context, "get_all_request_header", None)
    headers = get_all(idx) if get_all is not None else None
    if isinstance(headers, dict):
        for name, value in headers.items():
            if isinstance(name, str) and name.lower() == "content-type" and isinstance(value, str) and value:
                return value
        return None
    for name in ("Content-Type", "content-type"):
        value = context.get_request_header(idx, name)
        if isinstance(value, str) and value:
            return value
    return None


def request_of(item, context, idx: int) -> Request:
    """One item of TorchServe's ``data`` list as a library request.

    Raises :class:`InvalidInput` when the item holds several inputs and none
    is named ``body`` or ``data``.
    """
    if not isinstance(item, dict):
        return Request(item, None)
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
    return Request(body, ctype)


class DLRMHandler(BaseHandler):
    """Loads the DLRM of the archive and answers each request of a dynamic batch."""

    def initialize(self, context):
        self.context = context
        self.manifest = context.manifest
        model_dir = context.system_properties["model_dir"]
        self.settings = read_settings(getattr(context, "model_yaml_config", None))
        self.backend = load_backend(model_dir, self.settings["backend"], threads=self.settings["threads"])
        self.predictor = Predictor(self.backend, max_rows=self.settings["max_rows"])
        if self.settings["touch_tables"]:
            start = time.perf_counter()
            touched = touch_backend_tables(self.backend)
            logger.info("dlrm touched %d table bytes in %.2f s", touched, time.perf_counter() - start)
        # The provider (CPU or CUDA for onnxruntime, the device for torch) tells comparisons apart.
        described = self.backend.describe()
        provider = described.get("provider") or described.get("device", "cpu")
        self.dimensions = [Dimension("Backend", self.backend.name), Dimension("Provider", str(provider))]
        self.clock = time.monotonic
        self.window = new_window(float("-inf"))  # the first batch reports at once
        self.initialized = True
        # Logged so a test (or a person) can see which copy of the library runs.
        logger.info(
            "dlrm handler ready: dlrm_serve from %s, %s",
            os.path.dirname(dlrm_serve.__file__),
            json.dumps({**described, **self.settings}, sort_keys=True),
        )

    def handle(self, data, context):
        replies: list[Reply | None] = [None] * len(data)
        requests, owners = [], []
        for idx, item in enumerate(data):
            try:
                requests.append(request_of(item, context, idx))
                owners.append(idx)
            except InvalidInput as e:
                replies[idx] = Reply(e.status, e.to_dict())
        try:
            decoded, stats = self.predictor.handle(requests)
        except DLRMServeError as e:
            raise PredictionException(e.message, e.status) from e
        except Exception as e:  # a backend failure: fail this batch, keep the worker
            logger.exception("dlrm forward pass failed")
            raise PredictionException(f"prediction failed: {type(e).__name__}: {e}", 500) from e
        for idx, reply in zip(owners, decoded):
            replies[idx] = reply
        stats.invalid += len(data) - len(requests)
        out = []
        for idx, reply in enumerate(replies):
            if not reply.ok:
                context.set_response_status(reply.status, reply.body.get("type", "Error"), idx)
            context.set_response_content_type(idx, JSON_TYPE)
            # Pre-encoded: TorchServe would otherwise use json.dumps(indent=2),
            # whose pure-Python path costs milliseconds for 1024 predictions.
            out.append(json.dumps(reply.body, separators=(",", ":")))
        self._publish(stats, context)
        return out

    def _publish(self, stats, context) -> None:
        w = self.window
        w["batches"] += 1
        w["rows"] += stats.rows
        w["invalid"] += stats.invalid
        w["decode_s"] += stats.decode_seconds
        w["forward_s"] += stats.forward_seconds
        now = self.clock()
        metrics = getattr(context, "metrics", None)
        if metrics is None or now - w["since"] < self.settings["metrics_interval"]:
            return
        dims, n = self.dimensions, w["batches"]
        metrics.add_counter("DLRMRowsScored", w["rows"], None, list(dims))
        metrics.add_counter("DLRMInvalidRequests", w["invalid"], None, list(dims))
        metrics.add_metric("DLRMRowsPerBatch", round(w["rows"] / n, 1), "count", None, list(dims), MetricTypes.GAUGE)
        metrics.add_time("DLRMDecodeTime", round(w["decode_s"] / n * 1e3, 3), None, "ms", list(dims))
        metrics.add_time("DLRMForwardTime", round(w["forward_s"] / n * 1e3, 3), None, "ms", list(dims))
        self.window = new_window(now)


def new_window(since: float) -> dict:
    """Batch statistics summed until the next metrics report.

    (A dict, not a class: TorchServe wants exactly one class in a handler module.)
    """
    return {"since": since, "batches": 0, "rows": 0, "invalid": 0, "decode_s": 0.0, "forward_s": 0.0}
