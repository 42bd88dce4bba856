"""KServe v1, the Open Inference Protocol (REST and gRPC) and StreamPredictions on the real TorchServe 0.12.

Uses the session server of conftest.py, started from the shipped
config.properties (tokens on, ts_open_inference_protocol=true).  Clients are
the real ones: tritonclient.http, stubs generated from the jar's
open_inference_grpc.proto and inference.proto, plain HTTP for v1.  Every
answer is compared with /predictions/dlrm of the same rows, one request at a
time (each its own dynamic batch), to 1e-6.
"""

from __future__ import annotations

import json

import grpc
import numpy as np
import pytest
import tritonclient.http as httpclient

from dlrm_serve.client import protos
from dlrm_serve.io.features import FeatureEncoder
from oip_cases import dense_of, dense_zero_for_missing, hex_of, oip_json, row_ids_of

pytestmark = pytest.mark.integration

JSON = "application/json"


@pytest.fixture(scope="module")
def encoder(demo_config):
    return FeatureEncoder(demo_config)


@pytest.fixture(scope="module")
def rows(make_rows):
    return make_rows(12, seed=41)


@pytest.fixture(scope="module")
def reference(torchserve, rows):
    """TorchServe's own route, /predictions/dlrm, for the same rows."""
    r = torchserve.predict("dlrm", json.dumps({"instances": rows.instances}), JSON)
    assert r.status == 200, r.text
    return np.array(r.json()["predictions"], dtype=np.float32)


def close(got, want):
    np.testing.assert_allclose(np.asarray(got, dtype=np.float32), want, atol=1e-6, rtol=0)


def bearer(ts) -> dict:
    return {"Authorization": f"Bearer {ts.inference_key}"}


def grpc_metadata(ts) -> list:
    return [("authorization", f"Bearer {ts.inference_key}")]


# ----- KServe v1 -----------------------------------------------------------------------------
def test_kserve_v1_predict_route(torchserve, rows, reference):
    r = torchserve.call("POST", f"{torchserve.inference_url}/v1/models/dlrm:predict", key="inference",
                        data=json.dumps({"instances": rows.instances}), content_type=JSON)
    assert r.status == 200, r.text
    close(r.json()["predictions"], reference)
    # A REST answer is a plain response: no stream header (it would end a chunked stream).
    assert r.header("ts_stream_next") is None
    assert r.header("Content-Length") is not None


# ----- OIP over REST -------------------------------------------------------------------------
def test_tritonclient_http_hex_strings_and_row_ids(torchserve, rows, reference, encoder):
    url = torchserve.inference_url.removeprefix("http://")
    with httpclient.InferenceServerClient(url) as client:
        b = len(rows.instances)
        for sparse in (hex_of(rows.instances), row_ids_of(rows.instances, encoder)):
            dense = httpclient.InferInput("dense", [b, 13], "FP32")
            dense.set_data_from_numpy(dense_of(rows.instances), binary_data=False)  # NaN = missing
            kind = "BYTES" if sparse.dtype == object else "INT64"
            sp = httpclient.InferInput("sparse", [b, 26], kind)
            sp.set_data_from_numpy(sparse, binary_data=False)
            out = httpclient.InferRequestedOutput("probability", binary_data=False)
            result = client.infer("dlrm", [dense, sp], outputs=[out], headers=bearer(torchserve), request_id="req-7")
            got = result.as_numpy("probability")
            assert got.shape == (b,) and got.dtype == np.float32
            close(got, reference)
            resp = result.get_response()
            assert resp["id"] == "req-7" and resp["model_name"] == "dlrm" and resp["model_version"] == "1.0"


def test_oip_rest_json_with_null_for_missing_and_nested_rows(torchserve, rows, reference):
    r = torchserve.call("POST", f"{torchserve.inference_url}/v2/models/dlrm/infer", key="inference",
                        data=json.dumps(oip_json(rows.instances)), content_type=JSON)
    assert r.status == 200, r.text
    body = r.json()
    assert body["id"] == "r1"
    (out,) = body["outputs"]
    assert out["name"] == "probability" and out["datatype"] == "FP32" and out["shape"] == [12]
    close(out["data"], reference)
    assert r.header("ts_stream_next") is None


@pytest.mark.parametrize("mutate, words", [
    (lambda b: b["inputs"][1].update(data=["zz"] * (12 * 26)), ["input 'sparse'", "instance 0, field C1", "not a hex string"]),
    (lambda b: b["inputs"][0].update(shape=[12, 12]), ["input 'dense'", "shape must be [B, 13]"]),
    (lambda b: b["inputs"][1].update(datatype="FP32"), ["input 'sparse'", "datatype must be BYTES"]),
    (lambda b: b["inputs"].pop(0), ["input 'dense' is missing"]),
    (lambda b: b["inputs"][0]["data"][2].__setitem__(4, "7"), ["input 'dense'", "element [2, 4]", "must be a number or null"]),
])
def test_bad_oip_rest_request_is_400_naming_the_tensor(torchserve, rows, mutate, words):
    body = oip_json(rows.instances)
    mutate(body)
    r = torchserve.call("POST", f"{torchserve.inference_url}/v2/models/dlrm/infer", key="inference",
                        data=json.dumps(body), content_type=JSON)
    assert r.status == 400, r.text
    err = r.json()
    assert set(err) == {"error"}
    for w in words:
        assert w in err["error"], err


