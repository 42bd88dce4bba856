"""Importing facebookresearch/dlrm --save-model checkpoints.

``RefNet`` below is written from the reference's documented structure (not
copied): per-table ``nn.EmbeddingBag`` in ``emb_l``, ``nn.Sequential`` MLPs
``bot_l`` (ReLU after every Linear) and ``top_l`` (ReLU, Sigmoid after the
last), dot or cat interaction, optional output clamp.  The imported model is
fed the same rows through :class:`FeatureEncoder` and the torch backend.
"""

from __future__ import annotations

import json
import pickle
import types

import numpy as np
import pytest
import torch
from torch import nn

from dlrm_serve.model.checkpoints import reference
from dlrm_serve.artifacts import CONFIG_FILE, METRICS_FILE, load_config, load_model
from dlrm_serve.runtime.backends import load_backend
from dlrm_serve.cli import main
from dlrm_serve.config import CRITEO_DENSE, CRITEO_SPARSE
from dlrm_serve.errors import ArtifactError
from dlrm_serve.io.features import FeatureEncoder


# ----- a reference-structured model -------------------------------------------
def _mlp(in_width: int, widths: list[int], last: str) -> nn.Sequential:
    layers: list[nn.Module] = []
    prev = in_width
    for i, w in enumerate(widths):
        lin = nn.Linear(prev, w)
        # The reference's init (wider than torch's default, so outputs spread out).
        with torch.no_grad():
            lin.weight.normal_(0.0, (2.0 / (prev + w)) ** 0.5)
            lin.bias.normal_(0.0, (1.0 / w) ** 0.5)
        layers.append(lin)
        final = i == len(widths) - 1
        layers.append(nn.Sigmoid() if final and last == "sigmoid" else nn.ReLU())
        prev = w
    return nn.Sequential(*layers)


