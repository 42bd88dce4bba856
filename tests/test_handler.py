"""The TorchServe handler without a server.

Requests are framed exactly as TorchServe's frontend sends them to a worker
and decoded by TorchServe's own worker code (``ts.protocol`` and
``ts.service``), so what reaches ``handle`` (decoded JSON, ``str`` for text,
``bytearray`` otherwise, invalid JSON left as bytes) is what a real worker
gets; the reply frame is parsed back to per-request status codes.
"""

from __future__ import annotations

import io
import json
import logging
import struct
from pathlib import Path

import numpy as np
import pytest

import ts
from ts.context import Context, RequestProcessor
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl
from ts.protocol.otf_message_handler import _retrieve_request
from ts.service import Service

from dlrm_serve.io.codecs import MAX_ROWS
from dlrm_serve.io.features import FeatureEncoder

METRICS_YAML = Path(ts.__file__).parent / "configs" / "metrics.yaml"


# ----- TorchServe's wire format, both ways -----------------------------------------
def _frame(parts: list[bytes]) -> bytes:
    return b"".join(struct.pack("!i", len(p)) + p for p in parts)


def request_frame(req_id: str, inputs: dict[str, tuple[str, bytes]], headers: dict[str, str]) -> bytes:
    """One request as the frontend frames it: id, headers, inputs (name, content type, value)."""
    out = _frame([req_id.encode()])
    for k, v in headers.items():
        out += _frame([k.encode(), v.encode()])
    out += struct.pack("!i", -1)
    for name, (ctype, value) in inputs.items():
        out += _frame([name.encode(), ctype.encode(), value])
    out += struct.pack("!i", -1)
    return out


class FakeSocket:
    def __init__(self, data: bytes):
        self.buf = io.BytesIO(data)

    def recv(self, n: int) -> bytes:
        return self.buf.read(n)


def worker_batch(requests: list[tuple[bytes | str, str | None]]) -> list[dict]:
    """(body, content type) pairs -> the batch TorchServe's worker builds from the wire."""
    batch = []
    for i, (body, ctype) in enumerate(requests):
        body = body.encode() if isinstance(body, str) else body
        headers = {"Content-Type": ctype} if ctype else {}
        frame = request_frame(f"req-{i}", {"body": (ctype or "", body)}, headers)
        batch.append(_retrieve_request(FakeSocket(frame)))
    return batch


def parse_reply(msg: bytes) -> list[tuple[int, str, dict, bytes]]:
    """A worker's reply frame -> [(http status, reason, headers, body)] per request."""
    buf = io.BytesIO(bytes(msg))

    def i32():
        return struct.unpack("!i", buf.read(4))[0]

    def blob():
        return buf.read(i32())

    i32()  # batch code
    blob()  # batch message
    out = []
    while True:
        n = i32()
        if n == -1:
            return out
        buf.read(n)  # request id
        ctype = blob()
        code = i32()
        reason = blob().decode()
        headers = {blob().decode(): blob().decode() for _ in range(i32())}
        headers.setdefault("content-type", ctype.decode())
        out.append((code, reason, headers, blob()))


def make_context(model_dir: Path, yaml_config: dict | None = None) -> Context:
    metrics = MetricsCacheYamlImpl(config_file_path=str(METRICS_YAML))
    metrics.initialize_cache()
    metrics.model_name = "dlrm"
    manifest = {"model": {"modelName": "dlrm", "serializedFile": "dlrm.safetensors", "handler": "dlrm_handler.py"}}
    return Context("dlrm", str(model_dir), manifest, 16, None, ts.__version__, True, metrics, yaml_config or {})


# ----- fixtures ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def handler(handler_module, demo_artifacts):
    h = handler_module.DLRMHandler()
    h.initialize(make_context(demo_artifacts, {"minWorkers": 1, "maxWorkers": 1, "dlrm": {"backend": "torch", "max_rows": 64}}))
    return h


@pytest.fixture(scope="module")
def service(handler, demo_artifacts):
    svc = Service("dlrm", str(demo_artifacts), None, handler.handle, None, 16, True, None)
    svc._context = make_context(demo_artifacts)
    svc.set_cl_socket(None)
    return svc


@pytest.fixture(scope="module")
def encoder(demo_config):
    return FeatureEncoder(demo_config)


