"""Peak resident memory of a process, resettable (Linux).

psutil reports current RSS but not its peak; the kernel keeps the peak as
``VmHWM`` in ``/proc/PID/status`` and resets it to the current RSS when
``5`` is written to ``/proc/PID/clear_refs``.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["can_reset_peak", "reset_peak", "peak_rss", "current_rss"]


def _status(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/{pid}/status has no {key}")


def current_rss(pid: int | None = None) -> int:
    return _status(pid or os.getpid(), "VmRSS")


def peak_rss(pid: int | None = None) -> int:
    return _status(pid or os.getpid(), "VmHWM")


def reset_peak(pid: int | None = None) -> None:
    Path(f"/proc/{pid or os.getpid()}/clear_refs").write_text("5")


def can_reset_peak(pid: int | None = None) -> bool:
    try:
        reset_peak(pid)
    except OSError:
        return False
    return True
