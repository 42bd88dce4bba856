"""The numpy-only layers import no torch, and the ONNX backend serves without it.

Each check runs in a fresh interpreter whose import system refuses ``torch``
(and its submodules), the way a client-only or ONNX-only install would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent

# Prepended to every child script: a finder that makes `import torch` fail.
BLOCK_TORCH = textwrap.dedent(
    """
    import sys

    class _NoTorch:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ModuleNotFoundError(f"torch is blocked in this test ({name})", name=name)
            return None

    sys.meta_path.insert(0, _NoTorch())
    """
)


def run_without_torch(code: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, "-c", BLOCK_TORCH + textwrap.dedent(code)],
        capture_output=True, text=True, timeout=120, env=env, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_the_block_works():
    """The hook itself: a module that does import torch fails under it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", BLOCK_TORCH + "import dlrm_serve.model.weights"],
        capture_output=True, text=True, timeout=120, env=env, cwd=ROOT,
    )
    assert proc.returncode != 0 and "torch is blocked" in proc.stderr


def test_numpy_layers_import_without_torch(tmp_path, demo_config):
    (tmp_path / "dlrm.json").write_text(demo_config.to_json())
    out = run_without_torch(
        f"""
        import dlrm_serve.config, dlrm_serve.io.features, dlrm_serve.io.codecs, dlrm_serve.serve.serving
        import dlrm_serve.client, dlrm_serve.cli.client
        # The rest of the "no torch" column of the README's module table.
        import dlrm_serve.runtime.backends, dlrm_serve.runtime.onnx_backend, dlrm_serve.runtime.export, dlrm_serve.runtime.memory
        import dlrm_serve.testing.launcher, dlrm_serve.client.protos, dlrm_serve.testing.procmem, dlrm_serve.serve.packaging
        import dlrm_serve.errors, dlrm_serve.cli, dlrm_serve.io.criteo, dlrm_serve.io.synthetic, dlrm_serve.offline.evaluation, dlrm_serve.offline.score
        import dlrm_serve.serve.oip, dlrm_serve.runtime.placement, dlrm_serve.client.rolling
        from dlrm_serve.artifacts import CONFIG_FILE, WEIGHTS_FILE, load_config
        from dlrm_serve.errors import ConfigError
        config = load_config({str(tmp_path)!r})
        try:
            load_config({str(tmp_path / "missing")!r})
        except ConfigError as e:
            print("missing:", e)
        print(config.num_sparse, CONFIG_FILE, WEIGHTS_FILE)
        print("torch loaded:", "torch" in sys.modules)
        """
    )
    assert f"{demo_config.num_sparse} dlrm.json dlrm.safetensors" in out
    assert "missing: config file" in out
    assert "torch loaded: False" in out


def test_onnx_backend_serves_without_torch(tmp_path, demo_artifacts, demo_backend, make_rows):
    pytest.importorskip("onnxruntime")
    from dlrm_serve.runtime.export import export_onnx
    from dlrm_serve.io.features import FeatureEncoder

    # Export needs torch (here); serving the export must not (the child).
    folder = tmp_path / "onnx"
    folder.mkdir()
    for f in Path(demo_artifacts).iterdir():
        (folder / f.name).symlink_to(f)
    export_onnx(folder)
    rows = make_rows(16, seed=3).instances
    want = demo_backend.predict(FeatureEncoder(demo_backend.config).encode_instances(rows))
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    out = run_without_torch(
        f"""
        import json
        from dlrm_serve.runtime.backends import load_backend
        from dlrm_serve.io.features import FeatureEncoder
        backend = load_backend({str(folder)!r}, "onnxruntime", threads=1)
        rows = json.load(open({str(tmp_path / "rows.json")!r}))
        p = backend.predict(FeatureEncoder(backend.config).encode_instances(rows))
        print(json.dumps({{"p": p.tolist(), "torch": "torch" in sys.modules}}))
        """
    )
    got = json.loads(out.strip().splitlines()[-1])
    assert got["torch"] is False
    np.testing.assert_allclose(np.array(got["p"]), want, atol=1e-5)