def run(service, requests):
    """Requests through TorchServe's worker code and the handler -> parsed replies."""
    return parse_reply(service.predict(worker_batch(requests)))


def preds(body: bytes) -> list[float]:
    return json.loads(body)["predictions"]


def error(body: bytes) -> dict:
    out = json.loads(body)
    assert set(out) == {"code", "type", "message"}
    return out


# ----- every format -------------------------------------------------------------------
def test_every_format_gives_the_in_process_prediction(service, make_rows, expected, encoder):
    rows = make_rows(5, seed=1)
    want = expected(rows.instances)
    replies = run(service, [
        (json.dumps({"instances": rows.instances}), "application/json"),
        (json.dumps(rows.instances[0]), "application/json"),
        (json.dumps(rows.named(1)), "application/json; charset=utf-8"),
        (rows.tsv(), "text/tab-separated-values"),
        (rows.tsv_line(2, label="1"), "text/plain"),
        (rows.binary(encoder), "application/x-dlrm"),
        (json.dumps({"instances": rows.instances}), None),  # sniffed, as gRPC bytes
        (rows.binary(encoder, 3, 5), None),
        (rows.tsv(4), None),
    ])
    assert [r[0] for r in replies] == [200] * 9
    assert all(r[2]["content-type"] == "application/json" for r in replies)
    got = [preds(r[3]) for r in replies]
    for g, w in zip(got, [want, want[:1], want[1:2], want, want[2:3], want, want, want[3:5], want[4:]]):
        np.testing.assert_allclose(g, w, atol=1e-6, rtol=0)


def test_grpc_style_inputs_without_content_type(handler, demo_artifacts, make_rows, expected, encoder):
    rows = make_rows(2, seed=2)
    ctx = make_context(demo_artifacts)
    # gRPC: input map keys become dict keys, values are bytes, no headers at all.
    data = [
        {"data": bytearray(json.dumps(rows.instances[0]).encode())},
        {"body": bytearray(rows.binary(encoder, 1, 2))},
        {"instances": bytearray(rows.tsv(0, 1).encode())},  # a single input of any name
        {"x": bytearray(b"1"), "y": bytearray(b"2")},
        {},
    ]
    ctx.request_processor = [RequestProcessor({}) for _ in data]
    out = handler.handle(data, ctx)
    assert len(out) == len(data)
    want = expected(rows.instances)
    np.testing.assert_allclose(json.loads(out[0])["predictions"], want[:1], atol=1e-6, rtol=0)
    np.testing.assert_allclose(json.loads(out[1])["predictions"], want[1:2], atol=1e-6, rtol=0)
    np.testing.assert_allclose(json.loads(out[2])["predictions"], want[:1], atol=1e-6, rtol=0)
    assert "none is named 'body' or 'data'" in json.loads(out[3])["message"]
    assert "no body" in json.loads(out[4])["message"]
    assert [ctx.get_response_status(i)[0] for i in range(5)] == [200, 200, 200, 400, 400]


# ----- bad input: per-request 400, the rest of the batch unaffected ----------------------
BAD = [
    ("{not json", "application/json", "invalid JSON"),
    ("", "application/json", "empty"),
    ("{}", "application/json", "empty instance"),
    ('{"instances": []}', "application/json", "'instances' is empty"),
    ('{"instances": 3}', "application/json", "'instances' must be a list"),
    ('{"instances": [1]}', "application/json", "instance 0: an instance must be a JSON object"),
    ('"text"', "application/json", "must be an object"),
    ("null", "application/json", "must be an object"),
    ("[1, 2]", "application/json", "must be an object"),
    ('{"dense": [1], "sparse": []}', "application/json", "field dense: expected 13 values, got 1"),
    ('{"I1": 1, "Z9": 2}', "application/json", "unknown feature name 'Z9'"),
    ("1\t2\t3", "text/tab-separated-values", "a Criteo line has 39 fields"),
    (b"\xff\xfe\x00", "text/plain", "not valid UTF-8"),
    (b"DLRM\x01garbage", "application/x-dlrm", "shorter than the 24-byte header"),
    (b"\x00\x01binary" * 4, "application/x-dlrm", "does not start with the magic"),
    ("x", "image/png", "unsupported content type 'image/png'"),
]


