"""Server control and artifacts for ``bench_scale.py``: files on disk, archives, TorchServe.

Big files live in the work folder and are reused by later runs: the
Kaggle-size artifacts, their int8 copy, the model store.  Archives are
built with ``./build_mar.sh --archive-format no-archive`` (rebuilt when the
code or the weights change); the weights the archiver copied are then
replaced by hard links to the artifacts' own file, and variants that differ
only in model-config.yaml are hard-linked folders, so disk and page cache
hold one copy of each table file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (str(HERE), str(ROOT)):
    if p not in sys.path:
        sys.path.insert(0, p)

from common import CONTENT_TYPES, random_columns  # noqa: E402

from dlrm_serve.artifacts import WEIGHTS_FILE  # noqa: E402
from dlrm_serve.config import preset  # noqa: E402
from dlrm_serve.testing.launcher import TorchServe  # noqa: E402
from dlrm_serve.testing.procmem import evict_from_page_cache  # noqa: E402

BINARY = CONTENT_TYPES["binary"]


# ----- logging --------------------------------------------------------------------------
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
        from dlrm_serve.model.quantize import init_artifacts

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
        "bash", str(ROOT / "build_mar.sh"), "--precision", "fp32", "--artifacts", str(artifacts), "--model-store", str(store),
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
    from dlrm_serve.runtime.export import onnx_problem

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
    code = "import sys; from dlrm_serve.runtime.export import export_onnx; print(export_onnx(sys.argv[1]).summary())"
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

def read_through(path: Path, chunk: int = 64 << 20) -> None:
    """Read a file once so that it sits in the page cache."""
    with open(path, "rb", buffering=0) as fh:
        buf = bytearray(chunk)
        while fh.readinto(buf):
            pass


# ----- TorchServe ----------------------------------------------------------------------
def server(work: Path, store: Path, tag: str, load_models: str | None = None) -> TorchServe:
    start_dir = work / "ts" / tag
    shutil.rmtree(start_dir, ignore_errors=True)
    return TorchServe(start_dir, store, base_config=ROOT / "config.properties", load_models=load_models, startup_timeout=300)

def register(ts: TorchServe, name: str, workers: int) -> None:
    ts.register(name, model_name=name, initial_workers=workers, synchronous=True, timeout=600)
    ts.wait_ready(name, workers=workers, timeout=600)

def children(pid: int) -> list[tuple[int, str]]:
    import psutil

    out = []
    for c in psutil.Process(pid).children(recursive=True):
        try:
            out.append((c.pid, " ".join(c.cmdline())))
        except psutil.Error:
            pass
    return out


# ----- traffic --------------------------------------------------------------------------
def binary_body(config, rows: int, seed: int) -> bytes:
    """One binary request body of ``rows`` random Criteo-like rows."""
    from dlrm_serve.io.codecs import encode_binary
    from dlrm_serve.io.features import FeatureEncoder

    return encode_binary(FeatureEncoder(config).raw_columns(*random_columns(config, rows, seed)))


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
