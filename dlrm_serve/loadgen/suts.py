"""Systems under test for LoadGen: in process, or a TorchServe over REST or gRPC.

Every SUT answers a query sample (one user, :mod:`~dlrm_serve.loadgen.samples`)
with its float32 probabilities ``[rows]``, which LoadGen copies into its
accuracy log.  A sample that fails is answered empty and counted in
``errors`` (LoadGen waits for every sample; the runner fails the run).

- :class:`InProcessSUT`: the backend of ``load_backend`` behind the project's
  :class:`~dlrm_serve.serve.serving.Predictor`, fed the same binary bodies as
  the server gets.  One thread takes what is queued, up to ``batch_rows``
  rows, and answers it in one forward pass, as TorchServe's dynamic batching does.
- :class:`ClientSUT`: one request per sample through the client library
  (:class:`~dlrm_serve.client.Client`), ``concurrency`` in flight.

Both expose ``issue(samples)`` / ``flush()`` for LoadGen, ``throughput(seconds)``
to size the Offline run, and ``completed`` / ``rows_done`` for progress.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

import numpy as np

from dlrm_serve.loadgen.samples import QuerySet

__all__ = ["InProcessSUT", "ClientSUT", "complete"]

logger = logging.getLogger(__name__)
_EMPTY = np.zeros(0, np.float32)


def complete(pairs: Sequence[tuple[int, np.ndarray]]) -> None:
    """Tell LoadGen that samples ``(response id, float32 probabilities)`` are done.

    LoadGen reads (and, when it logs accuracy, copies) the bytes during the
    call, so the arrays only have to live until it returns.
    """
    import mlperf_loadgen as lg

    arrays = [np.ascontiguousarray(p, dtype=np.float32) for _, p in pairs]
    lg.QuerySamplesComplete(
        [lg.QuerySampleResponse(sid, a.ctypes.data, a.nbytes) for (sid, _), a in zip(pairs, arrays)]
    )


class _Counters:
    def __init__(self, qset: QuerySet):
        self.qset = qset
        self.completed = 0
        self.rows_done = 0
        self.errors = 0
        self.first_error: str | None = None
        self._lock = threading.Lock()

    def _done(self, indices: Sequence[int], failed: BaseException | None = None) -> None:
        with self._lock:
            self.completed += len(indices)
            self.rows_done += int(sum(int(self.qset.sizes[i]) for i in indices))
            if failed is not None:
                self.errors += len(indices)
                if self.first_error is None:
                    self.first_error = f"{type(failed).__name__}: {failed}"


class InProcessSUT(_Counters):
    """The Predictor in this process; ``batch_rows``: the most rows one forward pass takes."""

    name = "inprocess"

    def __init__(self, predictor: Any, qset: QuerySet, batch_rows: int = 4096):
        super().__init__(qset)
        self.predictor = predictor
        self.batch_rows = int(batch_rows)
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="dlrm-loadgen-sut", daemon=True)
        self._thread.start()

    def predict(self, indices: Sequence[int]) -> list[np.ndarray]:
        """Probabilities of samples ``indices``, one forward pass; an error reply raises it."""
        from dlrm_serve.io.codecs import BINARY_CONTENT_TYPE
        from dlrm_serve.serve.serving import Request

        requests = [Request(self.qset.bodies[i], BINARY_CONTENT_TYPE) for i in indices]
        replies, _ = self.predictor.handle(requests)
        return [_probabilities(r) for r in replies]

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            items = [item]
            rows = int(self.qset.sizes[item[1]])
            # Take what else is queued, up to batch_rows rows: one forward pass.
            while rows < self.batch_rows:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)
                    break
                items.append(nxt)
                rows += int(self.qset.sizes[nxt[1]])
            indices = [i for _, i in items]
            try:
                probs = self.predict(indices)
                failed = None
            except Exception as e:  # answer the samples empty; the runner fails the run
                probs, failed = [_EMPTY] * len(items), e
            complete([(sid, p) for (sid, _), p in zip(items, probs)])
            self._done(indices, failed)

    def issue(self, samples) -> None:
        for s in samples:
            self._queue.put((s.id, s.index))

    def flush(self) -> None:
        pass

    def throughput(self, seconds: float) -> float:
        """Samples/s of back-to-back batches of ``batch_rows`` rows for about ``seconds``."""
        n, i, t0 = 0, 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds or n == 0:
            batch, rows = [], 0
            while rows < self.batch_rows:
                batch.append(i % len(self.qset))
                rows += int(self.qset.sizes[batch[-1]])
                i += 1
            self.predict(batch)
            n += len(batch)
        return n / (time.perf_counter() - t0)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)


class ClientSUT(_Counters):
    """One binary request per sample through ``client`` (REST or gRPC), ``concurrency`` in flight."""

    def __init__(self, client: Any, qset: QuerySet, concurrency: int = 16):
        super().__init__(qset)
        self.client = client
        self.name = getattr(client.transport, "name", "client")
        self.concurrency = int(concurrency)
        self._pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="dlrm-loadgen")

    def predict(self, index: int) -> np.ndarray:
        from dlrm_serve.client.payloads import Payload

        return self.client.send(Payload(self.qset.bodies[index], "binary", int(self.qset.sizes[index])))

    def _one(self, sid: int, index: int) -> None:
        try:
            probs, failed = self.predict(index), None
        except Exception as e:
            probs, failed = _EMPTY, e
        complete([(sid, probs)])
        self._done([index], failed)

    def issue(self, samples) -> None:
        for s in samples:
            self._pool.submit(self._one, s.id, s.index)

    def flush(self) -> None:
        pass

    def throughput(self, seconds: float) -> float:
        """Samples/s with ``concurrency`` requests in flight for about ``seconds``."""
        t0 = time.perf_counter()
        stop = t0 + seconds
        counts = [0] * self.concurrency

        def worker(k: int) -> None:
            i = k
            while time.perf_counter() < stop or counts[k] == 0:
                self.predict(i % len(self.qset))
                counts[k] += 1
                i += self.concurrency

        list(self._pool.map(worker, range(self.concurrency)))
        return sum(counts) / (time.perf_counter() - t0)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.client.close()


def _probabilities(reply: Any) -> np.ndarray:
    """float32 ``[rows]`` of a Predictor reply; an error reply raises the error it carries."""
    from dlrm_serve.client.payloads import parse_predictions

    if not reply.ok:
        raise RuntimeError(f"the predictor answered {reply.status}: {reply.body}")
    body = reply.body
    if isinstance(body, dict):
        return np.asarray(body["predictions"], dtype=np.float32)
    return parse_predictions(body if isinstance(body, bytes) else body.encode(), None)
