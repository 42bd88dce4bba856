"""The TorchServe process: finding the script, stopping its whole process
group (the Java frontend and its Python workers), the tail of its logs."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Iterable

from dlrm_serve.errors import LaunchError

__all__ = ["find_torchserve", "stop_process_group", "output_tail"]


def find_torchserve() -> str:
    """The ``torchserve`` script beside this Python, else the one on PATH."""
    here = Path(sys.executable).parent / "torchserve"
    if here.is_file():
        return str(here)
    found = shutil.which("torchserve")
    if found is None:
        raise LaunchError("torchserve not found: install torchserve==0.12.0 (make setup does)")
    return found


def stop_process_group(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """Stop ``proc`` (started with ``start_new_session``) and everything it started.

    The Java frontend gets SIGTERM first so that it shuts its workers down
    and the ``torchserve`` wrapper reaps it; whatever is left of the
    process group after ``timeout`` seconds is killed.
    """
    children = _descendants(proc.pid)
    if proc.poll() is None:
        frontend = _descendants(proc.pid, recursive=False)  # the JVM
        for child in frontend:
            _terminate(child)
        if not frontend:
            _signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    _signal_group(proc.pid, signal.SIGKILL)
    # Workers that outlived the frontend (or left its group) go too.
    for child in children:
        _kill_process(child)


def output_tail(paths: Iterable[Path], lines: int = 40) -> str:
    """The last ``lines`` of each file in ``paths`` that exists, each under its name."""
    parts = []
    for path in paths:
        if path.is_file():
            text = path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]
            parts.append(f"--- {path.name} ---\n" + "\n".join(text))
    return "\n".join(parts)


def _descendants(pid: int, recursive: bool = True) -> list:
    """psutil handles of ``pid``'s descendants (they remember their start time)."""
    try:
        import psutil
    except ImportError:
        return []
    try:
        return psutil.Process(pid).children(recursive=recursive)
    except psutil.Error:
        return []


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # start_new_session made pid the group id
    except (ProcessLookupError, PermissionError):
        pass


def _terminate(proc) -> None:
    import psutil

    try:
        if proc.is_running():
            proc.terminate()
    except psutil.Error:
        pass


def _kill_process(proc) -> None:
    import psutil

    try:
        if proc.is_running():  # false if the pid now belongs to another process
            proc.kill()
    except psutil.Error:
        pass
