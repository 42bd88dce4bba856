"""ONNX export and the ONNX Runtime backend, against the torch backend."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
import torch

from dlrm_serve.artifacts import CONFIG_FILE, load_config, save_artifacts
from dlrm_serve.runtime.backends import load_backend
from dlrm_serve.cli import main
from dlrm_serve.config import DLRMConfig
from dlrm_serve.errors import ArtifactError
from dlrm_serve.runtime.export import (
    DEFAULT_OPSET,
    FORBIDDEN_OPS,
    ONNX_DATA_FILE,
    ONNX_FILE,
    ONNX_ONE_ID_FILE,
    export_onnx,
    forbidden_ops,
    onnx_problem,
    op_types,
)
from dlrm_serve.io.features import FeatureBatch, FeatureEncoder
from dlrm_serve.model.dlrm import DLRM
from dlrm_serve.runtime.onnx_backend import (
    _PROBE_MODEL,
    MIN_PIECE_ROWS,
    OnnxBackend,
    batch_pieces,
    cuda_provider_usable,
    resolve_threads,
)

TOL = 1e-5
SIZES = (40, 3, 700, 25, 9, 1200, 2, 60)
NAMES = tuple(f"C{i}" for i in range(1, len(SIZES) + 1))
DENSE = tuple(f"I{i}" for i in range(1, 6))
BASE = DLRMConfig(
    table_sizes=SIZES, embedding_dim=8, bottom_mlp=(32, 8), top_mlp=(32, 16, 1),
    dense_names=DENSE, sparse_names=NAMES,
)
CONFIGS = {
    "dot": BASE,
    "dot_self": BASE.replace(self_interaction=True),
    "cat": BASE.replace(interaction="cat"),
    # This model's probabilities spread over about [0.52, 0.70]: some are clamped, most not.
    "threshold": BASE.replace(loss_threshold=0.4),
}


def make_artifacts(path, config, seed=0):
    torch.manual_seed(seed)
    save_artifacts(DLRM(config), path)
    export_onnx(path)
    return path


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    """(torch backend, onnxruntime backend) over the same artifacts."""
    path = make_artifacts(tmp_path_factory.mktemp(request.param), CONFIGS[request.param])
    return load_backend(path, "torch"), load_backend(path, "onnxruntime", threads=1)


@pytest.fixture(scope="module")
def dot_artifacts(tmp_path_factory):
    return make_artifacts(tmp_path_factory.mktemp("dot"), BASE)


def random_batch(config, rows, rng, multi_hot):
    """Rows of raw ids through the encoder: one id per bag, or bags of 0-4 ids."""
    enc = FeatureEncoder(config)
    dense = rng.lognormal(1.0, 2.0, size=(rows, config.num_dense)).astype(np.float32)
    dense[rng.random(dense.shape) < 0.1] = np.nan  # missing values
    sizes = np.tile(np.asarray(config.table_sizes), rows)
    if not multi_hot:
        return enc.encode_arrays(dense, rng.integers(0, sizes))
    lengths = rng.integers(0, 5, size=rows * config.num_sparse)
    ids = rng.integers(0, np.repeat(sizes, lengths))
    return enc.encode_arrays(dense, ids, lengths)


def max_diff(pair, batch):
    torch_backend, ort_backend = pair
    want, got = torch_backend.predict(batch), ort_backend.predict(batch)
    assert got.dtype == np.float32 and got.shape == (batch.batch_size,)
    return float(np.abs(want - got).max())


# ----- the exported files ----------------------------------------------------------
def test_export_writes_checked_graphs_and_records_the_opset(dot_artifacts):
    for name in (ONNX_FILE, ONNX_ONE_ID_FILE):
        onnx.checker.check_model(str(dot_artifacts / name), full_check=True)
    assert (dot_artifacts / ONNX_DATA_FILE).is_file()
    cfg = load_config(dot_artifacts)
    assert cfg.onnx_opset == DEFAULT_OPSET
    assert cfg.replace(onnx_opset=None) == BASE
    model = onnx.load(str(dot_artifacts / ONNX_FILE), load_external_data=False)
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [DEFAULT_OPSET]


def walk_ops(graph):
    """Every node's op type, descending into subgraph attributes."""
    for node in graph.node:
        yield node.op_type
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from walk_ops(attr.g)
            for g in attr.graphs:
                yield from walk_ops(g)


