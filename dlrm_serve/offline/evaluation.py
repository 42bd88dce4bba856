"""Offline metrics for click models: ROC AUC and log-loss.  numpy only.

AUC is computed as the Mann-Whitney rank statistic: rank all scores
(tied scores share their average rank), then

    AUC = (sum of the positives' ranks - P(P+1)/2) / (P * N)

for ``P`` positives and ``N`` negatives.  A tie between a positive and a
negative therefore counts one half, as in the trapezoidal ROC area.
"""

from __future__ import annotations

import numpy as np

from dlrm_serve.errors import InvalidInput

__all__ = ["roc_auc", "log_loss", "average_ranks"]


def _labels_and_scores(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels)
    s = np.asarray(scores, dtype=np.float64)
    if y.ndim != 1 or s.ndim != 1:
        raise InvalidInput(f"labels and scores must be 1-d, got shapes {list(y.shape)} and {list(s.shape)}")
    if y.shape[0] != s.shape[0]:
        raise InvalidInput(f"got {y.shape[0]} labels but {s.shape[0]} scores")
    if y.shape[0] == 0:
        raise InvalidInput("no rows to evaluate")
    if y.dtype == np.bool_:
        y = y.astype(np.int8)
    bad = (y != 0) & (y != 1)
    if bad.any():
        raise InvalidInput(f"labels must be 0 or 1, got {y[int(np.argmax(bad))]!r}")
    if np.isnan(s).any():
        raise InvalidInput(f"score at position {int(np.argmax(np.isnan(s)))} is NaN")
    return y.astype(np.int8), s


def average_ranks(values) -> np.ndarray:
    """1-based ranks of ``values`` in ascending order; tied values share their mean rank."""
    v = np.asarray(values, dtype=np.float64)
    n = v.shape[0]
    order = np.argsort(v, kind="stable")
    sorted_v = v[order]
    # Start index of each run of equal values in sorted order.
    new_run = np.empty(n, dtype=bool)
    new_run[:1] = True
    new_run[1:] = sorted_v[1:] != sorted_v[:-1]
    starts = np.flatnonzero(new_run)
    ends = np.append(starts[1:], n)  # exclusive
    # Ranks start+1 .. end share their mean, (start + 1 + end) / 2.
    run_rank = (starts + 1 + ends) / 2.0
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = np.repeat(run_rank, ends - starts)
    return ranks


def roc_auc(labels, scores) -> float:
    """Area under the ROC curve of ``scores`` for binary ``labels`` (ties count 1/2)."""
    y, s = _labels_and_scores(labels, scores)
    pos = int(y.sum())
    neg = y.shape[0] - pos
    if pos == 0 or neg == 0:
        raise InvalidInput(
            f"AUC needs both classes; got {pos} positives and {neg} negatives"
        )
    rank_sum = float(average_ranks(s)[y == 1].sum())
    return (rank_sum - pos * (pos + 1) / 2.0) / (pos * neg)


def log_loss(labels, probabilities, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy, natural log; probabilities clipped to [eps, 1-eps]."""
    y, p = _labels_and_scores(labels, probabilities)
    if ((p < 0) | (p > 1)).any():
        k = int(np.argmax((p < 0) | (p > 1)))
        raise InvalidInput(f"probability at position {k} is {p[k]!r}, outside [0, 1]")
    p = np.clip(p, eps, 1.0 - eps)
    return float(-np.mean(np.where(y == 1, np.log(p), np.log1p(-p))))
