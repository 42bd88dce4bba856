"""Export a DLRM to ONNX, written node by node with ``onnx.helper``.

The stock exporters turn ``nn.EmbeddingBag`` into a ``Loop`` that runs many
times slower than eager torch, so the graph is written here directly from
the weights of the loaded model (``dlrm.safetensors`` stays the source of
truth).  Every lookup is a ``Gather`` of rows; multi-hot bags are summed with
one ``ScatterND(reduction="add")`` into a zero ``[B*F, D]`` tensor.  The
graph has no control flow and no sequence ops (see :func:`forbidden_ops`).

Two graphs share one weight file:

- ``dlrm.onnx``, the general graph: inputs ``dense`` float32 ``[B, num_dense]``
  (already transformed), ``indices`` int64 ``[N]`` (rows of the concatenated
  table, bag by bag) and ``bag_ids`` int64 ``[N]`` (the bag ``b*F + f`` of
  each id, :meth:`FeatureBatch.bag_ids`); an empty bag pools to zeros.
- ``dlrm.one_id.onnx``, the fast graph for one id per bag (``N == B*F``):
  inputs ``dense`` and ``indices`` only, and no scatter.  ONNX Runtime runs
  every node of a graph whatever outputs are asked for, so the two paths
  cannot share one graph without paying for both.

Both have one output, ``probability`` float32 ``[B]``, and a dynamic batch
size.  Large tensors (the tables) always go to ``dlrm.onnx.data``, aligned
so that ONNX Runtime maps them from the file instead of copying them: a
session starts at once, the two graphs use the same pages, and so do all
the workers of a server (the file sits in the page cache once).  That also
keeps the protobuf under its 2 GB limit whatever the table size.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dlrm_serve.config import DLRMConfig
from dlrm_serve.errors import ArtifactError, Unsupported, UsageError

__all__ = [
    "ONNX_FILE",
    "ONNX_ONE_ID_FILE",
    "ONNX_DATA_FILE",
    "DEFAULT_OPSET",
    "FORBIDDEN_OPS",
    "META_CONFIG",
    "META_WEIGHTS",
    "META_DATA",
    "META_GRAPH",
    "ExportResult",
    "build_graph",
    "export_onnx",
    "forbidden_ops",
    "op_types",
    "weights_fingerprint",
    "config_for_comparison",
    "source_problem",
    "onnx_problem",
]

ONNX_FILE = "dlrm.onnx"
ONNX_ONE_ID_FILE = "dlrm.one_id.onnx"
ONNX_DATA_FILE = "dlrm.onnx.data"

# 18: ScatterND with reduction="add" needs 16; 18 is supported by every
# onnxruntime this package accepts (>= 1.18) and by onnx >= 1.13.
DEFAULT_OPSET = 18
MIN_OPSET = 16

# Control flow and sequences: what the stock exporters produce for
# EmbeddingBag, and what must never appear in these graphs.
FORBIDDEN_OPS = frozenset(
    {
        "Loop", "Scan", "If",
        "SequenceAt", "SequenceConstruct", "SequenceEmpty", "SequenceErase",
        "SequenceInsert", "SequenceLength", "SequenceMap",
        "SplitToSequence", "ConcatFromSequence", "Optional", "OptionalGetElement",
        "OptionalHasElement",
    }
)

META_CONFIG = "dlrm_serve.config"
META_WEIGHTS = "dlrm_serve.weights"
# The fingerprint of dlrm.onnx.data, so an archive without dlrm.safetensors
# can still tell that its graphs and their tables belong together.
META_DATA = "dlrm_serve.onnx_data"
META_GRAPH = "dlrm_serve.graph"

# The tables always go to the data file, and so does any other tensor this
# large; the MLP weights of the presets stay inline.
_EXTERNAL_MIN_BYTES = 1 << 20
# 64 KiB is the mapping granularity on Windows and a multiple of the page
# size elsewhere; onnxruntime maps external data only at aligned offsets.
_ALIGN = 1 << 16


def config_for_comparison(config: DLRMConfig) -> str:
    """The config as JSON, without the fields export itself writes."""
    data = config.to_dict()
    data.pop("onnx_opset", None)
    return json.dumps(data, sort_keys=True)


def weights_fingerprint(path: str | os.PathLike) -> str:
    """A cheap fingerprint of a weights file: its size, its first 16 MiB
    (the safetensors header and the MLP weights, which come before the
    tables) and 64 blocks of 4 KiB spread over the rest.

    Retraining rewrites the MLPs and every table, so a retrained file
    differs in what is read; reading about 16 MiB instead of the whole file
    keeps the check fast for multi-gigabyte tables.
    """
    p = Path(path)
    size = p.stat().st_size
    h = hashlib.sha256(str(size).encode())
    head = 16 << 20
    block = 4096
    with open(p, "rb") as fh:
        h.update(fh.read(head))
        if size > head:
            for k in range(64):
                fh.seek(head + (size - head - block) * k // 63 if size - head > block else head)
                h.update(fh.read(block))
    return h.hexdigest()


def source_problem(
    metadata: dict[str, str], config: DLRMConfig, weights: Path | None, data: Path | None = None
) -> str | None:
    """Why a graph with ``metadata`` (its metadata_props) does not belong to
    ``config``, the weights file ``weights`` and its external data file
    ``data`` (each skipped when None or absent; ``data`` also when the graph
    predates the data fingerprint), or None when it does."""
    if metadata.get(META_CONFIG) != config_for_comparison(config):
        return "the ONNX graph was exported for another config than dlrm.json"
    if weights is not None and Path(weights).is_file():
        if metadata.get(META_WEIGHTS) != weights_fingerprint(weights):
            return f"the ONNX graph was exported from other weights than {Path(weights).name} (retrained since?)"
    if data is not None and META_DATA in metadata and Path(data).is_file():
        if metadata[META_DATA] != weights_fingerprint(data):
            return f"{Path(data).name} is not the data the ONNX graph was exported with"
    return None


def onnx_problem(artifacts_dir: str | os.PathLike) -> str | None:
    """None when ``artifacts_dir`` holds ONNX graphs exported from its
    current config and weights; otherwise what is missing or stale."""
    import onnx

    from dlrm_serve.artifacts import WEIGHTS_FILE, load_config

    out = Path(artifacts_dir)
    config = load_config(out)
    for name in (ONNX_FILE, ONNX_ONE_ID_FILE, ONNX_DATA_FILE):
        if not (out / name).is_file():
            return f"{out / name} is missing"
    weights = out / WEIGHTS_FILE
    for name in (ONNX_FILE, ONNX_ONE_ID_FILE):
        model = onnx.load(str(out / name), load_external_data=False)
        problem = source_problem({p.key: p.value for p in model.metadata_props}, config, weights, out / ONNX_DATA_FILE)
        if problem is not None:
            return f"{name}: {problem}"
    return None


def _node_ops(graph) -> list[str]:
    ops = []
    for node in graph.node:
        ops.append(node.op_type)
        for attr in node.attribute:
            # Subgraphs (If/Loop bodies) count too.
            if attr.g is not None and len(attr.g.node):
                ops.extend(_node_ops(attr.g))
            for g in attr.graphs:
                ops.extend(_node_ops(g))
    return ops


def op_types(model) -> list[str]:
    """Sorted distinct op types of ``model`` (its subgraphs and local functions included)."""
    ops = set(_node_ops(model.graph))
    for fn in model.functions:
        ops.update(n.op_type for n in fn.node)
    return sorted(ops)


def forbidden_ops(model) -> list[str]:
    """The op types of ``model`` that are control flow or sequence ops (should be none)."""
    return [op for op in op_types(model) if op in FORBIDDEN_OPS]


class _GraphWriter:
    """Collects nodes and initializers with readable, unique names."""

    def __init__(self, tensor_ref):
        from onnx import helper, numpy_helper

        self.helper = helper
        self.numpy_helper = numpy_helper
        self.tensor_ref = tensor_ref
        self.nodes: list = []
        self.initializers: list = []
        self._names: set[str] = set()

    def const(self, name: str, value: Any, dtype=None) -> str:
        if name in self._names:
            return name
        arr = np.ascontiguousarray(np.asarray(value, dtype=dtype))
        self.initializers.append(self.numpy_helper.from_array(arr, name))
        self._names.add(name)
        return name

    def tensor(self, tensor_proto) -> str:
        self.initializers.append(tensor_proto)
        self._names.add(tensor_proto.name)
        return tensor_proto.name

    def op(self, op_type: str, inputs: list[str], name: str, **attrs) -> str:
        """Add one node; its single output is called ``name``."""
        return self.op_multi(op_type, inputs, [name], name, **attrs)[0]

    def op_multi(self, op_type: str, inputs: list[str], outputs: list[str], name: str, **attrs) -> list[str]:
        for out in outputs:
            if out in self._names:
                raise ValueError(f"internal error: graph name {out!r} used twice")
            self._names.add(out)
        self.nodes.append(self.helper.make_node(op_type, inputs, outputs, name=f"{op_type}_{name}", **attrs))
        return outputs


def _mlp(g: _GraphWriter, x: str, prefix: str, widths: tuple[int, ...], last_relu: bool, tag: str) -> str:
    # Gemm with transB=1 reads nn.Linear's [out, in] weight as is; onnxruntime
    # packs it once at load time and fuses the ReLU into the Gemm.
    for j in range(len(widths)):
        w = g.tensor_ref(f"{prefix}.{2 * j}.weight")
        b = g.tensor_ref(f"{prefix}.{2 * j}.bias")
        x = g.op("Gemm", [x, w, b], f"{tag}_linear{j}", transB=1)
        if j < len(widths) - 1 or last_relu:
            x = g.op("Relu", [x], f"{tag}_relu{j}")
    return x


def _pairs_slices(n: int, self_interaction: bool) -> list[tuple[int, int]]:
    """[start, stop) column runs of the flattened ``[n, n]`` Gram matrix that
    hold its lower triangle, row by row (the reference's order)."""
    extra = 1 if self_interaction else 0
    return [(i * n, i * n + i + extra) for i in range(n) if i + extra > 0]


def _check_opset(opset: Any) -> None:
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= newest:
        raise UsageError(
            f"opset must be an integer from {MIN_OPSET} (ScatterND with reduction) to {newest} "
            f"(the newest this onnx knows), got {opset!r}"
        )


def build_graph(
    config: DLRMConfig,
    tensors: dict[str, Any],
    bags: bool = True,
    opset: int = DEFAULT_OPSET,
    metadata: dict[str, str] | None = None,
):
    """The ONNX model computing ``DLRM.forward`` for ``config``.

    ``tensors`` maps the model's state_dict names to ``onnx.TensorProto``
    (inline or already pointing at external data) or to arrays.  ``bags``
    selects the general graph (inputs ``dense, indices, bag_ids``) or the
    one-id-per-bag graph (inputs ``dense, indices``).  ``metadata`` is
    added to the model's metadata_props.
    """
    from onnx import TensorProto, helper, numpy_helper

    _check_opset(opset)
    f, d = config.num_sparse, config.embedding_dim

    used: dict[str, str] = {}

    def tensor_ref(name: str) -> str:
        if name not in tensors:
            raise ArtifactError(f"weights lack tensor {name!r} that a {config.name} model needs")
        if name not in used:
            t = tensors[name]
            proto = t if isinstance(t, TensorProto) else numpy_helper.from_array(np.ascontiguousarray(t), name)
            if proto.name != name:
                raise ValueError(f"tensor proto named {proto.name!r} given for {name!r}")
            used[name] = g.tensor(proto)
        return used[name]

    g = _GraphWriter(tensor_ref)

    x = _mlp(g, "dense", "dense_arch.mlp", config.bottom_mlp, True, "bottom")

    # ----- embedding lookups ---------------------------------------------------
    if config.table_dtype == "float32":
        rows = g.op("Gather", [tensor_ref("sparse_arch.weight"), "indices"], "rows", axis=0)
    elif config.table_dtype == "int8":
        # Row-wise int8: a row is codes * scale + bias, as SparseArch._rows computes it.
        codes = g.op("Gather", [tensor_ref("sparse_arch.codes"), "indices"], "row_codes", axis=0)
        codes_f = g.op("Cast", [codes], "row_codes_f32", to=TensorProto.FLOAT)
        sb = g.op("Gather", [tensor_ref("sparse_arch.scale_bias"), "indices"], "row_scale_bias", axis=0)
        scale, bias = g.op_multi(
            "Split", [sb, g.const("split_1_1", [1, 1], np.int64)], ["row_scale", "row_bias"], "row_scale_bias", axis=1
        )
        scaled = g.op("Mul", [codes_f, scale], "rows_scaled")
        rows = g.op("Add", [scaled, bias], "rows")
    else:
        raise Unsupported(f"table_dtype {config.table_dtype!r} cannot be exported (float32 or int8)")

    shape_bfd = g.const("shape_b_f_d", [-1, f, d], np.int64)
    if bags:
        # Sum each bag: scatter-add every row into its bag of a zero [B*F, D]
        # tensor.  Empty bags stay zero, as embedding_bag(mode="sum") gives.
        dense_shape = g.op("Shape", ["dense"], "dense_shape")
        b1 = g.op("Slice", [dense_shape, g.const("i64_0", [0], np.int64), g.const("i64_1", [1], np.int64)], "batch")
        bf = g.op("Mul", [b1, g.const("i64_f", [f], np.int64)], "num_bags")
        bf_d = g.op("Concat", [bf, g.const("i64_d", [d], np.int64)], "pooled_shape", axis=0)
        zeros = g.op(
            "ConstantOfShape", [bf_d], "pooled_zeros", value=numpy_helper.from_array(np.zeros(1, np.float32))
        )
        bag_index = g.op("Unsqueeze", ["bag_ids", g.const("i64_1", [1], np.int64)], "bag_index")
        pooled = g.op("ScatterND", [zeros, bag_index, rows], "pooled", reduction="add")
        emb = g.op("Reshape", [pooled, shape_bfd], "embedded")
    else:
        emb = g.op("Reshape", [rows, shape_bfd], "embedded")

    # ----- interaction ------------------------------------------------------------
    if config.interaction == "cat":
        flat = g.op("Reshape", [emb, g.const("shape_b_fd", [0, f * d], np.int64)], "embedded_flat")
        inter = g.op("Concat", [x, flat], "interaction", axis=1)
    else:
        n = f + 1
        xu = g.op("Unsqueeze", [x, g.const("i64_1", [1], np.int64)], "bottom_row")
        t = g.op("Concat", [xu, emb], "stacked", axis=1)  # [B, F+1, D]
        tt = g.op("Transpose", [t], "stacked_t", perm=[0, 2, 1])
        z = g.op("MatMul", [t, tt], "gram")  # [B, F+1, F+1]
        zf = g.op("Reshape", [z, g.const("shape_b_nn", [0, n * n], np.int64)], "gram_flat")
        # Row i of the lower triangle is a contiguous run of the flattened
        # Gram: one Slice per row and one Concat (with the bottom output)
        # copy whole runs.  Measured here, a Gather of the single values was
        # about 2x slower on one thread, and a Gather of aligned blocks of
        # three (with zero weights for the extra values) lost 10 to 25 % on
        # two threads despite being the parallel op.
        parts = [x]
        axis1 = g.const("i64_1", [1], np.int64)
        for i, (start, stop) in enumerate(_pairs_slices(n, config.self_interaction)):
            s = g.const(f"gram_row{i}_start", [start], np.int64)
            e = g.const(f"gram_row{i}_stop", [stop], np.int64)
            parts.append(g.op("Slice", [zf, s, e, axis1], f"gram_row{i}"))
        inter = g.op("Concat", parts, "interaction", axis=1)

    logit = _mlp(g, inter, "over_arch.mlp", config.top_mlp, False, "top")
    p = g.op("Sigmoid", [logit], "sigmoid")
    t_ = config.loss_threshold
    if 0.0 < t_ < 1.0:
        lo = g.const("threshold_low", np.float32(t_), np.float32)
        hi = g.const("threshold_high", np.float32(1.0 - t_), np.float32)
        p = g.op("Clip", [p, lo, hi], "clipped")
    out = g.op("Reshape", [p, g.const("shape_b", [-1], np.int64)], "probability")

    inputs = [
        helper.make_tensor_value_info("dense", TensorProto.FLOAT, ["batch", config.num_dense]),
        helper.make_tensor_value_info("indices", TensorProto.INT64, ["ids"]),
    ]
    if bags:
        inputs.append(helper.make_tensor_value_info("bag_ids", TensorProto.INT64, ["ids"]))
    outputs = [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["batch"])]
    kind = "bags" if bags else "one_id"
    graph = helper.make_graph(g.nodes, f"{config.name}_{kind}", inputs, outputs, g.initializers)
    opsets = [helper.make_opsetid("", opset)]
    model = helper.make_model(
        graph,
        opset_imports=opsets,
        ir_version=helper.find_min_ir_version_for(opsets),
        producer_name="dlrm-serve",
        doc_string=(
            "DLRM click probability. dense: float32 [B, num_dense], transformed; indices: int64 [N], "
            "rows of the concatenated table"
            + ("; bag_ids: int64 [N], bag b*F+f of each id" if bags else ", exactly one per (row, table)")
            + ". Output probability: float32 [B]."
        ),
    )
    props = {META_CONFIG: config_for_comparison(config), META_GRAPH: kind}
    props.update(metadata or {})
    helper.set_model_props(model, props)
    return model


