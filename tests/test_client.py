"""The client library without TorchServe: fakes and in-process fake servers.

The fake servers speak TorchServe's wire protocols (gRPC stubs generated from
the installed torchserve; REST over http.server) and decode requests with
the library's own codecs, so the client is tested end to end: chunking and
reassembly order, retries on UNAVAILABLE/503 only, token renewal, the
gRPC 400-as-OK error body, and ``dlrm-serve predict`` / ``models``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from concurrent import futures
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import numpy as np
import pytest

from dlrm_serve.client import protos
from dlrm_serve.cli import main as cli_main
from dlrm_serve.client import Client, Keys, connect, ordered_map, parse_predictions
from dlrm_serve.client.keys import parse_expiration, read_key_file
from dlrm_serve.client.payloads import Payload, encode_rows, error_for
from dlrm_serve.client.transports import error_from_grpc, error_from_http
from dlrm_serve.io.codecs import decode_request
from dlrm_serve.config import DLRMConfig
from dlrm_serve.errors import AuthError, DLRMServeError, InvalidInput, ServerError
from dlrm_serve.io.features import FeatureEncoder

ROOT = Path(__file__).resolve().parents[1]
CFG = DLRMConfig(
    table_sizes=(10, 20, 30),
    embedding_dim=4,
    bottom_mlp=(8, 4),
    top_mlp=(8, 1),
    dense_names=("d1", "d2"),
    sparse_names=("s1", "s2", "s3"),
)
ENC = FeatureEncoder(CFG)
TOKEN_MSG = "Token Authorization failed. Token either incorrect, expired, or not provided correctly"


def fake_model(body, content_type=None) -> np.ndarray:
    """A deterministic 'model' of the decoded rows: what a fake server answers."""
    fb = decode_request(body, content_type, ENC, max_rows=1_000_000)
    b = fb.batch_size
    rows = fb.bag_ids(CFG.num_sparse) // CFG.num_sparse
    ids = np.bincount(rows, weights=(fb.indices % 7).astype(np.float64), minlength=b)
    z = fb.dense.astype(np.float64).sum(axis=1) * 0.3 + ids * 0.05 - 1.0
    return (1.0 / (1.0 + np.exp(-z))).astype(np.float32)


def expected(instances) -> np.ndarray:
    from dlrm_serve.io.codecs import encode_binary

    return fake_model(encode_binary(ENC.raw_instances(instances)), "application/x-dlrm")


def answer(body, content_type=None) -> bytes:
    """The handler's answer: predictions, or the error body (status dropped, as on gRPC)."""
    try:
        probs = fake_model(body, content_type)
    except DLRMServeError as e:
        return json.dumps(e.to_dict()).encode()
    return json.dumps({"predictions": [float(p) for p in probs]}).encode()


