"""Soak test (``make soak``): mixed traffic for minutes, errors, latency and worker memory over time.

Sixteen threads (``--concurrency``) send requests drawn at random from a
pool: JSON instances, JSON by feature name, TSV and the binary format, each
over REST and gRPC, of 1, 32 and 256 rows, with about 10% bad requests
(``--bad-fraction``: wrong field counts, a bad value, broken JSON, a
truncated binary body).  Every good answer is compared with the in-process
backend; every bad request must get a 400 naming the problem.  Nothing is
retried (``retries=0``), so every 5xx is seen.

Every ``--interval`` seconds it records p50/p99 latency and the RSS of each
TorchServe worker (PIDs from the management API, RSS from psutil).  It
writes ``bench/results/soak-<time>.md`` (tables) and ``.png`` (plots) and
exits 1 when

- any request got an unexpected answer (a 5xx, a wrong prediction, a bad
  request accepted, any other error), or a worker was replaced; or
- a worker's RSS grew by more than ``--max-rss-growth`` (5%) from the end
  of the warm-up (``--warmup``) to the end of the run.

By default it starts its own TorchServe from the repository's
``config.properties`` on free loopback ports, serving ``--artifacts`` (a
random demo-sized model when that folder holds none).  ``--attach`` drives a
running server instead (``make serve``: ports from the options, keys from
``--key-file``); ``--artifacts`` must then be what it serves.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from dlrm_serve.client import connect  # noqa: E402
from dlrm_serve.client.payloads import Payload  # noqa: E402
from dlrm_serve.io.codecs import encode_binary  # noqa: E402
from dlrm_serve.errors import DLRMServeError, InvalidInput  # noqa: E402
from dlrm_serve.io.features import FeatureEncoder  # noqa: E402

FORMATS = ("json", "named", "tsv", "binary")
TRANSPORTS = ("rest", "grpc")
SIZES = (1, 32, 256)


@dataclass(frozen=True)
class Case:
    """One request of the pool: its body and what it must get."""

    name: str  # e.g. "tsv/grpc" or "bad:truncated-binary/rest"
    transport: str
    format: str  # the REST content type family: json, tsv or binary
    body: bytes
    rows: int
    expected: np.ndarray | None  # None: a bad request, which must get a 400


# ----- the request pool -----------------------------------------------------------
def random_instances(config, n: int, rng: np.random.Generator) -> list[dict]:
    out = []
    for _ in range(n):
        dense = [None if rng.random() < 0.1 else int(rng.integers(0, 1000)) for _ in range(config.num_dense)]
        sparse = [None if rng.random() < 0.05 else f"{int(rng.integers(0, 2**32)):08x}" for _ in range(config.num_sparse)]
        out.append({"dense": dense, "sparse": sparse})
    return out


def bodies(config, encoder: FeatureEncoder, instances: list[dict]) -> dict[str, tuple[str, bytes]]:
    """The same rows in each format: name -> (REST format, body)."""
    named = []
    for inst in instances:
        row = {n: v for n, v in zip(config.dense_names, inst["dense"]) if v is not None}
        row.update({n: v for n, v in zip(config.sparse_names, inst["sparse"]) if v is not None})
        named.append(row)
    tsv = "\n".join(
        "\t".join(["" if v is None else str(v) for v in inst["dense"]] + ["" if v is None else v for v in inst["sparse"]])
        for inst in instances
    )
    return {
        "json": ("json", json.dumps({"instances": instances}).encode()),
        "named": ("json", json.dumps({"instances": named}).encode()),
        "tsv": ("tsv", (tsv + "\n").encode()),
        "binary": ("binary", encode_binary(encoder.raw_instances(instances))),
    }


def bad_bodies(config, encoder: FeatureEncoder, rng: np.random.Generator) -> dict[str, tuple[str, bytes]]:
    """Requests that must be refused with a 400."""
    good = random_instances(config, 4, rng)
    short = [dict(good[0], dense=good[0]["dense"][:-1])]
    worse = [dict(good[0], sparse=["zz-not-hex"] + good[0]["sparse"][1:])]
    binary = encode_binary(encoder.raw_instances(good))
    return {
        "short-dense-json": ("json", json.dumps({"instances": short}).encode()),
        "bad-hex-json": ("json", json.dumps({"instances": worse}).encode()),
        "broken-json": ("json", b'{"instances": [{"dense": [1, 2'),
        "named-list-value": ("json", json.dumps({"instances": [{config.dense_names[0]: [1, 2]}]}).encode()),
        "short-tsv": ("tsv", b"1\t2\t3\tabc\n"),
        "truncated-binary": ("binary", binary[: len(binary) - 7]),
    }


def make_pool(backend, seed: int = 0) -> tuple[list[Case], list[Case]]:
    """(good cases, bad cases) for every format, transport and size."""
    rng = np.random.default_rng(seed)
    config = backend.config
    encoder = FeatureEncoder(config)
    good: list[Case] = []
    for size in SIZES:
        for _ in range(2):
            instances = random_instances(config, size, rng)
            expected = backend.predict(encoder.encode_instances(instances))
            for name, (fmt, body) in bodies(config, encoder, instances).items():
                for transport in TRANSPORTS:
                    good.append(Case(f"{name}/{transport}", transport, fmt, body, size, expected))
    bad = [
        Case(f"bad:{name}/{transport}", transport, fmt, body, 0, None)
        for name, (fmt, body) in bad_bodies(config, encoder, rng).items()
        for transport in TRANSPORTS
    ]
    return good, bad


# ----- one run ---------------------------------------------------------------------
@dataclass
class Record:
    t: float  # seconds since the start
    seconds: float
    case: str
    outcome: str  # "ok", "refused 400", or an unexpected outcome
    expected: bool


def classify(case: Case, got: np.ndarray | None, err: BaseException | None) -> tuple[str, bool]:
    """(outcome, whether it is what the case must get)."""
    if case.expected is None:
        if isinstance(err, InvalidInput) and err.status == 400:
            return "refused 400", True
        if err is None:
            return "bad request accepted", False
    elif err is None:
        ok = got is not None and got.shape == case.expected.shape and np.allclose(got, case.expected, rtol=0, atol=1e-5)
        return ("ok", True) if ok else ("wrong answer", False)
    if isinstance(err, DLRMServeError):
        return f"{type(err).__name__} {err.status}", False
    return type(err).__name__, False


def worker_rss(mgmt, model: str) -> dict[int, int]:
    """{pid: RSS bytes} of the model's workers."""
    import psutil

    out = {}
    for d in mgmt.describe_model(model):
        for w in d.get("workers", []):
            pid = int(w.get("pid") or 0)
            if pid <= 0:
                continue
            try:
                out[pid] = psutil.Process(pid).memory_info().rss
            except psutil.Error:
                out[pid] = 0
    return out