def _external_tensor(name: str, array: np.ndarray, fh, location: str):
    """A TensorProto for ``array`` whose bytes are appended to ``fh`` at an aligned offset."""
    from onnx import TensorProto, helper

    pos = fh.tell()
    pad = (-pos) % _ALIGN
    if pad:
        fh.write(b"\0" * pad)
        pos += pad
    arr = np.ascontiguousarray(array)
    if arr.dtype.byteorder == ">":
        raise ArtifactError(f"tensor {name!r} is big-endian; ONNX stores little-endian data")
    # Write from the (memory-mapped) array in slices: no full copy in memory.
    flat = arr.reshape(-1).view(np.uint8)
    step = 64 << 20
    for k in range(0, flat.shape[0], step):
        fh.write(memoryview(flat[k : k + step]))
    proto = TensorProto()
    proto.name = name
    proto.data_type = helper.np_dtype_to_tensor_dtype(arr.dtype)
    proto.dims.extend(arr.shape)
    proto.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(pos)), ("length", str(flat.shape[0]))):
        entry = proto.external_data.add()
        entry.key = key
        entry.value = value
    return proto


@dataclass
class ExportResult:
    """What :func:`export_onnx` wrote."""

    artifacts_dir: Path
    files: list[Path]
    opset: int
    ops: list[str]
    external_bytes: int

    def summary(self) -> str:
        names = ", ".join(p.name for p in self.files)
        return (
            f"wrote {names} in {self.artifacts_dir} (opset {self.opset}, "
            f"{self.external_bytes / 2**20:.1f} MiB of external data; ops: {' '.join(self.ops)})"
        )


