"""The model stages, the config they are built from, and their artifacts.

Predictions are checked against a plain reference written here from the
DLRM definition: one ``nn.EmbeddingBag`` per table holding that table's
slice of the concatenated table, a loop over the pairs in the reference's
order (row i, then column j < i), and the MLPs as explicit matmuls.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from torch import nn

from dlrm_serve.artifacts import CONFIG_FILE, WEIGHTS_FILE, check_artifacts, load_model, save_artifacts
from dlrm_serve.config import PRESETS, DLRMConfig, preset
from dlrm_serve.errors import ArtifactError
from dlrm_serve.io.features import FeatureEncoder
from dlrm_serve.model.dense import DenseArch
from dlrm_serve.model.dlrm import STACK_MIN_BATCH, DLRM
from dlrm_serve.model.interaction import InteractionArch
from dlrm_serve.model.over import OverArch
from dlrm_serve.model.sparse import SparseArch

SMALL = dict(
    table_sizes=(7, 3, 11, 5),
    embedding_dim=4,
    bottom_mlp=(8, 4),
    top_mlp=(6, 1),
    dense_names=("a", "b", "c"),
    sparse_names=("w", "x", "y", "z"),
)
INTERACTIONS = [("dot", False), ("dot", True), ("cat", False)]


def small_config(**overrides) -> DLRMConfig:
    return DLRMConfig(**{**SMALL, **overrides})


def small_model(seed: int = 0, **overrides) -> DLRM:
    torch.manual_seed(seed)
    return DLRM(small_config(**overrides)).eval()


# ----- the reference -----------------------------------------------------------
def per_table_bags(model: DLRM) -> list[nn.EmbeddingBag]:
    """One sum-pooling EmbeddingBag per table, holding its slice of the concatenated table."""
    cfg = model.config
    bags = []
    for start, n in zip(cfg.table_offsets, cfg.table_sizes):
        bag = nn.EmbeddingBag(n, cfg.embedding_dim, mode="sum")
        with torch.no_grad():
            bag.weight.copy_(model.sparse_arch.weight[start : start + n])
        bags.append(bag)
    return bags


def reference_pooled(model: DLRM, rows: list[list[list[int]]]) -> torch.Tensor:
    """``rows[b][f]`` = local ids of table f for sample b -> pooled ``[B, F, D]``."""
    out = []
    for f, bag in enumerate(per_table_bags(model)):
        ids, starts = [], []
        for row in rows:
            starts.append(len(ids))
            ids.extend(row[f])
        with torch.no_grad():
            out.append(bag(torch.tensor(ids, dtype=torch.long), torch.tensor(starts, dtype=torch.long)))
    return torch.stack(out, dim=1)


def reference_logits(model: DLRM, dense: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    cfg = model.config
    sd = model.state_dict()

    def layer(x, prefix, i, relu):
        y = x @ sd[f"{prefix}.mlp.{2 * i}.weight"].T + sd[f"{prefix}.mlp.{2 * i}.bias"]
        return torch.relu(y) if relu else y

    x = dense
    for i in range(len(cfg.bottom_mlp)):
        x = layer(x, "dense_arch", i, True)
    vecs = [x] + [pooled[:, f] for f in range(cfg.num_sparse)]
    if cfg.interaction == "cat":
        feats = vecs
    else:
        extra = 1 if cfg.self_interaction else 0
        feats = [x] + [
            (vecs[i] * vecs[j]).sum(dim=1, keepdim=True) for i in range(len(vecs)) for j in range(i + extra)
        ]
    h = torch.cat(feats, dim=1)
    for i in range(len(cfg.top_mlp)):
        h = layer(h, "over_arch", i, i < len(cfg.top_mlp) - 1)
    return h[:, 0]


def random_rows(cfg: DLRMConfig, n: int, seed: int, max_bag: int = 3) -> list[list[list[int]]]:
    """Bags of 0..max_bag local ids (repeats allowed), with every bag size present."""
    rng = np.random.default_rng(seed)
    rows = []
    for b in range(n):
        row = []
        for f, size in enumerate(cfg.table_sizes):
            k = (b + f) % (max_bag + 1) if b < max_bag + 1 else int(rng.integers(0, max_bag + 1))
            row.append([int(v) for v in rng.integers(0, size, k)])
        rows.append(row)
    rows[0][0] = [1, 1, 1]  # a repeated id counts once per occurrence
    return rows


def encode(cfg: DLRMConfig, dense: np.ndarray, rows: list[list[list[int]]]):
    """Rows of per-table ids -> model inputs, through the serving encoder."""
    instances = [{"dense": [float(v) for v in d], "sparse": [list(bag) for bag in row]} for d, row in zip(dense, rows)]
    return FeatureEncoder(cfg).encode_instances(instances)


def as_torch(batch):
    offsets = None if batch.offsets is None else torch.from_numpy(batch.offsets)
    return torch.from_numpy(batch.dense), torch.from_numpy(batch.indices), offsets


# ----- interaction widths --------------------------------------------------------
@pytest.mark.parametrize("op,self_", INTERACTIONS)
def test_interaction_width_matches_output(op, self_):
    cfg = small_config(interaction=op, self_interaction=self_)
    d, f = cfg.embedding_dim, cfg.num_sparse
    expected = {("dot", False): d + 10, ("dot", True): d + 15, ("cat", False): d * (f + 1)}[(op, self_)]
    assert cfg.interaction_width == expected
    arch = InteractionArch(f, d, op, self_)
    out = arch(torch.randn(5, d), torch.randn(5, f, d))
    assert out.shape == (5, cfg.interaction_width)
    # The model's first top layer is sized from the same number.
    assert DLRM(cfg).over_arch.mlp[0].weight.shape[1] == out.shape[1]


def test_dot_interaction_pairs_in_reference_order():
    arch = InteractionArch(2, 3, "dot")
    dense = torch.tensor([[1.0, 0.0, 0.0]])
    sparse = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 3.0, 1.0]]])
    out = arch(dense, sparse)
    # dense, then <e1,x>, <e2,x>, <e2,e1>: row i, columns j < i.
    assert out.tolist() == [[1.0, 0.0, 0.0, 2.0, 0.0, 0.0]]
    with_self = InteractionArch(2, 3, "dot", self_interaction=True)(dense, sparse)
    # <x,x>, <e1,x>, <e1,e1>, <e2,x>, <e2,e1>, <e2,e2>
    assert with_self.tolist() == [[1.0, 0.0, 0.0, 1.0, 2.0, 4.0, 0.0, 0.0, 10.0]]


# ----- lookups and predictions against the reference ---------------------------------
@pytest.mark.parametrize("op,self_", INTERACTIONS)
def test_empty_and_multi_hot_bags_match_embedding_bags(op, self_):
    model = small_model(interaction=op, self_interaction=self_)
    cfg = model.config
    rng = np.random.default_rng(1)
    dense = rng.random((9, cfg.num_dense)).astype(np.float32) * 50
    rows = random_rows(cfg, 9, seed=2)
    batch = encode(cfg, dense, rows)
    assert batch.offsets is not None
    d, idx, off = as_torch(batch)
    want_pooled = reference_pooled(model, rows)
    with torch.no_grad():
        got = model.sparse_arch(idx, off, batch.batch_size)
    assert any(len(bag) == 0 for row in rows for bag in row)
    assert torch.all(got[0, 0] == want_pooled[0, 0]) and got[0, 0].abs().sum() > 0
    torch.testing.assert_close(got, want_pooled, rtol=1e-6, atol=1e-7)
    with torch.no_grad():
        want = torch.sigmoid(reference_logits(model, d, want_pooled))
        p = model(d, idx, off)
    assert p.shape == (9,)
    torch.testing.assert_close(p, want, rtol=1e-5, atol=1e-6)


def test_one_id_per_bag_fast_path_equals_offsets_path():
    model = small_model(seed=3)
    cfg = model.config
    rng = np.random.default_rng(3)
    dense = rng.random((6, cfg.num_dense)).astype(np.float32)
    rows = [[[int(rng.integers(0, s))] for s in cfg.table_sizes] for _ in range(6)]
    batch = encode(cfg, dense, rows)
    assert batch.offsets is None
    d, idx, _ = as_torch(batch)
    off = torch.arange(idx.shape[0] + 1)
    with torch.no_grad():
        assert torch.equal(model.sparse_arch(idx, None, 6), model.sparse_arch(idx, off, 6))
        assert torch.equal(model(d, idx), model(d, idx, off))
        want = torch.sigmoid(reference_logits(model, d, reference_pooled(model, rows)))
        torch.testing.assert_close(model(d, idx), want)


@pytest.mark.parametrize("op,self_", INTERACTIONS)
@pytest.mark.parametrize("multi_hot", [False, True])
def test_stacked_lookups_feed_the_interaction_like_plain_ones(op, self_, multi_hot):
    model = small_model(seed=12, interaction=op, self_interaction=self_)
    cfg = model.config
    rng = np.random.default_rng(12)
    if multi_hot:
        rows = random_rows(cfg, 6, seed=13)
    else:
        rows = [[[int(rng.integers(0, s))] for s in cfg.table_sizes] for _ in range(6)]
    _, idx, off = as_torch(encode(cfg, np.zeros((6, 3), np.float32), rows))
    assert (off is None) != multi_hot
    x = torch.randn(6, cfg.embedding_dim)
    with torch.no_grad():
        plain = model.sparse_arch(idx, off, 6)
        stacked = model.sparse_arch(idx, off, 6, lead=1)
        assert stacked.shape == (6, cfg.num_sparse + 1, cfg.embedding_dim)
        assert torch.equal(stacked[:, 1:], plain)
        out = model.interaction(x, stacked)
        assert torch.equal(stacked[:, 0], x)  # the dense vector went into the free row
        assert torch.equal(out, model.interaction(x, plain))


def test_large_batches_take_the_stacked_path_with_the_same_predictions():
    model = small_model(seed=14)
    cfg = model.config
    b = STACK_MIN_BATCH
    rng = np.random.default_rng(14)
    rows = [[[int(rng.integers(0, s))] for s in cfg.table_sizes] for _ in range(b)]
    d, idx, _ = as_torch(encode(cfg, rng.random((b, 3)).astype(np.float32), rows))
    calls = []
    hook = model.sparse_arch.register_forward_hook(
        lambda mod, args, kwargs, out: calls.append(out.shape), with_kwargs=True
    )
    with torch.no_grad():
        p = model(d, idx)
        model(d[:2], idx[: 2 * cfg.num_sparse])
    hook.remove()
    assert calls == [(b, cfg.num_sparse + 1, cfg.embedding_dim), (2, cfg.num_sparse, cfg.embedding_dim)]
    want = torch.sigmoid(reference_logits(model, d, reference_pooled(model, rows)))
    torch.testing.assert_close(p, want, rtol=1e-5, atol=1e-6)


def test_int8_table_pools_dequantised_rows():
    cfg = small_config(table_dtype="int8")
    model = DLRM(cfg).eval()
    gen = torch.Generator().manual_seed(4)
    codes = torch.randint(0, 256, (cfg.total_rows, cfg.embedding_dim), dtype=torch.uint8, generator=gen)
    scale_bias = torch.rand(cfg.total_rows, 2, generator=gen) * torch.tensor([0.01, 1.0]) - torch.tensor([0.0, 0.5])
    model.sparse_arch.codes.copy_(codes)
    model.sparse_arch.scale_bias.copy_(scale_bias)
    table = codes.float() * scale_bias[:, :1] + scale_bias[:, 1:]
    rows = random_rows(cfg, 7, seed=5)
    batch = encode(cfg, np.zeros((7, cfg.num_dense), np.float32), rows)
    _, idx, off = as_torch(batch)
    want = torch.nn.functional.embedding_bag(idx, table, off, mode="sum", include_last_offset=True)
    torch.testing.assert_close(model.sparse_arch(idx, off, 7), want.view(7, cfg.num_sparse, -1))


def test_loss_threshold_clamps_probabilities():
    model = small_model(loss_threshold=0.2)
    with torch.no_grad():
        model.over_arch.mlp[-1].bias.fill_(100.0)
        idx = torch.zeros(2 * model.config.num_sparse, dtype=torch.long)
        assert model(torch.zeros(2, 3), idx).tolist() == pytest.approx([0.8, 0.8])


# ----- the training path ------------------------------------------------------------
@pytest.mark.parametrize("batch", [8, STACK_MIN_BATCH])
def test_training_path_gives_sparse_table_grads_and_reference_mlp_grads(batch):
    model = small_model(seed=6)
    model.train()
    model.sparse_arch.sparse_grad = True
    cfg = model.config
    rows = random_rows(cfg, batch, seed=7)
    d, idx, off = as_torch(encode(cfg, np.random.default_rng(8).random((batch, 3)).astype(np.float32), rows))
    y = torch.tensor([0.0, 1.0] * (batch // 2))
    loss = nn.functional.binary_cross_entropy_with_logits(model.logits(d, idx, off), y)
    loss.backward()
    grad = model.sparse_arch.weight.grad
    assert grad.is_sparse
    touched = set(grad.coalesce().indices()[0].tolist())
    assert touched == set(idx.tolist())

    # The same loss through the plain reference gives the same MLP gradients.
    ref = DLRM(cfg, init=False)
    ref.load_state_dict(model.state_dict())
    pooled = reference_pooled(ref, rows)
    ref_loss = nn.functional.binary_cross_entropy_with_logits(reference_logits_autograd(ref, d, pooled), y)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss)
    for name, p in model.named_parameters():
        if name != "sparse_arch.weight":
            torch.testing.assert_close(p.grad, dict(ref.named_parameters())[name].grad, rtol=1e-5, atol=1e-6)


def reference_logits_autograd(model: DLRM, dense, pooled):
    """``reference_logits`` through the modules' own nn.Sequential (autograd-tracked)."""
    x = model.dense_arch.mlp(dense)
    return model.over_arch.mlp(model.interaction(x, pooled)).squeeze(1)


