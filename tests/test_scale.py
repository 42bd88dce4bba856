"""Tables are memory-mapped, never copied: in-process and in real TorchServe workers.

Small models only; the Kaggle-size numbers come from ``make bench-scale``.
The serving tests register extra models on the session's TorchServe (see
conftest.py) and unregister them at the end.
"""

from __future__ import annotations

import json
import mmap
import os

import numpy as np
import pytest

from dlrm_serve.artifacts import WEIGHTS_FILE, load_model
from dlrm_serve.errors import LaunchError
from dlrm_serve.runtime.backends import load_backend
from dlrm_serve.runtime.memory import PAGE_SIZE, touch_mapped_file, touch_pages, touch_tables
from dlrm_serve.testing.procmem import file_usage, mapped_file, process_memory, rollup, torchserve_workers
from dlrm_serve.model.quantize import quantize_artifacts

from conftest import build_archive

JSON = "application/json"


def table_bytes(model) -> int:
    return sum(t.nbytes for t in model.sparse_arch.state_dict().values())


# ----- the readers, on memory we lay out ourselves -------------------------------------
def test_file_usage_counts_the_pages_read_and_only_those(tmp_path):
    path = tmp_path / "blob"
    pages = 64
    path.write_bytes(os.urandom(pages * PAGE_SIZE))
    before = rollup(os.getpid())
    assert before["Pss"] > 0 and before["Rss"] >= before["Pss"]
    assert file_usage(os.getpid(), path)["Size"] == 0  # not mapped yet
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as m:
        for i in range(0, pages // 2):
            m[i * PAGE_SIZE]  # read half of the pages
        # A link to the file is the same file: matched by inode, not by name.
        os.link(path, tmp_path / "link")
        half = file_usage(os.getpid(), tmp_path / "link")
        assert half["Size"] == pages * PAGE_SIZE
        assert pages // 2 * PAGE_SIZE <= half["Rss"] <= pages * PAGE_SIZE
        assert half["Anonymous"] == 0
        for i in range(pages):
            m[i * PAGE_SIZE]
        full = file_usage(os.getpid(), path)
        assert full["Rss"] == pages * PAGE_SIZE
        # Mapped by this process alone: PSS is all of it, and it is file-backed.
        assert full["Pss"] == full["Rss"] == full["Private_Clean"] + full["Private_Dirty"]
        # Found through /proc/self/maps and read page by page: all of it mapped.
        (tmp_path / "other").write_bytes(b"x" * PAGE_SIZE)
        assert touch_mapped_file(tmp_path / "other") == 0  # not mapped here: nothing to touch
        assert touch_mapped_file(path) == pages * PAGE_SIZE
        mem = process_memory(os.getpid(), path)
        assert mem.file_pss == full["Pss"] and mem.pss_without_file == mem.pss - full["Pss"]
        assert mapped_file(np.frombuffer(m, dtype=np.uint8).ctypes.data).samefile(path)
    with pytest.raises(LaunchError, match="no process"):
        rollup(2**22 + 12345)


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_loaded_tables_are_the_mapped_file_and_touching_maps_them(demo_artifacts, tmp_path, dtype):
    folder = demo_artifacts
    if dtype == "int8":
        folder = tmp_path / "int8"
        quantize_artifacts(demo_artifacts, folder, progress=False)
    weights = folder / WEIGHTS_FILE
    model = load_model(folder)
    for t in model.sparse_arch.state_dict().values():
        assert mapped_file(t.data_ptr()).samefile(weights)
    n = touch_tables(model)
    assert n == table_bytes(model)
    usage = file_usage(os.getpid(), weights)
    # Every table page is resident and file-backed; nothing was copied on write.
    assert usage["Rss"] >= n and usage["Anonymous"] == 0
    assert usage["Size"] >= os.path.getsize(weights)


def test_onnxruntime_maps_the_tables_from_the_data_file(tmp_path):
    pytest.importorskip("onnxruntime")
    from dlrm_serve.config import DLRMConfig
    from dlrm_serve.runtime.export import ONNX_DATA_FILE, export_onnx
    from dlrm_serve.model.quantize import init_artifacts

    # 80 MB of tables: a copy would stand out from onnxruntime's own few MB.
    config = DLRMConfig(
        table_sizes=(1_250_000, 10), embedding_dim=16, bottom_mlp=(16,), top_mlp=(8, 1),
        dense_names=("a",), sparse_names=("x", "y"),
    )
    folder = tmp_path / "onnx"
    init_artifacts(config, folder)
    export_onnx(folder)
    data = folder / ONNX_DATA_FILE
    before = rollup(os.getpid())["Anonymous"]
    backend = load_backend(folder, "onnxruntime", threads=1)
    # Each session maps the external data file instead of reading it into its own memory.
    usage = file_usage(os.getpid(), data)
    assert usage["Size"] >= os.path.getsize(data)
    tables = table_bytes(load_model(folder))
    assert touch_mapped_file(data) >= tables
    usage = file_usage(os.getpid(), data)
    assert usage["Rss"] >= tables and usage["Anonymous"] == 0
    # Loading copied no table: far less new anonymous memory than the tables' size.
    assert rollup(os.getpid())["Anonymous"] - before < tables / 2, (tables, before)
    assert backend.describe()["backend"] == "onnxruntime"


def test_touch_pages_reads_without_writing(tmp_path):
    import torch

    t = torch.arange(10 * PAGE_SIZE // 4, dtype=torch.float32)
    before = t.clone()
    assert touch_pages(t) == t.nbytes
    assert torch.equal(t, before)
    assert touch_pages(torch.empty(0)) == 0
    with pytest.raises(ValueError, match="contiguous"):
        touch_pages(t.view(-1, 2)[:, 0])


# ----- real TorchServe workers ------------------------------------------------------------
def wait_workers(torchserve, name: str, count: int) -> list[int]:
    torchserve.wait_ready(name, workers=count, timeout=120)
    pids = torchserve.worker_pids(name)
    assert len(pids) == count
    return pids


@pytest.mark.integration
def test_two_workers_share_one_copy_of_the_tables(torchserve, model_store, demo_artifacts, make_rows, expected):
    name = "dlrm_shared"
    build_archive(
        demo_artifacts, model_store, "--model-name", name, "--archive-format", "no-archive",
        "--workers", "2", "--touch-tables",
    )
    weights = model_store / name / WEIGHTS_FILE
    torchserve.register(name, initial_workers=2)
    try:
        pids = wait_workers(torchserve, name, 2)
        # The workers found below the server process are the ones the API reports.
        assert set(pids) <= set(torchserve_workers(torchserve.process.pid))
        tables = table_bytes(load_model(demo_artifacts))
        for pid in pids:
            usage = file_usage(pid, weights)
            # Each worker maps the archive's file itself (no-archive: no unpacked
            # copy), has read all of its tables (touch_tables), and copied none.
            assert usage["Rss"] >= tables, usage
            assert usage["Anonymous"] == 0, usage
            # Mapped by both workers: the pages are shared, each charged half.
            assert usage["Shared_Clean"] + usage["Shared_Dirty"] >= tables, usage
            assert abs(2 * usage["Pss"] - usage["Rss"]) <= 0.02 * usage["Rss"], usage
        rows = make_rows(16, seed=5)
        r = torchserve.predict(name, json.dumps({"instances": rows.instances}), JSON)
        assert r.status == 200, r.text
        np.testing.assert_allclose(r.json()["predictions"], expected(rows.instances), atol=1e-6, rtol=0)
        log = torchserve.log_text()
        assert log.count(f"dlrm touched {tables} table bytes") >= 2
    finally:
        torchserve.unregister(name)


@pytest.mark.integration
def test_int8_archive_serves_what_the_int8_model_predicts(torchserve, model_store, demo_artifacts, tmp_path_factory, make_rows, expected):
    int8 = tmp_path_factory.mktemp("int8")
    quantize_artifacts(demo_artifacts, int8, progress=False)
    name = "dlrm_int8"
    build_archive(int8, model_store, "--model-name", name, "--workers", "1")
    torchserve.register(f"{name}.mar", initial_workers=1)
    try:
        wait_workers(torchserve, name, 1)
        rows = make_rows(200, seed=21)
        r = torchserve.predict(name, json.dumps({"instances": rows.instances}), JSON)
        assert r.status == 200, r.text
        got = np.asarray(r.json()["predictions"], dtype=np.float32)
        # Exactly the in-process int8 model ...
        from dlrm_serve.io.features import FeatureEncoder

        backend = load_backend(int8)
        assert backend.config.table_dtype == "int8"
        want8 = backend.predict(FeatureEncoder(backend.config).encode_instances(rows.instances))
        np.testing.assert_allclose(got, want8, atol=1e-6, rtol=0)
        # ... and close to fp32: a row's error is at most half a quantisation step.
        diff = np.abs(got - expected(rows.instances))
        assert 0 < diff.max() < 2e-3, diff.max()
    finally:
        torchserve.unregister(name)
