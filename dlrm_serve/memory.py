"""Process memory as Linux accounts it: PSS, private anonymous, per mapped file.

Used by the scale benchmark and tests to show that serving workers share one
copy of the tables.  Linux only (reads ``/proc``); sizes are in bytes.

- :func:`rollup`: a process's totals from ``/proc/PID/smaps_rollup``
  (``Pss``, ``Pss_Anon``, ``Pss_File``, ``Anonymous``, ``Rss``, ...).
- :func:`file_usage`: the same fields summed over the mappings of one file
  in ``/proc/PID/smaps``, matched by device and inode (so a hard link or a
  symlink to the file still counts), or by path and inode on overlay file
  systems.
- :func:`process_memory`: both at once, as a :class:`ProcessMemory`.
- :func:`torchserve_workers`: PIDs of TorchServe's Python workers below a
  process (the ``torchserve`` wrapper or the Java frontend).
- :func:`touch_pages` / :func:`touch_tables`: read one byte of every page
  of a tensor (of a model's tables), so a memory-mapped table is mapped in
  full, as it is after traffic has reached every row.
- :func:`touch_backend_tables`: that, for a loaded backend (the handler's
  ``dlrm.touch_tables`` option).
- :func:`touch_mapped_file`: the same for whatever mappings of a file this
  process holds (for libraries that map a file without exposing it).
- :func:`mapped_file`: the file a pointer's memory is mapped from.
- :func:`evict_from_page_cache`: drop one file's clean pages from the page
  cache (for cold-start measurements; other files are untouched).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

__all__ = [
    "PAGE_SIZE",
    "ProcessMemory",
    "rollup",
    "file_usage",
    "process_memory",
    "torchserve_workers",
    "touch_pages",
    "touch_tables",
    "touch_backend_tables",
    "touch_mapped_file",
    "mapped_file",
    "evict_from_page_cache",
]

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

# The script every TorchServe Python worker runs.
_WORKER_SCRIPT = "model_service_worker.py"


def _kib_fields(lines: Iterable[str]) -> dict[str, int]:
    """``Name:   123 kB`` lines -> {Name: bytes}; other lines are skipped."""
    out: dict[str, int] = {}
    for line in lines:
        name, sep, rest = line.partition(":")
        parts = rest.split()
        if sep and len(parts) == 2 and parts[1] == "kB" and parts[0].isdigit():
            out[name] = int(parts[0]) * 1024
    return out


def rollup(pid: int) -> dict[str, int]:
    """``/proc/PID/smaps_rollup`` as {field: bytes} (``Pss``, ``Pss_Anon``, ``Anonymous``, ...)."""
    path = f"/proc/{int(pid)}/smaps_rollup"
    try:
        with open(path, encoding="ascii") as fh:
            fields = _kib_fields(fh)
    except FileNotFoundError:
        raise ValueError(f"no process {pid} (or no {path} on this system: it needs Linux 4.14+)") from None
    if "Pss" not in fields:
        raise ValueError(f"{path} has no Pss line; got fields {sorted(fields)}")
    return fields


def _file_key(path: str | os.PathLike) -> tuple[tuple[int, int, int], str]:
    """((major, minor, inode), real path) of a file, what its mappings are matched by."""
    st = os.stat(path)
    return (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino), os.path.realpath(path)


def _header(line: str) -> tuple[tuple[int, int, int], str] | None:
    """((major, minor, inode), path) of a maps/smaps mapping line, or None for a field line."""
    parts = line.split(None, 5)
    if len(parts) < 5 or "-" not in parts[0] or ":" not in parts[3]:
        return None
    try:
        int(parts[0].split("-")[0], 16)
        major, minor = (int(x, 16) for x in parts[3].split(":"))
        return (major, minor, int(parts[4])), (parts[5].strip() if len(parts) > 5 else "")
    except ValueError:
        return None


def _same_file(head: tuple[tuple[int, int, int], str], key: tuple[tuple[int, int, int], str]) -> bool:
    # Device and inode find the file under any name (hard links); the path is the
    # fallback for overlay file systems, whose maps show the underlying device.
    (ident, path), (want, want_path) = head, key
    return ident[2] != 0 and (ident == want or (ident[2] == want[2] and path == want_path))


def file_usage(pid: int, path: str | os.PathLike) -> dict[str, int]:
    """Fields of ``/proc/PID/smaps`` summed over the mappings of ``path`` (bytes).

    ``Size`` is the mapped length, ``Rss`` what is resident, ``Pss`` the
    share of it charged to this process, ``Shared_*`` / ``Private_*`` the
    pages that other processes map too or not (``Dirty`` = not yet written
    back to disk, e.g. a file just copied), ``Anonymous`` the pages copied
    on write (0 while the mapping is only read).  All zero when ``pid``
    does not map the file.
    """
    key = _file_key(path)
    totals: dict[str, int] = {}
    inside = False
    try:
        with open(f"/proc/{int(pid)}/smaps", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                head = _header(line)
                if head is not None:
                    inside = _same_file(head, key)
                    continue
                if inside:
                    for name, value in _kib_fields([line]).items():
                        totals[name] = totals.get(name, 0) + value
    except FileNotFoundError:
        raise ValueError(f"no process {pid}") from None
    for name in ("Size", "Rss", "Pss", "Shared_Clean", "Shared_Dirty", "Private_Clean", "Private_Dirty", "Anonymous"):
        totals.setdefault(name, 0)
    return totals


@dataclass
class ProcessMemory:
    """One process's memory, in bytes.

    - ``pss``: proportional set size (shared pages split between their users).
    - ``pss_anon`` / ``pss_file``: its anonymous and file-backed parts.
    - ``anonymous``: anonymous memory, all of it private here (workers are
      not forked from one another).
    - ``rss``: resident set size (shared pages counted in full).
    - ``file_pss`` / ``file_rss`` / ``file_mapped``: PSS, RSS and mapped
      length of the mappings of the weights file, when one was given;
      ``pss - file_pss`` is the memory apart from it.
    """

    pid: int
    pss: int
    pss_anon: int
    pss_file: int
    anonymous: int
    rss: int
    file_pss: int = 0
    file_rss: int = 0
    file_mapped: int = 0
    fields: dict = field(default_factory=dict, repr=False)

    @property
    def pss_without_file(self) -> int:
        return self.pss - self.file_pss


def process_memory(pid: int, weights: str | os.PathLike | None = None) -> ProcessMemory:
    """:func:`rollup` of ``pid`` plus, when ``weights`` is given, that file's share."""
    r = rollup(pid)
    usage = file_usage(pid, weights) if weights is not None else {"Pss": 0, "Rss": 0, "Size": 0}
    return ProcessMemory(
        pid=int(pid),
        pss=r["Pss"],
        pss_anon=r.get("Pss_Anon", 0),
        pss_file=r.get("Pss_File", 0),
        anonymous=r.get("Anonymous", 0),
        rss=r.get("Rss", 0),
        file_pss=usage["Pss"],
        file_rss=usage["Rss"],
        file_mapped=usage["Size"],
        fields=r,
    )


