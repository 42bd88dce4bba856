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
from .placement import DEFAULT_MEMORY_SHARE

__all__ = ["Backend", "TorchBackend", "load_backend", "BACKENDS"]


class Backend(Protocol):
    name: str

    def predict(self, batch: FeatureBatch) -> np.ndarray:
        """float32 ``[B]`` click probabilities."""

    def describe(self) -> dict:
        """What runs: backend, device, threads, model facts."""


class TorchBackend:
    """Eager PyTorch on the CPU, weights memory-mapped from the artifacts, or on CUDA.

    ``device``: ``cpu`` (default), ``cuda`` or ``cuda:N`` (a
    :class:`~dlrm_serve.errors.DeviceError` naming what was found when
    CUDA is not usable; never a silent CPU fallback).  On CUDA the
    :class:`~dlrm_serve.cuda_runner.CudaRunner` runs the model; ``gpu``
    options (``precision`` fp32|bf16|fp16, ``tables`` auto|device|host,
    ``memory_share``, ``cuda_graphs``, ``buckets``, ``compile``) go to it.
    ``device_reason``: why this device (from :mod:`dlrm_serve.placement`),
    repeated by :meth:`describe`.
    """

    name = "torch"

    def __init__(
        self,
        artifacts_dir: str | os.PathLike,
        threads: int | None = None,
        device: str = "cpu",
        device_reason: str | None = None,
        **gpu,
    ):
        import torch

        from .weights import load_model

        self._torch = torch
        if threads:
            torch.set_num_threads(threads)
        self.artifacts_dir = Path(artifacts_dir)
        self.model = load_model(artifacts_dir)
        self.config = self.model.config
        self._cuda = _place(self.model, device, gpu)
        self.device_reason = device_reason or f"device {device!r} asked for"

    def predict(self, batch: FeatureBatch) -> np.ndarray:
        if self._cuda is not None:
            return self._cuda.predict_numpy(batch.dense, batch.indices, batch.offsets)
        torch = self._torch
        with torch.inference_mode():
            offsets = None if batch.offsets is None else torch.from_numpy(batch.offsets)
            p = self.model(torch.from_numpy(batch.dense), torch.from_numpy(batch.indices), offsets)
        return p.numpy()

    def touch_tables(self) -> int:
        """Read every page of the memory-mapped tables (0 when they were copied to a GPU)."""
        from .memory import touch_tables

        if self._cuda is not None and self._cuda.tables == "device":
            return 0
        return touch_tables(self.model)

    def describe(self) -> dict:
        torch = self._torch
        out = {
            "backend": self.name,
            "device": "cpu",
            "device_reason": self.device_reason,
            "tables": "host (memory-mapped)",
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "table_dtype": self.config.table_dtype,
            "table_rows": self.config.total_rows,
        }
        if self._cuda is not None:
            out.update(self._cuda.describe())
        return out


def _place(model, device: str, gpu: dict):
    """A :class:`~dlrm_serve.cuda_runner.CudaRunner` for a CUDA ``device``, None for the CPU.

    Kept apart from the CPU forward pass: the CPU path is untouched by the
    device options, which are refused there rather than ignored.
    """
    from .placement import resolve_torch_device

    where = resolve_torch_device(device)
    if where.type == "cpu":
        unknown = sorted(k for k, v in gpu.items() if k not in _CPU_NEUTRAL or v != _CPU_NEUTRAL[k])
        if unknown:
            raise ValueError(f"options {unknown} apply to a CUDA device only; device is {device!r}")
        return None
    from .cuda_runner import CudaRunner

    return CudaRunner(model, where, **gpu)


# Device options that mean nothing on the CPU when left at these values.
_CPU_NEUTRAL = {"precision": "fp32", "tables": "auto", "memory_share": DEFAULT_MEMORY_SHARE, "cuda_graphs": True, "compile": False}


def _onnxruntime_backend(artifacts_dir: str | os.PathLike, **options) -> Backend:
    # Imported on first use: `import dlrm_serve.backends` must not load onnxruntime.
    from .onnx_backend import OnnxBackend

    return OnnxBackend(artifacts_dir, **options)


BACKENDS = {"torch": TorchBackend, "onnxruntime": _onnxruntime_backend}


def load_backend(artifacts_dir: str | os.PathLike, kind: str = "torch", **options) -> Backend:
    """The backend ``kind`` (``torch`` or ``onnxruntime``) for ``artifacts_dir``.

    Both take ``device="cpu" | "cuda" | "cuda:N"`` (onnxruntime also
    ``"auto"``); CUDA that is not usable raises
    :class:`~dlrm_serve.errors.DeviceError` saying what was found.
    """
    if kind not in BACKENDS:
        raise ValueError(f"unknown backend {kind!r}; choose one of {sorted(BACKENDS)}")
    return BACKENDS[kind](artifacts_dir, **options)
