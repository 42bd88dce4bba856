"""The shared feature code: raw values -> validated, transformed, hashed inputs."""

import math

import numpy as np
import pytest

from dlrm_serve.config import DLRMConfig, preset
from dlrm_serve.errors import InvalidInput
from dlrm_serve.io.features import FeatureBatch, FeatureEncoder, hash_hex

CFG = preset("demo")
ENC = FeatureEncoder(CFG)
F = CFG.num_sparse
OFF = np.asarray(CFG.table_offsets)


def instance(**over):
    inst = {"dense": [float(i) for i in range(13)], "sparse": [i % 3 for i in range(26)]}
    inst.update(over)
    return inst


def sparse_with(first, rest=0):
    return [first] + [rest] * 25


def test_hex_matches_python_int_mod_table_size():
    rng = np.random.default_rng(1)
    values = [f"{v:08x}" for v in rng.integers(0, 2**32, 500)]
    values += ["0", "F", "DeadBeef", "00000001", "ffffffffffffffffffffffff", "123456789abcdef"]
    sizes = rng.integers(1, 10_000_000, len(values))
    got = hash_hex(np.array(values), sizes)
    want = [int(v, 16) % int(s) for v, s in zip(values, sizes)]
    assert got.tolist() == want


def test_hex_upper_and_lower_case_agree():
    a = ENC.encode_instances([instance(sparse=sparse_with("68FD1E64", "ABCDEF"))])
    b = ENC.encode_instances([instance(sparse=sparse_with("68fd1e64", "abcdef"))])
    assert a.indices.tolist() == b.indices.tolist()
    assert a.indices[0] == int("68fd1e64", 16) % CFG.table_sizes[0]


@pytest.mark.parametrize("bad", ["xyz", "12g4", "-1f", "0x1f", " 1f", "1_f", "é"])
def test_non_hex_strings_are_rejected_with_row_and_field(bad):
    with pytest.raises(InvalidInput) as e:
        ENC.encode_instances([instance(), instance(sparse=[0] * 5 + [bad] + [0] * 20)])
    assert e.value.row == 1 and e.value.field == "C6"
    assert "not a hex string" in e.value.message
    assert e.value.message.startswith("instance 1, field C6:")


def test_int_ids_are_row_indices_and_get_table_offsets():
    last = [min(i, CFG.table_sizes[i] - 1) for i in range(26)]
    b2 = ENC.encode_instances([instance(sparse=last)])
    assert b2.offsets is None
    assert b2.indices.tolist() == (OFF + np.array(last)).tolist()


@pytest.mark.parametrize(
    "value, reason",
    [
        (-1, "negative"),
        (1460, "out of range"),
        (10**30, "out of range"),
        (1.0, "float"),
        (True, "boolean"),
        ({"a": 1}, "object"),
        ([[1]], "nested"),
    ],
)
def test_bad_ids(value, reason):
    with pytest.raises(InvalidInput) as e:
        ENC.encode_instances([instance(sparse=sparse_with(value))])
    assert e.value.field == "C1" and e.value.row == 0
    assert reason in e.value.message


def test_largest_valid_id_is_accepted():
    b = ENC.encode_instances([instance(sparse=[s - 1 for s in CFG.table_sizes])])
    assert b.indices.tolist() == (OFF + np.array(CFG.table_sizes) - 1).tolist()


def test_missing_and_empty_bags():
    inst = instance(sparse=[None, [], "", [3, None]] + [1] * 22)
    b = ENC.encode_instances([inst])
    lengths = np.diff(b.offsets)
    assert lengths[:4].tolist() == [0, 0, 0, 1]
    assert b.indices[0] == OFF[3] + 3


def test_multi_hot_keeps_repeats_and_order():
    inst = instance(sparse=[[5, 7, 5], ["a", 2]] + [0] * 24)
    b = ENC.encode_instances([inst])
    assert b.offsets[:3].tolist() == [0, 3, 5]
    assert b.indices[:5].tolist() == [OFF[0] + 5, OFF[0] + 7, OFF[0] + 5, OFF[1] + 10, OFF[1] + 2]
    assert b.bag_ids(F)[:5].tolist() == [0, 0, 0, 1, 1]


def test_dense_log1p_with_negatives_clamped_and_missing_zero():
    dense = [None, -5, 0, 1, 2.5, 1e6] + [3] * 7
    b = ENC.encode_instances([instance(dense=dense)])
    want = np.log1p(np.maximum(np.array([0, -5, 0, 1, 2.5, 1e6] + [3] * 7, dtype=np.float32).astype(np.float64), 0))
    assert b.dense.dtype == np.float32
    np.testing.assert_array_equal(b.dense[0], want.astype(np.float32))


def test_dense_transform_none():
    cfg = CFG.replace(dense_transform="none")
    b = FeatureEncoder(cfg).encode_instances([instance(dense=[-2, None] + [1.5] * 11)])
    assert b.dense[0, :3].tolist() == [-2.0, 0.0, 1.5]


@pytest.mark.parametrize(
    "value, reason",
    [
        ("3", "must be numbers"),
        (True, "boolean"),
        (float("nan"), "finite"),
        (float("inf"), "finite"),
        (1e39, "too large"),
        (10**400, "too large"),
        ([1], "list"),
    ],
)
def test_bad_dense_values(value, reason):
    dense = [0] * 13
    dense[4] = value
    with pytest.raises(InvalidInput) as e:
        ENC.encode_instances([instance(), instance(), instance(dense=dense)])
    assert (e.value.row, e.value.field) == (2, "I5")
    assert reason in e.value.message


