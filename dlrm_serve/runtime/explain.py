"""Per-feature explanations of click probabilities, with Captum.

The model is split at the lookup (:meth:`~dlrm_serve.model.dlrm.DLRM.head`): the
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

This module is what a worker needs; the offline tools (``dlrm-serve
explain``, ``--global``, ``dlrm-serve baseline``, the planted-truth check)
are in :mod:`dlrm_serve.offline.explain_tools`.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from dlrm_serve.errors import InvalidInput, Unsupported

__all__ = [
    "METHODS",
    "DEFAULT_METHOD",
    "N_STEPS",
    "EXPLAIN_MAX_ROWS",
    "BaselineAccumulator",
    "Explainer",
    "parse_method",
    "explainer_for",
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
            raise InvalidInput("no rows were added: the baseline is a mean over training rows")
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
    from dlrm_serve.artifacts import load_weights

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
            raise Unsupported(
                f"the {getattr(backend, 'name', type(backend).__name__)} backend cannot explain: explanations "
                "need the torch model's gradients; send them to an archive built with "
                "`./build_mar.sh --backend torch` (the default dlrm.mar, model name dlrm)"
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
                # A feature already at its missing value (the 0.0 baseline) changes nothing when
                # ablated: exactly 0 by construction, not by two forwards happening to round alike.
                a_dense = torch.where(dense == 0, torch.zeros_like(a_dense), a_dense)
                per_sparse = torch.where((pooled == 0).all(dim=2), torch.zeros_like(per_sparse), per_sparse)
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
