"""The ONNX Runtime backend: the graphs of :mod:`dlrm_serve.runtime.export` behind
the same small interface as :class:`~dlrm_serve.runtime.backends.TorchBackend`.

A batch with one id per bag (``offsets is None``, the Criteo case) runs the
one-id graph, a plain ``Gather``; a batch with multi-hot or empty bags runs
the general graph with ``bag_ids``.  Both sessions map the tables from the
same ``dlrm.onnx.data``, so the second graph costs no table memory.

Providers: ``onnxruntime-gpu`` lists ``CUDAExecutionProvider`` as available
even where the CUDA libraries are missing, and a session that asks for it
then logs load errors before falling back to the CPU.  CUDA is asked for
only when :func:`cuda_provider_usable` finds that it really loads (checked
quietly, once per process).

Threads: every worker of a server is a process with its own sessions, so
``threads`` defaults to ``max(1, usable_cores // workers)``, with
``workers`` from the argument or the ``DLRM_WORKERS`` environment
variable (default 1): the workers together use each core once instead of
each trying to use them all.  An explicit ``threads`` wins.

How the threads are used: a batch of fewer than ``threads *
MIN_PIECE_ROWS`` rows runs whole, with ``threads`` intra-op threads.  On
the CPU a bigger batch is cut into pieces of at most ``piece_rows`` rows
(and about ``B / threads``), and ``threads`` Python threads run the pieces
at once, each on a one-thread session (onnxruntime releases the GIL).
Measured here, pieces beat intra-op threads on big batches: they need no
synchronisation between ops, the Slice/Concat copies of the interaction
(which onnxruntime runs on one thread) run on every core, and a piece's
activations stay in its core's cache (one thread ran 4096 rows at once at
0.8x the speed of eight pieces of 512).  ``piece_rows=0`` gives every batch
to intra-op threads, which is also what a GPU gets.

On CUDA (``device="cuda"`` or ``"cuda:N"``): the CUDA provider gets
``device_id`` N (TorchServe's ``gpu_id`` per worker, see
:mod:`dlrm_serve.runtime.placement`) and ``use_tf32=0`` (fp32 parity with the CPU).
Batches run through IO binding: the numpy inputs are copied once, straight
into device buffers, and the output stays on the device until its one copy
back.  The tables (graph initializers) live on the GPU; they must fit in
``memory_share`` of its free memory, else loading fails with a clear error
that points at the torch backend, which can keep tables in host memory.
The TensorRT provider is tried only with ``tensorrt=True`` and only where
it really loads; it is off by default because it has not been measured.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import io
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from dlrm_serve.artifacts import WEIGHTS_FILE, load_config
from dlrm_serve.errors import ArtifactError, DeviceError
from dlrm_serve.runtime.export import ONNX_DATA_FILE, ONNX_FILE, ONNX_ONE_ID_FILE, source_problem
from dlrm_serve.io.features import FeatureBatch
from dlrm_serve.runtime.placement import parse_device

__all__ = [
    "OnnxBackend",
    "DEVICES",
    "PIECE_ROWS",
    "MIN_PIECE_ROWS",
    "WORKERS_ENV",
    "cuda_provider_usable",
    "ort_cuda_report",
    "resolve_threads",
    "usable_cores",
    "session_options",
    "batch_pieces",
]

DEVICES = ("auto", "cpu", "cuda")  # and "cuda:N" (see dlrm_serve.runtime.placement.parse_device)
# Most rows of one piece: on one thread, pieces of 256 to 512 rows ran
# fastest here (a piece's activations, a few KB a row, stay in cache).
PIECE_ROWS = 512
# Fewest rows of one piece: on two threads a 64-row batch cut in two pieces
# ran at 0.7x the speed of intra-op threads, a 256-row batch in two tied.
MIN_PIECE_ROWS = 128
WORKERS_ENV = "DLRM_WORKERS"
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask, which containers and taskset narrow)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _positive_int(name: str, value) -> int:
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise ValueError(f"{name} must be a positive integer, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def resolve_threads(
    threads: int | None = None, workers: int | str | None = None, cores: int | None = None
) -> tuple[int, int, str]:
    """``(threads, workers, how)``: the threads one worker's batches may use.

    ``threads`` given (and > 0): used as is.  Otherwise ``cores // workers``
    (at least 1), ``workers`` from the argument, else ``$DLRM_WORKERS``, else 1.
    ``threads=0`` means "not given", as in model-config.yaml.
    """
    if workers is None:
        env = os.environ.get(WORKERS_ENV)
        workers = _positive_int(f"${WORKERS_ENV}", env) if env not in (None, "") else 1
    else:
        workers = _positive_int("workers", workers)
    if threads is not None and not (type(threads) is int and threads == 0):
        return _positive_int("threads", threads), workers, "explicit"
    cores = usable_cores() if cores is None else _positive_int("cores", cores)
    return max(1, cores // workers), workers, f"{cores} cores // {workers} workers"


# A one-node ONNX model (y = x + x, float [1], opset 13), as onnx.helper
# serialises it; kept as bytes so serving does not need the onnx package.
_PROBE_MODEL = (
    b'\x08\x07:9\n\x0e\n\x01x\n\x01x\x12\x01y"\x03Add\x12\x05probeZ\x0f\n\x01x\x12\n\n\x08\x08\x01'
    b'\x12\x04\n\x02\x08\x01b\x0f\n\x01y\x12\n\n\x08\x08\x01\x12\x04\n\x02\x08\x01B\x04\n\x00\x10\r'
)


def _cuda_libraries_load(ort) -> bool:
    capi = Path(ort.__file__).parent / "capi"
    libs = sorted(capi.glob("libonnxruntime_providers_cuda.so*")) + sorted(capi.glob("onnxruntime_providers_cuda.dll"))
    if not libs:
        return False
    shared = sorted(capi.glob("libonnxruntime_providers_shared.so*")) + sorted(capi.glob("onnxruntime_providers_shared.dll"))
    try:
        for lib in shared:
            ctypes.CDLL(str(lib), mode=getattr(ctypes, "RTLD_GLOBAL", 0))
        ctypes.CDLL(str(libs[0]))
        return True
    except OSError:
        return False


@functools.lru_cache(maxsize=None)
def cuda_provider_usable(device_id: int = 0) -> bool:
    """True when onnxruntime's CUDA provider really loads and runs here.

    Quiet: the provider library is first loaded with ctypes (which fails
    silently when libcublas and friends are missing), after letting
    onnxruntime preload CUDA from pip's nvidia packages when it can; only
    then does a one-node session try the provider on ``device_id``, with
    logging at FATAL.  Cached for the process.
    """
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    if CUDA not in ort.get_available_providers():
        return False
    if not _cuda_libraries_load(ort):
        preload = getattr(ort, "preload_dlls", None)
        if preload is None:
            return False
        try:
            # It prints its complaints; they would only repeat what we find out here.
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                preload(cudnn=False)
        except Exception:
            return False
        if not _cuda_libraries_load(ort):
            return False
    try:
        so = ort.SessionOptions()
        so.log_severity_level = 4
        session = ort.InferenceSession(_PROBE_MODEL, so, providers=[(CUDA, {"device_id": device_id}), CPU])
        return session.get_providers()[0] == CUDA
    except Exception:
        return False


@functools.lru_cache(maxsize=None)
def _tensorrt_usable(device_id: int) -> bool:
    """True when the TensorRT provider really runs the probe graph on ``device_id``."""
    try:
        import onnxruntime as ort

        if TENSORRT not in ort.get_available_providers():
            return False
        so = ort.SessionOptions()
        so.log_severity_level = 4
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            session = ort.InferenceSession(
                _PROBE_MODEL, so, providers=[(TENSORRT, {"device_id": device_id}), CPU]
            )
        return session.get_providers()[0] == TENSORRT
    except Exception:
        return False


def ort_cuda_report() -> str:
    """One sentence on what onnxruntime's CUDA support looks like here."""
    try:
        import onnxruntime as ort
    except ImportError:
        return "onnxruntime is not installed"
    listed = ort.get_available_providers()
    if CUDA not in listed:
        return f"onnxruntime {ort.__version__} lists no CUDA provider ({', '.join(listed)}): install onnxruntime-gpu"
    loads = "loads and runs" if cuda_provider_usable() else "does not load (no GPU, or CUDA/cuDNN libraries missing)"
    from dlrm_serve.runtime.placement import torch_cuda_report

    return f"onnxruntime {ort.__version__} lists {', '.join(listed)}; its CUDA provider {loads}; {torch_cuda_report()}"


