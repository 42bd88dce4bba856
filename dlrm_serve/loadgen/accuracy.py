"""AUC over the query set from LoadGen's own accuracy log (``mlperf_log_accuracy.json``).

Each entry of the log is one answered sample: ``qsl_idx`` (its index in
the query set) and ``data``, the hex of the bytes the SUT returned, here
the sample's float32 probabilities.  The rows' labels come from the
labelled data file the query set was cut from.
"""

from __future__ import annotations

import json
import os

import numpy as np

from dlrm_serve.errors import InvalidInput
from dlrm_serve.loadgen.samples import QuerySet

__all__ = ["read_accuracy_log", "accuracy_auc"]


def read_accuracy_log(path: str | os.PathLike) -> dict[int, np.ndarray]:
    """``qsl_idx -> float32 probabilities`` of every sample in the log (the first answer of each)."""
    with open(path, encoding="utf-8") as fh:
        entries = json.load(fh)
    out: dict[int, np.ndarray] = {}
    for e in entries:
        idx = int(e["qsl_idx"])
        if idx not in out:
            out[idx] = np.frombuffer(bytes.fromhex(e["data"]), dtype="<f4")
    return out


def accuracy_auc(path: str | os.PathLike, qset: QuerySet) -> dict:
    """ROC AUC of the logged answers against the labels: ``{"auc", "samples", "rows"}``.

    Raises :class:`ValueError` when a logged answer has the wrong number of
    probabilities (the SUT failed that sample) or the log is empty.
    """
    from dlrm_serve.offline.evaluation import roc_auc

    answers = read_accuracy_log(path)
    if not answers:
        raise InvalidInput(f"{path} holds no answers: was the run in accuracy mode?")
    labels, scores = [], []
    for idx in sorted(answers):
        want = int(qset.sizes[idx])
        if answers[idx].shape[0] != want:
            raise InvalidInput(f"{path}: sample {idx} was answered with {answers[idx].shape[0]} probabilities, not {want}")
        labels.append(qset.sample_labels(idx))
        scores.append(answers[idx])
    y, s = np.concatenate(labels), np.concatenate(scores)
    return {"auc": roc_auc(y, s), "samples": len(answers), "rows": int(y.shape[0])}