def make_instances(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        dense = [None if rng.random() < 0.1 else int(rng.integers(0, 50)) for _ in range(2)]
        sparse = [None if rng.random() < 0.1 else f"{int(rng.integers(0, 2**31)):x}" for _ in range(3)]
        out.append({"dense": dense, "sparse": sparse})
    return out


def tsv_line(inst: dict, label: str | None = None) -> str:
    fields = ["" if v is None else str(v) for v in inst["dense"]] + ["" if v is None else v for v in inst["sparse"]]
    return "\t".join(([label] if label else []) + fields)


# ----- fakes ----------------------------------------------------------------------
class FakeTransport:
    """Answers like the handler, after a random delay; scripted failures first."""

    name = "fake"

    def __init__(self, failures=(), accept_key=None, delay=0.0):
        self.failures = list(failures)
        self.accept_key = accept_key
        self.delay = delay
        self.calls = []  # (key, rows of the payload)
        self.timeouts = []
        self.lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0
        self.rng = np.random.default_rng(0)

    def predict(self, model, version, payload: Payload, key, timeout=None):
        with self.lock:
            self.timeouts.append(timeout)
            self.calls.append((key, payload.rows))
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            failure = self.failures.pop(0) if self.failures else None
            pause = float(self.rng.uniform(self.delay / 2, self.delay))
        try:
            if pause:
                time.sleep(pause)
            if self.accept_key is not None and key != self.accept_key:
                raise AuthError(TOKEN_MSG, status=400)
            if failure is not None:
                raise failure
            return answer(payload.body, payload.content_type)
        finally:
            with self.lock:
                self.in_flight -= 1

    def close(self):
        pass


def client(transport, **kw) -> Client:
    kw.setdefault("keys", Keys())
    kw.setdefault("sleep", lambda s: None)
    return Client(transport, **kw)


# ----- stubs ------------------------------------------------------------------------
def test_stubs_generate_from_the_installed_jar(tmp_path):
    out = protos.generate(tmp_path / "stubs")
    assert protos.is_current(out)
    for name in ("inference_pb2", "inference_pb2_grpc", "management_pb2", "management_pb2_grpc"):
        assert (out / f"{name}.py").is_file()
    text = (out / "inference_pb2_grpc.py").read_text()
    # Package-qualified imports: nothing top-level like `import inference_pb2`.
    assert "from dlrm_serve.client._proto import inference_pb2" in text
    assert "/org.pytorch.serve.grpc.inference.InferenceAPIsService/Predictions" in text
    # A stamp from another jar makes the folder stale.
    stamp = json.loads((out / "STAMP.json").read_text())
    stamp["jar_size"] += 1
    (out / "STAMP.json").write_text(json.dumps(stamp))
    assert not protos.is_current(out)


def test_stubs_import_from_any_cwd(tmp_path):
    code = (
        "from dlrm_serve.client import protos; s = protos.load(); "
        "r = s.inference_pb2.PredictionsRequest(model_name='m', input={'data': b'x'}); "
        "print(s.management_pb2.ListModelsRequest(limit=3).limit, r.input['data'])"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["3", "b'x'"]


def test_stubs_need_torchserve(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ts" else real(name, *a))
    with pytest.raises(DLRMServeError, match="torchserve is not installed"):
        protos.find_jar()


# ----- ordered_map -----------------------------------------------------------------
def test_ordered_map_keeps_order_and_bounds_in_flight():
    state = {"now": 0, "max": 0}
    lock = threading.Lock()
    rng = np.random.default_rng(1)
    delays = rng.uniform(0, 0.01, size=40)

    def work(i):
        with lock:
            state["now"] += 1
            state["max"] = max(state["max"], state["now"])
        time.sleep(delays[i])
        with lock:
            state["now"] -= 1
        return i * i

    assert list(ordered_map(work, range(40), 3)) == [i * i for i in range(40)]
    assert 1 < state["max"] <= 3


def test_ordered_map_raises_first_error_and_stops_taking_items():
    taken = []

    def items():
        for i in range(100):
            taken.append(i)
            yield i

    def work(i):
        if i == 5:
            raise ValueError("boom 5")
        return i

    got = []
    with pytest.raises(ValueError, match="boom 5"):
        for r in ordered_map(work, items(), 2):
            got.append(r)
    assert got == [0, 1, 2, 3, 4]
    assert len(taken) <= 8  # bounded: the rest of the input was never read


# ----- predict: chunking, order, formats -----------------------------------------------
@pytest.mark.parametrize("payload", ["binary", "json", "tsv"])
def test_predict_chunks_and_reassembles_in_order(payload):
    inst = make_instances(103, seed=2)
    lines = [tsv_line(x, label="1") for x in inst]
    t = FakeTransport(delay=0.01)
    c = client(t, config=CFG, payload=payload, rows_per_request=10, concurrency=4)
    got = c.predict(lines)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, expected(inst))
    assert sorted(rows for _, rows in t.calls) == [3] + [10] * 10
    assert 1 < t.max_in_flight <= 4


def test_predict_instances_and_arrays_match():
    inst = make_instances(25, seed=3)
    want = expected(inst)
    c = client(FakeTransport(), config=CFG, rows_per_request=7)
    np.testing.assert_array_equal(c.predict(inst), want)
    dense = np.array([[np.nan if v is None else v for v in x["dense"]] for x in inst], dtype=np.float32)
    sparse = np.array([["" if v is None else v for v in x["sparse"]] for x in inst])
    np.testing.assert_array_equal(c.predict(dense=dense, sparse=sparse), want)
    np.testing.assert_array_equal(c.predict((dense, sparse), payload="json"), want)
    # Without a config, instances go as JSON and the server validates them.
    np.testing.assert_array_equal(client(FakeTransport()).predict(inst), want)


def test_binary_encoding_errors_name_the_row_of_the_whole_input():
    inst = make_instances(30, seed=4)
    inst[23]["sparse"][1] = "not-hex"
    t = FakeTransport()
    c = client(t, config=CFG, rows_per_request=10, concurrency=1)
    with pytest.raises(InvalidInput, match=r"instance 23, field s2: 'not-hex' is not a hex string"):
        c.predict(inst)


def test_server_rejection_over_json_carries_the_server_message():
    inst = make_instances(30, seed=5)
    inst[13]["dense"][0] = "seven"
    c = client(FakeTransport(), rows_per_request=10, concurrency=2)
    with pytest.raises(InvalidInput) as e:
        c.predict(inst)
    # The server numbers rows per request; the client says which request.
    assert "instance 3, field d1: dense values must be numbers or null" in e.value.message
    assert "rows 10..19" in e.value.message
    assert e.value.status == 400


# ----- the gRPC error body ----------------------------------------------------------------
def test_error_body_with_ok_status_raises_like_rest():
    body = json.dumps({"code": 400, "type": "InvalidInput", "message": "instance 0, field C1: bad"}).encode()
    with pytest.raises(InvalidInput) as e:
        parse_predictions(body, 1)
    assert e.value.message == "instance 0, field C1: bad"
    assert e.value.status == 400
    with pytest.raises(ServerError) as e:
        parse_predictions(json.dumps({"code": 507, "type": "X", "message": "full"}).encode(), 1)
    assert e.value.status == 507 and not isinstance(e.value, InvalidInput)
    with pytest.raises(ServerError, match="sent 2 rows but the server answered 1"):
        parse_predictions(b'{"predictions": [0.5]}', 2)
    with pytest.raises(ServerError, match="not JSON"):
        parse_predictions(b"\x00\x01", 1)


def test_predictions_are_the_exact_float32_values():
    values = np.array([0.1, 1 / 3, 0.999999, 1e-7], dtype=np.float32)
    body = json.dumps({"predictions": [float(v) for v in values]}).encode()
    got = parse_predictions(body, 4)
    assert got.dtype == np.float32
    assert got.tobytes() == values.tobytes()


def test_rest_invalid_key_is_an_auth_error_not_invalid_input():
    body = json.dumps({"code": 400, "type": "InvalidKeyException", "message": TOKEN_MSG}).encode()
    err = error_from_http(400, body)
    assert isinstance(err, AuthError) and not isinstance(err, InvalidInput)
    assert err.message == TOKEN_MSG
    bad = error_from_http(400, json.dumps({"code": 400, "type": "InvalidInput", "message": "instance 0: x"}).encode())
    assert isinstance(bad, InvalidInput) and bad.message == "instance 0: x"
    assert error_from_http(503, b"").status == 503
    assert type(error_from_http(404, b'{"code":404,"type":"ModelNotFoundException","message":"Model not found: m"}')) is ServerError


class FakeRpcError(grpc.RpcError):
    def __init__(self, code, details):
        self._code, self._details = code, details

    def code(self):
        return self._code

    def details(self):
        return self._details


@pytest.mark.parametrize(
    "code, details, kind, status",
    [
        (grpc.StatusCode.PERMISSION_DENIED, TOKEN_MSG, AuthError, 403),
        (grpc.StatusCode.PERMISSION_DENIED, "Model API disabled", ServerError, 403),
        (grpc.StatusCode.INVALID_ARGUMENT, "Parameter model_name is required.", InvalidInput, 400),
        (grpc.StatusCode.UNAVAILABLE, "failed to connect", ServerError, 503),
        (grpc.StatusCode.NOT_FOUND, "Model not found: m", ServerError, 404),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "", ServerError, 504),
        (grpc.StatusCode.INTERNAL, "Prediction failed", ServerError, 500),
        # TorchServe keeps the Java exception, not its HTTP status: map it back.
        (grpc.StatusCode.INTERNAL, "Model not found: m\norg.pytorch.serve.archive.model.ModelNotFoundException", ServerError, 404),
        (grpc.StatusCode.INTERNAL, "Parameter model_name is required.\nBadRequestException.()", InvalidInput, 400),
        (grpc.StatusCode.INTERNAL, "busy\norg.pytorch.serve.http.ServiceUnavailableException", ServerError, 503),
        # A killed worker: REST 507, gRPC RESOURCE_EXHAUSTED; a server error to retry, not a too-large request.
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "Worker died.", ServerError, 507),
    ],
)
def test_grpc_status_mapping(code, details, kind, status):
    err = error_from_grpc(FakeRpcError(code, details))
    assert type(err) is kind
    assert err.status == status
    if details:
        assert details.splitlines()[0] in err.message
        assert "Exception" not in err.message


