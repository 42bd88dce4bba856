"""The client: one interface for gRPC and REST.

:class:`Client` turns rows into probabilities and exposes the management
API.  It splits large inputs into requests of ``rows_per_request`` rows,
keeps up to ``concurrency`` of them in flight on a thread pool (encoding
included, so the CPU work of the next request overlaps the wait for the
last) and reassembles the answers in input order.

Predictions are idempotent, so a request that may not have been answered is
sent again (:func:`retryable`): a full queue or an unreachable server (HTTP
503, gRPC ``UNAVAILABLE``), a lost connection, a timeout (504,
``DEADLINE_EXCEEDED``) and a worker that died under it (TorchServe's
"Worker died.": REST 507, gRPC ``RESOURCE_EXHAUSTED``).  Retries back off
exponentially with jitter, a bounded number of times.  Each request's timeout grows with its
rows from a floor (:meth:`Client.request_timeout`), so a request lost with
a killed worker is sent again within seconds.  Keys are renewed shortly
before they expire, at most about once per key lifetime, and once more when
the server refuses one (see :mod:`dlrm_serve.client.keys`).

The parts: :mod:`~dlrm_serve.client.retry` (what is sent again, the
backoff), :class:`~dlrm_serve.client.keys.TokenRenewal`,
:mod:`~dlrm_serve.client.batching` (:func:`ordered_map`, chunk jobs) and
:class:`~dlrm_serve.client.management.Management` (the management API).

Use :func:`connect` to build one::

    from dlrm_serve.client import connect

    with connect("grpc", config="artifacts") as client:
        p = client.predict(["0\\t1\\t...", ...])     # float32 probabilities
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from dlrm_serve.artifacts import load_config
from dlrm_serve.config import DLRMConfig
from dlrm_serve.errors import AuthError, DLRMServeError, ServerError, UsageError
from dlrm_serve.runtime.explain import EXPLAIN_MAX_ROWS
from dlrm_serve.io.features import FeatureEncoder
from dlrm_serve.client import payloads
from dlrm_serve.client.batching import chunk_job, ordered_map
from dlrm_serve.client.keys import Keys, TokenRenewal
from dlrm_serve.client.management import Management
from dlrm_serve.client.retry import DEFAULT_RETRIES, WORKER_DIED_RETRIES, backoff_s, retry_reason, retryable
from dlrm_serve.client.payloads import Payload
from dlrm_serve.client.transports import DEFAULT_MAX_MESSAGE_BYTES, WORKER_DIED, GrpcTransport, RestTransport, fetch_token

__all__ = [
    "Client",
    "connect",
    "ordered_map",
    "retryable",
    "DEFAULT_ROWS_PER_REQUEST",
    "DEFAULT_CONCURRENCY",
    "DEFAULT_RETRIES",
    "WORKER_DIED_RETRIES",
    "TIMEOUT_FLOOR_S",
    "TIMEOUT_PER_ROW_S",
]

DEFAULT_ROWS_PER_REQUEST = 1024
DEFAULT_CONCURRENCY = 4
# A prediction's timeout: the floor plus this much per row.  1024 binary rows
# take about 20 ms of worker time here; the rest covers waiting in a full
# queue on a busy host.  A lost request is sent again after ~12 s, not 60.
TIMEOUT_FLOOR_S = 10.0
TIMEOUT_PER_ROW_S = 0.002
LOOPBACK = "127.0.0.1"


class Client(TokenRenewal, Management):
    """Predictions and model management over one transport (gRPC or REST).

    - ``transport``: a :class:`~dlrm_serve.client.transports.GrpcTransport` or
      :class:`~dlrm_serve.client.transports.RestTransport` (or a fake with
      the same methods).
    - ``model`` / ``version``: what ``predict`` calls (version None = default).
    - ``config``: the model's :class:`DLRMConfig` (or an artifacts folder or
      ``dlrm.json``); with it, rows are validated and hashed here and sent
      in the binary format.  Without it, ``json``/``tsv`` bodies are sent.
    - ``payload``: ``binary``, ``json``, ``tsv`` or None (binary when a config
      is known, else the rows' natural text format).
    - ``rows_per_request``, ``concurrency``: request size and requests in flight.
    - ``retries``, ``backoff_s``, ``max_backoff_s``: how often and how
      patiently a :func:`retryable` failure is sent again (exponential
      backoff from ``backoff_s``, capped at ``max_backoff_s``, with jitter).
    - ``timeout_s``: a fixed per-prediction timeout; None (default) sizes it
      per request, ``timeout_floor_s + rows * timeout_per_row_s``.
    - ``keys``: :class:`Keys` (default: :meth:`Keys.discover`).
    - ``token_url``: the REST management URL used to renew keys with the
      API key (needed by gRPC clients too: TorchServe has no gRPC token API).
    - ``token_margin_s``: renew a key this long before its known expiry, or a
      tenth of its lifetime when that is shorter (so a 1-minute key is
      renewed 6 s before it expires, once per lifetime).

    ``stats`` counts ``requests`` (attempts), ``retries`` (by reason in
    ``retry_reasons``) and ``token_renewals``.
    """

    def __init__(
        self,
        transport: Any,
        *,
        model: str = "dlrm",
        version: str | None = None,
        config: DLRMConfig | str | os.PathLike | None = None,
        payload: str | None = None,
        rows_per_request: int = DEFAULT_ROWS_PER_REQUEST,
        concurrency: int = DEFAULT_CONCURRENCY,
        retries: int = DEFAULT_RETRIES,
        backoff_s: float = 0.1,
        max_backoff_s: float = 5.0,
        timeout_s: float | None = None,
        timeout_floor_s: float = TIMEOUT_FLOOR_S,
        timeout_per_row_s: float = TIMEOUT_PER_ROW_S,
        keys: Keys | None = None,
        token_url: str | None = None,
        token_margin_s: float = 60.0,
        sleep: Callable[[float], None] = time.sleep,
        fetch_token: Callable[..., dict | None] = fetch_token,
    ):
        if not isinstance(rows_per_request, int) or isinstance(rows_per_request, bool) or rows_per_request <= 0:
            raise UsageError(f"rows_per_request must be a positive integer, got {rows_per_request!r}")
        if not isinstance(concurrency, int) or isinstance(concurrency, bool) or concurrency <= 0:
            raise UsageError(f"concurrency must be a positive integer, got {concurrency!r}")
        if not isinstance(retries, int) or retries < 0:
            raise UsageError(f"retries must be an integer >= 0, got {retries!r}")
        if payload is not None and payload not in payloads.FORMATS:
            raise UsageError(f"payload must be one of {payloads.FORMATS} or None, got {payload!r}")
        self.transport = transport
        self.model = model
        self.version = version
        self.config = config if config is None or isinstance(config, DLRMConfig) else load_config(config)
        self.encoder = FeatureEncoder(self.config) if self.config is not None else None
        if payload == "binary" and self.config is None:
            raise UsageError("the binary payload needs the model's config (config= or --config: a DLRMConfig, an artifacts folder or a dlrm.json)")
        self.payload = payload
        self.rows_per_request = rows_per_request
        self.concurrency = concurrency
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        for name, v in (("timeout_floor_s", timeout_floor_s), ("timeout_per_row_s", timeout_per_row_s)):
            if not isinstance(v, (int, float)) or v < 0:
                raise UsageError(f"{name} must be a number >= 0, got {v!r}")
        if timeout_s is not None and (not isinstance(timeout_s, (int, float)) or timeout_s <= 0):
            raise UsageError(f"timeout_s must be a positive number or None, got {timeout_s!r}")
        self.timeout_s = timeout_s
        self.timeout_floor_s = float(timeout_floor_s)
        self.timeout_per_row_s = float(timeout_per_row_s)
        self.keys = keys if keys is not None else Keys.discover()
        self.token_url = token_url
        self.token_margin_s = token_margin_s
        self._sleep = sleep
        self._fetch_token = fetch_token
        self._token_lock = threading.Lock()
        self.stats: dict[str, Any] = {"requests": 0, "retries": 0, "token_renewals": 0, "retry_reasons": {}}
        self._stats_lock = threading.Lock()

    # ----- context manager ----------------------------------------------------
    def close(self) -> None:
        self.transport.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _count(self, name: str, reason: str | None = None) -> None:
        with self._stats_lock:
            self.stats[name] += 1
            if reason is not None:
                reasons = self.stats["retry_reasons"]
                reasons[reason] = reasons.get(reason, 0) + 1

    def request_timeout(self, rows: int) -> float:
        """Seconds one prediction of ``rows`` rows may take before it is sent again."""
        if self.timeout_s is not None:
            return self.timeout_s
        return self.timeout_floor_s + max(0, rows) * self.timeout_per_row_s

    # ----- retries ---------------------------------------------------------------
    def _with_retries(self, kind: str, call: Callable[[str | None], Any]) -> Any:
        """``call(key)``, renewing the key once on a refusal and retrying :func:`retryable` failures."""
        attempt = 0
        died = 0
        renewed = False
        while True:
            version = self.keys.version
            key = self._key(kind)
            try:
                self._count("requests")
                return call(key)
            except AuthError as e:
                if renewed:
                    raise
                self._recover(kind, key, version, e)
                renewed = True
            except ServerError as e:
                if not retryable(e) or attempt >= self.retries:
                    raise
                if WORKER_DIED in e.message.lower():
                    died += 1
                    if died > WORKER_DIED_RETRIES:
                        raise ServerError(
                            f"{e.message} (the worker died {died} times under this request; "
                            "not sent again, it may be what kills it)",
                            status=e.status,
                        ) from None
                self._sleep(backoff_s(attempt, self.backoff_s, self.max_backoff_s))
                attempt += 1
                self._count("retries", retry_reason(e))

    # ----- predictions --------------------------------------------------------
    def _format(self, kind: str) -> str:
        return self.payload or payloads.default_format(kind, self.config)

    def encode(self, rows: Any, *, first_row: int = 0, payload: str | None = None) -> Payload:
        """One request body for ``rows`` (all of them, not split)."""
        kind = payloads.rows_kind(rows)
        return payloads.encode_rows(rows, kind, payload or self._format(kind), self.encoder, first_row=first_row)

    def send(self, payload: Payload) -> np.ndarray:
        """One request (retried, token renewed) -> float32 probabilities."""
        # The answer is parsed inside the retry loop: over gRPC an error
        # arrives as a body, and must be retried (503) or renewed like REST's.
        timeout = self.request_timeout(payload.rows)
        return self._with_retries(
            "inference",
            lambda key: payloads.parse_predictions(
                self.transport.predict(self.model, self.version, payload, key, timeout=timeout), payload.rows
            ),
        )

    def predict(self, rows: Any = None, *, dense: Any = None, sparse: Any = None, payload: str | None = None) -> np.ndarray:
        """Probabilities (float32 ``[B]``) for ``rows``, in order.

        ``rows``: a list of instances (dicts), a list of Criteo lines (str) or
        a ``(dense, sparse)`` pair; or pass ``dense=`` and ``sparse=``.
        Large inputs are split into ``rows_per_request`` rows per request,
        ``concurrency`` of them in flight.
        """
        if rows is None:
            if dense is None or sparse is None:
                raise UsageError("predict needs rows, or both dense= and sparse=")
            rows = (dense, sparse)
        elif dense is not None or sparse is not None:
            raise UsageError("pass either rows or dense=/sparse=, not both")
        kind = payloads.rows_kind(rows)
        n = payloads.count_rows(rows, kind)
        if n == 0:
            return np.zeros(0, dtype=np.float32)
        fmt = payload or self._format(kind)
        if fmt == "binary" and self.encoder is None:
            raise UsageError("the binary payload needs the model's config (config= or --config)")
        step = self.rows_per_request
        starts = range(0, n, step)
        chunks = ((s, payloads.slice_rows(rows, kind, s, min(n, s + step))) for s in starts)
        job = chunk_job(self.send, self.encoder, kind, fmt, len(starts))
        parts = list(ordered_map(job, chunks, min(self.concurrency, len(starts))))
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def predict_stream(
        self, jobs: Iterable[Callable[[], Payload]], *, on_error: Callable[[int, DLRMServeError], DLRMServeError] | None = None
    ) -> Iterator[np.ndarray]:
        """Answers of a stream of requests, in order, ``concurrency`` in flight.

        Each job is a function that builds one :class:`Payload` (it runs on the
        pool, so encoding overlaps the network).  ``on_error(index, error)``
        may return a more precise error for the job at ``index``.
        """
        def run(item: tuple[int, Callable[[], Payload]]) -> np.ndarray:
            index, make = item
            try:
                return self.send(make())
            except DLRMServeError as e:
                if on_error is None:
                    raise
                better = on_error(index, e)
                if better is e:
                    raise
                raise better from None

        return ordered_map(run, enumerate(jobs), self.concurrency)

    def explain(self, rows: Any, *, method: str | None = None, payload: str | None = None) -> list[dict]:
        """Explanations of ``rows`` (as :meth:`predict` takes them), one dict per row, in order.

        Each holds ``prediction``, ``baseline``, ``method``, ``delta`` and
        ``attributions`` (feature -> logit contribution); see docs/explanations.md.
        REST calls ``/explanations``; gRPC sends the input ``explain`` next to
        ``data``.  ``method``: ``integrated_gradients`` (default) or
        ``feature_ablation``.  Requests carry at most ``rows_per_request`` and
        :data:`~dlrm_serve.runtime.explain.EXPLAIN_MAX_ROWS` rows.
        """
        kind = payloads.rows_kind(rows)
        n = payloads.count_rows(rows, kind)
        fmt = payload or self._format(kind)
        step = min(self.rows_per_request, EXPLAIN_MAX_ROWS)
        out: list[dict] = []
        for start in range(0, n, step):
            part = payloads.encode_rows(
                payloads.slice_rows(rows, kind, start, min(n, start + step)), kind, fmt, self.encoder, first_row=start
            )
            out += self._with_retries(
                "inference",
                lambda key: payloads.parse_explanations(
                    self.transport.explain(self.model, self.version, part, key, method), part.rows
                ),
            )
        return out

    # ----- health and management ----------------------------------------------
    def ping(self) -> str:
        """The server's health (``Healthy``), over the client's transport."""
        return self._with_retries("inference", self.transport.ping)

    def _manage(self, op: str, *args, **kwargs) -> Any:
        fn = getattr(self.transport, op)
        return self._with_retries("management", lambda key: fn(key, *args, **kwargs))


def connect(
    transport: str = "grpc",
    *,
    host: str = LOOPBACK,
    http_port: int = 8080,
    management_port: int = 8081,
    grpc_port: int = 7070,
    grpc_management_port: int = 7071,
    inference_url: str | None = None,
    management_url: str | None = None,
    grpc_target: str | None = None,
    grpc_management_target: str | None = None,
    key_file: str | os.PathLike | None = None,
    keys: Keys | None = None,
    timeout: float | None = None,
    management_timeout: float = 300.0,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    **options: Any,
) -> Client:
    """A :class:`Client` for a TorchServe at ``host`` with its default ports.

    ``transport``: ``grpc`` or ``rest``.  URLs and targets override host and
    ports.  ``timeout``: seconds per prediction (None: sized by rows, see
    :meth:`Client.request_timeout`; pings use 60 s).  ``options`` go to
    :class:`Client` (model, version, config, payload, rows_per_request,
    concurrency, retries, ...).
    """
    options.setdefault("timeout_s", timeout)
    call_timeout = timeout if timeout is not None else 60.0
    inference_url = inference_url or f"http://{host}:{http_port}"
    management_url = management_url or f"http://{host}:{management_port}"
    if keys is None:
        keys = Keys.discover(key_file)
    if transport == "grpc":
        t: Any = GrpcTransport(
            grpc_target or f"{host}:{grpc_port}",
            grpc_management_target or f"{host}:{grpc_management_port}",
            timeout=call_timeout,
            management_timeout=management_timeout,
            max_message_bytes=max_message_bytes,
        )
    elif transport == "rest":
        t = RestTransport(
            inference_url,
            management_url,
            timeout=call_timeout,
            management_timeout=management_timeout,
            pool_size=max(4, int(options.get("concurrency", DEFAULT_CONCURRENCY)) * 2),
        )
    else:
        raise UsageError(f"transport must be 'grpc' or 'rest', got {transport!r}")
    try:
        return Client(t, keys=keys, token_url=management_url, **options)
    except Exception:
        t.close()
        raise