class RefNet(nn.Module):
    """The reference DLRM's structure and forward, for tests."""

    def __init__(
        self,
        num_dense: int,
        table_sizes: list[int],
        dim: int,
        bottom: list[int],
        top: list[int],
        op: str = "dot",
        self_interaction: bool = False,
        loss_threshold: float = 0.0,
        weighted_pooling: bool = False,
        seed: int = 0,
    ):
        super().__init__()
        torch.manual_seed(seed)
        self.op = op
        self.self_interaction = self_interaction
        self.loss_threshold = loss_threshold
        self.emb_l = nn.ModuleList(nn.EmbeddingBag(n, dim, mode="sum", sparse=True) for n in table_sizes)
        with torch.no_grad():
            for e in self.emb_l:
                e.weight.uniform_(-0.6, 0.6)
        self.bot_l = _mlp(num_dense, bottom + [dim], last="relu")
        n = len(table_sizes) + 1
        if op == "dot":
            width = dim + (n * (n + 1) // 2 if self_interaction else n * (n - 1) // 2)
        else:
            width = dim * n
        self.top_l = _mlp(width, top + [1], last="sigmoid")
        if weighted_pooling:
            self.v_W_l = nn.ParameterList(nn.Parameter(torch.rand(s) + 0.5) for s in table_sizes)
        else:
            self.v_W_l = None

    def forward(self, dense_x, lS_o, lS_i):
        x = self.bot_l(dense_x)
        ly = []
        for k, emb in enumerate(self.emb_l):
            psw = None if self.v_W_l is None else self.v_W_l[k].gather(0, lS_i[k])
            ly.append(emb(lS_i[k], lS_o[k], per_sample_weights=psw))
        if self.op == "dot":
            b, d = x.shape
            t = torch.cat([x] + ly, dim=1).view(b, -1, d)
            z = torch.bmm(t, t.transpose(1, 2))
            extra = 1 if self.self_interaction else 0
            n = t.shape[1]
            li = torch.tensor([i for i in range(n) for j in range(i + extra)], dtype=torch.long)
            lj = torch.tensor([j for i in range(n) for j in range(i + extra)], dtype=torch.long)
            r = torch.cat([x, z[:, li, lj]], dim=1)
        else:
            r = torch.cat([x] + ly, dim=1)
        p = self.top_l(r)
        if 0.0 < self.loss_threshold < 1.0:
            p = torch.clamp(p, min=self.loss_threshold, max=1.0 - self.loss_threshold)
        return p


def save_like_reference(net: RefNet, path, optimizer: str = "sgd", numpy1_names: bool = False) -> None:
    """One training step, then torch.save of the dict --save-model writes."""
    sizes = [e.weight.shape[0] for e in net.emb_l]
    rows = 8
    dense = torch.rand(rows, net.bot_l[0].in_features)
    lS_i = [torch.randint(0, s, (rows,)) for s in sizes]
    lS_o = [torch.arange(rows) for _ in sizes]
    target = torch.randint(0, 2, (rows, 1)).float()
    opt = (
        torch.optim.SGD(net.parameters(), lr=0.01)
        if optimizer == "sgd"
        else torch.optim.Adagrad(net.parameters(), lr=0.01)
    )
    z = net(dense, lS_o, lS_i)
    loss = nn.functional.binary_cross_entropy(z, target)
    opt.zero_grad()
    loss.backward()
    opt.step()
    # The reference's bookkeeping: numpy values, as its training loop computes them.
    L = loss.detach().cpu().numpy()
    S = z.detach().cpu().numpy()
    T = target.numpy()
    total_accu = np.sum((np.round(S, 0) == T).astype(np.uint8))
    total_loss = 0 + L * rows
    checkpoint = {
        "epoch": 0,
        "nepochs": 1,
        "nbatches": 100,
        "nbatches_test": 10,
        "iter": 50,
        "state_dict": net.state_dict(),
        "train_acc": total_accu / rows,
        "train_loss": total_loss / rows,
        "test_acc": total_accu / rows,
        "test_loss": total_loss / rows,
        "total_loss": 0,
        "total_accu": 0,
        "opt_state_dict": opt.state_dict(),
    }
    assert isinstance(checkpoint["train_acc"], np.float64)
    assert isinstance(checkpoint["train_loss"], np.floating)
    if numpy1_names:
        module = types.ModuleType("numpy1_pickle")
        module.Pickler = _Numpy1Pickler
        torch.save(checkpoint, path, pickle_module=module)
    else:
        torch.save(checkpoint, path)


class _Numpy1Pickler(pickle._Pickler):
    """Names numpy's scalar function as numpy 1.x does (numpy.core, not numpy._core)."""

    def save_global(self, obj, name=None):
        if obj is np._core.multiarray.scalar:
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\nscalar\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)


# ----- inputs --------------------------------------------------------------------
def make_rows(sizes, num_dense, batch, rng, multi_hot: bool, dense_low=-1.0, dense_high=4.0):
    """Raw rows: dense floats and per table an int id, a list of ids, or []."""
    dense = rng.uniform(dense_low, dense_high, size=(batch, num_dense)).astype(np.float32)
    sparse = []
    for _ in range(batch):
        row = []
        for s in sizes:
            if not multi_hot:
                row.append(int(rng.integers(0, s)))
                continue
            k = int(rng.integers(0, 4))  # 0 = empty bag
            row.append([int(v) for v in rng.integers(0, s, size=k)])
        sparse.append(row)
    return dense, sparse


def reference_inputs(dense, sparse, num_tables):
    lS_i, lS_o = [], []
    for k in range(num_tables):
        ids, offsets = [], []
        for row in sparse:
            offsets.append(len(ids))
            v = row[k]
            ids.extend(v if isinstance(v, list) else [v])
        lS_i.append(torch.tensor(ids, dtype=torch.long))
        lS_o.append(torch.tensor(offsets, dtype=torch.long))
    return torch.from_numpy(dense), lS_o, lS_i


