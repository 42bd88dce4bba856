"""Training a DLRM on Criteo TSV files or on synthetic data from a planted model.

Rows go file -> :func:`~dlrm_serve.io.criteo.read_criteo` chunks ->
:class:`~dlrm_serve.io.features.FeatureEncoder` -> :class:`Rows` (dense inputs,
one table row per categorical field, -1 = missing) -> mini-batches.  Small
data sets are held in memory and shuffled as a whole; bigger ones are
streamed chunk by chunk every epoch, shuffled within a chunk, so memory stays
constant whatever the file size.

The table gets sparse gradients and a sparse optimizer (Adagrad), so a step
touches only the rows of its batch and costs the same for the demo tables
and for Criteo-scale ones; the MLPs use Adam.  The same seed, data and
thread count give bit-identical weights.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dlrm_serve.io import criteo, synthetic
from dlrm_serve.artifacts import METRICS_FILE, load_config
from dlrm_serve.model.weights import save_artifacts
from dlrm_serve.config import DLRMConfig, preset
from dlrm_serve.offline.evaluation import log_loss, roc_auc
from dlrm_serve.io.features import FeatureBatch, FeatureEncoder
from dlrm_serve.model.dlrm import DLRM

__all__ = [
    "DEFAULT_ROWS",
    "DEFAULT_EPOCHS",
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_LR",
    "DEFAULT_TABLE_LR",
    "DEFAULT_TABLE_ACCUMULATOR",
    "DEFAULT_THREADS",
    "MEMORY_ROWS",
    "TrainOptions",
    "Rows",
    "rows_from_batch",
    "iter_rows",
    "load_rows",
    "batch_tensors",
    "predict_rows",
    "new_model",
    "explanation_baseline",
    "make_optimizers",
    "train_step",
    "synthetic_data",
    "train",
]

DEFAULT_ROWS = 1_500_000
# One pass: a second one mostly memorises rare values (as DLRM does on Criteo).
DEFAULT_EPOCHS = 1
DEFAULT_BATCH_SIZE = 1024
DEFAULT_LR = 1e-3
DEFAULT_TABLE_LR = 0.05
# Adagrad's starting sum of squared gradients.  Above zero, a table row's first
# steps are small until its gradients add up, so values seen once or twice
# stay near their initial value instead of jumping by the full learning rate.
DEFAULT_TABLE_ACCUMULATOR = 1e-5
# One thread: on a small shared machine a second one mostly waits on the first.
DEFAULT_THREADS = 1
# Training rows up to this count are held in memory; more are streamed.
MEMORY_ROWS = 2_000_000
EVAL_BATCH = 16384
# Optimizers that take sparse gradients: a step costs O(rows touched), not O(table).
TABLE_OPTIMIZERS = ("adagrad",)


@dataclass
class TrainOptions:
    """Everything one training run depends on (the CLI fills it from its flags)."""

    out: str = "artifacts"
    data: list[str] | None = None
    test_data: list[str] | None = None
    preset: str = "demo"
    config: str | None = None
    epochs: int = DEFAULT_EPOCHS
    batch_size: int = DEFAULT_BATCH_SIZE
    lr: float = DEFAULT_LR
    table_lr: float = DEFAULT_TABLE_LR
    table_optimizer: str = "adagrad"
    table_accumulator: float = DEFAULT_TABLE_ACCUMULATOR
    rows: int = DEFAULT_ROWS
    seed: int = 0
    data_dir: str = "data"
    threads: int = DEFAULT_THREADS
    chunk_rows: int = criteo.CHUNK_ROWS
    memory_rows: int = MEMORY_ROWS
    test_fraction: float = 0.1
    progress: bool | None = None  # None: a bar when stderr is a terminal

    def check(self) -> None:
        for name in ("epochs", "batch_size", "rows", "threads", "chunk_rows"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        for name in ("lr", "table_lr"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and v > 0 and np.isfinite(v)):
                raise ValueError(f"{name} must be a positive number, got {v!r}")
        if self.table_optimizer not in TABLE_OPTIMIZERS:
            raise ValueError(f"table_optimizer must be one of {sorted(TABLE_OPTIMIZERS)}, got {self.table_optimizer!r}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction!r}")


# ----- rows in model layout --------------------------------------------------------
@dataclass
class Rows:
    """Encoded rows: ``dense`` float32 ``[B, num_dense]`` (transformed),
    ``ids`` int ``[B, F]`` rows of the concatenated table (-1 = missing),
    ``labels`` int8 ``[B]``."""

    dense: np.ndarray
    ids: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def take(self, index: np.ndarray) -> "Rows":
        return Rows(self.dense[index], self.ids[index], self.labels[index])

    @staticmethod
    def concat(parts: Sequence["Rows"]) -> "Rows":
        if len(parts) == 1:
            return parts[0]
        return Rows(
            np.concatenate([p.dense for p in parts]),
            np.concatenate([p.ids for p in parts]),
            np.concatenate([p.labels for p in parts]),
        )


def _id_dtype(config: DLRMConfig) -> type:
    return np.int32 if config.total_rows < 2**31 else np.int64


def rows_from_batch(batch: FeatureBatch, labels: np.ndarray, config: DLRMConfig) -> Rows:
    """A TSV-decoded :class:`FeatureBatch` (at most one id per field) as :class:`Rows`."""
    b, f = batch.batch_size, config.num_sparse
    dtype = _id_dtype(config)
    if batch.offsets is None:
        ids = batch.indices.reshape(b, f).astype(dtype)
    else:
        lengths = np.diff(batch.offsets)
        if (lengths > 1).any():
            raise ValueError("training rows hold one value per categorical field; got a multi-hot bag")
        ids = np.full(b * f, -1, dtype=dtype)
        ids[lengths == 1] = batch.indices
        ids = ids.reshape(b, f)
    return Rows(batch.dense, ids, np.asarray(labels, dtype=np.int8))


def iter_rows(
    paths: Sequence[str],
    encoder: FeatureEncoder,
    *,
    start: int = 0,
    stop: int | None = None,
    chunk_rows: int = criteo.CHUNK_ROWS,
) -> Iterator[Rows]:
    """Labelled rows ``start:stop`` of ``paths``, chunk by chunk."""
    cfg = encoder.config
    for chunk in criteo.read_criteo(
        paths, cfg.num_dense, cfg.num_sparse, chunk_rows=chunk_rows, start=start, stop=stop, labelled=True
    ):
        yield rows_from_batch(criteo.encode_chunk(encoder, chunk), chunk.labels, cfg)


def load_rows(
    paths: Sequence[str], encoder: FeatureEncoder, *, progress: bool | None = False, total: int | None = None, **kwargs
) -> Rows:
    """All rows of :func:`iter_rows` in memory (``progress``: a bar, None = when on a terminal)."""
    from tqdm import tqdm

    parts = []
    with tqdm(
        total=total, unit="rows", unit_scale=True, desc="read", leave=False,
        disable=None if progress is None else not progress,
    ) as bar:
        for part in iter_rows(paths, encoder, **kwargs):
            parts.append(part)
            bar.update(len(part))
    if not parts:
        raise ValueError(f"no rows in {list(paths)} for the requested range")
    return Rows.concat(parts)


def batch_tensors(dense: np.ndarray, ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Model inputs for rows in :class:`Rows` layout: ``(dense, indices, offsets)``."""
    present = ids >= 0
    if present.all():
        return torch.from_numpy(dense), torch.from_numpy(ids.reshape(-1).astype(np.int64)), None
    offsets = np.zeros(ids.size + 1, dtype=np.int64)
    np.cumsum(present.reshape(-1), out=offsets[1:])
    return torch.from_numpy(dense), torch.from_numpy(ids[present].astype(np.int64)), torch.from_numpy(offsets)


