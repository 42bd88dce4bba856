"""Explanations in process: completeness, exact ablation, formats, predictions, errors, int8, ONNX, truth.

A small DLRM in the Criteo layout is trained for a few seconds on synthetic
data from the planted model (module fixture), so its attributions can be
compared with the planted truth.  The real TorchServe routes are tested in
test_explain_integration.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dlrm_serve import cli
from dlrm_serve.artifacts import check_artifacts, load_weights, save_artifacts
from dlrm_serve.runtime.backends import load_backend
from dlrm_serve.io.codecs import encode_binary
from dlrm_serve.config import DEMO_TABLE_SIZES, DLRMConfig
from dlrm_serve.errors import ArtifactError, DLRMServeError
from dlrm_serve.runtime.explain import Explainer
from dlrm_serve.offline.explain_tools import global_importance, planted_check, spearman
from dlrm_serve.io.features import FeatureEncoder
from dlrm_serve.model.dlrm import DLRM
from dlrm_serve.model.quantize import quantize_artifacts
from dlrm_serve.serve.serving import Predictor, Request, request_of
from dlrm_serve.offline.train import TrainOptions, train

SEED = 0
TINY = DLRMConfig(
    table_sizes=tuple(min(s, 500) for s in DEMO_TABLE_SIZES),
    embedding_dim=8,
    bottom_mlp=(16, 8),
    top_mlp=(32, 1),
    name="tiny",
)


def logit(p):
    p = np.asarray(p, dtype=np.float64)
    return np.log(p / (1.0 - p))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained on 30k planted rows (about 10 s on a quiet 2-core machine)."""
    root = tmp_path_factory.mktemp("explain")
    TINY.save(root / "tiny.json")
    options = TrainOptions(
        out=str(root / "art"), config=str(root / "tiny.json"), rows=30_000, seed=SEED, data_dir=str(root / "data"),
        threads=1, batch_size=128, lr=3e-3, progress=False,
    )
    train(options, log=lambda _m: None)
    return root / "art"


@pytest.fixture(scope="module")
def backend(trained):
    return load_backend(trained, "torch")


@pytest.fixture(scope="module")
def explainer(backend):
    return Explainer(backend)


