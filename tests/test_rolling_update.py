"""Rolling model update under continuous load (``dlrm-serve models update``), and its rollback.

Two archives of one model name with different weights, so every answer can be
told apart: version 1.0 answers like backend A, 2.0 like backend B.  Clients
that never retry (``retries=0``), over REST and gRPC, keep predicting while
the command registers 2.0 beside 1.0, waits for its worker, makes it the
default and unregisters 1.0.  Not one request may fail, and each answer must
be A's or B's.  Runs on the session TorchServe, under the name ``dlrm_roll``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from conftest import DEMO_CONFIG, ROOT, build_archive
from dlrm_serve.artifacts import save_artifacts
from dlrm_serve.runtime.backends import load_backend
from dlrm_serve.client import connect
from dlrm_serve.io.features import FeatureEncoder
from dlrm_serve.model.dlrm import DLRM

pytestmark = pytest.mark.integration

NAME = "dlrm_roll"


@pytest.fixture(scope="module")
def roll_archives(tmp_path_factory, model_store, demo_artifacts):
    """dlrm_roll_v1.mar (the demo weights, 1.0) and dlrm_roll_v2.mar (other weights, 2.0) in the model store."""
    torch.manual_seed(4321)
    other = tmp_path_factory.mktemp("artifacts_b")
    save_artifacts(DLRM(DEMO_CONFIG), other)
    stage = tmp_path_factory.mktemp("roll_stage")
    for artifacts, version, target in ((demo_artifacts, "1.0", "dlrm_roll_v1.mar"), (other, "2.0", "dlrm_roll_v2.mar")):
        build_archive(artifacts, stage, "--model-name", NAME, "--version", version, "--workers", "1")
        shutil.move(stage / f"{NAME}.mar", model_store / target)
    return load_backend(demo_artifacts, "torch"), load_backend(other, "torch")


def cli(server, *args: str) -> subprocess.CompletedProcess:
    p = server.ports
    cmd = [
        sys.executable, "-m", "dlrm_serve.cli", "models", "--rest",
        "--http-port", str(p.inference), "--management-port", str(p.management),
        "--key-file", str(server.start_dir / "key_file.json"), *args,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{' '.join(args)} failed:\n{r.stdout}\n{r.stderr}"
    return r


def test_rolling_update_under_load_fails_no_request_and_rolls_back(torchserve, roll_archives, make_rows):
    a, b = roll_archives
    rows = make_rows(24, seed=21)
    enc = FeatureEncoder(a.config)
    want_a = a.predict(enc.encode_instances(rows.instances))
    want_b = b.predict(enc.encode_instances(rows.instances))
    assert np.abs(want_a - want_b).max() > 1e-3, "the two archives must answer differently"
    kw = dict(
        inference_url=torchserve.inference_url,
        management_url=torchserve.management_url,
        key_file=torchserve.start_dir / "key_file.json",
    )
    mgmt = connect("rest", **kw)
    mgmt.register_model("dlrm_roll_v1.mar", NAME, initial_workers=1, synchronous=True)
    log: dict[str, list] = {"rest": [], "grpc": []}
    errors: list[str] = []
    stop = threading.Event()

    def load(transport: str):
        # One request per job: a job of several requests may straddle the switch.
        extra = {"grpc_target": torchserve.grpc_inference_target} if transport == "grpc" else {}
        with connect(transport, model=NAME, retries=0, rows_per_request=len(rows.instances), concurrency=1, **kw, **extra) as c:
            while not stop.is_set():
                try:
                    got = c.predict(rows.instances)
                except Exception as e:  # every failure is counted
                    errors.append(f"{transport}: {e!r}")
                    continue
                if np.allclose(got, want_a, rtol=0, atol=1e-6):
                    log[transport].append("A")
                elif np.allclose(got, want_b, rtol=0, atol=1e-6):
                    log[transport].append("B")
                else:
                    errors.append(f"{transport}: an answer from neither version")

    threads = [threading.Thread(target=load, args=(t,)) for t in ("rest", "grpc")]
    try:
        for t in threads:
            t.start()
        time.sleep(1.0)
        t0 = time.monotonic()
        r = cli(torchserve, "update", NAME, "--archive", "dlrm_roll_v2.mar", "--version", "2.0", "--drain", "2")
        update_s = time.monotonic() - t0
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    try:
        print(f"\nrolling update took {update_s:.1f} s: {r.stdout.strip()}")
        for name, seen in log.items():
            flips = sum(1 for x, y in zip(seen, seen[1:]) if x != y)
            print(f"{name}: {len(seen)} jobs, {seen.count('A')} from 1.0, {seen.count('B')} from 2.0, {flips} switch(es)")
            assert seen.count("A") > 0 and seen.count("B") > 0, f"{name} did not see both versions"
            assert seen[-1] == "B"
        assert errors == [], errors[:5]
        versions = {d["modelVersion"] for d in mgmt.describe_model(NAME, "all")}
        assert versions == {"2.0"}
        # Rollback: bring 1.0 back beside 2.0 (kept), then switch the default back and forth.
        cli(torchserve, "update", NAME, "--archive", "dlrm_roll_v1.mar", "--version", "1.0", "--keep-old", "--drain", "0")
        with connect("rest", model=NAME, **kw) as c:
            np.testing.assert_allclose(c.predict(rows.instances), want_a, rtol=0, atol=1e-6)
            cli(torchserve, "set-default", NAME, "2.0")
            np.testing.assert_allclose(c.predict(rows.instances), want_b, rtol=0, atol=1e-6)
    finally:
        for d in mgmt.describe_model(NAME, "all"):
            if d["modelVersion"] != mgmt.describe_model(NAME)[0]["modelVersion"]:
                mgmt.unregister_model(NAME, d["modelVersion"])
        mgmt.unregister_model(NAME)
        mgmt.close()


# ----- the steps and their failure paths, on a scripted management API ------------------------------------
class FakeManagement:
    """TorchServe's model versions as the management API shows them; workers come up after ``ready_after`` polls."""

    def __init__(self, ready_after: int = 2, archive_version: str = "2.0"):
        self.versions = {"1.0": {"ready": 2, "wanted": 2}}
        self.default = "1.0"
        self.ready_after = ready_after
        self.archive_version = archive_version
        self.calls: list[tuple] = []

    def describe_model(self, name, version=None):
        from dlrm_serve.errors import ServerError

        if version == "all":
            return [{"modelVersion": v} for v in self.versions]
        v = version or self.default
        if v not in self.versions:
            raise ServerError(f"Model version not found: {v}", status=404)
        entry = self.versions[v]
        if entry["ready"] < entry["wanted"]:
            entry["polls"] = entry.get("polls", 0) + 1
            if entry["polls"] >= self.ready_after:
                entry["ready"] = entry["wanted"]
        workers = [{"status": "READY"}] * entry["ready"] + [{"status": "UNLOADING"}] * (entry["wanted"] - entry["ready"])
        return [{"modelVersion": v, "minWorkers": entry["wanted"], "workers": workers}]

    def register_model(self, url, name, **kw):
        self.calls.append(("register", url))
        self.versions[self.archive_version] = {"ready": 0, "wanted": 2}

    def set_default(self, name, version):
        self.calls.append(("set-default", version))
        self.default = version

    def unregister_model(self, name, version=None):
        self.calls.append(("unregister", version))
        del self.versions[version]


