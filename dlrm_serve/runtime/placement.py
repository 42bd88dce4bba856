"""Which device a worker runs on, and where its tables live.

TorchServe gives each worker a ``gpu_id`` (round-robin over the GPUs it
sees) when the archive asks for a GPU (``deviceType: gpu`` in
model-config.yaml) and the server has one; it gives ``None`` otherwise.
:func:`place_worker` turns that, the archive's ``dlrm.device`` setting and
what CUDA this backend can really use into a :class:`Placement`: a device
string (``cpu`` or ``cuda:N``) and a sentence saying why, which the handler
logs and the backend repeats in ``describe()``.

Policy (``dlrm.device``):

- ``auto`` (default): ``cuda:<gpu_id>`` when the archive asks for a GPU,
  TorchServe gave this worker a ``gpu_id`` and the backend can use CUDA;
  otherwise the CPU, with the reason.
- ``cpu``: always the CPU.
- ``cuda`` / ``cuda:N``: CUDA or a :class:`~dlrm_serve.errors.DeviceError`
  (never a silent CPU fallback); ``cuda`` takes TorchServe's ``gpu_id``
  (0 when there is none).

Tables (:func:`choose_tables`): on the GPU when they fit in ``memory_share``
of its free memory, else in host memory with only the looked-up rows
moved.  Every worker holds its own copy of tables placed on a GPU, so GPU
archives default to one worker per GPU.

Nothing here imports torch or onnxruntime at module level; they are asked
only when a CUDA device is in question.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

from dlrm_serve.errors import DeviceError

__all__ = [
    "DEVICE_SETTINGS",
    "TABLE_POLICIES",
    "DEFAULT_MEMORY_SHARE",
    "Placement",
    "parse_device",
    "choose_device",
    "choose_tables",
    "place_worker",
    "backend_options",
    "torch_cuda_report",
    "torch_cuda_devices",
    "resolve_torch_device",
    "gpu_free_bytes",
]

DEVICE_SETTINGS = ("auto", "cpu", "cuda")  # plus cuda:N
TABLE_POLICIES = ("auto", "device", "host")
# Share of a GPU's free memory the tables may take: the rest is for the
# activations of big batches (a 32768-row batch of the Kaggle model needs a
# few hundred MB), CUDA graph pools and the CUDA context.
DEFAULT_MEMORY_SHARE = 0.8
_CUDA_N = re.compile(r"^cuda:(\d+)$")


def parse_device(device: Any) -> tuple[str, int | None]:
    """``("cpu", None)``, ``("auto", None)``, ``("cuda", None)`` or ``("cuda", N)``; ValueError otherwise."""
    if isinstance(device, str):
        d = device.strip().lower()
        if d in DEVICE_SETTINGS:
            return d, None
        m = _CUDA_N.match(d)
        if m:
            return "cuda", int(m.group(1))
    raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")


@dataclass(frozen=True)
class Placement:
    """Where one worker runs: ``device`` (``cpu`` or ``cuda:N``) and why."""

    device: str
    reason: str

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")


def _gpu_id(value: Any) -> int | None:
    if value is None or value == "":
        return None
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"TorchServe's gpu_id must be an integer, got {value!r}") from None
    if n < 0:
        raise ValueError(f"TorchServe's gpu_id must be >= 0, got {value!r}")
    return n


def choose_device(
    setting: str,
    device_type: str | None,
    gpu_id: Any,
    cuda_devices: Callable[[], int],
    found: Callable[[], str] = lambda: "",
) -> Placement:
    """The device of one worker (see the module docstring for the policy).

    ``device_type``: the archive's ``deviceType`` (``gpu``, ``cpu`` or None);
    ``gpu_id``: TorchServe's ``system_properties["gpu_id"]``;
    ``cuda_devices()``: how many CUDA devices the backend can use (asked only
    when it matters); ``found()``: a sentence on what CUDA was found, for
    the reason and the errors.
    """
    kind, index = parse_device(setting)
    gid = _gpu_id(gpu_id)
    if kind == "cpu":
        return Placement("cpu", "dlrm.device is 'cpu'")
    if kind == "cuda":
        n = cuda_devices()
        want = index if index is not None else (gid if gid is not None else 0)
        if n <= 0:
            raise DeviceError(f"dlrm.device is {setting!r}, but CUDA is not usable here: {found()}")
        if want >= n:
            raise DeviceError(f"dlrm.device asks for cuda:{want}, but only {n} CUDA device(s) are usable: {found()}")
        source = "dlrm.device" if index is not None else ("TorchServe's gpu_id" if gid is not None else "default")
        return Placement(f"cuda:{want}", f"dlrm.device is {setting!r}; cuda:{want} from {source}")
    # auto
    dtype = (device_type or "").strip().lower()
    if dtype != "gpu":
        said = f"deviceType: {device_type}" if device_type else "no deviceType"
        return Placement("cpu", f"the archive asks for no GPU ({said} in model-config.yaml)")
    if gid is None:
        return Placement("cpu", "deviceType is gpu, but TorchServe gave this worker no gpu_id (it sees no GPU)")
    n = cuda_devices()
    if n <= 0:
        return Placement("cpu", f"deviceType is gpu and gpu_id is {gid}, but CUDA is not usable here: {found()}")
    if gid >= n:
        raise DeviceError(
            f"TorchServe gave this worker gpu_id {gid}, but only {n} CUDA device(s) are usable "
            f"(check CUDA_VISIBLE_DEVICES against TorchServe's number_of_gpu): {found()}"
        )
    return Placement(f"cuda:{gid}", f"deviceType is gpu; cuda:{gid} from TorchServe's gpu_id")


def choose_tables(
    policy: str, table_bytes: int, free_bytes: int | None, share: float = DEFAULT_MEMORY_SHARE
) -> tuple[str, str]:
    """``("device" | "host", reason)``: where a CUDA worker keeps its tables.

    ``auto``: on the device when ``table_bytes <= share * free_bytes``,
    else in host memory.  ``device`` raises :class:`DeviceError` when the
    tables cannot fit in the free memory at all.
    """
    if policy not in TABLE_POLICIES:
        raise ValueError(f"tables must be one of {TABLE_POLICIES}, got {policy!r}")
    if not 0.0 < share <= 1.0:
        raise ValueError(f"memory_share must be in (0, 1], got {share!r}")
    gib = 1 << 30
    size = f"{table_bytes / gib:.2f} GiB of tables"
    if policy == "host":
        return "host", f"{size} kept in host memory (tables: host)"
    if free_bytes is None:
        return "device", f"{size} on the GPU (its free memory is unknown)"
    room = share * free_bytes
    if policy == "device":
        if table_bytes > free_bytes:
            raise DeviceError(
                f"tables: device, but {size} do not fit in the GPU's {free_bytes / gib:.2f} GiB free; "
                "use tables: auto or host"
            )
        return "device", f"{size} on the GPU (tables: device; {free_bytes / gib:.2f} GiB free)"
    if table_bytes <= room:
        return "device", f"{size} on the GPU (fit in {share:.0%} of {free_bytes / gib:.2f} GiB free)"
    return "host", (
        f"{size} kept in host memory, looked-up rows copied to the GPU "
        f"(more than {share:.0%} of {free_bytes / gib:.2f} GiB free)"
    )


# ----- what CUDA torch can use ----------------------------------------------------------------
def torch_cuda_report() -> str:
    """One sentence on what torch finds: version, CUDA build, availability, device count."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    built = torch.version.cuda
    try:
        available = torch.cuda.is_available()
        count = torch.cuda.device_count() if available else 0
    except Exception as e:  # a broken driver raises from inside torch
        return f"torch {torch.__version__} (CUDA {built}) failed to query CUDA: {type(e).__name__}: {e}"
    if built is None:
        return f"torch {torch.__version__} is a CPU-only build (torch.cuda.is_available() is False, 0 devices)"
    return f"torch {torch.__version__} built for CUDA {built}: torch.cuda.is_available() is {available}, {count} device(s)"


