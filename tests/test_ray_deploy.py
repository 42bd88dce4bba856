"""deploy/ray/: the KubeRay RayJob against KubeRay's own CRD schema (third_party/kuberay/,
Apache-2.0, commit in its README), and its entrypoint against dlrm-serve's own parser."""

from __future__ import annotations

import copy
import json
import shlex

import pytest
import yaml

from conftest import ROOT
from dlrm_serve.cli import build_parser
from kube_schema import validate

RAYJOB = ROOT / "deploy" / "ray" / "rayjob.yaml"


@pytest.fixture(scope="module")
def crd():
    return json.loads((ROOT / "third_party" / "kuberay" / "rayjob.v1.schema.json").read_text())


@pytest.fixture(scope="module")
def job():
    return yaml.safe_load(RAYJOB.read_text())


def test_rayjob_is_valid_against_the_kuberay_crd(crd, job):
    assert job["apiVersion"] == f"{crd['group']}/{crd['version']}" and job["kind"] == crd["kind"]
    assert validate(job, crd["openAPIV3Schema"]) == []


def test_the_validator_catches_a_broken_rayjob(crd, job):
    broken = copy.deepcopy(job)
    broken["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replica"] = 2  # typo of replicas
    del broken["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]
    errors = validate(broken, crd["openAPIV3Schema"])
    assert any("replica" in e for e in errors) and any("template" in e for e in errors), errors


def test_entrypoint_is_the_ray_score_command_with_artifacts_on_the_volume(job):
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["dlrm-serve", "score"]
    args = build_parser().parse_args(argv[1:])
    assert args.engine == "ray" and args.address == "auto"
    spec = job["spec"]["rayClusterSpec"]
    mounts = {
        m["mountPath"]: m["name"]
        for g in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        for c in g["template"]["spec"]["containers"]
        for m in c["volumeMounts"]
    }
    assert mounts.get(args.artifacts) == "artifacts"
    # Actors x threads fit the CPUs Ray is given on the workers (the head schedules none).
    cpus = sum(int(g["rayStartParams"]["num-cpus"]) * g["replicas"] for g in spec["workerGroupSpecs"])
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert args.actors * args.threads <= cpus
    assert spec["rayVersion"] == "2.60.0"


def test_the_package_imports_without_ray():
    """ray is an optional extra: the CLI and the Ray engine's module import it only when a job runs."""
    import subprocess
    import sys

    code = (
        "import sys; import dlrm_serve.cli, dlrm_serve.offline.ray_score, dlrm_serve.offline.score; "
        "bad = [m for m in sys.modules if m == 'ray' or m.startswith(('ray.', 'pyarrow'))]; "
        "sys.exit(f'imported {bad}' if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
