"""DLRM at real size: memory per worker, cold start, throughput, int8 tables.

``make bench-scale`` runs every part; ``--parts`` picks some.  It writes
``bench/results/scale.md`` (tables), ``scale.png`` (plots) and
``scale.json`` (every number), and prints the tables.

Parts:

- ``cold``: seconds from ``torchserve --start`` to the first prediction of
  the Kaggle-size model (no-archive, 1 worker), and from a management-API
  registration to its first prediction; once with the weights file in the
  page cache and once after dropping it from the cache (only that file).
- ``memory``: total PSS of all workers of the Kaggle-size model (fp32 and
  row-wise int8) with 1, 2 and 4 workers under a real TorchServe, after
  every worker has read every table page (``dlrm.touch_tables`` in
  model-config.yaml), plus each worker's private anonymous memory; checked
  against "one copy of the tables + N x one worker without tables, +10%".
- ``throughput``: rows/s at batch 2048 of small-table and Kaggle-size-table
  models, in-process and end to end through TorchServe, measured in
  interleaved rounds in the same run.  Ids are random hex strings hashed
  into the tables, as real traffic is.
- ``int8``: the demo model trained once with ``dlrm-serve train``, then
  quantised: test AUC, log-loss and max |p_int8 - p_fp32| on its test rows.

Big files live in ``--work`` (default ``$TMPDIR/dlrm-bench-scale``) and are
reused by later runs: the Kaggle-size artifacts (``dlrm-serve init``, or
``--kaggle DIR``), their int8 copy, the model store and the trained model.
Archives are built with ``./build_mar.sh --archive-format no-archive``
(rebuilt when the code or the weights change); the weights the archiver
copied are then replaced by hard links to the artifacts' own file, and
variants that differ only in model-config.yaml are hard-linked folders, so
disk and page cache hold one copy of each table file.

``--onnx`` adds the onnxruntime backend to the memory part (exports 2 GB of
ONNX data); ``--zip-store`` adds a stored-zip .mar to the cold-start part.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (str(HERE), str(ROOT)):
    if p not in sys.path:
        sys.path.insert(0, p)

from common import connector, drive, gemm_gflops, machine_info, machine_line, random_columns, results_dir, time_interleaved, write_markdown  # noqa: E402
from scale_report import SLACK, plot, report  # noqa: E402
from scale_setup import (  # noqa: E402
    BINARY,
    binary_body,
    build,
    children,
    cli,
    ensure_artifacts,
    init_preset,
    load_average,
    log,
    onnx_artifacts,
    predict_until_ok,
    quantized,
    read_through,
    register,
    server,
    table_bytes,
    tables_file,
    variant,
)
from ts_logs import worker_phases  # noqa: E402

from dlrm_serve.artifacts import WEIGHTS_FILE, load_config  # noqa: E402
from dlrm_serve.config import DEMO_TABLE_SIZES, preset  # noqa: E402
from dlrm_serve.testing.launcher import TorchServe  # noqa: E402
from dlrm_serve.testing.procmem import evict_from_page_cache, process_memory, torchserve_workers  # noqa: E402

PARTS = ("cold", "memory", "throughput", "int8")
MB = 1e6


# ----- part: cold start -----------------------------------------------------------------
def part_cold(args, work: Path, store: Path, kaggle: Path) -> dict:
    build(kaggle, store, "kaggle", "--workers", "1")
    weights = store / "kaggle" / WEIGHTS_FILE
    config = load_config(store / "kaggle")
    one = binary_body(config, 1, seed=1)
    batch = binary_body(config, args.batch, seed=2)
    out = {"model": "kaggle", "workers": 1, "archive": "no-archive", "file_bytes": weights.stat().st_size, "runs": []}

    def first(ts: TorchServe, t0: float) -> dict:
        t1 = predict_until_ok(ts, "kaggle", one)
        t2 = time.monotonic()
        r = ts.predict("kaggle", batch, BINARY, timeout=300)
        if r.status != 200:
            raise RuntimeError(f"{args.batch}-row request answered {r.status}: {r.text[:300]}")
        return {"first_prediction_s": t1 - t0, "first_batch_s": time.monotonic() - t2, **worker_phases(ts)}

    for cache in ("warm", "dropped"):
        # torchserve --start with the model in load_models.
        ts = server(work, store, f"cold-start-{cache}", load_models="kaggle")
        if cache == "dropped":
            evict_from_page_cache(weights)
        else:
            read_through(weights)
        t0 = time.monotonic()
        try:
            ts.start()
            healthy = time.monotonic() - t0
            row = {"how": "torchserve --start", "page_cache": cache, "healthy_s": healthy, **first(ts, t0)}
        finally:
            ts.stop()
        out["runs"].append(row)
        log(f"cold start ({cache} page cache): {row}")

    ts = server(work, store, "cold-register")
    ts.start()
    try:
        for cache in ("warm", "dropped"):
            if cache == "dropped":
                evict_from_page_cache(weights)
            else:
                read_through(weights)
            t0 = time.monotonic()
            ts.register("kaggle", initial_workers=1, synchronous=True, timeout=600)
            registered = time.monotonic() - t0
            row = {"how": "register (management API)", "page_cache": cache, "healthy_s": registered, **first(ts, t0)}
            ts.unregister("kaggle")
            out["runs"].append(row)
            log(f"registration ({cache} page cache): {row}")
        # Reading every table page at load (touch_tables) from a cold page cache:
        # the slowest load, the one a startup timeout must allow for.
        touch = variant(store, "kaggle", "kaggle_touch_load", workers=1, touch=True).name
        evict_from_page_cache(weights)
        t0 = time.monotonic()
        ts.register(touch, model_name=touch, initial_workers=1, synchronous=True, timeout=600)
        registered = time.monotonic() - t0
        t1 = predict_until_ok(ts, touch, one)
        t2 = time.monotonic()
        ts.predict(touch, batch, BINARY, timeout=300)
        row = {
            "how": "register, touch_tables: true", "page_cache": "dropped", "healthy_s": registered,
            "first_prediction_s": t1 - t0, "first_batch_s": time.monotonic() - t2, **worker_phases(ts),
        }
        ts.unregister(touch)
        out["runs"].append(row)
        log(f"registration with touch_tables ({row['page_cache']} page cache): {row}")
        if args.zip_store:
            out["runs"].append(zip_store_run(args, work, store, kaggle, ts, one, batch))
    finally:
        ts.stop()
    return out








def zip_store_run(args, work: Path, store: Path, kaggle: Path, ts: TorchServe, one: bytes, batch: bytes) -> dict:
    """The same model as a stored (uncompressed) .mar: TorchServe unpacks it at registration."""
    log("building a zip-store archive of the Kaggle-size model")
    t = time.perf_counter()
    cmd = [
        "bash", str(ROOT / "build_mar.sh"), "--precision", "fp32", "--artifacts", str(kaggle), "--model-store", str(store),
        "--model-name", "kaggle_zip", "--archive-format", "zip-store", "--workers", "1",
    ]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"build_mar.sh failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    build_s = time.perf_counter() - t
    mar = store / "kaggle_zip.mar"
    try:
        read_through(mar)
        t0 = time.monotonic()
        ts.register("kaggle_zip.mar", initial_workers=1, synchronous=True, timeout=600)
        registered = time.monotonic() - t0
        t1 = predict_until_ok(ts, "kaggle_zip", one)
        t2 = time.monotonic()
        ts.predict("kaggle_zip", batch, BINARY, timeout=300)
        row = {
            "how": "register a zip-store .mar", "page_cache": "warm", "healthy_s": registered,
            "first_prediction_s": t1 - t0, "first_batch_s": time.monotonic() - t2, "build_s": build_s,
            **worker_phases(ts),
        }
        ts.unregister("kaggle_zip")
    finally:
        mar.unlink(missing_ok=True)
    log(f"zip-store registration: {row}")
    return row


# ----- part: memory -------------------------------------------------------------------
def measure_workers(ts: TorchServe, name: str, weights: Path) -> list[dict]:
    pids = ts.worker_pids(name)
    found = set(torchserve_workers(ts.process.pid))
    if not set(pids) <= found:
        raise RuntimeError(f"workers {pids} of {name} are not all below the server process ({sorted(found)})")
    rows = []
    for pid in pids:
        m = process_memory(pid, weights)
        rows.append({
            "pid": pid, "pss": m.pss, "pss_anon": m.pss_anon, "pss_file": m.pss_file, "anonymous": m.anonymous,
            "rss": m.rss, "uss": m.uss, "swap": m.swap, "table_pss": m.file_pss, "table_rss": m.file_rss, "table_mapped": m.file_mapped, "pss_without_tables": m.pss_without_file,
        })
    return rows


def part_memory(args, work: Path, store: Path, models: dict[str, Path]) -> dict:
    out = {"workers": args.workers, "models": {}}
    ts = server(work, store, "memory")
    ts.start()
    try:
        for label, base in models.items():
            name = f"{base.name}_touch"
            folder = variant(store, base.name, name, workers=1, touch=True)
            weights = tables_file(folder)
            config = load_config(folder)
            runs = []
            register(ts, name, args.workers[0])
            try:
                for n in args.workers:
                    if n != args.workers[0]:
                        ts.scale(name, n, n, timeout=600)
                        ts.wait_ready(name, workers=n, timeout=600)
                    workers = measure_workers(ts, name, weights)
                    if len(workers) != n:
                        raise RuntimeError(f"{name}: expected {n} workers, found {len(workers)}")
                    total = sum(w["pss"] for w in workers)
                    runs.append({"workers": n, "total_pss": total, "per_worker": workers})
                    anon = ", ".join(f"{w['anonymous'] / MB:.0f}" for w in workers)
                    table_pss = sum(w["table_pss"] for w in workers)
                    log(
                        f"{label}, {n} workers: total PSS {total / MB:.0f} MB, tables' PSS "
                        f"{table_pss / MB:.0f} MB, anonymous per worker {anon} MB"
                    )
            finally:
                ts.unregister(name)
            tables = table_bytes(config)
            base_worker = runs[0]["per_worker"][0]["pss_without_tables"] if runs[0]["workers"] == 1 else None
            checks = []
            if base_worker is not None:
                for r in runs:
                    bound = (tables + r["workers"] * base_worker) * (1 + SLACK)
                    checks.append({"workers": r["workers"], "total_pss": r["total_pss"], "bound": bound, "ok": r["total_pss"] <= bound})
            out["models"][label] = {
                "table_bytes": tables, "file_bytes": weights.stat().st_size, "tables_file": weights.name,
                "worker_without_tables": base_worker,
                "runs": runs, "checks": checks,
            }
        java = [p for p in children(ts.process.pid) if "java" in p[1]]
        if java:
            out["frontend_pss"] = process_memory(java[0][0]).pss
    finally:
        ts.stop()
    return out




# ----- part: throughput -----------------------------------------------------------------




def with_tables(model, weight):
    """``model``'s MLPs over the float32 table ``weight`` (assigned, not copied)."""
    from dlrm_serve.config import CRITEO_KAGGLE_TABLE_SIZES
    from dlrm_serve.model.dlrm import DLRM

    if weight.shape[0] != sum(CRITEO_KAGGLE_TABLE_SIZES):
        raise ValueError(f"expected the Kaggle-size table, got {list(weight.shape)}")
    config = model.config.replace(table_sizes=CRITEO_KAGGLE_TABLE_SIZES)
    out = DLRM(config, init=False)
    state = dict(model.state_dict())
    state["sparse_arch.weight"] = weight
    out.load_state_dict(state, strict=True, assign=True)
    return out.eval()


