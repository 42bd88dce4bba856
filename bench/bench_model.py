"""Forward-pass throughput of the MLPerf Criteo Kaggle DLRM, fp32 and bf16, against this machine's GEMM roofline.

The architecture is ``preset("criteo-kaggle")`` with its tables capped at
``--max-rows`` rows (100k by default): the benchmark measures compute, and
table size changes only the cache behaviour of the lookups.  Inputs are
random Criteo-style rows (hex ids, one per bag, integer counts) encoded by
the same :class:`FeatureEncoder` that serving uses, a different batch each
call so that lookups miss the cache as they do in serving (``--distinct 1``
repeats one batch); the models are loaded from saved artifacts by
:class:`TorchBackend`, as serving does, once per precision.  Only the
forward pass is timed.  Variants, side by side in interleaved rounds:

- ``fp32``: the saved weights as they are (``precision="fp32"``);
- ``bf16``: ``precision="bf16"``, MLP weights cast once at load, the
  float32 tables mapped from the file as in serving;
- ``bf16, bf16 tables``: the same with the tables cast to a bfloat16 copy
  (``bf16_tables=True``; ``--bf16-tables``);
- ``int8 MLPs``: row-wise (per-channel) int8 weights with dynamic
  activation quantisation, ``torch.ao`` ``quantize_dynamic`` (tried and
  not offered as a precision: slower than bf16 and less accurate; ``--no-int8``
  skips it);
- ``plain eager``: the fp32 weights the straightforward way (each stage's
  ``nn.Sequential``; ``--no-baseline`` drops it).

The roofline is the FP32 GEMM rate (a large ``torch.mm``, timed between
the forward passes of the same run) divided by ``config.flops_per_sample()``;
a bf16 ``torch.mm`` of the same size is timed too, for reference.  With
``--quality ARTIFACTS TEST_TSV`` it also reports each variant's test AUC
and largest |Δp| against fp32 on a trained model.

    python bench/bench_model.py [--batches 1,64,512,2048] [--threads N] [--distinct K] [--no-int8] [--bf16-tables]
        [--quality ARTIFACTS TEST_TSV] [--compile]
"""

from __future__ import annotations

import argparse
import copy
import itertools
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    gemm_gflops,
    machine_info,
    machine_line,
    markdown_table,
    save_plot,
    time_interleaved,
    write_markdown,
)

from dlrm_serve.artifacts import save_artifacts  # noqa: E402
from dlrm_serve.runtime.backends import TorchBackend  # noqa: E402
from dlrm_serve.config import preset  # noqa: E402
from dlrm_serve.io.features import FeatureEncoder  # noqa: E402
from dlrm_serve.model.dlrm import DLRM  # noqa: E402

GEMM_N = 2048
# The bf16 forward's target at the largest batch, in multiples of the FP32 GEMM roofline.
TARGET = 2.0
# How far a variant's probabilities may stray from fp32 on the bench's random model before the run stops.
MAX_DP = {"fp32": 1e-6, "plain eager": 1e-6}
MAX_DP_LOW = 0.02


def bench_config(max_rows: int):
    base = preset("criteo-kaggle")
    return preset("criteo-kaggle", table_sizes=tuple(min(s, max_rows) for s in base.table_sizes))


def criteo_like_batch(encoder: FeatureEncoder, batch: int, seed: int):
    """Random raw rows (hex ids, counts) -> model input tensors via the serving encoder."""
    cfg = encoder.config
    rng = np.random.default_rng(seed)
    dense = rng.geometric(0.05, size=(batch, cfg.num_dense)).astype(np.float64) - 1
    ids = rng.integers(0, 2**32, size=(batch, cfg.num_sparse), dtype=np.uint64)
    hexes = np.char.mod("%08x", ids)
    fb = encoder.encode_columns(dense, hexes)
    if fb.offsets is not None:
        raise ValueError("the benchmark expects one id per bag")
    return torch.from_numpy(fb.dense), torch.from_numpy(fb.indices)


def cycling(fn, inputs):
    """A no-argument call of ``fn`` on the next of ``inputs`` each time."""
    it = itertools.cycle(inputs)
    return lambda: fn(*next(it))


