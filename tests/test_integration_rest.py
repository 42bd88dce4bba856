"""The real TorchServe 0.12 over REST: formats, bad input, tokens, management, metrics.

One server for the session (see conftest.py), started from the shipped
config.properties on free loopback ports with dlrm.mar loaded; dlrm_b.mar is
registered, scaled and unregistered here.  Request loops are bounded.
"""

from __future__ import annotations

import json
import re
import threading
import time

import numpy as np
import pytest

from dlrm_serve.io.features import FeatureEncoder
from dlrm_serve.errors import LaunchError

pytestmark = pytest.mark.integration

JSON = "application/json"
TSV = "text/tab-separated-values"
BIN = "application/x-dlrm"


@pytest.fixture(scope="module")
def encoder(demo_config):
    return FeatureEncoder(demo_config)


def ok(r) -> list[float]:
    assert r.status == 200, r.text
    assert r.header("Content-Type") == JSON
    return r.json()["predictions"]


def bad(r) -> str:
    assert r.status == 400, r.text
    body = r.json()
    assert body["code"] == 400 and body["type"] == "InvalidInput", body
    return body["message"]


def close(got, want):
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)


# ----- formats and agreement with the in-process model ---------------------------------
def test_every_format_equals_the_in_process_model(torchserve, make_rows, expected, encoder):
    rows = make_rows(20, seed=11)
    want = expected(rows.instances)
    close(ok(torchserve.predict("dlrm", json.dumps({"instances": rows.instances}), JSON)), want)
    close(ok(torchserve.predict("dlrm", json.dumps(rows.instances[3]), JSON)), want[3:4])
    close(ok(torchserve.predict("dlrm", json.dumps(rows.named(4)), JSON)), want[4:5])
    close(ok(torchserve.predict("dlrm", rows.tsv(), TSV)), want)
    close(ok(torchserve.predict("dlrm", rows.tsv_line(5, label="0") + "\n", "text/plain")), want[5:6])
    close(ok(torchserve.predict("dlrm", rows.binary(encoder), BIN)), want)
    # No content type at all: sniffed, as gRPC's bytes are.
    close(ok(torchserve.predict("dlrm", rows.binary(encoder, 0, 2), None)), want[:2])


def test_one_row_alone_and_in_a_100_row_batch_and_in_every_form(torchserve, make_rows, encoder):
    rows = make_rows(100, seed=12)
    batch = ok(torchserve.predict("dlrm", rows.binary(encoder), BIN))
    i = 37
    forms = [
        torchserve.predict("dlrm", json.dumps(rows.instances[i]), JSON),
        torchserve.predict("dlrm", json.dumps(rows.named(i)), JSON),
        torchserve.predict("dlrm", rows.tsv_line(i), TSV),
        torchserve.predict("dlrm", rows.binary(encoder, i, i + 1), BIN),
    ]
    alone = [ok(r)[0] for r in forms]
    # The four forms decode to identical inputs, so single-row answers are identical;
    # inside a batch the GEMMs may round differently.
    assert len(set(alone)) == 1
    close(alone[0], batch[i])


