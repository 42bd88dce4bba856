"""Import checkpoints written by facebookresearch/dlrm (``--save-model``).

The reference saves ``torch.save({... "state_dict": DLRM_Net.state_dict(),
...})`` where the state dict holds

- ``emb_l.K.weight``: table ``K`` (an ``nn.EmbeddingBag``, sum pooling),
- ``bot_l.I.weight`` / ``bias`` and ``top_l.I.weight`` / ``bias``: the MLPs,
  ``nn.Sequential`` with Linear layers at even ``I`` and activations between,
- ``v_W_l.K`` only with ``--weighted-pooling learned``: per-row pooling
  weights, folded into the rows here (``sum w_i * row_i`` is a sum of
  pre-scaled rows), so the served model needs no weights of its own.

Everything a :class:`~dlrm_serve.config.DLRMConfig` needs follows from the
shapes, except the interaction, which follows from the width of the first top
layer, and two settings the checkpoint does not record (the dense transform
and the loss threshold), which the caller passes.  The file is read by
:func:`~dlrm_serve.model.checkpoints.safe_load.load_checkpoint` (weights only).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping

import torch

from dlrm_serve.config import DLRMConfig
from dlrm_serve.errors import ArtifactError
from dlrm_serve.model.checkpoints.convert import (
    ModelWeights,
    as_float32,
    build_model,
    check_options,
    feature_names,
    write_artifacts,
)
from dlrm_serve.model.checkpoints.safe_load import load_checkpoint, plain_number

__all__ = [
    "parse_state_dict",
    "interaction_candidates",
    "infer_interaction",
    "reference_config",
    "import_checkpoint",
]

_SUPPORTED = "only checkpoints written by facebookresearch/dlrm's --save-model are supported"
_QUANTIZED_HINT = (
    "quantized reference models (--quantize-emb-with-bit, --quantize-mlp-with-bit) are not supported: "
    "import the float checkpoint"
)

# Numeric entries next to the state dict that are worth keeping in metrics.json.
_METRIC_KEYS = (
    "epoch", "nepochs", "nbatches", "nbatches_test", "iter", "train_acc", "train_loss",
    "test_acc", "test_loss", "test_auc", "total_loss", "total_accu",
)


_KEY = re.compile(r"^(?:module\.)?(emb_l_q|emb_l|bot_l|top_l|v_W_l)\.(module\.)?(.+)$")


def _state_dict_of(obj: Any) -> Mapping[str, Any]:
    """The ``state_dict`` inside a --save-model dict, or ``obj`` itself if it is one."""
    if not isinstance(obj, Mapping):
        raise ArtifactError(
            f"the checkpoint holds a {type(obj).__name__}, not a dict; {_SUPPORTED}"
        )
    if "state_dict" in obj:
        sd = obj["state_dict"]
        if not isinstance(sd, Mapping):
            raise ArtifactError(f"the checkpoint's 'state_dict' is a {type(sd).__name__}, not a dict")
        return sd
    if any(isinstance(k, str) and _KEY.match(k) for k in obj):
        return obj
    shown = sorted(str(k) for k in obj)[:12]
    raise ArtifactError(
        f"the checkpoint has no 'state_dict' entry and is not a reference DLRM state dict "
        f"(its keys: {shown}); {_SUPPORTED}"
    )


def _mlp(name: str, layers: dict[int, dict[str, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if not layers:
        raise ArtifactError(f"the checkpoint has no {name} layers ({name}.0.weight is missing)")
    indices = sorted(layers)
    expected = list(range(0, 2 * len(indices), 2))
    if indices != expected:
        raise ArtifactError(
            f"{name} has layers at indices {indices}; the reference puts its Linear layers at "
            f"{expected} with one activation between each (an unsupported MLP layout)"
        )
    out: list[tuple[torch.Tensor, torch.Tensor]] = []
    prev_out = None
    for i in indices:
        parts = layers[i]
        for part in ("weight", "bias"):
            if part not in parts:
                raise ArtifactError(f"{name}.{i}.{part} is missing (the reference's Linear layers have a bias)")
        w = as_float32(f"{name}.{i}.weight", parts["weight"], _QUANTIZED_HINT)
        b = as_float32(f"{name}.{i}.bias", parts["bias"], _QUANTIZED_HINT)
        if w.dim() != 2 or b.dim() != 1 or b.shape[0] != w.shape[0]:
            raise ArtifactError(
                f"{name}.{i} is not a Linear layer: weight {list(w.shape)}, bias {list(b.shape)}"
            )
        if prev_out is not None and w.shape[1] != prev_out:
            raise ArtifactError(
                f"{name}.{i}.weight takes {w.shape[1]} inputs but the layer before gives {prev_out}"
            )
        prev_out = int(w.shape[0])
        out.append((w, b))
    return out


def parse_state_dict(state: Any) -> ModelWeights:
    """Group a reference state dict into tables and MLP layers, or raise :class:`ArtifactError`.

    Accepts the ``--save-model`` dict or a bare state dict (keys may carry a
    leading ``module.``).  Rejects, with a message naming the variant: QR
    embeddings, mixed-dimension embeddings, quantized tables or MLPs, one
    rank's share of a distributed run, unexpected tensors, and MLP layouts
    other than Linear layers at even indices.  Floating tables of another
    precision are widened to float32.
    """
    state = _state_dict_of(state)
    tables: dict[int, torch.Tensor] = {}
    pooling: dict[int, torch.Tensor] = {}
    mlps: dict[str, dict[int, dict[str, torch.Tensor]]] = {"bot_l": {}, "top_l": {}}
    unexpected: list[str] = []
    for key, value in state.items():
        m = _KEY.match(key) if isinstance(key, str) else None
        if m is None:
            unexpected.append(str(key))
            continue
        group, wrapped, rest = m.group(1), m.group(2), m.group(3)
        if wrapped:
            # The reference wraps its MLPs in DDP only when several ranks train,
            # and then each rank's emb_l holds only that rank's tables.
            raise ArtifactError(
                f"{key}: the checkpoint was saved by one rank of a distributed run, which holds "
                "only its own share of the embedding tables; save a single-process model instead"
            )
        if group in ("bot_l", "top_l") and re.search(r"_packed_params|scale|zero_point", rest):
            raise ArtifactError(
                f"{key}: quantized MLPs (--quantize-mlp-with-bit) are not supported; "
                "import the float checkpoint"
            )
        if group == "emb_l_q":
            raise ArtifactError(
                f"{key}: quantized embedding tables (--quantize-emb-with-bit) are not supported; "
                "import the float checkpoint"
            )
        if group == "emb_l":
            if re.fullmatch(r"\d+\.weight_[qr]", rest):
                raise ArtifactError(
                    f"{key}: quotient-remainder embeddings (--qr-flag) are not supported: "
                    "their rows are composed from two tables at lookup time"
                )
            if re.fullmatch(r"\d+\.(embs|projs)(\..+)?", rest):
                raise ArtifactError(
                    f"{key}: mixed-dimension embeddings (--md-flag) are not supported: "
                    "all tables must have the same dimension"
                )
            t = re.fullmatch(r"(\d+)\.weight", rest)
            if t is None:
                unexpected.append(key)
                continue
            tables[int(t.group(1))] = value
        elif group == "v_W_l":
            t = re.fullmatch(r"(\d+)", rest)
            if t is None:
                unexpected.append(key)
                continue
            pooling[int(t.group(1))] = value
        else:
            t = re.fullmatch(r"(\d+)\.(weight|bias)", rest)
            if t is None:
                unexpected.append(key)
                continue
            mlps[group].setdefault(int(t.group(1)), {})[t.group(2)] = value
    if unexpected:
        shown = unexpected[:8] + (["..."] if len(unexpected) > 8 else [])
        raise ArtifactError(
            f"unexpected tensors in the checkpoint: {shown}; a reference DLRM holds only "
            f"emb_l.K.weight, bot_l.I.weight/bias, top_l.I.weight/bias (and v_W_l.K); {_SUPPORTED}"
        )
    if not tables:
        raise ArtifactError(f"the checkpoint has no embedding tables (emb_l.0.weight is missing); {_SUPPORTED}")
    missing = sorted(set(range(len(tables))) - set(tables))
    if missing:
        raise ArtifactError(
            f"embedding tables are numbered {sorted(tables)}; expected 0..{len(tables) - 1} "
            f"(emb_l.{missing[0]}.weight is missing)"
        )
    ordered = []
    for k in range(len(tables)):
        t = as_float32(f"emb_l.{k}.weight", tables[k], _QUANTIZED_HINT)
        if t.dim() != 2 or t.shape[0] == 0 or t.shape[1] == 0:
            raise ArtifactError(f"emb_l.{k}.weight has shape {list(t.shape)}; a table is [rows, dim]")
        ordered.append(t)
    dims = sorted({int(t.shape[1]) for t in ordered})
    if len(dims) > 1:
        by_table = [int(t.shape[1]) for t in ordered]
        raise ArtifactError(
            f"tables have different dimensions {by_table}: mixed-dimension embeddings are not supported"
        )
    weights: list[torch.Tensor | None] = [None] * len(ordered)
    for k, w in sorted(pooling.items()):
        if k >= len(ordered):
            raise ArtifactError(f"v_W_l.{k} has no table emb_l.{k}.weight")
        w = as_float32(f"v_W_l.{k}", w, _QUANTIZED_HINT)
        if w.dim() != 1 or w.shape[0] != ordered[k].shape[0]:
            raise ArtifactError(
                f"v_W_l.{k} has shape {list(w.shape)}; pooling weights of emb_l.{k} have one entry per row "
                f"([{ordered[k].shape[0]}])"
            )
        weights[k] = w
    return ModelWeights(
        tables=ordered,
        bottom=_mlp("bot_l", mlps["bot_l"]),
        top=_mlp("top_l", mlps["top_l"]),
        pooling=weights,
    )


# ----- the config ---------------------------------------------------------------
def interaction_candidates(num_tables: int, dim: int) -> dict[tuple[str, bool], int]:
    """Top-MLP input width of each interaction: ``{(op, self_interaction): width}``."""
    n = num_tables + 1
    return {
        ("dot", False): dim + n * (n - 1) // 2,
        ("dot", True): dim + n * (n + 1) // 2,
        ("cat", False): dim * n,
    }


def _describe(op: str, self_: bool) -> str:
    return "dot with self-interaction" if self_ else op


def infer_interaction(
    num_tables: int,
    dim: int,
    top_input_width: int,
    interaction: str | None = None,
    self_interaction: bool | None = None,
) -> tuple[str, bool]:
    """``(op, self_interaction)`` whose width equals the first top layer's input width.

    ``interaction`` / ``self_interaction`` narrow the choice when the shapes
    fit more than one (``dot`` and ``cat`` coincide when ``F+1 == 2*D``).
    """
    cands = interaction_candidates(num_tables, dim)
    fits = [k for k, w in cands.items() if w == top_input_width]
    chosen = [
        k for k in fits
        if (interaction is None or k[0] == interaction)
        and (self_interaction is None or k[1] == self_interaction)
    ]
    table = ", ".join(f"{_describe(*k)} {w}" for k, w in cands.items())
    if not fits:
        raise ArtifactError(
            f"the first top layer takes {top_input_width} inputs, which fits no interaction of "
            f"{num_tables} tables of dim {dim} ({table})"
        )
    if not chosen:
        raise ArtifactError(
            f"the first top layer takes {top_input_width} inputs, which fits "
            f"{' or '.join(_describe(*k) for k in fits)}, not the requested interaction "
            f"{interaction!r} (self_interaction={self_interaction!r})"
        )
    if len(chosen) > 1:
        raise ArtifactError(
            f"the first top layer takes {top_input_width} inputs, which fits both "
            f"{' and '.join(_describe(*k) for k in chosen)} for {num_tables} tables of dim {dim}; "
            "pass interaction='dot' or 'cat' to reference.import_checkpoint to choose"
        )
    return chosen[0]


def reference_config(
    weights: ModelWeights,
    dense_transform: str = "log1p",
    loss_threshold: float = 0.0,
    interaction: str | None = None,
    self_interaction: bool | None = None,
) -> DLRMConfig:
    """The :class:`DLRMConfig` of a parsed reference model."""
    dim = weights.embedding_dim
    if weights.bottom_widths[-1] != dim:
        raise ArtifactError(
            f"the bottom MLP ends with width {weights.bottom_widths[-1]} but the tables have dim {dim}; "
            "the reference requires them equal"
        )
    if weights.top_widths[-1] != 1:
        raise ArtifactError(
            f"the top MLP ends with width {weights.top_widths[-1]}; a click model ends with width 1"
        )
    op, self_ = infer_interaction(
        len(weights.tables), dim, weights.top_input_width, interaction, self_interaction
    )
    dense_names, sparse_names = feature_names(weights.num_dense, len(weights.tables))
    try:
        return DLRMConfig(
            table_sizes=weights.table_sizes,
            embedding_dim=dim,
            bottom_mlp=weights.bottom_widths,
            top_mlp=weights.top_widths,
            dense_names=dense_names,
            sparse_names=sparse_names,
            interaction=op,
            self_interaction=self_,
            dense_transform=dense_transform,
            loss_threshold=loss_threshold,
        )
    except ValueError as e:
        raise ArtifactError(f"cannot describe the checkpoint's model: {e}") from None


def import_checkpoint(
    path: str | os.PathLike,
    out_dir: str | os.PathLike,
    dense_transform: str = "log1p",
    loss_threshold: float = 0.0,
    *,
    interaction: str | None = None,
    self_interaction: bool | None = None,
) -> DLRMConfig:
    """Convert a reference ``--save-model`` file into artifacts in ``out_dir``.

    ``dense_transform`` is the preprocessing the model was trained with
    (``log1p`` for the reference's Criteo loaders); ``loss_threshold`` is the
    reference's ``--loss-threshold`` (output clamped to [T, 1-T]).  Neither
    is stored in the checkpoint.  Writes ``dlrm.safetensors``, ``dlrm.json``
    and ``metrics.json`` (the checkpoint's own epoch and accuracy numbers).
    """
    threshold = check_options(dense_transform, loss_threshold)
    obj = load_checkpoint(path, _SUPPORTED)
    weights = parse_state_dict(obj)
    config = reference_config(weights, dense_transform, threshold, interaction, self_interaction)
    model = build_model(weights, config)
    metrics: dict[str, Any] = {"source": "facebookresearch/dlrm --save-model", "checkpoint": Path(path).name}
    if isinstance(obj, Mapping) and "state_dict" in obj:
        ref = {k: plain_number(obj[k]) for k in _METRIC_KEYS if k in obj}
        metrics["reference"] = {k: v for k, v in ref.items() if v is not None}
    return write_artifacts(model, out_dir, metrics)