def part_throughput(args, work: Path, store: Path, models: dict[str, Path]) -> dict:
    import torch

    from dlrm_serve.runtime.backends import load_backend
    from dlrm_serve.io.features import FeatureEncoder
    from dlrm_serve.runtime.memory import touch_tables

    threads = args.threads
    torch.set_num_threads(threads)
    out = {"batch": args.batch, "threads": threads, "models": {}, "gflops": gemm_gflops()}
    log(f"in-process: {len(models)} models, batch {args.batch}, {threads} threads, GEMM {out['gflops']:.0f} GFLOP/s")
    backends = {label: load_backend(folder) for label, folder in models.items()}
    if "demo" in backends and "kaggle" in backends:
        # The demo's MLPs over the Kaggle-size table (the same mapped file, no copy):
        # the smallest compute per row, so the largest share of time in lookups.
        # The library's TorchBackend.predict, over a swapped model (no copy of its code).
        mixed = load_backend(models["demo"])
        mixed.model = with_tables(mixed.model, backends["kaggle"].model.sparse_arch.weight)
        mixed.config = mixed.model.config
        backends["demo-mlps-kaggle-tables"] = mixed
    batches = {}
    for label, b in backends.items():
        touch_tables(b.model)  # steady state: every page mapped, as after long traffic
        enc = FeatureEncoder(b.config)
        batches[label] = [enc.encode_columns(*random_columns(b.config, args.batch, seed=100 + i)) for i in range(8)]
        c = b.config
        out["models"][label] = {
            "table_rows": c.total_rows, "table_bytes": table_bytes(c), "table_dtype": c.table_dtype,
            "bottom_mlp": list(c.bottom_mlp), "top_mlp": list(c.top_mlp), "mflop_per_row": c.flops_per_sample() / 1e6,
        }

    def call(label: str):
        state = {"i": 0}

        def fn() -> None:
            state["i"] = (state["i"] + 1) % len(batches[label])
            backends[label].predict(batches[label][state["i"]])

        return fn

    timings = time_interleaved({label: call(label) for label in backends}, warmup=2, rounds=args.rounds_inproc, min_repeat_s=0.3)
    for label, t in timings.items():
        out["models"][label]["in_process_rows_s"] = args.batch / t.median
        out["models"][label]["in_process_spread"] = t.spread
        log(f"  {label}: {args.batch / t.median:,.0f} rows/s in-process (IQR/median {t.spread:.2f})")
    del backends, batches, timings
    gc.collect()

    if args.no_serve:
        return out
    ts = server(work, store, "throughput")
    ts.start()
    names = {}
    try:
        for label, folder in models.items():
            name = f"{folder.name}_tp"
            variant(store, folder.name, name, workers=1, touch=True, threads=threads)
            register(ts, name, 1)
            names[label] = name
        bodies = {label: [binary_body(load_config(folder), args.batch, seed=200 + i) for i in range(8)] for label, folder in models.items()}
        def rate(label: str, seconds: float) -> float:
            conn = connector("rest", server=ts, model=names[label])
            return drive(conn, bodies[label], BINARY, args.batch, args.concurrency, seconds)["rows_per_s"]

        for label in names:  # warm-up
            rate(label, 1.0)
        samples = {label: [] for label in names}
        for r in range(args.rounds):
            for label in names:
                samples[label].append(rate(label, args.seconds))
            log(f"  end-to-end round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1]:,.0f}" for k, v in samples.items()))
        for label, s in samples.items():
            out["models"][label]["end_to_end_rows_s"] = float(np.median(s))
            out["models"][label]["end_to_end_samples"] = s
        out["concurrency"] = args.concurrency
    finally:
        for name in names.values():
            try:
                ts.unregister(name)
            except Exception:  # the server is stopped next anyway
                pass
        ts.stop()
    return out


