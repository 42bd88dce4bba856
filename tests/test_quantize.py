"""Row-wise int8 tables, presets and randomly initialised artifacts."""

import numpy as np
import pytest
import torch

from dlrm_serve.artifacts import WEIGHTS_FILE, load_config, load_model
from dlrm_serve.cli import main
from dlrm_serve.config import PRESETS, DLRMConfig, preset
from dlrm_serve.io.features import FeatureEncoder
from dlrm_serve.model.quantize import dequantize_rows, init_artifacts, quantize_artifacts, quantize_rows

SMALL = DLRMConfig(
    table_sizes=(500, 3, 2000, 40), embedding_dim=8, bottom_mlp=(16, 8), top_mlp=(16, 1),
    dense_names=("a", "b", "c"), sparse_names=("w", "x", "y", "z"),
)


def test_rowwise_error_is_at_most_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(1000, 16) * torch.rand(1000, 1) * 3
    w[5] = 0.25  # a constant row
    codes, sb = quantize_rows(w)
    assert codes.dtype == torch.uint8 and sb.shape == (1000, 2)
    err = (dequantize_rows(codes, sb) - w).abs().max(dim=1).values
    assert torch.all(err <= sb[:, 0] / 2 + 1e-6)
    assert err[5] == 0


def mapped_ranges(path):
    ranges = []
    with open("/proc/self/maps") as fh:
        for line in fh:
            if line.rstrip().endswith(str(path)):
                lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                ranges.append((lo, hi))
    return ranges


def test_int8_artifacts_round_trip_and_score_close(tmp_path):
    init_artifacts(SMALL, tmp_path / "fp32", seed=1)
    cfg = quantize_artifacts(tmp_path / "fp32", tmp_path / "int8", progress=False)
    assert cfg.table_dtype == "int8" and load_config(tmp_path / "int8").table_dtype == "int8"
    fp32, int8 = load_model(tmp_path / "fp32"), load_model(tmp_path / "int8")
    assert int8.sparse_arch.codes.dtype == torch.uint8
    # The int8 tables are served straight from the mapped file, like fp32 ones.
    ptr = int8.sparse_arch.codes.data_ptr()
    assert any(lo <= ptr < hi for lo, hi in mapped_ranges(tmp_path / "int8" / WEIGHTS_FILE))

    rng = np.random.default_rng(0)
    enc = FeatureEncoder(SMALL)
    rows = [
        {"dense": rng.integers(0, 100, 3).tolist(),
         "sparse": [[int(v) for v in rng.integers(0, s, int(rng.integers(0, 3)))] for s in SMALL.table_sizes]}
        for _ in range(500)
    ]
    batch = enc.encode_instances(rows)
    args = (torch.from_numpy(batch.dense), torch.from_numpy(batch.indices), torch.from_numpy(batch.offsets))
    with torch.no_grad():
        p32, p8 = fp32(*args), int8(*args)
    diff = (p32 - p8).abs().max().item()
    assert 0 < diff < 2e-3


def test_int8_table_memory_is_about_a_quarter(tmp_path):
    init_artifacts(SMALL, tmp_path / "a")
    quantize_artifacts(tmp_path / "a", tmp_path / "b", progress=False)
    a = load_model(tmp_path / "a").sparse_arch.weight
    b = load_model(tmp_path / "b").sparse_arch
    ratio = (b.codes.nbytes + b.scale_bias.nbytes) / a.nbytes
    assert ratio == pytest.approx((8 + 8) / (8 * 4))


def test_quantizing_twice_or_in_place_is_refused(tmp_path):
    init_artifacts(SMALL, tmp_path / "a")
    with pytest.raises(ValueError, match="another folder"):
        quantize_artifacts(tmp_path / "a", tmp_path / "a")
    quantize_artifacts(tmp_path / "a", tmp_path / "b", progress=False)
    with pytest.raises(ValueError, match="already int8"):
        quantize_artifacts(tmp_path / "b", tmp_path / "c")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_valid(name):
    cfg = preset(name)
    assert cfg.bottom_mlp[-1] == cfg.embedding_dim and cfg.top_mlp[-1] == 1
    assert DLRMConfig.from_json(cfg.to_json()) == cfg


def test_kaggle_preset_numbers():
    cfg = preset("criteo-kaggle")
    assert cfg.total_rows == 33_762_577
    assert cfg.top_input_width == 367
    assert cfg.total_rows * cfg.embedding_dim * 4 == pytest.approx(2.16e9, rel=0.01)
    assert sum(preset("criteo-terabyte").table_sizes) * 128 * 4 / 1e9 == pytest.approx(96, rel=0.01)


def test_cli_init_and_quantize(tmp_path, capsys):
    assert main(["init", "--preset", "demo", "--out", str(tmp_path / "d")]) == 0
    assert main(["quantize", "--artifacts", str(tmp_path / "d"), "--out", str(tmp_path / "q")]) == 0
    assert load_config(tmp_path / "q").table_dtype == "int8"
    assert main(["init", "--preset", "demo", "--table-dtype", "int8", "--out", str(tmp_path / "i")]) == 0
    assert load_model(tmp_path / "i").config.table_dtype == "int8"
    assert main(["init", "--preset", "nope", "--out", str(tmp_path / "x")]) == 2
    assert "unknown preset" in capsys.readouterr().err
