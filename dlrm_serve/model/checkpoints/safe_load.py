"""Loading ``torch.save`` checkpoints without executing anything in them.

The file is read with ``torch.load(weights_only=True)``.  The other entries
of a facebookresearch/dlrm ``--save-model`` dict (epoch, losses,
accuracies, optimizer state) may hold numpy scalars, because the reference
computes them with numpy; the only globals allowed beyond torch's own are
the ones that rebuild such scalars (:data:`NUMPY_SCALAR_GLOBALS`).
"""

from __future__ import annotations

import math
import os
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dlrm_serve.errors import ArtifactError

__all__ = ["NUMPY_SCALAR_GLOBALS", "load_checkpoint", "plain_number"]


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


def _hint(supported: str) -> str:
    return f"; {supported}" if supported else ""


def _refused(path: Path, what: str, supported: str) -> ArtifactError:
    return ArtifactError(
        f"{path}: refused to load: the checkpoint needs {what}, which is not allowed "
        f"(weights-only loading allows tensors, plain containers and numpy scalars; "
        f"nothing from the file was executed){_hint(supported)}"
    )


def load_checkpoint(path: str | os.PathLike, supported: str = "") -> Any:
    """The object stored in ``path``, loaded without executing pickled code.

    Raises :class:`ArtifactError` for a missing or unreadable file and for a
    pickle that needs a global outside torch's defaults and
    :data:`NUMPY_SCALAR_GLOBALS` (the message names it).  ``supported`` ends
    each message: which checkpoints the caller reads.
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
            raise _refused(p, ", ".join(disallowed), supported)
    try:
        with torch.serialization.safe_globals(NUMPY_SCALAR_GLOBALS):
            # mmap keeps large tables out of memory until they are copied; it needs the zip format.
            return torch.load(str(p), map_location="cpu", weights_only=True, mmap=is_zip)
    except Exception as e:
        text = str(e)
        if "Weights only load failed" in text and any(marker in text for marker in _REFUSED):
            raise _refused(p, _refused_name(e), supported) from None
        raise ArtifactError(
            f"{p} is not a readable PyTorch checkpoint ({_error_detail(e)}){_hint(supported)}"
        ) from None


def plain_number(v: Any) -> int | float | None:
    """``v`` as a plain finite int or float (numpy scalars too), else None."""
    if isinstance(v, bool) or isinstance(v, np.bool_):
        return None
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        x = float(v)
        return x if math.isfinite(x) else None
    return None
