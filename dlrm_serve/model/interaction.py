"""The interaction stage: dense ``[B, D]`` and pooled ``[B, F, D]`` -> ``[B, I]``.

:class:`InteractionArch` is the dot (or cat) interaction of the 2019 DLRM.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["InteractionArch"]


class InteractionArch(nn.Module):
    """Feature interaction: dense ``[B, D]`` and sparse ``[B, F, D]`` -> ``[B, I]``.

    ``sparse`` may also come stacked, ``[B, 1+F, D]`` with row 0 free
    (``SparseArch(..., lead=1)``): the dense vector is then written into
    row 0 in place instead of being concatenated with a copy of ``sparse``.

    ``dot``: the bottom output followed by the pairwise dot products of the
    F+1 vectors, lower triangle in the reference's order (row i, then
    column j < i, or j <= i with self-interaction).  ``cat``: all F+1
    vectors concatenated.
    """

    def __init__(self, num_tables: int, dim: int, op: str = "dot", self_interaction: bool = False):
        super().__init__()
        if op not in ("dot", "cat"):
            raise ValueError(f"interaction must be 'dot' or 'cat', got {op!r}")
        self.op = op
        self.num_tables = num_tables
        n = num_tables + 1
        extra = 1 if self_interaction else 0
        flat = [i * n + j for i in range(n) for j in range(i + extra)]
        self.register_buffer("pairs", torch.tensor(flat, dtype=torch.long), persistent=False)

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        b = dense.shape[0]
        rows = sparse.shape[1]
        # Rows of float32 or int8 tables under bfloat16 MLPs; a no-op when the dtypes agree.
        sparse = sparse.to(dense.dtype)
        if rows == self.num_tables + 1:
            t = sparse
            t[:, 0] = dense
        elif rows == self.num_tables:
            t = torch.cat([dense.unsqueeze(1), sparse], dim=1)
        else:
            raise ValueError(
                f"sparse has {rows} rows per sample; expected {self.num_tables} (F) or "
                f"{self.num_tables + 1} (stacked, row 0 free)"
            )
        # t: [B, F+1, D]
        if self.op == "cat":
            return t.reshape(b, -1)
        z = torch.bmm(t, t.transpose(1, 2))  # [B, F+1, F+1]
        # gather with a broadcast index: the same values as index_select along
        # dim 1, measured 1.7x faster in float32 and 5x in bfloat16.
        lower = torch.gather(z.reshape(b, -1), 1, self.pairs.expand(b, -1))
        return torch.cat([dense, lower], dim=1)
