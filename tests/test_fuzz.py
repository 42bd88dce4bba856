"""Property-based fuzzing of the decoder (hypothesis, a bounded number of examples).

For any bytes, any JSON value and any TSV text, under any content type or
none, ``decode_request`` returns a FeatureBatch or raises InvalidInput, and
nothing else.  Structured strategies mutate one field of valid rows, so the
search reaches the validation of each value and not only the framing.
"""

from __future__ import annotations

import json

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dlrm_serve.io.codecs import MAGIC, decode_request, encode_binary
from dlrm_serve.config import DLRMConfig
from dlrm_serve.errors import InvalidInput
from dlrm_serve.io.features import FeatureBatch, FeatureEncoder

# A small config keeps examples short; names and hashing are the real ones.
CFG = DLRMConfig(table_sizes=(7, 300, 2**40), embedding_dim=4, bottom_mlp=(4,), top_mlp=(4, 1),
                 dense_names=("I1", "I2"), sparse_names=("C1", "C2", "C3"))
ENC = FeatureEncoder(CFG)
CTYPES = st.sampled_from([None, "application/json", "text/plain", "text/tab-separated-values",
                          "application/x-dlrm", "application/octet-stream", "image/png",
                          "application/json; charset=utf-8", "application/x-www-form-urlencoded"])
FUZZ = settings(max_examples=int(__import__("os").environ.get("FUZZ_EXAMPLES", "150")), deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20)
json_values = st.recursive(json_scalars, lambda c: st.lists(c, max_size=5) | st.dictionaries(st.text(max_size=5), c, max_size=5), max_leaves=30)
dense_values = st.none() | st.integers(-(10**30), 10**30) | st.floats(allow_nan=True, allow_infinity=True) | st.booleans() | st.text(max_size=5)
sparse_values = (st.none() | st.integers(-5, 2**41) | st.text("0123456789abcdefABCDEFxyz -_é\x00", max_size=70)
                 | st.lists(st.integers(-2, 400) | st.text("0123456789abcdef", max_size=9) | st.none(), max_size=4))
good_rows = st.fixed_dictionaries({
    "dense": st.lists(st.none() | st.integers(-3, 10**6), min_size=2, max_size=2),
    "sparse": st.lists(st.none() | st.text("0123456789abcdef", min_size=1, max_size=16), min_size=3, max_size=3),
})


def decodes_or_400(body, ctype):
    try:
        out = decode_request(body, ctype, ENC)
    except InvalidInput as e:
        assert isinstance(e.message, str) and e.message
        return None
    assert isinstance(out, FeatureBatch)
    assert out.dense.dtype == np.float32 and np.isfinite(out.dense).all()
    assert out.indices.dtype == np.int64 and ((out.indices >= 0) & (out.indices < CFG.total_rows)).all()
    return out


@FUZZ
@given(st.binary(max_size=400), CTYPES)
def test_any_bytes(body, ctype):
    decodes_or_400(body, ctype)


@FUZZ
@given(st.binary(max_size=200), CTYPES)
def test_bytes_behind_the_binary_magic(tail, ctype):
    decodes_or_400(MAGIC + b"\x01" + tail, ctype)


@FUZZ
@given(json_values, CTYPES)
def test_any_json_value_parsed_or_as_text(value, ctype):
    decodes_or_400(value if isinstance(value, (dict, list)) else json.dumps(value).encode(), "application/json")
    decodes_or_400(json.dumps(value).encode(), ctype)


@FUZZ
@given(st.text(alphabet=st.sampled_from(list("0123456789abcdef-.\t\n\r xé")), max_size=300), CTYPES)
def test_any_tsv_text(text, ctype):
    decodes_or_400(text, ctype)
    decodes_or_400(text.encode("utf-8"), ctype)


@FUZZ
@given(st.lists(good_rows, min_size=1, max_size=6), st.data())
def test_valid_rows_with_one_field_mutated(rows, data):
    # Unmutated, every route gives the same inputs.
    want = decodes_or_400({"instances": rows}, "application/json")
    assert want is not None
    tsv = "\n".join("\t".join("" if v is None else str(v) for v in r["dense"] + r["sparse"]) for r in rows)
    got = decode_request(tsv, "text/plain", ENC)
    assert np.array_equal(got.dense, want.dense) and np.array_equal(got.indices, want.indices)
    binary = decode_request(encode_binary(ENC.raw_instances(rows)), None, ENC)
    assert np.array_equal(binary.indices, want.indices)
    for sep in ((", ", ": "), (",", ":")):  # JSON bytes, as workers get them: read straight from the bytes
        raw = decode_request(json.dumps({"instances": rows}, separators=sep).encode(), "application/json", ENC)
        assert np.array_equal(raw.dense, want.dense) and np.array_equal(raw.indices, want.indices)
    # One field mutated: a batch or a 400, on the JSON and TSV routes alike.
    i = data.draw(st.integers(0, len(rows) - 1))
    key = data.draw(st.sampled_from(["dense", "sparse"]))
    j = data.draw(st.integers(0, len(rows[i][key]) - 1))
    value = data.draw(dense_values if key == "dense" else sparse_values)
    mutated = json.loads(json.dumps(rows))
    mutated[i][key][j] = value
    decodes_or_400({"instances": mutated}, "application/json")
    decodes_or_400(json.dumps({"instances": mutated}).encode(), "application/json")
    named = [{**dict(zip(CFG.dense_names, r["dense"])), **dict(zip(CFG.sparse_names, r["sparse"]))} for r in mutated]
    decodes_or_400({"instances": named}, "application/json")
    text = "\n".join("\t".join("" if v is None else str(v) for v in r["dense"] + r["sparse"]) for r in mutated)
    decodes_or_400(text.encode("utf-8", "surrogatepass"), "text/plain")