def compare(net, out_dir, dense, sparse, ref_dense=None):
    """(ours, reference) probabilities for the same raw rows."""
    config = load_config(out_dir)
    encoder = FeatureEncoder(config)
    instances = [{"dense": [float(v) for v in d], "sparse": s} for d, s in zip(dense, sparse)]
    ours = load_backend(out_dir, "torch").predict(encoder.encode_instances(instances))
    x, lS_o, lS_i = reference_inputs(dense if ref_dense is None else ref_dense, sparse, config.num_sparse)
    with torch.no_grad():
        ref = net.eval()(x, lS_o, lS_i).squeeze(1).numpy()
    return ours, ref


def import_and_compare(tmp_path, net, sizes, num_dense, multi_hot, loss_threshold=0.0, batch=64, seed=1):
    ckpt = tmp_path / "model.pt"
    save_like_reference(net, ckpt)
    out = tmp_path / "artifacts"
    cfg = reference.import_checkpoint(ckpt, out, "none", loss_threshold)
    dense, sparse = make_rows(sizes, num_dense, batch, np.random.default_rng(seed), multi_hot)
    ours, ref = compare(net, out, dense, sparse)
    return cfg, ours, ref


def assert_close_and_spread(ours, ref):
    assert ours.shape == ref.shape
    assert float(np.max(np.abs(ours - ref))) <= 1e-6
    # Guard against a vacuous match (e.g. every output saturated at 0 or 1).
    assert float(np.std(ref)) > 0.01


# ----- the imported model predicts what the reference predicts -------------------------
@pytest.mark.parametrize(
    "op,self_interaction",
    [("dot", False), ("dot", True), ("cat", False)],
)
@pytest.mark.parametrize("multi_hot", [False, True])
def test_interactions_match_reference(tmp_path, op, self_interaction, multi_hot):
    sizes, num_dense = [7, 11, 5], 4
    net = RefNet(num_dense, sizes, 8, [16], [12], op=op, self_interaction=self_interaction)
    cfg, ours, ref = import_and_compare(tmp_path, net, sizes, num_dense, multi_hot)
    assert (cfg.interaction, cfg.self_interaction) == (op, self_interaction)
    assert cfg.table_sizes == tuple(sizes)
    assert cfg.embedding_dim == 8
    assert cfg.bottom_mlp == (16, 8)
    assert cfg.top_mlp == (12, 1)
    assert cfg.dense_names == ("dense_1", "dense_2", "dense_3", "dense_4")
    assert cfg.sparse_names == ("cat_1", "cat_2", "cat_3")
    assert_close_and_spread(ours, ref)


def test_criteo_shaped_model_gets_criteo_names(tmp_path):
    sizes = [3 + (i % 5) for i in range(26)]
    net = RefNet(13, sizes, 4, [8], [16, 8])
    cfg, ours, ref = import_and_compare(tmp_path, net, sizes, 13, multi_hot=True, batch=32)
    assert cfg.dense_names == CRITEO_DENSE
    assert cfg.sparse_names == CRITEO_SPARSE
    assert cfg.top_mlp == (16, 8, 1)
    assert_close_and_spread(ours, ref)


def test_every_bag_empty_pools_to_zero(tmp_path):
    sizes = [5, 6]
    net = RefNet(3, sizes, 4, [6], [5])
    ckpt, out = tmp_path / "m.pt", tmp_path / "a"
    save_like_reference(net, ckpt)
    reference.import_checkpoint(ckpt, out, "none", 0.0)
    dense = np.random.default_rng(0).uniform(0, 3, size=(16, 3)).astype(np.float32)
    sparse = [[[], []] for _ in range(16)]
    ours, ref = compare(net, out, dense, sparse)
    assert float(np.max(np.abs(ours - ref))) <= 1e-6


