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
and the loss threshold), which the caller passes.

The file is read with ``torch.load(weights_only=True)``: nothing in it is
executed.  The other entries of the dict (epoch, losses, accuracies,
optimizer state) may hold numpy scalars, because the reference computes them
with numpy; the only globals allowed beyond torch's own are the ones that
rebuild such scalars (:data:`NUMPY_SCALAR_GLOBALS`).
"""

from __future__ import annotations

import math
import os
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from dlrm_serve.model.weights import check_artifacts, save_artifacts
from dlrm_serve.config import CRITEO_DENSE, CRITEO_SPARSE, DLRMConfig
from dlrm_serve.errors import ArtifactError
from dlrm_serve.model.dlrm import DLRM

__all__ = [
    "NUMPY_SCALAR_GLOBALS",
    "ReferenceWeights",
    "load_checkpoint",
    "parse_state_dict",
    "interaction_candidates",
    "infer_interaction",
    "feature_names",
    "reference_config",
    "build_model",
    "import_checkpoint",
]

_SUPPORTED = "only checkpoints written by facebookresearch/dlrm's --save-model are supported"


def _numpy_scalar_globals() -> list:
    # Found by loading reference-style checkpoints: a numpy scalar pickles as
    # scalar(dtype, bytes), the dtype as numpy.dtype(...) followed by a BUILD on
    # the dtype's class, which weights_only also checks.  Files written under
    # numpy 1.x name the function numpy.core.multiarray.scalar.
    scalar = np._core.multiarray.scalar
    return [
        scalar,
        (scalar, "numpy.core.multiarray.scalar"),
        np.dtype,
        # Losses and accuracies are float32/float64; counters are (u)int64.
        np.dtypes.Float32DType,
        np.dtypes.Float64DType,
        np.dtypes.Int64DType,
        np.dtypes.UInt64DType,
    ]


NUMPY_SCALAR_GLOBALS = _numpy_scalar_globals()
_ALLOWED_NAMES = {
    g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}" for g in NUMPY_SCALAR_GLOBALS
}

# Numeric entries next to the state dict that are worth keeping in metrics.json.
_METRIC_KEYS = (
    "epoch", "nepochs", "nbatches", "nbatches_test", "iter", "train_acc", "train_loss",
    "test_acc", "test_loss", "test_auc", "total_loss", "total_accu",
)


# ----- reading the file ---------------------------------------------------------
# How torch's weights-only unpickler words a refused global (vs a corrupt file).
_REFUSED = ("GLOBAL", "Can only build", "Can only create new object", "unrecognized function")


def _error_detail(error: Exception) -> str:
    """The informative line of a torch.load error."""
    text = str(error)
    m = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    if m:
        return m.group(1).strip()[:200]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        return type(error).__name__
    first = lines[0].split(". ")[0][:200]
    return first if len(first) > 20 else f"{type(error).__name__}: {first}"


def _refused_name(error: Exception) -> str:
    """The global a refusal message names."""
    text = str(error)
    for pattern in (
        r"GLOBAL ([\w.]+)",
        r"but got <class '([\w.]+)'>",
        r"unrecognized function ([^\s]+)",
    ):
        m = re.search(pattern, text)
        if m:
            return m.group(1)
    return _error_detail(error)


def _disallowed_globals(path: Path) -> list[str]:
    """Globals a zip checkpoint's pickle names beyond torch's defaults and ours (not executed)."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # a damaged file: torch.load reports it
        return []
    return [n for n in names if n not in _ALLOWED_NAMES]


def _refused(path: Path, what: str) -> ArtifactError:
    return ArtifactError(
        f"{path}: refused to load: the checkpoint needs {what}, which is not allowed "
        f"(weights-only loading allows tensors, plain containers and numpy scalars; "
        f"nothing from the file was executed); {_SUPPORTED}"
    )


def load_checkpoint(path: str | os.PathLike) -> Any:
    """The object stored in ``path``, loaded without executing pickled code.

    Raises :class:`ArtifactError` for a missing or unreadable file and for a
    pickle that needs a global outside torch's defaults and
    :data:`NUMPY_SCALAR_GLOBALS` (the message names it).
    """
    p = Path(path)
    if not p.exists():
        raise ArtifactError(f"checkpoint {p} not found")
    if not p.is_file():
        raise ArtifactError(f"checkpoint {p} is not a file")
    is_zip = zipfile.is_zipfile(p)
    if is_zip:
        # Name every offending global up front; torch.load would stop at the first.
        disallowed = _disallowed_globals(p)
        if disallowed:
            raise _refused(p, ", ".join(disallowed))
    try:
        with torch.serialization.safe_globals(NUMPY_SCALAR_GLOBALS):
            # mmap keeps large tables out of memory until they are copied; it needs the zip format.
            return torch.load(str(p), map_location="cpu", weights_only=True, mmap=is_zip)
    except Exception as e:
        text = str(e)
        if "Weights only load failed" in text and any(marker in text for marker in _REFUSED):
            raise _refused(p, _refused_name(e)) from None
        raise ArtifactError(
            f"{p} is not a readable PyTorch checkpoint ({_error_detail(e)}); {_SUPPORTED}"
        ) from None


