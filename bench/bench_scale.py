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
import hashlib
import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (str(HERE), str(ROOT)):
    if p not in sys.path:
        sys.path.insert(0, p)

from common import gemm_gflops, machine_info, machine_line, markdown_table, results_dir, time_interleaved, write_markdown  # noqa: E402

from dlrm_serve.artifacts import WEIGHTS_FILE, load_config  # noqa: E402
from dlrm_serve.config import DEMO_TABLE_SIZES, preset  # noqa: E402
from dlrm_serve.launcher import TorchServe  # noqa: E402
from dlrm_serve.memory import evict_from_page_cache, process_memory, torchserve_workers  # noqa: E402

PARTS = ("cold", "memory", "throughput", "int8")
MB = 1e6
BINARY = "application/x-dlrm"
# The memory target: slack over "one copy of the tables + N x one worker without tables".
SLACK = 0.10


def log(msg: str) -> None:
    print(f"[bench-scale {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


# ----- artifacts and archives ---------------------------------------------------------
def cli(*args: str) -> None:
    """Run ``dlrm-serve ARGS`` in a child process (its memory goes when it ends)."""
    cmd = [sys.executable, "-m", "dlrm_serve.cli", *args]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")


def ensure_artifacts(folder: Path, make) -> Path:
    if not (folder / "dlrm.json").is_file() or not (folder / WEIGHTS_FILE).is_file():
        log(f"writing {folder}")
        t = time.perf_counter()
        make(folder)
        log(f"  done in {time.perf_counter() - t:.1f} s")
    return folder


def init_preset(name: str, **overrides):
    def make(folder: Path) -> None:
        from dlrm_serve.quantize import init_artifacts

        init_artifacts(preset(name, **overrides), folder, seed=0)

    return make


def quantized(src: Path):
    def make(folder: Path) -> None:
        cli("quantize", "--artifacts", str(src), "--out", str(folder))

    return make


def _stamp(artifacts: Path, args: list[str]) -> str:
    """What an archive depends on: the packaging code, the library, the weights and the flags."""
    h = hashlib.sha256()
    files = [ROOT / "build_mar.sh", *sorted((ROOT / "handler").glob("*.py")), *sorted((ROOT / "dlrm_serve").rglob("*.py"))]
    for f in files:
        if "_proto" not in f.parts:
            h.update(f.read_bytes())
    for f in (artifacts / "dlrm.json", artifacts / WEIGHTS_FILE):
        st = f.stat()
        h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
    h.update(json.dumps(args).encode())
    return h.hexdigest()


def build(artifacts: Path, store: Path, name: str, *args: str) -> Path:
    """``build_mar.sh --archive-format no-archive`` into ``store/name``, unless an identical build is there."""
    stamp_file = store / f".{name}.stamp"
    stamp = _stamp(artifacts, [name, *args])
    out = store / name
    if out.is_dir() and stamp_file.is_file() and stamp_file.read_text() == stamp:
        return out
    stamp_file.unlink(missing_ok=True)
    shutil.rmtree(out, ignore_errors=True)
    log(f"building {out} from {artifacts}")
    t = time.perf_counter()
    cmd = [
        "bash", str(ROOT / "build_mar.sh"), "--artifacts", str(artifacts), "--model-store", str(store),
        "--model-name", name, "--archive-format", "no-archive", *args,
    ]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"build_mar.sh failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    _link_big_files(artifacts, out)
    stamp_file.write_text(stamp)
    log(f"  built in {time.perf_counter() - t:.1f} s")
    return out


def _link_big_files(artifacts: Path, out: Path) -> None:
    """Replace the archive's copies of the big files by hard links to the artifacts' own.

    The bytes are the same; one inode keeps one copy on disk and in the page
    cache.  Across file systems the copy stays and the source leaves the cache.
    """
    for name in (WEIGHTS_FILE, "dlrm.onnx.data"):
        src, dst = artifacts / name, out / name
        if not (src.is_file() and dst.is_file()) or src.stat().st_size != dst.stat().st_size:
            continue
        tmp = dst.with_name(dst.name + ".link")
        try:
            tmp.unlink(missing_ok=True)
            os.link(src, tmp)
        except OSError:
            evict_from_page_cache(src)
            continue
        os.replace(tmp, dst)


def variant(store: Path, base: str, name: str, workers: int, touch: bool, threads: int | None = None) -> Path:
    """``store/name``: the no-archive model ``base`` with other workers / touch_tables.

    Every file is a hard link to ``base``'s (no copy of the weights); only
    model-config.yaml is rewritten.
    """
    import yaml

    src, dst = store / base, store / name
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst, copy_function=os.link)
    cfg_path = dst / "model-config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["minWorkers"] = cfg["maxWorkers"] = workers
    cfg.setdefault("dlrm", {})["touch_tables"] = touch
    if threads is not None:
        cfg["dlrm"]["threads"] = threads
    cfg_path.unlink()  # a link to base's file: replace it, do not write through it
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return dst


