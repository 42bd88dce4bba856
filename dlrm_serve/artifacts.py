"""Artifacts: the file names of an artifacts folder and its config reader.

An artifacts folder holds ``dlrm.safetensors`` (weights), ``dlrm.json`` (the
config) and, after training, ``metrics.json``.  This module imports no torch,
so clients, the ONNX backend and anything that only reads a config stay
numpy-only; the weights (written, mapped, checked) are in
:mod:`dlrm_serve.model.weights`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from dlrm_serve.config import DLRMConfig
from dlrm_serve.errors import ConfigError

__all__ = [
    "WEIGHTS_FILE",
    "CONFIG_FILE",
    "METRICS_FILE",
    "ConfigError",
    "load_config",
    "write_metrics",
    # From dlrm_serve.model.weights, imported (with torch) on first use:
    "expected_shapes",
    "extra_shapes",
    "EXTRA_PREFIX",
    "save_artifacts",
    "load_weights",
    "load_model",
    "check_artifacts",
]

WEIGHTS_FILE = "dlrm.safetensors"
CONFIG_FILE = "dlrm.json"
METRICS_FILE = "metrics.json"
# Optional tensors stored beside the model's (not part of its state): the
# explanation baseline, ``explain.dense_baseline`` [num_dense] and
# ``explain.sparse_baseline`` [F, D] (see dlrm_serve.runtime.explain).
EXTRA_PREFIX = "explain."

_WEIGHTS_NAMES = {"expected_shapes", "extra_shapes", "save_artifacts", "load_weights", "load_model", "check_artifacts"}


def load_config(path: str | os.PathLike) -> DLRMConfig:
    """The config of an artifacts folder, or of a ``dlrm.json`` file.

    The one reader of ``dlrm.json`` (training, data generation, clients,
    backends).  Raises :class:`ConfigError`, naming the file, when it is
    missing or is not a valid config.
    """
    p = Path(path)
    if p.is_dir():
        p = p / CONFIG_FILE
    if not p.is_file():
        raise ConfigError(
            f"config file {str(p)!r} not found: an artifacts folder holds {CONFIG_FILE} and {WEIGHTS_FILE} "
            "(run `dlrm-serve train --out DIR` or `dlrm-serve init --out DIR` to make one)"
        )
    try:
        return DLRMConfig.load(p)
    except (ValueError, TypeError) as e:  # bad JSON and bad UTF-8 are ValueErrors too
        raise ConfigError(f"{p} is not a valid dlrm-serve config: {e}") from None


def write_metrics(out_dir: str | os.PathLike, metrics: dict) -> None:
    with open(Path(out_dir) / METRICS_FILE, "w", encoding="utf-8") as fh:
        json.dump(metrics, fh, indent=2)
        fh.write("\n")


def __getattr__(name: str):
    # Callers that import the weight functions from here get them, and torch,
    # only when they ask; reading a config never loads torch.
    if name in _WEIGHTS_NAMES:
        from dlrm_serve.model import weights

        return getattr(weights, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
