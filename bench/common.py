"""Helpers shared by the benchmark scripts in ``bench/``.

Every benchmark measures this machine's FP32 GEMM rate in the same run as
its own numbers, so results read as ratios that survive a busy or a
different machine.  Timings are medians of repeats after a warm-up; when
several things are compared they are timed in interleaved rounds, so load
from other processes hits all of them alike.

Scripts run as ``python bench/<name>.py`` import this module as
``from common import ...`` (the script's folder is on ``sys.path``); code
run from the repository root can use ``from bench.common import ...``.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

__all__ = [
    "RESULTS_DIR",
    "Timing",
    "results_dir",
    "time_call",
    "time_interleaved",
    "gemm_gflops",
    "machine_info",
    "machine_line",
    "markdown_table",
    "write_markdown",
    "save_plot",
]

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def results_dir() -> Path:
    """``bench/results``, created if missing."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    return RESULTS_DIR


@dataclass
class Timing:
    """Seconds per call of one timed function, one entry per repeat."""

    samples: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def best(self) -> float:
        return min(self.samples)

    @property
    def spread(self) -> float:
        """Interquartile range over the median (0 = perfectly steady)."""
        if len(self.samples) < 4:
            return 0.0
        q = statistics.quantiles(self.samples, n=4)
        return (q[2] - q[0]) / self.median


def _calls_per_repeat(fn: Callable[[], object], min_repeat_s: float) -> int:
    """How many calls make one repeat last at least ``min_repeat_s``."""
    start = time.perf_counter()
    fn()
    once = max(time.perf_counter() - start, 1e-7)
    return max(1, int(min_repeat_s / once + 0.5))


def time_call(
    fn: Callable[[], object], warmup: int = 3, repeats: int = 15, min_repeat_s: float = 0.02
) -> Timing:
    """Time ``fn()``: ``warmup`` untimed calls, then ``repeats`` timed repeats.

    A repeat runs ``fn`` enough times to last ``min_repeat_s`` (so that
    microsecond calls are not lost in timer noise) and records seconds per call.
    """
    if warmup < 0 or repeats < 1 or min_repeat_s < 0:
        raise ValueError(
            f"need warmup >= 0, repeats >= 1 and min_repeat_s >= 0, got {warmup}, {repeats}, {min_repeat_s}"
        )
    for _ in range(warmup):
        fn()
    inner = _calls_per_repeat(fn, min_repeat_s)
    out = Timing()
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        out.samples.append((time.perf_counter() - start) / inner)
    return out


def time_interleaved(
    fns: Mapping[str, Callable[[], object]],
    warmup: int = 3,
    rounds: int = 15,
    min_repeat_s: float = 0.02,
    block_warmup: int = 0,
) -> dict[str, Timing]:
    """Time several functions in interleaved rounds: A B C, A B C, ...

    Noise from other processes then lands on every function alike, so the
    ratios of the medians are steadier than those of separate runs.
    ``block_warmup`` untimed calls start every timed repeat, so that a
    function does not pay for the caches the previous one flushed (a large
    GEMM between forward passes, say).
    """
    if not fns:
        raise ValueError("time_interleaved needs at least one function")
    if warmup < 0 or rounds < 1 or block_warmup < 0:
        raise ValueError(
            f"need warmup >= 0, rounds >= 1 and block_warmup >= 0, got {warmup}, {rounds} and {block_warmup}"
        )
    inner = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
        inner[name] = _calls_per_repeat(fn, min_repeat_s)
    out = {name: Timing() for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            n = inner[name]
            for _ in range(block_warmup):
                fn()
            start = time.perf_counter()
            for _ in range(n):
                fn()
            out[name].samples.append((time.perf_counter() - start) / n)
    return out


def gemm_gflops(n: int = 2048, repeats: int = 9) -> float:
    """This machine's FP32 matrix-multiply rate in GFLOP/s: median of ``n x n`` ``torch.mm``.

    Uses torch's current thread count, so it is the roofline of whatever
    the benchmark itself runs with.
    """
    import torch

    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen)
    b = torch.randn(n, n, generator=gen)
    c = torch.empty(n, n)
    timing = time_call(lambda: torch.mm(a, b, out=c), warmup=2, repeats=repeats, min_repeat_s=0.0)
    return 2.0 * n**3 / timing.median / 1e9


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    """CPU model, cores, memory and the torch build: enough to tell two runs apart."""
    info: dict = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
    }
    try:
        info["usable_cores"] = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        info["usable_cores"] = info["cores"]
    try:
        import psutil

        info["memory_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    return info


def machine_line(info: dict | None = None) -> str:
    """``machine_info`` as one line for a results header."""
    info = machine_info() if info is None else info
    parts = [f"{info['cpu']}", f"{info['usable_cores']} usable cores"]
    if "memory_gib" in info:
        parts.append(f"{info['memory_gib']} GiB RAM")
    if "torch" in info:
        parts.append(f"torch {info['torch']} ({info['torch_threads']} threads)")
    parts.append(f"Python {info['python']}")
    return ", ".join(parts)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub Markdown table; every row must have one cell per header."""
    for i, row in enumerate(rows):
        if len(row) != len(headers):
            raise ValueError(f"row {i} has {len(row)} cells but there are {len(headers)} headers: {list(row)}")
    lines = ["| " + " | ".join(str(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_markdown(name: str, title: str, sections: Sequence[str]) -> Path:
    """Write ``bench/results/<name>.md``: a title, then the sections separated by blank lines."""
    path = results_dir() / f"{name}.md"
    body = f"# {title}\n\n" + "\n".join(s.rstrip("\n") + "\n" for s in sections)
    path.write_text(body, encoding="utf-8")
    return path


def save_plot(name: str, draw: Callable[[object], None], figsize: tuple[float, float] = (7.0, 4.0)) -> Path:
    """Write ``bench/results/<name>.png``; ``draw(ax)`` fills one matplotlib axes."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    path = results_dir() / f"{name}.png"
    fig, ax = plt.subplots(figsize=figsize)
    try:
        draw(ax)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
    return path
