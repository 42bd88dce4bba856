"""The CPU side of the GPU path: device choice, clear errors, settings, describe(),
the CUDA runner's logic on the CPU, and build_mar.sh --device gpu.

Runs everywhere (no GPU needed); tests/test_gpu.py runs the same path on CUDA.
"""

from __future__ import annotations

import subprocess
import zipfile

import numpy as np
import pytest
import torch
import yaml

from conftest import ROOT, build_archive
from dlrm_serve.artifacts import load_model
from dlrm_serve.runtime.backends import load_backend
from dlrm_serve.runtime.cuda_runner import CudaRunner, bucket_for, chunks
from dlrm_serve.errors import DeviceError, DLRMServeError
from dlrm_serve.runtime.placement import (
    Placement,
    backend_options,
    choose_device,
    choose_tables,
    parse_device,
    place_worker,
)
from dlrm_serve.serve.serving import read_settings
from test_gpu import TOL, fake_context, random_batch

NO_CUDA = not torch.cuda.is_available()
GIB = 1 << 30


def never() -> int:
    raise AssertionError("CUDA was asked about though the answer could not matter")


# ----- the device of a worker ------------------------------------------------------------------
@pytest.mark.parametrize("gpu_id", [0, 1, "1"])
def test_gpu_archive_worker_takes_its_gpu_id(gpu_id):
    p = choose_device("auto", "gpu", gpu_id, lambda: 2)
    assert p == Placement(f"cuda:{int(gpu_id)}", "deviceType is gpu; cuda:%d from TorchServe's gpu_id" % int(gpu_id))
    assert p.is_cuda


def test_cpu_unless_the_archive_asks_for_a_gpu_and_cuda_is_there():
    # Not a GPU archive, or no gpu_id from TorchServe: CUDA is not even asked about.
    assert choose_device("auto", None, 0, never).reason == "the archive asks for no GPU (no deviceType in model-config.yaml)"
    assert choose_device("auto", "cpu", 1, never).device == "cpu"
    assert "no gpu_id" in choose_device("auto", "gpu", None, never).reason
    assert choose_device("cpu", "gpu", 0, never) == Placement("cpu", "dlrm.device is 'cpu'")
    # A GPU archive on a server whose workers cannot use CUDA: the CPU, and why.
    p = choose_device("auto", "GPU", 0, lambda: 0, lambda: "torch is a CPU-only build")
    assert p.device == "cpu" and p.reason.endswith("CUDA is not usable here: torch is a CPU-only build")


def test_explicit_cuda_is_cuda_or_a_clear_error():
    assert choose_device("cuda", None, None, lambda: 1).device == "cuda:0"
    assert choose_device("cuda", "gpu", 1, lambda: 2).device == "cuda:1"
    assert choose_device("cuda:1", None, 0, lambda: 2).device == "cuda:1"  # the setting wins over gpu_id
    with pytest.raises(DeviceError, match="CUDA is not usable here: found nothing"):
        choose_device("cuda", None, 0, lambda: 0, lambda: "found nothing")
    with pytest.raises(DeviceError, match="asks for cuda:3, but only 2"):
        choose_device("cuda:3", None, None, lambda: 2)
    with pytest.raises(DeviceError, match="gpu_id 2, but only 2 CUDA device"):
        choose_device("auto", "gpu", 2, lambda: 2)
    with pytest.raises(ValueError, match="gpu_id must be"):
        choose_device("auto", "gpu", -1, lambda: 2)


@pytest.mark.parametrize("bad", ["tpu", "cuda:", "cuda:-1", "gpu", 1, None])
def test_device_strings(bad):
    assert parse_device("CUDA:2") == ("cuda", 2) and parse_device(" auto") == ("auto", None)
    with pytest.raises(ValueError, match="'auto', 'cpu', 'cuda' or 'cuda:N'"):
        parse_device(bad)


