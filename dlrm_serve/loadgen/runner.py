"""Run LoadGen against a SUT: settings, one test, the Server peak search, progress, the result.

Durations: the default is a *smoke* run (:data:`SMOKE_DURATION_MS`, a few
seconds, with small minimum query counts), which says so in its output.
``duration_ms >= MLPERF_DURATION_MS`` (600 s) switches to MLPerf's own
minimum query counts too, as a submission would run.

LoadGen writes its own files into the output folder
(``mlperf_log_summary.txt``, ``mlperf_log_detail.txt``,
``mlperf_log_accuracy.json``); :func:`run_loadgen` adds
``loadgen_result.json``, the figures read back from the summary plus what
ran (SUT, CPU, load average, rows per sample).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dlrm_serve.errors import UsageError
from dlrm_serve.loadgen.samples import QuerySet

__all__ = [
    "SMOKE_DURATION_MS",
    "MLPERF_DURATION_MS",
    "DEFAULT_LATENCY_MS",
    "Summary",
    "read_summary",
    "run_test",
    "find_peak",
    "run_loadgen",
    "cpu_name",
]

SMOKE_DURATION_MS = 3000
MLPERF_DURATION_MS = 600_000
DEFAULT_LATENCY_MS = 60.0  # MLPerf's Server bound for DLRMv2, at the 99th percentile
# Enough queries for LoadGen's early-stopping estimate of the p99 (about 460
# with none over the bound) plus room for the few over it that a busy host gives.
SMOKE_SERVER_QUERIES = 1024
# MLPerf's own minimum counts (mlperf.conf) for the full-length runs.
MLPERF_MIN_QUERIES = {"offline": 24576, "server": 270336}
SUMMARY = "mlperf_log_summary.txt"
LOG_FILES = (SUMMARY, "mlperf_log_detail.txt", "mlperf_log_accuracy.json")


@dataclass
class Summary:
    """LoadGen's summary of one run, plus what the SUT counted.

    ``samples_per_s`` is LoadGen's "Samples per second" (Offline) or
    "Completed samples per second" (Server); ``rows_per_s`` multiplies it by
    the mean rows of the samples answered.  Latencies are in ms.
    """

    scenario: str
    mode: str
    valid: bool
    samples_per_s: float
    rows_per_s: float
    p99_ms: float
    p50_ms: float
    target_qps: float | None
    errors: int
    out: str
    fields: dict = field(default_factory=dict)

    def line(self) -> str:
        if self.mode == "accuracy":
            return f"{self.scenario} accuracy: every sample answered once" + (f", {self.errors} failed" if self.errors else "")
        target = f" at target {self.target_qps:.1f} QPS" if self.target_qps and self.scenario == "server" else ""
        return (
            f"{self.scenario} {self.mode}{target}: {'VALID' if self.valid else 'INVALID'}, "
            f"{self.samples_per_s:,.1f} samples/s ({self.rows_per_s:,.0f} rows/s), p99 {self.p99_ms:.1f} ms"
            + (f", {self.errors} failed samples" if self.errors else "")
        )


def read_summary(path: str | os.PathLike) -> dict[str, str]:
    """The ``key : value`` lines of LoadGen's ``mlperf_log_summary.txt``."""
    out: dict[str, str] = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() and key.strip() not in out:
            out[key.strip()] = value.strip()
    return out


def _float(fields: dict, key: str) -> float:
    try:
        return float(fields.get(key, "nan"))
    except ValueError:
        return float("nan")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown CPU"


def _settings(scenario: str, accuracy: bool, target_qps: float, latency_ms: float, duration_ms: int):
    import mlperf_loadgen as lg

    s = lg.TestSettings()
    s.scenario = lg.TestScenario.Server if scenario == "server" else lg.TestScenario.Offline
    s.mode = lg.TestMode.AccuracyOnly if accuracy else lg.TestMode.PerformanceOnly
    s.min_duration_ms = int(duration_ms)
    if duration_ms >= MLPERF_DURATION_MS:
        s.min_query_count = MLPERF_MIN_QUERIES[scenario]
    else:
        s.min_query_count = SMOKE_SERVER_QUERIES if scenario == "server" else 1
    if scenario == "server":
        s.server_target_qps = float(target_qps)
        s.server_target_latency_ns = int(latency_ms * 1e6)
        s.server_target_latency_percentile = 0.99
    else:
        s.offline_expected_qps = float(target_qps)
    return s


