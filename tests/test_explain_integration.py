"""Explanations through the real TorchServe 0.12: REST /explanations and the gRPC ``explain`` input.

Uses the session server of conftest.py (dlrm.mar of a random demo-layout
model, which has no stored baseline: the all-missing fallback).  Requests
are sent one at a time, so each is a dynamic batch of its own.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from dlrm_serve.runtime.backends import load_backend
from dlrm_serve.client import connect
from dlrm_serve.errors import InvalidInput
from dlrm_serve.runtime.explain import Explainer
from dlrm_serve.io.features import FeatureEncoder
from dlrm_serve.testing.launcher import http_request

pytestmark = pytest.mark.integration

JSON = "application/json"
TSV = "text/tab-separated-values"
BIN = "application/x-dlrm"


def explain(ts, body, content_type, method: str | None = None):
    headers = {"Authorization": f"Bearer {ts.keys['inference']}", "Content-Type": content_type}
    if method is not None:
        headers["X-Explain-Method"] = method
    return http_request("POST", f"{ts.inference_url}/explanations/dlrm", data=body, headers=headers, timeout=120)


def answer(r) -> list[dict]:
    assert r.status == 200, r.text
    return r.json()["explanations"]


@pytest.fixture(scope="module")
def local(demo_artifacts):
    return Explainer(load_backend(demo_artifacts, "torch"))


def test_rest_explanations_in_every_format_equal_predictions_and_the_library(torchserve, make_rows, demo_config, local):
    rows = make_rows(8, seed=31)
    enc = FeatureEncoder(demo_config)
    got = [
        answer(explain(torchserve, json.dumps({"instances": rows.instances}), JSON)),
        answer(explain(torchserve, rows.tsv(), TSV)),
        answer(explain(torchserve, rows.binary(enc), BIN)),
    ]
    assert got[1] == got[0] and got[2] == got[0]
    first = got[0][0]
    assert list(first) == ["prediction", "baseline", "method", "delta", "attributions"]
    assert list(first["attributions"]) == list(demo_config.dense_names + demo_config.sparse_names)
    assert first["method"] == "integrated_gradients"
    preds = torchserve.predict("dlrm", json.dumps({"instances": rows.instances}), JSON).json()["predictions"]
    np.testing.assert_allclose([e["prediction"] for e in got[0]], preds, atol=1e-6, rtol=0)
    # The same code in process gives the same numbers.
    want = local.explain(enc.encode_instances(rows.instances))
    for g, w in zip(got[0], want):
        assert g["attributions"] == pytest.approx(w["attributions"], abs=1e-5)
        assert g["delta"] == pytest.approx(w["delta"], abs=1e-5)
    sums = np.array([sum(e["attributions"].values()) for e in got[0]])
    logit = lambda p: np.log(np.asarray(p) / (1 - np.asarray(p)))  # noqa: E731
    np.testing.assert_allclose(
        sums - (logit([e["prediction"] for e in got[0]]) - logit([e["baseline"] for e in got[0]])),
        [e["delta"] for e in got[0]], atol=1e-4,
    )


def test_rest_method_header_and_bad_input(torchserve, make_rows):
    rows = make_rows(3, seed=32)
    out = answer(explain(torchserve, json.dumps({"instances": rows.instances}), JSON, "feature_ablation"))
    assert {e["method"] for e in out} == {"feature_ablation"}
    r = explain(torchserve, json.dumps({"instances": [{"I1": "x"}]}), JSON)
    assert r.status == 400 and "field I1" in r.json()["message"]
    r = explain(torchserve, json.dumps({"instances": rows.instances}), JSON, "lime")
    assert r.status == 400 and "unknown explanation method 'lime'" in r.json()["message"]
    # The explain route of TorchServe's KServe v1 API reaches the same code.
    r = http_request(
        "POST", f"{torchserve.inference_url}/v1/models/dlrm:explain", data=json.dumps({"instances": rows.instances}),
        headers={"Authorization": f"Bearer {torchserve.keys['inference']}", "Content-Type": JSON}, timeout=120,
    )
    assert r.status == 200 and len(r.json()["explanations"]) == 3
    big = make_rows(300, seed=33)
    r = explain(torchserve, big.tsv(), TSV)
    assert r.status == 400 and "are explained per request" in r.json()["message"]


@pytest.mark.parametrize("transport", ["grpc", "rest"])
def test_client_explain_over_grpc_and_rest(torchserve, make_rows, demo_artifacts, transport):
    rows = make_rows(6, seed=34)
    with connect(
        transport, inference_url=torchserve.inference_url, management_url=torchserve.management_url,
        grpc_target=torchserve.grpc_inference_target, grpc_management_target=torchserve.grpc_management_target,
        key_file=torchserve.start_dir / "key_file.json", config=demo_artifacts, concurrency=1,
    ) as client:
        out = client.explain(rows.instances)
        preds = client.predict(rows.instances)
        ablation = client.explain(rows.instances[:2], method="feature_ablation")
        with pytest.raises(InvalidInput, match="field C3"):
            client.explain([{"C3": 12.5}], payload="json")
    assert len(out) == 6 and len(ablation) == 2
    np.testing.assert_allclose([e["prediction"] for e in out], preds, atol=1e-6, rtol=0)
    assert {e["method"] for e in ablation} == {"feature_ablation"}
