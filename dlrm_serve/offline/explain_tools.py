"""Offline explanation tools: ``dlrm-serve explain`` (and ``--global N``),
``dlrm-serve baseline``, and the check against the synthetic data's planted truth.

They use the same :class:`~dlrm_serve.runtime.explain.Explainer` as the servers; they
live apart so TorchServe archives ship only what a worker runs.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from dlrm_serve.errors import InvalidInput
from dlrm_serve.runtime.explain import DEFAULT_METHOD, EXPLAIN_MAX_ROWS, BaselineAccumulator, Explainer, explainer_for, parse_method

__all__ = [
    "global_importance",
    "importance_table",
    "importance_chart",
    "explain_file",
    "write_baseline",
    "spearman",
    "planted_effects",
    "planted_rows",
    "planted_check",
]

logger = logging.getLogger(__name__)


# ----- global importance and the command line ------------------------------------------
def global_importance(explanations: Sequence[dict]) -> list[tuple[str, float]]:
    """``(feature, mean |attribution|)`` over ``explanations``, largest first."""
    if not explanations:
        raise InvalidInput("no explanations to summarise")
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
    from dlrm_serve.runtime.backends import load_backend
    from dlrm_serve.io.features import FeatureEncoder
    from dlrm_serve.offline.score import iter_batches

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
    from dlrm_serve.artifacts import load_model, load_weights, save_artifacts
    from dlrm_serve.io.features import FeatureEncoder
    from dlrm_serve.offline.score import iter_batches

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


# ----- validation against a planted model ----------------------------------------------
def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties), numpy only."""
    from dlrm_serve.offline.evaluation import average_ranks

    ra = average_ranks(np.asarray(a, dtype=np.float64))
    rb = average_ranks(np.asarray(b, dtype=np.float64))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = float(np.sqrt((ra**2).sum() * (rb**2).sum()))
    return float((ra * rb).sum() / denom) if denom > 0 else 0.0


def planted_effects(planted, dense: np.ndarray, values: np.ndarray, references: int = 64, seed: int = 0) -> np.ndarray:
    """Each feature's real effect in a :class:`~dlrm_serve.io.synthetic.PlantedModel`: float64 ``[num_dense + F]``.

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
    from dlrm_serve.io.codecs import decode_tsv
    from dlrm_serve.io.synthetic import PlantedModel, vocab_sizes_for
    from dlrm_serve.io.features import FeatureEncoder

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
