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

Use :func:`connect` to build one::

    from dlrm_serve.client import connect

    with connect("grpc", config="artifacts") as client:
        p = client.predict(["0\\t1\\t...", ...])     # float32 probabilities
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from dlrm_serve.artifacts import load_config
from dlrm_serve.config import DLRMConfig
from dlrm_serve.errors import AuthError, DLRMServeError, InvalidInput, ServerError, UsageError
from dlrm_serve.runtime.explain import EXPLAIN_MAX_ROWS
from dlrm_serve.io.features import FeatureEncoder
from dlrm_serve.client import payloads
from dlrm_serve.client.keys import Keys
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
DEFAULT_RETRIES = 8
# A request whose worker died this many times is likely what kills it (a
# poison request): stop sending it, instead of taking down a worker per try.
WORKER_DIED_RETRIES = 2
# A prediction's timeout: the floor plus this much per row.  1024 binary rows
# take about 20 ms of worker time here; the rest covers waiting in a full
# queue on a busy host.  A lost request is sent again after ~12 s, not 60.
TIMEOUT_FLOOR_S = 10.0
TIMEOUT_PER_ROW_S = 0.002
LOOPBACK = "127.0.0.1"


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


def ordered_map(fn: Callable[[Any], Any], items: Iterable[Any], concurrency: int) -> Iterator[Any]:
    """``fn`` over ``items`` on ``concurrency`` threads, results in input order.

    At most ``concurrency`` calls are in flight; the next item is taken only
    when the oldest result has been handed out, so memory stays bounded for
    an endless input.  The first error (in input order) is raised after the
    calls already running finish; queued ones are cancelled.
    """
    if concurrency <= 1:
        for item in items:
            yield fn(item)
        return
    pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="dlrm-client")
    pending: deque = deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= concurrency:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for fut in pending:
            fut.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


