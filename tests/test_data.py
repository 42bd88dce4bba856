"""The Criteo reader and the synthetic generator."""

from __future__ import annotations

import gzip
import tracemalloc

import numpy as np
import pytest

from dlrm_serve import cli
from dlrm_serve.config import DEMO_TABLE_SIZES, DLRMConfig, preset
from dlrm_serve.io.criteo import count_rows, encode_chunk, read_criteo
from dlrm_serve.io.synthetic import PlantedModel, generate, read_oracle, vocab_sizes_for
from dlrm_serve.errors import InvalidInput
from dlrm_serve.offline.evaluation import roc_auc
from dlrm_serve.io.features import FeatureEncoder

SMALL = DLRMConfig(
    table_sizes=(10, 20, 30),
    embedding_dim=4,
    bottom_mlp=(8, 4),
    top_mlp=(8, 1),
    dense_names=("I1", "I2"),
    sparse_names=("C1", "C2", "C3"),
)


def _line(label, dense, sparse) -> str:
    fields = ([] if label is None else [str(label)]) + [str(d) for d in dense] + list(sparse)
    return "\t".join(fields) + "\n"


def _rows(n: int, labelled: bool = True) -> list[str]:
    out = []
    for i in range(n):
        dense = ["" if i % 7 == 3 else i, -(i % 3)]
        sparse = [f"{i:08x}", "" if i % 5 == 0 else f"{i * 31:x}", "ff"]
        out.append(_line(i % 2 if labelled else None, dense, sparse))
    return out


def _write(path, lines, gz=False):
    data = "".join(lines).encode()
    if gz:
        with gzip.open(path, "wb") as fh:
            fh.write(data)
    else:
        path.write_bytes(data)
    return str(path)


def _read_all(paths, **kw):
    return list(read_criteo(paths, 2, 3, **kw))


# ----- reader -------------------------------------------------------------------------
def test_chunks_cover_the_file_in_order(tmp_path):
    path = _write(tmp_path / "a.tsv", _rows(25))
    chunks = _read_all([path], chunk_rows=10)
    assert [len(c) for c in chunks] == [10, 10, 5]
    assert [c.start for c in chunks] == [0, 10, 20]
    labels = np.concatenate([c.labels for c in chunks])
    np.testing.assert_array_equal(labels, np.arange(25) % 2)
    lines = np.concatenate([c.lines for c in chunks])
    np.testing.assert_array_equal(lines, np.arange(1, 26))
    sparse = np.concatenate([c.sparse for c in chunks])
    assert sparse[13, 0] == f"{13:08x}"
    assert sparse[10, 1] == ""  # missing stays empty
    dense = np.concatenate([c.dense for c in chunks])
    assert dense[3, 0] == "" and dense[4, 0] == "4" and dense[5, 1] == "-2"


def test_row_range_across_files_skips_blank_lines(tmp_path):
    lines = _rows(12)
    a = _write(tmp_path / "a.tsv", lines[:5] + ["\n"] + lines[5:7])  # a blank line 6
    b = _write(tmp_path / "b.tsv", lines[7:])
    assert count_rows([a, b]) == 12
    chunks = _read_all([a, b], chunk_rows=4, start=3, stop=10)
    got = np.concatenate([c.labels for c in chunks])
    np.testing.assert_array_equal(got, np.arange(3, 10) % 2)
    # Chunks never span files; line numbers are the file's own, blank line skipped.
    assert [(c.path, list(c.lines)) for c in chunks] == [
        (a, [4, 5, 7, 8]),
        (b, [1, 2, 3]),
    ]


def test_gzip_reads_the_same_rows(tmp_path):
    lines = _rows(30)
    plain = _read_all([_write(tmp_path / "a.tsv", lines)], chunk_rows=7)
    packed = _read_all([_write(tmp_path / "a.tsv.gz", lines, gz=True)], chunk_rows=7)
    assert len(plain) == len(packed) == 5
    for p, g in zip(plain, packed):
        np.testing.assert_array_equal(p.labels, g.labels)
        np.testing.assert_array_equal(p.dense, g.dense)
        np.testing.assert_array_equal(p.sparse, g.sparse)
    assert count_rows([str(tmp_path / "a.tsv.gz")]) == 30


def test_unlabelled_files_have_one_field_less(tmp_path):
    path = _write(tmp_path / "u.tsv", _rows(6, labelled=False))
    (chunk,) = _read_all([path])
    assert chunk.labels is None
    assert chunk.dense.shape == (6, 2) and chunk.sparse.shape == (6, 3)
    with pytest.raises(InvalidInput, match=r"u\.tsv, line 1: has 5 tab-separated fields but 6 are expected"):
        _read_all([path], labelled=True)