@pytest.mark.skipif(not NO_CUDA, reason="checks the answer of a machine without CUDA")
@pytest.mark.parametrize("gpu_id", [0, 1])
def test_place_worker_on_this_cpu_machine(gpu_id):
    ctx = fake_context(gpu_id)
    for backend in ("torch", "onnxruntime"):
        settings = read_settings({"dlrm": {"backend": backend}})
        p = place_worker(settings, ctx)
        assert p.device == "cpu" and "CUDA is not usable here" in p.reason
        assert backend_options(settings, p) == {"device": "cpu", "device_reason": p.reason, "precision": "fp32"}
        with pytest.raises(DeviceError, match="CUDA"):
            place_worker(read_settings({"dlrm": {"backend": backend, "device": "cuda"}}), ctx)


def test_backend_options_for_a_gpu_worker():
    settings = read_settings({"dlrm": {"tables": "host", "gpu_memory_share": 0.5, "cuda_graphs": False, "precision": "bf16"}})
    p = Placement("cuda:1", "why")
    assert backend_options(settings, p) == {
        "device": "cuda:1", "device_reason": "why", "tables": "host", "memory_share": 0.5, "cuda_graphs": False,
        "precision": "bf16",
    }
    onnx = backend_options({**settings, "backend": "onnxruntime"}, p)
    assert "cuda_graphs" not in onnx and onnx["tables"] == "host"


# ----- tables ------------------------------------------------------------------------------------
def test_tables_go_to_the_gpu_only_when_they_fit():
    assert choose_tables("auto", 2 * GIB, 100 * GIB)[0] == "device"
    where, why = choose_tables("auto", 90 * GIB, 100 * GIB, share=0.8)
    assert where == "host" and "host memory" in why and "80% of 100.00 GiB free" in why
    assert choose_tables("auto", 80 * GIB, 100 * GIB, share=0.8)[0] == "device"
    assert choose_tables("host", 1, 100 * GIB)[0] == "host"
    assert choose_tables("device", 90 * GIB, 100 * GIB)[0] == "device"
    with pytest.raises(DeviceError, match="do not fit"):
        choose_tables("device", 101 * GIB, 100 * GIB)
    with pytest.raises(ValueError, match="memory_share"):
        choose_tables("auto", 1, 2, share=0)
    with pytest.raises(ValueError, match="tables must be"):
        choose_tables("gpu", 1, 2)


# ----- settings ----------------------------------------------------------------------------------
def test_device_settings_are_checked():
    s = read_settings({"dlrm": {"device": "CUDA:1", "tables": "host", "gpu_memory_share": 1, "cuda_graphs": False}})
    assert (s["device"], s["tables"], s["gpu_memory_share"], s["cuda_graphs"]) == ("cuda:1", "host", 1.0, False)
    for bad, match in [
        ({"device": "gpu"}, "dlrm.device must be auto, cpu, cuda or cuda:N"),
        ({"device": 0}, "dlrm.device"),
        ({"tables": "disk"}, "dlrm.tables must be one of auto, device, host"),
        ({"gpu_memory_share": 0}, "gpu_memory_share"),
        ({"gpu_memory_share": 1.5}, "gpu_memory_share"),
        ({"gpu_memory_share": True}, "gpu_memory_share"),
        ({"cuda_graphs": "yes"}, "cuda_graphs"),
    ]:
        with pytest.raises(ValueError, match=match):
            read_settings({"dlrm": bad})


# ----- the backends ------------------------------------------------------------------------------
@pytest.mark.skipif(not NO_CUDA, reason="checks the error of a machine without CUDA")
def test_both_backends_refuse_cuda_they_cannot_use(demo_artifacts, tmp_path):
    for device in ("cuda", "cuda:1"):
        with pytest.raises(DeviceError) as e:
            load_backend(demo_artifacts, "torch", device=device)
        assert "CUDA is not usable" in e.value.message and "torch.cuda.is_available() is False" in e.value.message
        assert isinstance(e.value, DLRMServeError) and isinstance(e.value, ValueError)
    from dlrm_serve.runtime.export import export_onnx

    art = tmp_path / "art"
    art.mkdir()
    for f in ("dlrm.json", "dlrm.safetensors"):
        (art / f).write_bytes((demo_artifacts / f).read_bytes())
    export_onnx(art)
    with pytest.raises(DeviceError) as e:
        load_backend(art, "onnxruntime", device="cuda:0")
    # What onnxruntime lists and what really loads, not a traceback from inside it.
    assert "CUDA provider does not load" in e.value.message and "lists" in e.value.message
    info = load_backend(art, "onnxruntime", device="cpu", device_reason="because").describe()
    assert (info["device"], info["device_reason"], info["io_binding"], info["tables"]) == ("cpu", "because", False, "cpu")


