"""deploy/kserve/: InferenceService manifests against KServe's own CRD schema, and the
TorchServe-runtime storage layout of ``./build_mar.sh --kserve`` run with the runtime's
own ``torchserve`` command line.

The schema and the runtime are KServe's (third_party/kserve/, Apache-2.0, commit in its
README).  No cluster is reachable here: what KServe's controller would add (the wrapper on
8080/8081, the storage initializer) is not run; TorchServe itself is, from the layout.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import ROOT, java_ok
from dlrm_serve.cli import build_parser
from dlrm_serve.testing.launcher import LOOPBACK, find_torchserve, free_ports, http_request, load_properties
from kube_schema import validate
from oip_cases import oip_json

DEPLOY = ROOT / "deploy" / "kserve"
THIRD = ROOT / "third_party" / "kserve"
ISVC_FILES = ["torchserve-runtime.yaml", "custom-predictor.yaml", "custom-predictor-grpc.yaml"]
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


@pytest.fixture(scope="module")
def crd():
    return json.loads((THIRD / "inferenceservice.v1beta1.schema.json").read_text())


@pytest.fixture(scope="module")
def runtime():
    return yaml.safe_load((THIRD / "kserve-torchserve.runtime.yaml").read_text())


def manifest(name: str) -> dict:
    return yaml.safe_load((DEPLOY / name).read_text())


# ----- the manifests against the CRD -------------------------------------------------------------
@pytest.mark.parametrize("name", ISVC_FILES)
def test_manifest_is_a_valid_inference_service(crd, name):
    doc = manifest(name)
    assert doc["apiVersion"] == f"{crd['group']}/{crd['version']}" and doc["kind"] == crd["kind"]
    assert DNS_1035.match(doc["metadata"]["name"]) and len(doc["metadata"]["name"]) <= 63
    assert validate(doc, crd["openAPIV3Schema"]) == []
    pred = doc["spec"]["predictor"]
    assert 1 <= pred["minReplicas"] <= pred["maxReplicas"]
    assert pred["scaleMetric"] and pred["scaleTarget"] > 0


def test_the_validator_finds_what_the_crd_forbids(crd):
    schema = crd["openAPIV3Schema"]
    good = manifest("custom-predictor.yaml")
    cases = {
        "scaleMetric": (lambda d: d["spec"]["predictor"].update(scaleMetric="gpu"), "is not one of"),
        "minReplicas type": (lambda d: d["spec"]["predictor"].update(minReplicas="one"), "must be integer"),
        "unknown field": (lambda d: d["spec"]["predictor"].update(replicas=3), "spec.predictor.replicas: unknown field"),
        "no predictor": (lambda d: d["spec"].pop("predictor"), "missing required field 'predictor'"),
        "port": (lambda d: d["spec"]["predictor"]["containers"][0]["ports"][0].pop("containerPort"), "containerPort"),
        "probe port": (lambda d: d["spec"]["predictor"]["containers"][0]["readinessProbe"]["httpGet"].update(port=[8080]),
                       "integer or a string"),
    }
    for what, (mutate, words) in cases.items():
        doc = copy.deepcopy(good)
        mutate(doc)
        errors = validate(doc, schema)
        assert any(words in e for e in errors), (what, errors)
    ts = manifest("torchserve-runtime.yaml")
    ts["spec"]["predictor"]["model"].pop("modelFormat")["name"]
    ts["spec"]["predictor"]["model"]["modelFormat"] = {"version": "1"}
    assert any("missing required field 'name'" in e for e in validate(ts, schema))


def test_torchserve_runtime_manifest_matches_the_runtime(runtime):
    model = manifest("torchserve-runtime.yaml")["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in [f["name"] for f in runtime["spec"]["supportedModelFormats"]]
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
    assert model["storageUri"].startswith(("gs://", "s3://", "pvc://", "https://"))
    # The pass-through envelope replaces the one KServe derives from the protocol (see docs/kserve.md).
    assert {"name": "TS_SERVICE_ENVELOPE", "value": "body"} in model["env"]
    envelope = next(e for e in runtime["spec"]["containers"][0]["env"] if e["name"] == "TS_SERVICE_ENVELOPE")
    assert "serviceEnvelope" in envelope["value"]


@pytest.mark.parametrize("name", ["custom-predictor.yaml", "custom-predictor-grpc.yaml"])
def test_custom_predictor_runs_the_kserve_command(name):
    pred = manifest(name)["spec"]["predictor"]
    (container,) = pred["containers"]
    args = build_parser().parse_args(["kserve", *container["args"]])
    assert args.artifacts == "/mnt/models" and args.host == "0.0.0.0"
    ports = {p["containerPort"] for p in container["ports"]}
    assert ports <= {args.http_port, args.grpc_port}
    assert {"name": "STORAGE_URI", "value": next(e["value"] for e in container["env"] if e["name"] == "STORAGE_URI")} in container["env"]
    probe = container["readinessProbe"]
    if "httpGet" in probe:
        assert probe["httpGet"]["path"] == f"/v2/models/{args.model_name}/ready"
        assert probe["httpGet"]["port"] == args.http_port
    else:
        assert probe["tcpSocket"]["port"] == args.grpc_port
    assert container["resources"]["requests"]["cpu"] and container["resources"]["limits"]["memory"]
    assert container["securityContext"]["runAsNonRoot"] is True
    docker = (DEPLOY / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["dlrm-serve", "kserve"]' in docker and "[kserve]" in docker


# ----- the TorchServe-runtime layout, run as the runtime runs it --------------------------------
@pytest.fixture(scope="module")
def layout(demo_artifacts, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("kserve_layout") / "storage"
    r = subprocess.run(
        ["bash", str(ROOT / "build_mar.sh"), "--artifacts", str(demo_artifacts), "--kserve", str(out), "--workers", "1",
         "--precision", "fp32"],  # compared with the fp32 model in process
        cwd=ROOT, capture_output=True, text=True,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return out


def test_layout_holds_the_archive_and_a_kserve_ready_config(layout):
    assert (layout / "model-store" / "dlrm.mar").is_file()
    props = load_properties(layout / "config" / "config.properties")
    # The KServe wrapper owns 8080 (REST) and 8081 (gRPC) in the same container.
    for key in ("inference_address", "management_address", "metrics_address"):
        port = int(props[key].rsplit(":", 1)[1])
        assert port not in (8080, 8081), key
    assert props["inference_address"].startswith("http://127.0.0.1:")
    assert props["enable_envvars_config"] == "true"
    assert props["disable_token_authorization"] == "true"  # the wrapper sends no token
    assert props["model_store"] == "/mnt/models/model-store"
    snap = json.loads(props["model_snapshot"])
    version = snap["models"]["dlrm"]["1.0"]
    assert version["marName"] == "dlrm.mar" and version["defaultVersion"] is True
    assert version["minWorkers"] == version["maxWorkers"] == 1


def test_layout_answers_under_the_runtimes_command_line(layout, runtime, make_rows, expected, tmp_path):
    if not java_ok():
        pytest.skip("TorchServe needs Java 11+")
    (container,) = runtime["spec"]["containers"]
    args = [a.replace("/mnt/models", str(layout)) for a in container["args"]]
    assert args[:2] == ["torchserve", "--start"]
    args[0] = find_torchserve()
    rest, mgmt, metrics, grpc_inf, grpc_mgmt = free_ports(5)
    env = dict(
        os.environ,
        TMPDIR=str(tmp_path), TEMP=str(tmp_path),
        # What the pod gets: the runtime's env with the InferenceService's override.
        TS_SERVICE_ENVELOPE="body",
        # enable_envvars_config=true: move every port to a free loopback one.
        TS_INFERENCE_ADDRESS=f"http://{LOOPBACK}:{rest}",
        TS_MANAGEMENT_ADDRESS=f"http://{LOOPBACK}:{mgmt}",
        TS_METRICS_ADDRESS=f"http://{LOOPBACK}:{metrics}",
        TS_GRPC_INFERENCE_PORT=str(grpc_inf),
        TS_GRPC_MANAGEMENT_PORT=str(grpc_mgmt),
    )
    env.pop("PYTHONPATH", None)  # the workers import the library shipped in the archive
    log = open(tmp_path / "torchserve.out", "wb")
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://{LOOPBACK}:{rest}"
    rows = make_rows(6, seed=61)
    try:
        deadline = time.monotonic() + 150
        r = None
        while time.monotonic() < deadline:
            try:
                # No token: in-pod auth is off, as the KServe wrapper expects.
                r = http_request("POST", f"{url}/v1/models/dlrm:predict", data=json.dumps({"instances": rows.instances}),
                                 headers={"Content-Type": "application/json"}, timeout=10)
                if r.status == 200:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        assert r is not None and r.status == 200, (r and r.text, (tmp_path / "torchserve.out").read_text()[-3000:],
                                                    shlex.join(args))
        want = expected(rows.instances)
        np.testing.assert_allclose(r.json()["predictions"], want, atol=1e-6, rtol=0)
        r = http_request("POST", f"{url}/v2/models/dlrm/infer", data=json.dumps(oip_json(rows.instances)),
                         headers={"Content-Type": "application/json"}, timeout=30)
        assert r.status == 200, r.text
        np.testing.assert_allclose(r.json()["outputs"][0]["data"], want, atol=1e-6, rtol=0)
        models = http_request("GET", f"http://{LOOPBACK}:{mgmt}/models", timeout=10).json()["models"]
        assert [m["modelName"] for m in models] == ["dlrm"]  # from model_snapshot
    finally:
        stop = subprocess.run([find_torchserve(), "--stop"], cwd=tmp_path, env=env, capture_output=True, timeout=60)
        try:
            os.killpg(proc.pid, 0)
            time.sleep(2)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        log.close()
        assert stop.returncode == 0, stop.stdout + stop.stderr
