"""Weights: ``dlrm.safetensors`` written, mapped and checked against ``dlrm.json``.

The torch half of the artifacts (the names and the config reader are in
:mod:`dlrm_serve.artifacts`, which imports no torch).  No pickle is read here.
Weights are stored in the layout the forward pass uses (one concatenated
table), and :func:`load_model` memory-maps the file and hands its tensors to
the model without copying, so every process that serves the same file shares
one copy of the tables in the page cache.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dlrm_serve.artifacts import CONFIG_FILE, EXTRA_PREFIX, WEIGHTS_FILE, load_config, write_metrics
from dlrm_serve.config import DLRMConfig
from dlrm_serve.errors import ArtifactError
from dlrm_serve.model.dlrm import DLRM

__all__ = ["expected_shapes", "extra_shapes", "save_artifacts", "load_weights", "load_model", "check_artifacts"]


def expected_shapes(config: DLRMConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of every tensor a model of ``config`` stores."""
    with torch.device("meta"):
        model = DLRM(config, init=False)
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}


def extra_shapes(config: DLRMConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of the optional tensors ``dlrm.safetensors`` may hold."""
    return {
        EXTRA_PREFIX + "dense_baseline": ((config.num_dense,), torch.float32),
        EXTRA_PREFIX + "sparse_baseline": ((config.num_sparse, config.embedding_dim), torch.float32),
    }


def save_artifacts(
    model: DLRM, out_dir: str | os.PathLike, metrics: dict | None = None, extra: dict[str, torch.Tensor] | None = None
) -> Path:
    """Write ``dlrm.safetensors`` and ``dlrm.json`` (and ``metrics.json``) into ``out_dir``.

    ``extra``: optional tensors of :func:`extra_shapes` stored with the weights.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    tensors.update({k: v.detach().to(torch.float32).contiguous() for k, v in (extra or {}).items()})
    tmp = out / (WEIGHTS_FILE + ".tmp")
    # One metadata key: safetensors orders several at random, and identical runs should give identical files.
    save_file(tensors, str(tmp), metadata={"dlrm_serve_config": model.config.to_json()})
    os.chmod(tmp, 0o644)  # safetensors writes 0600; servers may run as another user
    os.replace(tmp, out / WEIGHTS_FILE)
    model.config.save(out / CONFIG_FILE)
    if metrics is not None:
        write_metrics(out, metrics)
    return out


def load_weights(artifacts_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of ``dlrm.safetensors``, memory-mapped (no copy)."""
    path = Path(artifacts_dir) / WEIGHTS_FILE
    if not path.is_file():
        raise ArtifactError(f"{path} not found (the weights of the model described by {CONFIG_FILE})")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            return {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as e:  # safetensors raises its own error types
        raise ArtifactError(f"{path} is not a readable safetensors file: {e}") from None


def _compare(config: DLRMConfig, tensors: dict[str, Any]) -> list[str]:
    problems = []
    want = expected_shapes(config)
    optional = extra_shapes(config)
    for name, (shape, dtype) in {**want, **optional}.items():
        if name not in tensors:
            if name in optional:
                continue
            problems.append(f"missing tensor {name!r} (expected shape {list(shape)}, {dtype})")
            continue
        got = tensors[name]
        if tuple(got.shape) != shape:
            problems.append(f"tensor {name!r} has shape {list(got.shape)}, the config implies {list(shape)}")
        elif got.dtype != dtype:
            problems.append(f"tensor {name!r} has dtype {got.dtype}, the config implies {dtype}")
    for name in sorted(set(tensors) - set(want) - set(optional)):
        problems.append(f"unexpected tensor {name!r} (not part of the model the config describes)")
    return problems


def check_artifacts(artifacts_dir: str | os.PathLike) -> DLRMConfig:
    """Raise :class:`ArtifactError` listing every mismatch between weights and config."""
    config = load_config(artifacts_dir)
    problems = _compare(config, load_weights(artifacts_dir))
    if problems:
        raise ArtifactError(
            f"{Path(artifacts_dir)} is inconsistent:\n  - " + "\n  - ".join(problems)
        )
    return config


def load_model(artifacts_dir: str | os.PathLike) -> DLRM:
    """The model of ``artifacts_dir`` in eval mode, its tensors mapped from the file."""
    config = load_config(artifacts_dir)
    tensors = load_weights(artifacts_dir)
    problems = _compare(config, tensors)
    if problems:
        raise ArtifactError(f"{Path(artifacts_dir)} is inconsistent:\n  - " + "\n  - ".join(problems))
    model = DLRM(config, init=False)
    # assign=True keeps the mapped tensors themselves instead of copying into fresh ones.
    state = {k: v for k, v in tensors.items() if not k.startswith(EXTRA_PREFIX)}
    model.load_state_dict(state, strict=True, assign=True)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
