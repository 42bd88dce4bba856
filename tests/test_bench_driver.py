"""bench/common.py's load driver: its error accounting, with connections that fail on purpose.

No server: the connections here are stand-ins whose failures are the point
(a warm-up that fails, a connection that drops, a bug in a client thread).
"""

from __future__ import annotations

import json
import sys
import time

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))

from common import RequestFailed, drive  # noqa: E402

ANSWER = json.dumps({"predictions": [0.5, 0.5]}).encode()


class Flaky:
    """Answers two predictions; every ``fail_every``-th call raises ``error`` instead."""

    def __init__(self, fail_every: int = 0, error: Exception | None = None, warmup_error: Exception | None = None):
        self.fail_every, self.error, self.warmup_error = fail_every, error, warmup_error
        self.n = 0

    def __call__(self, body: bytes, content_type: str) -> bytes:
        self.n += 1
        if self.warmup_error is not None:
            raise self.warmup_error
        if self.fail_every and self.n > 2 and self.n % self.fail_every == 0:
            raise self.error
        time.sleep(0.0005)
        return ANSWER

    def close(self) -> None:
        pass


def test_a_failed_warm_up_stops_the_run_instead_of_waiting():
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match="warm-up of client .*HTTP 503"):
        drive(lambda: Flaky(warmup_error=RequestFailed("HTTP 503")), [b"x"], "application/json", 2, 4, 5.0, start_timeout=30)
    assert time.perf_counter() - t0 < 5.0  # it did not run the timed part, nor wait on the barrier


def test_a_wrong_answer_in_warm_up_is_reported():
    with pytest.raises(RuntimeError, match="expected 3 predictions, got 2"):
        drive(lambda: Flaky(), [b"x"], "application/json", 3, 2, 1.0)


@pytest.mark.parametrize("error", [OSError("connection reset"), RequestFailed("HTTP 500")])
def test_failed_requests_are_errors_and_answered_ones_successes(error):
    r = drive(lambda: Flaky(fail_every=3, error=error), [b"x"], "application/json", 2, 3, 0.5)
    assert r["requests"] == r["ok"] + r["errors"]
    assert r["errors"] > 0 and r["ok"] > r["errors"]  # one call in three fails
    assert r["rows_per_s"] == pytest.approx(r["ok"] * 2 / r["seconds"])
    assert r["failures"] == []


def test_an_unexpected_exception_in_a_thread_is_reported_not_lost():
    r = drive(lambda: Flaky(fail_every=5, error=KeyError("bug")), [b"x"], "application/json", 2, 2, 0.5)
    assert r["failures"] and all("KeyError" in f for f in r["failures"])
    assert r["ok"] > 0