def run(
    endpoints: dict,
    backend,
    *,
    model: str = "dlrm",
    duration: float = 600.0,
    concurrency: int = 16,
    bad_fraction: float = 0.1,
    interval: float = 10.0,
    seed: int = 0,
    log=print,
) -> tuple[list[Record], list[tuple[float, dict[int, int]]]]:
    """Drive the server for ``duration`` seconds; (every request's record, RSS samples)."""
    good, bad = make_pool(backend, seed)
    clients = {t: connect(t, model=model, retries=0, concurrency=concurrency, **endpoints) for t in TRANSPORTS}
    mgmt = connect("rest", concurrency=1, **endpoints)
    records: list[Record] = []
    lock = threading.Lock()
    stop = threading.Event()
    t0 = time.monotonic()

    def drive(worker: int) -> None:
        rng = np.random.default_rng(seed * 1000 + worker + 1)
        while not stop.is_set():
            pool = bad if rng.random() < bad_fraction else good
            case = pool[int(rng.integers(0, len(pool)))]
            got, err = None, None
            start = time.monotonic()
            try:
                got = clients[case.transport].send(Payload(bytes(case.body), case.format, case.rows or 0))
            except Exception as e:  # every outcome is recorded and judged
                err = e
            end = time.monotonic()
            outcome, expected = classify(case, got, err)
            with lock:
                records.append(Record(start - t0, end - start, case.name, outcome, expected))

    samples: list[tuple[float, dict[int, int]]] = [(0.0, worker_rss(mgmt, model))]
    threads = [threading.Thread(target=drive, args=(i,), daemon=True) for i in range(concurrency)]
    for th in threads:
        th.start()
    try:
        while True:
            now = time.monotonic() - t0
            if now >= duration:
                break
            time.sleep(min(interval, duration - now))
            samples.append((time.monotonic() - t0, worker_rss(mgmt, model)))
            with lock:
                n, bad_n = len(records), sum(1 for r in records if not r.expected)
            log(f"soak: {samples[-1][0]:6.0f} s, {n} requests, {bad_n} unexpected, worker RSS MB "
                f"{[round(v / 2**20) for v in samples[-1][1].values()]}")
    finally:
        stop.set()
        for th in threads:
            th.join(timeout=120)
        for c in (*clients.values(), mgmt):
            c.close()
    return records, samples


