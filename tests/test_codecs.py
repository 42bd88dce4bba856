"""Wire formats: JSON, Criteo TSV and binary, all decoding to the same inputs."""

import json

import numpy as np
import pytest

from dlrm_serve.io import codecs
from dlrm_serve.io.codecs import decode_request, encode_binary, sniff, split_tsv
from dlrm_serve.config import preset
from dlrm_serve.errors import InvalidInput
from dlrm_serve.io.features import FeatureEncoder

CFG = preset("demo")
ENC = FeatureEncoder(CFG)
F = CFG.num_sparse

ROW = {
    "dense": [5, -1, None, 0, 12, 3, 4, 100, 2, 0, 1, 7, 8],
    "sparse": ["68fd1e64", "80E26C9B", None, "fb936136", "7b4723c4", "25c83c98", "7e0ccccf",
               "de7995b8", "1f89b562", "a73ee510", "a8cd5504", "b2cb9c98", "37c9c164", "2824a5f6",
               "1adce6ef", "8ba8b39a", "891b62e7", "e5ba7672", "f54016b9", "21ddcdc9", "b1252a9d",
               "07b5194c", None, "3a171ecb", "c5c50484", "e8b83407"],
}
TSV = "1\t5\t-1\t\t0\t12\t3\t4\t100\t2\t0\t1\t7\t8\t68fd1e64\t80E26C9B\t\tfb936136\t7b4723c4\t25c83c98\t7e0ccccf\tde7995b8\t1f89b562\ta73ee510\ta8cd5504\tb2cb9c98\t37c9c164\t2824a5f6\t1adce6ef\t8ba8b39a\t891b62e7\te5ba7672\tf54016b9\t21ddcdc9\tb1252a9d\t07b5194c\t\t3a171ecb\tc5c50484\te8b83407"


def same(a, b):
    np.testing.assert_array_equal(a.dense, b.dense)
    assert a.indices.tolist() == b.indices.tolist()
    assert (a.offsets is None) == (b.offsets is None)
    if a.offsets is not None:
        assert a.offsets.tolist() == b.offsets.tolist()


def test_every_format_decodes_the_same_row():
    want = ENC.encode_instances([ROW])
    named = {f"I{i + 1}": v for i, v in enumerate(ROW["dense"]) if v is not None}
    named.update({f"C{i + 1}": v for i, v in enumerate(ROW["sparse"]) if v is not None})
    unlabeled = TSV.split("\t", 1)[1]
    binary = encode_binary(ENC.raw_instances([ROW]))
    same(want, decode_request(ROW, "application/json", ENC))
    same(want, decode_request(named, "application/json", ENC))
    same(want, decode_request({"instances": [ROW]}, "application/json", ENC))
    same(want, decode_request(json.dumps(ROW).encode(), "application/json; charset=utf-8", ENC))
    same(want, decode_request(TSV, "text/tab-separated-values", ENC))
    same(want, decode_request(unlabeled + "\n", "text/plain", ENC))
    same(want, decode_request(binary, "application/x-dlrm", ENC))
    # No content type (gRPC): sniffed.
    same(want, decode_request(bytearray(json.dumps(ROW).encode()), None, ENC))
    same(want, decode_request(bytearray(TSV.encode()), None, ENC))
    same(want, decode_request(bytearray(binary), None, ENC))


def test_batches_keep_order_in_every_format():
    rows = [dict(ROW, dense=[i] + ROW["dense"][1:]) for i in range(5)]
    want = ENC.encode_instances(rows)
    tsv = "\n".join("\t".join([str(i)] + TSV.split("\t")[2:]) for i in range(5))
    same(want, decode_request({"instances": rows}, "application/json", ENC))
    same(want, decode_request(tsv, "text/tab-separated-values", ENC))
    same(want, decode_request(encode_binary(ENC.raw_instances(rows)), "application/x-dlrm", ENC))


def test_binary_multi_hot_round_trip():
    rows = [dict(ROW, sparse=[[1, 2, 2], [], None] + [0] * 23), ROW]
    raw = ENC.raw_instances(rows)
    assert raw.lengths is not None
    same(ENC.finish(raw), codecs.decode_binary(encode_binary(raw), ENC))


def test_split_tsv_labels_and_missing():
    labels, dense, sparse = split_tsv([TSV, TSV.replace("1", "0", 1)], 13, 26)
    assert labels.tolist() == [1, 0]
    assert dense.shape == (2, 13) and sparse.shape == (2, 26)
    assert dense[0, 2] == "" and sparse[0, 2] == ""
    labels, dense, _ = split_tsv([TSV.split("\t", 1)[1]], 13, 26)
    assert labels is None and dense[0, 0] == "5"


