"""The torch forward pass on a CUDA device: precision, table placement, CUDA graphs.

:class:`CudaRunner` takes a loaded :class:`~dlrm_serve.model.dlrm.DLRM` (CPU,
tables memory-mapped) and a ``cuda:N`` device:

- **Precision**: ``fp32`` runs with TF32 off (so answers match the CPU to
  about 1e-5); ``bf16`` and ``fp16`` cast the MLP weights (and tables kept
  on the GPU) at load.  The sigmoid and the output are always fp32.
- **Tables** (:func:`~dlrm_serve.runtime.placement.choose_tables`): on the GPU when
  they fit in ``memory_share`` of its free memory; otherwise they stay in
  host memory (the memory-mapped file, shared by the workers through the
  page cache), the CPU gathers the looked-up rows into a pinned buffer and
  only those ``[B*F, D]`` rows cross to the GPU.
- **CUDA graphs**: one graph per batch-size bucket (:data:`DEFAULT_BUCKETS`)
  over everything after the lookup (bottom MLP, interaction, top MLP,
  sigmoid).  A batch is padded up to its bucket and the output sliced, so
  a small batch costs one graph launch instead of a launch per kernel; a
  batch bigger than the largest bucket runs in chunks of it.  The lookup
  itself writes straight into the graph's static input.
- ``torch.compile``: off by default (``compile=True`` compiles the part the
  graphs capture).  Not measured on a GPU yet; it is worth turning on only
  if it pays after its compile time (see docs/gpu.md).

Shapes: ``B`` batch, ``F`` tables, ``D`` embedding dim, ``N`` ids.
"""

from __future__ import annotations

import bisect
import contextlib

import torch

from dlrm_serve.model.dlrm import DLRM
from dlrm_serve.runtime.placement import DEFAULT_MEMORY_SHARE, choose_tables, gpu_free_bytes

__all__ = ["CudaRunner", "PRECISIONS", "DEFAULT_BUCKETS", "bucket_for", "chunks"]

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Padded batch sizes with a captured graph: small batches (1-64 rows) are
# launch-bound, so padding 9 rows to 64 costs nothing; big ones are
# bandwidth-bound, so the steps grow by 8x at most.
DEFAULT_BUCKETS = (1, 8, 64, 512, 4096, 32768)


def bucket_for(rows: int, buckets: tuple[int, ...]) -> int | None:
    """The smallest bucket holding ``rows`` rows, or None when none does."""
    i = bisect.bisect_left(buckets, rows)
    return buckets[i] if i < len(buckets) else None


def chunks(rows: int, size: int) -> list[tuple[int, int]]:
    """``[start, stop)`` ranges of at most ``size`` rows covering ``rows``."""
    return [(a, min(a + size, rows)) for a in range(0, rows, size)]


def _check_buckets(buckets) -> tuple[int, ...]:
    out = tuple(sorted(set(int(b) for b in buckets)))
    if not out or out[0] <= 0:
        raise ValueError(f"graph buckets must be positive batch sizes, got {buckets!r}")
    return out


class _Graph:
    """One captured batch size: static inputs, the graph, its static output."""

    def __init__(self, rows: int, dense: torch.Tensor, pooled: torch.Tensor):
        self.rows = rows
        self.dense = dense  # [rows, num_dense] fp32
        self.pooled = pooled  # [rows*F, D] table dtype
        self.graph = torch.cuda.CUDAGraph()
        self.out: torch.Tensor | None = None  # [rows] fp32


