"""Parsing TorchServe's logs: where a worker's start went (for ``bench_scale.py``)."""

from __future__ import annotations


def _log_time(line: str) -> float | None:
    """Seconds since the epoch of a TorchServe log line (``2026-01-02T03:04:05,678 ...``)."""
    import datetime as dt

    try:
        return dt.datetime.strptime(line[:23], "%Y-%m-%dT%H:%M:%S,%f").timestamp()
    except ValueError:
        return None

def worker_phases(ts) -> dict:
    """Where the latest worker start went, from TorchServe's logs (None where a mark is missing).

    ``python_s``: from the worker's command line to "Torch worker started"
    (the interpreter, torch and TorchServe's imports); ``load_s``: from the
    LOAD command to the handler's "dlrm handler ready" (the model itself).
    """
    marks = {"spawn": "Worker cmdline:", "started": "Torch worker started", "load": "Flushing req.cmd LOAD", "ready": "dlrm handler ready"}
    last: dict[str, float | None] = dict.fromkeys(marks)
    for line in ts.log_text("ts_log.log").splitlines():
        for key, text in marks.items():
            if text in line:
                last[key] = _log_time(line)

    def span(a: str, b: str) -> float | None:
        return None if last[a] is None or last[b] is None else round(last[b] - last[a], 3)

    return {"python_s": span("spawn", "started"), "load_s": span("load", "ready")}