# ----- bad input ------------------------------------------------------------------------
def bad_cases(rows, demo_config) -> list[tuple[bytes | str, str | None, str]]:
    inst = rows.instances[0]

    def with_(dense=None, sparse=None):
        out = {"dense": list(inst["dense"]), "sparse": list(inst["sparse"])}
        if dense:
            out["dense"][dense[0]] = dense[1]
        if sparse:
            out["sparse"][sparse[0]] = sparse[1]
        return json.dumps(out)

    size = demo_config.table_sizes[4]
    line = rows.tsv_line(0).split("\t")
    line[2] = "abc"
    return [
        ("{not json", JSON, "invalid JSON"),
        ("", JSON, "empty"),
        ("{}", JSON, "empty instance"),
        ('{"instances": []}', JSON, "'instances' is empty"),
        ('{"instances": {"a": 1}}', JSON, "'instances' must be a list"),
        ('{"instances": ["x"]}', JSON, "instance 0: an instance must be a JSON object, got string"),
        (json.dumps({"dense": inst["dense"][:5], "sparse": inst["sparse"]}), JSON, "instance 0, field dense: expected 13 values, got 5"),
        (json.dumps({"dense": inst["dense"], "sparse": inst["sparse"] + ["a"]}), JSON, "instance 0, field sparse: expected 26 values, got 27"),
        (with_(dense=(1, "7")), JSON, "instance 0, field I2: dense values must be numbers or null, got string"),
        (with_(dense=(2, True)), JSON, "instance 0, field I3: dense values must be numbers or null, got boolean"),
        (with_(dense=(3, float("nan"))), JSON, "instance 0, field I4: nan is not a finite number"),
        (with_(dense=(4, float("inf"))), JSON, "instance 0, field I5: inf is not a finite number"),
        (with_(dense=(5, 1e39)), JSON, "instance 0, field I6: 1e+39 is too large for float32"),
        (with_(sparse=(0, "xyz")), JSON, "instance 0, field C1: 'xyz' is not a hex string"),
        (with_(sparse=(1, -3)), JSON, "instance 0, field C2: row id -3 is negative"),
        (with_(sparse=(4, size)), JSON, f"instance 0, field C5: row id {size} is out of range for a table of {size} rows"),
        (with_(sparse=(5, 1.5)), JSON, "instance 0, field C6: categorical values must be a hex string"),
        (with_(sparse=(6, False)), JSON, "instance 0, field C7: categorical values must be a hex string"),
        (with_(sparse=(7, {"a": 1})), JSON, "instance 0, field C8: categorical values must be a hex string"),
        (with_(sparse=(8, [[1]])), JSON, "instance 0, field C9: a multi-hot bag is a flat list of ids"),
        (json.dumps({**rows.named(0), "C99": "ab"}), JSON, "instance 0: unknown feature name 'C99'"),
        ("1\t2\t3\n", TSV, "instance 0: a Criteo line has 39 fields"),
        ("\t".join(line) + "\n", TSV, "instance 0, field I3: 'abc' is not a finite number"),
        (b"\x00\x01\x02\x03" * 8, BIN, "does not start with the magic"),
        (b"\xff\xfe\xfd", "text/plain", "not valid UTF-8"),
        ("x", "image/png", "unsupported content type 'image/png'"),
        (json.dumps({"instances": [inst] * 8193}), JSON, "at most 8192 are accepted"),
    ]


