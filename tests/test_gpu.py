"""The GPU path on a real CUDA device: run with ``pytest -m gpu`` on a GPU machine.

Every test here is marked ``gpu`` and skipped where torch sees no CUDA
device.  The file is self-contained (no conftest fixtures), so
``bench/device_check.sh`` can run it with ``--noconftest`` on a machine
that has torch but not TorchServe, Java or the rest of the test stack.

Tolerances against the CPU fp32 answers (probabilities): fp32 1e-5 (TF32
off), fp16 1e-3, bf16 5e-3.  On the CPU the same casts gave at most 1.4e-4
(fp16) and 1.6e-3 (bf16) on random models (2000 to 8192 rows).

The helpers at the top need no GPU; tests/test_placement.py reuses them.
"""

from __future__ import annotations

import types

import pytest
import torch

# The device check may run where only torch is installed: skip rather than fail to import.
np = pytest.importorskip("numpy")

from dlrm_serve.config import DEMO_TABLE_SIZES, preset  # noqa: E402

CUDA = torch.cuda.is_available()
GPUS = torch.cuda.device_count() if CUDA else 0
TOL = {"fp32": 1e-5, "fp16": 1e-3, "bf16": 5e-3}
SMALL = preset("demo", table_sizes=tuple(min(s, 3000) for s in DEMO_TABLE_SIZES))


# ----- helpers (no GPU needed) -----------------------------------------------------------
def make_artifacts(path, config=SMALL, seed: int = 1234):
    """Random weights for ``config`` saved in ``path`` (needs safetensors)."""
    pytest.importorskip("safetensors")
    from dlrm_serve.artifacts import save_artifacts
    from dlrm_serve.model.dlrm import DLRM

    torch.manual_seed(seed)
    save_artifacts(DLRM(config), path)
    return path


def random_batch(config, rows: int, seed: int = 0, multi_hot: bool = False):
    """A :class:`FeatureBatch` of ``rows`` random rows through the encoder: one id per bag, or bags of 0-4 ids."""
    from dlrm_serve.io.features import FeatureEncoder

    rng = np.random.default_rng(seed)
    enc = FeatureEncoder(config)
    dense = rng.lognormal(1.0, 2.0, size=(rows, config.num_dense)).astype(np.float32)
    sizes = np.tile(np.asarray(config.table_sizes), rows)
    if not multi_hot:
        return enc.encode_arrays(dense, rng.integers(0, sizes))
    lengths = rng.integers(0, 5, size=rows * config.num_sparse)
    return enc.encode_arrays(dense, rng.integers(0, np.repeat(sizes, lengths)), lengths)


def fake_context(gpu_id, device_type: str | None = "gpu", dlrm: dict | None = None):
    """What the handler reads from TorchServe's context: ``gpu_id`` and model-config.yaml."""
    yaml_config = {"dlrm": dlrm or {}}
    if device_type:
        yaml_config["deviceType"] = device_type
    return types.SimpleNamespace(system_properties={"gpu_id": gpu_id, "model_dir": "."}, model_yaml_config=yaml_config)


def cpu_answer(artifacts, batch) -> np.ndarray:
    from dlrm_serve.runtime.backends import load_backend

    return load_backend(artifacts, "torch", device="cpu").predict(batch)


# ----- fixtures ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    return make_artifacts(tmp_path_factory.mktemp("gpu-artifacts"))


@pytest.fixture(scope="module")
def batches():
    return {
        (rows, multi): random_batch(SMALL, rows, seed=rows, multi_hot=multi)
        for rows in (1, 7, 64, 300, 5000)
        for multi in (False, True)
    }


@pytest.fixture(scope="module")
def want(artifacts, batches):
    return {key: cpu_answer(artifacts, b) for key, b in batches.items()}


# ----- placement -----------------------------------------------------------------------------
@pytest.mark.parametrize("gpu_id", [0, 1])
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="torch sees no CUDA device")
def test_each_worker_runs_on_its_gpu_id(artifacts, gpu_id):
    from dlrm_serve.runtime.backends import load_backend
    from dlrm_serve.errors import DeviceError
    from dlrm_serve.runtime.placement import backend_options, place_worker
    from dlrm_serve.serve.serving import read_settings

    ctx = fake_context(gpu_id)
    settings = read_settings(ctx.model_yaml_config)
    if gpu_id >= GPUS:
        with pytest.raises(DeviceError, match=f"gpu_id {gpu_id}"):
            place_worker(settings, ctx)
        return
    placement = place_worker(settings, ctx)
    assert placement.device == f"cuda:{gpu_id}" and "gpu_id" in placement.reason
    backend = load_backend(artifacts, "torch", **backend_options(settings, placement))
    info = backend.describe()
    assert info["device"] == f"cuda:{gpu_id}" and info["device_reason"] == placement.reason
    assert backend.model.dense_arch.mlp[0].weight.device == torch.device("cuda", gpu_id)
    # A CPU archive on the same GPU server stays on the CPU.
    assert place_worker(read_settings({}), fake_context(gpu_id, device_type=None)).device == "cpu"