# ----- retries --------------------------------------------------------------------------
def test_retries_unavailable_with_growing_backoff():
    sleeps = []
    t = FakeTransport(failures=[ServerError("busy", status=503), ServerError("busy", status=503)])
    c = client(t, config=CFG, sleep=sleeps.append, backoff_s=0.1, retries=4)
    inst = make_instances(3)
    np.testing.assert_array_equal(c.predict(inst), expected(inst))
    assert len(t.calls) == 3 and len(sleeps) == 2
    assert 0.05 <= sleeps[0] <= 0.1 and 0.1 <= sleeps[1] <= 0.2
    assert c.stats["retries"] == 2


@pytest.mark.parametrize(
    "failure",
    [ServerError("Prediction failed", status=500), InvalidInput("bad"), ServerError("nf", status=404), AuthError("no", status=403)],
)
def test_other_errors_are_not_retried(failure):
    t = FakeTransport(failures=[failure])
    c = client(t, config=CFG, retries=4)
    with pytest.raises(type(failure)):
        c.predict(make_instances(2))
    assert len(t.calls) == 1


def test_an_unavailable_error_body_is_retried_like_rest_503():
    # gRPC drops the status, so a 503 may arrive as a body with an OK status.
    class BodyOnce(FakeTransport):
        def predict(self, model, version, payload, key, timeout=None):
            if not self.calls:
                self.calls.append((key, payload.rows))
                return json.dumps({"code": 503, "type": "ServiceUnavailableException", "message": "no worker"}).encode()
            return super().predict(model, version, payload, key, timeout)

    t = BodyOnce()
    inst = make_instances(2)
    np.testing.assert_array_equal(client(t, config=CFG).predict(inst), expected(inst))
    assert len(t.calls) == 2