def test_named_fields_equal_positional():
    inst = instance(dense=[1, None, 3] + [4] * 10, sparse=["abc", None] + [i % 3 for i in range(24)])
    named = {f"I{i + 1}": v for i, v in enumerate(inst["dense"]) if v is not None}
    named.update({f"C{i + 1}": v for i, v in enumerate(inst["sparse"]) if v is not None})
    a = ENC.encode_instances([inst])
    b = ENC.encode_instances([named])
    np.testing.assert_array_equal(a.dense, b.dense)
    assert a.indices.tolist() == b.indices.tolist()
    assert a.offsets.tolist() == b.offsets.tolist()


def test_unknown_names_and_shapes():
    with pytest.raises(InvalidInput, match="unknown feature name 'I14'"):
        ENC.encode_instances([{"I14": 1}])
    with pytest.raises(InvalidInput, match="expected 13 values, got 12"):
        ENC.encode_instances([instance(dense=[0] * 12)])
    with pytest.raises(InvalidInput, match="expected 26 values, got 27"):
        ENC.encode_instances([instance(sparse=[0] * 27)])
    with pytest.raises(InvalidInput, match="empty instance"):
        ENC.encode_instances([{}])
    with pytest.raises(InvalidInput, match="must be a JSON object"):
        ENC.encode_instances([[1, 2]])
    with pytest.raises(InvalidInput, match="not both"):
        ENC.encode_instances([{**instance(), "I1": 3}])


def test_string_columns_match_instances_and_are_vectorised():
    rng = np.random.default_rng(0)
    n = 100_000
    hexes = np.array([f"{v:08x}" for v in rng.integers(0, 2**32, n * F)]).reshape(n, F)
    hexes[rng.random((n, F)) < 0.1] = ""
    ints = rng.integers(-3, 5000, (n, 13))
    dense = ints.astype(str)
    dense[rng.random((n, 13)) < 0.1] = ""
    batch = ENC.encode_columns(dense, hexes)
    assert batch.batch_size == n
    # The same rows through the per-value path give the same inputs.
    k = 300
    insts = [
        {
            "dense": [None if d == "" else int(d) for d in dense[i]],
            "sparse": [None if h == "" else str(h) for h in hexes[i]],
        }
        for i in range(k)
    ]
    small = ENC.encode_instances(insts)
    head = batch.slice(0, k, F)
    np.testing.assert_array_equal(small.dense, head.dense)
    assert small.indices.tolist() == head.indices.tolist()
    assert small.offsets.tolist() == head.offsets.tolist()


def test_string_dense_errors_name_row_and_field():
    dense = np.array([["1"] * 13, ["1"] * 12 + ["abc"]], dtype="<U8")
    sparse = np.array([["a"] * F, ["b"] * F])
    with pytest.raises(InvalidInput) as e:
        ENC.encode_columns(dense, sparse)
    assert (e.value.row, e.value.field) == (1, "I13")
    for text in ("nan", "inf", "1e400"):
        dense[1, 12] = text
        with pytest.raises(InvalidInput, match="I13"):
            ENC.encode_columns(dense, sparse)


def test_arrays_route_validates_ranges_and_lengths():
    dense = np.zeros((2, 13), dtype=np.float32)
    ids = np.zeros(2 * F, dtype=np.int64)
    ids[F + 2] = CFG.table_sizes[2]
    with pytest.raises(InvalidInput) as e:
        ENC.encode_arrays(dense, ids)
    assert (e.value.row, e.value.field) == (1, "C3")
    lengths = np.ones(2 * F, dtype=np.int64)
    lengths[0] = 2
    with pytest.raises(InvalidInput, match="add up to"):
        ENC.encode_arrays(dense, np.zeros(2 * F, dtype=np.int64), lengths)
    dense[1, 0] = np.inf
    with pytest.raises(InvalidInput, match="I1"):
        ENC.encode_arrays(dense, np.zeros(2 * F, dtype=np.int64))


def test_raw_batch_round_trips_through_arrays():
    insts = [instance(sparse=[[1, 2], None, "ff"] + [2] * 23), instance(dense=[None] * 13)]
    raw = ENC.raw_instances(insts)
    again = ENC.encode_arrays(raw.dense, raw.ids, raw.lengths)
    direct = ENC.encode_instances(insts)
    np.testing.assert_array_equal(again.dense, direct.dense)
    assert again.indices.tolist() == direct.indices.tolist()
    assert again.offsets.tolist() == direct.offsets.tolist()
    assert math.isnan(raw.dense[1, 0])


def test_concat_and_slice_are_inverse():
    a = ENC.encode_instances([instance()] * 3)
    b = ENC.encode_instances([instance(sparse=[[1, 2]] + [None] * 25)] * 2)
    both = FeatureBatch.concat([a, b], F)
    assert both.batch_size == 5
    back_a, back_b = both.slice(0, 3, F), both.slice(3, 5, F)
    assert back_a.indices.tolist() == a.indices.tolist()
    assert back_b.indices.tolist() == b.indices.tolist()
    assert back_b.offsets.tolist() == b.offsets.tolist()
    assert back_a.bag_offsets(F).tolist() == a.bag_offsets(F).tolist()


def test_custom_feature_names_and_counts():
    cfg = DLRMConfig(
        table_sizes=(10, 20), embedding_dim=4, bottom_mlp=(8, 4), top_mlp=(4, 1),
        dense_names=("age", "price", "clicks"), sparse_names=("site", "ad"),
    )
    enc = FeatureEncoder(cfg)
    b = enc.encode_instances([{"age": 3, "site": 9, "ad": "13"}])
    assert b.dense.shape == (1, 3)
    assert b.indices.tolist() == [9, 10 + 0x13 % 20]
