"""``dlrm-serve score``: the flags as a :func:`~dlrm_serve.offline.score.score_file` call."""

from __future__ import annotations

from dlrm_serve.offline.score import score_file

__all__ = ["score_command"]


def score_command(args) -> None:
    """``dlrm-serve score``: the CLI flags as a :func:`score_file` call."""
    rows = score_file(
        args.artifacts, args.input, args.out, backend=args.backend, precision=args.precision,
        batch_rows=args.batch_rows,
    )
    print(f"wrote {rows} probabilities to {args.out}")