def test_missing_fields_encode_as_empty_bags_and_zero_counts(tmp_path):
    path = _write(tmp_path / "m.tsv", [_line(1, ["", 5], ["", "a", ""]), _line(0, [2, ""], ["1", "", "f"])])
    (chunk,) = _read_all([path])
    batch = encode_chunk(FeatureEncoder(SMALL), chunk)
    np.testing.assert_array_equal(batch.dense, np.log1p(np.array([[0, 5], [2, 0]], dtype=np.float32)))
    # Bags (row, field): (0,0) empty, (0,1) 0xa % 20, (0,2) empty, (1,0) 1, (1,1) empty, (1,2) 0xf % 30.
    np.testing.assert_array_equal(np.diff(batch.offsets), [0, 1, 0, 1, 0, 1])
    np.testing.assert_array_equal(batch.indices, [10 + 10, 0 + 1, 30 + 15])


def test_labels_must_agree_within_a_file(tmp_path):
    lines = _rows(10) + _rows(3, labelled=False)
    path = _write(tmp_path / "mixed.tsv", lines)
    # Inside one chunk split_tsv catches it; across chunks the reader does.
    with pytest.raises(InvalidInput, match=r"mixed\.tsv, line 11: has 5 tab-separated fields but the first line has 6"):
        _read_all([path], chunk_rows=100)
    with pytest.raises(InvalidInput, match=r"mixed\.tsv, line 11: has 5 tab-separated fields but 6 are expected"):
        _read_all([path], chunk_rows=5)


@pytest.mark.parametrize(
    "bad_line, pattern",
    [
        (_line(2, [1, 2], ["a", "b", "c"]), r"line 9, field label: label must be 0 or 1, got '2'"),
        (_line(1, [1, 2], ["a", "xyz", "c"]), r"line 9, field C2: 'xyz' is not a hex string"),
        (_line(1, ["1.5e", 2], ["a", "b", "c"]), r"line 9, field I1: '1\.5e' is not a finite number"),
        ("1\t2\t3\n", r"line 9: has 3 tab-separated fields"),
    ],
)
def test_errors_name_the_file_line(tmp_path, bad_line, pattern):
    lines = _rows(4) + ["\n"] + _rows(3) + [bad_line] + _rows(4)  # line 5 is blank, the bad line is 9
    path = _write(tmp_path / "bad.tsv", lines)
    enc = FeatureEncoder(SMALL)
    with pytest.raises(InvalidInput, match=pattern) as info:
        for chunk in read_criteo([path], 2, 3, chunk_rows=3):
            encode_chunk(enc, chunk)
    assert info.value.row == 9
    assert "bad.tsv" in info.value.message


def test_damaged_gzip_and_missing_files_are_clear_errors(tmp_path):
    path = tmp_path / "cut.tsv.gz"
    _write(path, _rows(2000), gz=True)
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(InvalidInput, match="not a readable gzip file"):
        _read_all([str(path)])
    with pytest.raises(FileNotFoundError, match="nope.tsv"):
        _read_all([str(tmp_path / "nope.tsv")])


def test_streaming_memory_does_not_grow_with_the_file(tmp_path):
    path = _write(tmp_path / "big.tsv", _rows(6000))

    def peak(chunk_rows: int) -> int:
        tracemalloc.start()
        try:
            n = 0
            for chunk in read_criteo([path], 2, 3, chunk_rows=chunk_rows):
                n += len(chunk)
            top = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert n == 6000  # every row read, whatever the chunk size
        return top

    # Chunks of 200 rows hold a small fraction of what one 6000-row chunk holds.
    assert peak(200) * 8 < peak(6000)


# ----- generator ----------------------------------------------------------------------
def test_generator_is_deterministic_and_reports_probabilities(tmp_path):
    a, b, c = (tmp_path / n for n in ("a.tsv", "b.tsv", "c.tsv"))
    generate(a, 3000, seed=7, oracle=tmp_path / "a.p", progress=False)
    generate(b, 3000, seed=7, oracle=tmp_path / "b.p", progress=False)
    generate(c, 3000, seed=8, progress=False)
    assert a.read_bytes() == b.read_bytes()
    assert (tmp_path / "a.p").read_bytes() == (tmp_path / "b.p").read_bytes()
    assert a.read_bytes() != c.read_bytes()
    p = read_oracle(tmp_path / "a.p")
    assert p.shape == (3000,)
    assert ((p > 0) & (p < 1)).all()
    np.testing.assert_array_equal(read_oracle(tmp_path / "a.p", 100, 110), p[100:110])
    labels = np.concatenate([ch.labels for ch in read_criteo([str(a)], 13, 26)])
    # Clicks are drawn from the oracle: similar rates, and the oracle ranks them well.
    assert abs(labels.mean() - p.mean()) < 0.03
    assert 0.7 < roc_auc(labels, p) < 0.9