def test_loss_threshold_clamps_like_reference(tmp_path):
    sizes, num_dense, t = [9, 4, 6], 4, 0.3
    net = RefNet(num_dense, sizes, 4, [8], [8], seed=3)
    dense, sparse = make_rows(sizes, num_dense, 64, np.random.default_rng(1), multi_hot=True)
    # Centre and widen the outputs so that both bounds of the clamp are hit.
    with torch.no_grad():
        p = net(*reference_inputs(dense, sparse, len(sizes))).squeeze(1).double()
        logit = torch.log(p / (1 - p))
        last = net.top_l[-2]
        last.weight.mul_(4.0 / float(logit.std()))
        last.bias.mul_(4.0 / float(logit.std()))
        p = net(*reference_inputs(dense, sparse, len(sizes))).squeeze(1).double()
        last.bias.sub_(float(torch.log(p / (1 - p)).median()))
    net.loss_threshold = t
    ckpt, out = tmp_path / "m.pt", tmp_path / "a"
    save_like_reference(net, ckpt)
    cfg = reference.import_checkpoint(ckpt, out, "none", t)
    assert cfg.loss_threshold == t
    ours, ref = compare(net, out, dense, sparse)
    assert float(np.max(np.abs(ours - ref))) <= 1e-6
    low, high = np.float32(t), np.float32(1 - t)
    assert (ours == low).sum() >= 5 and (ours == high).sum() >= 5
    assert ((ours > low) & (ours < high)).sum() >= 5
    assert ours.min() >= low and ours.max() <= high


def test_log1p_transform_matches_reference_on_log_inputs(tmp_path):
    sizes, num_dense = [6, 8], 5
    net = RefNet(num_dense, sizes, 4, [8], [8], seed=5)
    ckpt, out = tmp_path / "m.pt", tmp_path / "a"
    save_like_reference(net, ckpt)
    cfg = reference.import_checkpoint(ckpt, out)  # log1p is the default
    assert cfg.dense_transform == "log1p"
    rng = np.random.default_rng(2)
    dense, sparse = make_rows(sizes, num_dense, 48, rng, multi_hot=False, dense_low=-3.0, dense_high=50.0)
    dense = np.round(dense)  # counts, some negative
    ref_dense = torch.log1p(torch.clamp(torch.from_numpy(dense), min=0.0)).numpy()
    ours, ref = compare(net, out, dense, sparse, ref_dense=ref_dense)
    assert_close_and_spread(ours, ref)


def test_learned_weighted_pooling_is_folded_into_tables(tmp_path):
    sizes, num_dense = [7, 5, 9], 3
    net = RefNet(num_dense, sizes, 4, [8], [8], weighted_pooling=True, seed=7)
    assert "v_W_l.0" in net.state_dict()
    cfg, ours, ref = import_and_compare(tmp_path, net, sizes, num_dense, multi_hot=True)
    assert_close_and_spread(ours, ref)


def test_ambiguous_interaction_needs_a_choice(tmp_path):
    # Three tables of dim 2: dot gives 2 + 6 = 8 inputs, cat gives 2 * 4 = 8.
    sizes, num_dense = [5, 6, 7], 3
    net = RefNet(num_dense, sizes, 2, [4], [6], op="cat")
    ckpt = tmp_path / "m.pt"
    save_like_reference(net, ckpt)
    with pytest.raises(ArtifactError, match="fits both dot and cat"):
        reference.import_checkpoint(ckpt, tmp_path / "a", "none", 0.0)
    assert not (tmp_path / "a" / CONFIG_FILE).exists()
    cfg = reference.import_checkpoint(ckpt, tmp_path / "a", "none", 0.0, interaction="cat")
    assert cfg.interaction == "cat"
    dense, sparse = make_rows(sizes, num_dense, 32, np.random.default_rng(0), multi_hot=True)
    ours, ref = compare(net, tmp_path / "a", dense, sparse)
    assert float(np.max(np.abs(ours - ref))) <= 1e-6