# ----- bad values ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "build,message",
    [
        (lambda: DenseArch(0, (4,)), "num_dense must be positive, got 0"),
        (lambda: SparseArch(0, 2, 4), "rows=0"),
        (lambda: SparseArch(10, 2, -1), "dim=-1"),
        (lambda: SparseArch(10, 2, 4, "float16"), "'float16'"),
        (lambda: InteractionArch(3, 4, "sum"), "'sum'"),
        (lambda: SparseArch(10, 2, 4)(torch.zeros(2, dtype=torch.long), None, 1, lead=-1), "lead must be >= 0, got -1"),
        (lambda: InteractionArch(3, 4)(torch.zeros(1, 4), torch.zeros(1, 5, 4)), "5 rows per sample; expected 3"),
        (lambda: OverArch(8, (4, 2)), r"\[4, 2\]"),
    ],
)
def test_stage_constructors_name_bad_values(build, message):
    with pytest.raises(ValueError, match=message):
        build()


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(bottom_mlp=(8, 5)), r"bottom_mlp \[8, 5\] must end with the embedding dim 4"),
        (dict(top_mlp=(6, 2)), r"top_mlp \[6, 2\] must end with width 1"),
        (dict(interaction="sum"), "'sum'"),
        (dict(table_sizes=(7, 0, 11, 5)), "got 0"),
        (dict(table_sizes=(7, 3, 11)), "3 entries but there are 4"),
        (dict(embedding_dim=0, bottom_mlp=(8, 0)), "got 0"),
        (dict(dense_transform="log"), "'log'"),
        (dict(table_dtype="fp16"), "'fp16'"),
        (dict(loss_threshold=0.7), "0.7"),
        (dict(sparse_names=("w", "x", "y", "a")), r"repeated: \['a'\]"),
        (dict(self_interaction="yes"), "'yes'"),
        (dict(format_version=99), "99"),
    ],
)
def test_config_validation_names_bad_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        small_config(**overrides)


