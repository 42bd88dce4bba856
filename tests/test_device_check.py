"""bench/device_check.sh end to end on the CPU (--device cpu --quick): the script a GPU machine will run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import ROOT


def test_device_check_runs_on_the_cpu(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    r = subprocess.run(
        ["bash", str(ROOT / "bench" / "device_check.sh"), "--device", "cpu", "--quick", "--no-tests", "--batches", "1,64"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    report = json.loads((tmp_path / "device_check.json").read_text())
    variants = [row["variant"] for row in report["results"]]
    assert variants[:4] == ["torch fp32", "torch bf16", "torch fp16", "torch fp32 host tables"]
    assert variants[4:] == ["onnxruntime CPU"]
    for row in report["results"]:
        assert all(v > 0 for v in (row["device_inputs"] or row["host_inputs"]).values()), row
    byname = {row["variant"]: row for row in report["results"]}
    assert byname["torch fp32 host tables"]["max_abs_dp"] == 0.0 and byname["torch fp32 host tables"]["tables"] == "host"
    assert 0 < byname["torch fp16"]["max_abs_dp"] < 1e-3
    md = (tmp_path / "device_check.md").read_text()
    assert "| torch bf16 |" in md and "B=64" in md and "GPU tests (`pytest -m gpu`): not run (--no-tests)" in md
    assert (tmp_path / "device_check.png").stat().st_size > 0
