"""Synthetic Criteo data from a planted click model.  numpy only.

:class:`PlantedModel` is a known click model that writes Criteo TSV (see
:mod:`dlrm_serve.io.criteo`): Zipf-distributed categorical values with
per-value effects, low-rank interactions between a few features, dense count
effects through ``log1p``, and a logit scale calibrated so its own AUC (the
best any model can reach) is about 0.80.  Everything is drawn from a seed, so
the same seed gives the same file.  :func:`generate` writes such a file (and,
optionally, the true probability of each row, read back by :func:`read_oracle`).
"""

from __future__ import annotations

import gzip
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from dlrm_serve.artifacts import load_config
from dlrm_serve.config import DEMO_TABLE_SIZES, DLRMConfig, preset
from dlrm_serve.io.criteo import CHUNK_ROWS

__all__ = [
    "GENERATOR_VERSION",
    "PlantedModel",
    "SyntheticRows",
    "vocab_sizes_for",
    "generate",
    "read_oracle",
    "generate_command",
]

# Bumped whenever the generator's output for a seed changes, so cached data is remade.
GENERATOR_VERSION = 1


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