def plain_eager(model: DLRM):
    """The straightforward eager forward: each stage's nn.Sequential and a concatenated interaction."""

    def forward(dense, indices):
        x = model.dense_arch.mlp(dense)
        e = model.sparse_arch(indices, None, dense.shape[0])
        return torch.sigmoid(model.over_arch.mlp(model.interaction(x, e)).squeeze(1))

    return forward


def int8_mlps(model: DLRM) -> DLRM:
    """A copy of ``model`` with row-wise int8 MLP weights and dynamically quantised activations."""
    out = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's eager quantisation API is deprecated in favour of torchao
        for arch in (out.dense_arch, out.over_arch):
            arch.mlp = torch.ao.quantization.quantize_dynamic(arch.mlp, {torch.nn.Linear}, dtype=torch.qint8)
    return out


def variants_of(artifacts: str, args, quality_only: bool = False) -> dict:
    """Name -> model (a callable of dense, indices), every one loaded as serving loads it."""
    fp32 = TorchBackend(artifacts, precision="fp32").model
    out = {"fp32": fp32, "bf16": TorchBackend(artifacts, precision="bf16").model}
    if args.bf16_tables:
        out["bf16, bf16 tables"] = TorchBackend(artifacts, precision="bf16", bf16_tables=True).model
    if not args.no_int8:
        out["int8 MLPs"] = int8_mlps(fp32)
    if not args.no_baseline and not quality_only:
        out["plain eager"] = plain_eager(fp32)
    return out


def quality(artifacts: str, test_tsv: str, args) -> list[list]:
    """Per variant: test AUC, log loss and largest |Δp| against fp32 on a trained model's test rows."""
    from dlrm_serve.io.criteo import encode_chunk, read_criteo
    from dlrm_serve.offline.evaluation import log_loss, roc_auc

    variants = variants_of(artifacts, args, quality_only=True)
    encoder = FeatureEncoder(variants["fp32"].config)
    labels, preds = [], {n: [] for n in variants}
    cfg = encoder.config
    with torch.inference_mode():
        for chunk in read_criteo([test_tsv], cfg.num_dense, cfg.num_sparse, chunk_rows=2048):
            fb = encode_chunk(encoder, chunk)
            offsets = None if fb.offsets is None else torch.from_numpy(fb.offsets)
            dense, idx = torch.from_numpy(fb.dense), torch.from_numpy(fb.indices)
            labels.append(chunk.labels)
            for n, model in variants.items():
                preds[n].append(model(dense, idx, offsets).numpy())
    y = np.concatenate(labels)
    ref = np.concatenate(preds["fp32"])
    rows = []
    for n in variants:
        p = np.concatenate(preds[n])
        rows.append([n, f"{roc_auc(y, p):.5f}", f"{roc_auc(y, p) - roc_auc(y, ref):+.5f}",
                     f"{log_loss(y, p):.5f}", f"{np.abs(p - ref).max():.2e}", f"{np.abs(p - ref).mean():.1e}"])
    print(f"quality on {len(y):,} test rows of {test_tsv}")
    return rows


