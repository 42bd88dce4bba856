"""Forward-pass backends behind one small interface.

A backend is loaded from an artifacts folder, predicts click probabilities
for a :class:`~dlrm_serve.io.features.FeatureBatch`, and describes itself.  The
handler, the scorer and the benchmarks only talk to this interface.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import numpy as np

from dlrm_serve.io.features import FeatureBatch
from dlrm_serve.runtime.placement import DEFAULT_MEMORY_SHARE

__all__ = [
    "Backend",
    "TorchBackend",
    "load_backend",
    "BACKENDS",
    "PRECISIONS",
    "check_precision",
    "native_bf16",
    "resolve_precision",
]

# What a backend computes in.  ``auto``: bf16 on a CPU with native bfloat16
# dot products (AMX or AVX512-BF16), where it measured 2-4x the float32
# forward with the AUC unchanged to 1e-3; fp32 elsewhere (see docs/precision.md).
PRECISIONS = ("auto", "fp32", "bf16")
# CPU flags (/proc/cpuinfo) of native bfloat16 matrix or dot-product instructions.
BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def check_precision(precision: str) -> str:
    """``precision`` itself when it is one of :data:`PRECISIONS`; a ValueError naming it otherwise."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    return precision


def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AMX tiles or AVX512-BF16)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return bool(set(line.split()) & set(BF16_FLAGS))
    except OSError:
        pass
    return False


def resolve_precision(precision: str) -> str:
    """``fp32`` or ``bf16``: ``auto`` becomes bf16 where :func:`native_bf16`, else fp32."""
    if check_precision(precision) == "auto":
        return "bf16" if native_bf16() else "fp32"
    return precision


class Backend(Protocol):
    name: str

    def predict(self, batch: FeatureBatch) -> np.ndarray:
        """float32 ``[B]`` click probabilities."""

    def describe(self) -> dict:
        """What runs: backend, device, threads, model facts."""


class TorchBackend:
    """Eager PyTorch on the CPU, weights memory-mapped from the artifacts, or on CUDA.

    ``precision``: ``fp32`` (the default: the saved weights as they are,
    results bit for bit those of the model), ``bf16`` or ``auto``.  On the
    CPU, bf16 casts the MLP weights once at load and runs the GEMMs and the
    interaction in bfloat16 (:func:`dlrm_serve.model.dlrm.cast_for_inference`);
    ``auto`` is :func:`resolve_precision`.  The tables stay mapped from the
    file and shared between workers unless ``bf16_tables`` casts them into a
    private bfloat16 copy (half the bytes; measured in docs/precision.md).

    ``device``: ``cpu`` (default), ``cuda`` or ``cuda:N`` (a
    :class:`~dlrm_serve.errors.DeviceError` naming what was found when
    CUDA is not usable; never a silent CPU fallback).  On CUDA the
    :class:`~dlrm_serve.runtime.cuda_runner.CudaRunner` runs the model in
    ``precision`` (fp32 with TF32 off, bf16, fp16; ``auto`` is bf16), and
    the ``gpu`` options (``tables`` auto|device|host, ``memory_share``,
    ``cuda_graphs``, ``buckets``, ``compile``) go to it.  ``device_reason``:
    why this device (from :mod:`dlrm_serve.runtime.placement`), repeated by
    :meth:`describe`.
    """

    name = "torch"

    def __init__(
        self,
        artifacts_dir: str | os.PathLike,
        threads: int | None = None,
        precision: str = "fp32",
        bf16_tables: bool = False,
        device: str = "cpu",
        device_reason: str | None = None,
        **gpu,
    ):
        import torch

        from dlrm_serve.model.weights import load_model

        self._torch = torch
        if threads:
            torch.set_num_threads(threads)
        self.artifacts_dir = Path(artifacts_dir)
        model = load_model(artifacts_dir)
        self.config = model.config
        # On CUDA the runner casts on the device; on the CPU the model is cast here.
        self._cuda = _place(model, device, precision, gpu)
        if self._cuda is None:
            self.precision = resolve_precision(precision)
            self.bf16_tables = bool(bf16_tables) and self.precision == "bf16"
            model = self._prepare(model)
        else:
            self.precision, self.bf16_tables = self._cuda.precision, False
        self.model = model
        self.device_reason = device_reason or f"device {device!r} asked for"

    def _prepare(self, model):
        """The one place where precision changes the loaded model."""
        from dlrm_serve.model.dlrm import cast_for_inference

        if self.precision == "bf16":
            return cast_for_inference(model, self._torch.bfloat16, tables=self.bf16_tables)
        return model

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
        from dlrm_serve.runtime.memory import touch_tables

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
            "precision": self.precision,
            "bf16_tables": self.bf16_tables,
            "table_dtype": self.config.table_dtype,
            "table_rows": self.config.total_rows,
        }
        if self._cuda is not None:
            out.update(self._cuda.describe())
        return out


def _place(model, device: str, precision: str, gpu: dict):
    """A :class:`~dlrm_serve.runtime.cuda_runner.CudaRunner` for a CUDA ``device``, None for the CPU.

    Kept apart from the CPU forward pass: the CPU path is untouched by the
    device options, which are refused there rather than ignored.
    """
    from dlrm_serve.runtime.placement import resolve_torch_device

    where = resolve_torch_device(device)
    if where.type == "cpu":
        unknown = sorted(k for k, v in gpu.items() if k not in _CPU_NEUTRAL or v != _CPU_NEUTRAL[k])
        if unknown:
            raise ValueError(f"options {unknown} apply to a CUDA device only; device is {device!r}")
        return None
    from dlrm_serve.runtime.cuda_runner import CudaRunner

    # GPUs with CUDA graphs all multiply bfloat16 natively: auto is bf16 there.
    return CudaRunner(model, where, precision="bf16" if precision == "auto" else precision, **gpu)


# Device options that mean nothing on the CPU when left at these values.
_CPU_NEUTRAL = {"tables": "auto", "memory_share": DEFAULT_MEMORY_SHARE, "cuda_graphs": True, "compile": False}


def _onnxruntime_backend(artifacts_dir: str | os.PathLike, precision: str = "fp32", **options) -> Backend:
    # The exported graphs are float32: "auto" means fp32 here, bf16 is refused.
    if check_precision(precision) == "bf16":
        raise ValueError("the onnxruntime backend runs fp32 only; precision 'bf16' needs the torch backend")
    # Imported on first use: `import dlrm_serve.runtime.backends` must not load onnxruntime.
    from dlrm_serve.runtime.onnx_backend import OnnxBackend

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
