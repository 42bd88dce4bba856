"""Criteo-format data: a streaming reader and a synthetic generator.  numpy only.

Criteo TSV: one row per line, ``label``, ``num_dense`` integer fields and
``num_sparse`` hex fields, tab-separated; an empty field is missing.
Unlabelled files (the Criteo test set, scoring input) leave the label out.

:func:`read_criteo` streams files in chunks of text columns (constant
memory, ``.gz`` read on the fly); :func:`encode_chunk` turns a chunk into
model inputs through the shared :class:`~dlrm_serve.io.features.FeatureEncoder`
and names the file line of any bad field.

:class:`PlantedModel` is a known click model that writes the same format:
Zipf-distributed categorical values with per-value effects, low-rank
interactions between a few features, dense count effects through ``log1p``,
and a logit scale calibrated so its own AUC (the best any model can reach)
is about 0.80.  Everything is drawn from a seed, so the same seed gives the
same file.
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
from dlrm_serve.config import DEMO_TABLE_SIZES, DLRMConfig, preset
from dlrm_serve.artifacts import load_config
from dlrm_serve.errors import InvalidInput
from dlrm_serve.io.features import FeatureBatch, FeatureEncoder

__all__ = [
    "detect_format",
    "format_probabilities",
    "CHUNK_ROWS",
    "GENERATOR_VERSION",
    "CriteoChunk",
    "open_text",
    "check_files",
    "count_rows",
    "read_criteo",
    "encode_chunk",
    "at_line",
    "locate",
    "PlantedModel",
    "SyntheticRows",
    "vocab_sizes_for",
    "generate",
    "read_oracle",
    "generate_command",
]

# Rows per chunk when streaming: a few tens of MB of text columns.
CHUNK_ROWS = 65536
# Bumped whenever the generator's output for a seed changes, so cached data is remade.
GENERATOR_VERSION = 1


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


# ----- the planted click model --------------------------------------------------
def vocab_sizes_for(config: DLRMConfig) -> tuple[int, ...]:
    """Distinct values per categorical feature: the table size, capped by the demo preset's."""
    return tuple(
        min(int(t), DEMO_TABLE_SIZES[i % len(DEMO_TABLE_SIZES)]) for i, t in enumerate(config.table_sizes)
    )


@dataclass
class SyntheticRows:
    """Rows drawn from a :class:`PlantedModel`.

    ``dense`` float64 ``[B, num_dense]`` raw counts (NaN = missing);
    ``values`` int64 ``[B, num_sparse]`` value ranks (-1 = missing);
    ``probability`` float64 ``[B]`` the true click probability;
    ``labels`` int8 ``[B]`` clicks drawn from it.
    """

    dense: np.ndarray
    values: np.ndarray
    probability: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _expected_auc(p: np.ndarray) -> float:
    """AUC of scoring rows by ``p`` when each row clicks with probability ``p``."""
    p = np.sort(p)
    neg = 1.0 - p
    neg_below = np.cumsum(neg) - neg  # negative mass of rows scored lower
    return float((p * (neg_below + 0.5 * neg)).sum() / (p.sum() * neg.sum()))


