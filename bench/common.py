"""Helpers shared by the benchmark scripts in ``bench/``.

Every benchmark measures this machine's FP32 GEMM rate in the same run as
its own numbers, so results read as ratios that survive a busy or a
different machine.  Timings are medians of repeats after a warm-up; when
several things are compared they are timed in interleaved rounds, so load
from other processes hits all of them alike.

:func:`drive` is the one load driver of the serving benchmarks: client
threads send request bodies over a transport (REST, gRPC or in-process)
for a fixed time, with the error accounting of every script.

Scripts run as ``python bench/<name>.py`` import this module as
``from common import ...`` (the script's folder is on ``sys.path``); code
run from the repository root can use ``from bench.common import ...``.
"""

from __future__ import annotations

import http.client
import os
import platform
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

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
    "random_columns",
    "request_bodies",
    "CONTENT_TYPES",
    "TRANSPORTS",
    "RequestFailed",
    "RestConnection",
    "GrpcConnection",
    "InProcessConnection",
    "connector",
    "server_processes",
    "cpu_seconds",
    "drive",
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
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, Timing]:
    """Time several functions in interleaved rounds: A B C, A B C, ...

    Noise from other processes then lands on every function alike, so the
    ratios of the medians are steadier than those of separate runs.
    ``block_warmup`` untimed calls start every timed repeat, so that a
    function does not pay for the caches the previous one flushed (a large
    GEMM between forward passes, say).  ``clock=time.process_time`` times
    this process's CPU instead of the wall: steadier on a shared machine.
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
            start = clock()
            for _ in range(n):
                fn()
            out[name].samples.append((clock() - start) / n)
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


# ----- traffic ------------------------------------------------------------------------------
def random_columns(config, rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Criteo-like raw rows: dense counts (10% missing, NaN) and hex categorical strings."""
    rng = np.random.default_rng(seed)
    dense = rng.integers(0, 500, size=(rows, config.num_dense)).astype(np.float64)
    dense[rng.random(dense.shape) < 0.1] = np.nan
    ids = rng.integers(0, 2**32, size=(rows, config.num_sparse), dtype=np.uint64)
    return dense, np.char.mod("%08x", ids)


def _tsv_lines(dense: np.ndarray, sparse: np.ndarray) -> list[str]:
    """Unlabelled Criteo lines (missing dense values as empty fields)."""
    return [
        "\t".join(["" if np.isnan(v) else str(int(v)) for v in d] + list(map(str, s)))
        for d, s in zip(dense, sparse)
    ]


CONTENT_TYPES = {"json": "application/json", "tsv": "text/tab-separated-values", "binary": "application/x-dlrm"}


def request_bodies(encoder, fmt: str, rows: int, copies: int, seed: int = 0) -> list[bytes]:
    """``copies`` request bodies of ``rows`` random rows in ``fmt`` (json, tsv or binary),
    made by the client's own encoder (:func:`dlrm_serve.client.payloads.encode_rows`)."""
    from dlrm_serve.client.payloads import encode_rows

    out = []
    for k in range(copies):
        lines = _tsv_lines(*random_columns(encoder.config, rows, seed=seed + rows * 100 + k))
        out.append(encode_rows(lines, "lines", fmt, encoder).body)
    return out


# ----- the load driver ----------------------------------------------------------------------
TRANSPORTS = ("rest", "grpc", "inprocess")


class RequestFailed(Exception):
    """The server answered, but not with predictions (an HTTP error, an error body)."""


class RestConnection:
    """One keep-alive ``http.client`` connection posting to ``/predictions/MODEL``."""

    def __init__(self, port: int, model: str, key: str | None, timeout: float = 300.0):
        self.port, self.timeout = port, timeout
        self.path = f"/predictions/{model}"
        self.auth = {"Authorization": f"Bearer {key}"} if key else {}
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)

    def __call__(self, body: bytes, content_type: str) -> bytes:
        try:
            self.conn.request("POST", self.path, body=body, headers={**self.auth, "Content-Type": content_type})
            resp = self.conn.getresponse()
            data = resp.read()
        except (OSError, http.client.HTTPException):
            # A fresh connection for the next request; this one counts as an error.
            self.conn.close()
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
            raise
        if resp.status != 200:
            raise RequestFailed(f"HTTP {resp.status}: {data[:200]!r}")
        return data

    def close(self) -> None:
        self.conn.close()


