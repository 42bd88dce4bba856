"""A 20-second ``bench/soak.py`` against the session TorchServe (the real soak is ``make soak``).

It attaches to the running server, sends the soak's mixed traffic (JSON,
named, TSV, binary over REST and gRPC, 10% bad) and must pass: no unexpected
answer, the same workers throughout, and worker RSS within 25% after a short
warm-up (the 5% limit is for the long run).  The report files must be written.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.integration


def test_soak_smoke(torchserve, demo_artifacts, tmp_path):
    cmd = [
        sys.executable, str(ROOT / "bench" / "soak.py"), "--attach", "--duration", "20", "--warmup", "6",
        "--interval", "2", "--concurrency", "8", "--max-rss-growth", "0.25",
        "--artifacts", str(demo_artifacts), "--out", str(tmp_path),
        "--inference-url", torchserve.inference_url, "--management-url", torchserve.management_url,
        "--grpc-target", torchserve.grpc_inference_target, "--key-file", str(torchserve.start_dir / "key_file.json"),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, f"soak failed:\n{r.stdout[-4000:]}\n{r.stderr[-2000:]}"
    md = list(tmp_path.glob("soak-*.md"))
    assert len(md) == 1 and list(tmp_path.glob("soak-*.png"))
    text = md[0].read_text()
    assert "| good | ok |" in text and "| bad | refused 400 |" in text and "**PASS**" in text
