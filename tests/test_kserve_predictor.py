"""The KServe predictor (``dlrm-serve kserve``, kserve 0.21) with stock clients.

One predictor for the module, started as a user starts it (the console
command) on free loopback ports.  Clients: tritonclient.http (JSON and binary
tensor data), tritonclient.grpc (the standard inference.GRPCInferenceService,
raw tensor contents) and plain v1 JSON.  Predictions are compared with the
in-process backend to 1e-6 (test_oip_torchserve.py compares TorchServe's
OIP answers with the same backend's).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import psutil
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from dlrm_serve.io.features import FeatureEncoder
from dlrm_serve.testing.launcher import LOOPBACK, free_ports, http_request
from oip_cases import dense_of, hex_of, oip_json, row_ids_of

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def encoder(demo_config):
    return FeatureEncoder(demo_config)


def start_predictor(artifacts, log: Path, *extra: str):
    """``dlrm-serve kserve`` on free loopback ports, ready; returns (http_url, grpc_target, process)."""
    http_port, grpc_port = free_ports(2)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dlrm_serve.cli", "kserve", "--artifacts", str(artifacts),
             "--http-port", str(http_port), "--grpc-port", str(grpc_port), "--threads", "1", *extra],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True,
        )
    url = f"http://{LOOPBACK}:{http_port}"
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            pytest.fail(f"dlrm-serve kserve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if http_request("GET", url + "/v2/models/dlrm/ready", timeout=2).status == 200:
                return url, f"{LOOPBACK}:{grpc_port}", proc
        except OSError:
            pass
        if time.monotonic() > deadline:
            stop_predictor(proc)
            pytest.fail(f"dlrm-serve kserve not ready after 120 s:\n{log.read_text()[-3000:]}")
        time.sleep(0.3)


def stop_predictor(proc) -> None:
    os.killpg(proc.pid, signal.SIGTERM)  # the server and its REST worker processes
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def predictor(demo_artifacts, tmp_path_factory):
    """One predictor for the module; yields (http_url, grpc_target, process)."""
    started = start_predictor(demo_artifacts, tmp_path_factory.mktemp("kserve") / "kserve.log")
    try:
        yield started
    finally:
        stop_predictor(started[2])


@pytest.fixture(scope="module")
def rows(make_rows):
    return make_rows(9, seed=51)


def close(got, want):
    np.testing.assert_allclose(np.asarray(got, dtype=np.float32), want, atol=1e-6, rtol=0)


def test_health_and_metadata(predictor):
    url, _, _ = predictor
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/dlrm/ready", "/v1/models/dlrm"):
        r = http_request("GET", url + path, timeout=10)
        assert r.status == 200, (path, r.text)
    meta = http_request("GET", url + "/v2/models/dlrm", timeout=10).json()
    assert [i["name"] for i in meta["inputs"]] == ["dense", "sparse"]
    assert meta["outputs"][0]["name"] == "probability"


def test_listens_on_loopback_only(predictor):
    _, _, proc = predictor
    procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    listening = [c for p in procs for c in getattr(p, "net_connections", p.connections)(kind="inet") if c.status == psutil.CONN_LISTEN]
    assert len(listening) >= 2
    # gRPC may bind an IPv6 socket to the v4-mapped loopback address.
    assert {c.laddr.ip.removeprefix("::ffff:") for c in listening} == {LOOPBACK}


def test_v1_predict(predictor, rows, expected):
    url, _, _ = predictor
    r = http_request("POST", url + "/v1/models/dlrm:predict", data=json.dumps({"instances": rows.instances}),
                     headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status == 200, r.text
    close(r.json()["predictions"], expected(rows.instances))


@pytest.mark.parametrize("binary", [False, True])
def test_tritonclient_http(predictor, rows, expected, encoder, binary):
    url, _, _ = predictor
    want = expected(rows.instances)
    b = len(rows.instances)
    with httpclient.InferenceServerClient(url.removeprefix("http://")) as client:
        assert client.is_model_ready("dlrm")
        for sparse in (hex_of(rows.instances), row_ids_of(rows.instances, encoder)):
            dense = httpclient.InferInput("dense", [b, 13], "FP32")
            dense.set_data_from_numpy(dense_of(rows.instances), binary_data=binary)  # NaN = missing
            sp = httpclient.InferInput("sparse", [b, 26], "BYTES" if sparse.dtype == object else "INT64")
            sp.set_data_from_numpy(sparse, binary_data=binary)
            out = httpclient.InferRequestedOutput("probability", binary_data=binary)
            result = client.infer("dlrm", [dense, sp], outputs=[out], request_id="k-1")
            got = result.as_numpy("probability")
            assert got.dtype == np.float32 and got.shape == (b,)
            close(got, want)


def test_tritonclient_grpc(predictor, rows, expected, encoder):
    _, target, _ = predictor
    want = expected(rows.instances)
    b = len(rows.instances)
    with grpcclient.InferenceServerClient(target) as client:
        assert client.is_server_live() and client.is_model_ready("dlrm")
        for sparse in (hex_of(rows.instances), row_ids_of(rows.instances, encoder).astype(np.int32)):
            dense = grpcclient.InferInput("dense", [b, 13], "FP32")
            dense.set_data_from_numpy(dense_of(rows.instances))
            kind = {np.dtype(object): "BYTES", np.dtype(np.int32): "INT32"}[sparse.dtype]
            sp = grpcclient.InferInput("sparse", [b, 26], kind)
            sp.set_data_from_numpy(sparse)
            result = client.infer("dlrm", [dense, sp], outputs=[grpcclient.InferRequestedOutput("probability")])
            close(result.as_numpy("probability"), want)


def test_bad_input_gives_400_with_the_library_messages(predictor, rows, torchserve_free_messages):
    url, target, _ = predictor
    bad = [dict(x) for x in rows.instances[:4]]
    bad[3] = {"dense": bad[3]["dense"], "sparse": ["zz-not-hex"] + bad[3]["sparse"][1:]}
    r = http_request("POST", url + "/v1/models/dlrm:predict", data=json.dumps({"instances": bad}),
                     headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status == 400
    assert r.json() == {"error": torchserve_free_messages(bad)}
    body = oip_json(rows.instances[:2])
    body["inputs"][0]["shape"] = [2, 12]
    r = http_request("POST", url + "/v2/models/dlrm/infer", data=json.dumps(body),
                     headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status == 400 and "input 'dense': shape must be [B, 13], got [2, 12]" in r.json()["error"]
    with grpcclient.InferenceServerClient(target) as client:
        dense = grpcclient.InferInput("dense", [2, 13], "FP32")
        dense.set_data_from_numpy(dense_of(rows.instances[:2]))
        sp = grpcclient.InferInput("sparse", [2, 26], "BYTES")
        s = hex_of(rows.instances[:2])
        s[1, 2] = "xyz"
        sp.set_data_from_numpy(s)
        with pytest.raises(InferenceServerException) as e:
            client.infer("dlrm", [dense, sp])
        assert e.value.status() == str(grpc.StatusCode.INVALID_ARGUMENT)
        assert "input 'sparse': instance 1, field C3: 'xyz' is not a hex string" in e.value.message()


def test_several_rest_workers(demo_artifacts, tmp_path, make_rows, expected):
    # kserve spawns the REST workers with the pickled model, which loads the artifacts again.
    rows = make_rows(3, seed=52)
    url, _, proc = start_predictor(demo_artifacts, tmp_path / "kserve.log", "--workers", "2")
    try:
        assert len(psutil.Process(proc.pid).children()) >= 2
        for _ in range(6):
            r = http_request("POST", url + "/v1/models/dlrm:predict", data=json.dumps({"instances": rows.instances}),
                             headers={"Content-Type": "application/json"}, timeout=60)
            assert r.status == 200, r.text
            close(r.json()["predictions"], expected(rows.instances))
    finally:
        stop_predictor(proc)


@pytest.fixture(scope="module")
def torchserve_free_messages(demo_backend):
    """The message the library gives for a v1 body (the one TorchServe's handler sends too)."""
    from dlrm_serve.io.codecs import decode_request
    from dlrm_serve.errors import InvalidInput

    encoder = FeatureEncoder(demo_backend.config)

    def message(instances) -> str:
        with pytest.raises(InvalidInput) as e:
            decode_request({"instances": instances}, "application/json", encoder)
        return e.value.message

    return message