@pytest.mark.parametrize(
    "failure, reason",
    [
        (ServerError("Worker died.", status=507), "worker died"),
        (ServerError("http://x did not answer in time", status=504), "timeout"),
        (ServerError("the connection to http://x was lost (reset by the server)", status=503), "connection"),
    ],
)
def test_lost_requests_are_retried(failure, reason):
    # A killed worker, a timeout or a reset: the request may be unanswered; predictions are idempotent.
    t = FakeTransport(failures=[failure, failure])
    c = client(t, config=CFG)
    inst = make_instances(3)  # two failures: within every limit
    np.testing.assert_array_equal(c.predict(inst), expected(inst))
    assert len(t.calls) == 3 and c.stats["retries"] == 2
    assert c.stats["retry_reasons"] == {reason: 2}


def test_a_request_that_keeps_killing_workers_is_given_up():
    died = ServerError("Worker died.", status=507)
    t = FakeTransport(failures=[died] * 5)
    c = client(t, config=CFG)
    with pytest.raises(ServerError, match="died 3 times"):
        c.predict(make_instances(2))
    assert len(t.calls) == 3


def test_request_timeout_grows_with_rows_from_a_floor():
    t = FakeTransport()
    c = client(t, config=CFG, rows_per_request=1000, timeout_floor_s=5.0, timeout_per_row_s=0.01)
    c.predict(make_instances(1001))
    assert sorted(t.timeouts) == [5.0 + 0.01, 5.0 + 10.0]
    fixed = client(FakeTransport(), config=CFG, timeout_s=3.0)
    assert fixed.request_timeout(10_000) == 3.0
    with pytest.raises(ValueError, match="timeout_floor_s"):
        client(t, timeout_floor_s=-1)


def test_retries_give_up_after_the_limit():
    t = FakeTransport(failures=[ServerError("busy", status=503)] * 10)
    c = client(t, config=CFG, retries=2)
    with pytest.raises(ServerError) as e:
        c.predict(make_instances(2))
    assert e.value.status == 503
    assert len(t.calls) == 3