def test_rolling_update_steps_in_order():
    from dlrm_serve.client import rolling_update

    m = FakeManagement(ready_after=3)
    report = rolling_update(m, NAME, "v2.mar", "2.0", drain_s=0, poll_s=0, sleep=lambda s: None)
    assert m.calls == [("register", "v2.mar"), ("set-default", "2.0"), ("unregister", "1.0")]
    assert report.old_version == "1.0" and report.workers == 2 and report.unregistered
    m = FakeManagement()
    rolling_update(m, NAME, "v2.mar", "2.0", keep_old=True, poll_s=0, sleep=lambda s: None)
    assert ("unregister", "1.0") not in m.calls and set(m.versions) == {"1.0", "2.0"} and m.default == "2.0"


def test_rolling_update_that_cannot_finish_leaves_the_old_version_serving():
    from dlrm_serve.client import rolling_update
    from dlrm_serve.errors import ServerError

    m = FakeManagement(ready_after=10**9)  # the new workers never come up
    with pytest.raises(ServerError, match="0 of 2 workers READY"):
        rolling_update(m, NAME, "v2.mar", "2.0", ready_timeout_s=0.05, poll_s=0.01)
    assert m.default == "1.0" and set(m.versions) == {"1.0"}
    m = FakeManagement(archive_version="3.0")  # the archive is not the version named
    with pytest.raises(ServerError, match="holds dlrm_roll 3.0, not 2.0"):
        rolling_update(m, NAME, "v3.mar", "2.0", poll_s=0, sleep=lambda s: None)
    assert m.default == "1.0" and set(m.versions) == {"1.0"}
    with pytest.raises(ServerError, match="already the default"):
        rolling_update(FakeManagement(), NAME, "v1.mar", "1.0")