def _plain_number(v: Any) -> int | float | None:
    if isinstance(v, bool) or isinstance(v, np.bool_):
        return None
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        x = float(v)
        return x if math.isfinite(x) else None
    return None


# ----- understanding the state dict ---------------------------------------------
@dataclass
class ReferenceWeights:
    """The reference model's tensors, grouped.

    ``tables``: ``[rows_k, D]`` per table; ``pooling``: per table, ``None`` or
    the ``[rows_k]`` learned pooling weights; ``bottom`` / ``top``: one
    ``(weight [out, in], bias [out])`` per Linear layer, in order.
    """

    tables: list[torch.Tensor]
    bottom: list[tuple[torch.Tensor, torch.Tensor]]
    top: list[tuple[torch.Tensor, torch.Tensor]]
    pooling: list[torch.Tensor | None] = field(default_factory=list)

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


_KEY = re.compile(r"^(?:module\.)?(emb_l_q|emb_l|bot_l|top_l|v_W_l)\.(module\.)?(.+)$")
_QUANTIZED_DTYPES = {torch.int8, torch.uint8, torch.qint8, torch.quint8, torch.qint32, torch.quint4x2}
for _name in ("quint2x4", "float8_e4m3fn", "float8_e5m2"):
    if hasattr(torch, _name):
        _QUANTIZED_DTYPES.add(getattr(torch, _name))


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


def _as_float32(name: str, t: Any) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ArtifactError(f"{name} holds a {type(t).__name__}, not a tensor")
    if t.is_quantized or t.dtype in _QUANTIZED_DTYPES:
        raise ArtifactError(
            f"{name} is a quantized tensor ({t.dtype}); quantized reference models "
            "(--quantize-emb-with-bit, --quantize-mlp-with-bit) are not supported: import the float checkpoint"
        )
    if not t.dtype.is_floating_point:
        raise ArtifactError(f"{name} has dtype {t.dtype}; the reference stores float weights")
    return t if t.dtype == torch.float32 else t.to(torch.float32)


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
        w = _as_float32(f"{name}.{i}.weight", parts["weight"])
        b = _as_float32(f"{name}.{i}.bias", parts["bias"])
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


def parse_state_dict(state: Any) -> ReferenceWeights:
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
        t = _as_float32(f"emb_l.{k}.weight", tables[k])
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
        w = _as_float32(f"v_W_l.{k}", w)
        if w.dim() != 1 or w.shape[0] != ordered[k].shape[0]:
            raise ArtifactError(
                f"v_W_l.{k} has shape {list(w.shape)}; pooling weights of emb_l.{k} have one entry per row "
                f"([{ordered[k].shape[0]}])"
            )
        weights[k] = w
    return ReferenceWeights(
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


def feature_names(num_dense: int, num_sparse: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Criteo's I1..I13 / C1..C26 for a 13/26 model, else ``dense_1..`` / ``cat_1..``."""
    if num_dense == len(CRITEO_DENSE) and num_sparse == len(CRITEO_SPARSE):
        return CRITEO_DENSE, CRITEO_SPARSE
    return (
        tuple(f"dense_{i}" for i in range(1, num_dense + 1)),
        tuple(f"cat_{i}" for i in range(1, num_sparse + 1)),
    )


def reference_config(
    weights: ReferenceWeights,
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


# ----- the model ------------------------------------------------------------------
def build_model(weights: ReferenceWeights, config: DLRMConfig) -> DLRM:
    """A :class:`DLRM` of ``config`` holding the reference weights (eval mode)."""
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
    model.eval()
    return model


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
    if dense_transform not in ("log1p", "none"):
        raise ArtifactError(f"dense_transform must be 'log1p' or 'none', got {dense_transform!r}")
    try:
        threshold = float(loss_threshold)
    except (TypeError, ValueError):
        raise ArtifactError(f"loss_threshold must be a number, got {loss_threshold!r}") from None
    if not 0.0 <= threshold < 0.5:
        raise ArtifactError(f"loss_threshold must be in [0, 0.5), got {loss_threshold!r}")
    obj = load_checkpoint(path)
    weights = parse_state_dict(obj)
    config = reference_config(weights, dense_transform, threshold, interaction, self_interaction)
    model = build_model(weights, config)
    metrics: dict[str, Any] = {"source": "facebookresearch/dlrm --save-model", "checkpoint": Path(path).name}
    if isinstance(obj, Mapping) and "state_dict" in obj:
        ref = {k: _plain_number(obj[k]) for k in _METRIC_KEYS if k in obj}
        metrics["reference"] = {k: v for k, v in ref.items() if v is not None}
    save_artifacts(model, out_dir, metrics=metrics)
    return check_artifacts(out_dir)