def test_bad_input_gets_400_and_concurrent_good_requests_are_right(torchserve, make_rows, expected, encoder, demo_config):
    rows = make_rows(8, seed=13)
    want = expected(rows.instances)
    good_body = rows.binary(encoder)
    pids_before = torchserve.worker_pids("dlrm")
    assert len(pids_before) == 2
    results: list = []
    stop = threading.Event()

    def good_client():
        for _ in range(200):  # bounded
            if stop.is_set():
                break
            r = torchserve.predict("dlrm", good_body, BIN)
            results.append((r.status, r.json()["predictions"] if r.status == 200 else r.text))

    threads = [threading.Thread(target=good_client) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for body, ctype, message in bad_cases(rows, demo_config):
            got = bad(torchserve.predict("dlrm", body, ctype))
            assert message in got, (message, got)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert results and all(status == 200 for status, _ in results), results[:3]
    for _, p in results:
        close(p, want)
    # Same workers: none crashed or was restarted.
    assert torchserve.worker_pids("dlrm") == pids_before
    assert all(w["status"] == "READY" for w in torchserve.describe("dlrm")[0]["workers"])


def test_form_body_and_oversized_body(torchserve, make_rows):
    rows = make_rows(1, seed=14)
    # curl -d sends a form: TorchServe splits it into fields and a TSV line is lost.
    assert "no body" in bad(torchserve.predict("dlrm", rows.tsv_line(0), "application/x-www-form-urlencoded"))
    r = torchserve.predict("dlrm", b"0" * (16 * 1024 * 1024 + 1), TSV)
    assert r.status == 413, r.text


# ----- tokens ----------------------------------------------------------------------------
def test_requests_without_or_with_a_wrong_token_are_refused(torchserve, make_rows):
    body = json.dumps(make_rows(1).instances[0])
    for key in (None, "wrong-key", "management"):
        r = torchserve.predict("dlrm", body, JSON, key=key)
        assert r.status == 400 and "InvalidKeyException" in r.text, (key, r.status, r.text)
    for key in (None, "inference"):
        r = torchserve.get(torchserve.management_url + "/models", key=key)
        assert r.status == 400 and "InvalidKeyException" in r.text
    assert torchserve.get(torchserve.inference_url + "/ping", key=None).status == 400
    assert torchserve.get(torchserve.inference_url + "/ping", key="inference").status == 200


# ----- management: register, scale, unregister, allowed URLs -------------------------------
def test_only_archives_in_the_model_store_can_be_registered(torchserve, tmp_path):
    outside = tmp_path / "elsewhere.mar"
    outside.write_bytes(b"PK")
    for url, why in [
        ("http://127.0.0.1:1/evil.mar", "does not match any allowed URL"),
        ("https://example.com/dlrm.mar", "does not match any allowed URL"),
        (f"file://{outside}", "does not match any allowed URL"),
        (str(outside), "Model not found"),
        ("../dlrm.mar", "Relative path is not allowed"),
    ]:
        with pytest.raises(LaunchError) as info:
            torchserve.register(url, model_name="intruder", timeout=60)
        assert why in info.value.message, (url, info.value.message)
    assert "intruder" not in torchserve.models()


def test_register_scale_and_unregister_a_second_model(torchserve, make_rows, expected):
    rows = make_rows(3, seed=15)
    torchserve.register("dlrm_b.mar", initial_workers=1, batch_size=4, max_batch_delay=5)
    try:
        assert set(torchserve.models()) >= {"dlrm", "dlrm_b"}
        close(ok(torchserve.predict("dlrm_b", json.dumps({"instances": rows.instances}), JSON)), expected(rows.instances))
        d = torchserve.describe("dlrm_b")[0]
        assert (d["batchSize"], d["maxBatchDelay"], len(d["workers"])) == (4, 5, 1)
        torchserve.scale("dlrm_b", 2, 2)
        torchserve.wait_ready("dlrm_b", workers=2, timeout=120)
        assert len(torchserve.worker_pids("dlrm_b")) == 2
    finally:
        torchserve.unregister("dlrm_b")
    assert "dlrm_b" not in torchserve.models()
    assert torchserve.predict("dlrm_b", json.dumps(rows.instances[0]), JSON).status == 404


# ----- metrics and the archive's own library ---------------------------------------------
def test_custom_metrics_reach_prometheus(torchserve, make_rows):
    rows = make_rows(5, seed=16)
    assert torchserve.predict("dlrm", json.dumps({"instances": rows.instances}), JSON).status == 200
    assert torchserve.predict("dlrm", "{", JSON).status == 400
    # A worker reports once per metrics_interval (1 s): after it, every worker's
    # next batch reports what it has summed.
    time.sleep(1.2)
    for _ in range(8):
        assert torchserve.predict("dlrm", json.dumps(rows.instances[0]), JSON).status == 200
    text = torchserve.metrics_text()

    def value(name):
        m = re.search(rf'^{name}{{([^}}]*)}} ([0-9.eE+-]+)$', text, re.M)
        assert m, f"{name} not in /metrics"
        assert 'ModelName="dlrm"' in m.group(1) and 'Backend="torch"' in m.group(1) and 'Provider="cpu"' in m.group(1)
        return float(m.group(2))

    assert value("DLRMRowsScored") >= 5
    assert value("DLRMInvalidRequests") >= 1
    for name in ("DLRMRowsPerBatch", "DLRMDecodeTime", "DLRMForwardTime"):
        value(name)


def test_workers_import_the_library_shipped_in_the_archive(torchserve):
    log = torchserve.log_text("model_log.log")
    found = re.findall(r"dlrm handler ready: dlrm_serve from (\S+?), ", log)
    assert found, "the handler did not log where dlrm_serve came from"
    repo = str(__import__("pathlib").Path(__file__).resolve().parents[1] / "dlrm_serve")
    for path in found:
        assert path != repo and path.endswith("dlrm_serve"), path
        assert str(torchserve.start_dir) in path  # unpacked under this server's own temp folder
