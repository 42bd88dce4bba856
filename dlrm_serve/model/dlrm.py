"""DLRM as one small module per stage.

Shapes: ``B`` batch size, ``F`` categorical features (tables), ``D``
embedding dim, ``N`` ids in the batch, ``R`` rows of all tables together,
``I`` interaction width.

    dense [B, num_dense] --DenseArch-->        [B, D] --+
                                                          +--InteractionArch--> [B, I] --OverArch--> p [B]
    indices [N], offsets --SparseArch--> [B, F, D] ------+

The tables live in one concatenated ``[R, D]`` tensor with per-table row
offsets (applied by :mod:`dlrm_serve.io.features`), so all lookups are one
gather or one ``embedding_bag`` with no Python loop per table.

For large batches the lookups come stacked as ``[B, 1+F, D]`` with row 0
left free for the dense vector, which saves the interaction a copy of every
looked-up row (``SparseArch(..., lead=1)``); the results are the same.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dlrm_serve.config import DLRMConfig

__all__ = [
    "DenseArch",
    "SparseArch",
    "InteractionArch",
    "OverArch",
    "DLRM",
    "mlp_layers",
    "run_mlp",
    "STACK_MIN_BATCH",
    "cast_for_inference",
]

# Batches from this size on get their lookups stacked (see SparseArch's ``lead``):
# measured on 2 cores, a win at 2048 rows and a loss at 256.
STACK_MIN_BATCH = 512


def mlp_layers(widths: list[int] | tuple[int, ...], in_width: int, last_relu: bool) -> nn.Sequential:
    """Linear layers at even indices, ReLU at odd ones (the reference's layout)."""
    layers: list[nn.Module] = []
    prev = in_width
    for i, w in enumerate(widths):
        lin = nn.Linear(prev, w)
        # The reference's initialisation: N(0, sqrt(2/(fan_in+fan_out))), bias N(0, sqrt(1/fan_out)).
        # Skipped on the meta device (shape checks): meta tensors hold no values, and
        # normal_ there imports torch's compiler stack, seconds in every serving worker.
        if not lin.weight.is_meta:
            with torch.no_grad():
                lin.weight.normal_(0.0, math.sqrt(2.0 / (prev + w)))
                lin.bias.normal_(0.0, math.sqrt(1.0 / w))
        layers.append(lin)
        if i < len(widths) - 1 or last_relu:
            layers.append(nn.ReLU())
        prev = w
    return nn.Sequential(*layers)


def _onednn_ops():
    """oneDNN's fused linear (+ bias, + ReLU) kernel and its weight packer, or Nones.

    None where this torch build lacks them or its oneDNN has no bfloat16
    (then bfloat16 layers fall back to ``addmm``).
    """
    try:
        if torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return torch.ops.mkldnn._linear_pointwise.default, torch.ops.mkldnn._reorder_linear_weight.default
    except (AttributeError, RuntimeError):
        pass
    return None, None


# For bfloat16 weights only (inference: the op has no autograd).  Measured
# against addmm + relu_ in bfloat16: the bias and the ReLU ride in the GEMM
# instead of a bias copy before it and a pass after it; weights packed once
# into oneDNN's layout save a reorder per call, 2x at one row
# (docs/precision.md).  Packed or not, the results are the same bits.
LINEAR_POINTWISE, _REORDER_WEIGHT = _onednn_ops()
# The batch size oneDNN packs the weights for; any batch size runs on them.
PACK_BATCH_HINT = 64


def run_mlp(mlp: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """``mlp(x)`` for a :func:`mlp_layers` stack, minus the per-layer overheads.

    Each Linear is one ``addmm`` (the bias fused into the GEMM) and each
    ReLU runs in place on the fresh ``addmm`` output, which saves a
    full-size allocation and pass per layer.  Autograd-safe, so training
    shares this path: ``addmm`` saves its inputs, never its output.
    bfloat16 layers (inference only) run oneDNN's fused linear + ReLU.
    """
    layers = list(mlp)
    i = 0
    while i < len(layers):
        layer = layers[i]
        if isinstance(layer, nn.Linear):
            relu = i + 1 < len(layers) and isinstance(layers[i + 1], nn.ReLU)
            # The fused op has no backward: explanations (gradients) take addmm in bfloat16.
            fused = LINEAR_POINTWISE is not None and not (torch.is_grad_enabled() and x.requires_grad)
            if layer.weight.dtype == torch.bfloat16 and fused:
                weight = layer.__dict__.get("packed_weight", layer.weight)  # see cast_for_inference
                x = LINEAR_POINTWISE(x, weight, layer.bias, "relu" if relu else "none", [], "")
                i += 2 if relu else 1
                continue
            x = torch.addmm(layer.bias, x, layer.weight.t())
        elif isinstance(layer, nn.ReLU):
            x = x.relu_()
        else:
            x = layer(x)
        i += 1
    return x


class DenseArch(nn.Module):
    """Bottom MLP: dense ``[B, num_dense]`` -> ``[B, D]`` (ReLU after every layer)."""

    def __init__(self, num_dense: int, widths: tuple[int, ...]):
        super().__init__()
        if num_dense <= 0:
            raise ValueError(f"num_dense must be positive, got {num_dense}")
        self.mlp = mlp_layers(widths, num_dense, last_relu=True)

    def forward(self, dense: torch.Tensor) -> torch.Tensor:
        return run_mlp(self.mlp, dense)


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


class OverArch(nn.Module):
    """Top MLP: ``[B, I]`` -> click logits ``[B]`` (ReLU between layers, none after the last)."""

    def __init__(self, in_width: int, widths: tuple[int, ...]):
        super().__init__()
        if widths[-1] != 1:
            raise ValueError(f"the top MLP must end with width 1, got {list(widths)}")
        self.mlp = mlp_layers(widths, in_width, last_relu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_mlp(self.mlp, x).squeeze(1)


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
            if isinstance(layer, nn.Linear) and dtype == torch.bfloat16 and _REORDER_WEIGHT is not None:
                # A plain attribute, not a parameter: state_dict and the weights stay as they were.
                layer.__dict__["packed_weight"] = _REORDER_WEIGHT(layer.weight, PACK_BATCH_HINT)
    sparse = model.sparse_arch
    if tables and sparse.table_dtype == "float32":
        sparse.weight = nn.Parameter(sparse.weight.detach().to(dtype), requires_grad=False)
    return model
