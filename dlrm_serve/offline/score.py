"""Offline scoring: a Criteo TSV or JSON-lines file -> one probability per line.

Input (``.gz`` read on the fly), detected from its first non-blank character:

- ``{``: JSON lines, one instance per line, ``{"dense": [...], "sparse": [...]}``
  or fields by name, as the server accepts them;
- anything else: Criteo TSV, labelled (40 fields) or not (39).

Output: one probability per input row, in order, written as
``repr(float(p))`` of the float32 value so that reading it back gives the
exact float32 the model produced (server answers can be compared with it
exactly).  Errors name the line of the input file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator


from dlrm_serve.runtime.backends import load_backend
from dlrm_serve.io.criteo import CHUNK_ROWS, check_files, detect_format, encode_chunk, format_probabilities, locate, open_text, read_criteo
from dlrm_serve.errors import InvalidInput, UsageError
from dlrm_serve.io.features import FeatureBatch, FeatureEncoder

# detect_format and format_probabilities live in dlrm_serve.io.criteo (shared with `dlrm-serve predict`).
__all__ = ["detect_format", "iter_batches", "format_probabilities", "score_file"]


def _json_batches(path: str, encoder: FeatureEncoder, batch_rows: int) -> Iterator[FeatureBatch]:
    instances: list = []
    lines: list[int] = []

    def flush() -> FeatureBatch:
        try:
            return encoder.encode_instances(instances)
        except InvalidInput as e:
            raise locate(e, path, lines) from None

    with open_text(path) as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise InvalidInput(f"{path}, line {number}: invalid JSON: {e.msg} at column {e.colno}") from None
            if not isinstance(obj, dict):
                raise InvalidInput(
                    f"{path}, line {number}: each line must hold one JSON object (an instance), "
                    f"got {type(obj).__name__}"
                )
            instances.append(obj)
            lines.append(number)
            if len(instances) == batch_rows:
                yield flush()
                instances, lines = [], []
    if instances:
        yield flush()


def iter_batches(
    path: str | os.PathLike, encoder: FeatureEncoder, batch_rows: int = CHUNK_ROWS, fmt: str | None = None
) -> Iterator[FeatureBatch]:
    """Model inputs of the rows of ``path``, ``batch_rows`` at a time, in order."""
    if batch_rows <= 0:
        raise UsageError(f"batch_rows must be positive, got {batch_rows}")
    path = check_files([path], "input")[0]
    fmt = fmt or detect_format(path)
    if fmt == "json":
        yield from _json_batches(path, encoder, batch_rows)
    elif fmt == "tsv":
        cfg = encoder.config
        for chunk in read_criteo([path], cfg.num_dense, cfg.num_sparse, chunk_rows=batch_rows):
            yield encode_chunk(encoder, chunk)
    else:
        raise UsageError(f"unknown input format {fmt!r}; use 'json' or 'tsv'")


def score_file(
    artifacts: str | os.PathLike,
    input_path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    backend: str = "torch",
    precision: str = "fp32",
    batch_rows: int = 4096,
    progress: bool | None = None,
) -> int:
    """Score ``input_path`` with the model in ``artifacts``; returns the number of rows.

    ``out`` is written under a temporary name and renamed when complete, so a
    failed run leaves no half-written file behind.  ``precision``: as for
    :func:`~dlrm_serve.runtime.backends.load_backend` (``fp32``, ``bf16`` or ``auto``).
    """
    from tqdm import tqdm

    model = load_backend(artifacts, kind=backend, precision=precision)
    encoder = FeatureEncoder(model.config)
    out = Path(out)
    tmp = out.with_name(out.name + ".part")
    rows = 0
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as fh, tqdm(
            unit="rows", unit_scale=True, desc="score", disable=None if progress is None else not progress
        ) as bar:
            for batch in iter_batches(input_path, encoder, batch_rows):
                fh.write(format_probabilities(model.predict(batch)))
                rows += batch.batch_size
                bar.update(batch.batch_size)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return rows