# ----- tokens ---------------------------------------------------------------------------
def write_key_file(path: Path, inference: str, expires: datetime, management="mgmt", api="api-key") -> None:
    stamp = expires.strftime("%Y-%m-%dT%H:%M:%S.%f") + "123Z"  # Java Instant: nanoseconds
    later = (datetime.now(timezone.utc) + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    path.write_text(
        json.dumps(
            {
                "management": {"key": management, "expiration time": later},
                "inference": {"key": inference, "expiration time": stamp},
                "API": {"key": api},
            },
            indent=2,
        )
    )


class FakeTokenApi:
    """TorchServe 0.12.0's token API: a new key in the key file, an empty answer."""

    def __init__(self, key_file: Path, api="api-key", answer=None):
        self.key_file, self.api, self.answer = key_file, api, answer
        self.calls = []

    def __call__(self, url, api_key, kind, timeout=30.0):
        self.calls.append((url, api_key, kind))
        if api_key != self.api:
            raise AuthError(TOKEN_MSG)
        n = len(self.calls)
        write_key_file(self.key_file, f"fresh-{n}", datetime.now(timezone.utc) + timedelta(hours=1))
        return self.answer


def test_short_lived_keys_are_renewed_once_per_lifetime(tmp_path):
    # A 60 s key: renewed when 6 s are left, not 60 s before (which would be every request).
    kf = tmp_path / "key_file.json"
    now = datetime.now(timezone.utc)
    write_key_file(kf, "k", now + timedelta(seconds=60))
    keys = Keys(key_file=kf)
    assert keys.token("inference").margin(60.0) == pytest.approx(6.0, abs=0.1)
    assert not keys.due("inference", 60.0, now=now + timedelta(seconds=50))
    assert keys.due("inference", 60.0, now=now + timedelta(seconds=55))
    # A one-hour key keeps the 60 s margin.
    write_key_file(kf, "long", now + timedelta(hours=1))
    keys.reload()
    assert keys.token("inference").margin(60.0) == 60.0


def test_renewals_per_key_life_stay_at_one(tmp_path):
    kf = tmp_path / "key_file.json"
    write_key_file(kf, "k0", datetime.now(timezone.utc) + timedelta(seconds=1.0))
    n = {"i": 0}

    def token_api(url, api_key, kind, timeout=30.0):
        n["i"] += 1
        write_key_file(kf, f"k{n['i']}", datetime.now(timezone.utc) + timedelta(seconds=1.0))

    c = client(FakeTransport(), config=CFG, keys=Keys(key_file=kf), token_url="http://x", fetch_token=token_api, rows_per_request=1)
    start = time.monotonic()
    while time.monotonic() - start < 2.5:
        c.predict(make_instances(2))
        time.sleep(0.01)
    # 2.5 s of 1 s keys: 2 or 3 renewals, not one per request.
    assert 2 <= c.stats["token_renewals"] <= 3


def test_parse_java_instant():
    t = parse_expiration("2024-11-29T10:14:03.123456789Z")
    assert t == datetime(2024, 11, 29, 10, 14, 3, 123456, tzinfo=timezone.utc)
    assert parse_expiration("garbage") is None and parse_expiration(None) is None


def test_expired_key_is_renewed_before_the_request(tmp_path):
    kf = tmp_path / "key_file.json"
    write_key_file(kf, "old", datetime.now(timezone.utc) - timedelta(minutes=1))
    api = FakeTokenApi(kf)
    t = FakeTransport(accept_key="fresh-1")
    c = client(t, config=CFG, keys=Keys(key_file=kf), token_url="http://127.0.0.1:1", fetch_token=api)
    inst = make_instances(4)
    np.testing.assert_array_equal(c.predict(inst), expected(inst))
    assert api.calls == [("http://127.0.0.1:1", "api-key", "inference")]
    assert [k for k, _ in t.calls] == ["fresh-1"]


def test_refused_key_is_renewed_once_and_retried(tmp_path):
    kf = tmp_path / "key_file.json"
    # The file says the key is good for an hour, but the server refuses it.
    write_key_file(kf, "old", datetime.now(timezone.utc) + timedelta(hours=1))
    api = FakeTokenApi(kf)
    t = FakeTransport(accept_key="fresh-1")
    c = client(t, config=CFG, keys=Keys(key_file=kf), token_url="http://x", fetch_token=api, rows_per_request=2, concurrency=3)
    inst = make_instances(12)
    np.testing.assert_array_equal(c.predict(inst), expected(inst))
    # Concurrent refusals share one renewal.
    assert len(api.calls) == 1
    assert {k for k, _ in t.calls} <= {"old", "fresh-1"}
    assert sum(1 for k, _ in t.calls if k == "fresh-1") == 6


def test_key_in_the_token_answer_is_used(tmp_path):
    c = client(
        FakeTransport(accept_key="from-answer"),
        config=CFG,
        keys=Keys(inference="old", api="api-key"),
        token_url="http://x",
        fetch_token=lambda url, api, kind: {"inference": {"key": "from-answer"}},
    )
    assert c.predict(make_instances(1)).shape == (1,)


def test_refused_key_without_api_key_is_a_clear_auth_error():
    c = client(FakeTransport(accept_key="right"), config=CFG, keys=Keys(inference="wrong"), token_url="http://x")
    with pytest.raises(AuthError, match="cannot be renewed without the API key"):
        c.predict(make_instances(1))


def test_renewal_that_cannot_see_the_new_key_says_why():
    c = client(
        FakeTransport(accept_key="right"),
        config=CFG,
        keys=Keys(inference="wrong", api="api-key"),
        token_url="http://x",
        fetch_token=lambda url, api, kind: None,
    )
    with pytest.raises(AuthError, match="writes it only to key_file.json"):
        c.predict(make_instances(1))


def test_keys_from_environment_and_file(tmp_path):
    kf = tmp_path / "key_file.json"
    write_key_file(kf, "file-inf", datetime.now(timezone.utc) + timedelta(hours=1))
    env = {"DLRM_SERVE_INFERENCE_KEY": "env-inf", "DLRM_SERVE_KEY_FILE": str(kf)}
    keys = Keys.discover(env=env)
    assert keys.get("inference") == "env-inf"
    assert keys.get("management") == "mgmt" and keys.get("api") == "api-key"
    assert "env-inf" not in repr(keys)
    # After a refusal, the file's key takes over.
    assert keys.reload() and keys.get("inference") == "file-inf"
    assert Keys.discover(env={}, cwd=tmp_path).get("inference") == "file-inf"
    assert Keys.discover(env={}, cwd=tmp_path / "nowhere").empty
    with pytest.raises(AuthError, match="does not exist"):
        Keys.discover(tmp_path / "missing.json", env={})
    assert read_key_file(kf)["inference"].expires is not None


# ----- an in-process gRPC server speaking TorchServe's protocol -------------------------------
class GrpcFake:
    def __init__(self, key="inf-key", mkey="mgmt-key", unavailable=0):
        pb = protos.load()
        self.pb = pb
        self.key, self.mkey = key, mkey
        self.unavailable = unavailable
        self.inputs = []
        self.models = [{"modelName": f"m{i}", "modelUrl": f"m{i}.mar"} for i in range(5)]
        fake = self

        def authorized(context, key):
            md = dict(context.invocation_metadata())
            if md.get("authorization") != f"Bearer {key}":
                context.abort(grpc.StatusCode.PERMISSION_DENIED, TOKEN_MSG)

        class Inference(pb.inference_pb2_grpc.InferenceAPIsServiceServicer):
            def Ping(self, request, context):
                authorized(context, fake.key)
                return pb.inference_pb2.TorchServeHealthResponse(health='{\n  "status": "Healthy"\n}')

            def Predictions(self, request, context):
                authorized(context, fake.key)
                if fake.unavailable:
                    fake.unavailable -= 1
                    context.abort(grpc.StatusCode.UNAVAILABLE, "Model dlrm has no worker to serve inference request")
                fake.inputs.append(dict(request.input))
                body = request.input.get("data", request.input.get("body"))
                return pb.inference_pb2.PredictionResponse(prediction=answer(body, None))

        class Management(pb.management_pb2_grpc.ManagementAPIsServiceServicer):
            def ListModels(self, request, context):
                authorized(context, fake.mkey)
                start = request.next_page_token
                page = fake.models[start : start + request.limit]  # limit 0 lists nothing, like TorchServe
                out = {"models": page}
                if start + request.limit < len(fake.models) and request.limit:
                    out["nextPageToken"] = str(start + request.limit)
                return pb.management_pb2.ManagementResponse(msg=json.dumps(out))

            def DescribeModel(self, request, context):
                authorized(context, fake.mkey)
                if request.model_name not in [m["modelName"] for m in fake.models]:
                    context.abort(grpc.StatusCode.NOT_FOUND, f"Model not found: {request.model_name}")
                return pb.management_pb2.ManagementResponse(msg=json.dumps([{"modelName": request.model_name}]))

            def ScaleWorker(self, request, context):
                authorized(context, fake.mkey)
                return pb.management_pb2.ManagementResponse(
                    msg=json.dumps({"status": f"scaled {request.model_name} to {request.min_worker}-{request.max_worker}"})
                )

        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=8), options=[("grpc.max_receive_message_length", 64 << 20)]
        )
        pb.inference_pb2_grpc.add_InferenceAPIsServiceServicer_to_server(Inference(), self.server)
        pb.management_pb2_grpc.add_ManagementAPIsServiceServicer_to_server(Management(), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    @property
    def target(self):
        return f"127.0.0.1:{self.port}"


@pytest.fixture
def grpc_fake():
    fake = GrpcFake()
    yield fake
    fake.server.stop(None)


def grpc_client(fake, **kw):
    kw.setdefault("keys", Keys(inference=fake.key, management=fake.mkey))
    kw.setdefault("sleep", lambda s: None)
    return connect("grpc", grpc_target=fake.target, grpc_management_target=fake.target, **kw)


@pytest.mark.parametrize("payload", ["binary", "json", "tsv"])
def test_grpc_predict_through_a_fake_server(grpc_fake, payload):
    inst = make_instances(50, seed=7)
    with grpc_client(grpc_fake, config=CFG, payload=payload, rows_per_request=16) as c:
        lines = [tsv_line(x) for x in inst]
        np.testing.assert_array_equal(c.predict(lines), expected(inst))
        assert c.ping() == "Healthy"
    # "accept" asks for a float32 reply; this fake answers JSON, which the client reads too.
    assert len(grpc_fake.inputs) == 4 and all(i == {"data": i["data"], "accept": b"application/x-dlrm"} for i in grpc_fake.inputs)


def test_grpc_error_body_with_ok_status_raises_invalid_input(grpc_fake):
    inst = make_instances(3)
    inst[1]["sparse"][0] = "zz"
    with grpc_client(grpc_fake) as c:  # JSON: the server validates
        with pytest.raises(InvalidInput, match=r"instance 1, field s1: 'zz' is not a hex string"):
            c.predict(inst)


def test_grpc_wrong_token_is_permission_denied_auth_error(grpc_fake):
    with grpc_client(grpc_fake, keys=Keys(inference="nope")) as c:
        with pytest.raises(AuthError, match="Token Authorization failed"):
            c.predict(make_instances(1))
    with grpc_client(grpc_fake, keys=Keys()) as c:
        with pytest.raises(AuthError):
            c.ping()


def test_grpc_unavailable_is_retried(grpc_fake):
    grpc_fake.unavailable = 2
    inst = make_instances(5)
    with grpc_client(grpc_fake, config=CFG) as c:
        np.testing.assert_array_equal(c.predict(inst), expected(inst))
        assert c.stats["retries"] == 2


def test_grpc_big_messages_fit(grpc_fake):
    # One request of 250k rows: an 8 MB body and a 5 MB answer, past gRPC's 4 MB default.
    rng = np.random.default_rng(9)
    n = 250_000
    dense = rng.integers(0, 50, size=(n, 2)).astype(np.float32)
    sparse = rng.integers(0, 10, size=(n, 3))
    with grpc_client(grpc_fake, config=CFG, rows_per_request=n) as c:
        payload = c.encode((dense, sparse))
        assert len(payload.body) > 4 << 20
        got = c.predict((dense, sparse))
    assert got.shape == (n,)
    np.testing.assert_array_equal(got, fake_model(payload.body))


def test_grpc_list_models_reads_every_page(grpc_fake):
    with grpc_client(grpc_fake) as c:
        models = c.list_models(limit=2)
        assert [m["modelName"] for m in models] == [f"m{i}" for i in range(5)]
        assert c.describe_model("m3") == [{"modelName": "m3"}]
        with pytest.raises(ServerError, match="Model not found: zz") as e:
            c.describe_model("zz")
        assert e.value.status == 404
        assert "scaled m1 to 2-2" in c.scale_workers("m1", 2)["status"]
        with pytest.raises(ValueError):
            c.list_models(limit=0)


# ----- an in-process REST server ----------------------------------------------------------
class RestFake:
    def __init__(self, key="inf-key", unavailable=0):
        self.key, self.unavailable, self.bodies = key, unavailable, []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def reply(self, status, obj):
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def auth(self):
                if self.headers.get("Authorization") != f"Bearer {fake.key}":
                    self.reply(400, {"code": 400, "type": "InvalidKeyException", "message": TOKEN_MSG})
                    return False
                return True

            def do_GET(self):
                if self.auth():
                    self.reply(200, {"status": "Healthy"})

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if not self.auth():
                    return
                if fake.unavailable:
                    fake.unavailable -= 1
                    self.reply(503, {"code": 503, "type": "ServiceUnavailableException", "message": "no worker"})
                    return
                fake.bodies.append((self.headers.get("Content-Type"), body))
                out = json.loads(answer(body, self.headers.get("Content-Type")))
                self.reply(out.get("code", 200), out)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server.server_address[1]}"