def predict_rows(model: DLRM, parts: Iterator[Rows] | Sequence[Rows], batch: int = EVAL_BATCH) -> tuple[np.ndarray, np.ndarray]:
    """``(probabilities float32, labels int8)`` of all rows of ``parts``."""
    probs, labels = [], []
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for rows in parts:
            for i in range(0, len(rows), batch):
                d, idx, off = batch_tensors(rows.dense[i : i + batch], rows.ids[i : i + batch])
                probs.append(model(d, idx, off).numpy())
            labels.append(rows.labels)
    model.train(was_training)
    if not probs:
        raise ValueError("no rows to predict")
    return np.concatenate(probs), np.concatenate(labels)


# ----- data sources ---------------------------------------------------------------
def synthetic_data(
    data_dir: str | os.PathLike, rows: int, seed: int, config: DLRMConfig, progress: bool | None = None,
    log: Callable[[str], None] = print,
) -> tuple[str, str]:
    """``(tsv, oracle)`` paths of synthetic data in ``data_dir``, generated unless already there."""
    folder = Path(data_dir)
    vocab = list(synthetic.vocab_sizes_for(config))
    stem = f"synthetic-seed{seed}-rows{rows}-f{config.num_dense}x{config.num_sparse}"
    tsv, oracle, manifest = (folder / (stem + ext) for ext in (".tsv", ".oracle.txt", ".json"))
    want = {
        "generator": synthetic.GENERATOR_VERSION, "seed": seed, "rows": rows, "num_dense": config.num_dense,
        "vocab_sizes": vocab, "table_sizes": list(config.table_sizes),
    }
    if manifest.is_file() and tsv.is_file() and oracle.is_file():
        try:
            have = json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            have = None
        if have == want:
            log(f"reusing synthetic data {tsv}")
            return str(tsv), str(oracle)
    folder.mkdir(parents=True, exist_ok=True)
    manifest.unlink(missing_ok=True)
    log(f"generating {rows} synthetic rows into {tsv}")
    synthetic.generate(tsv, rows, seed, config=config, oracle=oracle, progress=progress)
    # Written last: a manifest means the data beside it is complete.
    manifest.write_text(json.dumps(want) + "\n", encoding="utf-8")
    return str(tsv), str(oracle)