def test_infer_interaction_widths():
    # F=26, D=16: 27 vectors.
    assert reference.infer_interaction(26, 16, 16 + 27 * 26 // 2) == ("dot", False)
    assert reference.infer_interaction(26, 16, 16 + 27 * 28 // 2) == ("dot", True)
    assert reference.infer_interaction(26, 16, 16 * 27) == ("cat", False)
    with pytest.raises(ArtifactError, match="fits no interaction"):
        reference.infer_interaction(26, 16, 100)


def test_checkpoint_saved_under_numpy1_loads(tmp_path):
    sizes = [4, 5]
    net = RefNet(2, sizes, 4, [4], [4])
    ckpt = tmp_path / "m.pt"
    save_like_reference(net, ckpt, numpy1_names=True)
    assert "numpy.core.multiarray.scalar" in torch.serialization.get_unsafe_globals_in_checkpoint(str(ckpt))
    reference.import_checkpoint(ckpt, tmp_path / "a", "none", 0.0)
    metrics = json.loads((tmp_path / "a" / METRICS_FILE).read_text())
    assert metrics["reference"]["iter"] == 50
    assert isinstance(metrics["reference"]["train_acc"], float)


@pytest.mark.filterwarnings("ignore:Sparse invariant checks")
def test_adagrad_state_and_metrics(tmp_path):
    sizes = [4, 5]
    net = RefNet(2, sizes, 4, [4], [4])
    ckpt = tmp_path / "m.pt"
    save_like_reference(net, ckpt, optimizer="adagrad")
    reference.import_checkpoint(ckpt, tmp_path / "a", "none", 0.0)
    metrics = json.loads((tmp_path / "a" / METRICS_FILE).read_text())
    assert metrics["checkpoint"] == "m.pt"
    ref = metrics["reference"]
    assert ref["epoch"] == 0 and ref["nbatches"] == 100
    assert 0.0 <= ref["test_acc"] <= 1.0 and ref["train_loss"] > 0


def test_bare_state_dict_and_module_prefix(tmp_path):
    sizes, num_dense = [6, 3], 3
    net = RefNet(num_dense, sizes, 4, [8], [8], seed=11)
    bare = tmp_path / "bare.pt"
    torch.save(net.state_dict(), bare)
    reference.import_checkpoint(bare, tmp_path / "a", "none", 0.0)
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in net.state_dict().items()}}, wrapped)
    reference.import_checkpoint(wrapped, tmp_path / "b", "none", 0.0)
    dense, sparse = make_rows(sizes, num_dense, 32, np.random.default_rng(4), multi_hot=True)
    for out in ("a", "b"):
        ours, ref = compare(net, tmp_path / out, dense, sparse)
        assert_close_and_spread(ours, ref)


def test_half_precision_tables_are_widened(tmp_path):
    net = RefNet(3, [5, 6], 4, [8], [8])
    sd = {k: v.half() if k.startswith("emb_l") else v for k, v in net.state_dict().items()}
    _import_state(tmp_path, sd)
    model = load_model(tmp_path / "out")
    expected = torch.cat([net.emb_l[0].weight, net.emb_l[1].weight]).half().float()
    assert model.sparse_arch.weight.dtype == torch.float32
    assert torch.equal(model.sparse_arch.weight, expected)
    assert torch.equal(model.dense_arch.mlp[2].weight, net.bot_l[2].weight)
    assert torch.equal(model.over_arch.mlp[2].bias, net.top_l[2].bias)


# ----- what is refused ----------------------------------------------------------------
def _state(**overrides):
    net = RefNet(3, [5, 6], 4, [8], [8])
    sd = dict(net.state_dict())
    for k, v in overrides.items():
        if v is None:
            sd.pop(k)
        else:
            sd[k] = v
    return sd


def _import_state(tmp_path, sd, **kw):
    path = tmp_path / "bad.pt"
    torch.save({"epoch": 0, "state_dict": sd}, path)
    return reference.import_checkpoint(path, tmp_path / "out", "none", 0.0, **kw)


def test_qr_embeddings_are_refused(tmp_path):
    sd = _state(**{
        "emb_l.1.weight": None, "emb_l.1.weight_q": torch.zeros(3, 4), "emb_l.1.weight_r": torch.zeros(2, 4),
    })
    with pytest.raises(ArtifactError, match="quotient-remainder"):
        _import_state(tmp_path, sd)