@pytest.fixture
def rest_fake():
    fake = RestFake()
    yield fake
    fake.server.shutdown()
    fake.server.server_close()


def rest_client(fake, **kw):
    kw.setdefault("keys", Keys(inference=fake.key))
    kw.setdefault("sleep", lambda s: None)
    return connect("rest", inference_url=fake.url, management_url=fake.url, **kw)


@pytest.mark.parametrize("payload", ["binary", "json", "tsv"])
def test_rest_predict_through_a_fake_server(rest_fake, payload):
    inst = make_instances(40, seed=8)
    with rest_client(rest_fake, config=CFG, payload=payload, rows_per_request=16) as c:
        np.testing.assert_array_equal(c.predict([tsv_line(x) for x in inst]), expected(inst))
        assert c.ping() == "Healthy"
    types = {ct for ct, _ in rest_fake.bodies}
    assert types == {{"binary": "application/x-dlrm", "json": "application/json", "tsv": "text/tab-separated-values"}[payload]}


def test_rest_errors_and_retries(rest_fake):
    inst = make_instances(3)
    rest_fake.unavailable = 1
    with rest_client(rest_fake, config=CFG) as c:
        np.testing.assert_array_equal(c.predict(inst), expected(inst))
        assert c.stats["retries"] == 1
    inst[2]["dense"][1] = True
    with rest_client(rest_fake) as c:
        with pytest.raises(InvalidInput, match="instance 2, field d2"):
            c.predict(inst)
    with rest_client(rest_fake, keys=Keys(inference="bad")) as c:
        with pytest.raises(AuthError, match="Token Authorization failed"):
            c.predict(inst[:1])