def _config(options: TrainOptions) -> DLRMConfig:
    config = load_config(options.config) if options.config else preset(options.preset)
    if config.table_dtype != "float32":
        raise ValueError(
            f"cannot train a model with {config.table_dtype} tables; train float32 and quantise afterwards"
        )
    return config


# ----- training -----------------------------------------------------------------
@dataclass
class _Data:
    """Where training and test rows come from, and how many there are."""

    train_paths: list[str]
    test_paths: list[str]
    train_range: tuple[int, int | None]
    test_range: tuple[int, int | None]
    n_train: int
    n_test: int
    source: str
    oracle_path: str | None
    generate_seconds: float = 0.0


def _locate_data(options: TrainOptions, config: DLRMConfig, log: Callable[[str], None]) -> _Data:
    oracle_path = None
    generate_seconds = 0.0
    if options.data:
        train_paths = criteo.check_files(options.data, "training data")
        source = "files"
    else:
        t0 = time.perf_counter()
        tsv, oracle_path = synthetic_data(options.data_dir, options.rows, options.seed, config, options.progress, log)
        generate_seconds = time.perf_counter() - t0
        train_paths = [tsv]
        source = "synthetic"
    if options.test_data:
        test_paths = criteo.check_files(options.test_data, "test data")
        n_train = criteo.count_rows(train_paths)
        n_test = criteo.count_rows(test_paths)
        if n_train < 1 or n_test < 1:
            raise ValueError(f"need training and test rows, got {n_train} and {n_test}")
        return _Data(train_paths, test_paths, (0, None), (0, None), n_train, n_test, source, None)
    # Hold out the last rows: Criteo files are in time order, and so is serving.
    total = criteo.count_rows(train_paths)
    n_test = int(round(total * options.test_fraction))
    n_train = total - n_test
    if n_test < 1 or n_train < 1:
        raise ValueError(
            f"{total} rows are too few to hold out {options.test_fraction:.0%} for testing; "
            "give more rows or --test-data"
        )
    return _Data(
        train_paths, train_paths, (0, n_train), (n_train, total), n_train, n_test, source, oracle_path, generate_seconds
    )


