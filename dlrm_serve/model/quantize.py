"""Row-wise int8 tables and randomly initialised artifacts of any preset.

Row-wise int8 keeps, per table row, 8-bit codes plus a float32 scale and
bias (``row = codes * scale + bias``), so a row's error is at most half its
scale and table memory drops to ``(D + 8) / (4 D)`` of fp32 (0.375 at D=16).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from tqdm import tqdm

from dlrm_serve.artifacts import EXTRA_PREFIX
from dlrm_serve.model.weights import load_model, load_weights, save_artifacts
from dlrm_serve.config import DLRMConfig
from dlrm_serve.model.dlrm import DLRM

__all__ = ["quantize_rows", "dequantize_rows", "quantize_model", "quantize_artifacts", "init_artifacts"]

# Rows per step: bounds the temporary memory of quantising a multi-GB table.
_CHUNK = 1 << 20


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float ``[R, D]`` -> (uint8 codes ``[R, D]``, float32 scale_bias ``[R, 2]``)."""
    if weight.dim() != 2:
        raise ValueError(f"expected a [rows, dim] table, got shape {list(weight.shape)}")
    w = weight.detach().to(torch.float32)
    lo = w.min(dim=1).values
    hi = w.max(dim=1).values
    scale = (hi - lo) / 255.0
    # A constant row has scale 0: any code decodes to its value.
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round((w - lo[:, None]) / safe[:, None]).clamp_(0, 255).to(torch.uint8)
    return codes, torch.stack([scale, lo], dim=1)


def dequantize_rows(codes: torch.Tensor, scale_bias: torch.Tensor) -> torch.Tensor:
    return codes.to(torch.float32) * scale_bias[:, :1] + scale_bias[:, 1:]


def quantize_model(model: DLRM, progress: bool = False) -> DLRM:
    """A copy of ``model`` with row-wise int8 tables; the MLPs are shared, unchanged."""
    if model.config.table_dtype != "float32":
        raise ValueError(f"the model's tables are already {model.config.table_dtype}")
    config = model.config.replace(table_dtype="int8", onnx_opset=None)
    out = DLRM(config, init=False)  # unwritten buffers: replaced below, never touched
    weight = model.sparse_arch.weight
    rows = weight.shape[0]
    codes = torch.empty(rows, config.embedding_dim, dtype=torch.uint8)
    scale_bias = torch.empty(rows, 2, dtype=torch.float32)
    steps = range(0, rows, _CHUNK)
    for start in tqdm(steps, desc="quantising rows", unit="chunk", disable=not progress):
        c, sb = quantize_rows(weight[start : start + _CHUNK])
        codes[start : start + c.shape[0]] = c
        scale_bias[start : start + c.shape[0]] = sb
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("sparse_arch.")}
    state["sparse_arch.codes"] = codes
    state["sparse_arch.scale_bias"] = scale_bias
    out.load_state_dict(state, strict=True, assign=True)
    return out.eval()


def quantize_artifacts(src: str | os.PathLike, dst: str | os.PathLike, progress: bool = True) -> DLRMConfig:
    """Write the row-wise int8 version of the artifacts in ``src`` to ``dst``."""
    if Path(src).resolve() == Path(dst).resolve():
        raise ValueError(f"write the int8 artifacts to another folder than {src}")
    model = quantize_model(load_model(src), progress=progress)
    # The explanation baseline (if any) carries over unchanged.
    extra = {k: v for k, v in load_weights(src).items() if k.startswith(EXTRA_PREFIX)}
    save_artifacts(model, dst, extra=extra)
    return model.config


def init_artifacts(config: DLRMConfig, out_dir: str | os.PathLike, seed: int = 0) -> DLRMConfig:
    """Randomly initialised artifacts for ``config`` (any table size that fits in memory)."""
    torch.manual_seed(seed)
    float_config = config.replace(table_dtype="float32")
    model = DLRM(float_config)
    if config.table_dtype == "int8":
        model = quantize_model(model)
    save_artifacts(model, out_dir)
    return model.config
