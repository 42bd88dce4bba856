"""Stream a file of any size through the server: ``dlrm-serve predict``.

Input: Criteo TSV (labelled or not, ``.gz`` read on the fly) or JSON lines
(one instance per line), told apart by the first non-blank character.
Output: one probability per line, in input order, as ``repr(float(p))``
(the format of ``dlrm-serve score``), written to ``OUT.part`` and renamed
when every row is scored.

The reading stays in the calling thread; building each request body and
the call itself run on the client's pool, ``concurrency`` requests in flight.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from dlrm_serve.io.codecs import encode_binary
from dlrm_serve.io.criteo import at_line, check_files, detect_format, format_probabilities, open_text, read_criteo
from dlrm_serve.errors import DLRMServeError, InvalidInput, UsageError
from dlrm_serve.client import payloads
from dlrm_serve.client.core import Client
from dlrm_serve.client.payloads import Payload

__all__ = ["PredictStats", "predict_file"]

_INSTANCE = re.compile(r"^instance (\d+)(.*)$", re.S)


@dataclass
class PredictStats:
    rows: int
    requests: int
    seconds: float
    retries: int
    input_kind: str
    payload: str

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else float("inf")


@dataclass
class _Lines:
    texts: list[str]
    numbers: list[int]


def _line_groups(path: str, size: int) -> Iterator[_Lines]:
    texts: list[str] = []
    numbers: list[int] = []
    with open_text(path) as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip("\r\n").strip():
                continue
            texts.append(line)
            numbers.append(number)
            if len(texts) == size:
                yield _Lines(texts, numbers)
                texts, numbers = [], []
    if texts:
        yield _Lines(texts, numbers)


def _relocate(err: DLRMServeError, path: str, numbers: list[int] | np.ndarray) -> DLRMServeError:
    """A server's error about ``instance i`` of a request, naming the file line instead."""
    if not isinstance(err, InvalidInput):
        return err
    m = _INSTANCE.match(err.message)
    if m and int(m.group(1)) < len(numbers):
        out = InvalidInput(f"{path}, line {int(numbers[int(m.group(1))])}{m.group(2)}")
    else:
        out = InvalidInput(f"{path}, lines {int(numbers[0])}-{int(numbers[-1])}: {err.message}")
    out.status = err.status
    return out


def _jsonl_instances(group: _Lines, path: str) -> list[Any]:
    out = []
    for text, number in zip(group.texts, group.numbers):
        try:
            out.append(json.loads(text))
        except ValueError as e:
            raise InvalidInput(f"{path}, line {number}: not a JSON instance ({e})") from None
        if not isinstance(out[-1], dict):
            raise InvalidInput(f"{path}, line {number}: a JSON line must hold one instance (an object)")
    return out


def _jobs(client: Client, path: str, kind: str, fmt: str) -> tuple[Iterator[Callable[[], Payload]], list]:
    """Request builders for the file, and the line numbers of each (for errors)."""
    where: list = []
    size = client.rows_per_request
    enc = client.encoder

    if kind == "tsv" and fmt == "binary":
        def chunk_jobs():
            for chunk in read_criteo([path], enc.num_dense, enc.num_sparse, chunk_rows=size):
                where.append(chunk.lines)

                def make(chunk=chunk) -> Payload:
                    try:
                        raw = enc.raw_columns(chunk.dense, chunk.sparse)
                    except InvalidInput as e:
                        raise chunk.locate(e) from None
                    return Payload(encode_binary(raw), "binary", len(chunk))

                yield make

        return chunk_jobs(), where

    def group_jobs():
        for group in _line_groups(path, size):
            where.append(group.numbers)

            def make(group=group) -> Payload:
                if kind == "json":
                    rows, rows_kind = _jsonl_instances(group, path), "instances"
                else:
                    rows, rows_kind = group.texts, "lines"
                try:
                    return payloads.encode_rows(rows, rows_kind, fmt, enc)
                except InvalidInput as e:
                    if e.row is not None and e.row < len(group.numbers):
                        raise at_line(e, path, group.numbers[e.row]) from None
                    raise

            yield make

    return group_jobs(), where


def predict_file(
    client: Client,
    input_path: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    payload: str | None = None,
    progress: bool = True,
) -> PredictStats:
    """Score every row of ``input_path`` through ``client``; write ``out_path``."""
    path = check_files([input_path], "input")[0]
    kind = detect_format(path)
    fmt = payload or client.payload or payloads.default_format("instances" if kind == "json" else "lines", client.config)
    if fmt == "binary" and client.encoder is None:
        raise UsageError("the binary payload needs the model's config: pass --config ARTIFACTS_DIR (or dlrm.json)")
    if fmt == "tsv" and kind == "json":
        raise UsageError("a JSON-lines file cannot be sent as tsv; use --payload json or binary")
    jobs, where = _jobs(client, path, kind, fmt)

    def on_error(index: int, err: DLRMServeError) -> DLRMServeError:
        return _relocate(err, path, where[index]) if index < len(where) else err

    from tqdm import tqdm

    out = Path(out_path)
    part = out.with_name(out.name + ".part")
    start_requests, start_retries = client.stats["requests"], client.stats["retries"]
    rows = 0
    requests = 0
    t0 = time.perf_counter()
    bar = tqdm(unit="rows", unit_scale=True, file=sys.stderr, disable=not progress, desc="predict", dynamic_ncols=True)
    try:
        with open(part, "w", encoding="utf-8") as fh:
            for probs in client.predict_stream(jobs, on_error=on_error):
                fh.write(format_probabilities(probs))
                rows += len(probs)
                requests += 1
                bar.update(len(probs))
        os.replace(part, out)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    return PredictStats(
        rows=rows,
        requests=requests,
        seconds=seconds,
        retries=client.stats["retries"] - start_retries,
        input_kind=kind,
        payload=fmt,
    )
