"""From parsed checkpoint tensors to dlrm-serve artifacts (shared by the importers).

An importer (:mod:`~dlrm_serve.model.checkpoints.reference`,
:mod:`~dlrm_serve.model.checkpoints.torchrec`) groups a state dict into
:class:`ModelWeights`, in this package's own layout and order; then
:func:`build_model` fills a :class:`~dlrm_serve.model.dlrm.DLRM` with them and
:func:`write_artifacts` saves and checks ``dlrm.safetensors`` / ``dlrm.json``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

from dlrm_serve.config import CRITEO_DENSE, CRITEO_SPARSE, DENSE_TRANSFORMS, DLRMConfig
from dlrm_serve.errors import ArtifactError
from dlrm_serve.model.dlrm import DLRM
from dlrm_serve.model.weights import check_artifacts, save_artifacts

__all__ = ["ModelWeights", "as_float32", "feature_names", "check_options", "build_model", "write_artifacts"]


@dataclass
class ModelWeights:
    """A checkpoint's tensors, grouped in this package's layout.

    ``tables``: ``[rows_k, D]`` per table; ``pooling``: per table, ``None`` or
    the ``[rows_k]`` learned pooling weights; ``bottom`` / ``top``: one
    ``(weight [out, in], bias [out])`` per Linear layer, in order, the top's
    first layer taking the interaction in this package's order; ``cross``:
    per DCN layer ``(V [r, N], W [N, r], b [N])``, empty for dot and cat.
    """

    tables: list[torch.Tensor]
    bottom: list[tuple[torch.Tensor, torch.Tensor]]
    top: list[tuple[torch.Tensor, torch.Tensor]]
    pooling: list[torch.Tensor | None] = field(default_factory=list)
    cross: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list)

    @property
    def num_dense(self) -> int:
        return int(self.bottom[0][0].shape[1])

    @property
    def embedding_dim(self) -> int:
        return int(self.tables[0].shape[1])

    @property
    def table_sizes(self) -> tuple[int, ...]:
        return tuple(int(t.shape[0]) for t in self.tables)

    @property
    def bottom_widths(self) -> tuple[int, ...]:
        return tuple(int(w.shape[0]) for w, _ in self.bottom)

    @property
    def top_widths(self) -> tuple[int, ...]:
        return tuple(int(w.shape[0]) for w, _ in self.top)

    @property
    def top_input_width(self) -> int:
        return int(self.top[0][0].shape[1])


QUANTIZED_DTYPES = {torch.int8, torch.uint8, torch.qint8, torch.quint8, torch.qint32, torch.quint4x2}
for _name in ("quint2x4", "float8_e4m3fn", "float8_e5m2"):
    if hasattr(torch, _name):
        QUANTIZED_DTYPES.add(getattr(torch, _name))


def as_float32(name: str, t: Any, quantized_hint: str = "quantized checkpoints are not supported") -> torch.Tensor:
    """``t`` as a float32 tensor, or :class:`ArtifactError` naming ``name``."""
    if not isinstance(t, torch.Tensor):
        raise ArtifactError(f"{name} holds a {type(t).__name__}, not a tensor")
    if t.is_quantized or t.dtype in QUANTIZED_DTYPES:
        raise ArtifactError(
            f"{name} is a quantized tensor ({t.dtype}); {quantized_hint}"
        )
    if not t.dtype.is_floating_point:
        raise ArtifactError(f"{name} has dtype {t.dtype}; a float model stores float weights")
    return t if t.dtype == torch.float32 else t.to(torch.float32)


def feature_names(num_dense: int, num_sparse: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Criteo's I1..I13 / C1..C26 for a 13/26 model, else ``dense_1..`` / ``cat_1..``."""
    if num_dense == len(CRITEO_DENSE) and num_sparse == len(CRITEO_SPARSE):
        return CRITEO_DENSE, CRITEO_SPARSE
    return (
        tuple(f"dense_{i}" for i in range(1, num_dense + 1)),
        tuple(f"cat_{i}" for i in range(1, num_sparse + 1)),
    )


def check_options(dense_transform: str, loss_threshold: Any) -> float:
    """The importers' two settings a checkpoint does not record, checked; returns the threshold."""
    if dense_transform not in DENSE_TRANSFORMS:
        raise ArtifactError(f"dense_transform must be one of {list(DENSE_TRANSFORMS)}, got {dense_transform!r}")
    try:
        threshold = float(loss_threshold)
    except (TypeError, ValueError):
        raise ArtifactError(f"loss_threshold must be a number, got {loss_threshold!r}") from None
    if not 0.0 <= threshold < 0.5:
        raise ArtifactError(f"loss_threshold must be in [0, 0.5), got {loss_threshold!r}")
    return threshold


def build_model(weights: ModelWeights, config: DLRMConfig) -> DLRM:
    """A :class:`DLRM` of ``config`` holding ``weights`` (eval mode)."""
    model = DLRM(config, init=False)
    with torch.no_grad():
        table = model.sparse_arch.weight
        start = 0
        for t, w in zip(weights.tables, weights.pooling or [None] * len(weights.tables)):
            rows = table[start : start + t.shape[0]]
            rows.copy_(t)
            if w is not None:
                # sum_i w[id_i] * row[id_i] equals the sum of pre-scaled rows.
                rows.mul_(w.unsqueeze(1))
            start += t.shape[0]
        for mlp, layers in ((model.dense_arch.mlp, weights.bottom), (model.over_arch.mlp, weights.top)):
            for i, (w, b) in enumerate(layers):
                mlp[2 * i].weight.copy_(w)
                mlp[2 * i].bias.copy_(b)
        for l, (v, w, b) in enumerate(weights.cross):
            model.interaction.V[l].weight.copy_(v)
            model.interaction.W[l].weight.copy_(w)
            model.interaction.W[l].bias.copy_(b)
    model.eval()
    return model


def write_artifacts(model: DLRM, out_dir: str | os.PathLike, metrics: dict) -> DLRMConfig:
    """Save ``model`` with ``metrics`` into ``out_dir`` and check what was written."""
    save_artifacts(model, out_dir, metrics=metrics)
    return check_artifacts(out_dir)