def torch_cuda_devices() -> int:
    """CUDA devices torch can use here (0 when none, never raises)."""
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:
        return 0


def resolve_torch_device(device: str = "cpu"):
    """The ``torch.device`` for ``cpu``, ``cuda`` or ``cuda:N``; :class:`DeviceError` naming
    what was found when CUDA is asked for and not usable (``auto``: CUDA when usable)."""
    import torch

    kind, index = parse_device(device)
    if kind == "cpu":
        return torch.device("cpu")
    n = torch_cuda_devices()
    if kind == "auto":
        return torch.device("cuda:0" if n else "cpu")
    if n <= 0:
        raise DeviceError(f"device {device!r} asked for, but CUDA is not usable: {torch_cuda_report()}")
    want = 0 if index is None else index
    if want >= n:
        raise DeviceError(f"device {device!r} asked for, but only {n} CUDA device(s) are usable: {torch_cuda_report()}")
    return torch.device(f"cuda:{want}")


def gpu_free_bytes(index: int) -> int | None:
    """Free memory of CUDA device ``index`` in bytes, or None when it cannot be asked."""
    try:
        import torch

        if torch.cuda.is_available():
            return int(torch.cuda.mem_get_info(index)[0])
    except Exception:
        pass
    return None


# ----- the TorchServe side ------------------------------------------------------------------
def _cuda_for(backend: str) -> tuple[Callable[[], int], Callable[[], str]]:
    """(device count, report) of what CUDA ``backend`` can use."""
    if backend == "onnxruntime":
        from dlrm_serve.runtime.onnx_backend import cuda_provider_usable, ort_cuda_report

        def count() -> int:
            # onnxruntime cannot count devices; torch (always beside TorchServe) can.
            return (torch_cuda_devices() or 1) if cuda_provider_usable() else 0

        return count, ort_cuda_report
    return torch_cuda_devices, torch_cuda_report


def place_worker(settings: dict, context) -> Placement:
    """The :class:`Placement` of the worker TorchServe's ``context`` describes.

    Reads ``settings["device"]`` and ``settings["backend"]`` (from
    :func:`dlrm_serve.serve.serving.read_settings`), the archive's ``deviceType``
    and ``context.system_properties["gpu_id"]``.
    """
    props = getattr(context, "system_properties", None) or {}
    yaml_config = getattr(context, "model_yaml_config", None) or {}
    count, found = _cuda_for(settings.get("backend", "torch"))
    return choose_device(settings.get("device", "auto"), yaml_config.get("deviceType"), props.get("gpu_id"), count, found)


def backend_options(settings: dict, placement: Placement) -> dict:
    """The ``load_backend`` keyword arguments for ``placement`` and the device settings."""
    options = {"device": placement.device, "device_reason": placement.reason, "precision": settings.get("precision", "fp32")}
    if placement.is_cuda:
        options["tables"] = settings.get("tables", "auto")
        options["memory_share"] = settings.get("gpu_memory_share", DEFAULT_MEMORY_SHARE)
        if settings.get("backend", "torch") == "torch":
            options["cuda_graphs"] = settings.get("cuda_graphs", True)
    return options