# ----- the report ----------------------------------------------------------------------
@dataclass
class Verdict:
    ok: bool
    reasons: list[str]
    rss_growth: dict[int, float]  # pid -> fraction grown after warm-up


def judge(records, samples, warmup: float, max_growth: float) -> Verdict:
    reasons = []
    unexpected = [r for r in records if not r.expected]
    if unexpected:
        kinds = sorted({r.outcome for r in unexpected})
        reasons.append(f"{len(unexpected)} unexpected answers ({', '.join(kinds)})")
    if not records:
        reasons.append("no request was sent")
    pids = [set(s) for _, s in samples]
    if pids and any(p != pids[0] for p in pids):
        reasons.append(f"workers changed during the run: {sorted(pids[0])} -> {sorted(pids[-1])}")
    growth: dict[int, float] = {}
    after = [(t, s) for t, s in samples if t >= warmup]
    if len(after) >= 2:
        first, last = after[0][1], after[-1][1]
        for pid in first:
            if pid in last and first[pid] > 0:
                growth[pid] = last[pid] / first[pid] - 1.0
        worst = max(growth.values(), default=0.0)
        if worst > max_growth:
            reasons.append(f"worker RSS grew by {worst:.1%} after warm-up (limit {max_growth:.0%})")
    else:
        reasons.append("too few RSS samples after the warm-up to judge memory growth (run longer)")
    return Verdict(not reasons, reasons, growth)


def windows(records, samples, interval: float):
    """Per interval: (start s, requests, p50 ms, p99 ms, unexpected, {pid: RSS MB})."""
    out = []
    edges = [t for t, _ in samples]
    for i in range(1, len(edges)):
        lo, hi = edges[i - 1], edges[i]
        lat = np.array([r.seconds for r in records if lo <= r.t < hi])
        bad = sum(1 for r in records if lo <= r.t < hi and not r.expected)
        p50, p99 = (np.percentile(lat, 50) * 1e3, np.percentile(lat, 99) * 1e3) if lat.size else (float("nan"),) * 2
        rss = {pid: v / 2**20 for pid, v in samples[i][1].items()}
        out.append((lo, lat.size, p50, p99, bad, rss))
    return out


