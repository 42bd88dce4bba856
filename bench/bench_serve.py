"""End-to-end throughput and latency through TorchServe over REST.

Starts a private TorchServe (dlrm_serve.launcher, free loopback ports), builds
the archive with ./build_mar.sh, registers it with the benchmark's batching
settings, and drives it with keep-alive HTTP clients (one http.client
connection per thread) for JSON and binary payloads of 1, 64 and 1024 rows
at concurrency 1, 4 and 16.  The in-process forward pass on the same rows is
measured in the same run, as is the machine's GEMM rate, so the numbers read
as ratios.  Writes bench/results/bench_serve.{md,png,json}.

    python bench/bench_serve.py            # full run (about 4 minutes)
    python bench/bench_serve.py --quick    # smoke run (about 1 minute)

Targets: binary payloads of 1024 rows reach at least 70% of the in-process
forward throughput; a single-row request at concurrency 1 has p99 <= 5 ms.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import gemm_gflops, machine_info, machine_line, markdown_table, results_dir, save_plot, time_interleaved, write_markdown  # noqa: E402

from dlrm_serve.codecs import encode_binary  # noqa: E402
from dlrm_serve.features import FeatureEncoder  # noqa: E402
from dlrm_serve.launcher import TorchServe  # noqa: E402

__all__ = ["main"]

NAME = "bench_serve"
FORMATS = {"binary": "application/x-dlrm", "json": "application/json"}


# ----- model and payloads ----------------------------------------------------------------
def demo_artifacts(requested: str | None, scratch: Path) -> tuple[Path, str]:
    """The artifacts to serve: ``--artifacts``, else artifacts/ when trained, else a random demo model."""
    if requested:
        return Path(requested), "given"
    trained = ROOT / "artifacts"
    if (trained / "dlrm.json").is_file() and (trained / "dlrm.safetensors").is_file():
        return trained, "trained (artifacts/)"
    import torch

    from dlrm_serve.artifacts import save_artifacts
    from dlrm_serve.config import preset
    from dlrm_serve.model import DLRM

    torch.manual_seed(0)
    out = scratch / "artifacts"
    save_artifacts(DLRM(preset("demo")), out)
    return out, "random demo (artifacts/ is empty)"


def random_rows(config, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Criteo-like raw rows: dense counts (some missing) and hex categorical strings."""
    rng = np.random.default_rng(seed)
    dense = rng.integers(0, 500, size=(n, config.num_dense)).astype(np.float64)
    dense[rng.random(dense.shape) < 0.1] = np.nan
    sparse = rng.integers(0, 2**32, size=(n, config.num_sparse), dtype=np.uint64)
    hexes = np.array([[f"{v:08x}" for v in row] for row in sparse])
    return dense, hexes


def json_body(dense: np.ndarray, hexes: np.ndarray) -> bytes:
    instances = [
        {"dense": [None if np.isnan(v) else int(v) for v in d], "sparse": list(map(str, s))}
        for d, s in zip(dense, hexes)
    ]
    return json.dumps({"instances": instances}, separators=(",", ":")).encode()


def payloads(encoder: FeatureEncoder, sizes: list[int], copies: int) -> dict[tuple[str, int], list[bytes]]:
    out: dict[tuple[str, int], list[bytes]] = {}
    for rows in sizes:
        for fmt in FORMATS:
            out[(fmt, rows)] = []
        for k in range(copies):
            dense, hexes = random_rows(encoder.config, rows, seed=rows * 100 + k)
            out[("json", rows)].append(json_body(dense, hexes))
            out[("binary", rows)].append(encode_binary(encoder.raw_columns(dense, hexes)))
    return out


# ----- in-process reference ------------------------------------------------------------------
class InProcess:
    """The forward pass in this process on ``rows``-row batches of the same kind of rows."""

    def __init__(self, artifacts: Path, encoder: FeatureEncoder, rows: int):
        import torch

        from dlrm_serve.backends import load_backend

        self.torch = torch
        self.rows = rows
        dense, hexes = random_rows(encoder.config, rows, seed=7)
        self.batch = encoder.encode_columns(dense, hexes)
        self.backend = load_backend(artifacts, "torch")
        self.cores = os.cpu_count() or 1

    def _run(self, threads: int):
        def run():
            self.torch.set_num_threads(threads)
            self.backend.predict(self.batch)

        return run

    def measure(self, rounds: int) -> dict:
        """Rows/s with all cores and with one thread (the better one counts), and CPU per row."""
        fns = {f"{self.cores} threads": self._run(self.cores)}
        if self.cores > 1:
            fns["1 thread"] = self._run(1)
        timings = time_interleaved(fns, warmup=1, rounds=rounds, min_repeat_s=0.05)
        # CPU time per row on one thread: what serving's CPU per row compares with.
        self.torch.set_num_threads(1)
        calls = 2 * rounds
        cpu0 = time.process_time()
        for _ in range(calls):
            self.backend.predict(self.batch)
        cpu_us = (time.process_time() - cpu0) / (calls * self.rows) * 1e6
        self.torch.set_num_threads(self.cores)
        rates = {k: self.rows / t.median for k, t in timings.items()}
        best = max(rates, key=rates.get)
        return {"rows_per_s": rates[best], "best": best, "all": rates, "cpu_us_per_row": cpu_us}


