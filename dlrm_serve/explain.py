"""Per-feature explanations of click probabilities, with Captum.

The model is split at the lookup (:meth:`~dlrm_serve.model.DLRM.head`): the
explained inputs are the transformed dense values ``[B, num_dense]`` and the
pooled embeddings ``[B, F, D]``, so gradients never reach the tables and a
multi-hot bag is explained as one pooled vector.  Attributions are on the
logit scale and come back as one number per feature (``I1``..``I13``,
``C1``..``C26``; a categorical feature's value is summed over ``D``).

Methods:

- ``integrated_gradients`` (default): :class:`captum.attr.IntegratedGradients`
  from the stored baseline (below) to the row, Gauss-Legendre with
  :data:`N_STEPS` points.  ``sum(attributions) = logit(prediction) -
  logit(baseline)`` up to ``delta``, which each explanation reports.
- ``feature_ablation``: :class:`captum.attr.FeatureAblation`, each feature
  set alone to its missing value (dense 0 after the transform, the empty bag
  for a categorical feature); ``baseline`` is then the all-missing row, and
  ``delta`` what the one-at-a-time effects leave unexplained (interactions).

Baseline ("no information"): the mean of the model's inputs at the split
over the training rows, i.e. each dense value at its training mean after
the transform and each categorical feature at its frequency-weighted mean
pooled embedding (a missing value counting as the empty bag).  Training
computes it (:class:`BaselineAccumulator`) and stores it in
``dlrm.safetensors`` as ``explain.dense_baseline`` / ``explain.sparse_baseline``
so every route uses the same one.  Artifacts without it (imported
checkpoints, ``dlrm-serve init``) fall back to the all-missing row.

Only the torch backend explains; ONNX Runtime has no gradients here, and an
explain request to it gets a 400 naming the archive that can.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from .errors import DLRMServeError, InvalidInput

__all__ = [
    "METHODS",
    "DEFAULT_METHOD",
    "N_STEPS",
    "EXPLAIN_MAX_ROWS",
    "BaselineAccumulator",
    "Explainer",
    "parse_method",
    "explainer_for",
    "global_importance",
    "explain_file",
    "explain_command",
    "write_baseline",
    "baseline_command",
    "spearman",
    "planted_effects",
    "planted_rows",
    "planted_check",
]

logger = logging.getLogger(__name__)

METHODS = ("integrated_gradients", "feature_ablation")
DEFAULT_METHOD = "integrated_gradients"
# Gauss-Legendre points of Integrated Gradients.  Measured by bench/bench_explain.py
# on the trained demo model: the smallest count with |delta| < 0.01 (logit) for 95% of rows.
N_STEPS = 40
# Most rows one explain request may carry: a row costs N_STEPS forward and backward
# passes, and explanations share the worker with predictions.
EXPLAIN_MAX_ROWS = 256

DENSE_KEY = "explain.dense_baseline"
SPARSE_KEY = "explain.sparse_baseline"


def parse_method(value: Any) -> str:
    """A ``method`` input (str or bytes, None = default) as one of :data:`METHODS`."""
    if value is None:
        return DEFAULT_METHOD
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode("utf-8", "replace")
    text = str(value).strip().lower()
    if text in ("", "ig"):
        return DEFAULT_METHOD
    if text == "ablation":
        return "feature_ablation"
    if text not in METHODS:
        raise InvalidInput(f"unknown explanation method {str(value)[:40]!r}; choose one of {list(METHODS)}")
    return text


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.asarray(p, dtype=np.float64)
    return np.log(p) - np.log1p(-p)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, dtype=np.float64)))


# ----- the baseline -----------------------------------------------------------------
class BaselineAccumulator:
    """The mean model input at the split, over rows added chunk by chunk.

    ``add(dense, indices)``: transformed dense values ``[B, num_dense]`` and
    the rows' table ids ``[N]`` (any bag layout; missing values add nothing).
    :meth:`tensors` turns the id counts into the frequency-weighted mean
    pooled embedding per feature, ``[F, D]``.
    """

    def __init__(self, config):
        self.config = config
        self.rows = 0
        self.dense_sum = np.zeros(config.num_dense, dtype=np.float64)
        self.counts = np.zeros(config.total_rows, dtype=np.int32)

    def add(self, dense: np.ndarray, indices: np.ndarray) -> None:
        self.rows += int(dense.shape[0])
        self.dense_sum += np.asarray(dense, dtype=np.float64).sum(axis=0)
        ids, n = np.unique(np.asarray(indices).reshape(-1), return_counts=True)
        ids, n = ids[ids >= 0], n[ids >= 0]
        self.counts[ids] += n.astype(np.int32)

    def tensors(self, model) -> dict:
        """``{explain.dense_baseline: [num_dense], explain.sparse_baseline: [F, D]}`` (float32)."""
        import torch

        if self.rows == 0:
            raise ValueError("no rows were added: the baseline is a mean over training rows")
        cfg = self.config
        ids = np.nonzero(self.counts)[0]
        table = np.searchsorted(np.asarray(cfg.table_offsets[1:], dtype=np.int64), ids, side="right")
        sparse = torch.zeros(cfg.num_sparse, cfg.embedding_dim, dtype=torch.float64)
        with torch.no_grad():
            for start in range(0, ids.shape[0], 1 << 20):  # bounded temporary memory
                part = torch.from_numpy(ids[start : start + (1 << 20)].astype(np.int64))
                rows = model.sparse_arch.rows(part).to(torch.float64)
                weights = torch.from_numpy(self.counts[part.numpy()].astype(np.float64))[:, None]
                sparse.index_add_(0, torch.from_numpy(table[start : start + (1 << 20)]), rows * weights)
        return {
            DENSE_KEY: torch.from_numpy(self.dense_sum / self.rows).to(torch.float32),
            SPARSE_KEY: (sparse / self.rows).to(torch.float32),
        }


def _stored_baseline(artifacts_dir: str | os.PathLike, config) -> tuple[np.ndarray, np.ndarray, str]:
    """``(dense [num_dense], sparse [F, D], source)`` from the artifacts, or the all-missing fallback."""
    from .artifacts import load_weights

    tensors = load_weights(artifacts_dir)
    if DENSE_KEY in tensors and SPARSE_KEY in tensors:
        return tensors[DENSE_KEY].numpy().copy(), tensors[SPARSE_KEY].numpy().copy(), "artifacts"
    dense = np.zeros(config.num_dense, dtype=np.float32)  # a missing count, after either transform
    return dense, np.zeros((config.num_sparse, config.embedding_dim), dtype=np.float32), "all-missing fallback"


# ----- explaining ------------------------------------------------------------------
class Explainer:
    """Explains rows with the model of a torch backend (fp32 or int8 tables).

    ``predictions`` come from ``backend.predict`` itself, so they equal what
    ``/predictions`` answers for the same row.
    """

    def __init__(self, backend, n_steps: int = N_STEPS, max_rows: int = EXPLAIN_MAX_ROWS):
        model = getattr(backend, "model", None)
        if model is None or not hasattr(model, "head"):
            raise DLRMServeError(
                f"the {getattr(backend, 'name', type(backend).__name__)} backend cannot explain: explanations "
                "need the torch model's gradients; send them to an archive built with "
                "`./build_mar.sh --backend torch` (the default dlrm.mar, model name dlrm)",
                status=400,
            )
        import torch

        self._torch = torch
        self.backend = backend
        self.model = model
        self.config = backend.config
        self.n_steps = int(n_steps)
        self.max_rows = int(max_rows)
        self.names = list(self.config.dense_names) + list(self.config.sparse_names)
        dense, sparse, self.baseline_source = _stored_baseline(backend.artifacts_dir, self.config)
        if self.baseline_source != "artifacts":
            logger.warning("%s holds no explanation baseline: using the all-missing row", backend.artifacts_dir)
        self._dtype = next(model.dense_arch.parameters()).dtype  # float32, or what the backend runs in
        self.baseline_dense = torch.from_numpy(dense).unsqueeze(0)  # [1, num_dense]
        self.baseline_sparse = torch.from_numpy(sparse).unsqueeze(0)  # [1, F, D]
        self._ig = self._ablation = None
        self.baseline_logit = float(self._logits(self.baseline_dense, self.baseline_sparse)[0])
        zeros = (torch.zeros_like(self.baseline_dense), torch.zeros_like(self.baseline_sparse))
        self.missing_logit = float(self._logits(*zeros)[0])

    def _forward(self, dense, pooled):
        # The head in the model's own dtype; logits come back as float32 [B].
        return self.model.head(dense.to(self._dtype), pooled.to(self._dtype)).float()

    def _logits(self, dense, pooled):
        with self._torch.no_grad():
            return self._forward(dense, pooled)

    def inputs(self, batch) -> tuple:
        """The explained inputs of a :class:`FeatureBatch`: dense ``[B, num_dense]``, pooled ``[B, F, D]``."""
        torch = self._torch
        b = batch.batch_size
        offsets = None if batch.offsets is None else torch.from_numpy(batch.offsets)
        with torch.no_grad():
            pooled = self.model.sparse_arch(torch.from_numpy(batch.indices), offsets, b, lead=0)
        return torch.from_numpy(batch.dense).float().clone(), pooled.float().clone()

    def check_rows(self, batch) -> None:
        if batch.batch_size > self.max_rows:
            raise InvalidInput(
                f"the explain request holds {batch.batch_size} rows; at most {self.max_rows} are explained per "
                f"request (each row costs {self.n_steps} forward and backward passes): split the input"
            )

    def attribute(self, batch, method: str = DEFAULT_METHOD) -> tuple[np.ndarray, np.ndarray]:
        """``(attributions float64 [B, num_dense + F], reference logit float64 [B])``."""
        torch = self._torch
        # Gradients even when a caller runs under inference_mode (which enable_grad cannot lift).
        with torch.inference_mode(False), torch.enable_grad():
            dense, pooled = self.inputs(batch)
            nd, f = dense.shape[1], pooled.shape[1]
            if method == "integrated_gradients":
                if self._ig is None:
                    from captum.attr import IntegratedGradients

                    self._ig = IntegratedGradients(self._forward)
                a_dense, a_sparse = self._ig.attribute(
                    (dense, pooled), baselines=(self.baseline_dense.clone(), self.baseline_sparse.clone()),
                    n_steps=self.n_steps, method="gausslegendre",
                )
                ref = self.baseline_logit
                per_sparse = a_sparse.sum(dim=2)
            elif method == "feature_ablation":
                if self._ablation is None:
                    from captum.attr import FeatureAblation

                    self._ablation = FeatureAblation(self._forward)
                mask_dense = torch.arange(nd).unsqueeze(0)
                mask_sparse = (nd + torch.arange(f)).view(1, f, 1).expand(1, f, pooled.shape[2])
                a_dense, a_sparse = self._ablation.attribute(
                    (dense, pooled), baselines=(0.0, 0.0), feature_mask=(mask_dense, mask_sparse),
                    perturbations_per_eval=nd + f,
                )
                ref = self.missing_logit
                # Every element of a group carries the group's whole effect: take one.
                per_sparse = a_sparse[:, :, 0]
            else:
                raise InvalidInput(f"unknown explanation method {method!r}; choose one of {list(METHODS)}")
        attrs = torch.cat([a_dense.detach(), per_sparse.detach()], dim=1).double().numpy()
        return attrs, np.full(batch.batch_size, ref)

    def explain(self, batch, method: str = DEFAULT_METHOD) -> list[dict]:
        """One explanation per row of ``batch`` (a :class:`FeatureBatch`), in order."""
        self.check_rows(batch)
        probs = np.asarray(self.backend.predict(batch), dtype=np.float32)
        attrs, ref = self.attribute(batch, method)
        base = _sigmoid(ref).astype(np.float32)
        delta = attrs.sum(axis=1) - (_logit(probs) - _logit(base))
        out = []
        for i in range(batch.batch_size):
            out.append({
                "prediction": float(probs[i]),
                "baseline": float(base[i]),
                "method": method,
                "delta": float(delta[i]),
                "attributions": dict(zip(self.names, attrs[i].tolist())),
            })
        return out

    def answer(self, batch, method: Any = None) -> dict:
        """The body of an explain reply: ``{"explanations": [...]}``."""
        return {"explanations": self.explain(batch, parse_method(method))}


def explainer_for(backend, **options) -> Explainer:
    """An :class:`Explainer` for ``backend``; a backend without the torch model raises a 400."""
    return Explainer(backend, **options)


# ----- global importance and the command line ------------------------------------------
def global_importance(explanations: Sequence[dict]) -> list[tuple[str, float]]:
    """``(feature, mean |attribution|)`` over ``explanations``, largest first."""
    if not explanations:
        raise ValueError("no explanations to summarise")
    names = list(explanations[0]["attributions"])
    values = np.array([[e["attributions"][n] for n in names] for e in explanations], dtype=np.float64)
    mean = np.abs(values).mean(axis=0)
    order = np.argsort(-mean, kind="stable")
    return [(names[i], float(mean[i])) for i in order]


def importance_table(importance: Sequence[tuple[str, float]], rows: int, method: str) -> str:
    """A markdown table of :func:`global_importance`."""
    lines = [
        f"Mean |attribution| (logit) over {rows} rows, {method}",
        "",
        "| rank | feature | mean abs attribution |",
        "|---:|---|---:|",
    ]
    lines += [f"| {i} | {name} | {value:.4f} |" for i, (name, value) in enumerate(importance, start=1)]
    return "\n".join(lines) + "\n"


def importance_chart(importance: Sequence[tuple[str, float]], path: str | os.PathLike, title: str) -> Path:
    """A horizontal bar chart PNG of :func:`global_importance` (largest on top)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, _ in importance][::-1]
    values = [v for _, v in importance][::-1]
    fig, ax = plt.subplots(figsize=(6, 0.18 * len(names) + 1.2), dpi=80)
    ax.barh(names, values, color=["#3b75af" if n.startswith("I") else "#e07b39" for n in names])
    ax.set_xlabel("mean |attribution| (logit)")
    ax.set_title(title, fontsize=10)
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def explain_file(
    artifacts: str | os.PathLike,
    input_path: str | os.PathLike,
    *,
    method: str = DEFAULT_METHOD,
    limit: int | None = None,
    batch_rows: int = EXPLAIN_MAX_ROWS,
) -> Iterable[dict]:
    """Explanations of the rows of a Criteo TSV or JSON-lines file (the ``score`` formats), in order."""
    from .backends import load_backend
    from .features import FeatureEncoder
    from .score import iter_batches

    explainer = explainer_for(load_backend(artifacts, "torch"))
    method = parse_method(method)
    done = 0
    for batch in iter_batches(input_path, FeatureEncoder(explainer.config), min(batch_rows, explainer.max_rows)):
        if limit is not None and done + batch.batch_size > limit:
            batch = batch.slice(0, limit - done, explainer.config.num_sparse)
        yield from explainer.explain(batch, method)
        done += batch.batch_size
        if limit is not None and done >= limit:
            return


