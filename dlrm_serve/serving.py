"""Serving logic without a server: decode each request, one forward pass, split.

The TorchServe handler is a thin adapter over :class:`Predictor`; everything
here is testable in process.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence


from .backends import Backend
from .codecs import MAX_ROWS, decode_request, predictions_body
from .errors import DLRMServeError
from .features import FeatureBatch, FeatureEncoder

__all__ = ["Request", "Reply", "BatchStats", "Predictor"]


@dataclass
class Request:
    body: Any
    content_type: str | None = None


@dataclass
class Reply:
    status: int
    body: dict

    @property
    def ok(self) -> bool:
        return self.status == 200


@dataclass
class BatchStats:
    """What one dynamic batch did, for metrics."""

    requests: int = 0
    rows: int = 0
    invalid: int = 0
    decode_seconds: float = 0.0
    forward_seconds: float = 0.0
    errors: list[str] = field(default_factory=list)


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

    def handle(self, requests: Sequence[Request]) -> tuple[list[Reply], BatchStats]:
        stats = BatchStats(requests=len(requests))
        t0 = time.perf_counter()
        replies: list[Reply | None] = [None] * len(requests)
        batches: list[FeatureBatch] = []
        owners: list[int] = []
        for i, req in enumerate(requests):
            try:
                batch = decode_request(req.body, req.content_type, self.encoder, self.max_rows)
            except DLRMServeError as e:
                replies[i] = Reply(e.status, e.to_dict())
                stats.invalid += 1
                stats.errors.append(e.message)
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
