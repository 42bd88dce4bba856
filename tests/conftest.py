"""Shared fixtures: small random artifacts, built archives, one TorchServe per session.

- ``demo_config`` / ``demo_artifacts`` / ``demo_backend``: a small random DLRM
  (Criteo feature names, small tables) saved as artifacts, and the in-process
  backend that gives the reference predictions.
- ``model_store``: a model store holding ``dlrm.mar`` (loaded at start) and
  ``dlrm_b.mar`` (registered by tests), built with ``./build_mar.sh``.
- ``torchserve``: one real TorchServe for the whole session, started from the
  shipped ``config.properties`` on free loopback ports (so its security
  settings are what the tests exercise), always stopped at the end.
- ``make_rows``: random raw rows in every request format.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dlrm_serve.artifacts import save_artifacts
from dlrm_serve.runtime.backends import load_backend
from dlrm_serve.config import DEMO_TABLE_SIZES, preset
from dlrm_serve.model.dlrm import DLRM

ROOT = Path(__file__).resolve().parents[1]
HANDLER_DIR = ROOT / "handler"
# Small tables keep archives small and builds fast; names and counts are Criteo's.
DEMO_CONFIG = preset("demo", table_sizes=tuple(min(s, 3000) for s in DEMO_TABLE_SIZES))


def java_ok() -> bool:
    return subprocess.run(["bash", str(ROOT / "scripts" / "ensure_java.sh")], capture_output=True).returncode == 0


def build_archive(artifacts: Path, store: Path, *args: str) -> Path:
    """Run ./build_mar.sh; fail the test with its output when it fails.

    Archives are fp32 unless ``args`` say otherwise (a later ``--precision``
    wins): the tests compare them with the fp32 in-process backend to 1e-6,
    and build_mar.sh's default (auto) is bf16 on CPUs with native bfloat16.
    """
    cmd = [
        "bash", str(ROOT / "build_mar.sh"), "--artifacts", str(artifacts), "--model-store", str(store),
        "--precision", "fp32", *args,
    ]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail(f"build_mar.sh failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return store


@pytest.fixture(scope="session")
def demo_config():
    return DEMO_CONFIG


@pytest.fixture(scope="session")
def demo_artifacts(tmp_path_factory) -> Path:
    torch.manual_seed(1234)
    path = tmp_path_factory.mktemp("artifacts")
    save_artifacts(DLRM(DEMO_CONFIG), path)
    return path


@pytest.fixture(scope="session")
def demo_backend(demo_artifacts):
    return load_backend(demo_artifacts, "torch")


class Rows:
    """Random rows of one config, as JSON instances and as the other formats."""

    def __init__(self, config, n: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.config = config
        self.instances = []
        for _ in range(n):
            dense = [None if rng.random() < 0.1 else int(rng.integers(0, 1000)) for _ in config.dense_names]
            sparse = [None if rng.random() < 0.05 else f"{int(rng.integers(0, 2**32)):08x}" for _ in config.sparse_names]
            self.instances.append({"dense": dense, "sparse": sparse})

    def named(self, i: int) -> dict:
        inst = self.instances[i]
        out = {n: v for n, v in zip(self.config.dense_names, inst["dense"]) if v is not None}
        out.update({n: v for n, v in zip(self.config.sparse_names, inst["sparse"]) if v is not None})
        return out

    def tsv_line(self, i: int, label: str | None = None) -> str:
        inst = self.instances[i]
        fields = ["" if v is None else str(v) for v in inst["dense"]]
        fields += ["" if v is None else v for v in inst["sparse"]]
        return "\t".join(([label] if label is not None else []) + fields)

    def tsv(self, start: int = 0, stop: int | None = None) -> str:
        stop = len(self.instances) if stop is None else stop
        return "\n".join(self.tsv_line(i) for i in range(start, stop)) + "\n"

    def binary(self, encoder, start: int = 0, stop: int | None = None) -> bytes:
        from dlrm_serve.io.codecs import encode_binary

        return encode_binary(encoder.raw_instances(self.instances[start:stop]))


@pytest.fixture(scope="session")
def make_rows(demo_config):
    return lambda n, seed=0: Rows(demo_config, n, seed)


@pytest.fixture(scope="session")
def expected(demo_backend):
    """Reference probabilities for JSON instances, from the in-process backend."""
    from dlrm_serve.io.features import FeatureEncoder

    encoder = FeatureEncoder(demo_backend.config)

    def predict(instances) -> np.ndarray:
        return demo_backend.predict(encoder.encode_instances(instances))

    return predict


@pytest.fixture(scope="session")
def model_store(tmp_path_factory, demo_artifacts) -> Path:
    store = tmp_path_factory.mktemp("serve") / "model_store"
    store.mkdir()
    build_archive(demo_artifacts, store)
    build_archive(demo_artifacts, store, "--model-name", "dlrm_b", "--workers", "1", "--batch-size", "8")
    return store


def serve(start_dir: Path, store: Path, archive: str = "dlrm.mar", workers: int = 2, server_class=None, **properties):
    """A real TorchServe from the shipped config.properties on free loopback ports, ``archive`` loaded.

    A generator for fixtures: it yields the server once ``workers`` of its model
    are READY and always stops it.  ``properties`` override config.properties keys.
    """
    if not java_ok():
        pytest.skip("TorchServe needs Java 11+ (scripts/ensure_java.sh could not provide it)")
    from dlrm_serve.testing.launcher import TorchServe

    server = (server_class or TorchServe)(
        start_dir,
        store,
        base_config=ROOT / "config.properties",
        load_models=archive,
        startup_timeout=120,
        properties=properties or None,
        log_config=ROOT / "log4j2.xml",
    )
    server.start()
    try:
        server.wait_ready(archive.removesuffix(".mar"), workers=workers, timeout=120)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def torchserve(tmp_path_factory, model_store):
    """One TorchServe for every integration test, started with dlrm.mar loaded."""
    yield from serve(tmp_path_factory.mktemp("ts_start"), model_store)


@pytest.fixture(scope="session")
def handler_module():
    """handler/dlrm_handler.py, imported the way TorchServe imports it."""
    if str(HANDLER_DIR) not in sys.path:
        sys.path.insert(0, str(HANDLER_DIR))
    import dlrm_handler

    return dlrm_handler