class PlantedModel:
    """A click model with known probabilities, shaped like Criteo.

    The logit of a row is ``intercept + scale * raw`` where ``raw`` sums

    - a bias per categorical value (large for frequent values, shrinking
      towards zero for rare ones; some features carry almost none),
    - ``<u_f(v_f), u_g(v_g)>`` for a few pairs of features with rank-4
      latent factors ``u``,
    - ``a_j * (log1p(max(x_j, 0)) - c_j)`` per dense field.

    Value frequencies follow a Zipf law per feature and effects shrink as
    ``1 / (1 + rank / 30)``, so frequent values matter and the long tail
    mostly adds noise, as in real logs.  Each value is written as a fixed
    8-hex-digit code (see :meth:`_draw_codes`).  Missing fields contribute
    nothing (a missing count counts as 0), so the oracle probability is a
    function of what the row shows.  ``scale`` and ``intercept`` are set so
    the oracle AUC is about ``target_auc`` and the click rate about
    ``click_rate``.
    """

    FACTOR_DIM = 4
    PAIR_STD = 0.6

    def __init__(
        self,
        seed: int = 0,
        num_dense: int = 13,
        vocab_sizes: Sequence[int] = DEMO_TABLE_SIZES,
        table_sizes: Sequence[int] | None = None,
        target_auc: float = 0.80,
        click_rate: float = 0.25,
    ):
        if num_dense <= 0 or not vocab_sizes:
            raise ValueError(f"need dense and categorical features, got {num_dense} and {len(vocab_sizes)}")
        table_sizes = tuple(vocab_sizes if table_sizes is None else table_sizes)
        if len(table_sizes) != len(vocab_sizes):
            raise ValueError(f"{len(vocab_sizes)} vocabulary sizes but {len(table_sizes)} table sizes")
        if not 0.5 < target_auc < 1.0 or not 0.0 < click_rate < 1.0:
            raise ValueError(f"target_auc must be in (0.5, 1) and click_rate in (0, 1), got {target_auc}, {click_rate}")
        self.seed = int(seed)
        self.num_dense = int(num_dense)
        self.vocab_sizes = tuple(int(v) for v in vocab_sizes)
        rng = np.random.default_rng([self.seed, 0])
        f_count = len(self.vocab_sizes)

        self.cdf: list[np.ndarray] = []
        self.codes: list[np.ndarray] = []
        self._code_lists: list[list[str]] = []
        self.bias: list[np.ndarray] = []
        self.sparse_missing = np.zeros(f_count)
        for f, v in enumerate(self.vocab_sizes):
            ranks = np.arange(v, dtype=np.float64)
            weight = (ranks + 1.0) ** -rng.uniform(1.05, 1.35)
            cdf = np.cumsum(weight)
            self.cdf.append(cdf / cdf[-1])
            codes = [f"{c:08x}" for c in self._draw_codes(v, int(table_sizes[f]), f)]
            self.codes.append(np.array(codes, dtype=np.str_))
            # The same strings as a list, "" last for a missing value (index -1).
            self._code_lists.append(codes + [""])
            informative = rng.random() < 0.65
            sigma = rng.uniform(0.3, 1.0) if informative else 0.05
            self.bias.append(sigma * rng.standard_normal(v) * self._shrink(ranks))
            if rng.random() < 0.35:
                self.sparse_missing[f] = rng.uniform(0.02, 0.45)

        # Low-rank interactions between a few features (a quarter of them, 2 to 6).
        k = self.FACTOR_DIM
        chosen = rng.choice(f_count, size=min(f_count, 6, max(2, f_count // 4)), replace=False)
        # Components of N(0, s^2) make a dot product of standard deviation PAIR_STD for frequent values.
        s = (self.PAIR_STD**2 / k) ** 0.25
        self.factors: dict[int, np.ndarray] = {}
        for f in chosen:
            v = self.vocab_sizes[f]
            shrink = self._shrink(np.arange(v, dtype=np.float64))
            self.factors[int(f)] = rng.standard_normal((v, k)) * shrink[:, None] * s
        candidates = [(int(a), int(b)) for i, a in enumerate(chosen) for b in chosen[i + 1 :]]
        picked = rng.choice(len(candidates), size=min(5, len(candidates)), replace=False) if candidates else []
        self.pairs = [candidates[i] for i in sorted(picked)]

        # Dense counts: log-normal-ish, some missing; the second field can be negative.
        self.dense_mu = rng.uniform(0.3, 4.0, self.num_dense)
        self.dense_sd = rng.uniform(0.6, 1.5, self.num_dense)
        self.dense_missing = rng.uniform(0.0, 0.4, self.num_dense)
        if self.num_dense > 1:
            self.dense_missing[1] = 0.0
        effect = rng.random(self.num_dense) < 0.6
        self.dense_coef = np.where(effect, rng.normal(0.0, 0.35, self.num_dense), 0.0)
        self.dense_center = np.zeros(self.num_dense)

        self.scale = 1.0
        self.intercept = 0.0
        self._calibrate(target_auc, click_rate)

    def _draw_codes(self, vocab: int, table_size: int, feature: int) -> list[int]:
        """A fixed random 32-bit code per value, as Criteo's hashed hex strings.

        ``code % table_size`` is the table row.  The most frequent values
        (a quarter of the table, at least 100 or the whole table) get rows of
        their own; the rest collide at random, as hashing does, which costs
        little because rare values carry little signal.
        """
        # Its own stream: the codes depend on the table size, the planted effects do not.
        rng = np.random.default_rng([self.seed, 4, feature])
        codes = rng.integers(0, 2**32, size=vocab, dtype=np.uint64).tolist()
        distinct = min(vocab, max(table_size // 4, min(table_size, 100)))
        taken: set[int] = set()
        for i in range(distinct):
            while codes[i] % table_size in taken:
                codes[i] = int(rng.integers(0, 2**32, dtype=np.uint64))
            taken.add(codes[i] % table_size)
        return codes

    @staticmethod
    def _shrink(ranks: np.ndarray) -> np.ndarray:
        # Rare values carry small effects: a model can only learn what it sees often enough.
        return 1.0 / (1.0 + ranks / 30.0)

    # ----- sampling -------------------------------------------------------------
    def _features(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        values = np.empty((n, len(self.vocab_sizes)), dtype=np.int64)
        for f, cdf in enumerate(self.cdf):
            idx = np.searchsorted(cdf, rng.random(n), side="right")
            np.minimum(idx, cdf.shape[0] - 1, out=idx)
            idx[rng.random(n) < self.sparse_missing[f]] = -1
            values[:, f] = idx
        counts = np.floor(np.exp(self.dense_mu + self.dense_sd * rng.standard_normal((n, self.num_dense))))
        np.clip(counts - 1.0, 0.0, _INT_MAX, out=counts)
        if self.num_dense > 1:
            # Like Criteo's I2: a few small negative values.
            neg = rng.random(n) < 0.12
            counts[neg, 1] = -rng.integers(1, 4, size=int(neg.sum()))
        counts[rng.random((n, self.num_dense)) < self.dense_missing] = np.nan
        return counts, values

    def raw_logit(self, dense: np.ndarray, values: np.ndarray) -> np.ndarray:
        """``raw`` for rows of raw counts (NaN = missing) and value ranks (-1 = missing)."""
        n = values.shape[0]
        out = np.zeros(n)
        for f, bias in enumerate(self.bias):
            v = values[:, f]
            out += np.where(v >= 0, bias[np.maximum(v, 0)], 0.0)
        for a, b in self.pairs:
            va, vb = values[:, a], values[:, b]
            both = (va >= 0) & (vb >= 0)
            dot = (self.factors[a][np.maximum(va, 0)] * self.factors[b][np.maximum(vb, 0)]).sum(axis=1)
            out += np.where(both, dot, 0.0)
        x = np.log1p(np.maximum(np.nan_to_num(dense, nan=0.0), 0.0))
        out += (x - self.dense_center) @ self.dense_coef
        return out

    def probability(self, dense: np.ndarray, values: np.ndarray) -> np.ndarray:
        """The true click probability of rows (see :meth:`raw_logit`)."""
        return _sigmoid(self.intercept + self.scale * self.raw_logit(dense, values))

    def sample(self, n: int, rng: np.random.Generator) -> SyntheticRows:
        dense, values = self._features(n, rng)
        p = self.probability(dense, values)
        labels = (rng.random(n) < p).astype(np.int8)
        return SyntheticRows(dense, values, p, labels)

    def _calibrate(self, target_auc: float, click_rate: float, n: int = 20000) -> None:
        rng = np.random.default_rng([self.seed, 1])
        dense, values = self._features(n, rng)
        x = np.log1p(np.maximum(np.nan_to_num(dense, nan=0.0), 0.0))
        self.dense_center = x.mean(axis=0)
        raw = self.raw_logit(dense, values)
        mean = float(raw.mean())
        raw = raw - mean

        def intercept_for(scale: float) -> float:
            lo, hi = -12.0, 12.0
            for _ in range(30):
                mid = 0.5 * (lo + hi)
                if _sigmoid(mid + scale * raw).mean() < click_rate:
                    lo = mid
                else:
                    hi = mid
            return 0.5 * (lo + hi)

        lo, hi = 0.0, 10.0
        for _ in range(30):
            mid = 0.5 * (lo + hi)
            if _expected_auc(_sigmoid(intercept_for(mid) + mid * raw)) < target_auc:
                lo = mid
            else:
                hi = mid
        self.scale = 0.5 * (lo + hi)
        # raw was centred above; fold its mean into the intercept.
        self.intercept = intercept_for(self.scale) - self.scale * mean

    # ----- text -----------------------------------------------------------------
    def lines(self, rows: SyntheticRows, labelled: bool = True) -> list[str]:
        """Criteo TSV lines (with trailing newline) for ``rows``."""
        # Look-up lists of ready-made strings: far faster than numpy text arrays.
        cols: list[list[str]] = []
        if labelled:
            cols.append([_INT_TEXT[int(y) + _INT_BASE] for y in rows.labels.tolist()])
        dense = rows.dense
        missing = np.isnan(dense)
        idx = np.clip(np.where(missing, 0, dense), -3, _INT_MAX).astype(np.int64) + _INT_BASE
        idx[missing] = 0
        for j in range(dense.shape[1]):
            cols.append([_INT_TEXT[i] for i in idx[:, j].tolist()])
        for f, codes in enumerate(self._code_lists):
            v = rows.values[:, f]
            cols.append([codes[i] for i in np.where(v < 0, -1, v).tolist()])
        return ["\t".join(fields) + "\n" for fields in zip(*cols)]


# "" for missing, then the decimal text of -3 .. _INT_MAX (planted counts are capped there).
_INT_MAX = 1 << 16
_INT_BASE = 4
_INT_TEXT = [""] + [str(i) for i in range(-3, _INT_MAX + 1)]


def _open_write(path: str, compress: bool):
    if compress:
        # Level 1: these files are rewritten cheaply; size matters less than time.
        return io.TextIOWrapper(gzip.open(path, "wb", compresslevel=1), encoding="utf-8", newline="\n")
    return open(path, "w", encoding="utf-8", newline="\n")


def generate(
    out: str | os.PathLike,
    rows: int,
    seed: int = 0,
    *,
    config: DLRMConfig | None = None,
    oracle: str | os.PathLike | None = None,
    labelled: bool = True,
    progress: bool | None = None,
) -> PlantedModel:
    """Write ``rows`` synthetic Criteo lines to ``out`` (``.gz`` compresses).

    The feature layout follows ``config`` (the demo preset by default).
    ``oracle``, when given, receives the true click probability of each
    row, one per line.  The same seed and row count give the same files.
    Files are written under a temporary name and renamed when complete.
    """
    if rows <= 0:
        raise ValueError(f"rows must be positive, got {rows}")
    from tqdm import tqdm

    cfg = config or preset("demo")
    model = PlantedModel(seed, cfg.num_dense, vocab_sizes_for(cfg), cfg.table_sizes)
    rng = np.random.default_rng([int(seed), 2])
    out = str(out)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out + ".part"
    tmp_oracle = None if oracle is None else str(oracle) + ".part"
    with _open_write(tmp_out, out.endswith(".gz")) as fh, (open(tmp_oracle, "w") if tmp_oracle else _Null()) as oh:
        with tqdm(total=rows, unit="rows", desc="generate", disable=None if progress is None else not progress) as bar:
            done = 0
            while done < rows:
                # Fixed chunk size, so the random stream does not depend on anything else.
                n = min(CHUNK_ROWS, rows - done)
                batch = model.sample(n, rng)
                fh.writelines(model.lines(batch, labelled))
                if tmp_oracle:
                    oh.write("\n".join(repr(float(p)) for p in batch.probability) + "\n")
                done += n
                bar.update(n)
    os.replace(tmp_out, out)
    if tmp_oracle:
        os.replace(tmp_oracle, str(oracle))
    return model


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def read_oracle(path: str | os.PathLike, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Oracle probabilities ``start:stop`` of a file written by :func:`generate`."""
    out = []
    with open(path, encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            if stop is not None and i >= stop:
                break
            if i >= start:
                out.append(line)
    return np.array(out, dtype=np.float64) if out else np.zeros(0)


def generate_command(args) -> None:
    """``dlrm-serve generate``: write synthetic Criteo TSV (and oracle probabilities)."""
    config = None
    if getattr(args, "config", None):
        config = load_config(args.config)
    model = generate(args.out, args.rows, args.seed, config=config, oracle=args.oracle, labelled=not args.no_label)
    print(
        f"wrote {args.rows} rows to {args.out} (seed {args.seed}, planted logit scale "
        f"{model.scale:.3f}, intercept {model.intercept:.3f})"
        + (f"; oracle probabilities in {args.oracle}" if args.oracle else "")
    )
