"""The client against the real TorchServe 0.12: gRPC next to REST.

Uses the session server of conftest.py (dlrm.mar loaded, the shipped
config.properties: tokens on, model API on).  Requests are sent one at a
time where answers are compared bit for bit, so each request is a dynamic
batch of its own on both transports (GEMMs may round differently when the
server merges requests).
"""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import grpc
import numpy as np
import pytest

from dlrm_serve.client import protos
from dlrm_serve.client import Keys, Payload, connect
from dlrm_serve.errors import AuthError, InvalidInput, ServerError

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "dlrm_serve.cli"]


def key_file(ts) -> Path:
    return ts.start_dir / "key_file.json"


def make_client(ts, transport, **kw):
    kw.setdefault("concurrency", 1)
    return connect(
        transport,
        inference_url=ts.inference_url,
        management_url=ts.management_url,
        grpc_target=ts.grpc_inference_target,
        grpc_management_target=ts.grpc_management_target,
        key_file=key_file(ts),
        **kw,
    )


def resync_launcher_keys(ts) -> None:
    """After a test renewed a key on the server, let the launcher's helpers use the new one."""
    data = json.loads(key_file(ts).read_text())
    ts.keys = {k: v["key"] for k, v in data.items()}


# ----- predictions: gRPC == REST, bit for bit ------------------------------------------------
@pytest.mark.parametrize("payload", ["json", "tsv", "binary"])
def test_grpc_equals_rest_exactly(torchserve, make_rows, expected, demo_artifacts, payload):
    rows = make_rows(300, seed=21)
    data = rows.instances if payload == "json" else [rows.tsv_line(i, label="1") for i in range(300)]
    got = {}
    for transport in ("grpc", "rest"):
        with make_client(torchserve, transport, payload=payload, config=demo_artifacts, rows_per_request=128) as c:
            got[transport] = c.predict(data)
    assert got["grpc"].dtype == np.float32
    assert got["grpc"].tobytes() == got["rest"].tobytes()
    np.testing.assert_allclose(got["grpc"], expected(rows.instances), atol=1e-6, rtol=0)


def test_concurrent_chunked_grpc_matches_the_model(torchserve, make_rows, expected, demo_artifacts):
    rows = make_rows(2000, seed=22)
    with make_client(torchserve, "grpc", config=demo_artifacts, rows_per_request=100, concurrency=6) as c:
        got = c.predict(rows.instances)
        assert c.stats["requests"] == 20
    np.testing.assert_allclose(got, expected(rows.instances), atol=1e-6, rtol=0)


def test_a_request_shaped_like_torchserves_own_grpc_client(torchserve, make_rows, expected):
    # TorchServe's example client: input={"data": <file bytes>}, the token as metadata.
    pb = protos.load()
    rows = make_rows(3, seed=23)
    with grpc.insecure_channel(torchserve.grpc_inference_target) as channel:
        stub = pb.inference_pb2_grpc.InferenceAPIsServiceStub(channel)
        req = pb.inference_pb2.PredictionsRequest(
            model_name="dlrm", input={"data": json.dumps({"instances": rows.instances}).encode()}
        )
        resp = stub.Predictions(req, metadata=[("authorization", f"Bearer {torchserve.inference_key}")], timeout=60)
        preds = json.loads(resp.prediction)["predictions"]
        np.testing.assert_allclose(preds, expected(rows.instances), atol=1e-6, rtol=0)
        # Without the token: PERMISSION_DENIED underneath.
        with pytest.raises(grpc.RpcError) as e:
            stub.Predictions(req, timeout=60)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED


# ----- tokens ----------------------------------------------------------------------------------
@pytest.mark.parametrize("transport", ["grpc", "rest"])
def test_missing_or_wrong_token_is_a_clear_auth_error(torchserve, make_rows, transport):
    rows = make_rows(1)
    for keys in (Keys(), Keys(inference="not-the-key", management="nor-this")):
        with connect(
            transport,
            inference_url=torchserve.inference_url,
            management_url=torchserve.management_url,
            grpc_target=torchserve.grpc_inference_target,
            grpc_management_target=torchserve.grpc_management_target,
            keys=keys,
        ) as c:
            with pytest.raises(AuthError) as e:
                c.predict(rows.instances)
            assert "Token Authorization failed" in e.value.message
            assert "cannot be renewed without the API key" in e.value.message
            with pytest.raises(AuthError):
                c.list_models()


def test_a_key_renewed_elsewhere_is_picked_up_from_the_key_file(torchserve, make_rows, expected):
    rows = make_rows(4, seed=24)
    try:
        with make_client(torchserve, "grpc") as c:
            before = c.keys.get("inference")
            np.testing.assert_allclose(c.predict(rows.instances), expected(rows.instances), atol=1e-6, rtol=0)
            # Someone renews the inference key: TorchServe answers with an empty body
            # and rewrites key_file.json; the old key is dead at once.
            r = torchserve.get(torchserve.management_url + "/token?type=inference", key="API")
            assert r.status == 200 and r.body.strip() == b""
            assert torchserve.get(torchserve.inference_url + "/ping", key=before).status == 400
            np.testing.assert_allclose(c.predict(rows.instances), expected(rows.instances), atol=1e-6, rtol=0)
            assert c.keys.get("inference") != before
            assert c.stats["token_renewals"] == 0
    finally:
        resync_launcher_keys(torchserve)