def spinning(threads: int) -> bool:
    """Whether a session with ``threads`` intra-op threads lets them spin (see :func:`session_options`)."""
    return threads > 1 and threads >= usable_cores()


def batch_pieces(rows: int, threads: int, piece_rows: int = PIECE_ROWS) -> list[tuple[int, int]]:
    """``[start, stop)`` row ranges that cut a batch of ``rows`` for ``threads``
    threads: one range (the whole batch) when ``piece_rows`` is 0 or the
    batch has fewer than ``threads * MIN_PIECE_ROWS`` rows; else pieces of
    about ``rows / threads`` rows, at most ``piece_rows``, at least
    :data:`MIN_PIECE_ROWS`."""
    if rows <= 0:
        return []
    threads = max(1, threads)
    if piece_rows <= 0 or rows < threads * MIN_PIECE_ROWS:
        return [(0, rows)]
    size = max(MIN_PIECE_ROWS, min(piece_rows, -(-rows // threads)))
    return [(a, min(a + size, rows)) for a in range(0, rows, size)]


def session_options(threads: int):
    """The SessionOptions every dlrm-serve session uses, each chosen on purpose.

    ``threads``: intra-op threads of one call (1 when the backend runs
    batch pieces on its own threads).
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    # All graph rewrites: Gemm+Relu and MatMul+Transpose fusions, constant
    # folding of the shape arithmetic.  Done once per session, at load.
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # The graph is a chain (bottom MLP and lookups -> interaction -> top MLP);
    # running its few independent nodes in parallel would need a second
    # thread pool fighting the intra-op threads for the same cores.
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.inter_op_num_threads = 1
    so.intra_op_num_threads = threads
    # The arena keeps freed buffers for the next call instead of returning
    # them to the system: a served model runs the same shapes over and over.
    so.enable_cpu_mem_arena = True
    # A memory pattern is planned per input shape; the batch size changes
    # from call to call here, so patterns would rarely be reused and pile up.
    so.enable_mem_pattern = False
    # Spinning pool threads start the next op sooner, but a spinning thread
    # burns a core that another worker's thread may need: spin only when
    # this session was given every core (one worker), not a share of them.
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning(threads) else "0")
    # Warnings (e.g. nodes placed on the CPU beside CUDA) are not actionable in serving.
    so.log_severity_level = 3
    return so


class _Graphs:
    """The sessions of one thread setting: the general graph and, when there, the one-id graph."""

    def __init__(self, bags, one_id, cuda_id: int | None = None):
        self.bags = bags
        self.one_id = one_id
        # On CUDA: IO binding, the output bound on this device.
        self.cuda_id = cuda_id

    def run(self, batch: FeatureBatch, num_tables: int, outputs: list[str]) -> np.ndarray:
        feeds = {
            "dense": np.ascontiguousarray(batch.dense, dtype=np.float32),
            "indices": np.ascontiguousarray(batch.indices, dtype=np.int64),
        }
        if batch.offsets is None and self.one_id is not None:
            session = self.one_id
        else:
            session = self.bags
            feeds["bag_ids"] = batch.bag_ids(num_tables)
        if self.cuda_id is None:
            return session.run(outputs, feeds)[0]
        return run_bound(session, feeds, outputs[0], self.cuda_id)


def run_bound(session, feeds: dict[str, np.ndarray], output: str, device_id: int) -> np.ndarray:
    """``session``'s ``output`` for ``feeds`` through IO binding on CUDA device ``device_id``:
    each input is copied once into a device buffer, the output is made on the
    device and copied back once."""
    binding = session.io_binding()
    for name, value in feeds.items():
        binding.bind_cpu_input(name, value)
    binding.bind_output(output, "cuda", device_id)
    session.run_with_iobinding(binding)
    return binding.copy_outputs_to_cpu()[0]


class OnnxBackend:
    """ONNX Runtime on the CPU, or on CUDA where its provider really loads.

    ``threads``: threads one batch may use (0 or None: ``usable cores //
    workers``); ``workers``: worker processes sharing this machine (default
    ``$DLRM_WORKERS`` or 1); ``device``: ``auto`` (CUDA when usable, else
    CPU), ``cpu``, ``cuda`` or ``cuda:N`` (a :class:`DeviceError` naming
    what was found when CUDA does not load); ``gpu_id``: the CUDA device
    for ``cuda``/``auto`` (``cuda:N`` wins); ``device_reason``: why this
    device (repeated by :meth:`describe`); ``tables``/``memory_share``: on
    CUDA the tables must fit in ``memory_share`` of the GPU's free memory
    (``tables="host"`` is refused: use the torch backend); ``io_binding``:
    on CUDA, run through IO binding (default); ``tensorrt``: put the
    TensorRT provider first when it loads (default off, unmeasured);
    ``check_weights``: refuse graphs exported
    from other weights than the ``dlrm.safetensors`` beside them;
    ``one_id_graph``: run ``dlrm.one_id.onnx`` for batches with one id per
    bag (False: the general graph for every batch, for comparisons);
    ``piece_rows``: on the CPU, cut batches of ``threads *``
    :data:`MIN_PIECE_ROWS` rows or more into pieces of at most this many
    rows (default :data:`PIECE_ROWS`; 0: never, as on CUDA).  Smaller
    batches run whole, with ``threads`` intra-op threads.
    """

    name = "onnxruntime"

    def __init__(
        self,
        artifacts_dir: str | os.PathLike,
        threads: int | None = None,
        workers: int | None = None,
        device: str = "auto",
        gpu_id: int | None = None,
        check_weights: bool = True,
        one_id_graph: bool = True,
        piece_rows: int | None = None,
        device_reason: str | None = None,
        tables: str = "auto",
        memory_share: float | None = None,
        io_binding: bool = True,
        tensorrt: bool = False,
    ):
        import onnxruntime as ort

        self._ort = ort
        self.artifacts_dir = Path(artifacts_dir)
        self.config = load_config(self.artifacts_dir)
        self.threads, self.workers, self.threads_source = resolve_threads(threads, workers)
        kind, index = parse_device(device)
        gpu = index if index is not None else (0 if gpu_id is None else int(gpu_id))
        if gpu < 0:
            raise ValueError(f"gpu_id must be >= 0, got {gpu_id!r}")
        if kind == "cuda" and not cuda_provider_usable(gpu):
            raise DeviceError(f"device {device!r} asked for, but onnxruntime cannot use cuda:{gpu}: {ort_cuda_report()}")
        use_cuda = kind == "cuda" or (kind == "auto" and cuda_provider_usable(gpu))
        self.device_reason = device_reason or (
            f"device {device!r} asked for" if kind != "auto" else f"device 'auto': {'CUDA' if use_cuda else 'no CUDA'} here"
        )
        self.tables = "cpu"
        self.tables_reason = "tables in the sessions' memory-mapped dlrm.onnx.data"
        providers = [CPU]
        if use_cuda:
            self.tables, self.tables_reason = self._place_tables(tables, gpu, memory_share)
            cuda_options = {"device_id": gpu, "use_tf32": 0}  # fp32 parity with the CPU
            providers = [(CUDA, cuda_options), CPU]
            if tensorrt:
                if not _tensorrt_usable(gpu):
                    raise DeviceError(f"tensorrt asked for, but onnxruntime's TensorRT provider does not load here: {ort_cuda_report()}")
                providers.insert(0, (TENSORRT, {"device_id": gpu}))
        elif tables == "host" or tensorrt:
            raise ValueError("tables and tensorrt options apply to a CUDA device only")
        if piece_rows is None:
            piece_rows = 0 if use_cuda else PIECE_ROWS
        if isinstance(piece_rows, bool) or not isinstance(piece_rows, int) or piece_rows < 0:
            raise ValueError(f"piece_rows must be an integer >= 0 (0: whole batches), got {piece_rows!r}")
        self.piece_rows = piece_rows
        self.io_binding = bool(use_cuda and io_binding)

        general = self.artifacts_dir / ONNX_FILE
        if not general.is_file():
            raise ArtifactError(
                f"{general} not found: run `dlrm-serve export-onnx --artifacts {self.artifacts_dir}` first"
            )
        one_id = self.artifacts_dir / ONNX_ONE_ID_FILE
        # Optional: without it every batch runs the general graph, a little slower.
        use_one_id = one_id_graph and one_id.is_file()

        def graphs(intra_op_threads: int) -> _Graphs:
            so = session_options(intra_op_threads)
            return _Graphs(
                self._session(general, so, providers),
                self._session(one_id, so, providers) if use_one_id else None,
                gpu if self.io_binding else None,
            )

        # Whole batches: every thread inside each op.  Pieces: one thread
        # each, on the pool's threads.  All sessions map the same tables.
        self._whole = graphs(self.threads)
        self._pieces = graphs(1) if piece_rows and self.threads > 1 else self._whole
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="dlrm-onnx") if self._pieces is not self._whole else None
        self._check_source(check_weights)
        self.provider = self._whole.bags.get_providers()[0]
        self.device = f"cuda:{gpu}" if self.provider in (CUDA, TENSORRT) else "cpu"
        if use_cuda and self.device == "cpu":
            # The probe ran CUDA, the real graphs did not: say so rather than serve on the CPU.
            raise DeviceError(f"onnxruntime put {general.name} on {self.provider}, not CUDA: {ort_cuda_report()}")
        self._num_tables = self.config.num_sparse
        self._out = [o.name for o in self._whole.bags.get_outputs()]

    def _place_tables(self, tables: str, gpu: int, memory_share: float | None) -> tuple[str, str]:
        """The tables go where the CUDA provider puts initializers: on the GPU, if they fit."""
        from dlrm_serve.runtime.placement import DEFAULT_MEMORY_SHARE, choose_tables, gpu_free_bytes

        if tables == "host":
            raise DeviceError(
                "tables: host is not possible with onnxruntime on CUDA (its CUDA provider keeps the "
                "graph's tables on the GPU); use the torch backend for tables in host memory"
            )
        row = self.config.embedding_dim * (1 if self.config.table_dtype == "int8" else 4)
        table_bytes = self.config.total_rows * row
        share = DEFAULT_MEMORY_SHARE if memory_share is None else memory_share
        where, reason = choose_tables(tables, table_bytes, gpu_free_bytes(gpu), share)
        if where == "host":
            raise DeviceError(f"onnxruntime on cuda:{gpu}: {reason}; use the torch backend, which can do that")
        return where, reason

    def _session(self, path: Path, so, providers):
        try:
            return self._ort.InferenceSession(str(path), so, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types
            raise ArtifactError(f"{path} could not be loaded by onnxruntime: {e}") from None

    def _check_source(self, check_weights: bool) -> None:
        """The graphs must come from this config (and these weights, when they are here)."""
        # An ONNX archive carries no dlrm.safetensors: then the data file's
        # fingerprint (recorded at export) is what ties tables to graphs.
        weights = self.artifacts_dir / WEIGHTS_FILE if check_weights else None
        data = self.artifacts_dir / ONNX_DATA_FILE if check_weights else None
        for session in (self._whole.bags, self._whole.one_id):
            if session is None:
                continue
            problem = source_problem(session.get_modelmeta().custom_metadata_map, self.config, weights, data)
            if problem is not None:
                raise ArtifactError(
                    f"{problem}: re-export with `dlrm-serve export-onnx --artifacts {self.artifacts_dir}`"
                )

    def predict(self, batch: FeatureBatch) -> np.ndarray:
        b = batch.batch_size
        if b == 0:
            return np.zeros(0, dtype=np.float32)
        spans = batch_pieces(b, self.threads, self.piece_rows)
        if len(spans) == 1:
            return self._whole.run(batch, self._num_tables, self._out)
        f = self._num_tables
        parts = [batch.slice(start, stop, f) for start, stop in spans]

        def run(part: FeatureBatch) -> np.ndarray:
            return self._pieces.run(part, f, self._out)

        outs = self._pool.map(run, parts) if self._pool is not None else map(run, parts)
        return np.concatenate(list(outs))

    def touch_tables(self) -> int:
        """Read one byte of every page of the sessions' mappings of ``dlrm.onnx.data``,
        so this worker holds (and shares) every table page; returns the bytes spanned."""
        from dlrm_serve.runtime.memory import touch_mapped_file

        path = self.artifacts_dir / ONNX_DATA_FILE
        return touch_mapped_file(path) if path.is_file() else 0

    def describe(self) -> dict:
        return {
            "backend": self.name,
            "provider": self.provider,
            "providers": self._whole.bags.get_providers(),
            "device": self.device,
            "device_reason": self.device_reason,
            "tables": self.tables,
            "tables_reason": self.tables_reason,
            "io_binding": self.io_binding,
            "onnxruntime": self._ort.__version__,
            "threads": self.threads,
            "threads_source": self.threads_source,
            "workers": self.workers,
            # Batches of at least min_piece_rows * threads rows run in pieces.
            "piece_rows": self.piece_rows,
            "min_piece_rows": MIN_PIECE_ROWS,
            "session": {
                "graph_optimization": "all",
                "execution_mode": "sequential",
                "intra_op_threads": self.threads,
                "piece_intra_op_threads": 1 if self._pool is not None else self.threads,
                "inter_op_threads": 1,
                "mem_pattern": False,
                "spinning": spinning(self.threads),
            },
            "graphs": [ONNX_FILE] + ([ONNX_ONE_ID_FILE] if self._whole.one_id is not None else []),
            "onnx_opset": self.config.onnx_opset,
            "table_dtype": self.config.table_dtype,
            "table_rows": self.config.total_rows,
        }