def test_rest_unreachable_server_is_retried_then_unavailable():
    sleeps = []
    with connect("rest", inference_url="http://127.0.0.1:9", keys=Keys(), sleep=sleeps.append, retries=2, timeout=2) as c:
        with pytest.raises(ServerError, match="cannot reach") as e:
            c.ping()
    assert e.value.status == 503 and len(sleeps) == 2


# ----- dlrm-serve predict / models -------------------------------------------------------------
def test_cli_predict_streams_a_file_in_order(grpc_fake, tmp_path, capsys):
    inst = make_instances(257, seed=11)
    src = tmp_path / "rows.tsv"
    src.write_text("\n".join(tsv_line(x, label="0") for x in inst[:100]) + "\n\n" + "\n".join(tsv_line(x, label="1") for x in inst[100:]) + "\n")
    cfg = tmp_path / "dlrm.json"
    CFG.save(cfg)
    kf = tmp_path / "key_file.json"
    later = datetime.now(timezone.utc) + timedelta(hours=1)
    write_key_file(kf, grpc_fake.key, later, management=grpc_fake.mkey)
    port = grpc_fake.port
    common = ["--grpc-port", str(port), "--grpc-management-port", str(port), "--key-file", str(kf), "--no-progress"]
    want = [repr(float(p)) for p in expected(inst)]
    for payload in ("binary", "tsv"):
        out = tmp_path / f"p-{payload}.txt"
        extra = ["--config", str(cfg)] if payload == "binary" else []
        rc = cli_main(["predict", str(src), "--out", str(out), "--rows-per-request", "20", "--concurrency", "3", "--payload", payload, *extra, *common])
        assert rc == 0
        assert out.read_text().splitlines() == want
    assert "wrote 257 probabilities" in capsys.readouterr().err

    # JSON lines, with a bad row: the error names the file line; no output is left behind.
    jl = tmp_path / "rows.jsonl"
    bad = [dict(x) for x in inst[:30]]
    bad[25] = {"dense": [1, 2], "sparse": ["a", "b", "xyz!"]}
    jl.write_text("".join(json.dumps(x) + "\n" for x in bad))
    out = tmp_path / "bad.txt"
    rc = cli_main(["predict", str(jl), "--out", str(out), "--rows-per-request", "8", *common])
    assert rc == 2
    err = capsys.readouterr().err
    assert f"{jl}, line 26" in err and "field s3" in err and "'xyz!' is not a hex string" in err
    assert not out.exists() and not (tmp_path / "bad.txt.part").exists()


