"""``dlrm-serve explain`` and ``dlrm-serve baseline``: the flags as calls of
:mod:`dlrm_serve.offline.explain_tools`, and where their output goes."""

from __future__ import annotations

import json
import os
from pathlib import Path

from dlrm_serve.errors import UsageError
from dlrm_serve.offline.explain_tools import explain_file, global_importance, importance_chart, importance_table, write_baseline
from dlrm_serve.runtime.explain import parse_method

__all__ = ["baseline_command", "explain_command"]


def baseline_command(args) -> None:
    """``dlrm-serve baseline``: store the explanation baseline of a data file in the artifacts."""
    n = write_baseline(args.artifacts, args.data, args.rows)
    print(f"stored the explanation baseline of {n} rows in {args.artifacts} (re-export ONNX graphs if any: "
          "`dlrm-serve export-onnx --if-needed`)")


def explain_command(args) -> None:
    """``dlrm-serve explain``: JSON lines of explanations, or with ``--global N`` a table and chart."""
    out = Path(args.out)
    if args.global_rows is not None:
        if args.global_rows <= 0:
            raise UsageError(f"--global needs a positive row count, got {args.global_rows}")
        explanations = list(explain_file(args.artifacts, args.input, method=args.method, limit=args.global_rows))
        method = parse_method(args.method)
        importance = global_importance(explanations)
        out.write_text(importance_table(importance, len(explanations), method), encoding="utf-8")
        chart = Path(args.chart) if args.chart else out.with_suffix(".png")
        importance_chart(importance, chart, f"{len(explanations)} rows, {method}")
        print(f"wrote the mean |attribution| of {len(explanations)} rows to {out} and {chart}")
        return
    tmp = out.with_name(out.name + ".part")
    rows = 0
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as fh:
            for e in explain_file(args.artifacts, args.input, method=args.method):
                fh.write(json.dumps(e, separators=(",", ":")) + "\n")
                rows += 1
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    print(f"wrote {rows} explanations to {out}")
