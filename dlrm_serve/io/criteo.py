"""Criteo-format data: a streaming reader, file helpers and error locators.  numpy only.

Criteo TSV: one row per line, ``label``, ``num_dense`` integer fields and
``num_sparse`` hex fields, tab-separated; an empty field is missing.
Unlabelled files (the Criteo test set, scoring input) leave the label out.

:func:`read_criteo` streams files in chunks of text columns (constant
memory, ``.gz`` read on the fly); :func:`encode_chunk` turns a chunk into
model inputs through the shared :class:`~dlrm_serve.io.features.FeatureEncoder`
and names the file line of any bad field.

The synthetic generator that writes the same format lives in
:mod:`dlrm_serve.io.synthetic`.
"""

from __future__ import annotations

import gzip
import io
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence, TextIO

import numpy as np

from dlrm_serve.io.codecs import split_tsv
from dlrm_serve.errors import InvalidInput
from dlrm_serve.io.features import FeatureBatch, FeatureEncoder

__all__ = [
    "detect_format",
    "format_probabilities",
    "CHUNK_ROWS",
    "CriteoChunk",
    "open_text",
    "check_files",
    "count_rows",
    "read_criteo",
    "encode_chunk",
    "at_line",
    "locate",
]

# Rows per chunk when streaming: a few tens of MB of text columns.
CHUNK_ROWS = 65536


# ----- reading ------------------------------------------------------------------
def check_files(paths: Iterable[str | os.PathLike], what: str = "data") -> list[str]:
    """``paths`` as strings, or ``FileNotFoundError`` naming the first that is not a file."""
    out = []
    for p in paths:
        path = Path(p)
        if not path.exists():
            raise FileNotFoundError(f"{what} file {str(p)!r} not found")
        if not path.is_file():
            raise FileNotFoundError(f"{what} path {str(p)!r} is not a file")
        out.append(str(p))
    if not out:
        raise ValueError(f"no {what} files given")
    return out


def open_text(path: str | os.PathLike) -> TextIO:
    """A text stream of ``path``, decompressed on the fly when it ends in ``.gz``.

    Bytes that are not UTF-8 become U+FFFD, so they fail field validation
    with the exact line instead of a decoder error somewhere in a buffer.
    """
    p = str(path)
    if p.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(p, "rb"), encoding="utf-8", errors="replace", newline="\n")
    return open(p, encoding="utf-8", errors="replace", newline="\n")


def detect_format(path: str | os.PathLike) -> str:
    """``json`` (JSON lines) when the first non-blank character of ``path`` is ``{``,
    else ``tsv`` (Criteo).  The one sniffer of ``dlrm-serve score`` and ``predict``."""
    with open_text(path) as fh:
        while True:
            block = fh.read(4096)
            if not block:
                raise InvalidInput(f"{path} is empty: it holds no rows")
            stripped = block.lstrip()
            if stripped:
                return "json" if stripped[0] == "{" else "tsv"


def format_probabilities(probabilities: np.ndarray) -> str:
    """One line per value, ``repr(float(p))``: the shortest text that reads back
    as the same float32 (the output of ``dlrm-serve score`` and ``predict``)."""
    return "".join(f"{p!r}\n" for p in np.asarray(probabilities, dtype=np.float32).tolist())


def _numbered_lines(path: str) -> Iterator[tuple[int, str]]:
    """``(line number, line)`` of a file; a damaged ``.gz`` is an :class:`InvalidInput`."""
    number = 0
    try:
        with open_text(path) as fh:
            for number, line in enumerate(fh, start=1):
                yield number, line
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise InvalidInput(f"{path}, after line {number}: not a readable gzip file ({e})") from None


def _blank(line: str) -> bool:
    return not line.strip("\r\n")


def count_rows(paths: Sequence[str | os.PathLike]) -> int:
    """Number of non-blank lines in ``paths`` (one pass, constant memory)."""
    total = 0
    for p in paths:
        opener = gzip.open if str(p).endswith(".gz") else open
        with opener(p, "rb") as fh:
            for line in fh:
                if line.strip(b"\r\n"):
                    total += 1
    return total


def at_line(err: InvalidInput, path: str, line: int) -> InvalidInput:
    """``err`` (about one row) re-addressed to ``line`` of ``path`` (1-based)."""
    where = f"{path}, line {line}"
    if err.field is not None:
        where += f", field {err.field}"
    out = InvalidInput(f"{where}: {err.reason}")
    # Keep the location for programs, as InvalidInput does for request rows.
    out.row, out.field, out.reason = line, err.field, err.reason
    return out