def test_mixed_dimension_embeddings_are_refused(tmp_path):
    sd = _state(**{
        "emb_l.0.weight": None, "emb_l.0.embs.weight": torch.zeros(5, 2), "emb_l.0.projs.weight": torch.zeros(4, 2),
    })
    with pytest.raises(ArtifactError, match="mixed-dimension"):
        _import_state(tmp_path, sd)
    with pytest.raises(ArtifactError, match=r"different dimensions \[4, 3\]"):
        _import_state(tmp_path, _state(**{"emb_l.1.weight": torch.zeros(6, 3)}))


@pytest.mark.parametrize(
    "overrides",
    [
        {"emb_l.0.weight": torch.zeros(5, 4, dtype=torch.uint8)},
        {"emb_l.0.weight": torch.zeros(5, 4, dtype=torch.int8)},
        {"emb_l_q.0": torch.zeros(5, 8, dtype=torch.uint8)},
        {"bot_l.0.scale": torch.tensor(0.1), "bot_l.0._packed_params.dtype": torch.qint8},
    ],
)
def test_quantized_models_are_refused(tmp_path, overrides):
    with pytest.raises(ArtifactError, match="quantized"):
        _import_state(tmp_path, _state(**overrides))


def test_bottom_width_must_equal_embedding_dim(tmp_path):
    net = RefNet(3, [5, 6], 4, [8], [8])
    sd = dict(net.state_dict())
    sd["bot_l.2.weight"] = torch.zeros(6, 8)  # the bottom now ends at 6, the tables have dim 4
    sd["bot_l.2.bias"] = torch.zeros(6)
    with pytest.raises(ArtifactError, match="bottom MLP ends with width 6 but the tables have dim 4"):
        _import_state(tmp_path, sd)


def test_odd_mlp_layout_is_refused(tmp_path):
    sd = _state()
    sd["bot_l.3.weight"] = sd.pop("bot_l.2.weight")
    sd["bot_l.3.bias"] = sd.pop("bot_l.2.bias")
    with pytest.raises(ArtifactError, match=r"bot_l has layers at indices \[0, 3\]"):
        _import_state(tmp_path, sd)
    with pytest.raises(ArtifactError, match="unexpected tensors"):
        _import_state(tmp_path, _state(**{"bot_l.1.running_mean": torch.zeros(8)}))


def test_top_width_that_fits_no_interaction_is_refused(tmp_path):
    sd = _state(**{"top_l.0.weight": torch.zeros(8, 11)})
    with pytest.raises(ArtifactError, match="11 inputs, which fits no interaction"):
        _import_state(tmp_path, sd)


def test_requested_interaction_must_fit(tmp_path):
    with pytest.raises(ArtifactError, match="not the requested interaction 'cat'"):
        _import_state(tmp_path, _state(), interaction="cat")


def test_one_rank_of_a_distributed_run_is_refused(tmp_path):
    # With several ranks the reference wraps its MLPs in DDP and shards the tables.
    net = RefNet(3, [5, 6], 4, [8], [8])
    sd = {}
    for k, v in net.state_dict().items():
        group, rest = k.split(".", 1)
        if group in ("bot_l", "top_l"):
            k = f"{group}.module.{rest}"
        if k != "emb_l.1.weight":
            sd[k] = v
    with pytest.raises(ArtifactError, match="one rank of a distributed run"):
        _import_state(tmp_path, sd)


def test_missing_table_is_refused(tmp_path):
    sd = _state()
    sd["emb_l.3.weight"] = torch.zeros(4, 4)
    with pytest.raises(ArtifactError, match=r"numbered \[0, 1, 3\]"):
        _import_state(tmp_path, sd)


class CustomRecord:
    """A class from outside the allow-list."""

    def __init__(self):
        self.value = 1