def test_tritonclient_binary_data_is_refused_with_a_clear_message(torchserve, rows):
    url = torchserve.inference_url.removeprefix("http://")
    with httpclient.InferenceServerClient(url) as client:
        dense = httpclient.InferInput("dense", [2, 13], "FP32")
        dense.set_data_from_numpy(dense_zero_for_missing(rows.instances[:2]), binary_data=True)
        sp = httpclient.InferInput("sparse", [2, 26], "BYTES")
        sp.set_data_from_numpy(hex_of(rows.instances[:2]), binary_data=True)
        with pytest.raises(Exception) as e:
            client.infer("dlrm", [dense, sp], headers=bearer(torchserve))
        assert "binary tensor data" in str(e.value) and "binary_data=False" in str(e.value)


# ----- OIP over gRPC (TorchServe's own service name) -----------------------------------------
def model_infer_request(pb, instances, *, sparse_ids=None):
    oi = pb.open_inference_grpc_pb2
    b = len(instances)
    req = oi.ModelInferRequest(model_name="dlrm", id="g-1")
    dense = req.inputs.add(name="dense", datatype="FP32", shape=[b, 13])
    # TorchServe's frontend writes the tensor as JSON, where NaN is not a number:
    # send a missing count as 0, which the model reads the same way.
    dense.contents.fp32_contents.extend(dense_zero_for_missing(instances).reshape(-1).tolist())
    if sparse_ids is None:
        sp = req.inputs.add(name="sparse", datatype="BYTES", shape=[b, 26])
        sp.contents.bytes_contents.extend(s.encode() for s in hex_of(instances).reshape(-1))
    else:
        sp = req.inputs.add(name="sparse", datatype="INT64", shape=[b, 26])
        sp.contents.int64_contents.extend(sparse_ids.reshape(-1).tolist())
    return req


def test_oip_grpc_model_infer(torchserve, rows, reference, encoder):
    pb = protos.load()
    with grpc.insecure_channel(torchserve.grpc_inference_target) as ch:
        stub = pb.open_inference_grpc_pb2_grpc.GRPCInferenceServiceStub(ch)
        assert stub.ServerLive(pb.open_inference_grpc_pb2.ServerLiveRequest(), metadata=grpc_metadata(torchserve)).live
        for ids in (None, row_ids_of(rows.instances, encoder)):
            resp = stub.ModelInfer(model_infer_request(pb, rows.instances, sparse_ids=ids),
                                   metadata=grpc_metadata(torchserve), timeout=60)
            assert resp.id == "g-1" and resp.model_name == "dlrm" and resp.model_version == "1.0"
            (out,) = resp.outputs
            assert out.name == "probability" and out.datatype == "FP32" and list(out.shape) == [12]
            close(list(out.contents.fp32_contents), reference)
        with pytest.raises(grpc.RpcError) as e:
            stub.ModelInfer(model_infer_request(pb, rows.instances), timeout=60)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_bad_oip_grpc_request_is_invalid_argument_naming_the_tensor(torchserve, rows):
    pb = protos.load()
    req = model_infer_request(pb, rows.instances[:2])
    req.inputs[1].contents.bytes_contents[3] = b"not-hex"
    with grpc.insecure_channel(torchserve.grpc_inference_target) as ch:
        stub = pb.open_inference_grpc_pb2_grpc.GRPCInferenceServiceStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            stub.ModelInfer(req, metadata=grpc_metadata(torchserve), timeout=60)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "input 'sparse': instance 0, field C4: 'not-hex' is not a hex string" in e.value.details()
        # The worker is still there: a good request right after is answered.
        resp = stub.ModelInfer(model_infer_request(pb, rows.instances[:2]), metadata=grpc_metadata(torchserve), timeout=60)
        assert len(resp.outputs[0].contents.fp32_contents) == 2


# ----- TorchServe's own gRPC API: Predictions and StreamPredictions ------------------------------
def test_stream_predictions_gives_one_answer_then_ends_ok(torchserve, rows, reference):
    pb = protos.load()
    req = pb.inference_pb2.PredictionsRequest(
        model_name="dlrm", input={"data": json.dumps({"instances": rows.instances}).encode()}
    )
    with grpc.insecure_channel(torchserve.grpc_inference_target) as ch:
        stub = pb.inference_pb2_grpc.InferenceAPIsServiceStub(ch)
        call = stub.StreamPredictions(req, metadata=grpc_metadata(torchserve), timeout=60)
        answers = list(call)  # raises if the stream ends with an error
        assert call.code() == grpc.StatusCode.OK
        assert len(answers) == 1
        close(json.loads(answers[0].prediction)["predictions"], reference)
        # The unary call is unchanged.
        resp = stub.Predictions(req, metadata=grpc_metadata(torchserve), timeout=60)
        close(json.loads(resp.prediction)["predictions"], reference)


def test_stock_tritonclient_grpc_finds_no_service_on_torchserve(torchserve, rows):
    # TorchServe's OIP service is org.pytorch.serve.grpc.openinference.GRPCInferenceService;
    # stock Triton clients call inference.GRPCInferenceService (the KServe predictor serves that).
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    with grpcclient.InferenceServerClient(torchserve.grpc_inference_target) as client:
        dense = grpcclient.InferInput("dense", [1, 13], "FP32")
        dense.set_data_from_numpy(dense_zero_for_missing(rows.instances[:1]))
        sp = grpcclient.InferInput("sparse", [1, 26], "BYTES")
        sp.set_data_from_numpy(hex_of(rows.instances[:1]))
        with pytest.raises(InferenceServerException) as e:
            client.infer("dlrm", [dense, sp], headers={"authorization": f"Bearer {torchserve.inference_key}"})
        assert e.value.status() == str(grpc.StatusCode.UNIMPLEMENTED)
