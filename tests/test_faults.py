"""Faults against the real TorchServe: nothing is lost for a retrying client.

- a worker killed with SIGKILL under load (REST through ``Client.predict``,
  gRPC through ``dlrm-serve predict``): every row answered, equal to the
  in-process backend, and the replacement worker READY within 10 s;
- a flood past ``job_queue_size``: each 503 comes at once, a retrying client
  still finishes, and the server is healthy and correct afterwards;
- ``responseTimeout``: a batch that hangs (the test-only ``dlrm.fault_hang_on``
  hook, set in a copy of the archive) restarts that worker while the other
  keeps serving;
- keys that live 6 s (``token_expiration_min=0.1``): clients over REST and
  gRPC run for more than two key lifetimes with no error and renew at most
  twice per key lifetime.

Two dedicated servers (a small job queue; short-lived keys), each started
once for this module.  Measured figures are printed (``pytest -s``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, build_archive, serve
from dlrm_serve.client import connect
from dlrm_serve.io.features import FeatureEncoder
from dlrm_serve.testing.launcher import TorchServe, http_request

pytestmark = pytest.mark.integration

HANG_MARKER = "dlrm-test-hang-0c5e"  # only the test archive's dlrm.fault_hang_on names it
HANG_TIMEOUT_S = 3  # responseTimeout of the hang archive
QUEUE = 8  # job_queue_size of the faults server
FLOOD_S = 4.0  # how long the flood lasts


# ----- rows and their expected answers ------------------------------------------------------------
class Lines:
    """``n`` random Criteo lines (TSV) and the in-process backend's answers for them."""

    def __init__(self, backend, n: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        cfg = backend.config
        dense = rng.integers(0, 1000, size=(n, cfg.num_dense)).astype(np.float64)
        dense[rng.random(dense.shape) < 0.1] = np.nan
        ids = rng.integers(0, 2**32, size=(n, cfg.num_sparse), dtype=np.uint64)
        sparse = np.char.mod("%08x", ids).astype("U8")
        sparse[rng.random(sparse.shape) < 0.05] = ""
        dense_txt = np.where(np.isnan(dense), "", np.char.mod("%d", np.nan_to_num(dense).astype(np.int64)))
        fields = np.concatenate([dense_txt.astype(object), sparse.astype(object)], axis=1)
        self.lines = ["\t".join(row) for row in fields.tolist()]
        self.expected = backend.predict(FeatureEncoder(cfg).encode_columns(dense, sparse))

    def check(self, got) -> None:
        got = np.asarray(got, dtype=np.float32)
        assert got.shape == self.expected.shape
        np.testing.assert_allclose(got, self.expected, rtol=0, atol=1e-6)


def rest_client(server: TorchServe, **kw):
    return connect(
        "rest",
        inference_url=server.inference_url,
        management_url=server.management_url,
        key_file=server.start_dir / "key_file.json",
        **kw,
    )


def grpc_client(server: TorchServe, **kw):
    return connect(
        "grpc",
        grpc_target=server.grpc_inference_target,
        grpc_management_target=server.grpc_management_target,
        management_url=server.management_url,
        key_file=server.start_dir / "key_file.json",
        **kw,
    )


def workers(mgmt, model: str) -> list[dict]:
    return [w for d in mgmt.describe_model(model) for w in d.get("workers", [])]


def ready_pids(mgmt, model: str) -> set[int]:
    return {int(w["pid"]) for w in workers(mgmt, model) if w.get("status") == "READY" and w.get("pid")}


def wait_replaced(mgmt, model: str, gone: int, count: int, timeout: float) -> float:
    """Seconds until ``count`` READY workers, none of them ``gone``; fails after ``timeout``."""
    t0 = time.monotonic()
    seen: set[int] = set()
    while time.monotonic() - t0 < timeout:
        seen = ready_pids(mgmt, model)
        if len(seen) >= count and gone not in seen:
            return time.monotonic() - t0
        time.sleep(0.1)
    pytest.fail(f"{model}: no {count} READY workers without pid {gone} after {timeout:.0f} s (READY: {seen})")


def kill(pid: int) -> None:
    import psutil

    psutil.Process(pid).kill()


# ----- servers ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fault_store(tmp_path_factory, model_store, demo_artifacts) -> Path:
    """dlrm.mar, plus dlrm_hang: a folder archive whose test-only hook hangs on HANG_MARKER."""
    store = tmp_path_factory.mktemp("faults") / "model_store"
    store.mkdir()
    shutil.copy(model_store / "dlrm.mar", store / "dlrm.mar")
    build_archive(
        demo_artifacts, store, "--model-name", "dlrm_hang", "--archive-format", "no-archive",
        "--response-timeout", str(HANG_TIMEOUT_S), "--workers", "2",
    )  # fmt: skip
    cfg = store / "dlrm_hang" / "model-config.yaml"
    text = cfg.read_text()
    assert "\ndlrm:\n" in text
    cfg.write_text(text + f'  fault_hang_on: "{HANG_MARKER}"\n')
    return store


@pytest.fixture(scope="module")
def fault_server(tmp_path_factory, fault_store):
    yield from serve(tmp_path_factory.mktemp("faults_start"), fault_store, job_queue_size=QUEUE)


@pytest.fixture(scope="module")
def mgmt(fault_server):
    with rest_client(fault_server) as c:
        yield c


# ----- SIGKILL ------------------------------------------------------------------------------------
def test_sigkill_under_rest_load_loses_nothing(fault_server, mgmt, demo_backend):
    # Long enough that the kill lands mid-job however fast decoding gets (about 1,600 requests).
    data = Lines(demo_backend, 200_000, seed=1)
    out: dict = {}

    def job():
        try:
            with rest_client(fault_server, rows_per_request=128, concurrency=4) as c:
                out["got"] = c.predict(data.lines)
                out["stats"] = c.stats
        except Exception as e:  # reported below
            out["error"] = e

    t = threading.Thread(target=job)
    t.start()
    time.sleep(1.0)
    assert t.is_alive(), "the job finished before the kill: make it longer"
    victim = sorted(ready_pids(mgmt, "dlrm"))[0]
    kill(victim)
    recovery = wait_replaced(mgmt, "dlrm", victim, 2, timeout=30)
    t.join(timeout=90)
    assert not t.is_alive(), "the job did not finish within 90 s"
    assert "error" not in out, f"the job failed: {out.get('error')!r}"
    data.check(out["got"])
    print(f"\nREST: worker {victim} killed; replacement READY after {recovery:.2f} s; client stats {out['stats']}")
    assert recovery <= 10.0


def test_sigkill_under_grpc_cli_job_loses_nothing(fault_server, mgmt, demo_backend, tmp_path):
    data = Lines(demo_backend, 40_000, seed=2)
    src = tmp_path / "rows.tsv"
    src.write_text("\n".join(data.lines) + "\n")
    dst = tmp_path / "p.txt"
    ports = fault_server.ports
    cmd = [
        sys.executable, "-m", "dlrm_serve.cli", "predict", str(src), "--out", str(dst), "--grpc",
        "--grpc-port", str(ports.grpc_inference), "--grpc-management-port", str(ports.grpc_management),
        "--management-port", str(ports.management), "--key-file", str(fault_server.start_dir / "key_file.json"),
        "--rows-per-request", "128", "--concurrency", "4", "--no-progress",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # Kill once the job is under way (its first answers are written).
        t0 = time.monotonic()
        while not (dst.with_name(dst.name + ".part").exists() or dst.exists()) and time.monotonic() - t0 < 30:
            time.sleep(0.05)
        time.sleep(0.5)
        assert proc.poll() is None, "the job finished before the kill: make it longer"
        victim = sorted(ready_pids(mgmt, "dlrm"))[-1]
        kill(victim)
        recovery = wait_replaced(mgmt, "dlrm", victim, 2, timeout=30)
        _, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, f"dlrm-serve predict failed:\n{err[-2000:]}"
    data.check(np.loadtxt(dst, dtype=np.float32))
    print(f"\ngRPC: worker {victim} killed; replacement READY after {recovery:.2f} s; {err.strip().splitlines()[-1]}")
    assert recovery <= 10.0


# ----- flood past job_queue_size ------------------------------------------------------------------
def test_flood_past_the_job_queue_gets_quick_503s_and_a_retrying_client_finishes(fault_server, mgmt, demo_backend):
    big = Lines(demo_backend, 1024, seed=3)
    body = json.dumps({"instances": [{"dense": [None] * 13, "sparse": [None] * 26}] * 1024})
    url = f"{fault_server.inference_url}/predictions/dlrm"
    headers = {"Authorization": f"Bearer {fault_server.inference_key}", "Content-Type": "application/json"}
    statuses: list[tuple[int, float]] = []
    lock = threading.Lock()
    stop = threading.Event()

    def flood():
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                status = http_request("POST", url, data=body, headers=headers, timeout=30).status
            except OSError:
                status = -1
            with lock:
                statuses.append((status, time.monotonic() - t0))

    threads = [threading.Thread(target=flood) for _ in range(4 * QUEUE)]
    for t in threads:
        t.start()
    # A burst: the flood stops after FLOOD_S; a retrying client started in
    # the middle of it backs off and still gets every row.
    stopper = threading.Timer(FLOOD_S, stop.set)
    stopper.start()
    try:
        time.sleep(0.5)
        with rest_client(fault_server, rows_per_request=64, concurrency=16, payload="tsv") as c:
            t0 = time.monotonic()
            got = c.predict(big.lines)
            client_s = time.monotonic() - t0
            stats = c.stats
    finally:
        stop.set()
        stopper.cancel()
        for t in threads:
            t.join(timeout=60)
    big.check(got)
    codes = [s for s, _ in statuses]
    slow503 = max((d for s, d in statuses if s == 503), default=None)
    print(
        f"\nflood: {len(codes)} raw requests, {codes.count(503)} answered 503 (slowest {slow503 and slow503 * 1e3:.0f} ms), "
        f"{codes.count(200)} 200; client finished in {client_s:.1f} s with {stats['retries']} retries {stats['retry_reasons']}"
    )
    assert set(codes) <= {200, 503}, f"unexpected answers to the flood: {sorted(set(codes))}"
    assert codes.count(503) > 0, "the flood never filled the queue: the test proves nothing"
    assert slow503 < 2.0, f"a 503 took {slow503:.2f} s: the queue should refuse at once"
    # Healthy and correct afterwards, with both workers.
    assert mgmt.ping() == "Healthy"
    assert len(ready_pids(mgmt, "dlrm")) == 2
    with rest_client(fault_server) as c:
        big.check(c.predict(big.lines))


# ----- responseTimeout ----------------------------------------------------------------------------
def test_a_hanging_batch_restarts_its_worker_and_the_other_keeps_serving(fault_server, mgmt, demo_backend):
    mgmt.register_model("dlrm_hang", "dlrm_hang", initial_workers=2, synchronous=True)
    try:
        deadline = time.monotonic() + 60
        while len(ready_pids(mgmt, "dlrm_hang")) < 2:
            assert time.monotonic() < deadline, "dlrm_hang workers did not come up"
            time.sleep(0.2)
        before = ready_pids(mgmt, "dlrm_hang")
        data = Lines(demo_backend, 64, seed=4)
        hang: dict = {}

        def hang_request():
            t0 = time.monotonic()
            r = http_request(
                "POST",
                f"{fault_server.inference_url}/predictions/dlrm_hang",
                data=f"{HANG_MARKER}\n",
                headers={"Authorization": f"Bearer {fault_server.inference_key}", "Content-Type": "text/plain"},
                timeout=60,
            )
            hang.update(status=r.status, body=r.text, seconds=time.monotonic() - t0)

        t = threading.Thread(target=hang_request)
        t.start()
        answered = 0
        with rest_client(fault_server, model="dlrm_hang", rows_per_request=16, concurrency=2) as c:
            t0 = time.monotonic()
            while time.monotonic() - t0 < HANG_TIMEOUT_S + 3:
                data.check(c.predict(data.lines))
                answered += 1
            stats = c.stats
        t.join(timeout=60)
        assert not t.is_alive(), "the hanging request was never answered"
        after = ready_pids(mgmt, "dlrm_hang")
        deadline = time.monotonic() + 30
        while len(after) < 2 or before <= after:
            assert time.monotonic() < deadline, f"no worker was restarted: before {before}, now {after}"
            time.sleep(0.2)
            after = ready_pids(mgmt, "dlrm_hang")
        print(
            f"\nhang: answered {hang['status']} after {hang['seconds']:.1f} s ({' '.join(hang['body'].split())[:160]}); "
            f"{answered} good jobs meanwhile, client stats {stats}; workers {sorted(before)} -> {sorted(after)}"
        )
        assert hang["status"] >= 500
        assert hang["seconds"] < HANG_TIMEOUT_S + 15
        assert answered >= 2
        assert len(before & after) == 1, "the worker that did not hang should have kept serving"
    finally:
        mgmt.unregister_model("dlrm_hang")


# ----- short-lived keys ---------------------------------------------------------------------------
class ShortKeyServer(TorchServe):
    """A TorchServe whose keys outlive its start-up: the launcher renews before each of its own calls."""

    def _key(self, key):
        if key in ("inference", "management") and self.keys.get("API"):
            http_request(
                "GET", f"{self.management_url}/token?type={key}", headers={"Authorization": f"Bearer {self.keys['API']}"}
            )
            data = json.loads((self.start_dir / "key_file.json").read_text())
            self.keys = {k: v["key"] for k, v in data.items()}
        return super()._key(key)


@pytest.fixture(scope="module")
def short_key_server(tmp_path_factory, model_store):
    yield from serve(
        tmp_path_factory.mktemp("short_keys_start"), model_store, "dlrm_b.mar", workers=1,
        server_class=ShortKeyServer, token_expiration_min=0.1,
    )


def test_clients_outlive_several_key_lifetimes(short_key_server, demo_backend):
    from dlrm_serve.client.keys import read_key_file
    from datetime import datetime, timezone

    short_key_server._key("inference")  # a fresh key: the one from start-up may be spent
    tok = read_key_file(short_key_server.start_dir / "key_file.json")["inference"]
    life = (tok.expires - datetime.now(timezone.utc)).total_seconds()
    assert 0 < life <= 6.5, f"token_expiration_min=0.1 should give 6 s keys, this one has {life:.1f} s left"
    life = 6.0
    duration = 2.5 * life
    data = Lines(demo_backend, 32, seed=5)
    results: dict = {}

    def run(name, make):
        errors, calls = [], 0
        with make(short_key_server, model="dlrm_b", rows_per_request=8, concurrency=2) as c:
            t0 = time.monotonic()
            while time.monotonic() - t0 < duration:
                try:
                    data.check(c.predict(data.lines))
                except Exception as e:  # counted, asserted below
                    errors.append(repr(e))
                calls += 1
                time.sleep(0.02)
            results[name] = dict(errors=errors, calls=calls, stats=dict(c.stats), seconds=time.monotonic() - t0)

    threads = [threading.Thread(target=run, args=a) for a in (("rest", rest_client), ("grpc", grpc_client))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=duration + 60)
    for name in ("rest", "grpc"):
        r = results[name]
        lives = r["seconds"] / life
        per_life = r["stats"]["token_renewals"] / lives
        print(f"\n{name}: {r['calls']} jobs over {r['seconds']:.1f} s ({lives:.1f} key lives), "
              f"{r['stats']['token_renewals']} renewals ({per_life:.2f} per key life), errors {len(r['errors'])}")
        assert r["errors"] == [], r["errors"][:3]
        assert r["calls"] > 10
        assert per_life <= 2.0
    # Between them the two clients renewed: the keys really did expire under them.
    assert sum(r["stats"]["token_renewals"] for r in results.values()) >= 2
