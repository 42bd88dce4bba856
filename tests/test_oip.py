"""dlrm_serve.serve.oip in process: tensors decode to the same model inputs as JSON instances,
bad tensors are named, and the Predictor answers OIP bodies in OIP form."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from dlrm_serve.serve import oip
from dlrm_serve.errors import InvalidInput
from dlrm_serve.io.features import FeatureEncoder
from dlrm_serve.serve.serving import Predictor, Request, request_of
from oip_cases import dense_of, hex_of, oip_json, row_ids_of


@pytest.fixture(scope="module")
def encoder(demo_config):
    return FeatureEncoder(demo_config)


@pytest.fixture(scope="module")
def predictor(demo_backend):
    return Predictor(demo_backend, max_rows=64, model_name="dlrm", model_version="2.0")


@pytest.fixture(scope="module")
def rows(make_rows):
    return make_rows(7, seed=71)


def same_batch(a, b):
    assert a.dense.tobytes() == b.dense.tobytes()
    assert a.indices.tobytes() == b.indices.tobytes()
    assert (a.offsets is None and b.offsets is None) or a.offsets.tobytes() == b.offsets.tobytes()


def test_every_tensor_form_gives_the_inputs_of_json_instances(rows, encoder):
    want = encoder.encode_instances(rows.instances)
    b = len(rows.instances)
    forms = {
        "json bytes": oip_json(rows.instances),
        "json row ids": oip_json(rows.instances, ids=row_ids_of(rows.instances, encoder)),
    }
    for what, body in forms.items():
        got, req = oip.decode(body, encoder, 64)
        same_batch(got, want)
        assert req.id == "r1", what
    # Binary tensors (kserve's as_numpy): NaN for a missing count, bytes for strings.
    tensors = [
        oip.Tensor("dense", "FP32", [b, 13], dense_of(rows.instances)),
        oip.Tensor("sparse", "BYTES", [b, 26], np.array([s.encode() for s in hex_of(rows.instances).reshape(-1)], dtype=object)),
    ]
    same_batch(encoder.finish(oip.raw_batch(tensors, encoder, 64)), want)
    tensors[1] = oip.Tensor("sparse", "INT32", [b, 26], row_ids_of(rows.instances, encoder).astype(np.int32))
    same_batch(encoder.finish(oip.raw_batch(tensors, encoder, 64)), want)
    # TorchServe's OIP gRPC: BYTES arrive base64-encoded, "" stays "".
    body = oip_json(rows.instances)
    body["inputs"][1]["data"] = [[base64.b64encode(s.encode()).decode() for s in row] for row in body["inputs"][1]["data"]]
    got, _ = oip.decode(body, encoder, 64, base64_bytes=True)
    same_batch(got, want)


def test_a_missing_count_as_null_nan_or_zero_predicts_the_same(rows, encoder, demo_backend):
    body = oip_json(rows.instances[:1])
    base = demo_backend.predict(oip.decode(body, encoder, 64)[0])
    dense = body["inputs"][0]["data"][0]
    for missing in (None, float("nan"), 0, 0.0):
        dense[2] = missing
        got = demo_backend.predict(oip.decode(body, encoder, 64)[0])
        if missing is None:
            base = got
        np.testing.assert_array_equal(got, base)


@pytest.mark.parametrize("mutate, message", [
    (lambda b: b.pop("inputs"), "'inputs' must be a non-empty list"),
    (lambda b: b.update(inputs=[]), "'inputs' must be a non-empty list"),
    (lambda b: b.update(extra=1), "unexpected keys ['extra']"),
    (lambda b: b["inputs"].append(dict(b["inputs"][0])), "input 'dense' is given twice"),
    (lambda b: b["inputs"][0].update(name="x"), "unknown input 'x'"),
    (lambda b: b["inputs"][0].update(shape=[7]), "input 'dense': shape must be [B, 13], got [7]"),
    (lambda b: b["inputs"][0].update(shape=[100, 13]), "input 'dense': 100 rows; at most 64"),
    (lambda b: b["inputs"][1].update(shape=[6, 26]), "input 'dense' has 7 rows but input 'sparse' has 6"),
    (lambda b: b["inputs"][0].update(datatype="BYTES"), "input 'dense': datatype must be FP32"),
    (lambda b: b["inputs"][0]["data"].pop(), "input 'dense': shape [7, 13] needs 91 values, 'data' holds 78"),
    (lambda b: b["inputs"][0]["data"][1].__setitem__(0, True), "input 'dense': element [1, 0]: must be a number or null, got boolean"),
    (lambda b: b["inputs"][0]["data"][1].__setitem__(0, float("inf")), "input 'dense': instance 1, field I1"),
    (lambda b: b["inputs"][1]["data"][2].__setitem__(5, 12), "input 'sparse': element [2, 5]: BYTES elements must be strings"),
    (lambda b: b["inputs"][1]["data"][2].__setitem__(5, "xyz"), "input 'sparse': instance 2, field C6: 'xyz' is not a hex string"),
    (lambda b: b.update(outputs=[{"name": "logit"}]), "unknown output 'logit'"),
])
def test_bad_requests_name_the_tensor(rows, encoder, mutate, message):
    body = oip_json(rows.instances)
    mutate(body)
    with pytest.raises(InvalidInput) as e:
        oip.decode(body, encoder, 64)
    assert message in e.value.message


def test_row_ids_out_of_range_and_bad_base64(rows, encoder):
    ids = row_ids_of(rows.instances, encoder)
    ids[4, 25] = 10**6
    with pytest.raises(InvalidInput) as e:
        oip.decode(oip_json(rows.instances, ids=ids), encoder, 64)
    assert "input 'sparse': instance 4, field C26: row id 1000000 is out of range" in e.value.message
    with pytest.raises(InvalidInput) as e:
        oip.decode(oip_json(rows.instances), encoder, 64, base64_bytes=True)
    assert "is not a base64-encoded ASCII string" in e.value.message


def test_classify_parses_json_bytes_once_and_spots_binary_tensors(rows):
    body = json.dumps(oip_json(rows.instances)).encode()
    assert oip.classify(body, None)[0] == "oip"
    kind, parsed = oip.classify(json.dumps({"instances": rows.instances}).encode(), None)
    assert kind == "other" and parsed == {"instances": rows.instances}
    assert oip.classify(b"1\t2", None) == ("other", b"1\t2")
    assert oip.classify(body, "text/plain") == ("other", body)
    kind, parsed = oip.classify(body + b"\x00\x01\x02\xff", None)
    assert kind == "oip"
    with pytest.raises(InvalidInput) as e:
        oip.parse_request(parsed)
    assert "binary_data=False" in e.value.message


# ----- the Predictor ------------------------------------------------------------------------
def test_predictor_answers_oip_in_oip_form_and_errors_as_error(predictor, rows, expected):
    good = Request(oip_json(rows.instances), "application/json")
    bad_body = oip_json(rows.instances)
    bad_body["inputs"][0]["shape"] = [7, 12]
    replies, stats = predictor.handle([good, Request(bad_body, "application/json"), Request({"instances": rows.instances})])
    assert [r.status for r in replies] == [200, 400, 200]
    out = replies[0].body
    assert out["id"] == "r1" and out["model_name"] == "dlrm" and out["model_version"] == "2.0"
    np.testing.assert_allclose(out["outputs"][0]["data"], expected(rows.instances), atol=1e-6, rtol=0)
    assert replies[1].body == {"error": "input 'dense': shape must be [B, 13], got [7, 12]"}
    assert "predictions" in replies[2].body
    assert all(r.headers == {} for r in replies)  # REST: no stream header
    assert stats.invalid == 1 and stats.rows == 14


def test_grpc_replies_end_the_stream_and_grpc_oip_errors_keep_the_frontend_reading(predictor, rows):
    def grpc_oip(body):
        return Request(body, "application/json", grpc=True)

    bad_body = oip_json(rows.instances)
    bad_body["inputs"][1]["data"][0][0] = "!!"
    ok_b64 = oip_json(rows.instances)
    ok_b64["inputs"][1]["data"] = [[base64.b64encode(s.encode()).decode() for s in row] for row in ok_b64["inputs"][1]["data"]]
    replies, _ = predictor.handle([grpc_oip(ok_b64), grpc_oip(bad_body), Request(b'{"instances": []}', None, grpc=True)])
    assert all(r.headers == {"ts_stream_next": "false"} for r in replies)
    assert replies[0].status == 200
    # TorchServe's OIP gRPC frontend reads id, model_name, model_version and outputs of every reply.
    err = replies[1].body
    assert {"id", "model_name", "model_version", "outputs"} <= set(err)
    assert err["outputs"][0]["name"] == "error" and "not a base64-encoded" in err["outputs"][0]["data"][0]
    assert replies[2].status == 400 and replies[2].body["type"] == "InvalidInput"
    # A batch of one bad OIP gRPC request raises: TorchServe turns it into a gRPC status.
    with pytest.raises(InvalidInput):
        predictor.handle([grpc_oip(bad_body)])


class Ctx:
    def __init__(self, headers):
        self.headers = headers

    def get_all_request_header(self, idx):
        return self.headers

    def get_request_header(self, idx, key):
        return self.headers.get(key)


def test_request_of_tells_rest_from_grpc_and_reads_enveloped_bodies(rows):
    rest = Ctx({"explain": "False", "Content-Type": "application/json", "body": {"content-type": "application/json"}})
    grpc_ctx = Ctx({"body": {"content-type": "application/json"}})
    assert request_of({"body": {"inputs": []}}, rest, 0).grpc is False
    assert request_of({"body": {"inputs": []}}, grpc_ctx, 0).grpc is True
    assert request_of(b"x", None, 0).grpc is False
    # TorchServe's "body" envelope hands over the JSON body itself.
    enveloped = oip_json(rows.instances)
    req = request_of(enveloped, rest, 0)
    assert req.body is enveloped and req.content_type == "application/json"
    req = request_of({"instances": rows.instances}, rest, 0)
    assert req.body == {"instances": rows.instances}
    # A map of inputs stays a map of inputs.
    assert request_of({"instances": bytearray(b"1\t2")}, grpc_ctx, 0).body == bytearray(b"1\t2")
