"""The query set: users of 100-700 rows each, as binary requests, with their labels.

MLPerf's DLRMv2 benchmark aggregates Criteo rows into users: one query
sample is one user, whose row count follows a distribution between 100
and 700 with a mean of about 270.  The reference ships that distribution as
a quantile file drawn from its data; we do not copy it.  The documented
stand-in here is::

    rows = clip(100 + round(Gamma(shape=2, scale=85)), 100, 700)

a right-skewed law with mode 185, mean 269.3 (the clip at 700 removes
0.7 % of the mass) and median about 243, drawn with a fixed seed so every
run sends the same users.

Each sample's rows are consecutive rows of a labelled Criteo TSV (by
default synthetic rows of the planted click model, :func:`dlrm_serve.io.data.generate`),
encoded once, before the run, with the client library's binary encoder, so
that timing covers serving, not encoding.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dlrm_serve.config import DLRMConfig
from dlrm_serve.errors import UsageError
from dlrm_serve.io.features import FeatureEncoder

__all__ = ["MIN_ROWS", "MAX_ROWS", "sample_sizes", "QuerySet", "build_query_set", "synthetic_data"]

MIN_ROWS = 100
MAX_ROWS = 700
_SHAPE, _SCALE = 2.0, 85.0


def sample_sizes(count: int, seed: int = 0) -> np.ndarray:
    """int64 ``[count]`` rows per user, drawn from the stand-in law above."""
    if count <= 0:
        raise UsageError(f"the query set needs at least one sample, got {count}")
    rng = np.random.default_rng([int(seed), 18])
    sizes = MIN_ROWS + np.rint(rng.gamma(_SHAPE, _SCALE, size=count))
    return np.clip(sizes, MIN_ROWS, MAX_ROWS).astype(np.int64)


@dataclass
class QuerySet:
    """The samples LoadGen may ask for, by index.

    - ``bodies``: one binary request body (``application/x-dlrm``) per sample;
    - ``sizes``: int64 ``[S]`` rows per sample; ``starts``: int64 ``[S]`` first row of each;
    - ``labels``: int8 ``[sum(sizes)]`` the clicks of all rows, or None for an unlabelled file;
    - ``source``: the data file the rows came from.
    """

    bodies: list[bytes]
    sizes: np.ndarray
    starts: np.ndarray
    labels: np.ndarray | None
    source: str

    def __len__(self) -> int:
        return len(self.bodies)

    @property
    def rows(self) -> int:
        return int(self.sizes.sum())

    def sample_labels(self, index: int) -> np.ndarray:
        if self.labels is None:
            raise UsageError(f"{self.source} has no labels: --accuracy needs a labelled data file")
        s = int(self.starts[index])
        return self.labels[s : s + int(self.sizes[index])]


def synthetic_data(config: DLRMConfig, rows: int, folder: str | os.PathLike, seed: int = 0) -> Path:
    """A labelled planted-model TSV of ``rows`` rows for ``config`` in ``folder`` (reused when present)."""
    from dlrm_serve.io.data import generate

    path = Path(folder) / f"loadgen-data-{config.num_dense}x{config.num_sparse}-{rows}-seed{seed}.tsv"
    if not path.exists():
        generate(path, rows, seed, config=config, labelled=True)
    return path


def build_query_set(
    config: DLRMConfig, data: str | os.PathLike, count: int, seed: int = 0, encoder: FeatureEncoder | None = None
) -> QuerySet:
    """``count`` users cut from the first rows of ``data`` (a Criteo TSV), encoded as binary requests.

    Raises :class:`ValueError` when the file holds fewer rows than the users need.
    """
    from dlrm_serve.client.payloads import encode_rows
    from dlrm_serve.io.data import read_criteo

    sizes = sample_sizes(count, seed)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    need = int(sizes.sum())
    encoder = encoder or FeatureEncoder(config)
    dense_parts, sparse_parts, label_parts = [], [], []
    got = 0
    for chunk in read_criteo([data], config.num_dense, config.num_sparse, stop=need):
        dense_parts.append(chunk.dense)
        sparse_parts.append(chunk.sparse)
        label_parts.append(chunk.labels)
        got += len(chunk)
    if got < need:
        raise UsageError(f"{data} holds {got} rows; {count} users need {need} (use a bigger file or fewer samples)")
    dense = np.concatenate(dense_parts)
    sparse = np.concatenate(sparse_parts)
    labels = None if any(l is None for l in label_parts) else np.concatenate(label_parts).astype(np.int8)
    bodies = []
    for s, n in zip(starts.tolist(), sizes.tolist()):
        payload = encode_rows((dense[s : s + n], sparse[s : s + n]), "arrays", "binary", encoder, first_row=s)
        bodies.append(payload.body)
    return QuerySet(bodies, sizes, starts, labels, str(data))