def test_config_from_dict_rejects_unknown_keys_and_presets_unknown_names():
    data = small_config().to_dict()
    with pytest.raises(ValueError, match="unknown config keys \\['tables'\\]"):
        DLRMConfig.from_dict({**data, "tables": 3})
    with pytest.raises(ValueError, match="'criteo'"):
        preset("criteo")


# ----- config persistence and presets ---------------------------------------------------
def test_config_json_round_trip(tmp_path):
    cfg = small_config(interaction="cat", loss_threshold=0.01, name="x")
    text = cfg.to_json()
    assert json.loads(text)["table_sizes"] == [7, 3, 11, 5]
    assert DLRMConfig.from_json(text) == cfg
    cfg.save(tmp_path / "c.json")
    assert DLRMConfig.load(tmp_path / "c.json") == cfg
    assert hash(DLRMConfig.load(tmp_path / "c.json")) == hash(cfg)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_valid_configs(name):
    cfg = preset(name)
    assert DLRMConfig.from_json(cfg.to_json()) == cfg
    assert cfg.bottom_mlp[-1] == cfg.embedding_dim and cfg.top_mlp[-1] == 1
    assert len(cfg.table_sizes) == cfg.num_sparse == 26 and cfg.num_dense == 13


def test_criteo_kaggle_preset_numbers():
    cfg = preset("criteo-kaggle")
    assert cfg.interaction_width == 367
    assert cfg.total_rows == 33_762_577
    assert 0.95e6 <= cfg.flops_per_sample() <= 0.98e6
    assert preset("criteo-kaggle", embedding_dim=16).table_offsets[1] == 1460