def test_graphs_have_no_loops_branches_or_sequences(dot_artifacts):
    for name, scatter in ((ONNX_FILE, True), (ONNX_ONE_ID_FILE, False)):
        model = onnx.load(str(dot_artifacts / name), load_external_data=False)
        ops = set(walk_ops(model.graph))
        assert not ops & {"Loop", "Scan", "If"}
        assert not [op for op in ops if "Sequence" in op or op in FORBIDDEN_OPS]
        assert not model.functions
        assert "Gather" in ops
        assert ("ScatterND" in ops) is scatter
        assert forbidden_ops(model) == []


def test_forbidden_ops_finds_a_loop_inside_a_subgraph():
    h = onnx.helper
    body = h.make_graph([h.make_node("Loop", ["n", "c"], ["o"])], "body", [], [])
    outer = h.make_graph(
        [h.make_node("If", ["cond"], ["y"], then_branch=body, else_branch=body)], "g", [], []
    )
    model = h.make_model(outer)
    assert forbidden_ops(model) == ["If", "Loop"]
    assert "Loop" in op_types(model)


@pytest.mark.parametrize("tables", [6, 7])
def test_other_table_counts(tables, tmp_path):
    cfg = BASE.replace(table_sizes=SIZES[:tables], sparse_names=NAMES[:tables], self_interaction=tables == 7)
    path = make_artifacts(tmp_path, cfg)
    pair = load_backend(path, "torch"), load_backend(path, "onnxruntime", threads=1)
    for multi_hot in (False, True):
        assert max_diff(pair, random_batch(cfg, 500, np.random.default_rng(9), multi_hot)) <= TOL


def test_tables_live_in_aligned_external_data(dot_artifacts):
    model = onnx.load(str(dot_artifacts / ONNX_FILE), load_external_data=False)
    tables = [t for t in model.graph.initializer if t.name.startswith("sparse_arch.")]
    assert [t.name for t in tables] == ["sparse_arch.weight"]
    (table,) = tables
    assert table.data_location == onnx.TensorProto.EXTERNAL
    info = {e.key: e.value for e in table.external_data}
    assert info["location"] == ONNX_DATA_FILE
    assert int(info["offset"]) % 4096 == 0
    assert int(info["length"]) == BASE.total_rows * BASE.embedding_dim * 4
    # The graph file itself stays small: the table is not inlined too.
    assert (dot_artifacts / ONNX_FILE).stat().st_size < int(info["length"])


def test_batch_size_is_dynamic(dot_artifacts):
    model = onnx.load(str(dot_artifacts / ONNX_FILE), load_external_data=False)
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert dims == {"dense": ["batch", BASE.num_dense], "indices": ["ids"], "bag_ids": ["ids"]}
    out = model.graph.output[0]
    assert [d.dim_param for d in out.type.tensor_type.shape.dim] == ["batch"]


# ----- parity with torch --------------------------------------------------------------
def test_random_rows_one_id_per_bag(pair):
    batch = random_batch(pair[0].config, 3000, np.random.default_rng(1), multi_hot=False)
    assert batch.offsets is None
    assert max_diff(pair, batch) <= TOL


def test_random_rows_multi_hot_bags(pair):
    batch = random_batch(pair[0].config, 3000, np.random.default_rng(2), multi_hot=True)
    assert batch.offsets is not None and (np.diff(batch.offsets) == 0).any()
    assert max_diff(pair, batch) <= TOL