def test_torch_backend_describes_its_device(demo_artifacts):
    info = load_backend(demo_artifacts, "torch", device_reason="the archive asks for no GPU").describe()
    assert info["device"] == "cpu" and info["device_reason"] == "the archive asks for no GPU"
    assert info["tables"] == "host (memory-mapped)"
    with pytest.raises(ValueError, match=r"\['tables'\] apply to a CUDA device only"):
        load_backend(demo_artifacts, "torch", device="cpu", tables="host")


def test_handler_on_a_gpu_archive_without_cuda_serves_on_the_cpu(handler_module, demo_artifacts, caplog):
    from ts.context import Context

    if not NO_CUDA:
        pytest.skip("checks the fallback of a machine without CUDA")
    yaml_config = {"deviceType": "gpu", "minWorkers": 1, "dlrm": {"backend": "torch"}}
    ctx = Context("dlrm", str(demo_artifacts), {"model": {}}, 1, 1, "0.12.0", True, None, yaml_config)
    assert ctx.system_properties["gpu_id"] == 1
    h = handler_module.DLRMHandler()
    with caplog.at_level("INFO"):
        h.initialize(ctx)
    info = h.backend.describe()
    assert info["device"] == "cpu" and "CUDA is not usable here" in info["device_reason"]
    assert "dlrm worker placed on cpu: deviceType is gpu and gpu_id is 1" in caplog.text


# ----- the CUDA runner's code, run on the CPU ---------------------------------------------------
def test_buckets_and_chunks():
    buckets = (1, 8, 64)
    assert [bucket_for(n, buckets) for n in (1, 2, 8, 9, 64, 65)] == [1, 8, 8, 64, 64, None]
    assert chunks(130, 64) == [(0, 64), (64, 128), (128, 130)]
    assert chunks(0, 64) == []


@pytest.mark.parametrize("tables", ["device", "host"])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_runner_logic_on_the_cpu_gives_the_cpu_answers(demo_artifacts, demo_config, tables, precision):
    runner = CudaRunner(load_model(demo_artifacts), torch.device("cpu"), precision=precision, tables=tables)
    info = runner.describe()
    assert (info["tables"], info["precision"], info["cuda_graphs"]) == (tables, precision, False)
    cpu = load_backend(demo_artifacts, "torch")
    for multi_hot in (False, True):
        batch = random_batch(demo_config, 200, seed=5, multi_hot=multi_hot)
        got = runner.predict_numpy(batch.dense, batch.indices, batch.offsets)
        assert got.dtype == np.float32 and got.shape == (200,)
        assert float(np.abs(got - cpu.predict(batch)).max()) <= TOL[precision]
    assert runner.predict_numpy(batch.dense[:0], batch.indices[:0], None).shape == (0,)


def test_build_mar_device_gpu_writes_device_type(tmp_path, demo_artifacts):
    build_archive(demo_artifacts, tmp_path, "--device", "gpu", "--model-name", "dlrm_gpu")
    with zipfile.ZipFile(tmp_path / "dlrm_gpu.mar") as z:
        settings = yaml.safe_load(z.read("model-config.yaml"))
        assert "dlrm_serve/runtime/placement.py" in z.namelist()
    assert settings["deviceType"] == "gpu"
    assert settings["minWorkers"] == settings["maxWorkers"] == 1  # one worker per GPU
    build_archive(demo_artifacts, tmp_path, "--device", "gpu", "--workers", "4", "--model-name", "dlrm_gpu4")
    with zipfile.ZipFile(tmp_path / "dlrm_gpu4.mar") as z:
        assert yaml.safe_load(z.read("model-config.yaml"))["maxWorkers"] == 4
    r = subprocess.run(["bash", "build_mar.sh", "--device", "tpu"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "--device must be cpu or gpu, got 'tpu'" in r.stderr