def onnx_artifacts(kaggle: Path, work: Path) -> Path:
    """``WORK/kaggle-onnx``: the Kaggle-size artifacts (weights hard-linked) plus their ONNX export."""
    from dlrm_serve.export import onnx_problem

    folder = work / "kaggle-onnx"
    fresh = (
        (folder / "dlrm.onnx.data").is_file()
        and (folder / WEIGHTS_FILE).samefile(kaggle / WEIGHTS_FILE)
        and onnx_problem(folder) is None
    )
    if fresh:
        return folder  # exported from these very weights by this exporter
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    shutil.copy2(kaggle / "dlrm.json", folder / "dlrm.json")  # export rewrites it: a copy, not a link
    try:
        os.link(kaggle / WEIGHTS_FILE, folder / WEIGHTS_FILE)
    except OSError:
        shutil.copy2(kaggle / WEIGHTS_FILE, folder / WEIGHTS_FILE)
    log(f"exporting {folder} to ONNX")
    t = time.perf_counter()
    code = "import sys; from dlrm_serve.export import export_onnx; print(export_onnx(sys.argv[1]).summary())"
    r = subprocess.run([sys.executable, "-c", code, str(folder)], cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"ONNX export failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    log(f"  exported in {time.perf_counter() - t:.1f} s")
    return folder


def tables_file(folder: Path) -> Path:
    """The file a served model's tables are mapped from: dlrm.onnx.data for onnxruntime."""
    import yaml

    cfg = yaml.safe_load((folder / "model-config.yaml").read_text())
    if (cfg.get("dlrm") or {}).get("backend") == "onnxruntime":
        return folder / "dlrm.onnx.data"
    return folder / WEIGHTS_FILE


def table_bytes(config) -> int:
    per_row = config.embedding_dim * 4 if config.table_dtype == "float32" else config.embedding_dim + 8
    return config.total_rows * per_row


# ----- TorchServe helpers ----------------------------------------------------------------
def server(work: Path, store: Path, tag: str, load_models: str | None = None) -> TorchServe:
    start_dir = work / "ts" / tag
    shutil.rmtree(start_dir, ignore_errors=True)
    return TorchServe(start_dir, store, base_config=ROOT / "config.properties", load_models=load_models, startup_timeout=300)


def register(ts: TorchServe, name: str, workers: int) -> None:
    ts.register(name, model_name=name, initial_workers=workers, synchronous=True, timeout=600)
    ts.wait_ready(name, workers=workers, timeout=600)


def random_rows(config, rows: int, seed: int):
    """Raw columns of random traffic: dense counts and hex strings spread over every table row."""
    rng = np.random.default_rng(seed)
    dense = rng.integers(0, 1000, size=(rows, config.num_dense)).astype(np.float32)
    dense[rng.random(dense.shape) < 0.1] = np.nan
    values = rng.integers(0, 2**32, size=rows * config.num_sparse, dtype=np.uint64)
    sparse = np.array([f"{v:08x}" for v in values]).reshape(rows, config.num_sparse)
    return dense, sparse


def binary_body(config, rows: int, seed: int) -> bytes:
    from dlrm_serve.codecs import encode_binary
    from dlrm_serve.features import FeatureEncoder

    dense, sparse = random_rows(config, rows, seed)
    return encode_binary(FeatureEncoder(config).raw_columns(dense, sparse))


def predict_until_ok(ts: TorchServe, name: str, body: bytes, deadline_s: float = 600.0) -> float:
    """Send ``body`` until it is answered 200 (the model may still be loading); returns the time of that answer."""
    end = time.monotonic() + deadline_s
    last = ""
    while time.monotonic() < end:
        try:
            r = ts.predict(name, body, BINARY, timeout=120)
            if r.status == 200:
                return time.monotonic()
            last = f"{r.status} {r.text[:200]}"
        except OSError as e:
            last = str(e)
        time.sleep(0.02)
    raise RuntimeError(f"no prediction from {name} within {deadline_s:.0f} s (last: {last})")


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
            _read_through(weights)
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
                _read_through(weights)
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


def _log_time(line: str) -> float | None:
    """Seconds since the epoch of a TorchServe log line (``2026-01-02T03:04:05,678 ...``)."""
    import datetime as dt

    try:
        return dt.datetime.strptime(line[:23], "%Y-%m-%dT%H:%M:%S,%f").timestamp()
    except ValueError:
        return None


def worker_phases(ts: TorchServe) -> dict:
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


def _read_through(path: Path, chunk: int = 64 << 20) -> None:
    """Read a file once so that it sits in the page cache."""
    with open(path, "rb", buffering=0) as fh:
        buf = bytearray(chunk)
        while fh.readinto(buf):
            pass


def zip_store_run(args, work: Path, store: Path, kaggle: Path, ts: TorchServe, one: bytes, batch: bytes) -> dict:
    """The same model as a stored (uncompressed) .mar: TorchServe unpacks it at registration."""
    log("building a zip-store archive of the Kaggle-size model")
    t = time.perf_counter()
    cmd = [
        "bash", str(ROOT / "build_mar.sh"), "--artifacts", str(kaggle), "--model-store", str(store),
        "--model-name", "kaggle_zip", "--archive-format", "zip-store", "--workers", "1",
    ]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"build_mar.sh failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    build_s = time.perf_counter() - t
    mar = store / "kaggle_zip.mar"
    try:
        _read_through(mar)
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
            "rss": m.rss, "table_pss": m.file_pss, "table_rss": m.file_rss, "table_mapped": m.file_mapped, "pss_without_tables": m.pss_without_file,
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
        java = [p for p in _children(ts.process.pid) if "java" in p[1]]
        if java:
            out["frontend_pss"] = process_memory(java[0][0]).pss
    finally:
        ts.stop()
    return out


def _children(pid: int) -> list[tuple[int, str]]:
    import psutil

    out = []
    for c in psutil.Process(pid).children(recursive=True):
        try:
            out.append((c.pid, " ".join(c.cmdline())))
        except psutil.Error:
            pass
    return out


# ----- part: throughput -----------------------------------------------------------------
def drive(ts: TorchServe, name: str, bodies: list[bytes], rows_per_body: int, concurrency: int, seconds: float) -> float:
    """Rows per second of ``concurrency`` clients sending ``bodies`` in turn for ``seconds``."""
    port = ts.ports.inference
    headers = {"Authorization": f"Bearer {ts.inference_key}", "Content-Type": BINARY}
    stop_at = time.monotonic() + seconds
    done = [0] * concurrency
    errors: list[str] = []

    def client(k: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        i = k
        try:
            while time.monotonic() < stop_at and not errors:
                conn.request("POST", f"/predictions/{name}", body=bodies[i % len(bodies)], headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                if resp.status != 200:
                    errors.append(f"{resp.status} {data[:200]!r}")
                    return
                done[k] += 1
                i += concurrency
        finally:
            conn.close()

    start = time.monotonic()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    if errors:
        raise RuntimeError(f"{name}: {errors[0]}")
    return sum(done) * rows_per_body / elapsed


class ModelBackend:
    """A loaded :class:`~dlrm_serve.model.DLRM` behind the backend interface (in-process only)."""

    def __init__(self, model):
        self.model = model
        self.config = model.config

    def predict(self, batch) -> np.ndarray:
        import torch

        with torch.inference_mode():
            offsets = None if batch.offsets is None else torch.from_numpy(batch.offsets)
            return self.model(torch.from_numpy(batch.dense), torch.from_numpy(batch.indices), offsets).numpy()


def with_tables(model, weight):
    """``model``'s MLPs over the float32 table ``weight`` (assigned, not copied)."""
    from dlrm_serve.config import CRITEO_KAGGLE_TABLE_SIZES
    from dlrm_serve.model import DLRM

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

    from dlrm_serve.backends import load_backend
    from dlrm_serve.features import FeatureEncoder
    from dlrm_serve.memory import touch_tables

    threads = args.threads
    torch.set_num_threads(threads)
    out = {"batch": args.batch, "threads": threads, "models": {}, "gflops": gemm_gflops()}
    log(f"in-process: {len(models)} models, batch {args.batch}, {threads} threads, GEMM {out['gflops']:.0f} GFLOP/s")
    backends = {label: load_backend(folder) for label, folder in models.items()}
    if "demo" in backends and "kaggle" in backends:
        # The demo's MLPs over the Kaggle-size table (the same mapped file, no copy):
        # the smallest compute per row, so the largest share of time in lookups.
        backends["demo-mlps-kaggle-tables"] = ModelBackend(
            with_tables(backends["demo"].model, backends["kaggle"].model.sparse_arch.weight)
        )
    batches = {}
    for label, b in backends.items():
        touch_tables(b.model)  # steady state: every page mapped, as after long traffic
        enc = FeatureEncoder(b.config)
        batches[label] = [enc.encode_columns(*random_rows(b.config, args.batch, seed=100 + i)) for i in range(8)]
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
        for label, name in names.items():  # warm-up
            drive(ts, name, bodies[label], args.batch, args.concurrency, 1.0)
        samples = {label: [] for label in names}
        for r in range(args.rounds):
            for label, name in names.items():
                samples[label].append(drive(ts, name, bodies[label], args.batch, args.concurrency, args.seconds))
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
    from dlrm_serve.evaluation import log_loss, roc_auc
    from dlrm_serve.features import FeatureEncoder
    from dlrm_serve.train import iter_rows, predict_rows

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
def report(results: dict) -> str:
    sections = [f"Machine: {results['machine']}. Load average at start {results['load_start']}, at end {results['load_end']}."]
    mem = results.get("memory")
    if mem:
        rows = []
        for label, m in mem["models"].items():
            for r in m["runs"]:
                ws = r["per_worker"]
                check = next((c for c in m["checks"] if c["workers"] == r["workers"]), None)
                rows.append([
                    label, r["workers"], f"{r['total_pss'] / MB:,.0f}",
                    f"{sum(w['table_pss'] for w in ws) / MB:,.0f}",
                    " / ".join(f"{w['anonymous'] / MB:.0f}" for w in ws),
                    " / ".join(f"{w['table_mapped'] / MB:,.0f}" for w in ws),
                    f"{np.mean([w['pss_without_tables'] for w in ws]) / MB:,.0f}",
                    f"{check['bound'] / MB:,.0f} ({'ok' if check['ok'] else 'OVER'})" if check else "n/a",
                ])
        sections.append(
            "## Memory: all workers of the Kaggle-size model\n\n"
            "Total PSS of the workers after each read every table page (`dlrm.touch_tables: true`), "
            "under TorchServe with a no-archive model. Bound: (one copy of the tables + N x one worker's PSS "
            f"without tables, measured with 1 worker) x {1 + SLACK:.1f}.\n\n"
            + markdown_table(
                ["model", "workers", "total PSS MB", "tables' PSS MB (all workers)", "anonymous MB per worker",
                 "tables file mapped MB per worker",
                 "PSS without tables MB per worker", "bound MB"],
                rows,
            )
            + "".join(
                f"\n{label}: tables {m['table_bytes'] / MB:,.0f} MB (file {m['file_bytes'] / MB:,.0f} MB); one worker "
                f"without tables {m['worker_without_tables'] / MB:,.0f} MB.\n"
                for label, m in mem["models"].items() if m["worker_without_tables"] is not None
            )
            + (f"\nThe Java frontend: {mem['frontend_pss'] / MB:,.0f} MB PSS (not counted above).\n" if "frontend_pss" in mem else "")
        )
    cold = results.get("cold")
    if cold:
        def sec(v, digits=1):
            return "n/a" if v is None else f"{v:.{digits}f}"

        rows = [
            [r["how"], r["page_cache"], sec(r["healthy_s"]), sec(r["first_prediction_s"]), sec(r.get("python_s")),
             sec(r.get("load_s"), 2), sec(r["first_batch_s"], 2)]
            for r in cold["runs"]
        ]
        sections.append(
            f"## Cold start: Kaggle-size model ({cold['file_bytes'] / 1e9:.2f} GB), no-archive, 1 worker\n\n"
            "Seconds from `torchserve --start` (or from the registration call) to the answer of a one-row "
            "prediction; then the latency of one request of random ids. `dropped`: the weights file was "
            "dropped from the page cache first (posix_fadvise DONTNEED on that file only). From TorchServe's "
            "logs: the worker's Python start (interpreter, torch, TorchServe imports) and the model load "
            "(LOAD command to handler ready).\n\n"
            + markdown_table(
                ["start", "page cache", "healthy / registered s", "first prediction s", "worker Python start s",
                 "model load s", f"then one {results.get('batch', 2048)}-row request s"],
                rows,
            )
        )
    tp = results.get("throughput")
    if tp:
        rows = []
        for label, m in tp["models"].items():
            rows.append([
                label, f"{m['table_rows']:,}", m["table_dtype"], f"{m['table_bytes'] / MB:,.0f}", f"{m['mflop_per_row']:.2f}",
                f"{m['in_process_rows_s']:,.0f}", f"{m['end_to_end_rows_s']:,.0f}" if "end_to_end_rows_s" in m else "n/a",
            ])
        ratio_lines = []
        for big, small in results.get("pairs", []):
            if big in tp["models"] and small in tp["models"]:
                a, b = tp["models"][big], tp["models"][small]
                line = f"- {big} / {small}: in-process {a['in_process_rows_s'] / b['in_process_rows_s']:.2f}"
                if "end_to_end_rows_s" in a and "end_to_end_rows_s" in b:
                    line += f", end to end {a['end_to_end_rows_s'] / b['end_to_end_rows_s']:.2f}"
                ratio_lines.append(line)
        sections.append(
            f"## Throughput at batch {tp['batch']}\n\n"
            f"Rows per second, median of interleaved rounds; ids are random hex strings hashed into the whole tables. "
            f"In-process: `backend.predict` with {tp['threads']} torch thread(s) ({tp['gflops']:.0f} GFLOP/s GEMM "
            f"with as many threads in this run). End to end: binary requests of {tp['batch']} rows to TorchServe, "
            f"{tp.get('concurrency', '-')} in flight, 1 worker per model with {tp['threads']} thread(s).\n\n"
            + markdown_table(["model", "table rows", "tables", "table MB", "MFLOP/row", "in-process rows/s", "end-to-end rows/s"], rows)
            + ("\nRatios (the two models of each pair have the same MLPs):\n\n" + "\n".join(ratio_lines) + "\n" if ratio_lines else "")
        )
    q = results.get("int8")
    if q:
        sections.append(
            "## int8 tables: accuracy on the synthetic test set\n\n"
            f"The demo model trained once ({q['train_rows']:,} rows), quantised row-wise, both scored on the same "
            f"{q['test_rows']:,} test rows.\n\n"
            + markdown_table(
                ["tables", "file MB", "test AUC", "log-loss"],
                [
                    ["float32", f"{q['file_bytes_float32'] / MB:.1f}", f"{q['auc_float32']:.5f}", f"{q['logloss_float32']:.5f}"],
                    ["int8", f"{q['file_bytes_int8'] / MB:.1f}", f"{q['auc_int8']:.5f}", f"{q['logloss_int8']:.5f}"],
                ],
            )
            + f"\nAUC loss (fp32 - int8) {q['auc_loss']:+.6f}; max |p_int8 - p_fp32| {q['max_abs_diff']:.2e}, "
            f"mean {q['mean_abs_diff']:.2e}.\n"
        )
    return sections


def plot(results: dict, name: str) -> Path | None:
    panels = [k for k in ("memory", "cold", "throughput", "int8") if results.get(k)]
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(2, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6.4 * cols, 4.6 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, key in zip(axes.flat, panels):
        if key == "memory":
            for label, m in results["memory"]["models"].items():
                ns = [r["workers"] for r in m["runs"]]
                line = ax.plot(ns, [r["total_pss"] / 1e9 for r in m["runs"]], "o-", label=f"{label}: total PSS")[0]
                ax.plot(ns, [sum(w["table_pss"] for w in r["per_worker"]) / 1e9 for r in m["runs"]], "s:", color=line.get_color(), label=f"{label}: tables' PSS")
                if m["checks"]:
                    ax.plot(ns, [c["bound"] / 1e9 for c in m["checks"]], "--", color=line.get_color(), alpha=0.5, label=f"{label}: bound")
            ax.set_xlabel("workers")
            ax.set_ylabel("GB")
            ax.set_xticks(results["memory"]["workers"])
            ax.set_ylim(0, ax.get_ylim()[1] * 1.45)  # room for the legend above the lines
            ax.set_title("PSS of all workers")
            ax.legend(fontsize=7, ncol=3, loc="upper left")
        elif key == "cold":
            runs = results["cold"]["runs"]
            labels = [f"{r['how'].split(' (')[0]}\n{r['page_cache']}" for r in runs]
            ax.barh(labels, [r["first_prediction_s"] for r in runs], color="tab:blue")
            ax.axvline(15, color="red", ls="--", label="15 s target")
            ax.set_xlabel("seconds to first prediction")
            ax.set_title("Cold start, Kaggle-size model")
            ax.tick_params(axis="y", labelsize=7)
            ax.legend(fontsize=7)
        elif key == "throughput":
            models = results["throughput"]["models"]
            labels = list(models)
            x = np.arange(len(labels))
            ax.bar(x - 0.2, [models[k]["in_process_rows_s"] / 1e3 for k in labels], 0.4, label="in-process")
            if any("end_to_end_rows_s" in models[k] for k in labels):
                e2e = [models[k].get("end_to_end_rows_s", np.nan) / 1e3 for k in labels]
                ax.bar(x + 0.2, e2e, 0.4, label="end to end")
            ax.set_xticks(x, labels, rotation=20, ha="right", fontsize=7)
            ax.set_ylabel("thousand rows/s")
            ax.set_title(f"Throughput, batch {results['throughput']['batch']}")
            ax.legend(fontsize=7)
        elif key == "int8":
            q = results["int8"]
            ax.bar(["float32", "int8"], [q["auc_float32"], q["auc_int8"]], color=["tab:blue", "tab:orange"])
            lo = min(q["auc_float32"], q["auc_int8"])
            ax.set_ylim(lo - 0.01, max(q["auc_float32"], q["auc_int8"]) + 0.005)
            ax.set_ylabel("test AUC")
            ax.set_title(f"int8 tables: test AUC {q['auc_float32']:.5f} -> {q['auc_int8']:.5f}")
    fig.tight_layout()
    path = results_dir() / f"{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----- main ------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated parts to run (default: all of {','.join(PARTS)})")
    p.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "dlrm-bench-scale"), help="folder for big files, reused across runs")
    p.add_argument("--kaggle", default=None, help="existing float32 Kaggle-size artifacts (default: initialise WORK/kaggle)")
    p.add_argument("--workers", default="1,2,4", help="worker counts for the memory part (default: 1,2,4)")
    p.add_argument("--batch", type=int, default=2048, help="rows per batch / request (default: 2048)")
    p.add_argument(
        "--threads", type=int, default=1,
        help="throughput: torch threads in-process and per worker (default: 1; on a shared machine "
        "2-thread OpenMP stalls whenever one thread is descheduled, which swamps the ratios)",
    )
    p.add_argument("--rounds-inproc", type=int, default=10, help="interleaved in-process rounds (default: 10)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved end-to-end rounds (default: 5)")
    p.add_argument("--seconds", type=float, default=3.0, help="seconds per model per end-to-end round (default: 3)")
    p.add_argument("--concurrency", type=int, default=2, help="requests in flight end to end (default: 2)")
    p.add_argument("--no-serve", action="store_true", help="throughput: in-process only")
    p.add_argument("--no-int8", action="store_true", help="memory and throughput: skip the int8 Kaggle-size model")
    p.add_argument("--zip-store", action="store_true", help="cold: also time a zip-store .mar (builds a 2 GB file)")
    p.add_argument("--onnx", action="store_true", help="memory: also the onnxruntime backend (exports 2 GB of ONNX data)")
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
    for name in ("batch", "threads", "rounds", "rounds_inproc", "concurrency"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
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