def test_oracle_is_the_planted_model_of_the_written_rows(tmp_path):
    model = generate(tmp_path / "o.tsv", 2000, seed=5, config=SMALL, oracle=tmp_path / "o.p", progress=False)
    (chunk,) = read_criteo([str(tmp_path / "o.tsv")], 2, 3)
    # Map the written text back to the planted values and recompute.
    dense = np.where(chunk.dense == "", "nan", chunk.dense).astype(np.float64)
    values = np.full(chunk.sparse.shape, -1, dtype=np.int64)
    for f in range(3):
        rank = {code: i for i, code in enumerate(model.codes[f].tolist())}
        values[:, f] = [rank.get(s, -1) for s in chunk.sparse[:, f].tolist()]
    assert (values >= 0).any(axis=0).all()
    np.testing.assert_allclose(model.probability(dense, values), read_oracle(tmp_path / "o.p"), rtol=1e-12)


def test_generated_rows_look_like_criteo(tmp_path):
    path = tmp_path / "g.tsv.gz"
    generate(path, 4000, seed=1, progress=False)
    chunks = list(read_criteo([str(path)], 13, 26, labelled=True))
    dense = np.concatenate([c.dense for c in chunks])
    sparse = np.concatenate([c.sparse for c in chunks])
    present = sparse[sparse != ""]
    assert all(len(s) == 8 for s in present[:500])
    assert int(present[0], 16) < 2**32
    assert (sparse == "").any() and (dense == "").any()
    counts = np.where(dense == "", "0", dense).astype(np.int64)
    assert (counts[:, 1] < 0).any()  # like I2
    assert (np.delete(counts, 1, axis=1) >= 0).all()
    # Zipf-like: the most frequent value of a wide feature covers a real share of rows.
    _, freq = np.unique(sparse[:, 2][sparse[:, 2] != ""], return_counts=True)
    assert freq.max() > 0.02 * freq.sum() and len(freq) > 200
    # Everything the encoder accepts.
    enc = FeatureEncoder(preset("demo"))
    assert sum(encode_chunk(enc, c).batch_size for c in chunks) == 4000


def test_generator_follows_the_config_layout(tmp_path):
    generate(tmp_path / "s.tsv", 50, seed=0, config=SMALL, labelled=False, progress=False)
    (chunk,) = read_criteo([str(tmp_path / "s.tsv")], 2, 3)
    assert chunk.labels is None and len(chunk) == 50
    assert vocab_sizes_for(SMALL) == (10, 20, 30)
    assert all(v <= d for v, d in zip(vocab_sizes_for(preset("criteo-kaggle")), DEMO_TABLE_SIZES))


def test_planted_model_is_calibrated():
    model = PlantedModel(seed=3)
    rows = model.sample(40000, np.random.default_rng(0))
    assert 0.22 < rows.labels.mean() < 0.28
    assert 0.76 < roc_auc(rows.labels, rows.probability) < 0.84
    np.testing.assert_allclose(model.probability(rows.dense, rows.values), rows.probability)


def test_generate_command_follows_a_config(tmp_path):
    SMALL.save(tmp_path / "dlrm.json")
    out = tmp_path / "s.tsv"
    assert cli.main(["generate", "--out", str(out), "--rows", "5", "--config", str(tmp_path / "dlrm.json")]) == 0
    assert all(len(line.split("\t")) == 6 for line in out.read_text().splitlines())


def test_generate_command(tmp_path, capsys):
    out = tmp_path / "cli.tsv"
    assert cli.main(["generate", "--out", str(out), "--rows", "20", "--seed", "2", "--oracle", str(tmp_path / "p.txt"), "--no-label"]) == 0
    assert "wrote 20 rows" in capsys.readouterr().out
    lines = out.read_text().splitlines()
    assert len(lines) == 20 and all(len(line.split("\t")) == 39 for line in lines)
    assert read_oracle(tmp_path / "p.txt").shape == (20,)
