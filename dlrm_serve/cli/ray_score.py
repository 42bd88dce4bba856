"""``dlrm-serve score --engine ray``: the flags as a :func:`~dlrm_serve.offline.ray_score.score_ray` call."""

from __future__ import annotations

import math
import sys

from dlrm_serve.offline.ray_score import score_ray

__all__ = ["ray_score_command"]


def ray_score_command(args) -> None:
    """``dlrm-serve score --engine ray``: the CLI flags as a :func:`score_ray` call."""
    r = score_ray(
        args.artifacts, args.input, args.out, address=args.address, actors=args.actors,
        threads=args.threads, batch_rows=args.batch_rows, unit_rows=args.unit_rows, precision=args.precision,
        on_error=args.on_error, keep_columns=args.keep_columns.split(",") if args.keep_columns else None,
    )
    rate = r["rows"] / r["seconds"] if r["seconds"] > 0 else math.inf
    skipped = f", {r['bad']} bad rows written as NaN" if r["bad"] else ""
    print(f"scored {r['rows']} rows in {r['seconds']:.2f} s ({rate:,.0f} rows/s) with {r['actors']} actors{skipped}; wrote {args.out}")
    sys.stdout.flush()
