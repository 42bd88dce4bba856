"""The one description of a DLRM: architecture and preprocessing.

A :class:`DLRMConfig` is saved as ``dlrm.json`` next to the weights, and every
consumer (trainer, handler, exporter, importer, scorer, client) builds what it
needs from it alone.  This module imports nothing heavier than the standard
library so clients can read a config without torch.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any

from dlrm_serve.errors import ConfigError

__all__ = [
    "FORMAT_VERSION",
    "DLRMConfig",
    "PRESETS",
    "preset",
    "CRITEO_KAGGLE_TABLE_SIZES",
    "CRITEO_TERABYTE_TABLE_SIZES",
]

FORMAT_VERSION = 1

INTERACTIONS = ("dot", "cat")
DENSE_TRANSFORMS = ("log1p", "none")
CATEGORICAL_HASHES = ("hex-mod",)
TABLE_DTYPES = ("float32", "int8")

CRITEO_DENSE = tuple(f"I{i}" for i in range(1, 14))
CRITEO_SPARSE = tuple(f"C{i}" for i in range(1, 27))

# MLPerf Criteo Kaggle (Display Advertising Challenge) table sizes, C1..C26.
CRITEO_KAGGLE_TABLE_SIZES = (
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683,
    8351593, 3194, 27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15,
    286181, 105, 142572,
)
# MLPerf Criteo Terabyte table sizes with the 40M index range, C1..C26.
CRITEO_TERABYTE_TABLE_SIZES = (
    39884406, 39043, 17289, 7420, 20263, 3, 7120, 1543, 63, 38532951,
    2953546, 403346, 10, 2208, 11938, 155, 4, 976, 14, 39979771, 25641295,
    39664984, 585935, 12972, 108, 36,
)
# The demo model: Criteo-like cardinalities, scaled down to train in minutes.
DEMO_TABLE_SIZES = (
    1460, 583, 20000, 12000, 305, 24, 6000, 633, 3, 9000, 5683, 16000, 3194,
    27, 8000, 14000, 10, 5652, 2173, 4, 15000, 18, 15, 10000, 105, 12000,
)


def _positive_ints(name: str, values: Any) -> tuple[int, ...]:
    out = tuple(values)
    for v in out:
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ConfigError(f"{name} must hold positive integers, got {v!r} in {list(out)}")
    return out


@dataclass(frozen=True)
class DLRMConfig:
    """Architecture and preprocessing of one DLRM.

    Shapes used throughout the package: ``B`` batch size, ``F`` number of
    categorical features (tables), ``D`` embedding dim, ``N`` ids in a batch.

    - ``bottom_mlp``: widths after the dense input, the last equal to ``D``.
    - ``top_mlp``: widths after the interaction, the last equal to 1; the
      input width is derived (:attr:`top_input_width`).
    - ``interaction``: ``dot`` (pairwise dot products, strict lower triangle,
      or with the diagonal when ``self_interaction``) or ``cat``.
    - ``dense_transform``: ``log1p`` (clamp negatives to 0, then log(1+x)) or
      ``none``.  Missing dense values are 0 before the transform.
    - ``categorical_hash``: ``hex-mod``: a string is ``int(s, 16) % table_size``;
      an int is already a row index.
    - ``loss_threshold``: when 0 < T < 1 the probability is clamped to
      [T, 1-T], as the reference implementation does.
    - ``table_dtype``: ``float32`` or row-wise ``int8`` tables.
    """

    table_sizes: tuple[int, ...]
    embedding_dim: int = 16
    bottom_mlp: tuple[int, ...] = (64, 32, 16)
    top_mlp: tuple[int, ...] = (128, 64, 1)
    dense_names: tuple[str, ...] = CRITEO_DENSE
    sparse_names: tuple[str, ...] = CRITEO_SPARSE
    interaction: str = "dot"
    self_interaction: bool = False
    dense_transform: str = "log1p"
    categorical_hash: str = "hex-mod"
    loss_threshold: float = 0.0
    table_dtype: str = "float32"
    onnx_opset: int | None = None
    format_version: int = FORMAT_VERSION
    name: str = "dlrm"

    def __post_init__(self) -> None:
        # Normalise lists (from JSON) to tuples so the config stays hashable.
        for attr in ("table_sizes", "bottom_mlp", "top_mlp", "dense_names", "sparse_names"):
            object.__setattr__(self, attr, tuple(getattr(self, attr)))
        _positive_ints("table_sizes", self.table_sizes)
        _positive_ints("bottom_mlp", self.bottom_mlp)
        _positive_ints("top_mlp", self.top_mlp)
        if isinstance(self.embedding_dim, bool) or not isinstance(self.embedding_dim, int) or self.embedding_dim <= 0:
            raise ConfigError(f"embedding_dim must be a positive integer, got {self.embedding_dim!r}")
        if not self.dense_names:
            raise ConfigError("dense_names is empty: DLRM needs at least one dense feature")
        if not self.sparse_names:
            raise ConfigError("sparse_names is empty: DLRM needs at least one categorical feature")
        names = self.dense_names + self.sparse_names
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise ConfigError(f"feature names must be unique, repeated: {dup}")
        for n in names:
            if not isinstance(n, str) or not n:
                raise ConfigError(f"feature names must be non-empty strings, got {n!r}")
        if len(self.table_sizes) != len(self.sparse_names):
            raise ConfigError(
                f"table_sizes has {len(self.table_sizes)} entries but there are "
                f"{len(self.sparse_names)} categorical features"
            )
        if not self.bottom_mlp or self.bottom_mlp[-1] != self.embedding_dim:
            raise ConfigError(
                f"bottom_mlp {list(self.bottom_mlp)} must end with the embedding dim {self.embedding_dim}"
            )
        if not self.top_mlp or self.top_mlp[-1] != 1:
            raise ConfigError(f"top_mlp {list(self.top_mlp)} must end with width 1 (one click logit)")
        if self.interaction not in INTERACTIONS:
            raise ConfigError(f"interaction must be one of {INTERACTIONS}, got {self.interaction!r}")
        if self.dense_transform not in DENSE_TRANSFORMS:
            raise ConfigError(f"dense_transform must be one of {DENSE_TRANSFORMS}, got {self.dense_transform!r}")
        if self.categorical_hash not in CATEGORICAL_HASHES:
            raise ConfigError(f"categorical_hash must be one of {CATEGORICAL_HASHES}, got {self.categorical_hash!r}")
        if self.table_dtype not in TABLE_DTYPES:
            raise ConfigError(f"table_dtype must be one of {TABLE_DTYPES}, got {self.table_dtype!r}")
        if not isinstance(self.self_interaction, bool):
            raise ConfigError(f"self_interaction must be true or false, got {self.self_interaction!r}")
        t = float(self.loss_threshold)
        if not 0.0 <= t < 0.5:
            raise ConfigError(f"loss_threshold must be in [0, 0.5), got {self.loss_threshold!r}")
        object.__setattr__(self, "loss_threshold", t)
        if self.format_version != FORMAT_VERSION:
            raise ConfigError(
                f"config format_version {self.format_version!r} is not supported by this "
                f"dlrm-serve (it reads version {FORMAT_VERSION})"
            )

    # ----- derived quantities -------------------------------------------------
    @property
    def num_dense(self) -> int:
        return len(self.dense_names)

    @property
    def num_sparse(self) -> int:
        return len(self.sparse_names)

    @property
    def interaction_width(self) -> int:
        """Width of the interaction output that feeds the top MLP."""
        d, f = self.embedding_dim, self.num_sparse
        if self.interaction == "cat":
            return d * (f + 1)
        n = f + 1
        pairs = n * (n + 1) // 2 if self.self_interaction else n * (n - 1) // 2
        return d + pairs

    @property
    def top_input_width(self) -> int:
        return self.interaction_width

    @property
    def table_offsets(self) -> tuple[int, ...]:
        """First row of each table inside the concatenated table."""
        out, acc = [], 0
        for s in self.table_sizes:
            out.append(acc)
            acc += s
        return tuple(out)

    @property
    def total_rows(self) -> int:
        return sum(self.table_sizes)

    def flops_per_sample(self) -> int:
        """Multiply-adds x2 of the MLPs and the dot interaction (lookups excluded)."""
        flops = 0
        prev = self.num_dense
        for w in self.bottom_mlp:
            flops += 2 * prev * w
            prev = w
        if self.interaction == "dot":
            n = self.num_sparse + 1
            flops += 2 * n * n * self.embedding_dim
        prev = self.top_input_width
        for w in self.top_mlp:
            flops += 2 * prev * w
            prev = w
        return flops

    # ----- persistence --------------------------------------------------------
    def to_dict(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "DLRMConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"a config must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config keys {unknown}; known keys are {sorted(known)}")
        if "table_sizes" not in data:
            raise ConfigError("config is missing 'table_sizes'")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "DLRMConfig":
        return cls.from_dict(json.loads(text))

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "DLRMConfig":
        with open(path, encoding="utf-8") as fh:
            return cls.from_json(fh.read())

    def replace(self, **changes: Any) -> "DLRMConfig":
        return dataclasses.replace(self, **changes)


PRESETS = {
    # Small enough to train on 2 CPU cores in a few minutes.
    "demo": dict(table_sizes=DEMO_TABLE_SIZES, embedding_dim=16, bottom_mlp=(64, 32, 16), top_mlp=(128, 64, 1)),
    # MLPerf DLRM on Criteo Kaggle: 33.76M rows, 2.16 GB of fp32 tables.
    "criteo-kaggle": dict(
        table_sizes=CRITEO_KAGGLE_TABLE_SIZES, embedding_dim=16,
        bottom_mlp=(512, 256, 64, 16), top_mlp=(512, 256, 1),
    ),
    # MLPerf DLRM on Criteo Terabyte: about 96 GiB of fp32 tables.
    "criteo-terabyte": dict(
        table_sizes=CRITEO_TERABYTE_TABLE_SIZES, embedding_dim=128,
        bottom_mlp=(512, 256, 128), top_mlp=(1024, 1024, 512, 256, 1),
    ),
}


def preset(name: str, **overrides: Any) -> DLRMConfig:
    """The config of a named preset (``demo``, ``criteo-kaggle``, ``criteo-terabyte``)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return DLRMConfig(**{**PRESETS[name], **overrides})