# ----- part: int8 accuracy -----------------------------------------------------------------
def part_int8(args, work: Path) -> dict:
    from dlrm_serve.artifacts import load_model
    from dlrm_serve.offline.evaluation import log_loss, roc_auc
    from dlrm_serve.io.features import FeatureEncoder
    from dlrm_serve.offline.train import iter_rows, predict_rows

    tag = "default" if args.train_rows is None else str(args.train_rows)
    trained = work / f"trained-{tag}"
    metrics_file = trained / "metrics.json"
    if not metrics_file.is_file():
        rows = [] if args.train_rows is None else ["--rows", str(args.train_rows)]
        log(f"training the demo model ({tag} rows; dlrm-serve train)")
        t = time.perf_counter()
        cli("train", "--out", str(trained), "--data-dir", str(work / "data"), *rows)
        log(f"  trained in {time.perf_counter() - t:.0f} s")
    int8 = ensure_artifacts(work / f"trained-{tag}-int8", quantized(trained))
    metrics = json.loads(metrics_file.read_text())
    test_files = metrics["test_files"]
    same = test_files == metrics["train_files"]
    start, stop = (metrics["train_rows"], metrics["train_rows"] + metrics["test_rows"]) if same else (0, None)
    probs = {}
    for label, folder in (("float32", trained), ("int8", int8)):
        model = load_model(folder)
        parts = iter_rows(test_files, FeatureEncoder(model.config), start=start, stop=stop)
        probs[label], labels = predict_rows(model, parts)
    diff = np.abs(probs["int8"].astype(np.float64) - probs["float32"])
    out = {
        "train_rows": metrics["train_rows"], "test_rows": int(labels.shape[0]),
        "auc_float32": roc_auc(labels, probs["float32"]), "auc_int8": roc_auc(labels, probs["int8"]),
        "logloss_float32": log_loss(labels, probs["float32"]), "logloss_int8": log_loss(labels, probs["int8"]),
        "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
        "trainer_test_auc": metrics.get("test_auc"),
        "file_bytes_float32": (trained / WEIGHTS_FILE).stat().st_size, "file_bytes_int8": (int8 / WEIGHTS_FILE).stat().st_size,
    }
    out["auc_loss"] = out["auc_float32"] - out["auc_int8"]
    log(
        f"int8: AUC {out['auc_float32']:.5f} -> {out['auc_int8']:.5f} (loss {out['auc_loss']:.5f}), "
        f"max |dp| {out['max_abs_diff']:.2e}"
    )
    return out