def torchserve_workers(pid: int) -> list[int]:
    """PIDs of the TorchServe Python workers below process ``pid``, sorted.

    ``pid`` is the Java frontend or anything above it (the ``torchserve``
    wrapper started with ``--foreground``); workers are the descendants
    running ``ts/model_service_worker.py``.
    """
    import psutil  # a TorchServe dependency

    try:
        children = psutil.Process(int(pid)).children(recursive=True)
    except psutil.NoSuchProcess:
        raise ValueError(f"no process {pid}") from None
    out = []
    for child in children:
        try:
            if any(arg.endswith(_WORKER_SCRIPT) for arg in child.cmdline()):
                out.append(child.pid)
        except psutil.Error:
            continue  # ended while we looked
    return sorted(out)


def touch_pages(tensor) -> int:
    """Read one byte of every memory page of ``tensor``'s data; returns the bytes spanned.

    For a tensor mapped from a file this maps every page of it into the
    process (from the page cache, or from disk on a miss), without writing,
    so the pages stay shared with every other process mapping the file.
    """
    import torch

    if tensor.numel() == 0:
        return 0
    if not tensor.is_contiguous():
        raise ValueError("touch_pages needs a contiguous tensor")
    flat = tensor.detach().reshape(-1).view(torch.uint8)
    # One byte per page from the first; the last byte covers a final page
    # that a misaligned start leaves past the last stride.
    flat[::PAGE_SIZE].sum(dtype=torch.int64)
    flat[-1].item()
    return int(flat.numel())


def touch_tables(model) -> int:
    """:func:`touch_pages` over every table tensor of a :class:`~dlrm_serve.model.DLRM`."""
    sparse = getattr(model, "sparse_arch", None)
    if sparse is None:
        raise ValueError(f"{type(model).__name__} has no sparse_arch: not a dlrm_serve DLRM")
    return sum(touch_pages(t) for t in sparse.state_dict().values())


def touch_mapped_file(path: str | os.PathLike) -> int:
    """Read one byte of every page of every mapping of ``path`` in this process; returns the bytes spanned.

    For libraries that map a file themselves without handing out its
    address (ONNX Runtime maps aligned external data this way): the
    mappings are found in ``/proc/self/maps`` by device and inode.
    Read-only, so the pages stay shared page-cache pages.
    """
    import ctypes

    import numpy as np

    key = _file_key(path)
    spans = []
    with open("/proc/self/maps", encoding="utf-8", errors="replace") as fh:
        for line in fh:
            head = _header(line)
            parts = line.split(None, 5)
            if head is not None and _same_file(head, key) and "r" in parts[1]:
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                spans.append((lo, hi))
    total = 0
    for lo, hi in spans:
        view = np.ctypeslib.as_array((ctypes.c_uint8 * (hi - lo)).from_address(lo))
        view[::PAGE_SIZE].sum(dtype=np.int64)
        total += hi - lo
    return total


def mapped_file(address: int, pid: int | str = "self") -> Path | None:
    """The file that the mapping holding ``address`` maps, or None (anonymous memory)."""
    with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as fh:
        for line in fh:
            parts = line.split(None, 5)
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if lo <= address < hi:
                if len(parts) < 6 or int(parts[4]) == 0:
                    return None
                return Path(parts[5].strip())
    return None


def evict_from_page_cache(path: str | os.PathLike) -> None:
    """Ask the kernel to drop ``path``'s clean, unmapped pages from the page cache.

    Pages that some process still maps stay; other files are not affected.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def touch_backend_tables(backend) -> int:
    """:func:`touch_tables` for a loaded backend; returns the bytes read (0 if none to touch).

    A torch backend's tables are the memory-mapped file, read page by page.
    Another backend may offer its own ``touch_tables()``; one that holds
    its tables in its own memory has nothing left to map.
    """
    own = getattr(backend, "touch_tables", None)
    if callable(own):
        return int(own())
    model = getattr(backend, "model", None)
    if model is not None and hasattr(model, "sparse_arch"):
        return touch_tables(model)
    return 0
