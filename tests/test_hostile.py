"""Hostile input in process: limits, isolation and memory bounded by the body.

Memory is the process's peak RSS (reset before each decode): decoding any
body must stay under a small multiple of the body's size, whatever the
shape of its values (long strings, many fields, wide bags, huge numbers).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from dlrm_serve.io import codecs
from dlrm_serve.io.codecs import decode_request
from dlrm_serve.config import preset
from dlrm_serve.errors import InvalidInput
from dlrm_serve.io.features import MAX_BAG_IDS, MAX_CATEGORICAL_CHARS, MAX_NUMBER_CHARS, FeatureEncoder
from peak_rss import can_reset_peak, current_rss, peak_rss, reset_peak

CFG = preset("demo")
ENC = FeatureEncoder(CFG)
HEX = "68fd1e64"


def row(dense=None, sparse=None):
    return {"dense": dense or list(range(13)), "sparse": sparse or [HEX] * 26}


def tsv_line(dense=None, sparse=None):
    r = row(dense, sparse)
    return "\t".join([str(v) for v in r["dense"]] + r["sparse"])


# ----- limits, checked before any array is built ------------------------------------------
def test_long_categorical_string_is_refused_on_every_route():
    long = "a" * (MAX_CATEGORICAL_CHARS + 1)
    sparse = [HEX] * 26
    sparse[4] = long
    bodies = [
        (json.dumps({"instances": [row(), row(sparse=sparse)]}).encode(), "application/json"),
        (json.dumps({"instances": [row(), {"C5": long}]}).encode(), "application/json"),
        ((tsv_line() + "\n" + tsv_line(sparse=sparse) + "\n").encode(), "text/plain"),
        ((tsv_line() + "\n" + tsv_line(sparse=sparse) + "\n").encode(), None),
    ]
    for body, ctype in bodies:
        with pytest.raises(InvalidInput) as e:
            decode_request(body, ctype, ENC)
        assert e.value.row == 1 and e.value.field == "C5", e.value.message
        assert f"limit of {MAX_CATEGORICAL_CHARS}" in e.value.message


def test_exactly_the_limit_is_accepted_and_hashed_like_python():
    value = "f" * MAX_CATEGORICAL_CHARS
    batch = ENC.encode_instances([row(sparse=[value] * 26)])
    want = [int(value, 16) % s + o for s, o in zip(CFG.table_sizes, CFG.table_offsets)]
    assert batch.indices.tolist() == want


def test_long_number_text_and_wide_bags_are_refused():
    dense = [str(i) for i in range(13)]
    dense[2] = "1" * (MAX_NUMBER_CHARS + 1)
    line = "\t".join(dense + [HEX] * 26)
    with pytest.raises(InvalidInput, match=f"instance 0, field I3: .*limit of {MAX_NUMBER_CHARS}"):
        decode_request(line, "text/plain", ENC)
    bag = [1] * (MAX_BAG_IDS + 1)
    with pytest.raises(InvalidInput, match=f"instance 0, field C1: a bag of {MAX_BAG_IDS + 1} ids .*limit"):
        ENC.encode_instances([row(sparse=[bag] + [HEX] * 25)])
    raw = ENC.raw_instances([row(sparse=[[1] * MAX_BAG_IDS] + [HEX] * 25)])  # at the limit: fine
    lengths = raw.lengths.copy()
    lengths[3] = MAX_BAG_IDS + 1
    ids = np.zeros(int(lengths.sum()), dtype=np.int64)
    with pytest.raises(InvalidInput, match="field C4: a bag of"):
        ENC.raw_arrays(raw.dense, ids, lengths)


@pytest.mark.parametrize(
    "text, match",
    [
        ('{"dense": [' + "9" * 5000 + "], \"sparse\": []}", "too many digits"),
        ('{"instances": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply"),
        ('{"dense": [NaN' + ", 1" * 12 + '], "sparse": ' + json.dumps([HEX] * 26) + "}", "not a finite number"),
        ('{"dense": [1e999' + ", 1" * 12 + '], "sparse": ' + json.dumps([HEX] * 26) + "}", "not a finite number"),
        ('{"dense": [' + str(10**400) + ", 1" * 12 + '], "sparse": ' + json.dumps([HEX] * 26) + "}", "too large"),
    ],
    ids=["digits", "nesting", "nan", "inf", "huge-int"],
)
def test_hostile_json_numbers_and_nesting_get_400(text, match):
    with pytest.raises(InvalidInput, match=match):
        decode_request(text.encode(), "application/json", ENC)


# ----- isolation ------------------------------------------------------------------------------
def test_an_unexpected_decode_failure_fails_only_its_request(monkeypatch, demo_backend):
    from dlrm_serve.serve.serving import Predictor, Request

    real = codecs.decode_request

    def flaky(body, ctype, encoder, max_rows):
        if body == b"boom":
            raise MemoryError("internal detail that must not leak")
        return real(body, ctype, encoder, max_rows)

    monkeypatch.setattr("dlrm_serve.serve.serving.decode_request", flaky)
    predictor = Predictor(demo_backend)
    good = json.dumps(row()).encode()
    replies, stats = predictor.handle([Request(good, "application/json"), Request(b"boom", None), Request(good, None)])
    assert [r.status for r in replies] == [200, 500, 200]
    assert replies[1].body["type"] == "InternalError"
    assert "MemoryError" in replies[1].body["message"] and "internal detail" not in replies[1].body["message"]
    assert replies[0].body == replies[2].body and stats.invalid == 1
    # Over TorchServe's gRPC the failed request still ends its stream (StreamPredictions).
    (reply,), _ = predictor.handle([Request(b"boom", None, grpc=True)])
    assert reply.status == 500 and reply.headers == {"ts_stream_next": "false"}


# ----- memory bounded by the body -------------------------------------------------------------
def _adversarial_bodies(size: int) -> dict[str, tuple[bytes, str | None]]:
    """Bodies of about ``size`` bytes whose values have hostile shapes."""
    n = size // 400
    sparse = [HEX] * 26
    one_long = [HEX] * 25 + ["a" * (size // 2)]
    many_rows_long_last = "\n".join([tsv_line()] * 100 + [tsv_line(sparse=one_long)])
    wide = {"dense": list(range(13)), "sparse": [list(range(min(s, MAX_BAG_IDS))) for s in CFG.table_sizes]}
    return {
        # The shapes that blew up fixed-width arrays: many rows, one huge value.
        "tsv one huge value": (many_rows_long_last.encode(), "text/plain"),
        "json one huge value": (json.dumps({"instances": [row()] * 100 + [row(sparse=one_long)]}).encode(), "application/json"),
        "json max-length strings": (json.dumps({"instances": [row(sparse=["f" * MAX_CATEGORICAL_CHARS] * 26)] * (n // 4)}).encode(), "application/json"),
        "tsv max-length strings": ("\n".join([tsv_line(sparse=["f" * MAX_CATEGORICAL_CHARS] * 26)] * (n // 4)).encode(), "text/plain"),
        "json many rows": (json.dumps({"instances": [row(sparse=sparse)] * min(n, codecs.MAX_ROWS)}).encode(), "application/json"),
        "json wide bags": (json.dumps({"instances": [wide] * max(1, size // 150_000)}).encode(), "application/json"),
        "json huge numbers": (json.dumps({"instances": [row(dense=[10**300] * 13)] * max(1, size // 4200)}).encode(), "application/json"),
        "tsv many fields": (("\t" * (size - 2) + "\n").encode(), "text/plain"),
        "junk bytes": (bytes(np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8)), None),
    }


@pytest.mark.parametrize("name", list(_adversarial_bodies(1000)))
def test_decoding_memory_is_bounded_by_the_body(name):
    """Peak RSS while decoding, beyond what the parsed body already holds: <= 8x the body + 32 MiB."""
    if not can_reset_peak():
        pytest.skip("the peak RSS cannot be reset here (/proc/self/clear_refs)")
    body, ctype = _adversarial_bodies(4_000_000)[name]
    obj = json.loads(body) if ctype == "application/json" else body  # as TorchServe hands it over
    reset_peak()
    before = current_rss()
    try:
        decode_request(obj, ctype, ENC)
    except InvalidInput:
        pass
    growth = peak_rss() - before
    bound = 8 * len(body) + 32 * 2**20
    assert growth < bound, f"{name}: peak grew {growth / 2**20:.1f} MiB for a {len(body) / 2**20:.1f} MiB body"


def test_an_oip_body_with_one_huge_string_is_refused_within_bounded_memory():
    from dlrm_serve.serve import oip

    if not can_reset_peak():
        pytest.skip("the peak RSS cannot be reset here (/proc/self/clear_refs)")
    huge = "a" * 4_000_000
    body = {"inputs": [
        {"name": "dense", "shape": [1, 13], "datatype": "FP32", "data": [1] * 13},
        {"name": "sparse", "shape": [1, 26], "datatype": "BYTES", "data": [HEX] * 25 + [huge]},
    ]}
    reset_peak()
    before = current_rss()
    with pytest.raises(InvalidInput, match=f"input 'sparse': instance 0, field C26: .*limit of {MAX_CATEGORICAL_CHARS}"):
        oip.decode(body, ENC, 8192)
    # A fixed-width str array would take 26 x 4 MB x 4 bytes (416 MB) here.
    assert peak_rss() - before < 8 * len(huge) + 32 * 2**20
