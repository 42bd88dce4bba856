"""Torch (eager, TorchScript, torch.compile) against ONNX Runtime, in one process.

The model is the MLPerf Criteo Kaggle DLRM (``preset("criteo-kaggle")``)
with its tables capped at ``--max-rows`` rows (100k by default, 2.2M rows in
all instead of 33.8M): the forward pass does the same work, only the
lookups hit the cache more often, and the artifacts are written in seconds.
Inputs are random Criteo-style rows (hex ids, one per bag) encoded by the
serving encoder; each variant is timed on the same decoded batch, from
numpy arrays to numpy probabilities, as a backend's ``predict`` is.

Variants: ``torch eager`` (the model as served, fp32), ``torch bf16``
(``TorchBackend(precision="bf16")``: bfloat16 MLPs and interaction, CPU
only; see docs/precision.md), ``torch jit`` (traced and
frozen TorchScript), ``torch.compile`` (inductor, dynamic shapes; skipped
with its error when it does not work here) and ``onnxruntime`` (the
:class:`OnnxBackend` as served: batch pieces on its threads, the one-id
graph); two more ONNX Runtime rows show what its choices are worth: the
general graph on the same one-id batches, and whole batches on intra-op
threads instead of pieces.  They are timed in interleaved rounds, so
load from other processes hits them alike, and each is reported as samples/s
and as a fraction of the roofline: the FP32 GEMM rate measured in the same
run divided by ``config.flops_per_sample()``.

A second table times multi-hot bags (1 to 3 ids per bag: the general graph
of ONNX Runtime, ``embedding_bag`` for torch).  Unless ``--no-serve``, the
last part serves the ``dlrm`` and ``dlrm_onnx`` archives side by side from
one TorchServe (started with :mod:`dlrm_serve.testing.launcher`) and compares them
end to end over REST with the binary format.

Writes ``bench/results/backends.md`` and ``bench/results/backends.png``
(``--name`` changes the file names).

    python bench/bench_backends.py [--device cpu|cuda] [--batches 1,8,64,...]
        [--threads N] [--max-rows N] [--rounds N] [--no-compile] [--no-serve] [--name NAME]
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
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import connector, drive, gemm_gflops, machine_info, machine_line, markdown_table, save_plot, time_interleaved, write_markdown  # noqa: E402

from dlrm_serve.artifacts import load_model, save_artifacts  # noqa: E402
from dlrm_serve.runtime.backends import TorchBackend  # noqa: E402
from dlrm_serve.config import preset  # noqa: E402
from dlrm_serve.runtime.export import export_onnx  # noqa: E402
from dlrm_serve.io.features import FeatureBatch, FeatureEncoder  # noqa: E402
from dlrm_serve.model.dlrm import DLRM  # noqa: E402
from dlrm_serve.runtime.onnx_backend import OnnxBackend, cuda_provider_usable  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BATCHES = (1, 8, 64, 256, 1024, 2048, 4096)
MULTI_HOT_BATCHES = (64, 1024, 4096)
SERVE_ROWS = (1, 64, 1024)
ORT = "onnxruntime"
ORT_GENERAL = "onnxruntime general graph"
ORT_INTRA = "onnxruntime intra-op threads"
TORCH_BF16 = "torch bf16"


def bench_config(max_rows: int):
    base = preset("criteo-kaggle")
    return preset("criteo-kaggle", table_sizes=tuple(min(s, max_rows) for s in base.table_sizes))


def criteo_rows(encoder: FeatureEncoder, batch: int, seed: int, multi_hot: bool = False) -> FeatureBatch:
    """Random raw Criteo-style rows through the serving encoder."""
    cfg = encoder.config
    rng = np.random.default_rng(seed)
    dense = rng.geometric(0.05, size=(batch, cfg.num_dense)).astype(np.float64) - 1
    if not multi_hot:
        ids = rng.integers(0, 2**32, size=(batch, cfg.num_sparse), dtype=np.uint64)
        return encoder.encode_columns(dense, np.char.mod("%08x", ids))
    lengths = rng.integers(1, 4, size=batch * cfg.num_sparse)
    sizes = np.repeat(np.tile(np.asarray(cfg.table_sizes), batch), lengths)
    return encoder.encode_arrays(dense, rng.integers(0, sizes), lengths)


# ----- variants --------------------------------------------------------------------
def torch_runner(fn, device: str, one_id_only: bool = False):
    """A predict(FeatureBatch) -> numpy for a torch callable ``fn(dense, indices[, offsets])``."""

    def predict(batch: FeatureBatch) -> np.ndarray:
        with torch.inference_mode():
            dense = torch.from_numpy(batch.dense).to(device)
            indices = torch.from_numpy(batch.indices).to(device)
            if batch.offsets is None:
                out = fn(dense, indices)
            elif one_id_only:
                raise ValueError("this variant was traced for one id per bag")
            else:
                out = fn(dense, indices, torch.from_numpy(batch.offsets).to(device))
            return out.cpu().numpy()

    return predict


def build_variants(artifacts: Path, device: str, threads: int, compile_: bool, sample: FeatureBatch,
                   multi_sample: FeatureBatch) -> tuple[dict, dict, dict, dict]:
    """(one-id variants, multi-hot variants, {variant: why it is missing}, onnxruntime describe())."""
    model = load_model(artifacts).to(device)
    one, multi, missing = {}, {}, {}
    one["torch eager"] = multi["torch eager"] = torch_runner(model, device)
    if device == "cpu":
        bf16 = TorchBackend(artifacts, precision="bf16").model
        one[TORCH_BF16] = multi[TORCH_BF16] = torch_runner(bf16, device)

    try:
        with torch.inference_mode():
            d = torch.from_numpy(sample.dense).to(device)
            i = torch.from_numpy(sample.indices).to(device)
            traced = torch.jit.freeze(torch.jit.trace(model, (d, i), check_trace=False))
            o = torch.from_numpy(multi_sample.offsets).to(device)
            d2 = torch.from_numpy(multi_sample.dense).to(device)
            i2 = torch.from_numpy(multi_sample.indices).to(device)
            traced_bags = torch.jit.freeze(torch.jit.trace(model, (d2, i2, o), check_trace=False))
        one["torch jit"] = torch_runner(traced, device, one_id_only=True)
        multi["torch jit"] = torch_runner(traced_bags, device)
    except Exception as e:  # report, do not stop the comparison
        missing["torch jit"] = f"{type(e).__name__}: {str(e)[:200]}"

    if compile_:
        try:
            compiled = torch.compile(model, dynamic=True)
            start = time.perf_counter()
            run = torch_runner(compiled, device)
            run(sample)
            run(multi_sample)
            print(f"  torch.compile: first calls took {time.perf_counter() - start:.0f} s", flush=True)
            one["torch.compile"] = multi["torch.compile"] = run
        except Exception as e:
            missing["torch.compile"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    else:
        missing["torch.compile"] = "skipped (--no-compile)"

    ort_backend = OnnxBackend(artifacts, threads=threads, device=device)
    one[ORT] = multi[ORT] = ort_backend.predict
    # The general graph on one-id batches: what the second, one-id graph saves.
    one[ORT_GENERAL] = OnnxBackend(artifacts, threads=threads, device=device, one_id_graph=False).predict
    if device == "cpu" and threads > 1:
        # Whole batches on intra-op threads: what the batch pieces save.
        one[ORT_INTRA] = OnnxBackend(artifacts, threads=threads, device=device, piece_rows=0).predict
    return one, multi, missing, ort_backend.describe()


def cuda_gemm_gflops(n: int = 4096, repeats: int = 9) -> float:
    a = torch.randn(n, n, device="cuda")
    b = torch.randn(n, n, device="cuda")
    c = torch.empty(n, n, device="cuda")
    for _ in range(3):
        torch.mm(a, b, out=c)
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        torch.mm(a, b, out=c)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 2.0 * n**3 / sorted(times)[len(times) // 2] / 1e9


def time_variants(variants: dict, batches, encoder, rounds: int, multi_hot: bool) -> dict:
    """{batch: {variant: (samples/s, max |p - eager|)}}."""
    out = {}
    for b in batches:
        batch = criteo_rows(encoder, b, seed=b, multi_hot=multi_hot)
        ref = variants["torch eager"](batch)
        diffs = {name: float(np.abs(fn(batch) - ref).max()) for name, fn in variants.items()}
        fns = {name: (lambda fn=fn: fn(batch)) for name, fn in variants.items()}
        timings = time_interleaved(fns, warmup=3, rounds=rounds, min_repeat_s=0.2)
        # The best round: on a shared machine the median mostly measures the
        # other processes (see the note in the report).
        out[b] = {name: (b / t.best, diffs[name]) for name, t in timings.items()}
        line = "  ".join(f"{name} {rate:,.0f}/s" for name, (rate, _) in out[b].items())
        print(f"  batch {b:5d}{' multi-hot' if multi_hot else ''}: {line}", flush=True)
    return out


# ----- end to end through TorchServe -----------------------------------------------------
def serve_comparison(artifacts: Path, encoder: FeatureEncoder, work: Path, threads: int, seconds: float) -> dict | str:
    """rows/s of dlrm and dlrm_onnx on one TorchServe; a string says why it was skipped."""
    from dlrm_serve.io.codecs import BINARY_CONTENT_TYPE, encode_binary
    from dlrm_serve.testing.launcher import LaunchError, TorchServe, find_torchserve

    try:
        find_torchserve()
    except Exception as e:
        return f"TorchServe not found ({e})"
    java = subprocess.run(["bash", str(ROOT / "scripts" / "ensure_java.sh")], capture_output=True, text=True)
    if java.returncode != 0:
        return f"Java 11+ not available: {java.stderr.strip()[:200]}"
    store = work / "model_store"
    # Default build_mar.sh: dlrm.mar and dlrm_onnx.mar; one worker each, with
    # all the cores, as the in-process runs have.
    r = subprocess.run(
        ["bash", str(ROOT / "build_mar.sh"), "--precision", "fp32", "--artifacts", str(artifacts), "--model-store", str(store),
         "--workers", "1", "--threads", str(threads), "--batch-size", "8"],
        cwd=ROOT, capture_output=True, text=True,
    )
    if r.returncode != 0:
        return f"build_mar.sh failed: {(r.stderr or r.stdout).strip()[-400:]}"
    models = ("dlrm", "dlrm_onnx")
    results: dict = {}
    server = TorchServe(work / "ts", store, base_config=ROOT / "config.properties", load_models=None)
    try:
        server.start()
        for m in models:
            server.register(f"{m}.mar", initial_workers=1)
        for rows in SERVE_ROWS:
            batch_raw = encoder.raw_columns(
                np.random.default_rng(rows).geometric(0.05, size=(rows, encoder.num_dense)).astype(np.float64) - 1,
                np.char.mod("%08x", np.random.default_rng(rows + 1).integers(0, 2**32, size=(rows, encoder.num_sparse), dtype=np.uint64)),
            )
            body = encode_binary(batch_raw)
            answers = {}
            for m in models:
                resp = server.predict(m, body, BINARY_CONTENT_TYPE)
                if resp.status != 200:
                    raise LaunchError(f"{m} answered {resp.status}: {resp.text[:300]}")
                answers[m] = np.asarray(resp.json()["predictions"])
            diff = float(np.abs(answers["dlrm"] - answers["dlrm_onnx"]).max())
            # Two clients keep a request queued while one is served; models take turns.
            runs: dict[str, list[dict]] = {m: [] for m in models}
            for _ in range(3):
                for m in models:
                    runs[m].append(
                        drive(connector("rest", server=server, model=m), [body], BINARY_CONTENT_TYPE, rows, 2, seconds / 3, warmup=1)
                    )
            results[rows] = {
                m: (
                    float(max(r["rows_per_s"] for r in runs[m])),
                    float(np.median([r["p50_ms"] for r in runs[m]])),
                    float(np.median([r["p99_ms"] for r in runs[m]])),
                )
                for m in models
            }
            results[rows]["diff"] = diff
            print(f"  serve {rows:5d} rows/request: " + "  ".join(
                f"{m} {results[rows][m][0]:,.0f} rows/s (p50 {results[rows][m][1]:.1f} ms)" for m in models), flush=True)
    except LaunchError as e:
        return f"TorchServe run failed: {e.message[:400]}"
    finally:
        server.stop()
    return results


# ----- report ---------------------------------------------------------------------------------
def table(results: dict, names: list[str], roofline: float) -> str:
    torch_names = [n for n in names if not n.startswith(ORT)]
    fp32_names = [n for n in names if n != TORCH_BF16]
    headers = ["batch"] + [f"{n} samples/s (roofline)" for n in names] + ["ORT / best torch", "max abs diff vs eager"]
    if TORCH_BF16 in names:
        headers.append("bf16 max abs diff vs eager")
    rows = []
    for b, per in results.items():
        cells = [b]
        for n in names:
            rate = per[n][0]
            cells.append(f"{rate:,.0f} ({rate / roofline:.1%})")
        best = max(per[n][0] for n in torch_names)
        cells.append(f"{per[ORT][0] / best:.2f}")
        cells.append(f"{max(per[n][1] for n in fp32_names):.1e}")
        if TORCH_BF16 in names:
            cells.append(f"{per[TORCH_BF16][1]:.1e}")
        rows.append(cells)
    return markdown_table(headers, rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--batches", default=",".join(map(str, BATCHES)))
    p.add_argument("--multi-hot-batches", default=",".join(map(str, MULTI_HOT_BATCHES)))
    p.add_argument("--max-rows", type=int, default=100_000, help="cap on each table's rows (default 100000)")
    p.add_argument("--threads", type=int, default=0, help="threads for torch and onnxruntime (default: usable cores)")
    p.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds per batch size")
    p.add_argument("--serve-seconds", type=float, default=6.0, help="seconds of traffic per model and request size")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile (it compiles for about a minute)")
    p.add_argument("--no-serve", action="store_true", help="skip the end-to-end TorchServe comparison")
    p.add_argument("--name", default="backends", help="results file names, bench/results/NAME.md and .png")
    args = p.parse_args(argv)

    batches = [int(x) for x in args.batches.split(",") if x]
    multi_batches = [int(x) for x in args.multi_hot_batches.split(",") if x]
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    if args.device == "cuda":
        if not torch.cuda.is_available():
            print("--device cuda: torch sees no CUDA device here", file=sys.stderr)
            return 2
        if not cuda_provider_usable():
            print("--device cuda: onnxruntime's CUDA provider does not load here", file=sys.stderr)
            return 2

    cfg = bench_config(args.max_rows)
    encoder = FeatureEncoder(cfg)
    info = machine_info()
    load_before = os.getloadavg()[0]
    print(f"{machine_line(info)}; {threads} threads; device {args.device}; load {load_before:.1f}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-backends-") as tmp:
        work = Path(tmp)
        artifacts = work / "artifacts"
        torch.manual_seed(0)
        save_artifacts(DLRM(cfg), artifacts)
        export_onnx(artifacts)

        gemm = [cuda_gemm_gflops() if args.device == "cuda" else gemm_gflops()]
        one, multi, missing, ort_info = build_variants(
            artifacts, args.device, threads, not args.no_compile,
            criteo_rows(encoder, 64, seed=0), criteo_rows(encoder, 64, seed=0, multi_hot=True),
        )
        for name, why in missing.items():
            print(f"  {name}: not measured: {why}", flush=True)
        print(f"  onnxruntime: {json.dumps(ort_info)}", flush=True)
        one_results = time_variants(one, batches, encoder, args.rounds, multi_hot=False)
        multi_results = time_variants(multi, multi_batches, encoder, args.rounds, multi_hot=True)
        gemm.append(cuda_gemm_gflops() if args.device == "cuda" else gemm_gflops())
        gflops = max(gemm)
        roofline = gflops * 1e9 / cfg.flops_per_sample()

        if args.no_serve:
            served: dict | str = "skipped (--no-serve)"
        elif args.device == "cuda":
            served = "skipped: the archives serve on the CPU (build_mar.sh has no GPU option)"
        else:
            served = serve_comparison(artifacts, encoder, work, threads, args.serve_seconds)

    names = list(one)
    load_after = os.getloadavg()[0]
    sections = [
        f"Machine: {machine_line(info)}. Device: {args.device}, {threads} threads for every variant. "
        f"Load average (1 min) {load_before:.1f} at the start, {load_after:.1f} at the end: other processes "
        "on a small machine change multi-threaded timings a lot, torch's OpenMP threads more than "
        "onnxruntime's, so compare runs by their ratios and rerun on a quiet machine.",
        f"Model: MLPerf Criteo Kaggle DLRM (`preset(\"criteo-kaggle\")`: bottom {list(cfg.bottom_mlp)}, "
        f"top {list(cfg.top_mlp)}, dim {cfg.embedding_dim}, dot interaction) with every table capped at "
        f"{args.max_rows:,} rows ({cfg.total_rows:,} rows in all). {cfg.flops_per_sample():,} FLOP per sample.",
        f"FP32 GEMM rate measured in this run: {gemm[0]:,.0f} and {gemm[1]:,.0f} GFLOP/s (before and after); "
        f"roofline = {gflops:,.0f} GFLOP/s / FLOP per sample = {roofline:,.0f} samples/s. "
        "Each cell: samples/s (fraction of that roofline) in the best of "
        f"{args.rounds} interleaved rounds of at least 0.2 s each.",
        f"ONNX Runtime: {ort_info['onnxruntime']}, provider {ort_info['provider']}, {ort_info['threads']} threads: "
        + (
            f"batches under {ort_info['min_piece_rows'] * ort_info['threads']} rows run whole on intra-op threads, "
            f"bigger ones in pieces of at most {ort_info['piece_rows']} rows, one thread each."
            if ort_info["piece_rows"]
            else "whole batches on intra-op threads."
        ),
    ]
    if missing:
        sections.append("Not measured: " + "; ".join(f"{k}: {v}" for k, v in missing.items()) + ".")
    sections.append("## One id per bag (Criteo)\n\n" + table(one_results, names, roofline))
    sections.append(
        "## Multi-hot bags (1 to 3 ids per bag)\n\n"
        "Torch runs `embedding_bag`; ONNX Runtime the general graph (Gather + ScatterND).\n\n"
        + table(multi_results, list(multi), roofline)
    )
    if isinstance(served, str):
        sections.append(f"## End to end through TorchServe\n\n{served}")
    else:
        rows = []
        for n, per in served.items():
            rows.append([
                n, f"{per['dlrm'][0]:,.0f}", f"{per['dlrm_onnx'][0]:,.0f}", f"{per['dlrm_onnx'][0] / per['dlrm'][0]:.2f}",
                f"{per['dlrm'][1]:.1f} / {per['dlrm'][2]:.1f}", f"{per['dlrm_onnx'][1]:.1f} / {per['dlrm_onnx'][2]:.1f}",
                f"{per['diff']:.1e}",
            ])
        sections.append(
            "## End to end through TorchServe\n\n"
            "`dlrm` and `dlrm_onnx` registered side by side on one TorchServe (1 worker each, "
            f"{threads} threads, dynamic batch up to 8 requests), binary requests over REST from two client "
            "threads, the models taking turns; rows/s of the best of 3 turns, latency over all.\n\n"
            + markdown_table(
                ["rows/request", "dlrm rows/s", "dlrm_onnx rows/s", "onnx / torch", "dlrm p50 / p99 ms",
                 "dlrm_onnx p50 / p99 ms", "max abs diff"],
                rows,
            )
        )
    path = write_markdown(args.name, "Torch against ONNX Runtime", sections)

    def draw(ax):
        for name in names:
            xs = list(one_results)
            ax.plot(xs, [one_results[b][name][0] for b in xs], marker="o", label=name)
        ax.axhline(roofline, color="grey", linestyle="--", label="GEMM roofline")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel("samples / s")
        ax.set_title(f"Criteo Kaggle DLRM, {args.device}, {threads} threads")
        ax.legend()
        ax.grid(True, which="both", alpha=0.3)

    png = save_plot(args.name, draw)
    print(f"wrote {path} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