# Room for the biggest bodies and answers (gRPC's receive default is 4 MB), and
# a connection of its own per channel (gRPC Python otherwise shares one between
# channels to the same target), as REST's client threads each have theirs.
GRPC_CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 256 << 20),
    ("grpc.max_receive_message_length", 256 << 20),
    ("grpc.use_local_subchannel_pool", 1),
]


class GrpcConnection:
    """One gRPC channel calling ``Predictions`` with the body as the input ``data``."""

    def __init__(self, target: str, model: str, key: str | None, timeout: float = 300.0):
        import grpc

        from dlrm_serve.client import protos

        self.grpc = grpc
        self.pb = protos.load()
        self.model, self.timeout = model, timeout
        self.metadata = [("authorization", f"Bearer {key}")] if key else []
        self.channel = grpc.insecure_channel(target, options=GRPC_CHANNEL_OPTIONS)
        self.stub = self.pb.inference_pb2_grpc.InferenceAPIsServiceStub(self.channel)
        self._requests: dict[int, Any] = {}  # built once per body, as a real client would reuse them

    def __call__(self, body: bytes, content_type: str) -> bytes:
        req = self._requests.get(id(body))
        if req is None:
            req = self._requests[id(body)] = self.pb.inference_pb2.PredictionsRequest(model_name=self.model, input={"data": body})
        answer = self.stub.Predictions(req, metadata=self.metadata, timeout=self.timeout).prediction
        # gRPC drops per-request status: an error is a body with a "code".
        if answer[:8] == b'{"code":':
            raise RequestFailed(answer[:200].decode("utf-8", "replace"))
        return answer

    def close(self) -> None:
        self.channel.close()


class InProcessConnection:
    """The serving path without TorchServe: :class:`dlrm_serve.serve.serving.Predictor` in this process."""

    def __init__(self, predictor):
        from dlrm_serve.serve.serving import Request

        self.predictor, self.Request = predictor, Request

    def __call__(self, body: bytes, content_type: str) -> bytes:
        replies, _ = self.predictor.handle([self.Request(body, content_type)])
        if not replies[0].ok:
            raise RequestFailed(replies[0].text()[:200])
        return replies[0].text().encode("utf-8")

    def close(self) -> None:
        pass


def connector(transport: str, *, server=None, model: str = "bench", predictor=None) -> Callable[[], Any]:
    """A factory of per-thread connections of ``transport`` (see :data:`TRANSPORTS`)."""
    if transport == "rest":
        return lambda: RestConnection(server.ports.inference, model, server.inference_key)
    if transport == "grpc":
        return lambda: GrpcConnection(server.grpc_inference_target, model, server.inference_key)
    if transport == "inprocess":
        return lambda: InProcessConnection(predictor)
    raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")


def server_processes(server) -> list:
    """psutil handles of a launcher TorchServe: its wrapper, the Java frontend and the Python workers."""
    import psutil

    root = psutil.Process(server.process.pid)
    return [root, *root.children(recursive=True)]


def cpu_seconds(procs: list) -> float:
    """User + system CPU seconds the processes have used so far (ended ones count 0)."""
    import psutil

    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def _count_predictions(answer: bytes) -> int:
    import json

    got = json.loads(answer).get("predictions")
    return len(got) if isinstance(got, list) else -1