class _Progress:
    """A tqdm bar fed from the SUT's counters by a thread, twice a second."""

    def __init__(self, sut: Any, total: int, desc: str, enabled: bool):
        self.sut, self.enabled = sut, enabled
        self._stop = threading.Event()
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="samples", file=sys.stderr, mininterval=0.5, leave=False)
            self._start = sut.completed
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            self.bar.n = self.sut.completed - self._start
            self.bar.set_postfix(errors=self.sut.errors, refresh=False)
            self.bar.refresh()

    def close(self) -> None:
        if self.enabled:
            self._stop.set()
            self._thread.join()
            self.bar.close()


def run_test(
    sut: Any,
    qset: QuerySet,
    scenario: str,
    out: str | os.PathLike,
    *,
    target_qps: float,
    latency_ms: float = DEFAULT_LATENCY_MS,
    duration_ms: int = SMOKE_DURATION_MS,
    accuracy: bool = False,
    progress: bool = True,
) -> Summary:
    """One LoadGen test of ``sut`` over ``qset``; LoadGen's files go to ``out``.

    ``target_qps``: Offline's expected QPS (how many samples LoadGen issues:
    about ``target_qps * duration``) or Server's arrival rate.
    """
    import mlperf_loadgen as lg

    if scenario not in ("offline", "server"):
        raise UsageError(f"scenario must be offline or server, got {scenario!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    settings = _settings(scenario, accuracy, target_qps, latency_ms, duration_ms)
    log_out = lg.LogOutputSettings()
    log_out.outdir = str(out)
    log_out.copy_summary_to_stdout = False
    log_settings = lg.LogSettings()
    log_settings.log_output = log_out
    log_settings.enable_trace = False
    n = len(qset)
    qsl = lg.ConstructQSL(n, n, lambda _: None, lambda _: None)  # bodies are already in memory
    lg_sut = lg.ConstructSUT(sut.issue, sut.flush)
    expected = n if accuracy else max(settings.min_query_count, int(target_qps * duration_ms / 1000))
    errors0, done0, rows0 = sut.errors, sut.completed, sut.rows_done
    desc = f"loadgen {scenario} {sut.name}" + (" accuracy" if accuracy else "")
    bar = _Progress(sut, expected, desc, progress)
    try:
        lg.StartTestWithLogSettings(lg_sut, qsl, settings, log_settings)
    finally:
        bar.close()
        lg.DestroySUT(lg_sut)
        lg.DestroyQSL(qsl)
    fields = read_summary(out / SUMMARY)
    sps = _float(fields, "Samples per second" if scenario == "offline" else "Completed samples per second")
    done, rows = sut.completed - done0, sut.rows_done - rows0
    mean_rows = rows / done if done else float(qset.sizes.mean())
    return Summary(
        scenario=scenario,
        mode="accuracy" if accuracy else "performance",
        valid=fields.get("Result is") == "VALID" and sut.errors == errors0,
        samples_per_s=sps,
        rows_per_s=sps * mean_rows,
        p99_ms=_float(fields, "99.00 percentile latency (ns)") / 1e6,
        p50_ms=_float(fields, "50.00 percentile latency (ns)") / 1e6,
        target_qps=float(target_qps),
        errors=sut.errors - errors0,
        out=str(out),
        fields=fields,
    )


def find_peak(
    sut: Any,
    qset: QuerySet,
    out: str | os.PathLike,
    *,
    start_qps: float,
    latency_ms: float = DEFAULT_LATENCY_MS,
    duration_ms: int = SMOKE_DURATION_MS,
    max_probes: int = 7,
    precision: float = 0.05,
    progress: bool = True,
    say=print,
) -> tuple[Summary | None, list[Summary]]:
    """The highest target QPS whose Server run is VALID, by growing then bisecting from ``start_qps``.

    Each probe is a full LoadGen run in ``out/peak/qps-<Q>``; the search
    stops when the VALID and INVALID bounds are within ``precision`` of
    each other or after ``max_probes`` runs.  Returns the best VALID run
    (None if none was) and every probe.
    """
    lo: float | None = None
    hi: float | None = None
    best: Summary | None = None
    probes: list[Summary] = []
    q = float(start_qps)
    for _ in range(max_probes):
        s = run_test(
            sut, qset, "server", Path(out) / "peak" / f"qps-{q:.1f}",
            target_qps=q, latency_ms=latency_ms, duration_ms=duration_ms, progress=progress,
        )
        probes.append(s)
        say(f"  peak search: {s.line()}")
        if s.valid:
            lo, best = q, s
        else:
            hi = q
        if lo is not None and hi is not None and (hi - lo) <= precision * lo:
            break
        if hi is None:
            q *= 1.4
        elif lo is None:
            q *= 0.6
        else:
            q = (lo + hi) / 2
    return best, probes


def _make_sut(kind: str, qset: QuerySet, config, artifacts, model: str, connection: dict, concurrency: int, precision: str):
    if kind == "inprocess":
        from dlrm_serve.runtime.backends import load_backend
        from dlrm_serve.serve.serving import Predictor
        from dlrm_serve.loadgen.suts import InProcessSUT

        if artifacts is None:
            raise UsageError("the in-process SUT needs the model: pass --artifacts DIR")
        backend = load_backend(artifacts, "torch", precision=precision)
        return InProcessSUT(Predictor(backend, model_name=model), qset)
    if kind in ("rest", "grpc"):
        from dlrm_serve.client import connect
        from dlrm_serve.loadgen.suts import ClientSUT

        client = connect(kind, config=config, model=model, payload="binary", concurrency=concurrency, **connection)
        return ClientSUT(client, qset, concurrency=concurrency)
    raise UsageError(f"--sut must be inprocess, rest or grpc, got {kind!r}")


def _in_thread(fn, *args):
    """``fn(*args)`` on a fresh thread, as the SUT's own threads run.

    Measured here: torch's CPU forward called from the main thread ran 4-8x
    slower than the same calls from a worker thread while LoadGen's threads
    existed, which made the Offline sizing far too small.
    """
    box: list = []
    t = threading.Thread(target=lambda: box.append(fn(*args)), daemon=True)
    t.start()
    t.join()
    if not box:
        raise RuntimeError("measuring the SUT's throughput failed; see the traceback above")
    return box[0]


def _load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def run_loadgen(
    scenario: str,
    sut: str,
    out: str | os.PathLike,
    *,
    artifacts: str | os.PathLike | None = None,
    config: str | os.PathLike | None = None,
    model: str = "dlrm",
    target_qps: float | None = None,
    latency_ms: float = DEFAULT_LATENCY_MS,
    duration_ms: int | None = None,
    accuracy: bool = False,
    find_peak_qps: bool = False,
    data: str | os.PathLike | None = None,
    samples: int = 1024,
    seed: int = 0,
    connection: dict | None = None,
    concurrency: int = 16,
    precision: str = "auto",
    progress: bool = True,
    say=print,
) -> dict:
    """``dlrm-serve loadgen``: build the query set and SUT, run LoadGen, write ``loadgen_result.json``.

    Without ``target_qps`` the SUT's throughput is measured first (2 s):
    Offline expects 2.5x of it (a busy host swings by that much; a run sized too small ends early and is INVALID) (LoadGen then issues enough samples to fill
    the duration), Server runs at 0.3x of it (a rate a shared, busy host still answers within the bound), and ``find_peak_qps`` starts
    its search there.  Returns the result dict (also written to the file).
    """
    from dlrm_serve.artifacts import load_config
    from dlrm_serve.loadgen.samples import build_query_set, synthetic_data

    if scenario not in ("offline", "server"):
        raise UsageError(f"--scenario must be offline or server, got {scenario!r}")
    if find_peak_qps and (scenario != "server" or accuracy):
        raise UsageError("--find-peak searches the Server scenario's QPS: use it with --scenario server, without --accuracy")
    source = config or artifacts
    if source is None:
        raise UsageError("pass --artifacts DIR (needed in process) or --config DIR / dlrm.json (the served model's)")
    cfg = load_config(source)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    smoke = duration_ms is None or duration_ms < MLPERF_DURATION_MS
    duration_ms = SMOKE_DURATION_MS if duration_ms is None else int(duration_ms)
    if smoke:
        say(
            f"loadgen: smoke run ({duration_ms} ms per test, small minimum query counts); "
            f"MLPerf's own runs take --duration-ms {MLPERF_DURATION_MS}"
        )
    from dlrm_serve.loadgen.samples import sample_sizes

    if data is None:
        data = synthetic_data(cfg, int(sample_sizes(samples, seed).sum()), out, seed)
    qset = build_query_set(cfg, data, samples, seed)
    say(f"loadgen: {len(qset)} users, {qset.rows:,} rows (mean {qset.rows / len(qset):.0f} per user) from {data}")
    runner = _make_sut(sut, qset, cfg, artifacts, model, connection or {}, concurrency, precision)
    result: dict[str, Any] = {
        "scenario": scenario, "sut": sut, "model": model, "smoke": smoke, "duration_ms": duration_ms,
        "latency_ms": latency_ms, "samples": len(qset), "rows": qset.rows, "cpu": cpu_name(),
        "cpu_count": os.cpu_count(), "load_average_before": _load_average(),
    }
    try:
        capacity = None
        if accuracy and target_qps is None:
            target_qps = 1.0  # accuracy mode issues every sample once, whatever the rate
        if target_qps is None or find_peak_qps:
            _in_thread(runner.throughput, 0.5)  # warm-up: first calls of the backend (and the server's workers) are slow
            capacity = _in_thread(runner.throughput, 2.0)
            say(f"loadgen: {sut} throughput measured for 2 s: {capacity:,.1f} samples/s")
            result["measured_samples_per_s"] = capacity
        t0 = time.perf_counter()
        if find_peak_qps:
            start = target_qps or 0.5 * capacity
            best, probes = find_peak(
                runner, qset, out, start_qps=start, latency_ms=latency_ms, duration_ms=duration_ms,
                progress=progress, say=say,
            )
            result["probes"] = [_brief(p) for p in probes]
            if best is not None:
                for name in LOG_FILES:  # the best VALID run's own files, at the top of --out
                    shutil.copy2(Path(best.out) / name, out / name)
            summary = best or probes[-1]
        else:
            if target_qps is None:
                target_qps = capacity * (2.5 if scenario == "offline" else 0.3)
            summary = run_test(
                runner, qset, scenario, out, target_qps=target_qps, latency_ms=latency_ms,
                duration_ms=duration_ms, accuracy=accuracy, progress=progress,
            )
        result["seconds"] = round(time.perf_counter() - t0, 1)
        result.update(_brief(summary))
        if runner.errors:
            result["first_error"] = runner.first_error
        if accuracy:
            from dlrm_serve.loadgen.accuracy import accuracy_auc

            result["accuracy"] = accuracy_auc(out / "mlperf_log_accuracy.json", qset)
    finally:
        runner.close()
    result["load_average_after"] = _load_average()
    (out / "loadgen_result.json").write_text(json.dumps(result, indent=2) + "\n")
    say(f"loadgen: {summary.line()}")
    if accuracy:
        acc = result["accuracy"]
        say(f"loadgen: AUC {acc['auc']:.4f} over {acc['samples']} samples ({acc['rows']:,} rows)")
    say(f"loadgen: LoadGen's logs and loadgen_result.json are in {out}")
    return result


def _brief(s: Summary) -> dict:
    d = asdict(s)
    d.pop("fields")
    return d