def test_edge_rows(pair):
    cfg = pair[0].config
    largest = [s - 1 for s in cfg.table_sizes]
    rows = [
        {"dense": [None] * cfg.num_dense, "sparse": [None] * cfg.num_sparse},  # every bag empty
        {"dense": [0] * cfg.num_dense, "sparse": largest},  # the largest valid ids
        {"dense": [1e6] * cfg.num_dense, "sparse": [[s - 1, 0, s - 1] for s in cfg.table_sizes]},  # repeats
        {"dense": [-5, 3.5, None, 7, 0], "sparse": [[] if i % 2 else [0, 1 % s] for i, s in enumerate(cfg.table_sizes)]},
        {cfg.dense_names[0]: 2, cfg.sparse_names[2]: "ffffffffff", cfg.sparse_names[5]: ["a1", "b2"]},  # missing fields
        {cfg.sparse_names[0]: 3},  # only one field present
    ]
    batch = FeatureEncoder(cfg).encode_instances(rows)
    assert max_diff(pair, batch) <= TOL
    # The same rows one at a time (batch size 1, each graph on its own).
    for row in rows:
        assert max_diff(pair, FeatureEncoder(cfg).encode_instances([row])) <= TOL


def test_loss_threshold_clamps_like_torch(tmp_path):
    path = make_artifacts(tmp_path, CONFIGS["threshold"])
    pair = load_backend(path, "torch"), load_backend(path, "onnxruntime", threads=1)
    cfg = pair[0].config
    batch = random_batch(cfg, 2000, np.random.default_rng(3), multi_hot=False)
    p = pair[1].predict(batch)
    t = np.float32(cfg.loss_threshold)
    assert p.min() >= t and p.max() <= np.float32(1 - cfg.loss_threshold)
    clamped = (p == t) | (p == np.float32(1 - cfg.loss_threshold))
    assert clamped.any() and not clamped.all()
    assert max_diff(pair, batch) <= TOL


def test_a_batch_of_only_empty_bags_and_an_empty_batch(pair):
    cfg = pair[0].config
    b = 5
    empty = FeatureBatch(
        np.ones((b, cfg.num_dense), np.float32), np.zeros(0, np.int64), np.zeros(b * cfg.num_sparse + 1, np.int64)
    )
    assert max_diff(pair, empty) <= TOL
    none = FeatureBatch(np.zeros((0, cfg.num_dense), np.float32), np.zeros(0, np.int64), None)
    assert pair[1].predict(none).shape == (0,)


def test_int8_tables(tmp_path):
    from dlrm_serve.model.quantize import quantize_artifacts

    torch.manual_seed(5)
    save_artifacts(DLRM(BASE), tmp_path / "fp32")
    quantize_artifacts(tmp_path / "fp32", tmp_path / "int8", progress=False)
    export_onnx(tmp_path / "int8")
    pair = (load_backend(tmp_path / "int8", "torch"), load_backend(tmp_path / "int8", "onnxruntime", threads=1))
    assert pair[1].describe()["table_dtype"] == "int8"
    for multi_hot in (False, True):
        batch = random_batch(BASE, 1000, np.random.default_rng(4), multi_hot)
        assert max_diff(pair, batch) <= TOL


# ----- the backend ----------------------------------------------------------------------
def test_describe_names_the_provider_in_use(dot_artifacts):
    backend = OnnxBackend(dot_artifacts, threads=1, device="cpu")
    info = backend.describe()
    assert info["backend"] == "onnxruntime"
    assert info["provider"] == "CPUExecutionProvider" == info["providers"][0]
    assert info["device"] == "cpu" and info["threads"] == 1 and info["threads_source"] == "explicit"
    assert info["graphs"] == [ONNX_FILE, ONNX_ONE_ID_FILE]
    assert info["onnx_opset"] == DEFAULT_OPSET
    assert OnnxBackend(dot_artifacts, threads=1, one_id_graph=False).describe()["graphs"] == [ONNX_FILE]