def write_baseline(artifacts: str | os.PathLike, data_path: str | os.PathLike, rows: int | None = None) -> int:
    """Compute the baseline over (the first ``rows``) rows of a data file and store it in the artifacts.

    For artifacts made without training data here (imported checkpoints,
    ``dlrm-serve init``).  ``dlrm.safetensors`` is rewritten (atomically)
    with the two baseline tensors added; returns the number of rows used.
    """
    from .artifacts import load_model, load_weights, save_artifacts
    from .features import FeatureEncoder
    from .score import iter_batches

    model = load_model(artifacts)
    acc = BaselineAccumulator(model.config)
    for batch in iter_batches(data_path, FeatureEncoder(model.config), 65536):
        if rows is not None and acc.rows + batch.batch_size > rows:
            batch = batch.slice(0, rows - acc.rows, model.config.num_sparse)
        acc.add(batch.dense, batch.indices)
        if rows is not None and acc.rows >= rows:
            break
    extra = acc.tensors(model)
    # Keep any other stored extras; the model's own tensors are rewritten unchanged.
    kept = {k: v for k, v in load_weights(artifacts).items() if k.startswith("explain.") and k not in extra}
    save_artifacts(model, artifacts, extra={**kept, **extra})
    return acc.rows


def baseline_command(args) -> None:
    """``dlrm-serve baseline``: store the explanation baseline of a data file in the artifacts."""
    n = write_baseline(args.artifacts, args.data, args.rows)
    print(f"stored the explanation baseline of {n} rows in {args.artifacts} (re-export ONNX graphs if any: "
          "`dlrm-serve export-onnx --if-needed`)")