@pytest.mark.parametrize(
    "body, ctype, match",
    [
        (b"", "application/json", "empty"),
        (b"{not json", "application/json", "invalid JSON"),
        ({}, "application/json", "empty instance"),
        ({"instances": []}, "application/json", "'instances' is empty"),
        ({"instances": {"a": 1}}, "application/json", "must be a list"),
        ({"instances": [1]}, "application/json", "instance 0: an instance must be a JSON object"),
        ([ROW], "application/json", "must be an object"),
        ("1\t2\t3", "text/plain", "got 3"),
        (TSV + "\n" + TSV.rsplit("\t", 1)[0], "text/plain", "instance 1: has 39"),
        (TSV.replace("\t5\t", "\tfive\t", 1), "text/plain", "instance 0, field I1"),
        (TSV.replace("1", "x", 1), "text/plain", "label must be 0 or 1"),
        (b"\xff\xfe garbage", None, "not valid UTF-8"),
        (b"\xff\xfe garbage", "text/plain", "not valid UTF-8"),
        (b"\xff\xfe garbage", "application/json", "UTF-8"),
        (b"DLRM\x01", "application/x-dlrm", "shorter than"),
        (b"\x00" * 40, "application/x-dlrm", "magic"),
        (b"<xml/>", "image/png", "unsupported content type 'image/png'"),
    ],
)
def test_bad_bodies(body, ctype, match):
    with pytest.raises(InvalidInput, match=match):
        decode_request(body, ctype, ENC)


def test_binary_ids_are_int32_unless_a_table_needs_int64():
    raw = ENC.raw_instances([ROW])
    small = encode_binary(raw)
    assert small[5] & 2 == 0
    # header, 13 dense, 26 bag lengths (two bags are empty), 24 int32 ids
    assert len(small) == 24 + 4 * 13 + 4 * 26 + 4 * 24
    raw.ids[0] = 2**31
    big = encode_binary(raw)
    assert big[5] & 2 == 2
    # Decoding reads the wide ids back (and then rejects one that big for this table).
    with pytest.raises(InvalidInput, match=f"row id {2**31}"):
        decode_request(big, None, ENC)


def test_binary_header_is_checked():
    good = bytearray(encode_binary(ENC.raw_instances([ROW, ROW])))
    with pytest.raises(InvalidInput, match="header implies"):
        decode_request(bytes(good[:-3]), "application/x-dlrm", ENC)
    bad_version = bytearray(good)
    bad_version[4] = 9
    with pytest.raises(InvalidInput, match="version 9"):
        decode_request(bytes(bad_version), "application/x-dlrm", ENC)
    other = preset("demo", dense_names=tuple(f"d{i}" for i in range(4)))
    with pytest.raises(InvalidInput, match="this model has 13 and 26"):
        decode_request(encode_binary(FeatureEncoder(other).raw_instances([{"d0": 1, "C1": 1}])), None, ENC)
    ids = ENC.raw_instances([ROW])
    ids.ids[3] = CFG.table_sizes[4]  # C3 is missing, so the fourth id belongs to C5
    with pytest.raises(InvalidInput, match="instance 0, field C5: row id"):
        decode_request(encode_binary(ids), None, ENC)


def test_max_rows_is_enforced_in_every_format():
    rows = [ROW] * 4
    with pytest.raises(InvalidInput, match="at most 3"):
        decode_request({"instances": rows}, "application/json", ENC, max_rows=3)
    with pytest.raises(InvalidInput, match="at most 3"):
        decode_request("\n".join([TSV] * 4), "text/plain", ENC, max_rows=3)
    with pytest.raises(InvalidInput, match="at most 3"):
        decode_request(encode_binary(ENC.raw_instances(rows)), None, ENC, max_rows=3)
    assert decode_request({"instances": rows[:3]}, "application/json", ENC, max_rows=3).batch_size == 3


def test_sniff():
    assert sniff(b"DLRM....") == "binary"
    assert sniff(b'  \n{"dense": []}') == "json"
    assert sniff(b"[1]") == "json"
    assert sniff(b"0\t1\t2") == "tsv"


def test_predictions_body_is_exact_float32():
    p = np.array([0.1, 1 / 3], dtype=np.float32)
    body = codecs.predictions_body(p)
    again = np.array(json.loads(json.dumps(body))["predictions"], dtype=np.float32)
    np.testing.assert_array_equal(again, p)


def test_positional_json_bytes_are_read_straight_and_agree_with_the_parser():
    from dlrm_serve.io.codecs import fast_json

    rows = [dict(ROW, dense=[None, 0, -3, 7] + [12345678901] * 9), ROW]
    want = ENC.encode_instances(rows)
    for body in (
        json.dumps({"instances": rows}),
        json.dumps({"instances": rows}, separators=(",", ":")),
        json.dumps({"instances": rows}, indent=2),
        "\r\n\t" + json.dumps({"instances": rows}) + " \n",
    ):
        data = body.strip(" \r\n\t").encode() if body.startswith("\r") else body.encode()
        assert fast_json(data, ENC) is not None
        same(want, decode_request(data, "application/json", ENC))
    one = json.dumps(ROW).encode()
    assert fast_json(one, ENC) is not None
    same(ENC.encode_instances([ROW]), decode_request(one, None, ENC))
    # Not that shape, or not JSON: the parser decides, with its own messages.
    for body, match in [
        (one.replace(b"[", b"[01, ", 1), "invalid JSON"),
        (one.replace(b", ", b" ", 1), "invalid JSON"),
        (one + b"x", "invalid JSON"),
        (one.replace(b"null", b"nul", 1) if b"null" in one else one[:-1], "invalid JSON"),
        (one.replace(b", ", b",\x01", 1), "invalid JSON"),
    ]:
        assert fast_json(body, ENC) is None
        with pytest.raises(InvalidInput, match=match):
            decode_request(body, "application/json", ENC)
