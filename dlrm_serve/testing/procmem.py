"""Process memory for benchmarks and tests: PSS, USS, swap, and per mapped file.

Used by the scale benchmark and tests to show that serving workers share one
copy of the tables.  Sizes are in bytes.  Not on the serving path (archives
do not ship it).

psutil gives the totals (``Process.memory_full_info()``: ``rss``, ``uss``,
``pss``, ``swap``).  Read from ``/proc`` here is only what psutil lacks:

- :func:`rollup`: the PSS split into anonymous and file-backed memory
  (``Pss_Anon``, ``Pss_File``) and the ``Anonymous`` total, from
  ``/proc/PID/smaps_rollup``;
- :func:`file_usage`: one file's share, summed over its mappings in
  ``/proc/PID/smaps`` and matched by device and inode (psutil's
  ``memory_maps()`` has the path only), so a hard link or an overlay
  file system's file still counts.

Also :func:`process_memory` (all of it as a :class:`ProcessMemory`),
:func:`torchserve_workers`, :func:`mapped_file` and
:func:`evict_from_page_cache`.  Linux only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from dlrm_serve.errors import LaunchError
from dlrm_serve.runtime.memory import file_identity, mapping_header, same_file

__all__ = [
    "ProcessMemory",
    "rollup",
    "file_usage",
    "process_memory",
    "torchserve_workers",
    "mapped_file",
    "evict_from_page_cache",
]

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
        raise LaunchError(f"no process {pid} (or no {path} on this system: it needs Linux 4.14+)") from None
    if "Pss" not in fields:
        raise LaunchError(f"{path} has no Pss line; got fields {sorted(fields)}")
    return fields


def file_usage(pid: int, path: str | os.PathLike) -> dict[str, int]:
    """Fields of ``/proc/PID/smaps`` summed over the mappings of ``path`` (bytes).

    ``Size`` is the mapped length, ``Rss`` what is resident, ``Pss`` the
    share of it charged to this process, ``Shared_*`` / ``Private_*`` the
    pages that other processes map too or not (``Dirty`` = not yet written
    back to disk, e.g. a file just copied), ``Anonymous`` the pages copied
    on write (0 while the mapping is only read).  All zero when ``pid``
    does not map the file.
    """
    key = file_identity(path)
    totals: dict[str, int] = {}
    inside = False
    try:
        with open(f"/proc/{int(pid)}/smaps", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                head = mapping_header(line)
                if head is not None:
                    inside = same_file(head, key)
                    continue
                if inside:
                    for name, value in _kib_fields([line]).items():
                        totals[name] = totals.get(name, 0) + value
    except FileNotFoundError:
        raise LaunchError(f"no process {pid}") from None
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
    - ``uss``: unique set size, the memory freed if the process ended.
    - ``swap``: swapped-out memory.
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
    uss: int = 0
    swap: int = 0
    file_pss: int = 0
    file_rss: int = 0
    file_mapped: int = 0
    fields: dict = field(default_factory=dict, repr=False)

    @property
    def pss_without_file(self) -> int:
        return self.pss - self.file_pss


def process_memory(pid: int, weights: str | os.PathLike | None = None) -> ProcessMemory:
    """psutil's totals for ``pid``, the anonymous/file split of :func:`rollup`,
    and, when ``weights`` is given, that file's share (:func:`file_usage`)."""
    import psutil  # a TorchServe dependency

    try:
        full = psutil.Process(int(pid)).memory_full_info()
    except psutil.NoSuchProcess:
        raise LaunchError(f"no process {pid}") from None
    r = rollup(pid)
    usage = file_usage(pid, weights) if weights is not None else {"Pss": 0, "Rss": 0, "Size": 0}
    return ProcessMemory(
        pid=int(pid),
        pss=full.pss,
        pss_anon=r.get("Pss_Anon", 0),
        pss_file=r.get("Pss_File", 0),
        anonymous=r.get("Anonymous", 0),
        rss=full.rss,
        uss=full.uss,
        swap=full.swap,
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
        raise LaunchError(f"no process {pid}") from None
    out = []
    for child in children:
        try:
            if any(arg.endswith(_WORKER_SCRIPT) for arg in child.cmdline()):
                out.append(child.pid)
        except psutil.Error:
            continue  # ended while we looked
    return sorted(out)


def mapped_file(address: int, pid: int | str = "self") -> Path | None:
    """The file that the mapping holding ``address`` maps, or None (anonymous memory)."""
    import psutil

    proc = psutil.Process(os.getpid() if pid == "self" else int(pid))
    for m in proc.memory_maps(grouped=False):
        lo, hi = (int(x, 16) for x in m.addr.split("-"))
        if lo <= address < hi:
            # Anonymous mappings have no path, or a bracketed name ([heap], [anon:...]).
            return Path(m.path) if m.path.startswith("/") else None
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