def _metrics(labels: np.ndarray, probs: np.ndarray) -> tuple[float | None, float]:
    try:
        auc = roc_auc(labels, probs)
    except ValueError:
        auc = None  # a test set with one class has no AUC
    return auc, log_loss(labels, probs)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def train(options: TrainOptions, log: Callable[[str], None] = print) -> dict:
    """Train, evaluate every epoch, write artifacts and ``metrics.json``; return the metrics."""
    options.check()
    t0 = time.perf_counter()
    config = _config(options)
    encoder = FeatureEncoder(config)
    data = _locate_data(options, config, log)
    in_memory = data.n_train <= options.memory_rows
    chunk = options.chunk_rows
    log(
        f"{data.n_train} training rows, {data.n_test} test rows ({'in memory' if in_memory else 'streamed'}), "
        f"{config.total_rows} table rows x {config.embedding_dim}"
    )
    if in_memory:
        train_rows = load_rows(
            data.train_paths, encoder, start=data.train_range[0], stop=data.train_range[1], chunk_rows=chunk,
            progress=options.progress, total=data.n_train,
        )
        test_rows = load_rows(
            data.test_paths, encoder, start=data.test_range[0], stop=data.test_range[1], chunk_rows=chunk,
            progress=options.progress, total=data.n_test,
        )

        def train_parts() -> Iterator[Rows]:
            return iter([train_rows])

        def test_parts() -> Iterator[Rows]:
            return iter([test_rows])
    else:

        def train_parts() -> Iterator[Rows]:
            return iter_rows(data.train_paths, encoder, start=data.train_range[0], stop=data.train_range[1], chunk_rows=chunk)

        def test_parts() -> Iterator[Rows]:
            return iter_rows(data.test_paths, encoder, start=data.test_range[0], stop=data.test_range[1], chunk_rows=chunk)

    data_seconds = time.perf_counter() - t0
    oracle = None
    if data.oracle_path is not None:
        oracle = synthetic.read_oracle(data.oracle_path, data.test_range[0], data.test_range[1])

    old_threads = torch.get_num_threads()
    torch.set_num_threads(options.threads)
    try:
        model, history, oracle_metrics, test_labels = _fit(
            options, config, train_parts, test_parts, data.n_train, oracle, t0, log
        )
    finally:
        torch.set_num_threads(old_threads)

    last = history[-1]
    metrics = {
        "test_auc": last["test_auc"],
        "test_logloss": last["test_logloss"],
        "test_click_rate": float(test_labels.mean()),
        "rows": data.n_train + data.n_test,
        "train_rows": data.n_train,
        "test_rows": data.n_test,
        "epochs": options.epochs,
        "batch_size": options.batch_size,
        "lr": options.lr,
        "table_lr": options.table_lr,
        "table_optimizer": options.table_optimizer,
        "seed": options.seed,
        "threads": options.threads,
        "data": data.source,
        "train_files": data.train_paths,
        "test_files": data.test_paths,
        "in_memory": in_memory,
        "config_name": config.name,
        "table_rows": config.total_rows,
        "generate_seconds": data.generate_seconds,
        "data_seconds": data_seconds,
        "train_seconds": time.perf_counter() - t0 - data_seconds,
        "seconds": time.perf_counter() - t0,
        "torch": torch.__version__,
        "history": history,
    }
    if oracle_metrics is not None:
        metrics["oracle_auc"], metrics["oracle_logloss"] = oracle_metrics
    save_artifacts(model, options.out, metrics, extra=explanation_baseline(model, train_parts()))
    log(
        f"wrote {Path(options.out) / 'dlrm.safetensors'}, dlrm.json and {METRICS_FILE}: "
        f"test AUC {_fmt(metrics['test_auc'])}, logloss {metrics['test_logloss']:.4f}"
        + (f", oracle AUC {_fmt(metrics['oracle_auc'])}" if oracle_metrics else "")
        + f", {metrics['seconds']:.1f} s"
    )
    return metrics


def explanation_baseline(model: DLRM, parts: Iterator[Rows]) -> dict[str, torch.Tensor]:
    """The mean model input over the training rows, stored for explanations (:mod:`dlrm_serve.runtime.explain`)."""
    from dlrm_serve.runtime.explain import BaselineAccumulator

    acc = BaselineAccumulator(model.config)
    for rows in parts:
        acc.add(rows.dense, rows.ids)
    return acc.tensors(model)


