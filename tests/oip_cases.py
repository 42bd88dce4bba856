"""Rows of conftest.Rows as OIP tensors, for the OIP and KServe tests."""

from __future__ import annotations

import numpy as np


def dense_of(instances) -> np.ndarray:
    """float32 [B, 13]; a missing count is NaN."""
    return np.array([[np.nan if v is None else v for v in inst["dense"]] for inst in instances], dtype=np.float32)


def dense_zero_for_missing(instances) -> np.ndarray:
    """float32 [B, 13]; a missing count is 0 (the model reads missing as 0)."""
    return np.nan_to_num(dense_of(instances), nan=0.0)


def hex_of(instances) -> np.ndarray:
    """object [B, 26] of str; a missing value is ""."""
    return np.array([["" if v is None else v for v in inst["sparse"]] for inst in instances], dtype=object)


def row_ids_of(instances, encoder) -> np.ndarray:
    """int64 [B, 26] local row ids, hashed as the server hashes them; a missing value is -1."""
    raw = encoder.raw_instances(instances)
    out = np.full(raw.batch_size * encoder.num_sparse, -1, dtype=np.int64)
    present = np.ones(out.shape[0], dtype=bool) if raw.lengths is None else raw.lengths == 1
    out[present] = raw.ids
    return out.reshape(raw.batch_size, encoder.num_sparse)


def oip_json(instances, *, ids=None, rid="r1") -> dict:
    """An OIP REST body with JSON data (null for a missing count)."""
    b = len(instances)
    dense = [[None if v is None else float(v) for v in inst["dense"]] for inst in instances]
    if ids is None:
        sparse = {"name": "sparse", "datatype": "BYTES", "shape": [b, 26], "data": hex_of(instances).tolist()}
    else:
        sparse = {"name": "sparse", "datatype": "INT64", "shape": [b, 26], "data": ids.reshape(-1).tolist()}
    return {"id": rid, "inputs": [{"name": "dense", "datatype": "FP32", "shape": [b, 13], "data": dense}, sparse]}