def instances(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        dense = [None if rng.random() < 0.15 else int(rng.integers(0, 500)) for _ in TINY.dense_names]
        sparse = [None if rng.random() < 0.1 else f"{int(rng.integers(0, 2**32)):08x}" for _ in TINY.sparse_names]
        out.append({"dense": dense, "sparse": sparse})
    return out


def tsv(rows: list[dict]) -> str:
    return "".join(
        "\t".join(["" if v is None else str(v) for v in r["dense"]] + ["" if v is None else v for v in r["sparse"]]) + "\n"
        for r in rows
    )


def named(row: dict) -> dict:
    out = {n: v for n, v in zip(TINY.dense_names, row["dense"]) if v is not None}
    out.update({n: v for n, v in zip(TINY.sparse_names, row["sparse"]) if v is not None})
    return out


# ----- the baseline ---------------------------------------------------------------
def test_training_stores_the_mean_input_baseline(trained, backend, explainer):
    tensors = load_weights(trained)
    assert tensors["explain.dense_baseline"].shape == (13,)
    assert tensors["explain.sparse_baseline"].shape == (26, 8)
    assert explainer.baseline_source == "artifacts"
    check_artifacts(trained)  # the extra tensors are expected ones
    # Dense: the mean transformed count is positive (counts are mostly > 0), not the all-zero input.
    assert (tensors["explain.dense_baseline"] > 0.3).all()
    # The baseline scores near the click rate of the data (about 0.25), unlike the all-missing row.
    p_base = 1 / (1 + np.exp(-explainer.baseline_logit))
    assert 0.12 < p_base < 0.4


def test_wrong_or_unknown_extra_tensors_are_still_reported(tmp_path):
    torch.manual_seed(0)
    model = DLRM(TINY)
    save_artifacts(model, tmp_path, extra={"explain.dense_baseline": torch.zeros(12)})
    with pytest.raises(ArtifactError, match="explain.dense_baseline"):
        check_artifacts(tmp_path)
    save_artifacts(model, tmp_path, extra={"explain.other": torch.zeros(3)})
    with pytest.raises(ArtifactError, match="unexpected tensor 'explain.other'"):
        check_artifacts(tmp_path)


def test_artifacts_without_a_baseline_fall_back_to_the_all_missing_row(tmp_path):
    torch.manual_seed(0)
    save_artifacts(DLRM(TINY), tmp_path)
    ex = Explainer(load_backend(tmp_path, "torch"))
    assert ex.baseline_source == "all-missing fallback"
    assert ex.baseline_logit == pytest.approx(ex.missing_logit)
    out = ex.explain(FeatureEncoder(TINY).encode_instances(instances(3)))
    assert len(out) == 3 and out[0]["baseline"] == pytest.approx(1 / (1 + np.exp(-ex.missing_logit)), abs=1e-6)


# ----- completeness and exactness -----------------------------------------------------------
def test_attributions_add_up_to_the_logit_difference(backend, explainer):
    batch = FeatureEncoder(TINY).encode_instances(instances(60, seed=1))
    out = explainer.explain(batch)
    assert [list(e["attributions"]) for e in out] == [list(TINY.dense_names + TINY.sparse_names)] * 60
    # The logits computed here independently of the explainer: the model's own forward.
    with torch.no_grad():
        offsets = None if batch.offsets is None else torch.from_numpy(batch.offsets)
        z = backend.model.logits(torch.from_numpy(batch.dense), torch.from_numpy(batch.indices), offsets).double().numpy()
    z_base = explainer.baseline_logit
    sums = np.array([sum(e["attributions"].values()) for e in out])
    deltas = np.array([e["delta"] for e in out])
    np.testing.assert_allclose(sums - (z - z_base), deltas, atol=2e-4)
    # N_STEPS was measured on the demo model (95% of rows within 0.01); on this tiny model
    # most rows are; many more points converge further.
    assert np.median(np.abs(deltas)) < 0.01 and np.mean(np.abs(deltas) < 0.01) >= 0.7, np.abs(deltas)
    fine = Explainer(backend, n_steps=256).explain(batch)
    assert max(abs(e["delta"]) for e in fine) < 0.01
    assert np.abs([e["delta"] for e in fine]).mean() < np.abs(deltas).mean()


def test_feature_ablation_is_exact_occlusion_to_the_missing_value(backend, explainer):
    rows = instances(4, seed=2)
    enc = FeatureEncoder(TINY)
    out = explainer.explain(enc.encode_instances(rows), "feature_ablation")
    for i, row in enumerate(rows):
        p = backend.predict(enc.encode_instances([row]))[0]
        for name in ("I3", "C5", "C20"):
            missing = named(row)
            missing.pop(name, None)
            q = backend.predict(enc.encode_instances([missing]))[0]
            assert out[i]["attributions"][name] == pytest.approx(float(logit(p) - logit(q)), abs=2e-4)
        assert out[i]["method"] == "feature_ablation"
        # A feature that is already missing changes nothing.
        for name, value in zip(TINY.dense_names + TINY.sparse_names, row["dense"] + row["sparse"]):
            if value is None:
                assert out[i]["attributions"][name] == 0.0


# ----- serving: formats, predictions, errors ------------------------------------------------
def test_every_format_gives_the_same_explanations_and_predictions(backend):
    predictor = Predictor(backend)
    rows = instances(5, seed=3)
    enc = FeatureEncoder(TINY)
    bodies = [
        ({"instances": rows}, "application/json"),
        (json.dumps({"instances": rows}).encode(), "application/json"),
        (tsv(rows), "text/tab-separated-values"),
        (encode_binary(enc.raw_instances(rows)), "application/x-dlrm"),
        (encode_binary(enc.raw_instances(rows)), None),  # sniffed, as gRPC bytes are
    ]
    replies, _ = predictor.handle([Request(b, t, explain=True) for b, t in bodies])
    answers = [r.body["explanations"] for r in replies]
    assert all(r.status == 200 for r in replies)
    assert all(a == answers[0] for a in answers[1:])
    # One row alone: the same up to float rounding (GEMMs of another batch size round differently).
    named_replies, _ = predictor.handle([Request(named(r), "application/json", explain=True) for r in rows])
    for reply, want in zip(named_replies, answers[0]):
        got = reply.body["explanations"][0]
        assert got["prediction"] == pytest.approx(want["prediction"], abs=1e-6)
        assert got["attributions"] == pytest.approx(want["attributions"], abs=1e-5)
    # prediction == what /predictions answers for the same request
    (pred,), _ = predictor.handle([Request({"instances": rows}, "application/json")])
    np.testing.assert_allclose([e["prediction"] for e in answers[0]], pred.body["predictions"], atol=1e-6, rtol=0)


def test_explain_and_predict_requests_share_a_batch(backend):
    predictor = Predictor(backend)
    rows = instances(3, seed=4)
    replies, stats = predictor.handle([
        Request({"instances": rows}, "application/json"),
        Request({"instances": rows}, "application/json", explain=True, method="feature_ablation"),
        Request({"instances": rows}, "application/json", explain=True),
    ])
    assert list(replies[0].body) == ["predictions"]
    assert replies[1].body["explanations"][0]["method"] == "feature_ablation"
    assert replies[2].body["explanations"][0]["method"] == "integrated_gradients"
    assert [e["prediction"] for e in replies[2].body["explanations"]] == replies[0].body["predictions"]
    assert stats.rows == 9 and stats.invalid == 0


def test_bad_explain_requests_get_a_400_naming_the_problem(backend):
    predictor = Predictor(backend, explain_max_rows=10)
    ok = {"instances": instances(2)}
    too_many = {"instances": instances(11)}
    bad_field = {"instances": [{"I1": "abc"}]}
    replies, stats = predictor.handle([
        Request(bad_field, "application/json", explain=True),
        Request(too_many, "application/json", explain=True),
        Request(ok, "application/json", explain=True, method="shap"),
        Request("1\t2\n", "text/tab-separated-values", explain=True),
        Request(ok, "application/json", explain=True),
    ])
    assert [r.status for r in replies] == [400, 400, 400, 400, 200]
    assert "instance 0, field I1" in replies[0].body["message"]
    assert "at most 10 are explained per request" in replies[1].body["message"]
    assert "unknown explanation method 'shap'" in replies[2].body["message"]
    assert replies[3].body["type"] == "InvalidInput"
    assert stats.invalid == 4


def test_the_grpc_explain_input_and_the_method_header_mark_a_request():
    class Ctx:  # TorchServe's context as request_of reads it: no explain header (gRPC)
        def get_request_header(self, idx, name):
            return None

    class Rest(Ctx):  # POST /explanations with X-Explain-Method
        def get_all_request_header(self, idx):
            return {"explain": "True", "X-Explain-Method": "feature_ablation", "Content-Type": "text/plain"}

    req = request_of({"body": "1\t2"}, Rest(), 0)
    assert req.explain and req.method == "feature_ablation" and req.content_type == "text/plain"

    req = request_of({"data": bytearray(b"1\t2"), "explain": bytearray(b"true")}, Ctx(), 0)
    assert req.explain and req.body == bytearray(b"1\t2") and req.method is None
    req = request_of({"body": b"x", "explain": b"True", "method": b"feature_ablation"}, Ctx(), 0)
    assert req.explain and req.method == "feature_ablation"
    assert not request_of({"data": b"x", "explain": b"false"}, Ctx(), 0).explain
    assert not request_of({"data": b"x"}, Ctx(), 0).explain
    with pytest.raises(DLRMServeError, match="'explain' must be true or false"):
        request_of({"data": b"x", "explain": b"maybe"}, Ctx(), 0)


def test_an_onnx_archive_answers_explain_requests_with_a_400(trained, tmp_path):
    from dlrm_serve.runtime.export import export_onnx

    import shutil

    art = tmp_path / "art"
    shutil.copytree(trained, art)
    export_onnx(art)
    predictor = Predictor(load_backend(art, "onnxruntime"))
    replies, _ = predictor.handle([
        Request({"instances": instances(2)}, "application/json", explain=True),
        Request({"instances": instances(2)}, "application/json"),
    ])
    assert replies[0].status == 400
    assert "onnxruntime backend cannot explain" in replies[0].body["message"]
    assert "--backend torch" in replies[0].body["message"]
    assert replies[1].status == 200


def test_int8_tables_explain_with_the_same_baseline(trained, tmp_path, explainer):
    quantize_artifacts(trained, tmp_path / "int8", progress=False)
    ex8 = Explainer(load_backend(tmp_path / "int8", "torch"))
    assert ex8.baseline_source == "artifacts"
    batch = FeatureEncoder(TINY).encode_instances(instances(20, seed=5))
    out8, out32 = ex8.explain(batch), explainer.explain(batch)
    assert np.mean([abs(e["delta"]) < 0.02 for e in out8]) >= 0.8
    a8 = np.array([list(e["attributions"].values()) for e in out8])
    a32 = np.array([list(e["attributions"].values()) for e in out32])
    assert np.abs(a8 - a32).max() < 0.05  # int8 rows differ by half a quantisation step


# ----- the planted truth ---------------------------------------------------------------
def test_spearman_matches_hand_computed_ranks():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.8)