# ----- torch on CUDA -------------------------------------------------------------------------
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("graphs", [True, False])
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="torch sees no CUDA device")
def test_torch_cuda_matches_cpu_fp32(artifacts, batches, want, precision, graphs):
    from dlrm_serve.runtime.backends import load_backend

    backend = load_backend(artifacts, "torch", device="cuda", precision=precision, cuda_graphs=graphs)
    info = backend.describe()
    assert info["device"] == "cuda:0" and info["precision"] == precision and info["tf32"] is False
    assert info["tables"] == "device" and (info["cuda_graphs"] is False) == (not graphs)
    for key, batch in batches.items():
        got = backend.predict(batch)
        assert got.dtype == np.float32 and got.shape == (batch.batch_size,)
        assert float(np.abs(got - want[key]).max()) <= TOL[precision], (key, precision)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="torch sees no CUDA device")
def test_graph_buckets_give_the_eager_answers(artifacts, batches):
    from dlrm_serve.artifacts import load_model
    from dlrm_serve.runtime.cuda_runner import CudaRunner

    dev = torch.device("cuda", 0)
    # Small buckets, so 300 and 5000 rows run in chunks of the largest.
    graphs = CudaRunner(load_model(artifacts), dev, buckets=(1, 8, 64))
    eager = CudaRunner(load_model(artifacts), dev, cuda_graphs=False)
    assert graphs.describe()["cuda_graphs"] == [1, 8, 64]
    for key, b in batches.items():
        got = graphs.predict_numpy(b.dense, b.indices, b.offsets)
        ref = eager.predict_numpy(b.dense, b.indices, b.offsets)
        assert float(np.abs(got - ref).max()) <= 1e-6, key
    # Inputs already on the device give the same answers.
    b = batches[(64, False)]
    on_dev = graphs.forward(torch.from_numpy(b.dense).to(dev), torch.from_numpy(b.indices).to(dev))
    assert on_dev.device == dev
    assert float(np.abs(on_dev.cpu().numpy() - eager.predict_numpy(b.dense, b.indices, None)).max()) <= 1e-6


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="torch sees no CUDA device")
def test_tables_kept_in_host_memory(artifacts, batches, want):
    from dlrm_serve.runtime.backends import load_backend

    for options in ({"tables": "host"}, {"tables": "auto", "memory_share": 1e-9}):
        backend = load_backend(artifacts, "torch", device="cuda:0", **options)
        info = backend.describe()
        assert info["tables"] == "host" and "host memory" in info["tables_reason"]
        assert backend.model.sparse_arch.weight.device.type == "cpu"  # still the memory-mapped file
        assert backend.model.over_arch.mlp[0].weight.device.type == "cuda"
        for key, batch in batches.items():
            assert float(np.abs(backend.predict(batch) - want[key]).max()) <= TOL["fp32"], key
        assert backend.describe()["pinned_staging"] is True


# ----- onnxruntime on CUDA ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def onnx_artifacts(artifacts):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from dlrm_serve.runtime.export import export_onnx
    from dlrm_serve.runtime.onnx_backend import cuda_provider_usable

    if not cuda_provider_usable():
        pytest.skip("onnxruntime's CUDA provider does not load here")
    export_onnx(artifacts)
    return artifacts


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="torch sees no CUDA device")
def test_onnxruntime_cuda_with_io_binding_matches_cpu(onnx_artifacts, batches, want):
    from dlrm_serve.runtime.backends import load_backend

    bound = load_backend(onnx_artifacts, "onnxruntime", device="cuda:0")
    info = bound.describe()
    assert info["provider"] == "CUDAExecutionProvider" and info["device"] == "cuda:0"
    assert info["io_binding"] is True and info["tables"] == "device"
    plain = load_backend(onnx_artifacts, "onnxruntime", device="cuda:0", io_binding=False)
    assert plain.describe()["io_binding"] is False
    for key, batch in batches.items():
        got = bound.predict(batch)
        assert got.dtype == np.float32 and got.shape == (batch.batch_size,)
        assert float(np.abs(got - want[key]).max()) <= TOL["fp32"], key
        assert float(np.abs(got - plain.predict(batch)).max()) <= 1e-6, key


# ----- the handler, where TorchServe's Python side is installed --------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="torch sees no CUDA device")
def test_handler_puts_a_gpu_archive_on_its_gpu(artifacts):
    pytest.importorskip("ts")
    import importlib.util
    import json
    from pathlib import Path

    from ts.context import Context, RequestProcessor

    path = Path(__file__).resolve().parents[1] / "handler" / "dlrm_handler.py"
    spec = importlib.util.spec_from_file_location("dlrm_handler_gpu", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yaml_config = {"deviceType": "gpu", "minWorkers": 1, "dlrm": {"backend": "torch"}}
    ctx = Context("dlrm", str(artifacts), {"model": {}}, 1, 0, "0.12.0", True, None, yaml_config)
    h = module.DLRMHandler()
    h.initialize(ctx)
    info = h.backend.describe()
    assert info["device"] == "cuda:0" and info["tables"] == "device" and info["cuda_graphs"]
    assert "gpu_id" in info["device_reason"]
    from dlrm_serve.io.features import FeatureEncoder

    rng = np.random.default_rng(9)
    instances = [
        {"dense": [int(rng.integers(0, 1000)) for _ in SMALL.dense_names],
         "sparse": [f"{int(rng.integers(0, 2**32)):08x}" for _ in SMALL.sparse_names]}
        for _ in range(5)
    ]
    want = cpu_answer(artifacts, FeatureEncoder(SMALL).encode_instances(instances))
    ctx.request_processor = [RequestProcessor({"Content-Type": "application/json"})]
    out = h.handle([{"body": {"instances": instances}}], ctx)
    got = np.asarray(json.loads(out[0])["predictions"], dtype=np.float32)
    assert float(np.abs(got - want).max()) <= TOL["fp32"]
