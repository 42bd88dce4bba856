"""Predictor: per-request decoding, one forward pass, one reply per request."""

import json

import numpy as np
import pytest
import torch

from dlrm_serve.artifacts import save_artifacts
from dlrm_serve.runtime.backends import load_backend
from dlrm_serve.io.codecs import encode_binary
from dlrm_serve.config import DLRMConfig
from dlrm_serve.model.dlrm import DLRM
from dlrm_serve.serve.serving import Predictor, Request

from test_model import reference_logits, reference_pooled

CFG = DLRMConfig(
    table_sizes=(50, 7, 300), embedding_dim=4, bottom_mlp=(8, 4), top_mlp=(8, 1),
    dense_names=("I1", "I2"), sparse_names=("C1", "C2", "C3"),
)


@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("art")
    save_artifacts(DLRM(CFG), path)
    return Predictor(load_backend(path), max_rows=100)


def rows(n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        out.append({
            "dense": [int(rng.integers(-2, 50)), None if rng.random() < 0.3 else float(rng.random())],
            "sparse": [f"{int(rng.integers(0, 2**32)):08x}", int(rng.integers(0, 7)), [int(v) for v in rng.integers(0, 300, int(rng.integers(0, 3)))]],
        })
    return out


def test_mixed_batch_good_requests_unaffected(predictor):
    good = rows(10)
    alone = [predictor.handle([Request(r, "application/json")])[0][0].body["predictions"][0] for r in good]
    reqs = [
        Request({"instances": good[:4]}, "application/json"),
        Request(b"{bad", "application/json"),
        Request({"dense": [1, 2], "sparse": [0, 0, 300]}, "application/json"),
        Request(encode_binary(predictor.encoder.raw_instances(good[4:])), "application/x-dlrm"),
        Request(b"", None),
    ]
    replies, stats = predictor.handle(reqs)
    assert [r.status for r in replies] == [200, 400, 400, 200, 400]
    # Batched GEMMs may round differently from single-row ones: equal to 1e-6.
    np.testing.assert_allclose(replies[0].body["predictions"], alone[:4], atol=1e-6, rtol=0)
    np.testing.assert_allclose(replies[3].body["predictions"], alone[4:], atol=1e-6, rtol=0)
    assert replies[2].body == {
        "code": 400, "type": "InvalidInput",
        "message": "instance 0, field C3: row id 300 is out of range for a table of 300 rows (valid ids are 0..299)",
    }
    assert stats.invalid == 3 and stats.rows == 10 and stats.requests == 5


def by_hand(row):
    """One raw row as the config says to read it, without the library's encoder:
    dense (None -> 0, log1p of the non-negative part) and local ids per table."""
    dense = [0.0 if v is None else float(np.float32(v)) for v in row["dense"]]
    if CFG.dense_transform == "log1p":
        dense = [float(np.float32(np.log1p(max(v, 0.0)))) for v in dense]
    hex_id, index, bag = row["sparse"]
    return dense, [[int(hex_id, 16) % CFG.table_sizes[0]], [index], list(bag)]


def test_predictions_equal_the_model(predictor):
    """The Predictor's answer against a reference forward pass of the same
    weights (per-table EmbeddingBags and plain matmuls), fed hand-decoded rows."""
    data = rows(64, seed=1)
    reply = predictor.handle([Request({"instances": data}, "application/json")])[0][0]
    decoded = [by_hand(r) for r in data]
    model = predictor.backend.model
    dense = torch.tensor([d for d, _ in decoded], dtype=torch.float32)
    with torch.no_grad():
        want = torch.sigmoid(reference_logits(model, dense, reference_pooled(model, [ids for _, ids in decoded])))
    np.testing.assert_allclose(reply.body["predictions"], want.numpy(), atol=1e-6, rtol=0)
    assert json.loads(json.dumps(reply.body)) == reply.body


def test_row_alone_equals_row_in_batch(predictor):
    data = rows(100, seed=2)
    batch = predictor.handle([Request({"instances": data}, "application/json")])[0][0].body["predictions"]
    for i in (0, 37, 99):
        alone = predictor.handle([Request(data[i], "application/json")])[0][0].body["predictions"]
        assert abs(alone[0] - batch[i]) <= 1e-6


def test_too_many_rows_is_a_400(predictor):
    replies, _ = predictor.handle([Request({"instances": rows(101)}, "application/json")])
    assert replies[0].status == 400 and "at most 100" in replies[0].body["message"]


def test_the_test_only_hang_hook_is_off_unless_a_marker_is_set(monkeypatch):
    import time as time_module

    from dlrm_serve.serve import serving

    slept = []
    monkeypatch.setattr(time_module, "sleep", slept.append)
    reqs = [Request("1\t2\tmarker-x\n", "text/plain"), Request(b"marker-x", None), Request({"instances": []}, "application/json")]
    serving.hang_if_marked(reqs, "")  # the default of every built archive
    assert slept == []
    assert serving.read_settings({})["fault_hang_on"] == ""
    serving.hang_if_marked(reqs[2:], "marker-x")  # decoded JSON bodies never match
    assert slept == []
    serving.hang_if_marked(reqs[1:2], "marker-x", seconds=7.0)
    serving.hang_if_marked(reqs[:1], "marker-x", seconds=8.0)
    assert slept == [7.0, 8.0]