def markdown(records, samples, verdict: Verdict, settings: dict, interval: float) -> str:
    lines = [f"# Soak run {settings['started']}", ""]
    lines += ["| setting | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in settings.items()] + [""]
    counts: dict[tuple[str, str], int] = {}
    for r in records:
        family = "bad" if r.case.startswith("bad:") else "good"
        counts[(family, r.outcome)] = counts.get((family, r.outcome), 0) + 1
    lines += ["## Answers by kind", "", "| requests | outcome | count | expected |", "|---|---|---:|---|"]
    for (family, outcome), n in sorted(counts.items()):
        lines.append(f"| {family} | {outcome} | {n} | {'yes' if (family, outcome) in (('good', 'ok'), ('bad', 'refused 400')) else '**no**'} |")
    per_case: dict[str, list[Record]] = {}
    for r in records:
        per_case.setdefault(r.case, []).append(r)
    lines += ["", "## By request kind", "", "| request | count | p50 ms | p99 ms | unexpected |", "|---|---:|---:|---:|---:|"]
    for name, rs in sorted(per_case.items()):
        ms = np.array([r.seconds for r in rs]) * 1e3
        lines.append(f"| {name} | {len(rs)} | {np.percentile(ms, 50):.1f} | {np.percentile(ms, 99):.1f} | {sum(not r.expected for r in rs)} |")
    lat = np.array([r.seconds for r in records]) * 1e3
    total_s = samples[-1][0] if samples else 0.0
    lines += ["", f"{len(records)} requests in {total_s:.0f} s ({len(records) / max(total_s, 1e-9):.0f}/s); "
              f"latency p50 {np.percentile(lat, 50):.1f} ms, p99 {np.percentile(lat, 99):.1f} ms." if lat.size else "", ""]
    pids = sorted(samples[0][1]) if samples else []
    lines += ["## Over time", "", "| from s | requests | p50 ms | p99 ms | unexpected | " + " | ".join(f"worker {p} RSS MB" for p in pids) + " |",
              "|---:|---:|---:|---:|---:|" + "---:|" * len(pids)]
    for lo, n, p50, p99, bad, rss in windows(records, samples, interval):
        lines.append(f"| {lo:.0f} | {n} | {p50:.1f} | {p99:.1f} | {bad} | " + " | ".join(f"{rss.get(p, float('nan')):.0f}" for p in pids) + " |")
    lines += ["", "## Verdict", ""]
    for pid, g in sorted(verdict.rss_growth.items()):
        lines.append(f"- worker {pid}: RSS {g:+.2%} from the end of the warm-up to the end")
    lines.append(f"- **{'PASS' if verdict.ok else 'FAIL'}**" + ("" if verdict.ok else ": " + "; ".join(verdict.reasons)))
    return "\n".join(lines) + "\n"


def plot(records, samples, interval: float, path: Path, warmup: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = windows(records, samples, interval)
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    mids = [lo + interval / 2 for lo, *_ in rows]
    ax1.plot(mids, [r[2] for r in rows], label="p50")
    ax1.plot(mids, [r[3] for r in rows], label="p99")
    ax1.set_ylabel("latency (ms)")
    ax1.legend()
    ax1.set_title("dlrm-serve soak: latency and worker RSS")
    for pid in sorted(samples[0][1]) if samples else []:
        ax2.plot([t for t, _ in samples], [s.get(pid, np.nan) / 2**20 for _, s in samples], marker=".", label=f"worker {pid}")
    ax2.axvline(warmup, color="grey", linestyle=":", label="end of warm-up")
    ax2.set_ylabel("RSS (MB)")
    ax2.set_xlabel("seconds")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ----- the command -------------------------------------------------------------------
def served_artifacts(path: str | None, work: Path, log) -> Path:
    """``path`` when it holds artifacts, else a random model of the demo preset made in ``work``."""
    if path and (Path(path) / "dlrm.json").is_file():
        return Path(path)
    from dlrm_serve.artifacts import save_artifacts
    from dlrm_serve.config import preset
    from dlrm_serve.model.dlrm import DLRM
    import torch

    torch.manual_seed(0)
    out = work / "artifacts"
    save_artifacts(DLRM(preset("demo")), out)
    log(f"soak: no artifacts in {path!r}: serving a random model of the demo preset")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=600.0, help="seconds of traffic (default: 600)")
    p.add_argument("--warmup", type=float, default=None, help="seconds before RSS is judged (default: 60, or a fifth of a shorter run)")
    p.add_argument("--interval", type=float, default=None, help="seconds between samples (default: duration / 30, 2 to 20)")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--bad-fraction", type=float, default=0.1)
    p.add_argument("--max-rss-growth", type=float, default=0.05, help="fail above this RSS growth after warm-up (default: 0.05)")
    p.add_argument("--artifacts", default=str(ROOT / "artifacts"), help="the served model's artifacts (default: artifacts/)")
    p.add_argument("--model", default="dlrm")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"), help="where the .md and .png go")
    p.add_argument("--attach", action="store_true", help="use a running server instead of starting one")
    p.add_argument("--inference-url", default="http://127.0.0.1:8080")
    p.add_argument("--management-url", default="http://127.0.0.1:8081")
    p.add_argument("--grpc-target", default="127.0.0.1:7070")
    p.add_argument("--key-file", default="key_file.json")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    warmup = args.warmup if args.warmup is not None else min(60.0, args.duration / 5)
    interval = args.interval if args.interval is not None else min(20.0, max(2.0, args.duration / 30))
    work = Path(tempfile.mkdtemp(prefix="dlrm-soak-"))
    artifacts = served_artifacts(args.artifacts, work, print)
    from dlrm_serve.runtime.backends import load_backend

    backend = load_backend(artifacts, "torch")
    server = None
    if args.attach:
        endpoints = dict(inference_url=args.inference_url, management_url=args.management_url,
                         grpc_target=args.grpc_target, key_file=args.key_file)  # fmt: skip
    else:
        from dlrm_serve.testing.launcher import TorchServe

        store = work / "model_store"
        subprocess.run(["bash", str(ROOT / "build_mar.sh"), "--artifacts", str(artifacts), "--model-store", str(store),
                        "--model-name", args.model], check=True, cwd=ROOT)  # fmt: skip
        server = TorchServe(work / "start", store, base_config=ROOT / "config.properties",
                            load_models=f"{args.model}.mar", log_config=ROOT / "log4j2.xml")  # fmt: skip
        server.start()
        server.wait_ready(args.model, workers=1, timeout=180)
        time.sleep(2)  # let the other workers come up too
        endpoints = dict(inference_url=server.inference_url, management_url=server.management_url,
                         grpc_target=server.grpc_inference_target, key_file=server.start_dir / "key_file.json")  # fmt: skip
        print(f"soak: started TorchServe in {work / 'start'}")
    started = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    try:
        records, samples = run(endpoints, backend, model=args.model, duration=args.duration, concurrency=args.concurrency,
                               bad_fraction=args.bad_fraction, interval=interval, seed=args.seed)  # fmt: skip
    finally:
        if server is not None:
            server.stop()
    verdict = judge(records, samples, warmup, args.max_rss_growth)
    settings = {
        "started": started,
        "duration s": f"{args.duration:.0f}",
        "warm-up s": f"{warmup:.0f}",
        "concurrency": args.concurrency,
        "bad fraction": args.bad_fraction,
        "formats": "JSON, named JSON, TSV, binary; REST and gRPC; 1/32/256 rows",
        "server": "attached" if args.attach else "started from config.properties",
        "model": f"{args.model} ({artifacts})",
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"soak-{started.replace(':', '')}"
    text = markdown(records, samples, verdict, settings, interval)
    stem.with_suffix(".md").write_text(text)
    plot(records, samples, interval, stem.with_suffix(".png"), warmup)
    print(text)
    print(f"soak: wrote {stem}.md and {stem}.png")
    if verdict.ok:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"soak: the server's start folder and logs are kept in {work}")
    return 0 if verdict.ok else 1


if __name__ == "__main__":
    sys.exit(main())
