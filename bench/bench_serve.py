"""End-to-end throughput and latency through TorchServe, per transport and payload.

Starts a private TorchServe (dlrm_serve.testing.launcher, free loopback ports), builds
the archive with ./build_mar.sh, registers it with the benchmark's batching
settings, and drives it with :func:`common.drive` (one connection per client
thread) for JSON, TSV and binary payloads of 1, 64 and 1024 rows at
concurrency 1, 4 and 16, over the transports asked for:

- ``rest``: keep-alive ``http.client`` connections;
- ``grpc``: one channel per client, the body as the input ``data``;
- ``inprocess``: the same decode + forward (``dlrm_serve.serve.serving.Predictor``)
  in this process, no TorchServe: the cost of the server around it.

With several transports each cell runs them in interleaved rounds (A B, B A,
...), so load from other processes lands on all alike.  The in-process
forward pass on the same rows is measured right before every cell, as is
the machine's GEMM rate once, so the numbers read as ratios.  Server CPU per
row counts the Java frontend and the Python workers (psutil).

    python bench/bench_serve.py                       # REST (about 5 minutes)
    python bench/bench_serve.py --quick               # smoke run (about 1 minute)
    python bench/bench_serve.py --transports rest,grpc --library   # = bench_grpc.py

Writes bench/results/NAME.{md,png,json} (NAME: bench_serve, or --name).

Targets: binary payloads of 1024 rows reach at least 70% of the in-process
forward throughput; a single-row request at concurrency 1 has p99 <= 5 ms;
with gRPC, gRPC binary at 1024 rows reaches at least the REST throughput.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import CONTENT_TYPES, TRANSPORTS, connector, drive, random_columns, request_bodies  # noqa: E402

from dlrm_serve.io.features import FeatureEncoder  # noqa: E402
from dlrm_serve.testing.launcher import TorchServe  # noqa: E402

__all__ = ["main", "parser", "demo_artifacts"]

NAME = "bench_serve"


# ----- model -------------------------------------------------------------------------------
def demo_artifacts(requested: str | None, scratch: Path) -> tuple[Path, str]:
    """The artifacts to serve: ``--artifacts``, else artifacts/ when trained, else a random demo model."""
    if requested:
        return Path(requested), "given"
    trained = ROOT / "artifacts"
    if (trained / "dlrm.json").is_file() and (trained / "dlrm.safetensors").is_file():
        return trained, "trained (artifacts/)"
    import torch

    from dlrm_serve.config import preset
    from dlrm_serve.model.dlrm import DLRM
    from dlrm_serve.model.weights import save_artifacts

    torch.manual_seed(0)
    out = scratch / "artifacts"
    save_artifacts(DLRM(preset("demo")), out)
    return out, "random demo (artifacts/ is empty)"


class InProcess:
    """The forward pass alone, in this process, on ``rows``-row batches of the same kind of rows."""

    def __init__(self, artifacts: Path, encoder: FeatureEncoder, rows: int, precision: str = "fp32"):
        import torch

        from dlrm_serve.runtime.backends import load_backend

        self.torch = torch
        self.rows = rows
        self.batch = encoder.encode_columns(*random_columns(encoder.config, rows, seed=7))
        self.backend = load_backend(artifacts, "torch", precision=precision)
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
        timings = common.time_interleaved(fns, warmup=1, rounds=rounds, min_repeat_s=0.05)
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


# ----- cells -------------------------------------------------------------------------------
def run_cell(connectors: dict, procs: dict, bodies: list[bytes], ctype: str, rows: int, concurrency: int, seconds: float, rounds: int) -> dict[str, dict]:
    """Every transport on one cell, in ``rounds`` interleaved rounds, pooled.

    rows/s is pooled over the rounds (successful rows / seconds); p50/p99 are
    the medians of the rounds' values; CPU per row is pooled.
    """
    names = list(connectors)
    parts: dict[str, list[dict]] = {t: [] for t in names}
    for k in range(rounds):
        for t in names if k % 2 == 0 else names[::-1]:
            parts[t].append(drive(connectors[t], bodies, ctype, rows, concurrency, seconds / rounds, server_procs=procs[t]))
    out = {}
    for t, rs in parts.items():
        secs = sum(r["seconds"] for r in rs)
        done_rows = sum(r["ok"] for r in rs) * rows
        out[t] = {
            "requests": sum(r["requests"] for r in rs),
            "errors": sum(r["errors"] for r in rs),
            "failures": [f for r in rs for f in r["failures"]],
            "seconds": secs,
            "rows_per_s": done_rows / secs,
            "p50_ms": float(np.median([r["p50_ms"] for r in rs])),
            "p99_ms": float(np.median([r["p99_ms"] for r in rs])),
            "server_cpu_us_per_row": sum(r["server_cpu_us_per_row"] * r["ok"] * rows for r in rs) / max(done_rows, 1),
            "server_cpu_by_group": {
                g: sum(r["server_cpu_by_group"].get(g, 0.0) * r["ok"] * rows for r in rs) / max(done_rows, 1)
                for g in rs[0]["server_cpu_by_group"]
            },
            "client_cpu_us_per_row": sum(r["client_cpu_us_per_row"] * r["ok"] * rows for r in rs) / max(done_rows, 1),
            "rounds": [r["rows_per_s"] for r in rs],
        }
    return out


def drive_library(server: TorchServe, artifacts: Path, transport: str, rows_per_request: int, concurrency: int, seconds: float) -> dict:
    """``dlrm_serve.client`` scoring raw Criteo-like rows, binary payloads, for about ``seconds``."""
    from dlrm_serve.client import Keys, connect

    with connect(
        transport,
        inference_url=server.inference_url,
        management_url=server.management_url,
        grpc_target=server.grpc_inference_target,
        keys=Keys(inference=server.inference_key),
        model="bench",
        config=artifacts,
        payload="binary",
        rows_per_request=rows_per_request,
        concurrency=concurrency,
    ) as client:
        total = rows_per_request * concurrency * 8
        dense, hexes = random_columns(client.config, total, seed=99)
        probs = client.predict(dense=dense, sparse=hexes)  # warm-up, and a check
        if probs.shape != (total,):
            raise RuntimeError(f"expected {total} predictions, got {probs.shape}")
        done, t0 = 0, time.perf_counter()
        cpu0 = time.process_time()
        while time.perf_counter() - t0 < seconds:
            done += len(client.predict(dense=dense, sparse=hexes))
        elapsed = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
        retries = client.stats["retries"]
    return {
        "transport": transport, "rows_per_request": rows_per_request, "concurrency": concurrency,
        "rows_per_s": done / elapsed, "client_cpu_us_per_row": cpu / max(done, 1) * 1e6, "rows": done, "retries": retries,
    }


# ----- report ------------------------------------------------------------------------------
def plot(name: str, results: list[dict], reference: float):
    keys = sorted({(r["transport"], r["format"], r["rows"]) for r in results})
    styles = {"rest": "--", "grpc": "-", "inprocess": ":"}

    def draw(ax):
        for transport, fmt, rows in keys:
            pts = sorted(
                (r["concurrency"], r["rows_per_s"]) for r in results
                if (r["transport"], r["format"], r["rows"]) == (transport, fmt, rows)
            )
            ax.plot(*zip(*pts), styles.get(transport, "-"), marker="o", label=f"{transport} {fmt}, {rows} rows/request")
        ax.axhline(reference, color="black", linestyle=":", label="in-process forward")
        ax.axhline(0.7 * reference, color="grey", linestyle=":", linewidth=0.8, label="70% of in-process")
        ax.set_xscale("log", base=2)
        concs = sorted({r["concurrency"] for r in results})
        ax.set_xticks(concs, [str(c) for c in concs])
        ax.set_yscale("log")
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel("rows scored per second")
        ax.set_title("DLRM through TorchServe")
        ax.legend(fontsize=6, ncol=2)

    return common.save_plot(name, draw, figsize=(8.5, 5.0))


def verdicts(results: list[dict], big: int) -> list[str]:
    out = []
    for t in sorted({r["transport"] for r in results}):
        cells = [r for r in results if r["transport"] == t and r["format"] == "binary" and r["rows"] == big]
        if cells and t != "inprocess":
            best = max(cells, key=lambda r: r["rows_per_s"])
            out.append(
                f"- {t}, binary, {big} rows/request: best {best['rows_per_s']:.0f} rows/s at {best['concurrency']} clients = "
                f"{100 * best['vs_in_process']:.0f}% of the in-process forward measured next to it (target >= 70%): "
                f"{'met' if best['vs_in_process'] >= 0.7 else 'NOT met'}"
            )
        for r in results:
            if r["transport"] == t and r["rows"] == 1 and r["concurrency"] == 1:
                out.append(
                    f"- {t}, {r['format']}, 1 row, 1 client: p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms "
                    f"(target p99 <= 5 ms): {'met' if r['p99_ms'] <= 5.0 else 'NOT met'}"
                )
    best = {
        t: max((r for r in results if r["transport"] == t and r["format"] == "binary" and r["rows"] == big), key=lambda r: r["rows_per_s"], default=None)
        for t in ("rest", "grpc")
    }
    for t in ("rest", "grpc"):
        # JSON's throughput as a share of binary's, at the biggest requests, in the same run.
        cells = {f: [r for r in results if r["transport"] == t and r["format"] == f and r["rows"] == big] for f in ("json", "binary")}
        if cells["json"] and cells["binary"]:
            shares = [j["rows_per_s"] / b["rows_per_s"] for j, b in zip(cells["json"], cells["binary"])]
            out.append(
                f"- {t}, {big} rows/request: JSON at {', '.join(f'{100 * x:.0f}%' for x in shares)} of binary's rows/s "
                f"(clients {', '.join(str(r['concurrency']) for r in cells['json'])}; target >= 35%): "
                f"{'met' if max(shares) >= 0.35 else 'NOT met'}"
            )
    if best["rest"] and best["grpc"]:
        ratio = best["grpc"]["rows_per_s"] / best["rest"]["rows_per_s"]
        out.append(
            f"- binary, {big} rows/request: best gRPC {best['grpc']['rows_per_s']:.0f} vs best REST "
            f"{best['rest']['rows_per_s']:.0f} rows/s = {ratio:.2f}x (target >= 1.0x): {'met' if ratio >= 1.0 else 'NOT met'}"
        )
    return out


def csv_list(text: str, kind=int) -> list:
    return [kind(x) for x in text.split(",") if x]


def parser(name: str = NAME, transports: str = "rest", library: bool = False) -> argparse.ArgumentParser:
    """The options of this script; ``bench_grpc.py`` is this parser with other defaults."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: fewer cells, 1 s each")
    p.add_argument("--artifacts", default=None, help="artifacts to serve (default: artifacts/, else a random demo model)")
    p.add_argument("--workers", type=int, default=2, help="TorchServe workers for the model (default: 2)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per worker; 0 = cores / workers")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"],
                   help="the archive's and the in-process forward's precision (default fp32, so runs compare)")
    p.add_argument("--batch-size", type=int, default=16, help="TorchServe dynamic batch size at registration (default: 16)")
    p.add_argument("--max-batch-delay", type=int, default=1, help="ms TorchServe waits to fill a batch (default: 1, as in the archive)")
    p.add_argument("--seconds", type=float, default=None, help="seconds per cell and transport (default 3, quick 1)")
    p.add_argument("--concurrency", default=None, help="comma list (default 1,4,16; quick 1,4)")
    p.add_argument("--rows", default=None, help="comma list of rows per request (default 1,64,1024; quick 1,1024)")
    p.add_argument("--formats", default="json,tsv,binary", help="comma list of payload formats (default json,tsv,binary)")
    p.add_argument("--transports", default=transports, help=f"comma list of {', '.join(TRANSPORTS)} (default {transports})")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds per cell (default 1 with one transport, else 4; quick 2)")
    p.add_argument("--library", action=argparse.BooleanOptionalAction, default=library, help="also time dlrm_serve.client.Client.predict")
    p.add_argument("--name", default=name, help=f"results file name (default {name})")
    return p