# ----- report ----------------------------------------------------------------------------




# ----- main ------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated parts to run (default: all of {','.join(PARTS)})")
    p.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "dlrm-bench-scale"), help="folder for big files, reused across runs")
    p.add_argument("--kaggle", default=None, help="existing float32 Kaggle-size artifacts (default: initialise WORK/kaggle)")
    p.add_argument("--workers", default="1,2,4", help="worker counts for the memory part (default: 1,2,4)")
    # Positive integers: (flag, default, help); checked after parsing.
    counts = [
        ("--batch", 2048, "rows per batch / request"),
        ("--threads", 1, "throughput: torch threads in-process and per worker (on a shared machine 2-thread "
         "OpenMP stalls whenever one thread is descheduled, which swamps the ratios)"),
        ("--rounds-inproc", 10, "interleaved in-process rounds"),
        ("--rounds", 5, "interleaved end-to-end rounds"),
        ("--concurrency", 2, "requests in flight end to end"),
    ]
    for flag, default, text in counts:
        p.add_argument(flag, type=int, default=default, help=f"{text} (default: {default})")
    p.add_argument("--seconds", type=float, default=3.0, help="seconds per model per end-to-end round (default: 3)")
    switches = {
        "--no-serve": "throughput: in-process only",
        "--no-int8": "memory and throughput: skip the int8 Kaggle-size model",
        "--zip-store": "cold: also time a zip-store .mar (builds a 2 GB file)",
        "--onnx": "memory: also the onnxruntime backend (exports 2 GB of ONNX data)",
    }
    for flag, text in switches.items():
        p.add_argument(flag, action="store_true", help=text)
    p.add_argument("--train-rows", type=int, default=None, help="int8: synthetic rows to train the demo model on (default: the trainer's)")
    p.add_argument("--name", default="scale", help="results file name under bench/results (default: scale)")
    args = p.parse_args(argv)
    args.parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown:
        p.error(f"unknown parts {unknown}; choose from {list(PARTS)}")
    try:
        args.workers = sorted({int(x) for x in args.workers.split(",")})
    except ValueError:
        p.error(f"--workers must be comma-separated integers, got {args.workers!r}")
    if not args.workers or args.workers[0] < 1:
        p.error("--workers must be positive")
    for flag, _, _ in counts:
        if getattr(args, flag[2:].replace("-", "_")) < 1:
            p.error(f"{flag} must be at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    work = Path(args.work).resolve()
    store = work / "store"
    store.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    results: dict = {"machine": machine_line(info), "machine_info": info, "load_start": load_average(), "parts": args.parts, "batch": args.batch}
    log(f"{results['machine']}; load average {results['load_start']}; work folder {work}")
    t_all = time.perf_counter()

    if {"cold", "memory", "throughput"} & set(args.parts):
        # A child process writes the 2 GB of random tables, so their memory is not this process's.
        kaggle = (
            Path(args.kaggle).resolve() if args.kaggle
            else ensure_artifacts(work / "kaggle", lambda folder: cli("init", "--preset", "criteo-kaggle", "--out", str(folder)))
        )
        if load_config(kaggle).table_sizes != preset("criteo-kaggle").table_sizes:
            raise SystemExit(f"{kaggle} is not a Kaggle-size model (criteo-kaggle preset tables)")
    need_int8 = not args.no_int8 and ({"memory", "throughput"} & set(args.parts))

    if "cold" in args.parts:
        results["cold"] = part_cold(args, work, store, kaggle)
    served = {"kaggle": build(kaggle, store, "kaggle", "--workers", "1")} if {"memory", "throughput"} & set(args.parts) else {}
    if need_int8:
        kaggle8 = ensure_artifacts(work / "kaggle-int8", quantized(kaggle))
        served["kaggle-int8"] = build(kaggle8, store, "kaggle_int8", "--workers", "1")
    if args.onnx and "memory" in args.parts:
        onnx_dir = onnx_artifacts(kaggle, work)
        onnx_models = {"kaggle-onnx": build(onnx_dir, store, "kaggle_onnx", "--workers", "1", "--backend", "onnxruntime")}
    else:
        onnx_models = {}
    if "memory" in args.parts:
        results["memory"] = part_memory(args, work, store, {**served, **onnx_models})
    if "throughput" in args.parts:
        # Pairs with the same MLPs: the MLPerf Kaggle architecture on small (demo-size)
        # tables, and the demo architecture for reference.
        small = ensure_artifacts(work / "small", init_preset("criteo-kaggle", table_sizes=DEMO_TABLE_SIZES))
        demo = ensure_artifacts(work / "demo", init_preset("demo"))
        models = {
            "demo": build(demo, store, "demo", "--workers", "1"),
            "small-tables": build(small, store, "small", "--workers", "1"),
            "kaggle": served["kaggle"],
        }
        results["pairs"] = [("kaggle", "small-tables"), ("demo-mlps-kaggle-tables", "demo")]
        if need_int8:
            small8 = ensure_artifacts(work / "small-int8", quantized(small))
            models["small-tables-int8"] = build(small8, store, "small_int8", "--workers", "1")
            models["kaggle-int8"] = served["kaggle-int8"]
            results["pairs"] += [("kaggle-int8", "small-tables-int8"), ("kaggle-int8", "kaggle")]
        results["throughput"] = part_throughput(args, work, store, models)
    if "int8" in args.parts:
        results["int8"] = part_int8(args, work)

    results["load_end"] = load_average()
    results["seconds"] = time.perf_counter() - t_all
    sections = report(results)
    md = write_markdown(args.name, "dlrm-serve at real size (bench/bench_scale.py)", sections)
    png = plot(results, args.name)
    (results_dir() / f"{args.name}.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    print("\n\n".join(sections))
    log(f"wrote {md}, {png} and {args.name}.json in {results['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