# What onnxruntime itself does when asked for CUDA first, in a separate process
# (so its load errors do not reach capfd): the truth the probe must agree with.
ORT_CUDA_TRUTH = textwrap.dedent(
    """
    import numpy as np, onnxruntime as ort
    from dlrm_serve.runtime.onnx_backend import _PROBE_MODEL
    try:
        s = ort.InferenceSession(_PROBE_MODEL, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
        s.run(None, {"x": np.array([1.0], np.float32)})
        print(s.get_providers()[0])
    except Exception:
        print("CPUExecutionProvider")
    """
)


def test_cuda_is_asked_for_only_where_it_loads(dot_artifacts, capfd):
    truth = subprocess.run(
        [sys.executable, "-c", ORT_CUDA_TRUTH], capture_output=True, text=True, check=True
    ).stdout.strip().splitlines()[-1]
    capfd.readouterr()
    cuda_provider_usable.cache_clear()
    usable = cuda_provider_usable()
    backend = OnnxBackend(dot_artifacts, threads=1, device="auto")
    out, err = capfd.readouterr()
    # The probe and an automatic choice are silent, whatever the machine has.
    assert out == "" and err == ""
    # Checked against onnxruntime's own answer, not against the probe that chose.
    assert usable == (truth == "CUDAExecutionProvider")
    assert backend.describe()["provider"] == truth
    if not usable:
        with pytest.raises(ValueError, match="CUDA provider does not load"):
            OnnxBackend(dot_artifacts, device="cuda")


def test_thread_count_shares_the_cores_between_workers(monkeypatch):
    monkeypatch.delenv("DLRM_WORKERS", raising=False)
    assert resolve_threads(None, None, cores=8) == (8, 1, "8 cores // 1 workers")
    assert resolve_threads(0, 3, cores=8)[:2] == (2, 3)
    assert resolve_threads(None, 16, cores=8)[:2] == (1, 16)
    assert resolve_threads(5, 4, cores=8) == (5, 4, "explicit")
    monkeypatch.setenv("DLRM_WORKERS", "4")
    assert resolve_threads(None, None, cores=8)[:2] == (2, 4)
    monkeypatch.setenv("DLRM_WORKERS", "many")
    with pytest.raises(ValueError, match="DLRM_WORKERS"):
        resolve_threads(None, None, cores=8)
    with pytest.raises(ValueError, match="threads"):
        resolve_threads(-2, 1, cores=8)
    with pytest.raises(ValueError, match="workers"):
        resolve_threads(None, 0, cores=8)


def test_batch_pieces():
    assert MIN_PIECE_ROWS == 128
    assert batch_pieces(0, 2) == []
    assert batch_pieces(1, 2) == [(0, 1)]
    assert batch_pieces(255, 2) == [(0, 255)]  # small batches run whole, on intra-op threads
    assert batch_pieces(256, 2) == [(0, 128), (128, 256)]
    assert batch_pieces(300, 1, 128) == [(0, 128), (128, 256), (256, 300)]
    assert batch_pieces(4096, 2) == [(a, a + 512) for a in range(0, 4096, 512)]
    assert batch_pieces(4096, 2, 0) == [(0, 4096)]


@pytest.mark.parametrize("threads", [1, 3])
def test_batches_cut_in_pieces_give_the_same_answer(dot_artifacts, threads):
    whole = OnnxBackend(dot_artifacts, threads=threads, piece_rows=0)
    pieces = OnnxBackend(dot_artifacts, threads=threads, piece_rows=MIN_PIECE_ROWS)
    assert whole.describe()["session"]["piece_intra_op_threads"] == threads
    assert pieces.describe()["session"]["piece_intra_op_threads"] == 1
    assert pieces.describe()["session"]["intra_op_threads"] == threads
    rows = threads * MIN_PIECE_ROWS + 77
    assert len(batch_pieces(rows, threads, MIN_PIECE_ROWS)) > threads
    for multi_hot in (False, True):
        batch = random_batch(BASE, rows, np.random.default_rng(10), multi_hot)
        np.testing.assert_allclose(pieces.predict(batch), whole.predict(batch), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="piece_rows"):
        OnnxBackend(dot_artifacts, piece_rows=-1)