def parse_batches(text: str) -> list[int]:
    try:
        out = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"--batches must be comma-separated integers, got {text!r}") from None
    if not out or min(out) <= 0:
        raise SystemExit(f"--batches must be positive integers, got {text!r}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", default="1,64,512,2048", help="comma-separated batch sizes")
    ap.add_argument("--max-rows", type=int, default=100_000, help="cap on every table's rows (default 100000)")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds per batch size")
    ap.add_argument("--min-repeat", type=float, default=0.1, help="seconds per timed repeat")
    ap.add_argument(
        "--distinct", type=int, default=0,
        help="distinct batches cycled through per size (default: up to 32; 1 repeats one batch, warm lookups)",
    )
    ap.add_argument("--no-baseline", action="store_true", help="skip the plain-eager comparison")
    ap.add_argument("--no-int8", action="store_true", help="skip the row-wise int8 MLPs (dynamic quantisation)")
    ap.add_argument("--bf16-tables", action="store_true", help="also time bf16 with the tables cast to bfloat16")
    ap.add_argument(
        "--quality", nargs=2, metavar=("ARTIFACTS", "TEST_TSV"),
        help="also report test AUC and max |dp| of every variant for a trained model and a labelled TSV",
    )
    ap.add_argument("--compile", action="store_true", help="also time torch.compile of fp32 (slow to compile)")
    ap.add_argument("--name", default="bench_model", help="results file stem under bench/results")
    args = ap.parse_args(argv)
    batches = parse_batches(args.batches)
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = bench_config(args.max_rows)
    fps = cfg.flops_per_sample()
    info = machine_info()
    full = cfg.total_rows == preset("criteo-kaggle").total_rows
    tables = (
        f"full-size tables ({cfg.total_rows:,} rows, "
        f"{cfg.total_rows * cfg.embedding_dim * 4 / 2**30:.2f} GiB in fp32)" if full else
        f"tables capped at {args.max_rows:,} rows each ({cfg.total_rows:,} rows, "
        f"{cfg.total_rows * cfg.embedding_dim * 4 / 2**20:.0f} MiB in fp32): compute is measured, "
        "not the 2 GB of real tables"
    )
    print(machine_line(info))
    print(
        f"model: criteo-kaggle architecture, bottom {list(cfg.bottom_mlp)}, top {list(cfg.top_mlp)}, "
        f"dot interaction ({cfg.interaction_width} wide), {fps / 1e6:.3f} MFLOP/sample; {tables}"
    )

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        save_artifacts(DLRM(cfg), tmp)
        variants = variants_of(tmp, args)
        encoder = FeatureEncoder(cfg)
        compile_s = None
        if args.compile:
            start = time.perf_counter()
            compiled = torch.compile(variants["fp32"])
            with torch.inference_mode():
                for b in batches:
                    compiled(*criteo_like_batch(encoder, b, seed=b))
            compile_s = time.perf_counter() - start
            variants["torch.compile"] = compiled
            print(f"torch.compile: {compile_s:.1f} s to compile {len(batches)} batch sizes")

        gen = torch.Generator().manual_seed(1)
        ga, gb = torch.randn(GEMM_N, GEMM_N, generator=gen), torch.randn(GEMM_N, GEMM_N, generator=gen)
        gc = torch.empty(GEMM_N, GEMM_N)
        ha, hb, hc = ga.bfloat16(), gb.bfloat16(), gc.bfloat16()

        results = {}  # batch -> {variant: Timing}
        max_dp = {n: 0.0 for n in variants}
        gemm_samples, gemm16_samples = [], []
        with torch.inference_mode():
            for b in batches:
                # Fresh ids every call, as in serving: a batch repeated would find its
                # table rows in cache.  The MLP weights stay hot, as they do when serving.
                count = args.distinct or max(4, min(32, 65536 // b))
                inputs = [criteo_like_batch(encoder, b, seed=b * 1000 + i) for i in range(count)]
                dense, idx = inputs[0]
                ref = variants["fp32"](dense, idx)
                fns = {}
                for name, fn in variants.items():
                    dp = float((fn(dense, idx) - ref).abs().max())
                    if dp > MAX_DP.get(name, MAX_DP_LOW):
                        raise SystemExit(f"{name} disagrees with fp32 at batch {b}: max |dp| {dp:.2e}")
                    max_dp[name] = max(max_dp[name], dp)
                    fns[name] = cycling(fn, inputs)
                fns["gemm"] = lambda: torch.mm(ga, gb, out=gc)
                fns["gemm bf16"] = lambda: torch.mm(ha, hb, out=hc)
                t = time_interleaved(fns, warmup=3, rounds=args.rounds, min_repeat_s=args.min_repeat, block_warmup=1)
                gemm_samples += t.pop("gemm").samples
                gemm16_samples += t.pop("gemm bf16").samples
                results[b] = t
                print(f"  batch {b}: " + ", ".join(f"{n} {b / v.median:,.0f}/s" for n, v in t.items()))
        quality_rows = quality(*args.quality, args) if args.quality else None

    flop = 2.0 * GEMM_N**3
    gemm_rate = flop / float(np.median(gemm_samples)) / 1e9
    gemm_best = flop / float(np.min(gemm_samples)) / 1e9
    gemm16_rate = flop / float(np.median(gemm16_samples)) / 1e9
    # A separate quiet measurement, for reference: the interleaved one is the one used.
    gemm_alone = gemm_gflops(GEMM_N)
    roof = gemm_rate * 1e9 / fps

    names = list(variants)
    headers = ["batch"]
    for n in names:
        headers += [f"{n} samples/s", f"{n} x roofline"]
    rows = []
    for b, t in results.items():
        row = [b]
        for n in names:
            s = b / t[n].median
            row += [f"{s:,.0f}", f"{s / roof:.2f}"]
        rows.append(row)
    table = markdown_table(headers, rows)

    top = max(batches)
    ratio = {n: top / results[top][n].median / roof for n in names}
    # Best repeat over best GEMM: what a quiet machine gives; the medians are the headline.
    best_ratio = top / results[top]["bf16"].best / (gemm_best * 1e9 / fps)
    summary = [
        f"- machine: {machine_line(info)}; torch threads {torch.get_num_threads()}",
        f"- FP32 GEMM ({GEMM_N}x{GEMM_N} torch.mm, interleaved with the forward passes): "
        f"**{gemm_rate:.0f} GFLOP/s** (timed alone afterwards: {gemm_alone:.0f} GFLOP/s); "
        f"the same product in bf16: {gemm16_rate:.0f} GFLOP/s ({gemm16_rate / gemm_rate:.1f}x)",
        f"- model: criteo-kaggle architecture, {fps / 1e6:.3f} MFLOP/sample (MLPs and dot interaction, "
        f"lookups excluded); roofline = FP32 GEMM rate / FLOP per sample = **{roof:,.0f} samples/s**",
        f"- {tables}",
        "- inputs: random hex ids (one per bag) and counts, encoded by FeatureEncoder, "
        + ("the same batch every call (warm lookups)" if args.distinct == 1 else
           f"a different batch each call ({args.distinct or 'up to 32'} batches in turn, cold lookups as in serving)")
        + "; only the forward is timed, "
        f"under torch.inference_mode; median of {args.rounds} interleaved repeats of at least "
        f"{args.min_repeat:g} s, each after one untimed call (the GEMMs between them flush the caches)",
        f"- at batch {top}: **bf16 {ratio['bf16']:.2f}x the FP32 roofline** (target {TARGET:g}x), "
        f"{ratio['bf16'] / ratio['fp32']:.2f}x fp32 (fp32 itself {ratio['fp32']:.2f}x); "
        f"best bf16 repeat over best GEMM repeat: {best_ratio:.2f}x",
        "- largest |p - p_fp32| seen on the timed batches (random weights): "
        + ", ".join(f"{n} {max_dp[n]:.1e}" for n in names if n != "fp32"),
    ]
    if "int8 MLPs" in ratio:
        summary.append(
            f"- int8 MLPs (torch.ao quantize_dynamic, per-channel weights, engine "
            f"{torch.backends.quantized.engine}): {ratio['int8 MLPs']:.2f}x the roofline at batch {top}"
        )
    if "plain eager" in variants:
        summary.append(
            "- plain eager: the fp32 stages through their nn.Sequential modules and a concatenated "
            "interaction (what dlrm-serve's forward replaced)"
        )
    if compile_s is not None:
        summary.append(f"- torch.compile (inductor, default options): {compile_s:.0f} s to compile all batch sizes")
    sections = ["\n".join(summary) + "\n", table]
    if quality_rows:
        qheaders = ["variant", "test AUC", "AUC - fp32", "log loss", "max abs Δp", "mean abs Δp"]
        qtable = markdown_table(qheaders, quality_rows)
        sections.append(f"Quality on the test rows of {args.quality[1]} (model {args.quality[0]}):\n\n{qtable}")
    md = write_markdown(args.name, "Model forward throughput (CPU), fp32 and bf16", sections)
    print("\n" + "\n\n".join(sections))

    def draw(ax):
        x = np.arange(len(batches))
        width = 0.8 / len(names)
        for k, n in enumerate(names):
            r = [b / results[b][n].median / roof for b in batches]
            bars = ax.bar(x + (k - (len(names) - 1) / 2) * width, r, width, label=n)
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.axhline(TARGET, color="grey", linestyle="--", linewidth=1, label=f"bf16 target {TARGET:g}x")
        ax.set_xticks(x, [str(b) for b in batches])
        ax.set_xlabel("batch size")
        ax.set_ylabel("samples/s / FP32 GEMM roofline")
        ax.set_title(
            f"DLRM criteo-kaggle forward, {torch.get_num_threads()} threads, FP32 GEMM {gemm_rate:.0f} GFLOP/s"
        )
        ax.legend(fontsize=8)

    png = save_plot(args.name, draw)
    print(f"wrote {md} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
