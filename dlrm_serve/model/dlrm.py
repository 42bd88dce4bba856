"""DLRM as one small module per stage.

Shapes: ``B`` batch size, ``F`` categorical features (tables), ``D``
embedding dim, ``N`` ids in the batch, ``R`` rows of all tables together,
``I`` interaction width.

    dense [B, num_dense] --DenseArch-->        [B, D] --+
                                                          +--InteractionArch--> [B, I] --OverArch--> p [B]
    indices [N], offsets --SparseArch--> [B, F, D] ------+

The stages live in :mod:`~dlrm_serve.model.dense`, :mod:`~dlrm_serve.model.sparse`,
:mod:`~dlrm_serve.model.interaction` and :mod:`~dlrm_serve.model.over`.

For large batches the lookups come stacked as ``[B, 1+F, D]`` with row 0
left free for the dense vector, which saves the interaction a copy of every
looked-up row (``SparseArch(..., lead=1)``); the results are the same.
"""

from __future__ import annotations

import torch
from torch import nn

from dlrm_serve.config import DLRMConfig
from dlrm_serve.model.dense import DenseArch
from dlrm_serve.model.interaction import InteractionArch
from dlrm_serve.model.mlp import pack_for_inference
from dlrm_serve.model.over import OverArch
from dlrm_serve.model.sparse import SparseArch

__all__ = ["DLRM", "STACK_MIN_BATCH", "cast_for_inference"]

# Batches from this size on get their lookups stacked (see SparseArch's ``lead``):
# measured on 2 cores, a win at 2048 rows and a loss at 256.
STACK_MIN_BATCH = 512


class DLRM(nn.Module):
    """The whole model; ``forward`` returns click probabilities ``[B]``."""

    def __init__(self, config: DLRMConfig, init: bool = True):
        """``init=False`` leaves the tables unwritten (for loading weights)."""
        super().__init__()
        self.config = config
        self.dense_arch = DenseArch(config.num_dense, config.bottom_mlp)
        self.sparse_arch = SparseArch(config.total_rows, config.num_sparse, config.embedding_dim, config.table_dtype)
        self.interaction = InteractionArch(
            config.num_sparse, config.embedding_dim, config.interaction, config.self_interaction
        )
        self.over_arch = OverArch(config.interaction_width, config.top_mlp)
        self.loss_threshold = config.loss_threshold
        # What the MLPs compute in: set by cast_for_inference, float32 otherwise.
        self.compute_dtype = torch.float32
        if init and config.table_dtype == "float32":
            self.sparse_arch.init_uniform(config.table_sizes)

    def logits(self, dense: torch.Tensor, indices: torch.Tensor, offsets: torch.Tensor | None = None) -> torch.Tensor:
        b = dense.shape[0]
        # bfloat16 after cast_for_inference; a no-op for float32.
        x = self.dense_arch(dense.to(self.compute_dtype))
        # Stacking pays for its few extra small ops only once the copy it saves is large.
        lead = 1 if b >= STACK_MIN_BATCH else 0
        e = self.sparse_arch(indices, offsets, b, lead=lead)  # [B, lead+F, D]
        return self.over_arch(self.interaction(x, e))

    def head(self, dense: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """Logits ``[B]`` from dense inputs ``[B, num_dense]`` and pooled lookups ``[B, F, D]``.

        The model after the lookup: attributions differentiate this, so
        gradients never reach the tables (:mod:`dlrm_serve.runtime.explain`).
        """
        return self.over_arch(self.interaction(self.dense_arch(dense), pooled))

    def forward(self, dense: torch.Tensor, indices: torch.Tensor, offsets: torch.Tensor | None = None) -> torch.Tensor:
        # Probabilities in float32 whatever the compute dtype (a no-op for float32).
        p = torch.sigmoid(self.logits(dense, indices, offsets).float())
        t = self.loss_threshold
        if 0.0 < t < 1.0:
            p = torch.clamp(p, min=t, max=1.0 - t)
        return p


def cast_for_inference(model: DLRM, dtype: torch.dtype, tables: bool = False) -> DLRM:
    """Cast ``model``'s MLP weights to ``dtype`` once, in place; its float32 tables too with ``tables``.

    Meant for inference in bfloat16: the forward then runs every GEMM and
    the interaction in ``dtype`` and returns float32 probabilities; the
    bfloat16 weights are also packed once into oneDNN's layout.  Tables
    left as they are stay mapped from the weights file (shared by every
    process that serves it); their looked-up rows ``[B, F, D]`` are
    converted in the interaction.  A cast table is a private copy at the
    new width (half the bytes of float32 for bfloat16).  Row-wise int8
    tables keep their float32 scales.  ``torch.float32`` is a no-op.
    """
    if not dtype.is_floating_point:
        raise ValueError(f"cast_for_inference needs a floating dtype, got {dtype}")
    if dtype == torch.float32:
        return model
    model.compute_dtype = dtype
    for arch in (model.dense_arch, model.over_arch):
        arch.to(dtype)
        for layer in arch.mlp:
            if isinstance(layer, nn.Linear):
                pack_for_inference(layer)
    sparse = model.sparse_arch
    if tables and sparse.table_dtype == "float32":
        sparse.weight = nn.Parameter(sparse.weight.detach().to(dtype), requires_grad=False)
    return model