class Client:
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

    # ----- tokens and retries -------------------------------------------------
    def _renew(self, kind: str, refusal: AuthError | None = None) -> None:
        """Get a new ``kind`` key from the token API and take it up."""
        api = self.keys.get("api")
        why = f"{refusal.message}; " if refusal is not None else ""
        if api is None or self.token_url is None:
            missing = "the API key" if api is None else "the REST management URL (token_url)"
            raise AuthError(
                f"{why}the {kind} key was refused or has expired, and it cannot be renewed without {missing}; "
                "give the client the server's key_file.json (key_file= or DLRM_SERVE_KEY_FILE)",
                status=refusal.status if refusal is not None else None,
            )
        answer = self._fetch_token(self.token_url, api, kind)
        self._count("token_renewals")
        key = _key_in_answer(answer, kind)
        if key is not None:
            self.keys.set(kind, key)
            return
        if not self.keys.reload():
            raise AuthError(
                f"{why}the server issued a new {kind} key but did not send it: TorchServe writes it only "
                "to key_file.json in its start folder; give the client that file (key_file= or "
                "DLRM_SERVE_KEY_FILE) to renew keys"
            )

    def _key(self, kind: str) -> str | None:
        """The ``kind`` key, renewed first when it expires within the margin."""
        if self.keys.due(kind, self.token_margin_s):
            version = self.keys.version
            with self._token_lock:
                # Another thread may have renewed it while this one waited.
                if self.keys.version == version and self.keys.due(kind, self.token_margin_s):
                    if not self.keys.reload() or self.keys.due(kind, self.token_margin_s):
                        self._renew(kind)
        return self.keys.get(kind)

    def _recover(self, kind: str, refused: str | None, version: int, refusal: AuthError) -> None:
        """After ``refused`` was rejected: take up a newer key, or renew it."""
        with self._token_lock:
            if self.keys.version != version and self.keys.get(kind) != refused:
                return  # renewed by another thread meanwhile
            if self.keys.reload() and self.keys.get(kind) != refused:
                return  # somebody renewed it on the server; the key file has it
            self._renew(kind, refusal)

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
                delay = min(self.max_backoff_s, self.backoff_s * (2**attempt))
                self._sleep(delay * random.uniform(0.5, 1.0))
                attempt += 1
                self._count("retries", _reason(e))

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

    def _chunk_job(self, kind: str, fmt: str, total_chunks: int):
        def job(item: tuple[int, Any]) -> np.ndarray:
            start, rows = item
            payload = payloads.encode_rows(rows, kind, fmt, self.encoder, first_row=start)
            try:
                return self.send(payload)
            except InvalidInput as e:
                if total_chunks == 1:
                    raise
                stop = start + payload.rows - 1
                raise _located(e, f"in the request holding rows {start}..{stop} of the input") from None

        return job

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
        job = self._chunk_job(kind, fmt, len(starts))
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

    def list_models(self, limit: int = 100) -> list[dict]:
        """Every registered model (``modelName``, ``modelUrl``), all pages."""
        if limit <= 0:
            # TorchServe's gRPC ListModels lists nothing with limit 0.
            raise UsageError(f"limit must be positive, got {limit}")
        out: list[dict] = []
        token: int | None = None
        seen = set()
        while True:
            page = self._manage("list_models", limit, token)
            if not isinstance(page, dict):
                raise ServerError(f"ListModels answered {str(page)[:200]}")
            out.extend(page.get("models", []))
            nxt = page.get("nextPageToken")
            if nxt in (None, "") or nxt in seen:
                return out
            seen.add(nxt)
            token = int(nxt)

    def describe_model(self, name: str | None = None, version: str | None = None, *, customized: bool = False) -> list[dict]:
        """TorchServe's description of a model (versions, workers, batch settings)."""
        return self._manage("describe_model", name or self.model, version, customized)

    def register_model(
        self,
        url: str,
        model_name: str | None = None,
        *,
        batch_size: int | None = None,
        max_batch_delay: int | None = None,
        initial_workers: int | None = None,
        synchronous: bool = True,
        response_timeout: int | None = None,
        startup_timeout: int | None = None,
        handler: str | None = None,
    ) -> Any:
        """Register an archive (a name in the model store, or a URL TorchServe allows)."""
        params = dict(
            url=url,
            model_name=model_name,
            batch_size=batch_size,
            max_batch_delay=max_batch_delay,
            initial_workers=initial_workers,
            synchronous=synchronous,
            response_timeout=response_timeout,
            startup_timeout=startup_timeout,
            handler=handler,
        )
        return self._manage("register_model", **{k: v for k, v in params.items() if v is not None})

    def scale_workers(
        self,
        name: str | None = None,
        min_worker: int = 1,
        max_worker: int | None = None,
        *,
        version: str | None = None,
        synchronous: bool = True,
        timeout: int | None = None,
    ) -> Any:
        """Set a model's worker count (``max_worker`` defaults to ``min_worker``)."""
        params = dict(
            model_name=name or self.model,
            model_version=version,
            min_worker=min_worker,
            max_worker=max_worker if max_worker is not None else min_worker,
            synchronous=synchronous,
            timeout=timeout,
        )
        return self._manage("scale_workers", **{k: v for k, v in params.items() if v is not None})

    def set_default(self, name: str, version: str) -> Any:
        """Make ``version`` the version that unversioned requests reach."""
        return self._manage("set_default", name, version)

    def unregister_model(self, name: str, version: str | None = None) -> Any:
        return self._manage("unregister_model", name, version)


def _reason(err: ServerError) -> str:
    """A short name for why a request was sent again (``stats["retry_reasons"]``)."""
    if err.status == 504:
        return "timeout"
    if WORKER_DIED in err.message.lower():
        return "worker died"
    return "connection" if "cannot reach" in err.message or "connection" in err.message.lower() else "unavailable"


def _located(err: InvalidInput, where: str) -> InvalidInput:
    out = InvalidInput(f"{err.message} ({where})")
    out.status = err.status
    out.server_type = getattr(err, "server_type", None)
    return out


def _key_in_answer(answer: dict | None, kind: str) -> str | None:
    """A key in the token API's answer, should a TorchServe version send one."""
    if not isinstance(answer, dict):
        return None
    for section in (kind, kind.capitalize(), "API" if kind == "api" else None):
        entry = answer.get(section) if section else None
        if isinstance(entry, dict) and isinstance(entry.get("key"), str):
            return entry["key"]
    key = answer.get("key")
    return key if isinstance(key, str) and key else None


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