@pytest.mark.parametrize("body,ctype,message", BAD, ids=[b[2] for b in BAD])
def test_bad_request_gets_400_and_neighbours_still_answer(service, make_rows, expected, body, ctype, message):
    rows = make_rows(3, seed=3)
    good = json.dumps({"instances": rows.instances})
    replies = run(service, [(good, "application/json"), (body, ctype), (rows.tsv(), "text/plain")])
    assert [r[0] for r in replies] == [200, 400, 200]
    err = error(replies[1][3])
    assert err["code"] == 400 and err["type"] == "InvalidInput"
    assert message in err["message"]
    assert replies[1][1] == "InvalidInput"  # the reason phrase
    want = expected(rows.instances)
    np.testing.assert_allclose(preds(replies[0][3]), want, atol=1e-6, rtol=0)
    np.testing.assert_allclose(preds(replies[2][3]), want, atol=1e-6, rtol=0)


def test_bad_values_name_instance_and_field(service, make_rows):
    rows = make_rows(2, seed=4)
    bad = [dict(rows.instances[0]), dict(rows.instances[1])]
    bad[1] = {"dense": list(bad[1]["dense"]), "sparse": list(bad[1]["sparse"])}
    bad[1]["sparse"][2] = -1
    replies = run(service, [(json.dumps({"instances": bad}), "application/json")])
    assert replies[0][0] == 400
    assert error(replies[0][3])["message"].startswith("instance 1, field C3: row id -1 is negative")


def test_all_bad_batch_and_max_rows_from_yaml(service, make_rows):
    rows = make_rows(65, seed=5)
    replies = run(service, [(json.dumps({"instances": rows.instances}), "application/json"), ("{", "application/json")])
    assert [r[0] for r in replies] == [400, 400]
    assert "at most 64 are accepted" in error(replies[0][3])["message"]


def test_output_has_one_item_per_request_and_statuses_by_index(handler, demo_artifacts, make_rows):
    rows = make_rows(1, seed=6)
    ctx = make_context(demo_artifacts)
    data = [{"body": rows.instances[0]} if i % 3 else {"body": bytearray(b"{oops")} for i in range(10)]
    ctx.request_processor = [RequestProcessor({"Content-Type": "application/json"}) for _ in data]
    out = handler.handle(data, ctx)
    assert len(out) == 10
    assert [ctx.get_response_status(i)[0] for i in range(10)] == [400 if i % 3 == 0 else 200 for i in range(10)]
    # Every good copy gets the same answer (to float32 rounding: rows of one GEMM may round apart).
    good = [json.loads(o)["predictions"][0] for i, o in enumerate(out) if i % 3]
    np.testing.assert_allclose(good, [good[0]] * len(good), atol=1e-6, rtol=0)


def metric_lines(caplog) -> dict[str, str]:
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[METRICS]DLRM")]
    caplog.clear()
    return {line.split("[METRICS]")[1].split(".")[0]: line for line in lines}


def test_handler_publishes_metrics_once_per_interval(handler_module, demo_artifacts, make_rows, caplog):
    h = handler_module.DLRMHandler()
    h.initialize(make_context(demo_artifacts, {"dlrm": {"metrics_interval": 10}}))
    now = [100.0]
    h.window.clock = lambda: now[0]
    rows = make_rows(4, seed=7)

    def batch():
        ctx = make_context(demo_artifacts)
        ctx.metrics.set_request_ids({0: "a", 1: "b"})
        ctx.request_processor = [RequestProcessor({"Content-Type": "application/json"}) for _ in range(2)]
        h.handle([{"body": {"instances": rows.instances}}, {"body": bytearray(b"{")}], ctx)

    with caplog.at_level(logging.INFO, logger="ts.metrics.caching_metric"):
        batch()  # the first batch reports at once
        first = metric_lines(caplog)
        now[0] += 5
        batch()  # inside the interval: summed, not reported
        batch()
        assert metric_lines(caplog) == {}
        now[0] += 5
        batch()  # the interval is over: three batches in one report
        later = metric_lines(caplog)
    assert first["DLRMRowsScored"].startswith("[METRICS]DLRMRowsScored.Count:4|")
    assert "DLRMInvalidRequests.Count:1|" in first["DLRMInvalidRequests"]
    assert "DLRMRowsPerBatch.Count:4.0|" in first["DLRMRowsPerBatch"] and "#type:GAUGE" in first["DLRMRowsPerBatch"]
    assert {"DLRMDecodeTime", "DLRMForwardTime"} <= set(first)
    assert all("Backend:torch" in line and "ModelName:dlrm" in line and "Provider:cpu" in line for line in first.values())
    assert later["DLRMRowsScored"].startswith("[METRICS]DLRMRowsScored.Count:12|")
    assert "DLRMInvalidRequests.Count:3|" in later["DLRMInvalidRequests"]
    assert "DLRMRowsPerBatch.Count:4.0|" in later["DLRMRowsPerBatch"]


