"""Splitting work into requests: :func:`ordered_map` (a bounded, ordered thread
pool) and the job that sends one chunk of a large input."""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from dlrm_serve.client import payloads
from dlrm_serve.client.payloads import Payload
from dlrm_serve.errors import InvalidInput
from dlrm_serve.io.features import FeatureEncoder

__all__ = ["ordered_map", "chunk_job", "located"]


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


def chunk_job(send: Callable[[Payload], np.ndarray], encoder: FeatureEncoder | None, kind: str, fmt: str, total_chunks: int):
    """The job for one ``(start, rows)`` chunk of a split input: encode, send, and name
    the chunk's rows in an :class:`InvalidInput` when there are several chunks."""

    def job(item: tuple[int, Any]) -> np.ndarray:
        start, rows = item
        payload = payloads.encode_rows(rows, kind, fmt, encoder, first_row=start)
        try:
            return send(payload)
        except InvalidInput as e:
            if total_chunks == 1:
                raise
            stop = start + payload.rows - 1
            raise located(e, f"in the request holding rows {start}..{stop} of the input") from None

    return job


def located(err: InvalidInput, where: str) -> InvalidInput:
    """``err`` with ``where`` (which rows of the input) added to its message."""
    out = InvalidInput(f"{err.message} ({where})")
    out.status = err.status
    out.server_type = getattr(err, "server_type", None)
    return out