def test_an_expiring_key_is_renewed_with_the_api_key(torchserve, make_rows, expected):
    rows = make_rows(2, seed=25)
    try:
        # A key the client knows to be past its expiry: it renews it through
        # GET /token before the request.
        with make_client(torchserve, "rest") as c:
            before = c.keys.get("inference")
            c.keys.set("inference", before, expires=datetime.now(timezone.utc) - timedelta(seconds=1))
            np.testing.assert_allclose(c.predict(rows.instances), expected(rows.instances), atol=1e-6, rtol=0)
            assert c.stats["token_renewals"] == 1
            assert c.keys.get("inference") != before
    finally:
        resync_launcher_keys(torchserve)


# ----- bad input --------------------------------------------------------------------------------
def test_bad_input_raises_the_same_error_over_both_transports(torchserve, make_rows):
    rows = make_rows(5, seed=26)
    bad = [dict(x) for x in rows.instances]
    bad[3] = {"dense": bad[3]["dense"], "sparse": ["zz-not-hex"] + bad[3]["sparse"][1:]}
    messages = {}
    for transport in ("grpc", "rest"):
        with make_client(torchserve, transport, payload="json") as c:
            with pytest.raises(InvalidInput) as e:
                c.predict(bad)
            assert e.value.status == 400
            messages[transport] = e.value.message
            with pytest.raises(InvalidInput) as e:
                c.send(Payload(b"DLRM\x01\x00\x00\x00garbage", "binary", 1))
            assert "binary body" in e.value.message
        with make_client(torchserve, transport, model="no_such_model") as c:
            with pytest.raises(ServerError) as e:
                c.predict(rows.instances[:1])
            assert e.value.status == 404 and "no_such_model" in e.value.message
    assert messages["grpc"] == messages["rest"]
    assert "instance 3, field C1: 'zz-not-hex' is not a hex string" in messages["grpc"]


# ----- management over gRPC ----------------------------------------------------------------------
def test_register_scale_describe_unregister_over_grpc(torchserve, make_rows, expected):
    name = "dlrm_grpc_rt"
    rows = make_rows(3, seed=27)
    with make_client(torchserve, "grpc", model=name) as c:
        assert c.ping() == "Healthy"
        out = c.register_model("dlrm_b.mar", name, initial_workers=1, batch_size=4, max_batch_delay=5, synchronous=True)
        try:
            assert name in out["status"]
            assert name in [m["modelName"] for m in c.list_models()]
            d = c.describe_model(name)[0]
            assert d["modelName"] == name and d["batchSize"] == 4 and d["maxBatchDelay"] == 5
            assert len(d["workers"]) == 1
            np.testing.assert_allclose(c.predict(rows.instances), expected(rows.instances), atol=1e-6, rtol=0)
            c.scale_workers(name, 2, synchronous=True)
            torchserve.wait_ready(name, workers=2, timeout=120)
            assert len(c.describe_model(name)[0]["workers"]) == 2
            assert "1.0" in json.dumps(c.set_default(name, "1.0"))
            with pytest.raises(ServerError) as e:
                c.set_default(name, "9.9")
            assert e.value.status == 404
        finally:
            c.unregister_model(name)
        assert name not in [m["modelName"] for m in c.list_models(limit=1)]
        with pytest.raises(ServerError) as e:
            c.describe_model(name)
        assert e.value.status == 404


def test_models_command_over_grpc_and_rest(torchserve):
    common = [
        "--grpc-port", torchserve.grpc_inference_target.rsplit(":", 1)[1],
        "--grpc-management-port", torchserve.grpc_management_target.rsplit(":", 1)[1],
        "--inference-url", torchserve.inference_url,
        "--management-url", torchserve.management_url,
        "--key-file", str(key_file(torchserve)),
    ]
    for transport in ("--grpc", "--rest"):
        r = subprocess.run([*CLI, "models", transport, *common, "list"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert "dlrm" in [m["modelName"] for m in json.loads(r.stdout)["models"]]
        r = subprocess.run([*CLI, "models", transport, *common, "describe", "dlrm"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)[0]["modelName"] == "dlrm"


# ----- a 200k-row file through dlrm-serve predict == dlrm-serve score ----------------------------------
def test_predict_file_matches_offline_score(torchserve, demo_artifacts, tmp_path):
    data = tmp_path / "rows.tsv"
    r = subprocess.run([*CLI, "generate", "--out", str(data), "--rows", "200000", "--seed", "5"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    score_out = tmp_path / "score.txt"
    r = subprocess.run(
        [*CLI, "score", str(data), "--artifacts", str(demo_artifacts), "--out", str(score_out), "--batch-rows", "8192",
         "--precision", "fp32"],  # as the served archive (conftest builds fp32 archives)
        capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stderr
    served = tmp_path / "served.txt"
    port = torchserve.grpc_inference_target.rsplit(":", 1)[1]
    # One request in flight: every request is a dynamic batch of its own, as
    # in the offline scorer's batches of 8192 rows, so GEMMs round alike.
    r = subprocess.run(
        [*CLI, "predict", str(data), "--out", str(served), "--grpc", "--grpc-port", port,
         "--management-url", torchserve.management_url, "--key-file", str(key_file(torchserve)),
         "--config", str(demo_artifacts), "--rows-per-request", "8192", "--concurrency", "1", "--no-progress"],
        capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stderr
    assert "wrote 200000 probabilities" in r.stderr
    got, want = served.read_text().splitlines(), score_out.read_text().splitlines()
    assert len(got) == len(want) == 200000
    assert got == want