# ----- the load generator ----------------------------------------------------------------------
def server_processes(server: TorchServe) -> list:
    """psutil handles of the TorchServe wrapper, the JVM and the Python workers."""
    import psutil

    root = psutil.Process(server.process.pid)
    return [root, *root.children(recursive=True)]


def cpu_seconds(procs: list) -> float:
    """User + system CPU seconds the processes have used so far."""
    import psutil

    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def drive(server: TorchServe, model: str, bodies: list[bytes], ctype: str, rows: int, concurrency: int, seconds: float, max_requests: int) -> dict:
    """Keep-alive clients posting ``bodies`` in turn for ``seconds``; latency of every request."""
    port = server.ports.inference
    headers = {"Authorization": f"Bearer {server.inference_key}", "Content-Type": ctype}
    path = f"/predictions/{model}"
    lat: list[list[float]] = [[] for _ in range(concurrency)]
    errors = [0] * concurrency
    checked = [False] * concurrency
    per_thread = max(1, max_requests // concurrency)
    start_gate = threading.Barrier(concurrency + 1)
    deadline = [float("inf")]  # set for real once every client is connected

    def client(i: int):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        for w in range(2):  # warm the connection and the workers
            conn.request("POST", path, body=bodies[(i + w) % len(bodies)], headers=headers)
            conn.getresponse().read()
        start_gate.wait()
        k = i
        out = lat[i]
        while time.perf_counter() < deadline[0] and len(out) < per_thread:
            body = bodies[k % len(bodies)]
            k += 1
            t0 = time.perf_counter()
            try:
                conn.request("POST", path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
            except (OSError, http.client.HTTPException):
                errors[i] += 1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                continue
            out.append(time.perf_counter() - t0)
            if resp.status != 200:
                errors[i] += 1
            elif not checked[i]:
                got = len(json.loads(data)["predictions"])
                if got != rows:
                    raise RuntimeError(f"expected {rows} predictions, got {got}")
                checked[i] = True
        conn.close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(concurrency)]
    for t in threads:
        t.start()
    procs = server_processes(server)
    start_gate.wait()
    t_start = time.perf_counter()
    cpu_server, cpu_client = cpu_seconds(procs), time.process_time()
    deadline[0] = t_start + seconds
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t_start
    cpu_server, cpu_client = cpu_seconds(procs) - cpu_server, time.process_time() - cpu_client
    all_lat = np.array([x for xs in lat for x in xs])
    done = len(all_lat) - sum(errors)
    scored = max(done * rows, 1)
    return {
        "server_cpu_us_per_row": cpu_server / scored * 1e6,
        "client_cpu_us_per_row": cpu_client / scored * 1e6,
        "requests": int(len(all_lat)),
        "errors": int(sum(errors)),
        "seconds": elapsed,
        "rows_per_s": done * rows / elapsed,
        "p50_ms": float(np.percentile(all_lat, 50) * 1e3) if len(all_lat) else float("nan"),
        "p99_ms": float(np.percentile(all_lat, 99) * 1e3) if len(all_lat) else float("nan"),
    }


# ----- report ------------------------------------------------------------------------------------
def ref_best_one_thread(refs: list[dict]) -> bool:
    """Whether one thread was the faster in-process setting in most measurements."""
    return sum(x["best"] == "1 thread" for x in refs) * 2 > len(refs)



def plot(results: list[dict], reference: float, sizes: list[int]):
    def draw(ax):
        for fmt, style in (("binary", "-"), ("json", "--")):
            for rows in sizes:
                pts = sorted((r["concurrency"], r["rows_per_s"]) for r in results if r["format"] == fmt and r["rows"] == rows)
                if pts:
                    ax.plot(*zip(*pts), style, marker="o", label=f"{fmt}, {rows} rows/request")
        ax.axhline(reference, color="black", linestyle=":", label="in-process forward")
        ax.axhline(0.7 * reference, color="grey", linestyle=":", linewidth=0.8, label="70% of in-process")
        ax.set_xscale("log", base=2)
        concs = sorted({r["concurrency"] for r in results})
        ax.set_xticks(concs, [str(c) for c in concs])
        ax.set_yscale("log")
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel("rows scored per second")
        ax.set_title("DLRM through TorchServe (REST)")
        ax.legend(fontsize=7)

    return save_plot(NAME, draw, figsize=(7.5, 4.5))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: fewer cells, 1 s each")
    p.add_argument("--artifacts", default=None, help="artifacts to serve (default: artifacts/, else a random demo model)")
    p.add_argument("--workers", type=int, default=2, help="TorchServe workers for the model (default: 2)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per worker; 0 = cores / workers")
    p.add_argument("--batch-size", type=int, default=16, help="TorchServe dynamic batch size at registration")
    p.add_argument("--max-batch-delay", type=int, default=0, help="ms TorchServe waits to fill a batch (0: take what is queued)")
    p.add_argument("--seconds", type=float, default=None, help="seconds per cell (default 3, quick 1)")
    p.add_argument("--concurrency", default=None, help="comma list (default 1,4,16; quick 1,4)")
    p.add_argument("--rows", default=None, help="comma list of rows per request (default 1,64,1024; quick 1,1024)")
    args = p.parse_args(argv)

    sizes = [int(x) for x in (args.rows or ("1,1024" if args.quick else "1,64,1024")).split(",")]
    concs = [int(x) for x in (args.concurrency or ("1,4" if args.quick else "1,4,16")).split(",")]
    seconds = args.seconds or (1.0 if args.quick else 3.0)
    # The JVM's C2 compiler keeps working for many seconds after start; warm it
    # on every payload first, or its CPU lands in the first cells.
    warmup = 1.0 if args.quick else 4.0
    info = machine_info()
    load_before = os.getloadavg()
    print(f"machine: {machine_line(info)}; load average {load_before[0]:.2f}")
    gflops = gemm_gflops(1024 if args.quick else 2048)
    print(f"GEMM rate: {gflops:.1f} GFLOP/s")

    with tempfile.TemporaryDirectory(prefix="bench_serve.") as tmp:
        scratch = Path(tmp)
        artifacts, origin = demo_artifacts(args.artifacts, scratch)
        from dlrm_serve.artifacts import load_config

        encoder = FeatureEncoder(load_config(artifacts))
        local = InProcess(artifacts, encoder, max(sizes))
        ref = local.measure(rounds=5 if args.quick else 15)
        print(f"in-process forward, {max(sizes)}-row batches: {ref['rows_per_s']:.0f} rows/s ({ref['best']}; {ref['all']})")
        refs = [ref]

        store = scratch / "model_store"
        store.mkdir()
        build = [
            "bash", str(ROOT / "build_mar.sh"), "--artifacts", str(artifacts), "--model-store", str(store),
            "--model-name", "bench", "--workers", str(args.workers), "--threads", str(args.threads),
            "--archive-format", "zip-store",
        ]
        subprocess.run(build, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        bodies = payloads(encoder, sizes, copies=4)
        results = []
        with TorchServe(
            scratch / "ts", store, base_config=ROOT / "config.properties", load_models=None, log_config=ROOT / "log4j2.xml"
        ) as server:
            server.register(
                "bench.mar", initial_workers=args.workers, batch_size=args.batch_size, max_batch_delay=args.max_batch_delay
            )
            server.wait_ready("bench", workers=args.workers)
            # Warm up the JVM's JIT and the workers on every payload before timing.
            for fmt, ctype in FORMATS.items():
                for rows in sizes:
                    drive(server, "bench", bodies[(fmt, rows)], ctype, rows, 4, warmup, max_requests=200_000)
            for fmt, ctype in FORMATS.items():
                for rows in sizes:
                    for conc in concs:
                        # The reference is measured right before each cell, so both see the same load.
                        near = local.measure(rounds=3)
                        refs.append(near)
                        r = drive(server, "bench", bodies[(fmt, rows)], ctype, rows, conc, seconds, max_requests=200_000)
                        r.update(
                            format=fmt, rows=rows, concurrency=conc,
                            in_process_rows_per_s=near["rows_per_s"],
                            vs_in_process=r["rows_per_s"] / near["rows_per_s"],
                            cpu_efficiency=near["cpu_us_per_row"] / (r["server_cpu_us_per_row"] + r["client_cpu_us_per_row"]),
                        )
                        results.append(r)
                        print(
                            f"{fmt:6s} {rows:5d} rows x {conc:2d} clients: {r['rows_per_s']:10.0f} rows/s "
                            f"({100 * r['vs_in_process']:5.1f}% of in-process {near['rows_per_s']:.0f})  p50 {r['p50_ms']:7.2f} ms  "
                            f"p99 {r['p99_ms']:7.2f} ms  CPU/row: server {r['server_cpu_us_per_row']:.2f} us, "
                            f"client {r['client_cpu_us_per_row']:.2f} us  {r['requests']} requests, {r['errors']} errors"
                        )
            workers = server.describe("bench")[0]["workers"]
    load_after = os.getloadavg()

    big = max(sizes)
    ref_rate = float(np.median([x["rows_per_s"] for x in refs]))
    ref_cpu = float(np.median([x["cpu_us_per_row"] for x in refs]))
    best_bin = max((r for r in results if r["format"] == "binary" and r["rows"] == big), key=lambda r: r["rows_per_s"])
    single = {r["format"]: r for r in results if r["rows"] == 1 and r["concurrency"] == 1}
    best_eff = max((r for r in results if r["format"] == "binary" and r["rows"] == big), key=lambda r: r["cpu_efficiency"])
    cores = local.cores
    # Throughput follows from CPU per row when nothing else runs: serving can use
    # every core, the in-process reference runs on its better thread count.
    projected = cores * best_eff["cpu_efficiency"] if ref_best_one_thread(refs) else best_eff["cpu_efficiency"]
    verdicts = [
        f"- binary, {big} rows/request: best {best_bin['rows_per_s']:.0f} rows/s at {best_bin['concurrency']} clients = "
        f"{100 * best_bin['vs_in_process']:.0f}% of the in-process rate measured next to it (target >= 70%): "
        f"{'met' if best_bin['vs_in_process'] >= 0.7 else 'NOT met'}",
        f"- binary, {big} rows/request: CPU efficiency {100 * best_eff['cpu_efficiency']:.0f}% "
        f"(server + client spend {1 / best_eff['cpu_efficiency']:.1f}x the forward pass's CPU); on an otherwise idle "
        f"machine that projects to {100 * projected:.0f}% of in-process throughput "
        f"({cores} workers on {cores} cores against the forward pass on its better thread count)",
    ]
    for fmt, r in single.items():
        verdicts.append(
            f"- {fmt}, 1 row, 1 client: p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms (target p99 <= 5 ms): "
            f"{'met' if r['p99_ms'] <= 5.0 else 'NOT met'}"
        )
    print("\n".join(verdicts))

    table = markdown_table(
        ["format", "rows/request", "clients", "requests", "rows/s", "% of in-process", "p50 ms", "p99 ms",
         "server CPU us/row", "client CPU us/row", "CPU efficiency %", "errors"],
        [
            [r["format"], r["rows"], r["concurrency"], r["requests"], f"{r['rows_per_s']:.0f}",
             f"{100 * r['vs_in_process']:.1f}", f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}",
             f"{r['server_cpu_us_per_row']:.2f}", f"{r['client_cpu_us_per_row']:.2f}",
             f"{100 * r['cpu_efficiency']:.1f}", r["errors"]]
            for r in results
        ],
    )
    setup = (
        f"Machine: {machine_line(info)}; FP32 GEMM {gflops:.1f} GFLOP/s; load average "
        f"{load_before[0]:.2f} before, {load_after[0]:.2f} after (other processes share the CPU; "
        "the client runs on the same cores as the server).\n\n"
        f"Model: {origin}, {encoder.config.total_rows} table rows x {encoder.config.embedding_dim}. "
        f"Server: TorchServe 0.12, {args.workers} workers, torch threads per worker "
        f"{args.threads or 'cores / workers'}, batchSize {args.batch_size}, maxBatchDelay {args.max_batch_delay} ms, "
        f"{len(workers)} workers up at the end. Client: {seconds:g} s per cell, one keep-alive http.client "
        "connection per client thread.\n\n"
        f"In-process forward ({big}-row batches, same rows, decoding excluded), measured right before "
        f"every cell, the better of {local.cores} threads and 1 thread: median {ref_rate:.0f} rows/s "
        f"(range {min(x['rows_per_s'] for x in refs):.0f}-{max(x['rows_per_s'] for x in refs):.0f}; "
        f"1 thread was the better one {sum(x['best'] == '1 thread' for x in refs)} of {len(refs)} times); "
        f"{ref_cpu:.2f} us of CPU per row on one thread. Each cell's % is against the measurement next to it.\n\n"
        "CPU efficiency = in-process CPU per row / (server + client CPU per row): the share of the CPU "
        "that serving spends on the forward pass itself. Unlike rows/s it hardly moves when other "
        "processes load the machine. Server CPU counts the JVM and the Python workers."
    )
    md = write_markdown(NAME, "Serving benchmark: TorchServe REST vs in-process", [setup, table, "Targets:\n\n" + "\n".join(verdicts)])
    png = plot(results, ref_rate, sizes)
    raw = results_dir() / f"{NAME}.json"
    raw.write_text(json.dumps({"machine": info, "gemm_gflops": gflops, "in_process": refs, "results": results, "args": vars(args)}, indent=2) + "\n")
    print(f"wrote {md}, {png} and {raw}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
