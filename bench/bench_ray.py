"""``make bench-ray``: rows/s of ``score --engine ray`` with 1 and 2 actors on a
two-node local cluster (1 CPU each) against the single-process scorer (1 thread)
on the same files, interleaved, as ratios measured in one run.

    python bench/bench_ray.py [--rows 400000] [--files 4] [--repeats 2]

Each engine is timed end to end as a user sees it inside one Python process:
model load, reading, decoding, scoring, writing (for Ray also planning and
actor start; the cluster itself is started once, before).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from dlrm_serve.artifacts import save_artifacts
from dlrm_serve.config import preset
from dlrm_serve.io.data import generate
from dlrm_serve.model.dlrm import DLRM
from dlrm_serve.offline._ray_cluster import local_cluster
from dlrm_serve.offline.ray_score import score_ray
from dlrm_serve.offline.score import score_file


def cpu_name() -> str:
    with open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=400_000)
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bray"))
    torch.manual_seed(0)
    cfg = preset("demo")
    save_artifacts(DLRM(cfg), root / "art")
    (root / "in").mkdir()
    per = args.rows // args.files
    for i in range(args.files):
        generate(root / "in" / f"part-{i:03d}.tsv", per, seed=i, config=cfg, progress=False)
    with open(root / "all.tsv", "w") as out:
        for i in range(args.files):
            out.write((root / "in" / f"part-{i:03d}.tsv").read_text())
    rows = per * args.files
    runs: dict[str, list[float]] = {"single process": [], "ray 1 actor": [], "ray 2 actors": []}
    loads = [os.getloadavg()[0]]
    with local_cluster(root / "rt", nodes=2, cpus=1) as cluster:
        os.environ.update(cluster["env"])
        for rep in range(args.repeats):
            torch.set_num_threads(1)  # one core, as one actor gets
            t = time.perf_counter()
            n = score_file(root / "art", root / "all.tsv", root / "local.txt", precision="fp32", progress=False)
            runs["single process"].append(n / (time.perf_counter() - t))
            for actors in (1, 2):
                r = score_ray(
                    str(root / "art"), [str(root / "in")], str(root / f"ray{actors}.txt"), address=cluster["address"],
                    actors=actors, precision="fp32", unit_rows=per // 4, progress=False,
                )
                assert r["rows"] == rows
                runs[f"ray {actors} actor{'s' if actors > 1 else ''}"].append(rows / r["seconds"])
                import ray

                ray.shutdown()
            loads.append(os.getloadavg()[0])
            print(f"repeat {rep + 1}: " + ", ".join(f"{k} {v[-1]:,.0f} rows/s" for k, v in runs.items()), flush=True)
    best = {k: max(v) for k, v in runs.items()}
    print(f"\nCPU: {cpu_name()}; {rows:,} rows (demo preset, {args.files} TSV files); best of {args.repeats}")
    print(f"load average (1 min) during the run: {min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} cores\n")
    print("| engine | rows/s | vs single process | vs 1 actor |")
    print("|---|---:|---:|---:|")
    for k, v in best.items():
        print(f"| {k} | {v:,.0f} | {v / best['single process']:.2f}x | {v / best['ray 1 actor']:.2f}x |")
    print(f"\n2 actors / 1 actor: {best['ray 2 actors'] / best['ray 1 actor']:.2f}x (goal >= 1.7x)")
    print(f"Ray overhead at 1 actor: {1 - best['ray 1 actor'] / best['single process']:.1%} (goal <= 15%)")


if __name__ == "__main__":
    main()