def test_cli_models_over_grpc(grpc_fake, tmp_path, capsys):
    env_keys = Keys(inference=grpc_fake.key, management=grpc_fake.mkey)
    kf = tmp_path / "key_file.json"
    write_key_file(kf, env_keys.get("inference"), datetime.now(timezone.utc) + timedelta(hours=1), management=grpc_fake.mkey)
    port = str(grpc_fake.port)
    rc = cli_main(["models", "--grpc-port", port, "--grpc-management-port", port, "--key-file", str(kf), "list", "--limit", "2"])
    assert rc == 0
    assert [m["modelName"] for m in json.loads(capsys.readouterr().out)["models"]] == [f"m{i}" for i in range(5)]
    rc = cli_main(["models", "--grpc-port", port, "--grpc-management-port", port, "--key-file", str(kf), "describe", "nope"])
    assert rc == 2 and "Model not found: nope" in capsys.readouterr().err


def test_encode_rows_rejects_what_a_format_cannot_carry():
    with pytest.raises(ValueError, match="needs the model's config"):
        encode_rows(make_instances(1), "instances", "binary", None)
    with pytest.raises(ValueError, match="tsv format carries Criteo lines"):
        encode_rows(make_instances(1), "instances", "tsv", ENC)
    with pytest.raises(ValueError, match="single str"):
        client(FakeTransport()).predict("0\t1")
    assert error_for(413, "too big").status == 413
