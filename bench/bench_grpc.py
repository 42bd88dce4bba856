"""The serving benchmark with both transports: REST and gRPC through TorchServe.

Reuses bench_serve.py's model, payloads, in-process reference and REST load
generator, and adds a gRPC one built the same way: one channel per client
thread, pre-built ``PredictionsRequest`` messages with the body under the
input ``data`` (TorchServe's own client convention), the inference key as
metadata.  Same rows per request, concurrency and payload formats for both.
Each cell runs the two transports in interleaved rounds (REST then gRPC,
gRPC then REST, ...), so load from other processes lands on both alike.

A second table drives the same server through ``dlrm_serve.client``
(``Client.predict`` on raw rows: encoding, chunking and the thread pool
included), the way ``dlrm-serve predict`` does.

Writes bench/results/bench_grpc.{md,png,json}.

    python bench/bench_grpc.py            # full run (about 3 minutes)
    python bench/bench_grpc.py --quick    # smoke run (about 1 minute)

Target: gRPC with binary payloads at 1024 rows per request reaches at least
the REST throughput.
"""

from __future__ import annotations

import argparse
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_serve  # noqa: E402
from common import gemm_gflops, machine_info, machine_line, markdown_table, results_dir, save_plot, time_call, write_markdown  # noqa: E402

from dlrm_serve.features import FeatureEncoder  # noqa: E402
from dlrm_serve.launcher import TorchServe  # noqa: E402

__all__ = ["drive_grpc", "drive_library", "main"]

NAME = "bench_grpc"
TRANSPORTS = ("rest", "grpc")
# Room for the biggest bodies and answers (gRPC's receive default is 4 MB), and
# a connection of its own per channel (gRPC Python otherwise shares one between
# channels to the same target), as REST's client threads each have theirs.
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 256 << 20),
    ("grpc.max_receive_message_length", 256 << 20),
    ("grpc.use_local_subchannel_pool", 1),
]


def drive_grpc(server: TorchServe, model: str, bodies: list[bytes], ctype: str, rows: int, concurrency: int, seconds: float, max_requests: int) -> dict:
    """gRPC clients calling ``Predictions`` with ``bodies`` in turn for ``seconds``.

    The same measurement as ``bench_serve.drive`` (its signature too; ``ctype``
    is unused: gRPC bodies carry no content type and the handler sniffs them).
    """
    import grpc

    from dlrm_serve import protos

    pb = protos.load()
    metadata = [("authorization", f"Bearer {server.inference_key}")]
    lat: list[list[float]] = [[] for _ in range(concurrency)]
    errors = [0] * concurrency
    per_thread = max(1, max_requests // concurrency)
    start_gate = threading.Barrier(concurrency + 1)
    deadline = [float("inf")]
    failure: list[str] = []

    def client(i: int):
        channel = grpc.insecure_channel(server.grpc_inference_target, options=CHANNEL_OPTIONS)
        stub = pb.inference_pb2_grpc.InferenceAPIsServiceStub(channel)
        requests = [pb.inference_pb2.PredictionsRequest(model_name=model, input={"data": b}) for b in bodies]
        try:
            for w in range(2):  # warm the channel and the workers
                answer = stub.Predictions(requests[(i + w) % len(requests)], metadata=metadata, timeout=60)
            got = json.loads(answer.prediction).get("predictions")
            if not isinstance(got, list) or len(got) != rows:
                failure.append(f"expected {rows} predictions, got {answer.prediction[:200]!r}")
        finally:
            start_gate.wait()
        k = i
        out = lat[i]
        while time.perf_counter() < deadline[0] and len(out) < per_thread:
            req = requests[k % len(requests)]
            k += 1
            t0 = time.perf_counter()
            try:
                answer = stub.Predictions(req, metadata=metadata, timeout=60)
            except grpc.RpcError:
                errors[i] += 1
                out.append(time.perf_counter() - t0)
                continue
            out.append(time.perf_counter() - t0)
            # gRPC drops per-request status: an error is a body with a "code".
            if answer.prediction[:8] == b'{"code":':
                errors[i] += 1
        channel.close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(concurrency)]
    for t in threads:
        t.start()
    procs = bench_serve.server_processes(server)
    start_gate.wait()
    if failure:
        deadline[0] = 0.0
        for t in threads:
            t.join()
        raise RuntimeError(failure[0])
    t_start = time.perf_counter()
    cpu_server, cpu_client = bench_serve.cpu_seconds(procs), time.process_time()
    deadline[0] = t_start + seconds
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t_start
    cpu_server, cpu_client = bench_serve.cpu_seconds(procs) - cpu_server, time.process_time() - cpu_client
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