def new_model(config: DLRMConfig, seed: int) -> DLRM:
    """A freshly initialised model, set up for sparse table gradients; the same seed gives the same weights."""
    # A private RNG state: deterministic here, and the caller's global state is left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DLRM(config)
    model.sparse_arch.sparse_grad = True
    return model


def make_optimizers(model: DLRM, options: TrainOptions) -> list[torch.optim.Optimizer]:
    """A sparse optimizer for the table (its step touches only the batch's rows) and Adam for the MLPs."""
    table = [model.sparse_arch.weight]
    rest = [p for n, p in model.named_parameters() if n != "sparse_arch.weight"]
    table_opt = torch.optim.Adagrad(table, lr=options.table_lr, initial_accumulator_value=options.table_accumulator)
    return [
        table_opt,
        torch.optim.Adam(rest, lr=options.lr),
    ]


def train_step(model: DLRM, optimizers: Sequence[torch.optim.Optimizer], rows: Rows) -> float:
    """One update on ``rows`` with BCE on the logits; returns the batch's mean loss."""
    d, idx, off = batch_tensors(rows.dense, rows.ids)
    y = torch.from_numpy(rows.labels.astype(np.float32))
    loss = F.binary_cross_entropy_with_logits(model.logits(d, idx, off), y)
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    loss.backward()
    with warnings.catch_warnings():
        # torch's sparse optimizers build COO tensors from valid indices; its note on skipped checks is noise.
        warnings.filterwarnings("ignore", message="Sparse invariant checks")
        for opt in optimizers:
            opt.step()
    return float(loss.detach())


def _fit(
    options: TrainOptions,
    config: DLRMConfig,
    train_parts: Callable[[], Iterator[Rows]],
    test_parts: Callable[[], Iterator[Rows]],
    n_train: int,
    oracle: np.ndarray | None,
    t0: float,
    log: Callable[[str], None],
) -> tuple[DLRM, list[dict], tuple[float | None, float] | None, np.ndarray]:
    """The training loop; returns the model, per-epoch metrics, oracle metrics and test labels."""
    from tqdm import tqdm

    model = new_model(config, options.seed)
    optimizers = make_optimizers(model, options)
    shuffle = np.random.default_rng([options.seed, 3])
    bs = options.batch_size
    history: list[dict] = []
    oracle_metrics = None
    labels = np.zeros(0, dtype=np.int8)
    for epoch in range(1, options.epochs + 1):
        model.train()
        loss_sum, seen = 0.0, 0
        with tqdm(
            total=n_train, unit="rows", unit_scale=True, desc=f"epoch {epoch}/{options.epochs}",
            disable=None if options.progress is None else not options.progress, leave=False,
        ) as bar:
            for part in train_parts():
                order = shuffle.permutation(len(part))
                for i in range(0, len(part), bs):
                    sel = order[i : i + bs]
                    loss = train_step(model, optimizers, part.take(sel))
                    loss_sum += loss * sel.shape[0]
                    seen += sel.shape[0]
                    bar.update(sel.shape[0])
        probs, labels = predict_rows(model, test_parts())
        auc, ll = _metrics(labels, probs)
        if oracle is not None and oracle_metrics is None:
            if oracle.shape[0] != labels.shape[0]:
                raise ValueError(f"the oracle file has {oracle.shape[0]} test rows, the data {labels.shape[0]}")
            oracle_metrics = _metrics(labels, oracle)
        entry = {
            "epoch": epoch,
            "train_logloss": loss_sum / max(seen, 1),
            "test_auc": auc,
            "test_logloss": ll,
            "seconds": time.perf_counter() - t0,
        }
        history.append(entry)
        log(
            f"epoch {epoch}/{options.epochs}: train logloss {entry['train_logloss']:.4f}, "
            f"test logloss {ll:.4f}, test AUC {_fmt(auc)}"
            + (f" (oracle AUC {_fmt(oracle_metrics[0])}, logloss {oracle_metrics[1]:.4f})" if oracle_metrics else "")
            + f", {entry['seconds']:.1f} s"
        )
    model.sparse_arch.sparse_grad = False
    model.eval()
    return model, history, oracle_metrics, labels
