"""The precision option: fp32 | bf16 | auto, from settings to the served answers.

Tolerance: bf16 rounds every GEMM input to 8 significant bits, so its
probabilities may differ from fp32 by up to ``BF16_ATOL`` (measured: at
most 5.1e-3 over 200k rows of a trained demo model, 2.1e-3 on the random
demo model here; docs/precision.md).  bf16 against bf16 (server against
in-process, one row against a batch) agrees to 1e-6.
"""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
import torch
import yaml

from conftest import build_archive
from dlrm_serve import cli
from dlrm_serve.runtime.backends import PRECISIONS, load_backend, native_bf16, resolve_precision
from dlrm_serve.io.features import FeatureEncoder
from dlrm_serve.serve.serving import Predictor, Request, read_settings

BF16_ATOL = 1e-2


@pytest.fixture(scope="module")
def bf16_backend(demo_artifacts):
    return load_backend(demo_artifacts, "torch", precision="bf16", threads=2)


def max_dp(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


def bf16_close(got, fp32):
    """Within the bf16 tolerance of fp32, and not fp32 itself (so bf16 really ran)."""
    dp = max_dp(got, fp32)
    assert 1e-6 < dp <= BF16_ATOL, dp


# ----- settings and validation --------------------------------------------------------
def test_settings_default_to_fp32_and_accept_every_precision():
    assert read_settings({})["precision"] == "fp32"  # archives without the key serve as before
    for p in PRECISIONS:
        assert read_settings({"dlrm": {"precision": p}})["precision"] == p


@pytest.mark.parametrize("bad", ["fp16", "BF16", "", 16, None, True])
def test_a_bad_precision_is_named(bad, demo_artifacts):
    with pytest.raises(ValueError, match=r"dlrm\.precision.*must be one of auto, fp32, bf16") as e:
        read_settings({"dlrm": {"precision": bad}})
    assert repr(bad) in str(e.value)
    with pytest.raises(ValueError, match="precision must be one of") as e:
        load_backend(demo_artifacts, "torch", precision=bad)
    assert repr(bad) in str(e.value)


def test_onnxruntime_is_fp32_only(demo_artifacts):
    # Refused before anything is loaded: no dlrm.onnx is needed to get the message.
    with pytest.raises(ValueError, match="onnxruntime backend runs fp32 only.*torch backend"):
        load_backend(demo_artifacts, "onnxruntime", precision="bf16")


def test_auto_follows_the_cpu():
    # torch's own CPU probe, a second opinion on the /proc/cpuinfo flags native_bf16 reads.
    assert native_bf16() == (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    assert resolve_precision("auto") == ("bf16" if native_bf16() else "fp32")
    assert resolve_precision("fp32") == "fp32" and resolve_precision("bf16") == "bf16"


# ----- the bf16 model ------------------------------------------------------------------
def test_bf16_weights_are_cast_once_at_load(demo_artifacts, bf16_backend, demo_backend):
    model = bf16_backend.model
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(m.weight.dtype == m.bias.dtype == torch.bfloat16 for m in linears)
    # The tables stay the float32 tensor mapped from the file, shared with other workers.
    assert model.sparse_arch.weight.dtype == torch.float32
    described = bf16_backend.describe()
    assert described["precision"] == "bf16" and described["bf16_tables"] is False
    assert demo_backend.describe()["precision"] == "fp32"
    halved = load_backend(demo_artifacts, precision="bf16", bf16_tables=True)
    table = halved.model.sparse_arch.weight
    assert table.dtype == torch.bfloat16
    assert table.nbytes * 2 == model.sparse_arch.weight.nbytes


def test_bf16_is_close_to_fp32_and_independent_of_the_batch(bf16_backend, demo_backend, make_rows, demo_config):
    encoder = FeatureEncoder(demo_config)
    rows = make_rows(600, seed=5).instances  # >= 512 rows: the stacked lookup path too
    whole = bf16_backend.predict(encoder.encode_instances(rows))
    assert whole.dtype == np.float32
    bf16_close(whole, demo_backend.predict(encoder.encode_instances(rows)))
    ones = np.concatenate([bf16_backend.predict(encoder.encode_instances(rows[i : i + 1])) for i in range(20)])
    np.testing.assert_allclose(ones, whole[:20], atol=1e-6, rtol=0)
    with_tables = load_backend(bf16_backend.artifacts_dir, precision="bf16", bf16_tables=True)
    assert max_dp(with_tables.predict(encoder.encode_instances(rows)), whole) <= BF16_ATOL


def test_bf16_over_int8_tables(demo_artifacts, make_rows, demo_config, tmp_path):
    from dlrm_serve.model.quantize import quantize_artifacts

    quantize_artifacts(demo_artifacts, tmp_path, progress=False)
    encoder = FeatureEncoder(demo_config)
    batch = encoder.encode_instances(make_rows(30, seed=4).instances)
    bf16 = load_backend(tmp_path, precision="bf16", bf16_tables=True)
    assert bf16.model.sparse_arch.codes.dtype == torch.uint8  # int8 tables are left as they are
    bf16_close(bf16.predict(batch), load_backend(tmp_path).predict(batch))


def test_every_input_route_in_bf16(bf16_backend, demo_backend, make_rows, demo_config):
    """JSON (positional and named), TSV and binary through serving.Predictor: bf16 against fp32."""
    encoder = FeatureEncoder(demo_config)
    rows = make_rows(40, seed=9)
    bodies = [
        Request({"instances": rows.instances}, "application/json"),
        Request({"instances": [rows.named(i) for i in range(40)]}, "application/json"),
        Request(rows.tsv().encode(), "text/tab-separated-values"),
        Request(rows.binary(encoder), "application/x-dlrm"),
    ]
    got = {}
    for name, backend in (("bf16", bf16_backend), ("fp32", demo_backend)):
        replies, _ = Predictor(backend).handle(bodies)
        assert [r.status for r in replies] == [200] * 4, [r.body for r in replies]
        got[name] = [r.body["predictions"] for r in replies]
    for route in range(4):
        bf16_close(got["bf16"][route], got["fp32"][route])
        np.testing.assert_allclose(got["bf16"][route], got["bf16"][0], atol=1e-6, rtol=0)


def test_score_precision(demo_artifacts, make_rows, tmp_path, capsys):
    rows = make_rows(30, seed=2)
    tsv = tmp_path / "rows.tsv"
    tsv.write_text(rows.tsv())
    out = {}
    for p in ("fp32", "bf16"):
        assert cli.main(["score", "--artifacts", str(demo_artifacts), str(tsv), "--out", str(tmp_path / p),
                         "--precision", p]) == 0
        out[p] = np.loadtxt(tmp_path / p)
    bf16_close(out["bf16"], out["fp32"])
    with pytest.raises(SystemExit) as e:
        cli.main(["score", "--artifacts", str(demo_artifacts), str(tsv), "--out", str(tmp_path / "x"),
                  "--precision", "fp16"])
    assert e.value.code == 2 and "invalid choice: 'fp16'" in capsys.readouterr().err


# ----- build_mar.sh and TorchServe ----------------------------------------------------------
def test_build_mar_precision_flag(tmp_path, demo_artifacts):
    import subprocess

    from conftest import ROOT

    def run(*args):
        return subprocess.run(["bash", str(ROOT / "build_mar.sh"), "--artifacts", str(demo_artifacts),
                               "--model-store", str(tmp_path), *args], capture_output=True, text=True)

    r = run("--precision", "fp16")
    assert r.returncode == 2 and "--precision must be auto, fp32 or bf16, got 'fp16'" in r.stderr
    r = run("--backend", "onnxruntime", "--precision", "bf16")
    assert r.returncode == 2 and "--precision bf16 needs --backend torch" in r.stderr
    r = run("--model-name", "auto_default")  # no --precision: auto
    assert r.returncode == 0, r.stderr
    with zipfile.ZipFile(tmp_path / "auto_default.mar") as z:
        assert yaml.safe_load(z.read("model-config.yaml"))["dlrm"]["precision"] == "auto"


@pytest.mark.integration
def test_a_bf16_archive_through_torchserve(torchserve, model_store, demo_artifacts, make_rows, expected,
                                           bf16_backend, demo_config):
    name = "dlrm_bf16"
    build_archive(demo_artifacts, model_store, "--model-name", name, "--workers", "1", "--precision", "bf16")
    torchserve.register(f"{name}.mar", initial_workers=1)
    try:
        encoder = FeatureEncoder(demo_config)
        rows = make_rows(50, seed=31)
        want = bf16_backend.predict(encoder.encode_instances(rows.instances))
        for body, ctype in [
            (json.dumps({"instances": rows.instances}), "application/json"),
            (rows.tsv(), "text/tab-separated-values"),
            (rows.binary(encoder), "application/x-dlrm"),
        ]:
            r = torchserve.predict(name, body, ctype)
            assert r.status == 200, r.text
            got = r.json()["predictions"]
            np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)  # the server's bf16 is the library's
            bf16_close(got, expected(rows.instances))
        # Explanations run on the bf16 model too (its fused layers have no backward:
        # gradients take the plain bf16 path), and their prediction is the served one.
        r = torchserve.call(
            "POST", f"{torchserve.inference_url}/explanations/{name}", key="inference",
            data=json.dumps({"instances": rows.instances[:3]}), content_type="application/json",
        )
        assert r.status == 200, r.text
        for e, p in zip(r.json()["explanations"], want[:3]):
            assert abs(e["prediction"] - p) <= 1e-6
            logit = lambda q: np.log(q / (1 - q))  # noqa: E731
            gap = logit(e["prediction"]) - logit(e["baseline"])
            assert abs(sum(e["attributions"].values()) - gap - e["delta"]) < 1e-4
            assert abs(e["delta"]) < 0.05
    finally:
        torchserve.unregister(name)
