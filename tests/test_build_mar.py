"""build_mar.sh: checks before packaging, options, and a self-contained archive."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, build_archive

from dlrm_serve.serve.packaging import serving_modules

SCRIPT = ROOT / "build_mar.sh"


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True)


def test_help_documents_every_option():
    r = run_script("--help")
    assert r.returncode == 0
    for opt in [
        "--artifacts", "--model-name", "--version", "--backend", "--model-store", "--archive-format",
        "--workers", "--threads", "--batch-size", "--max-batch-delay", "--max-rows", "zip-store", "no-archive",
    ]:
        assert opt in r.stdout, opt


def test_missing_artifacts_are_named(tmp_path):
    r = run_script("--artifacts", str(tmp_path / "nowhere"), "--model-store", str(tmp_path))
    assert r.returncode != 0 and "nowhere' not found" in r.stderr
    (tmp_path / "art").mkdir()
    (tmp_path / "art" / "dlrm.json").write_text("{}")
    r = run_script("--artifacts", str(tmp_path / "art"), "--model-store", str(tmp_path))
    assert r.returncode != 0 and "dlrm.safetensors' is missing" in r.stderr
    assert not list(tmp_path.glob("*.mar"))


def test_shapes_that_disagree_with_the_config_are_refused(tmp_path, demo_artifacts):
    art = tmp_path / "art"
    art.mkdir()
    (art / "dlrm.safetensors").write_bytes((demo_artifacts / "dlrm.safetensors").read_bytes())
    config = json.loads((demo_artifacts / "dlrm.json").read_text())
    config["embedding_dim"] = 8
    config["bottom_mlp"][-1] = 8
    (art / "dlrm.json").write_text(json.dumps(config))
    r = run_script("--artifacts", str(art), "--model-store", str(tmp_path))
    assert r.returncode != 0
    assert "has shape" in r.stderr and "the config implies" in r.stderr
    assert "failed the check" in r.stderr
    assert not list(tmp_path.glob("*.mar"))


@pytest.mark.parametrize("args,message", [
    (["--backend", "tensorrt"], "--backend must be torch or onnxruntime"),
    (["--archive-format", "tgz2"], "--archive-format must be"),
    (["--workers", "0"], "--workers must be an integer >= 1"),
    (["--max-batch-delay", "0"], "--max-batch-delay must be an integer >= 1"),
    (["--batch-size", "x"], "--batch-size must be an integer"),
    (["--model-name", "a/b"], "--model-name must be"),
    (["--bogus"], "unknown option '--bogus'"),
    (["--artifacts"], "--artifacts needs a value"),
])
def test_bad_options(args, message):
    r = run_script(*args)
    assert r.returncode == 2 and message in r.stderr


def test_onnxruntime_needs_and_ships_the_onnx_file(tmp_path, demo_artifacts):
    art = tmp_path / "art"
    art.mkdir()
    for f in ("dlrm.json", "dlrm.safetensors"):
        (art / f).write_bytes((demo_artifacts / f).read_bytes())
    r = run_script("--artifacts", str(art), "--model-store", str(tmp_path), "--backend", "onnxruntime")
    assert r.returncode != 0 and "needs" in r.stderr and "dlrm.onnx" in r.stderr
    # Packaging only: the file's content is the exporter's business.
    (art / "dlrm.onnx").write_bytes(b"onnx graph")
    (art / "dlrm.onnx.data").write_bytes(b"external weights")
    build_archive(art, tmp_path, "--backend", "onnxruntime")
    with zipfile.ZipFile(tmp_path / "dlrm_onnx.mar") as z:
        names = set(z.namelist())
        manifest = json.loads(z.read("MAR-INF/MANIFEST.json"))
        settings = yaml.safe_load(z.read("model-config.yaml"))
    assert {"dlrm.onnx", "dlrm.onnx.data", "dlrm.json"} <= names
    # The tables are in dlrm.onnx.data: no second copy of them as safetensors.
    assert "dlrm.safetensors" not in names
    assert manifest["model"]["serializedFile"] == "dlrm.onnx"
    assert settings["dlrm"]["backend"] == "onnxruntime"


def test_archive_contents_and_settings(model_store):
    with zipfile.ZipFile(model_store / "dlrm.mar") as z:
        names = set(z.namelist())
        manifest = json.loads(z.read("MAR-INF/MANIFEST.json"))
        settings = yaml.safe_load(z.read("model-config.yaml"))
    assert {"dlrm_handler.py", "dlrm.json", "dlrm.safetensors", "model-config.yaml"} <= names
    for module in ["__init__", "runtime/backends", "serve/serving", "io/codecs", "io/features", "config", "errors",
                   "artifacts", "model/dlrm"]:
        assert f"dlrm_serve/{module}.py" in names
    # Only what the handler imports: exactly the closure, and none of the tools.
    package = {n for n in names if n.startswith("dlrm_serve/")}
    assert package == set(serving_modules(ROOT / "handler" / "dlrm_handler.py", ROOT))
    for tool in ["testing/launcher", "offline/train", "model/checkpoints/reference", "cli/__init__", "io/data", "offline/score",
                 "model/quantize", "serve/packaging"]:
        assert f"dlrm_serve/{tool}.py" not in names
    assert not [n for n in names if n.startswith("dlrm_serve/client/")]
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc") or "_proto" in n]
    assert manifest["model"]["modelName"] == "dlrm" and manifest["model"]["handler"] == "dlrm_handler.py"
    assert manifest["model"]["serializedFile"] == "dlrm.safetensors"
    assert settings == {
        "minWorkers": 2, "maxWorkers": 2, "batchSize": 16, "maxBatchDelay": 1,
        "responseTimeout": 120, "startupTimeout": 120,
        "dlrm": {"backend": "torch", "max_rows": 8192, "threads": 0, "touch_tables": False, "precision": "fp32"},
    }


def test_no_archive_and_zip_store_formats(tmp_path, demo_artifacts):
    build_archive(demo_artifacts, tmp_path, "--archive-format", "no-archive", "--version", "2.5", "--workers", "3")
    folder = tmp_path / "dlrm"
    assert (folder / "dlrm_serve" / "io" / "features.py").is_file() and (folder / "dlrm.safetensors").is_file()
    assert json.loads((folder / "MAR-INF" / "MANIFEST.json").read_text())["model"]["modelVersion"] == "2.5"
    assert yaml.safe_load((folder / "model-config.yaml").read_text())["minWorkers"] == 3
    build_archive(demo_artifacts, tmp_path, "--archive-format", "zip-store", "--model-name", "stored")
    with zipfile.ZipFile(tmp_path / "stored.mar") as z:
        assert {i.compress_type for i in z.infolist()} == {zipfile.ZIP_STORED}


# The archive must load with torch, torchserve, numpy, pyyaml and safetensors only:
# the script runs in a clean interpreter that cannot see the repository, the
# editable install or the packages a bare TorchServe would not have.
SELF_CONTAINED = textwrap.dedent(
    """
    import importlib.abc, json, sys
    unpacked, repo = sys.argv[1], sys.argv[2]
    FORBIDDEN = {"onnx", "onnxruntime", "grpc", "tqdm", "matplotlib", "requests", "pytest", "bench", "tests"}

    class Refuse(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in FORBIDDEN:
                raise ImportError(f"{name} is not available on a bare TorchServe")
            return None

    sys.meta_path = [Refuse()] + [f for f in sys.meta_path if "editable" not in repr(f).lower()]
    inside = lambda p: p == repo or (p.startswith(repo + "/") and "site-packages" not in p)
    sys.path = [unpacked] + [p for p in sys.path if p and not inside(p)]
    import ts
    from ts.context import Context, RequestProcessor
    import dlrm_handler, dlrm_serve
    assert dlrm_serve.__file__.startswith(unpacked), dlrm_serve.__file__
    import yaml
    ctx = Context("dlrm", unpacked, {"model": {}}, 1, None, ts.__version__, True, None,
                  yaml.safe_load(open(unpacked + "/model-config.yaml")))
    h = dlrm_handler.DLRMHandler()
    h.initialize(ctx)
    ctx.request_processor = [RequestProcessor({"Content-Type": "application/json"})]
    out = h.handle([{"body": json.loads(sys.argv[3])}], ctx)
    loaded = sorted(m for m in sys.modules if m.startswith("dlrm_serve"))
    print(json.dumps({"reply": json.loads(out[0]), "file": dlrm_serve.__file__, "modules": loaded}))
    """
)


def test_archive_is_self_contained(tmp_path, model_store, make_rows, expected):
    unpacked = tmp_path / "unpacked"
    with zipfile.ZipFile(model_store / "dlrm.mar") as z:
        z.extractall(unpacked)
    rows = make_rows(3, seed=21)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    r = subprocess.run(
        [sys.executable, "-c", SELF_CONTAINED, str(unpacked), str(ROOT), json.dumps({"instances": rows.instances})],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["file"].startswith(str(unpacked))
    assert "dlrm_serve.serve.serving" in out["modules"]
    got = out["reply"]["predictions"]
    want = expected(rows.instances)
    assert max(abs(a - b) for a, b in zip(got, want)) <= 1e-6
