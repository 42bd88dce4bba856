"""dlrm-serve loadgen: real MLPerf LoadGen runs, in process and against the session's TorchServe.

Each run is a short smoke run (a few seconds) and must be VALID in LoadGen's
own summary file; the accuracy run's logged answers must be the fp32
backend's probabilities (to 1e-6) for every row of every user.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("mlperf_loadgen")

from dlrm_serve.cli import main  # noqa: E402
from dlrm_serve.loadgen.accuracy import read_accuracy_log  # noqa: E402
from dlrm_serve.loadgen.runner import read_summary, run_loadgen  # noqa: E402
from dlrm_serve.loadgen.samples import MAX_ROWS, MIN_ROWS, build_query_set, sample_sizes  # noqa: E402


def test_sample_sizes_follow_the_documented_stand_in():
    sizes = sample_sizes(20000, seed=0)
    assert sizes.min() >= MIN_ROWS and sizes.max() <= MAX_ROWS
    assert 260 <= sizes.mean() <= 280  # MLPerf's users average about 270 rows
    assert np.array_equal(sizes, sample_sizes(20000, seed=0))


def test_offline_in_process_is_valid(demo_artifacts, tmp_path):
    out = tmp_path / "offline"
    rc = main([
        "loadgen", "--scenario", "offline", "--sut", "inprocess", "--artifacts", str(demo_artifacts),
        "--duration-ms", "1500", "--samples", "128", "--out", str(out), "--no-progress",
    ])
    assert rc == 0
    summary = read_summary(out / "mlperf_log_summary.txt")
    assert summary["Scenario"] == "Offline"
    assert summary["Result is"] == "VALID"
    assert float(summary["Samples per second"]) > 0
    assert (out / "mlperf_log_detail.txt").stat().st_size > 0
    result = json.loads((out / "loadgen_result.json").read_text())
    assert result["valid"] and result["errors"] == 0 and result["smoke"]


def test_accuracy_log_holds_the_backends_probabilities(demo_artifacts, demo_backend, tmp_path):
    out = tmp_path / "accuracy"
    result = run_loadgen(
        "offline", "inprocess", out, artifacts=demo_artifacts, accuracy=True, samples=32, precision="fp32", progress=False,
    )
    assert result["errors"] == 0
    answers = read_accuracy_log(out / "mlperf_log_accuracy.json")
    assert sorted(answers) == list(range(32))  # accuracy mode answers every user once
    from dlrm_serve.io.codecs import decode_binary
    from dlrm_serve.io.features import FeatureEncoder

    data = next(out.glob("loadgen-data-*.tsv"))
    qset = build_query_set(demo_backend.config, data, 32)
    encoder = FeatureEncoder(demo_backend.config)
    for i in range(32):
        want = demo_backend.predict(decode_binary(qset.bodies[i], encoder))
        np.testing.assert_allclose(answers[i], want, rtol=0, atol=1e-6)
    assert 0.0 <= result["accuracy"]["auc"] <= 1.0 and result["accuracy"]["rows"] == qset.rows


@pytest.mark.integration
def test_server_over_grpc_is_valid(torchserve, demo_artifacts, tmp_path):
    out = tmp_path / "server"
    connection = dict(
        grpc_target=torchserve.grpc_inference_target, management_url=torchserve.management_url,
        key_file=torchserve.start_dir / "key_file.json",
    )
    result = run_loadgen(
        # A modest rate: 2 cores shared with other work give tail latencies
        # that LoadGen's early-stopping p99 estimate must still place under 60 ms.
        "server", "grpc", out, config=demo_artifacts, target_qps=50, duration_ms=1500, samples=128,
        connection=connection, concurrency=8, progress=False,
    )
    summary = read_summary(out / "mlperf_log_summary.txt")
    assert summary["Scenario"] == "Server"
    assert summary["Result is"] == "VALID", (result, summary)
    assert float(summary["99.00 percentile latency (ns)"]) <= 60e6
    assert result["errors"] == 0


def test_binary_reply_holds_exactly_the_json_replys_probabilities(demo_backend, make_rows):
    from dlrm_serve.client.payloads import parse_predictions
    from dlrm_serve.io.features import FeatureEncoder
    from dlrm_serve.serve.serving import Predictor, Request

    predictor = Predictor(demo_backend)
    body = make_rows(40, seed=3).binary(FeatureEncoder(demo_backend.config))
    (as_json, as_bytes), _ = predictor.handle([
        Request(body, "application/x-dlrm"), Request(body, "application/x-dlrm", accept="application/x-dlrm, */*;q=0.1"),
    ])
    assert as_json.content_type == "application/json" and as_bytes.content_type == "application/x-dlrm"
    assert isinstance(as_bytes.text(), bytes) and as_bytes.text()[:4] == b"DLRP"
    want = parse_predictions(as_json.text().encode(), 40)
    np.testing.assert_array_equal(parse_predictions(as_bytes.text(), 40), want)  # float32 both ways: exact


@pytest.mark.integration
@pytest.mark.parametrize("transport", ["rest", "grpc"])
def test_torchserve_answers_float32_bytes_when_asked(torchserve, demo_artifacts, expected, make_rows, transport):
    from dlrm_serve.client import connect

    rows = make_rows(30, seed=5)
    with connect(
        transport, inference_url=torchserve.inference_url, management_url=torchserve.management_url,
        grpc_target=torchserve.grpc_inference_target, grpc_management_target=torchserve.grpc_management_target,
        key_file=torchserve.start_dir / "key_file.json", config=demo_artifacts,
    ) as client:
        payload = client.encode(rows.instances)
        raw = client.transport.predict("dlrm", None, payload, client.keys.get("inference"))
        assert bytes(raw[:4]) == b"DLRP"  # the client asks for float32 bytes by default
        np.testing.assert_allclose(client.predict(rows.instances), expected(rows.instances), rtol=0, atol=1e-6)