class CudaRunner:
    """Runs ``model`` on ``device`` (a ``torch.device("cuda", N)``); see the module docstring."""

    def __init__(
        self,
        model: DLRM,
        device: torch.device,
        precision: str = "fp32",
        tables: str = "auto",
        memory_share: float = DEFAULT_MEMORY_SHARE,
        cuda_graphs: bool = True,
        buckets: tuple[int, ...] = DEFAULT_BUCKETS,
        compile: bool = False,
    ):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
        # Parity with the CPU: fp32 GEMMs in full fp32, not TF32 (a process-wide switch).
        torch.set_float32_matmul_precision("highest")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        self.model = model
        self.config = cfg = model.config
        self.device = device
        self.precision = precision
        self.dtype = PRECISIONS[precision]
        self.num_tables, self.dim = cfg.num_sparse, cfg.embedding_dim
        sparse = model.sparse_arch
        host_bytes = sum(t.numel() * t.element_size() for t in sparse.state_dict().values())
        table_bytes = host_bytes  # on the GPU float tables take the compute precision
        if sparse.table_dtype == "float32" and self.dtype != torch.float32:
            table_bytes = host_bytes * torch.finfo(self.dtype).bits // 32
        if sparse.table_dtype != "float32":
            # Multi-hot int8 bags are summed with CPU-side helper tensors in
            # SparseArch, so int8 tables are dequantised on the CPU.
            self.tables, self.tables_reason = "host", "int8 tables are dequantised on the CPU, rows copied to the GPU"
        else:
            self.tables, self.tables_reason = choose_tables(
                tables, table_bytes, gpu_free_bytes(device.index or 0), memory_share
            )
        self.table_bytes = table_bytes if self.tables == "device" else host_bytes
        for part in (model.dense_arch, model.interaction, model.over_arch):
            part.to(device=device, dtype=self.dtype)  # .to(dtype) leaves integer buffers alone
        if self.tables == "device":
            sparse.to(device=device, dtype=self.dtype)
        self._table_dtype = sparse.weight.dtype if sparse.table_dtype == "float32" else torch.float32
        self.pinned = False
        self._staging: torch.Tensor | None = None  # host [n, D] rows on their way to the GPU
        # A CPU device runs the same code without graphs or pinned memory:
        # that is how the logic is tested on machines without a GPU.
        self._on_gpu = device.type == "cuda"
        self._copied = torch.cuda.Event() if self._on_gpu else None
        # Ops pick their stream from the current device: make it this runner's
        # one around every call (a worker's current device may be cuda:0).
        self._on_device = (lambda: torch.cuda.device(device)) if self._on_gpu else contextlib.nullcontext
        self._head = torch.compile(self._head_eager, dynamic=False) if compile else self._head_eager
        self.compiled = compile
        self.buckets = _check_buckets(buckets) if cuda_graphs and self._on_gpu else ()
        self._graphs: dict[int, _Graph] = {}
        if self.buckets:
            self._capture()

    # ----- the pieces ----------------------------------------------------------------------
    def _head_eager(self, dense: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """dense ``[B, num_dense]`` fp32 and pooled ``[B*F, D]`` on the device -> p ``[B]`` fp32."""
        m = self.model
        b = dense.shape[0]
        x = m.dense_arch(dense.to(self.dtype))
        e = pooled.view(b, self.num_tables, self.dim).to(self.dtype)
        p = torch.sigmoid(m.over_arch(m.interaction(x, e)).float())
        t = m.loss_threshold
        if 0.0 < t < 1.0:
            p = torch.clamp(p, min=t, max=1.0 - t)
        return p

    def _host_rows(self, rows: int) -> torch.Tensor:
        """A pinned (when possible) host buffer of at least ``rows`` rows, reused across calls."""
        if self._staging is None or self._staging.shape[0] < rows:
            size = 1 << max(10, (rows - 1).bit_length())
            try:
                if not self._on_gpu:
                    raise RuntimeError("nothing to pin for")
                self._staging = torch.empty((size, self.dim), dtype=torch.float32, pin_memory=True)
                self.pinned = True
            except RuntimeError:  # no pinnable memory: pageable copies still work, only slower
                self._staging = torch.empty((size, self.dim), dtype=torch.float32)
                self.pinned = False
        return self._staging

    def _lookup_into(self, out: torch.Tensor, indices: torch.Tensor, offsets: torch.Tensor | None, b: int) -> None:
        """Pooled rows ``[B*F, D]`` of the batch written into ``out`` (on the device)."""
        sparse = self.model.sparse_arch
        if self.tables == "device":
            idx = indices.to(self.device, non_blocking=True)
            if offsets is None:
                torch.index_select(sparse.weight, 0, idx, out=out)
            else:
                off = offsets.to(self.device, non_blocking=True)
                out.copy_(sparse(idx, off, b).view(-1, self.dim))
            return
        # Host tables: gather (or sum the bags) on the CPU, move only those rows.
        idx = indices.cpu()
        n = b * self.num_tables
        if self._copied is not None:
            self._copied.synchronize()  # the last copy out of the staging buffer is done
        rows = self._host_rows(n)[:n]
        if offsets is None and sparse.table_dtype == "float32":
            torch.index_select(sparse.weight, 0, idx, out=rows)
        else:
            rows.copy_(sparse(idx, None if offsets is None else offsets.cpu(), b).view(-1, self.dim))
        out.copy_(rows, non_blocking=self.pinned)
        if self._copied is not None:
            self._copied.record(torch.cuda.current_stream(self.device))

    def _capture(self) -> None:
        """One graph per bucket, largest first, all sharing one memory pool."""
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        with torch.cuda.device(self.device), torch.inference_mode():
            for rows in sorted(self.buckets, reverse=True):
                g = _Graph(
                    rows,
                    torch.zeros((rows, self.config.num_dense), dtype=torch.float32, device=self.device),
                    torch.zeros((rows * self.num_tables, self.dim), dtype=self._table_dtype, device=self.device),
                )
                # Warm-up on a side stream (cuBLAS picks its kernels, the allocator fills) before capture.
                stream.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(stream):
                    for _ in range(2):
                        self._head(g.dense, g.pooled)
                torch.cuda.current_stream(self.device).wait_stream(stream)
                with torch.cuda.graph(g.graph, pool=pool):
                    g.out = self._head(g.dense, g.pooled)
                self._graphs[rows] = g
            torch.cuda.synchronize(self.device)

    # ----- running -------------------------------------------------------------------------
    def forward(self, dense: torch.Tensor, indices: torch.Tensor, offsets: torch.Tensor | None = None) -> torch.Tensor:
        """p ``[B]`` fp32 on the device for dense ``[B, num_dense]``, ids ``[N]`` and bag offsets
        ``[B*F+1]`` (None: one id per bag).  Inputs may be on the CPU or the device."""
        b = dense.shape[0]
        if b == 0:
            return torch.zeros(0, dtype=torch.float32, device=self.device)
        with torch.inference_mode(), self._on_device():
            largest = self.buckets[-1] if self.buckets else 0
            if not largest:
                return self._eager(dense, indices, offsets, b)
            if b <= largest:
                return self._replay(dense, indices, offsets, b).clone()
            out = torch.empty(b, dtype=torch.float32, device=self.device)
            f = self.num_tables
            for start, stop in chunks(b, largest):
                if offsets is None:
                    part_idx, part_off = indices[start * f : stop * f], None
                else:
                    lo, hi = int(offsets[start * f]), int(offsets[stop * f])
                    part_idx, part_off = indices[lo:hi], offsets[start * f : stop * f + 1] - lo
                out[start:stop] = self._replay(dense[start:stop], part_idx, part_off, stop - start)
            return out

    def _eager(self, dense, indices, offsets, b: int) -> torch.Tensor:
        pooled = torch.empty((b * self.num_tables, self.dim), dtype=self._table_dtype, device=self.device)
        self._lookup_into(pooled, indices, offsets, b)
        return self._head(dense.to(self.device, torch.float32, non_blocking=True), pooled)

    def _replay(self, dense, indices, offsets, b: int) -> torch.Tensor:
        """The graph of ``b``'s bucket run on the batch (padding rows hold stale, finite inputs)."""
        g = self._graphs[bucket_for(b, self.buckets)]
        g.dense[:b].copy_(dense, non_blocking=True)
        self._lookup_into(g.pooled[: b * self.num_tables], indices, offsets, b)
        g.graph.replay()
        return g.out[:b]

    def predict_numpy(self, dense, indices, offsets):
        """numpy in, numpy out (float32 ``[B]``); the backend's ``predict``."""
        t = self.forward(
            torch.from_numpy(dense), torch.from_numpy(indices), None if offsets is None else torch.from_numpy(offsets)
        )
        return t.cpu().numpy()

    def describe(self) -> dict:
        return {
            "device": str(self.device),
            "gpu": torch.cuda.get_device_name(self.device) if self._on_gpu else None,
            "precision": self.precision,
            "tf32": False,
            "tables": self.tables,
            "tables_reason": self.tables_reason,
            "table_bytes": self.table_bytes,
            "pinned_staging": self.pinned if self.tables == "host" else None,
            "cuda_graphs": list(self.buckets) if self.buckets else False,
            "compile": self.compiled,
        }
