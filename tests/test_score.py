"""Offline scoring of TSV and JSON-lines files."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
import torch

from dlrm_serve import cli
from dlrm_serve.artifacts import load_model, save_artifacts
from dlrm_serve.config import DLRMConfig
from dlrm_serve.io.criteo import read_criteo
from dlrm_serve.io.synthetic import generate
from dlrm_serve.errors import InvalidInput
from dlrm_serve.io.features import FeatureEncoder
from dlrm_serve.model.dlrm import DLRM
from dlrm_serve.offline.score import detect_format, format_probabilities, score_file

CONFIG = DLRMConfig(
    table_sizes=(50, 300, 1000),
    embedding_dim=4,
    bottom_mlp=(8, 4),
    top_mlp=(8, 1),
    dense_names=("I1", "I2"),
    sparse_names=("C1", "C2", "C3"),
)
ROWS = 300


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Artifacts of a randomly initialised model and a labelled TSV file."""
    root = tmp_path_factory.mktemp("score")
    torch.manual_seed(0)
    save_artifacts(DLRM(CONFIG), root / "art")
    generate(root / "rows.tsv", ROWS, seed=4, config=CONFIG, progress=False)
    return root


def _read(path) -> np.ndarray:
    lines = open(path).read().splitlines()
    return np.array([np.float32(float(x)) for x in lines], dtype=np.float32)


def _instances(tsv, named: bool = False) -> list[dict]:
    """The rows of ``tsv`` as JSON instances: numbers for counts, null for missing."""
    out = []
    (chunk,) = read_criteo([str(tsv)], 2, 3)
    for dense, sparse in zip(chunk.dense.tolist(), chunk.sparse.tolist()):
        d = [None if x == "" else int(x) for x in dense]
        s = [None if x == "" else x for x in sparse]
        if named:
            out.append(dict(zip(CONFIG.dense_names + CONFIG.sparse_names, d + s)))
        else:
            out.append({"dense": d, "sparse": s})
    return out


def _in_process(art, tsv) -> np.ndarray:
    model = load_model(art)
    (chunk,) = read_criteo([str(tsv)], 2, 3)
    batch = FeatureEncoder(CONFIG).encode_columns(chunk.dense, chunk.sparse)
    offsets = None if batch.offsets is None else torch.from_numpy(batch.offsets)
    with torch.inference_mode():
        return model(torch.from_numpy(batch.dense), torch.from_numpy(batch.indices), offsets).numpy()


def test_tsv_and_json_lines_score_identically(setup, tmp_path):
    art, tsv = setup / "art", setup / "rows.tsv"
    jsonl = tmp_path / "rows.jsonl"
    # Blank lines are skipped; named fields and positional lists are the same instance.
    lines = [json.dumps(inst) for inst in _instances(tsv)]
    named = [json.dumps(inst) for inst in _instances(tsv, named=True)]
    jsonl.write_text("\n" + "\n".join(lines[:100] + [""] + named[100:]) + "\n")
    unlabelled = tmp_path / "rows39.tsv.gz"
    with gzip.open(unlabelled, "wt") as fh:
        for line in open(tsv):
            fh.write(line.split("\t", 1)[1])

    outs = {}
    for name, path in {"tsv": tsv, "json": jsonl, "gz": unlabelled}.items():
        out = tmp_path / f"{name}.txt"
        assert score_file(art, path, out, batch_rows=ROWS, progress=False) == ROWS
        outs[name] = _read(out)
    np.testing.assert_array_equal(outs["tsv"], outs["json"])
    np.testing.assert_array_equal(outs["tsv"], outs["gz"])
    # Exactly what the model gives in process for the same batch.
    np.testing.assert_array_equal(outs["tsv"], _in_process(art, tsv))
    # Small batches give the same values up to float rounding.
    out = tmp_path / "small.txt"
    score_file(art, jsonl, out, batch_rows=7, progress=False)
    np.testing.assert_allclose(_read(out), outs["tsv"], rtol=1e-6)
    assert ((outs["tsv"] > 0) & (outs["tsv"] < 1)).all()


def test_probabilities_round_trip_exactly():
    p = np.array([0.1, 1 / 3, 0.123456789, 1e-8, 0.99999994], dtype=np.float32)
    text = format_probabilities(p)
    assert text.count("\n") == 5
    back = np.array([np.float32(float(x)) for x in text.split()], dtype=np.float32)
    np.testing.assert_array_equal(back, p)
    assert text.split()[0] == repr(float(np.float32(0.1)))


def test_format_is_detected(tmp_path):
    (tmp_path / "a").write_text("\n  \n  {\"dense\": []}\n")
    (tmp_path / "b").write_text("1\t2\n")
    (tmp_path / "c").write_text("\n\n")
    assert detect_format(tmp_path / "a") == "json"
    assert detect_format(tmp_path / "b") == "tsv"
    with pytest.raises(InvalidInput, match="empty"):
        detect_format(tmp_path / "c")


def test_errors_name_the_input_line(setup, tmp_path):
    art, tsv = setup / "art", setup / "rows.tsv"
    good = [json.dumps(inst) for inst in _instances(tsv)][:20]
    cases = {
        "bad_json": (good[:5] + ["{\"dense\": [1, 2], "] + good[5:], r"line 6: invalid JSON"),
        "bad_field": (good[:12] + [json.dumps({"dense": [1, "x"], "sparse": ["a", "b", "c"]})], r"line 13, field I2: dense values must be numbers"),
        "not_object": (good[:3] + ["[1, 2]"], r"line 4: each line must hold one JSON object"),
        "bad_hex": (good[:2] + [json.dumps({"C1": "zz"})], r"line 3, field C1: 'zz' is not a hex string"),
    }
    for name, (lines, pattern) in cases.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text("\n".join(lines) + "\n")
        with pytest.raises(InvalidInput, match=pattern):
            score_file(art, path, tmp_path / "out.txt", batch_rows=4, progress=False)
        assert not (tmp_path / "out.txt").exists()  # no half-written output
    bad_tsv = tmp_path / "bad.tsv"
    lines = open(tsv).read().splitlines()[:10]
    lines[7] = lines[7].replace("\t", "\tq", 1)
    bad_tsv.write_text("\n".join(lines) + "\n")
    with pytest.raises(InvalidInput, match=r"bad\.tsv, line 8, field I1"):
        score_file(art, bad_tsv, tmp_path / "out.txt", batch_rows=3, progress=False)


def test_score_cli(setup, tmp_path, capsys):
    art, tsv = setup / "art", setup / "rows.tsv"
    out = tmp_path / "p.txt"
    assert cli.main(["score", "--artifacts", str(art), str(tsv), "--out", str(out)]) == 0
    assert f"wrote {ROWS} probabilities" in capsys.readouterr().out
    assert _read(out).shape == (ROWS,)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{\"dense\": [1]}\n")
    assert cli.main(["score", "--artifacts", str(art), str(bad), "--out", str(out)]) == 2
    assert "line 1, field dense: expected 2 values, got 1" in capsys.readouterr().err
    assert cli.main(["score", "--artifacts", str(art), str(tmp_path / "none.tsv"), "--out", str(out)]) == 2
    assert "none.tsv" in capsys.readouterr().err
    assert cli.main(["score", "--artifacts", str(tmp_path / "noart"), str(tsv), "--out", str(out)]) == 2
    assert "dlrm.json" in capsys.readouterr().err
