"""``dlrm-serve train``: the flags as :class:`~dlrm_serve.offline.train.TrainOptions`."""

from __future__ import annotations

from dlrm_serve.offline.train import TrainOptions, train

__all__ = ["train_command"]


def train_command(args) -> None:
    """``dlrm-serve train``: the CLI flags as :class:`TrainOptions`."""
    options = TrainOptions(
        out=args.out,
        data=args.data or None,
        test_data=args.test_data or None,
        preset=args.preset,
        config=args.config,
        seed=args.seed,
        data_dir=args.data_dir,
    )
    for name in ("epochs", "batch_size", "lr", "table_lr", "rows", "threads"):
        value = getattr(args, name, None)
        if value is not None:
            setattr(options, name, value)
    train(options)