def locate(err: InvalidInput, path: str, lines: Sequence[int]) -> InvalidInput:
    """An error about row ``err.row`` of a batch read from ``lines`` of ``path``, naming the line."""
    if err.row is None or not 0 <= err.row < len(lines):
        return InvalidInput(f"{path}, lines {int(lines[0])}-{int(lines[-1])}: {err.message}")
    return at_line(err, path, int(lines[err.row]))


@dataclass
class CriteoChunk:
    """Consecutive rows of one file, as text columns.

    - ``labels``: int8 ``[B]``, or ``None`` for unlabelled lines.
    - ``dense``: str ``[B, num_dense]``; ``sparse``: str ``[B, num_sparse]``
      (``""`` = missing).
    - ``path`` and ``lines``: where the rows came from (1-based line numbers).
    - ``start``: index of the first row among all rows read (blank lines not counted).
    """

    labels: np.ndarray | None
    dense: np.ndarray
    sparse: np.ndarray
    path: str
    lines: np.ndarray
    start: int

    def __len__(self) -> int:
        return int(self.dense.shape[0])

    def locate(self, err: InvalidInput) -> InvalidInput:
        """An error about row ``err.row`` of this chunk, naming the file line instead."""
        return locate(err, self.path, self.lines)


def read_criteo(
    paths: Sequence[str | os.PathLike],
    num_dense: int,
    num_sparse: int,
    *,
    chunk_rows: int = CHUNK_ROWS,
    start: int = 0,
    stop: int | None = None,
    labelled: bool | None = None,
) -> Iterator[CriteoChunk]:
    """Chunks of at most ``chunk_rows`` rows of Criteo TSV files, in order.

    Rows ``start:stop`` of all files together are read (blank lines are
    skipped and not counted).  Only one chunk of text is held at a time.
    ``labelled`` = True / False requires 40 / 39-field lines; ``None``
    accepts either, but all lines of one file must agree.  Errors are
    :class:`InvalidInput` naming the file and line.
    """
    if chunk_rows <= 0:
        raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")
    if start < 0 or (stop is not None and stop < start):
        raise ValueError(f"bad row range {start}:{stop}")
    paths = check_files(paths)
    row = 0  # index of the next non-blank line among all files
    for path in paths:
        if stop is not None and row >= stop:
            return
        file_labelled: bool | None = labelled
        texts: list[str] = []
        numbers: list[int] = []
        first = row
        for number, line in _numbered_lines(path):
            if _blank(line):
                continue
            if row < start:
                row += 1
                continue
            if stop is not None and row >= stop:
                break
            if not texts:
                first = row
            texts.append(line)
            numbers.append(number)
            row += 1
            if len(texts) == chunk_rows:
                chunk = _split(texts, numbers, path, first, num_dense, num_sparse, file_labelled)
                file_labelled = chunk.labels is not None
                yield chunk
                texts, numbers = [], []
        if texts:
            yield _split(texts, numbers, path, first, num_dense, num_sparse, file_labelled)


def _split(
    texts: list[str],
    numbers: list[int],
    path: str,
    first: int,
    num_dense: int,
    num_sparse: int,
    labelled: bool | None,
) -> CriteoChunk:
    lines = np.asarray(numbers, dtype=np.int64)
    width = num_dense + num_sparse
    if labelled is not None:
        n0 = len(texts[0].rstrip("\r\n").split("\t"))
        want = width + 1 if labelled else width
        if n0 != want:
            kind = "labelled (label first)" if labelled else "unlabelled"
            raise InvalidInput(
                f"{path}, line {numbers[0]}: has {n0} tab-separated fields but {want} are expected "
                f"({kind}: {num_dense} integer and {num_sparse} categorical fields"
                f"{', after the label' if labelled else ''})"
            )
    try:
        labels, dense, sparse = split_tsv(texts, num_dense, num_sparse, first_row=0)
    except InvalidInput as e:
        chunk = CriteoChunk(None, np.empty((0, num_dense), np.str_), np.empty((0, num_sparse), np.str_), path, lines, first)
        raise chunk.locate(e) from None
    return CriteoChunk(labels, dense, sparse, path, lines, first)


def encode_chunk(encoder: FeatureEncoder, chunk: CriteoChunk) -> FeatureBatch:
    """Model inputs of ``chunk``; bad fields raise :class:`InvalidInput` naming the file line."""
    try:
        return encoder.encode_columns(chunk.dense, chunk.sparse)
    except InvalidInput as e:
        raise chunk.locate(e) from None
