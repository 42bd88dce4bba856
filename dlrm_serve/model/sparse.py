"""The sparse stage: sum-pooled embedding lookups.

Shapes: ids ``[N]`` (+ bag offsets ``[B*F+1]``) -> pooled ``[B, F, D]``,
or ``[B, lead+F, D]`` with ``lead`` rows per sample left free.

The tables live in one concatenated ``[R, D]`` tensor with per-table row
offsets (applied by :mod:`dlrm_serve.io.features`), so all lookups are one
gather or one ``embedding_bag`` with no Python loop per table.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SparseArch"]


def _stacked_offsets(
    offsets: torch.Tensor | None, indices: torch.Tensor, batch_size: int, lead: int, f: int
) -> torch.Tensor:
    """Bag offsets ``[B*(lead+F)+1]`` with ``lead`` empty bags before each sample's F bags."""
    dtype = indices.dtype
    out = torch.empty(batch_size * (lead + f) + 1, dtype=dtype)
    grid = out[:-1].view(batch_size, lead + f)
    if offsets is None:  # one id per bag: sample b's bags start at b*F, b*F+1, ...
        first = torch.arange(0, batch_size * f, f, dtype=dtype).unsqueeze(1)
        torch.add(first, torch.arange(-lead, f, dtype=dtype).clamp_(min=0), out=grid)
    else:
        starts = offsets[:-1].view(batch_size, f)
        grid[:, lead:] = starts
        grid[:, :lead] = starts[:, :1]
    out[-1] = indices.shape[0]
    return out


class SparseArch(nn.Module):
    """Sum-pooled lookups: ids ``[N]`` (+ bag offsets ``[B*F+1]``) -> ``[B, F, D]``.

    ``offsets=None`` means one id per bag (``N == B*F``), a plain gather.
    With ``lead=k`` the result is ``[B, k+F, D]``: k rows per sample left for
    the caller to fill (zeros), then the F pooled rows.
    With ``table_dtype="int8"`` the table is stored row-wise quantised:
    ``codes`` uint8 ``[R, D]`` and ``scale_bias`` float32 ``[R, 2]``, a row
    being ``codes * scale + bias``.
    """

    def __init__(self, total_rows: int, num_tables: int, dim: int, table_dtype: str = "float32"):
        super().__init__()
        if total_rows <= 0 or num_tables <= 0 or dim <= 0:
            raise ValueError(
                f"SparseArch needs positive sizes, got rows={total_rows} tables={num_tables} dim={dim}"
            )
        self.num_tables = num_tables
        self.dim = dim
        self.table_dtype = table_dtype
        # Sparse gradients keep a training step's cost proportional to the ids it touches.
        self.sparse_grad = False
        if table_dtype == "float32":
            self.weight = nn.Parameter(torch.empty(total_rows, dim))
        elif table_dtype == "int8":
            self.register_buffer("codes", torch.zeros(total_rows, dim, dtype=torch.uint8))
            self.register_buffer("scale_bias", torch.zeros(total_rows, 2))
        else:
            raise ValueError(f"table_dtype must be 'float32' or 'int8', got {table_dtype!r}")

    def init_uniform(self, table_sizes: tuple[int, ...], generator: torch.Generator | None = None) -> None:
        """Reference initialisation: U(-1/sqrt(n), 1/sqrt(n)) for a table of n rows."""
        if self.table_dtype != "float32":
            raise ValueError("only float32 tables are initialised; quantise after training")
        with torch.no_grad():
            start = 0
            for n in table_sizes:
                bound = 1.0 / math.sqrt(n)
                self.weight[start : start + n].uniform_(-bound, bound, generator=generator)
                start += n

    def _rows(self, indices: torch.Tensor) -> torch.Tensor:
        codes = self.codes.index_select(0, indices)
        sb = self.scale_bias.index_select(0, indices)
        return codes.to(torch.float32) * sb[:, :1] + sb[:, 1:]

    def rows(self, indices: torch.Tensor) -> torch.Tensor:
        """Table rows ``[N, D]`` of ids ``[N]`` (dequantised for int8 tables)."""
        if self.table_dtype == "float32":
            return self.weight.index_select(0, indices)
        return self._rows(indices)

    def forward(
        self, indices: torch.Tensor, offsets: torch.Tensor | None, batch_size: int, lead: int = 0
    ) -> torch.Tensor:
        f, d = self.num_tables, self.dim
        if lead < 0:
            raise ValueError(f"lead must be >= 0, got {lead}")
        if lead and self.table_dtype == "float32":
            # Empty bags (pooled to zeros) in front of every sample's F bags give
            # the stacked layout straight from the table, with no copy of the
            # rows; embedding_bag's sum kernel also gathers faster than
            # index_select, and its gradient (sparse or not) is the usual one.
            bags = _stacked_offsets(offsets, indices, batch_size, lead, f)
            pooled = F.embedding_bag(
                indices, self.weight, bags, mode="sum", sparse=self.sparse_grad, include_last_offset=True
            )
            return pooled.view(batch_size, lead + f, d)
        if self.table_dtype == "float32":
            if offsets is None:
                if self.sparse_grad:
                    pooled = F.embedding(indices, self.weight, sparse=True)
                else:
                    pooled = self.weight.index_select(0, indices)
            else:
                pooled = F.embedding_bag(
                    indices, self.weight, offsets, mode="sum", sparse=self.sparse_grad, include_last_offset=True
                )
        else:
            rows = self._rows(indices)
            if offsets is None:
                pooled = rows
            else:
                lengths = offsets[1:] - offsets[:-1]
                bags = torch.repeat_interleave(torch.arange(lengths.shape[0]), lengths)
                pooled = torch.zeros(lengths.shape[0], d, dtype=rows.dtype).index_add_(0, bags, rows)
        pooled = pooled.view(batch_size, f, d)
        if lead:
            pooled = torch.cat([pooled.new_zeros(batch_size, lead, d), pooled], dim=1)
        return pooled