def export_onnx(artifacts_dir: str | os.PathLike, opset: int = DEFAULT_OPSET) -> ExportResult:
    """Write ``dlrm.onnx``, ``dlrm.one_id.onnx`` and ``dlrm.onnx.data`` into
    ``artifacts_dir`` from its safetensors weights, check them, and record
    the opset in ``dlrm.json``.

    Files are written into a temporary folder inside ``artifacts_dir`` and
    moved into place only after ``onnx.checker`` and the op check pass.
    """
    import onnx

    from dlrm_serve.artifacts import CONFIG_FILE, WEIGHTS_FILE
    from dlrm_serve.model.weights import load_model

    _check_opset(opset)
    out = Path(artifacts_dir)
    model = load_model(out)  # validates config against weights
    config = model.config
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    fingerprint = weights_fingerprint(out / WEIGHTS_FILE)

    tmp = Path(tempfile.mkdtemp(prefix=".onnx-export-", dir=out))
    try:
        tensors: dict[str, Any] = {}
        with open(tmp / ONNX_DATA_FILE, "wb") as fh:
            for name, arr in state.items():
                if name.startswith("sparse_arch.") or arr.nbytes >= _EXTERNAL_MIN_BYTES:
                    tensors[name] = _external_tensor(name, arr, fh, ONNX_DATA_FILE)
                else:
                    tensors[name] = arr
            external_bytes = fh.tell()
        data_fingerprint = weights_fingerprint(tmp / ONNX_DATA_FILE)
        files, all_ops = [], set()
        for file_name, bags in ((ONNX_FILE, True), (ONNX_ONE_ID_FILE, False)):
            proto = build_graph(config, tensors, bags=bags, opset=opset, metadata={META_WEIGHTS: fingerprint, META_DATA: data_fingerprint})
            path = tmp / file_name
            onnx.save_model(proto, str(path))
            # A path (not the proto) so the checker also checks the external data references.
            onnx.checker.check_model(str(path), full_check=True)
            bad = forbidden_ops(proto)
            if bad:
                raise ValueError(f"internal error: the exported graph contains {bad}")
            all_ops.update(op_types(proto))
            files.append(file_name)
        files.append(ONNX_DATA_FILE)
        for name in files:
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    config.replace(onnx_opset=opset).save(out / CONFIG_FILE)
    return ExportResult(out, [out / n for n in files], opset, sorted(all_ops), external_bytes)