DRIVERS = {"rest": bench_serve.drive, "grpc": drive_grpc}


def run_cell(server: TorchServe, bodies: list[bytes], ctype: str, rows: int, concurrency: int, seconds: float, rounds: int) -> dict[str, dict]:
    """Both transports on one cell, in ``rounds`` interleaved rounds (A B, B A, ...), pooled.

    rows/s is pooled over the rounds (rows / seconds); p50/p99 are the medians
    of the rounds' values; CPU per row is pooled.
    """
    parts: dict[str, list[dict]] = {t: [] for t in TRANSPORTS}
    for k in range(rounds):
        for transport in TRANSPORTS if k % 2 == 0 else TRANSPORTS[::-1]:
            parts[transport].append(
                DRIVERS[transport](server, "bench", bodies, ctype, rows, concurrency, seconds / rounds, max_requests=200_000)
            )
    out = {}
    for transport, rs in parts.items():
        secs = sum(r["seconds"] for r in rs)
        done_rows = sum(r["rows_per_s"] * r["seconds"] for r in rs)
        out[transport] = {
            "requests": sum(r["requests"] for r in rs),
            "errors": sum(r["errors"] for r in rs),
            "seconds": secs,
            "rows_per_s": done_rows / secs,
            "p50_ms": float(np.median([r["p50_ms"] for r in rs])),
            "p99_ms": float(np.median([r["p99_ms"] for r in rs])),
            "server_cpu_us_per_row": sum(r["server_cpu_us_per_row"] * r["rows_per_s"] * r["seconds"] for r in rs) / max(done_rows, 1),
            "client_cpu_us_per_row": sum(r["client_cpu_us_per_row"] * r["rows_per_s"] * r["seconds"] for r in rs) / max(done_rows, 1),
            "rounds": [r["rows_per_s"] for r in rs],
        }
    return out


def in_process_rate(artifacts: Path, encoder: FeatureEncoder, rows: int, rounds: int) -> float:
    """Forward rows/s in this process on ``rows``-row batches (all cores): the reference line."""
    from dlrm_serve.backends import load_backend

    dense, hexes = bench_serve.random_rows(encoder.config, rows, seed=7)
    batch = encoder.encode_columns(dense, hexes)
    backend = load_backend(artifacts, "torch")
    return rows / time_call(lambda: backend.predict(batch), warmup=2, repeats=rounds, min_repeat_s=0.05).median


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
        dense, hexes = bench_serve.random_rows(client.config, total, seed=99)
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
        "transport": transport,
        "rows_per_request": rows_per_request,
        "concurrency": concurrency,
        "rows_per_s": done / elapsed,
        "client_cpu_us_per_row": cpu / max(done, 1) * 1e6,
        "rows": done,
        "retries": retries,
    }


