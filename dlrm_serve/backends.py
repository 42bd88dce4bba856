"""Forward-pass backends behind one small interface.

A backend is loaded from an artifacts folder, predicts click probabilities
for a :class:`~dlrm_serve.features.FeatureBatch`, and describes itself.  The
handler, the scorer and the benchmarks only talk to this interface.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import numpy as np

from .features import FeatureBatch

__all__ = ["Backend", "TorchBackend", "load_backend", "BACKENDS"]


class Backend(Protocol):
    name: str

    def predict(self, batch: FeatureBatch) -> np.ndarray:
        """float32 ``[B]`` click probabilities."""

    def describe(self) -> dict:
        """What runs: backend, device, threads, model facts."""


class TorchBackend:
    """Eager PyTorch on the CPU, weights memory-mapped from the artifacts."""

    name = "torch"

    def __init__(self, artifacts_dir: str | os.PathLike, threads: int | None = None):
        import torch

        from .weights import load_model

        self._torch = torch
        if threads:
            torch.set_num_threads(threads)
        self.artifacts_dir = Path(artifacts_dir)
        self.model = load_model(artifacts_dir)
        self.config = self.model.config

    def predict(self, batch: FeatureBatch) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            offsets = None if batch.offsets is None else torch.from_numpy(batch.offsets)
            p = self.model(torch.from_numpy(batch.dense), torch.from_numpy(batch.indices), offsets)
        return p.numpy()

    def describe(self) -> dict:
        torch = self._torch
        return {
            "backend": self.name,
            "device": "cpu",
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "table_dtype": self.config.table_dtype,
            "table_rows": self.config.total_rows,
        }


def _onnxruntime_backend(artifacts_dir: str | os.PathLike, **options) -> Backend:
    # Imported on first use: `import dlrm_serve.backends` must not load onnxruntime.
    from .onnx_backend import OnnxBackend

    return OnnxBackend(artifacts_dir, **options)


BACKENDS = {"torch": TorchBackend, "onnxruntime": _onnxruntime_backend}


def load_backend(artifacts_dir: str | os.PathLike, kind: str = "torch", **options) -> Backend:
    """The backend ``kind`` (``torch`` or ``onnxruntime``) for ``artifacts_dir``."""
    if kind not in BACKENDS:
        raise ValueError(f"unknown backend {kind!r}; choose one of {sorted(BACKENDS)}")
    return BACKENDS[kind](artifacts_dir, **options)