class RunsCommand:
    """Unpickling this would run a shell command."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_custom_class_is_refused_without_running_it(tmp_path):
    path = tmp_path / "custom.pt"
    torch.save({"state_dict": _state(), "extra": CustomRecord()}, path)
    with pytest.raises(ArtifactError, match=r"CustomRecord.*only checkpoints written by facebookresearch/dlrm"):
        reference.import_checkpoint(path, tmp_path / "out")


def test_code_in_pickle_is_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": _state(), "extra": RunsCommand(marker)}, path)
    with pytest.raises(ArtifactError, match=r"system.*nothing from the file was executed"):
        reference.import_checkpoint(path, tmp_path / "out")
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_refusals_found_while_loading(tmp_path):
    # The legacy (non-zip) format cannot be scanned first; torch.load refuses it.
    marker = tmp_path / "pwned"
    legacy = tmp_path / "legacy.pt"
    torch.save({"state_dict": _state(), "extra": RunsCommand(marker)}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(ArtifactError, match=r"refused to load: the checkpoint needs \S*system"):
        reference.import_checkpoint(legacy, tmp_path / "out")
    assert not marker.exists()
    # A numpy scalar of a dtype outside the allow-list is refused when its dtype is built.
    odd = tmp_path / "complex.pt"
    torch.save({"state_dict": _state(), "test_acc": np.complex128(1 + 2j)}, odd)
    with pytest.raises(ArtifactError, match="Complex128DType"):
        reference.import_checkpoint(odd, tmp_path / "out")


def test_legacy_format_checkpoint_imports(tmp_path):
    sizes, num_dense = [6, 3], 3
    net = RefNet(num_dense, sizes, 4, [8], [8], seed=2)
    path = tmp_path / "legacy.pt"
    torch.save({"epoch": 1, "test_acc": np.float64(0.75), "state_dict": net.state_dict()}, path,
               _use_new_zipfile_serialization=False)
    reference.import_checkpoint(path, tmp_path / "a", "none", 0.0)
    dense, sparse = make_rows(sizes, num_dense, 32, np.random.default_rng(3), multi_hot=False)
    ours, ref = compare(net, tmp_path / "a", dense, sparse)
    assert_close_and_spread(ours, ref)


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(ArtifactError, match="not found"):
        reference.import_checkpoint(tmp_path / "nope.pt", tmp_path / "out")
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint\n")
    with pytest.raises(ArtifactError, match="not a readable PyTorch checkpoint"):
        reference.import_checkpoint(junk, tmp_path / "out")
    other = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], other)
    with pytest.raises(ArtifactError, match="holds a list, not a dict"):
        reference.import_checkpoint(other, tmp_path / "out")
    keys = tmp_path / "keys.pt"
    torch.save({"model": {"w": torch.zeros(2)}}, keys)
    with pytest.raises(ArtifactError, match="no 'state_dict' entry"):
        reference.import_checkpoint(keys, tmp_path / "out")


def test_bad_arguments(tmp_path):
    with pytest.raises(ArtifactError, match="loss_threshold"):
        reference.import_checkpoint(tmp_path / "x.pt", tmp_path / "out", "none", 0.5)
    with pytest.raises(ArtifactError, match="dense_transform"):
        reference.import_checkpoint(tmp_path / "x.pt", tmp_path / "out", "log", 0.0)


# ----- the command line --------------------------------------------------------------
def test_cli_import_checkpoint(tmp_path, capsys):
    sizes, num_dense = [5, 6, 7], 4
    net = RefNet(num_dense, sizes, 4, [8], [8], self_interaction=True, loss_threshold=0.01)
    ckpt, out = tmp_path / "m.pt", tmp_path / "art"
    save_like_reference(net, ckpt)
    rc = main([
        "import-checkpoint", str(ckpt), "--out", str(out), "--dense-transform", "none", "--loss-threshold", "0.01",
    ])
    assert rc == 0
    said = capsys.readouterr().out
    assert "4 dense, 3 categorical features" in said and "dot (self)" in said
    cfg = load_config(out)
    assert cfg.loss_threshold == 0.01 and cfg.dense_transform == "none" and cfg.self_interaction
    dense, sparse = make_rows(sizes, num_dense, 32, np.random.default_rng(9), multi_hot=True)
    ours, ref = compare(net, out, dense, sparse)
    assert_close_and_spread(ours, ref)


def test_cli_reports_errors(tmp_path, capsys):
    rc = main(["import-checkpoint", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "o")])
    assert rc == 2
    assert "not found" in capsys.readouterr().err