def test_attributions_rank_features_like_the_planted_model(explainer):
    r = planted_check(explainer, SEED, rows=500)
    assert r["spearman"] >= 0.6, r["spearman"]
    # Features without a planted effect come out in the bottom half of the 39.
    assert r["null_features"], "the planted model has features without effect"
    assert min(r["null_features"].values()) > 39 // 2, r["null_features"]


# ----- the command line ----------------------------------------------------------------
def test_explain_command_writes_explanations_and_a_global_chart(trained, tmp_path, explainer):
    rows = instances(30, seed=6)
    src = tmp_path / "rows.tsv"
    src.write_text(tsv(rows))
    out = tmp_path / "explained.jsonl"
    assert cli.main(["explain", "--artifacts", str(trained), str(src), "--out", str(out)]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    want = explainer.explain(FeatureEncoder(TINY).encode_instances(rows))
    assert len(lines) == 30
    for got, exp in zip(lines, want):
        assert got["prediction"] == exp["prediction"]
        assert got["attributions"] == pytest.approx(exp["attributions"], abs=1e-6)
    table = tmp_path / "global.md"
    assert cli.main(["explain", "--artifacts", str(trained), str(src), "--out", str(table), "--global", "20"]) == 0
    top = global_importance(want[:20])
    text = table.read_text()
    assert "over 20 rows" in text and f"| 1 | {top[0][0]} |" in text
    assert (tmp_path / "global.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cli.main(["explain", "--artifacts", str(trained), str(src), "--out", str(out), "--method", "nope"]) == 2



def test_multi_hot_bags_are_explained_as_their_pooled_vector(backend, explainer):
    rows = instances(4, seed=7)
    rows[0]["sparse"][2] = ["0a1b2c3d", "1f2e3d4c", "0a1b2c3d"]  # a bag of three ids, one repeated
    rows[1]["sparse"][5] = []  # the empty bag: missing
    batch = FeatureEncoder(TINY).encode_instances(rows)
    assert batch.offsets is not None
    out = explainer.explain(batch)
    np.testing.assert_allclose([e["prediction"] for e in out], backend.predict(batch), atol=1e-6, rtol=0)
    sums = np.array([sum(e["attributions"].values()) for e in out])
    want = logit([e["prediction"] for e in out]) - explainer.baseline_logit
    np.testing.assert_allclose(sums - want, [e["delta"] for e in out], atol=2e-4)
    ablation = explainer.explain(batch, "feature_ablation")
    assert ablation[1]["attributions"]["C6"] == 0.0  # the empty bag is already the missing value
    assert ablation[0]["attributions"]["C3"] != 0.0


def test_baseline_command_gives_artifacts_without_one_the_mean_input_baseline(trained, tmp_path):
    torch.manual_seed(0)
    art = tmp_path / "imported"
    save_artifacts(DLRM(TINY), art)
    rows = instances(40, seed=8)
    src = tmp_path / "rows.tsv"
    src.write_text(tsv(rows))
    assert cli.main(["baseline", "--artifacts", str(art), str(src), "--rows", "30"]) == 0
    check_artifacts(art)
    ex = Explainer(load_backend(art, "torch"))
    assert ex.baseline_source == "artifacts"
    batch = FeatureEncoder(TINY).encode_instances(rows[:30])
    np.testing.assert_allclose(ex.baseline_dense[0].numpy(), batch.dense.mean(axis=0), rtol=1e-5, atol=1e-6)
    # C1's baseline: the mean of its pooled embeddings over the 30 rows (missing = zeros).
    with torch.no_grad():
        pooled = ex.model.sparse_arch(torch.from_numpy(batch.indices), None if batch.offsets is None else torch.from_numpy(batch.offsets), 30)
    np.testing.assert_allclose(ex.baseline_sparse[0, 0].numpy(), pooled[:, 0].mean(dim=0).numpy(), atol=1e-6)


def test_explaining_works_inside_inference_mode(explainer):
    batch = FeatureEncoder(TINY).encode_instances(instances(3, seed=9))
    want = explainer.explain(batch)
    with torch.inference_mode():
        assert explainer.explain(batch) == want
        assert explainer.explain(batch, "feature_ablation")[0]["method"] == "feature_ablation"
