"""Serving-path memory helpers: map a model's tables in full at load.

- :func:`touch_pages` / :func:`touch_tables`: read one byte of every page
  of a tensor (of a model's tables), so a memory-mapped table is mapped in
  full, as it is after traffic has reached every row.
- :func:`touch_backend_tables`: that, for a loaded backend (the handler's
  ``dlrm.touch_tables`` option).
- :func:`touch_mapped_file`: the same for whatever mappings of a file this
  process holds (ONNX Runtime maps its external data without exposing it).

Measurement (PSS, USS, per-file usage) is in :mod:`dlrm_serve.testing.procmem`,
which benchmarks and tests use; it is not shipped in archives.

Mappings are matched to a file by device and inode, read from
``/proc/PID/maps``: psutil's ``memory_maps()`` gives a mapping's path but
not its inode, so it cannot tell a hard link (or an overlay file system's
file) apart.  Linux only.
"""

from __future__ import annotations

import os

__all__ = [
    "PAGE_SIZE",
    "file_identity",
    "mapping_header",
    "same_file",
    "touch_pages",
    "touch_tables",
    "touch_backend_tables",
    "touch_mapped_file",
]

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def file_identity(path: str | os.PathLike) -> tuple[tuple[int, int, int], str]:
    """((major, minor, inode), real path) of a file, what its mappings are matched by."""
    st = os.stat(path)
    return (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino), os.path.realpath(path)


def mapping_header(line: str) -> tuple[tuple[int, int, int], str] | None:
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


def same_file(head: tuple[tuple[int, int, int], str], key: tuple[tuple[int, int, int], str]) -> bool:
    # Device and inode find the file under any name (hard links); the path is the
    # fallback for overlay file systems, whose maps show the underlying device.
    (ident, path), (want, want_path) = head, key
    return ident[2] != 0 and (ident == want or (ident[2] == want[2] and path == want_path))


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
    """:func:`touch_pages` over every table tensor of a :class:`~dlrm_serve.model.dlrm.DLRM`."""
    sparse = getattr(model, "sparse_arch", None)
    if sparse is None:
        raise ValueError(f"{type(model).__name__} has no sparse_arch: not a dlrm_serve DLRM")
    return sum(touch_pages(t) for t in sparse.state_dict().values())


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


def touch_mapped_file(path: str | os.PathLike) -> int:
    """Read one byte of every page of every mapping of ``path`` in this process; returns the bytes spanned.

    For libraries that map a file themselves without handing out its
    address (ONNX Runtime maps aligned external data this way): the
    mappings are found in ``/proc/self/maps`` by device and inode.
    Read-only, so the pages stay shared page-cache pages.
    """
    import ctypes

    import numpy as np

    key = file_identity(path)
    spans = []
    with open("/proc/self/maps", encoding="utf-8", errors="replace") as fh:
        for line in fh:
            head = mapping_header(line)
            parts = line.split(None, 5)
            if head is not None and same_file(head, key) and "r" in parts[1]:
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                spans.append((lo, hi))
    total = 0
    for lo, hi in spans:
        view = np.ctypeslib.as_array((ctypes.c_uint8 * (hi - lo)).from_address(lo))
        view[::PAGE_SIZE].sum(dtype=np.int64)
        total += hi - lo
    return total
