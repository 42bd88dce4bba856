"""Hostile bodies up to max_request_size through the real TorchServe.

Each body goes to the session's TorchServe (two workers of dlrm.mar).  For
every body the workers' peak RSS is reset first and read after; the growth
must stay under 64 MiB + 20x the body, the worker PIDs must not change, and
a good request must still get the right answer.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from dlrm_serve.io.features import MAX_BAG_IDS, MAX_CATEGORICAL_CHARS
from peak_rss import can_reset_peak, current_rss, peak_rss, reset_peak

pytestmark = pytest.mark.integration

HEX = "68fd1e64"
BODY = 15 * 2**20  # under config.properties' max_request_size (16 MiB)


def _row(dense=None, sparse=None):
    return {"dense": dense or list(range(13)), "sparse": sparse or [HEX] * 26}


def _line(sparse=None):
    return "\t".join([str(v) for v in range(13)] + (sparse or [HEX] * 26))


def hostile_bodies(size: int, table_sizes) -> dict[str, tuple[bytes, str | None]]:
    huge = "a" * (size - 20_000)
    per_row = len(json.dumps(_row(sparse=["f" * MAX_CATEGORICAL_CHARS] * 26)))
    wide = {"dense": list(range(13)), "sparse": [list(range(min(s, MAX_BAG_IDS))) for s in table_sizes]}
    return {
        "tsv, one huge value among 100 lines": (("\n".join([_line()] * 100 + [_line([HEX] * 25 + [huge])])).encode(), "text/plain"),
        "json, one huge value": (json.dumps({"instances": [_row()] * 100 + [_row(sparse=[HEX] * 25 + [huge])]}).encode(), "application/json"),
        "json, 8000 rows, one long value": (json.dumps({"instances": [_row()] * 7999 + [_row(sparse=[HEX] * 25 + ["b" * 20_000])]}).encode(), "application/json"),
        "json, max-length strings": (json.dumps({"instances": [_row(sparse=["f" * MAX_CATEGORICAL_CHARS] * 26)] * min(8192, size // per_row)}).encode(), "application/json"),
        "json, widest bags": (json.dumps({"instances": [wide] * max(1, size // len(json.dumps(wide)))}).encode(), "application/json"),
        "json, deep nesting": (("[" * (size // 2) + "]" * (size // 2)).encode(), "application/json"),
        "json, huge numbers": (json.dumps({"instances": [_row(dense=[10**300] * 13)] * (size // 4100)}).encode(), "application/json"),
        "tsv, only tabs": (b"\t" * size, "text/plain"),
        "no content type, junk bytes": (bytes(np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8)), None),
    }


@pytest.fixture(scope="module")
def bodies(demo_config):
    return hostile_bodies(BODY, demo_config.table_sizes)


@pytest.mark.parametrize("name", list(hostile_bodies(10_000, (5,) * 26)))
def test_hostile_body_bounded_memory_no_worker_lost(torchserve, bodies, make_rows, expected, name):
    body, ctype = bodies[name]
    assert len(body) <= 16 * 2**20
    pids = torchserve.worker_pids("dlrm")
    assert len(pids) == 2
    if not all(can_reset_peak(p) for p in pids):
        pytest.skip("the workers' peak RSS cannot be reset here (/proc/PID/clear_refs)")
    before = {p: current_rss(p) for p in pids}
    for p in pids:
        reset_peak(p)
    r = torchserve.predict("dlrm", body, ctype, timeout=120)
    growth = max(peak_rss(p) - before[p] for p in pids)
    assert r.status in (200, 400), (r.status, r.text[:300])
    if r.status == 400:
        assert r.json()["type"] == "InvalidInput" and r.json()["message"]
    bound = 64 * 2**20 + 20 * len(body)
    print(f"{name}: {len(body) / 2**20:.1f} MiB body -> {r.status}, worker peak RSS +{growth / 2**20:.1f} MiB "
          f"(bound {bound / 2**20:.0f} MiB)")
    assert growth < bound
    assert torchserve.worker_pids("dlrm") == pids  # no worker died or was replaced
    rows = make_rows(3, seed=21)
    good = torchserve.predict("dlrm", json.dumps({"instances": rows.instances}), "application/json")
    assert good.status == 200
    np.testing.assert_allclose(good.json()["predictions"], expected(rows.instances), atol=1e-6, rtol=0)