def test_without_the_one_id_graph_every_batch_runs_the_general_graph(dot_artifacts, tmp_path):
    for name in (CONFIG_FILE, "dlrm.safetensors", ONNX_FILE, ONNX_DATA_FILE):
        shutil.copy(dot_artifacts / name, tmp_path / name)
    backend = OnnxBackend(tmp_path, threads=1)
    assert backend.describe()["graphs"] == [ONNX_FILE]
    batch = random_batch(BASE, 200, np.random.default_rng(6), multi_hot=False)
    assert batch.offsets is None
    want = load_backend(dot_artifacts, "torch").predict(batch)
    assert np.abs(backend.predict(batch) - want).max() <= TOL


def test_graphs_from_other_weights_or_config_are_refused(tmp_path):
    path = make_artifacts(tmp_path / "a", BASE, seed=0)
    torch.manual_seed(99)
    save_artifacts(DLRM(BASE), path)  # "retrained": new weights, old ONNX
    with pytest.raises(ArtifactError, match="other weights.*export-onnx"):
        OnnxBackend(path, threads=1)
    assert OnnxBackend(path, threads=1, check_weights=False).config == load_config(path)
    export_onnx(path)
    OnnxBackend(path, threads=1)
    # A change to one MLP bias only is caught too.
    from dlrm_serve.artifacts import load_model

    model = load_model(path)
    tuned = DLRM(BASE, init=False)
    tuned.load_state_dict({k: v.clone() for k, v in model.state_dict().items()})
    with torch.no_grad():
        tuned.over_arch.mlp[0].bias[0] += 0.5
    save_artifacts(tuned, path)
    with pytest.raises(ArtifactError, match="other weights"):
        OnnxBackend(path, threads=1)
    export_onnx(path)
    cfg = json.loads((path / CONFIG_FILE).read_text())
    cfg["dense_transform"] = "none"
    (path / CONFIG_FILE).write_text(json.dumps(cfg))
    with pytest.raises(ArtifactError, match="another config"):
        OnnxBackend(path, threads=1)


def test_without_safetensors_the_data_fingerprint_ties_tables_to_graphs(tmp_path):
    """An ONNX archive ships no dlrm.safetensors: graphs and dlrm.onnx.data must still match."""
    a = make_artifacts(tmp_path / "a", BASE, seed=0)
    b = make_artifacts(tmp_path / "b", BASE, seed=1)
    served = tmp_path / "served"
    served.mkdir()
    for name in (CONFIG_FILE, ONNX_FILE, ONNX_ONE_ID_FILE, ONNX_DATA_FILE):
        shutil.copy(a / name, served / name)
    backend = OnnxBackend(served, threads=1)
    batch = random_batch(BASE, 32, np.random.default_rng(0), multi_hot=False)
    assert np.abs(backend.predict(batch) - load_backend(a, "torch").predict(batch)).max() <= TOL
    shutil.copy(b / ONNX_DATA_FILE, served / ONNX_DATA_FILE)  # other tables, same graphs
    with pytest.raises(ArtifactError, match="not the data the ONNX graph was exported with"):
        OnnxBackend(served, threads=1)