# ----- artifacts --------------------------------------------------------------------------
def test_artifacts_round_trip_keeps_predictions(tmp_path):
    model = small_model(seed=9)
    save_artifacts(model, tmp_path)
    loaded = load_model(tmp_path)
    assert loaded.config == model.config
    assert not loaded.training
    rows = random_rows(model.config, 5, seed=10)
    d, idx, off = as_torch(encode(model.config, np.ones((5, 3), np.float32), rows))
    with torch.no_grad():
        assert torch.equal(loaded(d, idx, off), model(d, idx, off))
    assert check_artifacts(tmp_path) == model.config


def test_check_artifacts_reports_shape_mismatch(tmp_path):
    model = small_model()
    save_artifacts(model, tmp_path)
    cfg = model.config.replace(table_sizes=(7, 3, 12, 5), top_mlp=(9, 1))
    (tmp_path / CONFIG_FILE).write_text(cfg.to_json())
    with pytest.raises(ArtifactError) as err:
        check_artifacts(tmp_path)
    msg = str(err.value)
    assert "'sparse_arch.weight' has shape [26, 4], the config implies [27, 4]" in msg
    assert "'over_arch.mlp.0.weight' has shape [6, 14], the config implies [9, 14]" in msg
    with pytest.raises(ArtifactError, match="sparse_arch.weight"):
        load_model(tmp_path)


def mappings_of(path: str) -> list[tuple[int, int]]:
    """Address ranges of this process that map ``path``."""
    real = os.path.realpath(path)
    out = []
    with open("/proc/self/maps", encoding="utf-8") as fh:
        for line in fh:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].strip() == real:
                lo, hi = (int(v, 16) for v in parts[0].split("-"))
                out.append((lo, hi))
    return out


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux /proc")
def test_load_model_maps_the_table_without_copying(tmp_path):
    save_artifacts(small_model(seed=11), tmp_path)
    model = load_model(tmp_path)
    table = model.sparse_arch.weight
    start = table.data_ptr()
    end = start + table.numel() * table.element_size()
    ranges = mappings_of(str(tmp_path / WEIGHTS_FILE))
    assert ranges, "the safetensors file is not mapped at all"
    assert any(lo <= start and end <= hi for lo, hi in ranges), (hex(start), ranges)
    # Inference still works on the mapped tensor.
    with torch.no_grad():
        p = model(torch.zeros(1, 3), torch.tensor(model.config.table_offsets))
    assert 0.0 < float(p[0]) < 1.0
