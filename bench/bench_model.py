"""Forward-pass throughput of the MLPerf Criteo Kaggle DLRM against this machine's GEMM roofline.

The architecture is ``preset("criteo-kaggle")`` with its tables capped at
``--max-rows`` rows (100k by default): the benchmark measures compute, and
table size changes only the cache behaviour of the lookups.  Inputs are
random Criteo-style rows (hex ids, one per bag, integer counts) encoded by
the same :class:`FeatureEncoder` that serving uses, a different batch each
call so that lookups miss the cache as they do in serving (``--distinct 1``
repeats one batch); the model is loaded from saved artifacts with
:func:`load_model`, as serving does.  Only the forward pass is timed.  A
"plain eager" row runs the same weights the straightforward way (each
stage's ``nn.Sequential``), for comparison.

The roofline is the FP32 GEMM rate (a large ``torch.mm``, timed between
the forward passes of the same run) divided by ``config.flops_per_sample()``.

    python bench/bench_model.py [--batches 1,64,512,2048] [--threads N] [--distinct K] [--compile]
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
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

from dlrm_serve.artifacts import load_model, save_artifacts  # noqa: E402
from dlrm_serve.config import preset  # noqa: E402
from dlrm_serve.features import FeatureEncoder  # noqa: E402
from dlrm_serve.model import DLRM  # noqa: E402

GEMM_N = 2048
TARGET = 0.70


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
    ap.add_argument("--compile", action="store_true", help="also time torch.compile (slow to compile)")
    ap.add_argument("--name", default="bench_model", help="results file stem under bench/results")
    args = ap.parse_args(argv)
    batches = parse_batches(args.batches)
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = bench_config(args.max_rows)
    fps = cfg.flops_per_sample()
    info = machine_info()
    print(machine_line(info))
    print(
        f"model: criteo-kaggle architecture, bottom {list(cfg.bottom_mlp)}, top {list(cfg.top_mlp)}, "
        f"dot interaction ({cfg.interaction_width} wide), {fps / 1e6:.3f} MFLOP/sample; tables capped at "
        f"{args.max_rows} rows ({cfg.total_rows:,} rows in all, not the real 33.8M): this measures compute"
    )

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        save_artifacts(DLRM(cfg), tmp)
        model = load_model(tmp)
        encoder = FeatureEncoder(cfg)

        variants = {"dlrm-serve": model}
        if not args.no_baseline:
            variants["plain eager"] = plain_eager(model)
        compile_s = None
        if args.compile:
            start = time.perf_counter()
            compiled = torch.compile(model)
            with torch.inference_mode():
                for b in batches:
                    compiled(*criteo_like_batch(encoder, b, seed=b))
            compile_s = time.perf_counter() - start
            variants["torch.compile"] = compiled
            print(f"torch.compile: {compile_s:.1f} s to compile {len(batches)} batch sizes")

        gen = torch.Generator().manual_seed(1)
        ga, gb = torch.randn(GEMM_N, GEMM_N, generator=gen), torch.randn(GEMM_N, GEMM_N, generator=gen)
        gc = torch.empty(GEMM_N, GEMM_N)

        results = {}  # batch -> {variant: Timing}
        gemm_samples = []
        with torch.inference_mode():
            for b in batches:
                # Fresh ids every call, as in serving: a batch repeated would find its
                # table rows in cache.  The MLP weights stay hot, as they do when serving.
                count = args.distinct or max(4, min(32, 65536 // b))
                inputs = [criteo_like_batch(encoder, b, seed=b * 1000 + i) for i in range(count)]
                dense, idx = inputs[0]
                ref = model(dense, idx)
                fns = {}
                for name, fn in variants.items():
                    if not torch.allclose(fn(dense, idx), ref, rtol=1e-4, atol=1e-6):
                        raise SystemExit(f"{name} disagrees with the model at batch {b}")
                    fns[name] = cycling(fn, inputs)
                fns["gemm"] = lambda: torch.mm(ga, gb, out=gc)
                t = time_interleaved(fns, warmup=3, rounds=args.rounds, min_repeat_s=args.min_repeat, block_warmup=1)
                gemm_samples += t.pop("gemm").samples
                results[b] = t
                print(f"  batch {b}: " + ", ".join(f"{n} {b / v.median:,.0f}/s" for n, v in t.items()))

    gemm_rate = 2.0 * GEMM_N**3 / float(np.median(gemm_samples)) / 1e9
    gemm_best = 2.0 * GEMM_N**3 / float(np.min(gemm_samples)) / 1e9
    # A separate quiet measurement, for reference: the interleaved one is the one used.
    gemm_alone = gemm_gflops(GEMM_N)
    roof = gemm_rate * 1e9 / fps

    headers = ["batch", "ms / batch", "samples/s", "GFLOP/s", "% of roofline"]
    names = list(variants)
    for n in names[1:]:
        headers += [f"{n} samples/s", f"{n} % of roofline"]
    rows = []
    for b, t in results.items():
        main_t = t[names[0]]
        sps = b / main_t.median
        row = [b, f"{main_t.median * 1e3:.3f}", f"{sps:,.0f}", f"{sps * fps / 1e9:.0f}", f"{100 * sps / roof:.1f}%"]
        for n in names[1:]:
            s = b / t[n].median
            row += [f"{s:,.0f}", f"{100 * s / roof:.1f}%"]
        rows.append(row)
    table = markdown_table(headers, rows)

    top = max(batches)
    top_pct = 100 * top / results[top][names[0]].median / roof
    # Best repeat over best GEMM: what a quiet machine gives; the medians are the headline.
    top_best_pct = 100 * top / results[top][names[0]].best / (gemm_best * 1e9 / fps)
    summary = [
        f"- machine: {machine_line(info)}",
        f"- FP32 GEMM ({GEMM_N}x{GEMM_N} torch.mm, interleaved with the forward passes): "
        f"**{gemm_rate:.0f} GFLOP/s** (timed alone afterwards: {gemm_alone:.0f} GFLOP/s)",
        f"- model: criteo-kaggle architecture, {fps / 1e6:.3f} MFLOP/sample (MLPs and dot interaction, "
        f"lookups excluded); roofline = GEMM rate / FLOP per sample = **{roof:,.0f} samples/s**",
        f"- tables capped at {args.max_rows:,} rows each ({cfg.total_rows:,} rows, "
        f"{cfg.total_rows * cfg.embedding_dim * 4 / 2**20:.0f} MiB): compute is measured, not the 2 GB of real tables",
        "- inputs: random hex ids (one per bag) and counts, encoded by FeatureEncoder, "
        + ("the same batch every call (warm lookups)" if args.distinct == 1 else
           f"a different batch each call ({args.distinct or 'up to 32'} batches in turn, cold lookups as in serving)")
        + "; only the forward is timed, "
        f"under torch.inference_mode; median of {args.rounds} interleaved repeats of at least "
        f"{args.min_repeat:g} s, each after one untimed call (the GEMM between them flushes the caches)",
        f"- at batch {top}: **{top_pct:.1f}% of roofline** (target {TARGET:.0%}); best repeat over best GEMM "
        f"repeat: {top_best_pct:.1f}%",
    ]
    if "plain eager" in variants:
        summary.append(
            "- plain eager: the same stages through their nn.Sequential modules and a concatenated "
            "interaction (what dlrm-serve's forward replaced)"
        )
    if compile_s is not None:
        summary.append(f"- torch.compile (inductor, default options): {compile_s:.0f} s to compile all batch sizes")
    md = write_markdown(
        args.name, "Model forward throughput (CPU)", ["\n".join(summary) + "\n", table]
    )
    print("\n" + "\n".join(summary) + "\n\n" + table)

    def draw(ax):
        x = np.arange(len(batches))
        width = 0.8 / len(names)
        for k, n in enumerate(names):
            pct = [100 * b / results[b][n].median / roof for b in batches]
            bars = ax.bar(x + (k - (len(names) - 1) / 2) * width, pct, width, label=n)
            ax.bar_label(bars, fmt="%.0f%%", fontsize=8)
        ax.axhline(100 * TARGET, color="grey", linestyle="--", linewidth=1, label=f"target {TARGET:.0%}")
        ax.set_xticks(x, [str(b) for b in batches])
        ax.set_xlabel("batch size")
        ax.set_ylabel("% of FP32 GEMM roofline")
        ax.set_title(f"DLRM criteo-kaggle forward, {info['usable_cores']} cores, GEMM {gemm_rate:.0f} GFLOP/s")
        ax.legend(fontsize=8)

    png = save_plot(args.name, draw)
    print(f"wrote {md} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