def test_export_if_needed_reexports_only_stale_graphs(tmp_path, capsys):
    torch.manual_seed(0)
    save_artifacts(DLRM(BASE), tmp_path)
    assert "dlrm.onnx is missing" in onnx_problem(tmp_path)
    assert main(["export-onnx", "--artifacts", str(tmp_path), "--if-needed"]) == 0
    assert "missing" in capsys.readouterr().out and onnx_problem(tmp_path) is None
    stamp = (tmp_path / ONNX_FILE).stat().st_mtime_ns
    assert main(["export-onnx", "--artifacts", str(tmp_path), "--if-needed"]) == 0
    assert "up to date" in capsys.readouterr().out
    assert (tmp_path / ONNX_FILE).stat().st_mtime_ns == stamp
    torch.manual_seed(1)
    save_artifacts(DLRM(BASE), tmp_path)
    assert "other weights" in onnx_problem(tmp_path)
    assert main(["export-onnx", "--artifacts", str(tmp_path), "--if-needed"]) == 0
    assert onnx_problem(tmp_path) is None


def test_the_cuda_probe_model_is_a_valid_graph():
    import onnxruntime as ort

    session = ort.InferenceSession(_PROBE_MODEL, providers=["CPUExecutionProvider"])
    assert session.run(None, {"x": np.array([1.5], np.float32)})[0].tolist() == [3.0]


def test_missing_graph_says_how_to_make_it(tmp_path):
    torch.manual_seed(0)
    save_artifacts(DLRM(BASE), tmp_path)
    with pytest.raises(ArtifactError, match="export-onnx"):
        load_backend(tmp_path, "onnxruntime")


def test_importing_backends_does_not_import_onnxruntime():
    code = "import sys, dlrm_serve.runtime.backends; print('onnxruntime' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ----- command line ---------------------------------------------------------------------
def test_cli_export_onnx(tmp_path, capsys):
    torch.manual_seed(0)
    save_artifacts(DLRM(BASE), tmp_path)
    assert main(["export-onnx", "--artifacts", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert ONNX_FILE in out and f"opset {DEFAULT_OPSET}" in out
    assert load_config(tmp_path).onnx_opset == DEFAULT_OPSET
    before = os.listdir(tmp_path)
    assert main(["export-onnx", "--artifacts", str(tmp_path), "--opset", "12"]) == 2
    assert "opset" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == sorted(before)  # nothing half-written left behind
    assert main(["export-onnx", "--artifacts", str(tmp_path / "missing")]) == 2


# ----- through the server -------------------------------------------------------------
@pytest.mark.integration
def test_dlrm_and_dlrm_onnx_agree_side_by_side_through_torchserve(torchserve, model_store, demo_artifacts, make_rows):
    from conftest import build_archive

    if not (model_store / "dlrm_onnx.mar").is_file():
        export_onnx(demo_artifacts)
        build_archive(demo_artifacts, model_store, "--backend", "onnxruntime")
    torchserve.register("dlrm_onnx.mar", initial_workers=1)
    try:
        assert {"dlrm", "dlrm_onnx"} <= set(torchserve.models())
        cfg = load_config(demo_artifacts)
        rng = np.random.default_rng(7)
        rows = make_rows(300, seed=8).instances
        # Multi-hot and empty bags, and the largest valid ids.
        rows += [
            {"dense": rng.integers(0, 50, cfg.num_dense).tolist(),
             "sparse": [[int(v) for v in rng.integers(0, s, int(rng.integers(0, 4)))] for s in cfg.table_sizes]}
            for _ in range(100)
        ]
        rows.append({"dense": [None] * cfg.num_dense, "sparse": [s - 1 for s in cfg.table_sizes]})
        for chunk in (rows[:1], rows[:300], rows[300:], rows):
            got = {}
            for model in ("dlrm", "dlrm_onnx"):
                r = torchserve.predict(model, json.dumps({"instances": chunk}))
                assert r.status == 200, r.text
                got[model] = np.asarray(r.json()["predictions"], dtype=np.float64)
            assert got["dlrm"].shape == (len(chunk),)
            assert np.abs(got["dlrm"] - got["dlrm_onnx"]).max() <= TOL
        # The worker says which provider it serves on.
        assert '"provider": "CPUExecutionProvider"' in torchserve.log_text() or cuda_provider_usable()
    finally:
        torchserve.unregister("dlrm_onnx")