def explain_command(args) -> None:
    """``dlrm-serve explain``: JSON lines of explanations, or with ``--global N`` a table and chart."""
    out = Path(args.out)
    if args.global_rows is not None:
        if args.global_rows <= 0:
            raise ValueError(f"--global needs a positive row count, got {args.global_rows}")
        explanations = list(explain_file(args.artifacts, args.input, method=args.method, limit=args.global_rows))
        method = parse_method(args.method)
        importance = global_importance(explanations)
        out.write_text(importance_table(importance, len(explanations), method), encoding="utf-8")
        chart = Path(args.chart) if args.chart else out.with_suffix(".png")
        importance_chart(importance, chart, f"{len(explanations)} rows, {method}")
        print(f"wrote the mean |attribution| of {len(explanations)} rows to {out} and {chart}")
        return
    tmp = out.with_name(out.name + ".part")
    rows = 0
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as fh:
            for e in explain_file(args.artifacts, args.input, method=args.method):
                fh.write(json.dumps(e, separators=(",", ":")) + "\n")
                rows += 1
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    print(f"wrote {rows} explanations to {out}")


# ----- validation against a planted model ----------------------------------------------
def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties), numpy only."""
    from .evaluation import average_ranks

    ra = average_ranks(np.asarray(a, dtype=np.float64))
    rb = average_ranks(np.asarray(b, dtype=np.float64))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = float(np.sqrt((ra**2).sum() * (rb**2).sum()))
    return float((ra * rb).sum() / denom) if denom > 0 else 0.0


def planted_effects(planted, dense: np.ndarray, values: np.ndarray, references: int = 64, seed: int = 0) -> np.ndarray:
    """Each feature's real effect in a :class:`~dlrm_serve.data.PlantedModel`: float64 ``[num_dense + F]``.

    The mean over the rows (raw counts ``dense`` with NaN = missing, value
    ranks ``values`` with -1 = missing) of ``|logit(row) - E[logit(row with
    the feature drawn from other rows)]|`` on the planted logit scale: what
    the feature moves the true logit away from its average, the counterpart
    of attributions from the mean-input baseline.  ``references`` rows stand
    for the feature's distribution.
    """
    n = values.shape[0]
    rng = np.random.default_rng(seed)
    ref = rng.choice(n, size=min(references, n), replace=False)
    k = ref.shape[0]
    base = planted.raw_logit(dense, values)
    out = []
    for j in range(dense.shape[1] + values.shape[1]):
        d = np.repeat(dense, k, axis=0)
        v = np.repeat(values, k, axis=0)
        if j < dense.shape[1]:
            d[:, j] = np.tile(dense[ref, j], n)
        else:
            v[:, j - dense.shape[1]] = np.tile(values[ref, j - dense.shape[1]], n)
        mean_swapped = planted.raw_logit(d, v).reshape(n, k).mean(axis=1)
        out.append(float(np.abs(base - mean_swapped).mean()) * planted.scale)
    return np.asarray(out)


def planted_rows(config, seed: int, rows: int, sample_seed: int = 99) -> tuple:
    """``(planted model, its rows, their FeatureBatch)``: fresh rows of the planted model behind
    synthetic training data of ``config`` and ``seed`` (``dlrm-serve train --seed``), held out by
    construction (drawn from their own random stream)."""
    from .codecs import decode_tsv
    from .data import PlantedModel, vocab_sizes_for
    from .features import FeatureEncoder

    planted = PlantedModel(seed, config.num_dense, vocab_sizes_for(config), config.table_sizes)
    sample = planted.sample(rows, np.random.default_rng([seed, sample_seed]))
    batch = decode_tsv("".join(planted.lines(sample, labelled=False)), FeatureEncoder(config), max_rows=rows)
    return planted, sample, batch


def planted_check(explainer: "Explainer", seed: int, rows: int = 2000, method: str = DEFAULT_METHOD) -> dict:
    """Explain fresh rows of the planted model behind the training data, compare with its truth.

    Returns the features, the model's mean |attribution| per feature, the
    planted effects (:func:`planted_effects`), their Spearman correlation,
    the |delta| of every row, and the features without a planted effect
    (under 5% of the largest) with their rank by mean |attribution| (1 = top).
    """
    cfg = explainer.config
    planted, sample, batch = planted_rows(cfg, seed, rows)
    attrs, deltas = [], []
    for start in range(0, rows, explainer.max_rows):
        part = batch.slice(start, min(rows, start + explainer.max_rows), cfg.num_sparse)
        for e in explainer.explain(part, parse_method(method)):
            attrs.append([e["attributions"][n] for n in explainer.names])
            deltas.append(e["delta"])
    importance = np.abs(np.asarray(attrs)).mean(axis=0)
    truth = planted_effects(planted, sample.dense, sample.values)
    rank = np.empty(len(importance), dtype=np.int64)
    rank[np.argsort(-importance, kind="stable")] = np.arange(1, len(importance) + 1)
    null = [i for i in range(len(truth)) if truth[i] < 0.05 * truth.max()]
    return {
        "features": explainer.names,
        "importance": importance.tolist(),
        "truth": truth.tolist(),
        "spearman": spearman(importance, truth),
        "abs_delta": np.abs(np.asarray(deltas)).tolist(),
        "null_features": {explainer.names[i]: int(rank[i]) for i in null},
        "baseline_source": explainer.baseline_source,
    }