def drive(
    connect: Callable[[], Any],
    bodies: Sequence[bytes],
    content_type: str,
    rows: int,
    concurrency: int,
    seconds: float,
    *,
    max_requests: int = 200_000,
    warmup: int = 2,
    server_procs: Sequence[Any] | Mapping[str, Sequence[Any]] = (),
    start_timeout: float = 300.0,
) -> dict:
    """``concurrency`` client threads, each with a connection from ``connect()``,
    send ``bodies`` in turn for ``seconds`` (or ``max_requests`` in all).

    Error accounting:

    - each thread first sends ``warmup`` requests and checks that an answer
      holds ``rows`` predictions; if any thread fails there, the run stops
      and raises (nobody waits on the start barrier forever);
    - in the timed part, a request that fails (an error answer, a broken
      connection) counts as an error and the thread goes on; only answered
      requests count as successes and give latencies;
    - anything else raised in a thread ends that thread, is kept, and is
      reported under ``failures`` (and raised when no request succeeded).

    Returns requests, ok, errors, rows/s of successes, p50/p99 of successful
    requests, and CPU per row of the client and of ``server_procs``.  When
    ``server_procs`` maps group names (say frontend, workers) to processes,
    ``server_cpu_by_group`` gives each group's CPU per row as well.
    """
    groups = dict(server_procs) if isinstance(server_procs, Mapping) else {"server": list(server_procs)}
    server_procs = [p for ps in groups.values() for p in ps]
    if concurrency < 1 or seconds <= 0:
        raise ValueError(f"need concurrency >= 1 and seconds > 0, got {concurrency} and {seconds}")
    lat: list[list[float]] = [[] for _ in range(concurrency)]
    errors = [0] * concurrency
    failures: list[str] = []
    per_thread = max(1, max_requests // concurrency)
    start_gate = threading.Barrier(concurrency + 1)
    deadline = [float("inf")]  # set for real once every client is warm

    def client(i: int) -> None:
        conn = None
        try:
            try:
                conn = connect()
                for w in range(warmup):  # warm the connection and the workers
                    answer = conn(bodies[(i + w) % len(bodies)], content_type)
                    got = _count_predictions(answer)
                    if got != rows:
                        raise RequestFailed(f"expected {rows} predictions, got {got}: {answer[:200]!r}")
            except BaseException as e:
                failures.append(f"warm-up of client {i}: {type(e).__name__}: {e}")
                return
            finally:
                try:
                    start_gate.wait(timeout=start_timeout)
                except threading.BrokenBarrierError:
                    return
            if failures:
                return
            k, out = i, lat[i]
            while time.perf_counter() < deadline[0] and len(out) + errors[i] < per_thread:
                body = bodies[k % len(bodies)]
                k += 1
                t0 = time.perf_counter()
                try:
                    conn(body, content_type)
                except (RequestFailed, OSError, http.client.HTTPException):
                    errors[i] += 1
                    continue
                except Exception as e:  # grpc.RpcError and the like: the request failed
                    if type(e).__module__.startswith("grpc"):
                        errors[i] += 1
                        continue
                    raise
                out.append(time.perf_counter() - t0)
        except BaseException as e:  # kept and reported, not lost with the thread
            failures.append(f"client {i}: {type(e).__name__}: {e}")
        finally:
            if conn is not None:
                conn.close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(concurrency)]
    for t in threads:
        t.start()
    try:
        start_gate.wait(timeout=start_timeout)
    except threading.BrokenBarrierError:
        failures.append(f"the clients were not all warm after {start_timeout:g} s")
    if failures:
        deadline[0] = 0.0
        start_gate.abort()
        for t in threads:
            t.join()
        raise RuntimeError("; ".join(failures[:3]))
    t_start = time.perf_counter()
    cpu_groups, cpu_client = {g: cpu_seconds(ps) for g, ps in groups.items()}, time.process_time()
    deadline[0] = t_start + seconds
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t_start
    cpu_groups = {g: cpu_seconds(ps) - cpu_groups[g] for g, ps in groups.items()}
    cpu_server, cpu_client = sum(cpu_groups.values()), time.process_time() - cpu_client
    ok_lat = np.array([x for xs in lat for x in xs])
    ok = len(ok_lat)
    if failures and ok == 0:
        raise RuntimeError("; ".join(failures[:3]))
    scored = max(ok * rows, 1)
    return {
        "requests": ok + sum(errors),
        "ok": ok,
        "errors": int(sum(errors)),
        "failures": failures,
        "seconds": elapsed,
        "rows_per_s": ok * rows / elapsed,
        "p50_ms": float(np.percentile(ok_lat, 50) * 1e3) if ok else float("nan"),
        "p99_ms": float(np.percentile(ok_lat, 99) * 1e3) if ok else float("nan"),
        "server_cpu_us_per_row": cpu_server / scored * 1e6 if server_procs else float("nan"),
        "server_cpu_by_group": {g: c / scored * 1e6 for g, c in cpu_groups.items()} if server_procs else {},
        "client_cpu_us_per_row": cpu_client / scored * 1e6,
    }
