"""Metrics, training on synthetic and user data, determinism, and the train CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from dlrm_serve import cli
from dlrm_serve.artifacts import check_artifacts, load_model, load_weights
from dlrm_serve.config import DLRMConfig
from dlrm_serve.io.synthetic import generate
from dlrm_serve.errors import ConfigError, InvalidInput
from dlrm_serve.offline.evaluation import average_ranks, log_loss, roc_auc
from dlrm_serve.offline.train import (
    Rows,
    TrainOptions,
    make_optimizers,
    new_model,
    rows_from_batch,
    train,
    train_step,
)
from dlrm_serve.io.features import FeatureEncoder

# A small model whose planted data a few tens of thousands of rows can teach.
SMALL = DLRMConfig(
    table_sizes=(40, 100, 300, 60, 1000, 8, 200, 500),
    embedding_dim=8,
    bottom_mlp=(16, 8),
    top_mlp=(32, 1),
    dense_names=("I1", "I2", "I3", "I4"),
    sparse_names=tuple(f"C{i}" for i in range(1, 9)),
    name="small",
)


@pytest.fixture
def small_config(tmp_path) -> str:
    path = tmp_path / "small.json"
    SMALL.save(path)
    return str(path)


def _quiet(_msg: str) -> None:
    pass


# ----- metrics -----------------------------------------------------------------------
def test_auc_hand_computed_cases():
    assert roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert roc_auc([0, 1], [0.2, 0.9]) == 1.0
    assert roc_auc([1, 0], [0.2, 0.9]) == 0.0
    # Ties between a positive and a negative count one half.
    assert roc_auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == pytest.approx(0.5)
    # Pairs (pos, neg): (.2,.2)=.5 (.2,.6)=0 (.6,.2)=1 (.6,.6)=.5 (.9,.2)=1 (.9,.6)=1 -> 4/6.
    assert roc_auc([0, 1, 1, 0, 1], [0.2, 0.2, 0.6, 0.6, 0.9]) == pytest.approx(4 / 6)
    np.testing.assert_array_equal(average_ranks([3, 1, 3, 2, 3]), [4, 1, 4, 2, 4])


def test_auc_matches_pair_counting_with_many_ties():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    s = rng.integers(0, 6, 300).astype(float)  # heavy ties
    pos, neg = s[y == 1], s[y == 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    assert roc_auc(y, s) == pytest.approx(wins / (len(pos) * len(neg)), abs=1e-12)


def test_metrics_reject_bad_input():
    with pytest.raises(ValueError, match="both classes"):
        roc_auc([1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="2 labels but 3 scores"):
        roc_auc([0, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="labels must be 0 or 1"):
        log_loss([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="outside"):
        log_loss([0, 1], [0.1, 1.2])


def test_log_loss_hand_computed():
    assert log_loss([1, 0], [0.8, 0.3]) == pytest.approx(-(math.log(0.8) + math.log(0.7)) / 2)
    assert log_loss([1, 1, 0], [0.5, 0.5, 0.5]) == pytest.approx(math.log(2))
    # A confident mistake is clipped, not infinite.
    assert log_loss([1], [0.0]) == pytest.approx(-math.log(1e-7))


# ----- training ------------------------------------------------------------------------
def test_small_run_learns_the_planted_model(tmp_path, small_config):
    out = tmp_path / "art"
    metrics = train(
        TrainOptions(
            out=str(out), config=small_config, rows=40_000, epochs=2, batch_size=256,
            data_dir=str(tmp_path / "data"), progress=False,
        ),
        log=_quiet,
    )
    assert metrics["train_rows"] == 36_000 and metrics["test_rows"] == 4_000
    assert 0.75 < metrics["oracle_auc"] < 0.85
    assert metrics["test_auc"] > 0.7
    assert metrics["test_auc"] > metrics["oracle_auc"] - 0.05
    assert metrics["test_logloss"] < metrics["oracle_logloss"] + 0.05
    assert [h["epoch"] for h in metrics["history"]] == [1, 2]
    # The artifacts are complete and the saved metrics are the returned ones.
    assert check_artifacts(out) == SMALL
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["test_auc"] == metrics["test_auc"]


def test_same_seed_gives_identical_weights(tmp_path, small_config):
    def run(name: str, seed: int) -> dict[str, torch.Tensor]:
        train(
            TrainOptions(
                out=str(tmp_path / name), config=small_config, rows=3000, epochs=1, batch_size=128,
                seed=seed, data_dir=str(tmp_path / "data"), progress=False,
            ),
            log=_quiet,
        )
        return load_weights(tmp_path / name)

    a, b, c = run("a", 5), run("b", 5), run("c", 6)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not torch.equal(a["sparse_arch.weight"], c["sparse_arch.weight"])


def test_synthetic_data_is_reused(tmp_path, small_config):
    messages: list[str] = []
    opts = dict(config=small_config, rows=2000, epochs=1, data_dir=str(tmp_path / "data"), progress=False)
    train(TrainOptions(out=str(tmp_path / "a"), **opts), log=messages.append)
    (tsv,) = (tmp_path / "data").glob("*.tsv")
    before = tsv.stat().st_mtime_ns
    train(TrainOptions(out=str(tmp_path / "b"), **opts), log=messages.append)
    assert tsv.stat().st_mtime_ns == before
    assert any(m.startswith("generating 2000") for m in messages)
    assert any(m.startswith("reusing synthetic data") for m in messages)


def test_streamed_training_on_user_files(tmp_path, small_config):
    train_file, test_file = tmp_path / "train.tsv.gz", tmp_path / "test.tsv"
    generate(train_file, 12_000, seed=1, config=SMALL, progress=False)
    generate(test_file, 3000, seed=1, config=SMALL, progress=False)  # same planted model
    metrics = train(
        TrainOptions(
            out=str(tmp_path / "art"), data=[str(train_file)], test_data=[str(test_file)], config=small_config,
            epochs=1, batch_size=128, chunk_rows=1000, memory_rows=0, progress=False,
        ),
        log=_quiet,
    )
    assert metrics["in_memory"] is False
    assert metrics["train_rows"] == 12_000 and metrics["test_rows"] == 3000
    assert "oracle_auc" not in metrics
    assert metrics["test_auc"] > 0.65


def test_training_data_errors(tmp_path, small_config):
    with pytest.raises(FileNotFoundError, match="training data file .*missing.tsv"):
        train(TrainOptions(out=str(tmp_path / "a"), data=[str(tmp_path / "missing.tsv")], config=small_config), log=_quiet)
    with pytest.raises(ConfigError, match="config file .*nope.json.* not found"):
        train(TrainOptions(out=str(tmp_path / "a"), config=str(tmp_path / "nope.json")), log=_quiet)
    (tmp_path / "bad.json").write_text(json.dumps({"table_sizes": [10], "embedding_dim": 3}))
    with pytest.raises(ConfigError, match=r"bad\.json is not a valid dlrm-serve config: table_sizes has 1 entries"):
        train(TrainOptions(out=str(tmp_path / "a"), config=str(tmp_path / "bad.json")), log=_quiet)
    unlabelled = tmp_path / "u.tsv"
    generate(unlabelled, 100, config=SMALL, labelled=False, progress=False)
    with pytest.raises(InvalidInput, match=r"u\.tsv, line 1: has 12 tab-separated fields but 13 are expected"):
        train(TrainOptions(out=str(tmp_path / "a"), data=[str(unlabelled)], config=small_config), log=_quiet)
    with pytest.raises(ValueError, match="epochs must be a positive integer"):
        train(TrainOptions(out=str(tmp_path / "a"), epochs=0), log=_quiet)


def test_table_gradients_are_sparse():
    # A table far bigger than a batch: the step's gradient holds only the rows the batch used.
    config = SMALL.replace(table_sizes=(400_000,) + SMALL.table_sizes[1:])
    model = new_model(config, seed=0)
    optimizers = make_optimizers(model, TrainOptions())
    rng = np.random.default_rng(0)
    sparse = rng.integers(0, 8, size=(64, 8))
    batch = FeatureEncoder(config).encode_columns(rng.random((64, 4)) * 10, sparse)
    rows = rows_from_batch(batch, rng.integers(0, 2, 64), config)
    before = model.sparse_arch.weight.detach().clone()
    loss = train_step(model, optimizers, rows)
    grad = model.sparse_arch.weight.grad
    assert grad is not None and grad.is_sparse
    assert np.isfinite(loss)
    changed = (model.sparse_arch.weight.detach() != before).any(dim=1)
    used = np.unique(rows.ids[rows.ids >= 0])
    assert set(torch.nonzero(changed).flatten().tolist()) <= set(used.tolist())
    assert changed.sum() > 0


def test_rows_keep_missing_fields():
    enc = FeatureEncoder(SMALL)
    sparse = np.array([["1", "", "2", "3", "4", "5", "6", "7"], ["", "1", "", "1", "1", "1", "1", "1"]])
    batch = enc.encode_columns(np.array([[1.0, np.nan, 2, 3], [0, 1, 2, 3]]), sparse)
    rows = rows_from_batch(batch, np.array([1, 0]), SMALL)
    assert isinstance(rows, Rows)
    assert rows.ids[0, 1] == -1 and rows.ids[1, 0] == -1 and rows.ids[1, 2] == -1
    assert rows.ids[0, 0] == 1 and rows.ids[1, 1] == 40 + 1


# ----- CLI -----------------------------------------------------------------------------
def test_train_cli(tmp_path, small_config, capsys):
    out = tmp_path / "art"
    code = cli.main([
        "train", "--config", small_config, "--rows", "3000", "--epochs", "1", "--batch-size", "128",
        "--data-dir", str(tmp_path / "data"), "--out", str(out), "--seed", "3",
    ])
    assert code == 0
    printed = capsys.readouterr().out
    assert "epoch 1/1" in printed and "oracle AUC" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("test_auc", "test_logloss", "oracle_auc", "rows", "seconds", "epochs"):
        assert key in metrics
    assert metrics["rows"] == 3000 and metrics["seed"] == 3
    model = load_model(out)
    assert model.config == SMALL


def test_train_cli_reports_missing_files(tmp_path, capsys):
    code = cli.main(["train", "--data", str(tmp_path / "nope.tsv"), "--out", str(tmp_path / "a")])
    assert code == 2
    assert "nope.tsv" in capsys.readouterr().err
    assert not Path(tmp_path / "a").exists()