def plot(results: list[dict], reference: float, sizes: list[int]):
    colors = {}
    palette = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]

    def draw(ax):
        for fmt in bench_serve.FORMATS:
            for rows in sizes:
                color = colors.setdefault((fmt, rows), palette[len(colors) % len(palette)])
                for transport, style, marker in (("grpc", "-", "o"), ("rest", "--", "s")):
                    pts = sorted(
                        (r["concurrency"], r["rows_per_s"])
                        for r in results
                        if r["format"] == fmt and r["rows"] == rows and r["transport"] == transport
                    )
                    if pts:
                        ax.plot(*zip(*pts), style, marker=marker, color=color, label=f"{transport} {fmt}, {rows} rows/request")
        ax.axhline(reference, color="black", linestyle=":", label="in-process forward")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel("rows scored per second")
        ax.set_title("DLRM through TorchServe: gRPC (solid) vs REST (dashed)")
        ax.legend(fontsize=6, ncol=2)

    return save_plot(NAME, draw, figsize=(8.5, 5.0))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: fewer cells, 1 s each")
    p.add_argument("--artifacts", default=None, help="artifacts to serve (default: artifacts/, else a random demo model)")
    p.add_argument("--workers", type=int, default=2, help="TorchServe workers for the model (default: 2)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per worker; 0 = cores / workers")
    p.add_argument("--batch-size", type=int, default=16, help="TorchServe dynamic batch size at registration")
    p.add_argument("--max-batch-delay", type=int, default=1, help="ms TorchServe waits to fill a batch")
    p.add_argument("--seconds", type=float, default=None, help="seconds per cell and transport, all rounds together (default 4, quick 1)")
    p.add_argument("--concurrency", default=None, help="comma list (default 1,4,16; quick 1,4)")
    p.add_argument("--rows", default=None, help="comma list of rows per request (default 1,64,1024; quick 1,1024)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds per cell (default 4, quick 2)")
    p.add_argument("--no-library", action="store_true", help="skip the dlrm_serve.client table")
    args = p.parse_args(argv)

    sizes = [int(x) for x in (args.rows or ("1,1024" if args.quick else "1,64,1024")).split(",")]
    concs = [int(x) for x in (args.concurrency or ("1,4" if args.quick else "1,4,16")).split(",")]
    seconds = args.seconds or (1.0 if args.quick else 4.0)
    args.rounds = args.rounds or (2 if args.quick else 4)
    info = machine_info()
    load_before = os.getloadavg()
    print(f"machine: {machine_line(info)}; load average {load_before[0]:.2f}")
    gflops = gemm_gflops(1024 if args.quick else 2048)
    print(f"GEMM rate: {gflops:.1f} GFLOP/s")

    with tempfile.TemporaryDirectory(prefix="bench_grpc.") as tmp:
        scratch = Path(tmp)
        artifacts, origin = bench_serve.demo_artifacts(args.artifacts, scratch)
        from dlrm_serve.artifacts import load_config

        encoder = FeatureEncoder(load_config(artifacts))
        ref = {"rows_per_s": in_process_rate(artifacts, encoder, max(sizes), rounds=5 if args.quick else 15)}
        print(f"in-process forward, {max(sizes)}-row batches: {ref['rows_per_s']:.0f} rows/s")

        store = scratch / "model_store"
        store.mkdir()
        build = [
            "bash", str(ROOT / "build_mar.sh"), "--artifacts", str(artifacts), "--model-store", str(store),
            "--model-name", "bench", "--workers", str(args.workers), "--threads", str(args.threads),
            "--archive-format", "zip-store",
        ]
        subprocess.run(build, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        bodies = bench_serve.payloads(encoder, sizes, copies=4)
        results: list[dict] = []
        library: list[dict] = []
        # The shipped logging, as in bench_serve: TorchServe's default logs each request a dozen times.
        with TorchServe(
            scratch / "ts", store, base_config=ROOT / "config.properties", load_models=None, log_config=ROOT / "log4j2.xml"
        ) as server:
            server.register(
                "bench.mar", initial_workers=args.workers, batch_size=args.batch_size, max_batch_delay=args.max_batch_delay
            )
            server.wait_ready("bench", workers=args.workers)
            for fmt, ctype in bench_serve.FORMATS.items():
                for rows in sizes:
                    for conc in concs:
                        cell = run_cell(server, bodies[(fmt, rows)], ctype, rows, conc, seconds, args.rounds)
                        for transport, r in cell.items():
                            r.update(transport=transport, format=fmt, rows=rows, concurrency=conc, vs_in_process=r["rows_per_s"] / ref["rows_per_s"])
                            results.append(r)
                            print(
                                f"{transport:4s} {fmt:6s} {rows:5d} rows x {conc:2d} clients: {r['rows_per_s']:10.0f} rows/s "
                                f"({100 * r['vs_in_process']:5.1f}% of in-process)  p50 {r['p50_ms']:7.2f} ms  "
                                f"p99 {r['p99_ms']:7.2f} ms  {r['requests']} requests, {r['errors']} errors",
                                flush=True,
                            )
            if not args.no_library:
                big = max(sizes)
                for conc in [c for c in concs if c > 1] or concs:
                    for transport in TRANSPORTS:
                        r = drive_library(server, artifacts, transport, big, conc, seconds)
                        library.append(r)
                        print(
                            f"dlrm_serve.client {transport:4s} binary {big} rows/request x {conc} in flight: "
                            f"{r['rows_per_s']:10.0f} rows/s, client CPU {r['client_cpu_us_per_row']:.1f} us/row",
                            flush=True,
                        )
    load_after = os.getloadavg()

    big = max(sizes)

    def cell_of(transport, fmt, rows, conc):
        return next(r for r in results if (r["transport"], r["format"], r["rows"], r["concurrency"]) == (transport, fmt, rows, conc))

    best = {
        t: max((r for r in results if r["transport"] == t and r["format"] == "binary" and r["rows"] == big), key=lambda r: r["rows_per_s"])
        for t in TRANSPORTS
    }
    ratio = best["grpc"]["rows_per_s"] / best["rest"]["rows_per_s"]
    per_conc = ", ".join(
        f"{c} clients {cell_of('grpc', 'binary', big, c)['rows_per_s'] / cell_of('rest', 'binary', big, c)['rows_per_s']:.2f}x"
        for c in concs
    )
    verdicts = [
        f"- binary, {big} rows/request: best gRPC {best['grpc']['rows_per_s']:.0f} rows/s ({best['grpc']['concurrency']} clients) "
        f"vs best REST {best['rest']['rows_per_s']:.0f} rows/s ({best['rest']['concurrency']} clients) = {ratio:.2f}x "
        f"(target >= 1.0x): {'met' if ratio >= 1.0 else 'NOT met'}; per concurrency: {per_conc}",
    ]
    print("\n".join(verdicts))

    table = markdown_table(
        ["transport", "format", "rows/request", "clients", "requests", "rows/s", "% of in-process", "p50 ms", "p99 ms",
         "server CPU us/row", "client CPU us/row", "errors"],
        [
            [r["transport"], r["format"], r["rows"], r["concurrency"], r["requests"], f"{r['rows_per_s']:.0f}",
             f"{100 * r['vs_in_process']:.1f}", f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}",
             f"{r['server_cpu_us_per_row']:.1f}", f"{r['client_cpu_us_per_row']:.1f}", r["errors"]]
            for r in results
        ],
    )
    sections = [
        f"Machine: {machine_line(info)}; FP32 GEMM {gflops:.1f} GFLOP/s; load average "
        f"{load_before[0]:.2f} before, {load_after[0]:.2f} after (other processes share the CPU; the "
        "clients run on the same cores as the server).\n\n"
        f"Model: {origin}. Server: TorchServe 0.12, {args.workers} workers, batchSize {args.batch_size}, "
        f"maxBatchDelay {args.max_batch_delay} ms. Each cell ran {seconds:g} s per transport in {args.rounds} "
        "interleaved rounds (REST then gRPC, gRPC then REST, ...); rows/s is pooled over the rounds, p50/p99 are "
        "the medians of the rounds' values. REST: one keep-alive http.client connection per client thread. "
        "gRPC: one channel (and connection) per client thread, the body as the input `data`.\n\n"
        f"In-process forward ({big}-row batches): {ref['rows_per_s']:.0f} rows/s.",
        table,
        "Target:\n\n" + "\n".join(verdicts),
    ]
    if library:
        sections.append(
            "Through `dlrm_serve.client` (`Client.predict` on raw rows: hashing, binary encoding, chunking, "
            "thread pool; what `dlrm-serve predict` does):\n\n"
            + markdown_table(
                ["transport", "rows/request", "in flight", "rows/s", "client CPU us/row", "retries"],
                [[r["transport"], r["rows_per_request"], r["concurrency"], f"{r['rows_per_s']:.0f}",
                  f"{r['client_cpu_us_per_row']:.1f}", r["retries"]] for r in library],
            )
        )
    md = write_markdown(NAME, "Serving benchmark: gRPC vs REST through TorchServe", sections)
    png = plot(results, ref["rows_per_s"], sizes)
    raw = results_dir() / f"{NAME}.json"
    raw.write_text(
        json.dumps({"machine": info, "gemm_gflops": gflops, "in_process": ref, "results": results, "library": library, "args": vars(args)}, indent=2)
        + "\n"
    )
    print(f"wrote {md}, {png} and {raw}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