def main(argv: list[str] | None = None, *, defaults: dict | None = None) -> int:
    args = parser(**(defaults or {})).parse_args(argv)
    sizes = csv_list(args.rows or ("1,1024" if args.quick else "1,64,1024"))
    concs = csv_list(args.concurrency or ("1,4" if args.quick else "1,4,16"))
    formats = csv_list(args.formats, str)
    transports = csv_list(args.transports, str)
    for t in transports:
        if t not in TRANSPORTS:
            raise SystemExit(f"unknown transport {t!r}; choose from {TRANSPORTS}")
    seconds = args.seconds or (1.0 if args.quick else 3.0)
    rounds = args.rounds or (1 if len(transports) == 1 else (2 if args.quick else 4))
    # The JVM's C2 compiler keeps working for many seconds after start; warm it
    # on every payload first, or its CPU lands in the first cells.
    warmup = 1.0 if args.quick else 4.0
    info = common.machine_info()
    load_before = os.getloadavg()
    print(f"machine: {common.machine_line(info)}; load average {load_before[0]:.2f}")
    gflops = common.gemm_gflops(1024 if args.quick else 2048)
    print(f"GEMM rate: {gflops:.1f} GFLOP/s")

    with tempfile.TemporaryDirectory(prefix=f"{args.name}.") as tmp:
        scratch = Path(tmp)
        artifacts, origin = demo_artifacts(args.artifacts, scratch)
        from dlrm_serve.artifacts import load_config

        encoder = FeatureEncoder(load_config(artifacts))
        local = InProcess(artifacts, encoder, max(sizes), args.precision)
        refs = [local.measure(rounds=5 if args.quick else 15)]
        print(f"in-process forward, {max(sizes)}-row batches: {refs[0]['rows_per_s']:.0f} rows/s ({refs[0]['best']})")

        store = scratch / "model_store"
        store.mkdir()
        build = [
            "bash", str(ROOT / "build_mar.sh"), "--artifacts", str(artifacts), "--model-store", str(store),
            "--model-name", "bench", "--workers", str(args.workers), "--threads", str(args.threads),
            "--archive-format", "zip-store", "--precision", args.precision,
        ]
        subprocess.run(build, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        bodies = {(fmt, rows): request_bodies(encoder, fmt, rows, copies=4) for fmt in formats for rows in sizes}
        results: list[dict] = []
        library: list[dict] = []
        with TorchServe(
            scratch / "ts", store, base_config=ROOT / "config.properties", load_models=None, log_config=ROOT / "log4j2.xml"
        ) as server:
            server.register("bench.mar", initial_workers=args.workers, batch_size=args.batch_size, max_batch_delay=args.max_batch_delay)
            server.wait_ready("bench", workers=args.workers)
            predictor = None
            if "inprocess" in transports:
                from dlrm_serve.runtime.backends import load_backend
                from dlrm_serve.serve.serving import Predictor

                predictor = Predictor(load_backend(artifacts, "torch", threads=args.threads or None, precision=args.precision))
            connectors = {t: connector(t, server=server, predictor=predictor) for t in transports}
            # The Java frontend apart from the Python workers (and the idle launcher).
            served = common.server_processes(server)
            frontend = [p for p in served if "java" in p.name().lower()]
            groups = {"frontend": frontend, "workers": [p for p in served if p not in frontend]}
            procs = {t: ({} if t == "inprocess" else groups) for t in transports}
            for t in transports:  # warm the JIT and the workers on every payload before timing
                for (fmt, rows), bs in bodies.items():
                    drive(connectors[t], bs, CONTENT_TYPES[fmt], rows, 4, warmup)
            for fmt in formats:
                for rows in sizes:
                    for conc in concs:
                        near = local.measure(rounds=3)  # right before the cell: both see the same load
                        refs.append(near)
                        cell = run_cell(connectors, procs, bodies[(fmt, rows)], CONTENT_TYPES[fmt], rows, conc, seconds, rounds)
                        for t, r in cell.items():
                            cpu = r["client_cpu_us_per_row"] + (0 if t == "inprocess" else r["server_cpu_us_per_row"])
                            r.update(
                                transport=t, format=fmt, rows=rows, concurrency=conc,
                                in_process_rows_per_s=near["rows_per_s"], vs_in_process=r["rows_per_s"] / near["rows_per_s"],
                                cpu_efficiency=near["cpu_us_per_row"] / cpu if cpu > 0 else float("nan"),
                            )
                            results.append(r)
                            print(
                                f"{t:9s} {fmt:6s} {rows:5d} rows x {conc:2d} clients: {r['rows_per_s']:10.0f} rows/s "
                                f"({100 * r['vs_in_process']:5.1f}% of in-process)  p50 {r['p50_ms']:7.2f} ms  "
                                f"p99 {r['p99_ms']:7.2f} ms  CPU/row: server {r['server_cpu_us_per_row']:.2f} us, "
                                f"client {r['client_cpu_us_per_row']:.2f} us  {r['requests']} requests, {r['errors']} errors"
                                + (f", failures: {r['failures'][:2]}" if r["failures"] else ""),
                                flush=True,
                            )
            if args.library:
                big = max(sizes)
                for conc in [c for c in concs if c > 1] or concs:
                    for t in [t for t in transports if t != "inprocess"]:
                        r = drive_library(server, artifacts, t, big, conc, seconds)
                        library.append(r)
                        print(f"dlrm_serve.client {t:4s} binary {big} rows/request x {conc} in flight: {r['rows_per_s']:10.0f} rows/s", flush=True)
            workers = server.describe("bench")[0]["workers"]
    load_after = os.getloadavg()

    big = max(sizes)
    ref_rate = float(np.median([x["rows_per_s"] for x in refs]))
    ref_cpu = float(np.median([x["cpu_us_per_row"] for x in refs]))
    lines = verdicts(results, big)
    print("\n".join(lines))
    table = common.markdown_table(
        ["transport", "format", "rows/request", "clients", "requests", "errors", "rows/s", "% of in-process", "p50 ms", "p99 ms",
         "server CPU us/row", "of it frontend", "of it workers", "client CPU us/row", "CPU efficiency %"],
        [
            [r["transport"], r["format"], r["rows"], r["concurrency"], r["requests"], r["errors"], f"{r['rows_per_s']:.0f}",
             f"{100 * r['vs_in_process']:.1f}", f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}",
             f"{r['server_cpu_us_per_row']:.2f}", f"{r['server_cpu_by_group'].get('frontend', float('nan')):.2f}",
             f"{r['server_cpu_by_group'].get('workers', float('nan')):.2f}",
             f"{r['client_cpu_us_per_row']:.2f}", f"{100 * r['cpu_efficiency']:.1f}"]
            for r in results
        ],
    )
    setup = (
        f"Machine: {common.machine_line(info)}; FP32 GEMM {gflops:.1f} GFLOP/s; load average "
        f"{load_before[0]:.2f} before, {load_after[0]:.2f} after (other processes share the CPU; "
        "the clients run on the same cores as the server).\n\n"
        f"Model: {origin}, {encoder.config.total_rows} table rows x {encoder.config.embedding_dim}. "
        f"Server: TorchServe 0.12, precision {args.precision}, {args.workers} workers, torch threads per worker {args.threads or 'cores / workers'}, "
        f"batchSize {args.batch_size}, maxBatchDelay {args.max_batch_delay} ms, {len(workers)} workers up at the end. "
        f"Each cell: {seconds:g} s per transport in {rounds} interleaved round(s); one connection per client thread "
        "(REST keep-alive http.client; gRPC one channel, the body as input `data`; in-process: Predictor.handle).\n\n"
        f"In-process forward ({big}-row batches, decoding excluded), measured right before every cell, the better of "
        f"{local.cores} threads and 1 thread: median {ref_rate:.0f} rows/s; {ref_cpu:.2f} us of CPU per row on one thread.\n\n"
        "CPU efficiency = in-process CPU per row / (server + client CPU per row): the share of the CPU that serving "
        "spends on the forward pass itself. Server CPU counts the JVM and the Python workers."
    )
    sections = [setup, table, "Targets:\n\n" + "\n".join(lines)]
    if library:
        sections.append(
            "Through `dlrm_serve.client` (`Client.predict` on raw rows: hashing, binary encoding, chunking, thread pool):\n\n"
            + common.markdown_table(
                ["transport", "rows/request", "in flight", "rows/s", "client CPU us/row", "retries"],
                [[r["transport"], r["rows_per_request"], r["concurrency"], f"{r['rows_per_s']:.0f}",
                  f"{r['client_cpu_us_per_row']:.1f}", r["retries"]] for r in library],
            )
        )
    md = common.write_markdown(args.name, "Serving benchmark: TorchServe by transport and payload", sections)
    png = plot(args.name, results, ref_rate)
    raw = common.results_dir() / f"{args.name}.json"
    raw.write_text(json.dumps({"machine": info, "gemm_gflops": gflops, "in_process": refs, "results": results, "library": library, "args": vars(args)}, indent=2) + "\n")
    print(f"wrote {md}, {png} and {raw}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
