"""Decoding cost against the stdlib JSON parser, measured in one run (issue: the fast path).

For ``--rows`` distinct synthetic Criteo rows, times in interleaved rounds:

- ``json.loads`` of the positional JSON body ``{"instances": [...]}`` (the yardstick)
  and of the same rows by feature name;
- decoding the parsed instances (as TorchServe hands them to the handler),
  positional and by name, into model inputs;
- decoding the JSON bodies from their bytes, as workers get them with
  ``decode_input_request=false`` (parse included);
- decoding the same rows as Criteo TSV bytes;
- decoding the binary format.

Prints microseconds per row and each decode's ratio to ``json.loads`` of the
equivalent JSON body, and writes ``bench/results/bench_decode.md``.  The
verdicts use this process's CPU time (``time.process_time``), which other
jobs on a shared machine disturb far less than the wall clock; wall-clock
medians are printed beside them.
Targets: parsed JSON <= 1.0x, TSV <= 0.75x.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from common import machine_line, markdown_table, time_interleaved, write_markdown

from dlrm_serve.io.codecs import decode_json, decode_request, decode_tsv, encode_binary
from dlrm_serve.config import preset
from dlrm_serve.io.synthetic import PlantedModel
from dlrm_serve.io.features import FeatureEncoder


def bodies(n: int, seed: int) -> dict[str, object]:
    config = preset("demo")
    planted = PlantedModel(seed=seed)
    rows = planted.sample(n, np.random.default_rng(seed))
    lines = planted.lines(rows, labelled=False)
    instances = []
    for line in lines:
        fields = line.rstrip("\n").split("\t")
        dense = [int(v) if v else None for v in fields[: config.num_dense]]
        sparse = [v or None for v in fields[config.num_dense :]]
        instances.append({"dense": dense, "sparse": sparse})
    named = [
        {
            **{k: v for k, v in zip(config.dense_names, i["dense"]) if v is not None},
            **{k: v for k, v in zip(config.sparse_names, i["sparse"]) if v is not None},
        }
        for i in instances
    ]
    encoder = FeatureEncoder(config)
    return {
        "encoder": encoder,
        "json": json.dumps({"instances": instances}).encode(),
        "named": json.dumps({"instances": named}).encode(),
        "tsv": "".join(lines).encode(),
        "binary": encode_binary(encoder.raw_instances(instances)),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1024, help="distinct rows per body (default 1024)")
    ap.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds (default 15)")
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args(argv)
    b = bodies(args.rows, args.seed)
    enc = b["encoder"]
    parsed = json.loads(b["json"])
    parsed_named = json.loads(b["named"])
    # Every route gives the same model inputs.
    want = decode_json(parsed, enc)
    for other in (decode_json(parsed_named, enc), decode_tsv(b["tsv"], enc),
                  decode_request(b["binary"], "application/x-dlrm", enc)):
        if not (np.array_equal(other.dense, want.dense) and np.array_equal(other.indices, want.indices)):
            raise SystemExit("bench_decode: the formats decoded to different inputs")
    fns = {
        "json.loads (positional body)": lambda: json.loads(b["json"]),
        "json.loads (named body)": lambda: json.loads(b["named"]),
        "decode parsed JSON, positional": lambda: decode_json(parsed, enc),
        "decode parsed JSON, by name": lambda: decode_json(parsed_named, enc),
        "decode JSON body bytes, positional": lambda: decode_request(b["json"], "application/json", enc),
        "decode JSON body bytes, by name": lambda: decode_request(b["named"], "application/json", enc),
        "decode TSV bytes": lambda: decode_tsv(b["tsv"], enc),
        "decode binary": lambda: decode_request(b["binary"], "application/x-dlrm", enc),
    }
    # CPU time of this process (the verdicts): on a shared 2-core machine the
    # wall clock also counts time other processes hold the cores.
    t = time_interleaved(fns, rounds=args.rounds, min_repeat_s=0.05, clock=time.process_time)
    wall = time_interleaved(fns, rounds=max(3, args.rounds // 3), min_repeat_s=0.05)
    us = {k: v.median / args.rows * 1e6 for k, v in t.items()}
    wall_us = {k: v.median / args.rows * 1e6 for k, v in wall.items()}
    ref = {
        "decode parsed JSON, positional": "json.loads (positional body)",
        "decode parsed JSON, by name": "json.loads (named body)",
        "decode JSON body bytes, positional": "json.loads (positional body)",
        "decode JSON body bytes, by name": "json.loads (named body)",
        "decode TSV bytes": "json.loads (positional body)",
        "decode binary": "json.loads (positional body)",
    }
    target = {"decode parsed JSON, positional": 1.0, "decode parsed JSON, by name": 1.0, "decode TSV bytes": 0.75}
    rows = []
    for name in fns:
        ratio = us[name] / us[ref[name]] if name in ref else 1.0
        wall_ratio = wall_us[name] / wall_us[ref[name]] if name in ref else 1.0
        goal = target.get(name)
        verdict = "" if goal is None else ("met" if ratio <= goal else "not met")
        rows.append([name, f"{us[name]:.2f}", f"{ratio:.2f}x", f"<= {goal}x" if goal else "", verdict,
                     f"{t[name].spread:.2f}", f"{wall_us[name]:.2f}", f"{wall_ratio:.2f}x"])
    table = markdown_table(
        ["step", "CPU us/row", "vs json.loads", "target", "", "IQR/median", "wall us/row", "wall vs json.loads"], rows
    )
    print(machine_line())
    print(f"{args.rows} distinct rows, {args.rounds} interleaved rounds of CPU time (and fewer of wall time), medians")
    print(table)
    path = write_markdown("bench_decode", "Decoding vs json.loads", [machine_line(), table])
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