# ----- settings and failures -------------------------------------------------------------
def test_handler_module_defines_exactly_one_class(handler_module):
    # TorchServe refuses a handler module with more than one class in it.
    from ts.utils.util import list_classes_from_module

    assert [c.__name__ for c in list_classes_from_module(handler_module)] == ["DLRMHandler"]



# The placement settings (tests/test_placement.py checks their values).
DEVICE_DEFAULTS = {"device": "auto", "tables": "auto", "gpu_memory_share": 0.8, "cuda_graphs": True}


def test_read_settings():
    from dlrm_serve.serve.serving import read_settings as read

    from dlrm_serve.runtime.explain import EXPLAIN_MAX_ROWS

    assert read({}, cpu_count=4) == {
        "backend": "torch", "max_rows": MAX_ROWS, "threads": 4, "touch_tables": False, "metrics_interval": 1.0,
        **DEVICE_DEFAULTS,
        "explain_max_rows": EXPLAIN_MAX_ROWS,
        "fault_hang_on": "",
        "precision": "fp32",
    }
    assert read({"maxWorkers": 2}, cpu_count=4)["threads"] == 2
    assert read({"maxWorkers": 8}, cpu_count=2)["threads"] == 1
    assert read({"dlrm": {"backend": "onnxruntime", "max_rows": 10, "threads": 3, "metrics_interval": 0}}) == {
        "backend": "onnxruntime", "max_rows": 10, "threads": 3, "touch_tables": False, "metrics_interval": 0.0,
        **DEVICE_DEFAULTS,
        "explain_max_rows": EXPLAIN_MAX_ROWS,
        "fault_hang_on": "",
        "precision": "fp32",
    }
    assert read({"dlrm": {"explain_max_rows": 32}})["explain_max_rows"] == 32
    assert read({"dlrm": {"touch_tables": True}})["touch_tables"] is True
    for bad, match in [
        ({"dlrm": {"max_rows": 0}}, "max_rows"),
        ({"dlrm": {"max_rows": True}}, "max_rows"),
        ({"dlrm": {"threads": -1}}, "threads"),
        ({"dlrm": {"backend": 1}}, "backend"),
        ({"dlrm": {"metrics_interval": -1}}, "metrics_interval"),
        ({"dlrm": {"metrics_interval": "1s"}}, "metrics_interval"),
        ({"dlrm": {"touch_tables": "yes"}}, "touch_tables"),
        ({"dlrm": {"explain_max_rows": 0}}, "explain_max_rows"),
        ({"dlrm": {"batch": 1}}, "unknown keys"),
        ({"dlrm": [1]}, "mapping"),
    ]:
        with pytest.raises(ValueError, match=match):
            read(bad)


def test_unknown_backend_fails_initialize(handler_module, demo_artifacts):
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        handler_module.DLRMHandler().initialize(make_context(demo_artifacts, {"dlrm": {"backend": "tpu"}}))


def test_backend_failure_fails_the_batch_with_a_500(handler_module, demo_artifacts, make_rows):
    from ts.utils.util import PredictionException

    h = handler_module.DLRMHandler()
    h.initialize(make_context(demo_artifacts))

    def broken(batch):
        raise RuntimeError("boom")

    h.backend.predict = broken
    ctx = make_context(demo_artifacts)
    ctx.request_processor = [RequestProcessor({"Content-Type": "application/json"})]
    with pytest.raises(PredictionException) as info:
        h.handle([{"body": make_rows(1).instances[0]}], ctx)
    assert info.value.error_code == 500 and "RuntimeError" in info.value.message
    assert "boom" not in info.value.message  # internal exception text stays in the log
