"""The ``dlrm-serve`` command line.

Each subcommand is registered by one ``_add_*`` function below and runs a
library function, or a ``*_command(args)`` of this package's modules (one per
area: :mod:`~dlrm_serve.cli.train`, :mod:`~dlrm_serve.cli.score`,
:mod:`~dlrm_serve.cli.explain`, :mod:`~dlrm_serve.cli.client`); library
modules hold no argparse code.  Errors of the
:class:`~dlrm_serve.errors.DLRMServeError` family print their message and
exit 2, without a traceback; any other exception is a bug and keeps its
traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from dlrm_serve.errors import DLRMServeError, InvalidInput

__all__ = ["main", "build_parser"]


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a DLRM (on synthetic data when no --data is given)")
    p.add_argument("--data", nargs="*", default=None, help="Criteo TSV files (.gz ok) to train on")
    p.add_argument("--test-data", nargs="*", default=None, help="held-out Criteo TSV files (default: the last 10%% of --data)")
    p.add_argument("--out", default="artifacts", help="artifacts folder to write (default: artifacts)")
    p.add_argument(
        "--preset", default="demo", choices=["demo", "criteo-kaggle", "criteo-terabyte"],
        help="architecture preset (default: demo)",
    )
    p.add_argument("--config", default=None, help="a dlrm.json to train instead of a preset")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate of the MLPs")
    p.add_argument("--table-lr", type=float, default=None, help="sparse Adagrad learning rate of the embedding tables")
    p.add_argument("--threads", type=int, default=None, help="torch threads (fixed, so runs are reproducible; default 1)")
    p.add_argument("--rows", type=int, default=None, help="synthetic rows to generate (training + test)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default="data", help="where synthetic data is written (default: data)")

    def run(args):
        from dlrm_serve.cli.train import train_command

        train_command(args)

    p.set_defaults(func=run)


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="write synthetic Criteo-format TSV from a planted click model")
    p.add_argument("--out", required=True, help="TSV file to write (.gz to compress)")
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--oracle", default=None, help="also write the true click probability of each row here")
    p.add_argument("--no-label", action="store_true", help="write 39-field lines without the label")
    p.add_argument("--config", default=None, help="a dlrm.json whose feature layout to follow (default: the demo preset)")

    def run(args):
        from dlrm_serve.io.data import generate_command

        generate_command(args)

    p.set_defaults(func=run)


def _add_score(sub) -> None:
    from dlrm_serve.runtime.backends import PRECISIONS  # numpy-only at import

    p = sub.add_parser("score", help="score a Criteo TSV or JSON-lines file offline, one probability per line")
    p.add_argument(
        "input", nargs="+",
        help="Criteo TSV (labelled or not, .gz ok) or JSON lines of instances; with --engine ray also "
        "Parquet (I1.., C1.., optional label), several files, folders or globs",
    )
    p.add_argument("--artifacts", default="artifacts")
    p.add_argument("--out", required=True, help="output file, one probability per line")
    p.add_argument("--backend", default="torch", help="torch or onnxruntime")
    p.add_argument(
        "--precision", choices=PRECISIONS, default="auto",
        help="what the torch backend computes in; auto (default) = bf16 on a CPU with native bfloat16 "
        "(AMX or AVX512-BF16), else fp32; onnxruntime runs fp32",
    )
    p.add_argument("--batch-rows", type=int, default=4096)
    ray = p.add_argument_group("--engine ray (docs/scale.md)")
    ray.add_argument("--engine", choices=("local", "ray"), default="local", help="local: this process; ray: Ray Data actors")
    ray.add_argument("--address", help="an existing Ray cluster (ray://... or host:port); default: start a local one")
    ray.add_argument("--actors", type=int, help="actors, each with the model loaded once (default: cluster CPUs / --threads)")
    ray.add_argument("--threads", type=int, default=1, help="torch threads (and Ray CPUs) per actor")
    ray.add_argument("--unit-rows", type=int, default=65536, help="rows per Ray task (a retry redoes one task)")
    ray.add_argument("--on-error", choices=("fail", "skip"), default="fail", help="skip: a bad row is written as NaN and counted")
    ray.add_argument("--keep-columns", help="comma-separated input columns copied to a Parquet OUT folder")

    def run(args):
        if args.engine == "ray":
            from dlrm_serve.cli.ray_score import ray_score_command

            return ray_score_command(args)
        from dlrm_serve.cli.score import score_command

        if len(args.input) != 1:
            raise InvalidInput("score without --engine ray takes one input file")
        args.input = args.input[0]
        score_command(args)

    p.set_defaults(func=run)


def _add_import(sub) -> None:
    p = sub.add_parser("import-checkpoint", help="import a facebookresearch/dlrm --save-model checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("--out", required=True)
    p.add_argument("--dense-transform", choices=["log1p", "none"], default="log1p")
    p.add_argument("--loss-threshold", type=float, default=0.0)
    p.add_argument(
        "--interaction", choices=["dot", "dot-self", "cat"], default=None,
        help="only needed when the top MLP's input width fits two interactions (F+1 = 2*dim)",
    )

    def run(args):
        from dlrm_serve.model.checkpoints.reference import import_checkpoint

        op = {None: (None, None), "dot": ("dot", False), "dot-self": ("dot", True), "cat": ("cat", False)}
        interaction, self_interaction = op[args.interaction]
        cfg = import_checkpoint(
            args.checkpoint, args.out, args.dense_transform, args.loss_threshold,
            interaction=interaction, self_interaction=self_interaction,
        )
        print(
            f"wrote {args.out}: {cfg.num_dense} dense, {cfg.num_sparse} categorical features, "
            f"dim {cfg.embedding_dim}, {cfg.total_rows} table rows, interaction {cfg.interaction}"
            f"{' (self)' if cfg.self_interaction else ''}"
        )

    p.set_defaults(func=run)


def _add_check(sub) -> None:
    p = sub.add_parser("check", help="check that artifacts exist and their shapes agree with the config")
    p.add_argument("--artifacts", default="artifacts")

    def run(args):
        from dlrm_serve.model.weights import check_artifacts

        cfg = check_artifacts(args.artifacts)
        print(
            f"{args.artifacts}: ok ({cfg.num_dense} dense, {cfg.num_sparse} tables, "
            f"{cfg.total_rows} rows x {cfg.embedding_dim}, {cfg.table_dtype})"
        )

    p.set_defaults(func=run)


def _add_init(sub) -> None:
    p = sub.add_parser("init", help="write randomly initialised artifacts of a preset (e.g. Kaggle-size tables)")
    p.add_argument("--preset", default="criteo-kaggle", help="demo, criteo-kaggle or criteo-terabyte")
    p.add_argument("--out", required=True)
    p.add_argument("--table-dtype", choices=["float32", "int8"], default="float32")
    p.add_argument("--seed", type=int, default=0)

    def run(args):
        from dlrm_serve.config import preset
        from dlrm_serve.model.quantize import init_artifacts

        cfg = preset(args.preset, table_dtype=args.table_dtype)
        table_bytes = cfg.total_rows * (cfg.embedding_dim * 4 if args.table_dtype == "float32" else cfg.embedding_dim + 8)
        print(f"initialising {args.preset}: {cfg.total_rows:,} table rows, {table_bytes / 1e9:.2f} GB of tables")
        init_artifacts(cfg, args.out, seed=args.seed)
        print(f"wrote {args.out}")

    p.set_defaults(func=run)


def _add_quantize(sub) -> None:
    p = sub.add_parser("quantize", help="write a row-wise int8 copy of an artifacts folder")
    p.add_argument("--artifacts", default="artifacts", help="float32 artifacts to read")
    p.add_argument("--out", required=True, help="folder for the int8 artifacts")

    def run(args):
        from dlrm_serve.model.quantize import quantize_artifacts

        cfg = quantize_artifacts(args.artifacts, args.out)
        print(f"wrote {args.out}: {cfg.total_rows:,} rows as row-wise int8")

    p.set_defaults(func=run)


def _add_predict(sub) -> None:
    p = sub.add_parser(
        "predict", help="stream a Criteo TSV or JSON-lines file through a running server, one probability per line"
    )

    from dlrm_serve.cli.client import add_predict_options

    add_predict_options(p)

    def run(args):
        from dlrm_serve.cli.client import predict_command

        predict_command(args)

    p.set_defaults(func=run)


def _add_models(sub) -> None:
    p = sub.add_parser("models", help="manage the server's models: ping, list, describe, register, scale, set-default, unregister")

    from dlrm_serve.cli.client import add_models_subcommands

    add_models_subcommands(p)

    def run(args):
        from dlrm_serve.cli.client import models_command

        models_command(args)

    p.set_defaults(func=run)


def _add_export_onnx(sub) -> None:
    p = sub.add_parser(
        "export-onnx",
        help="write dlrm.onnx (+ dlrm.one_id.onnx, dlrm.onnx.data) from the safetensors weights",
    )
    p.add_argument("--artifacts", default="artifacts", help="artifacts folder to read and write (default: artifacts)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: 18; at least 16)")
    p.add_argument(
        "--if-needed", action="store_true",
        help="export only when the graphs are missing or were made from other weights or config",
    )

    def run(args):
        from dlrm_serve.runtime.export import DEFAULT_OPSET, export_onnx, onnx_problem

        if args.if_needed:
            problem = onnx_problem(args.artifacts)
            if problem is None:
                print(f"{args.artifacts}: ONNX graphs are up to date")
                return
            print(f"exporting: {problem}")
        result = export_onnx(args.artifacts, opset=DEFAULT_OPSET if args.opset is None else args.opset)
        print(result.summary())

    p.set_defaults(func=run)


def _add_kserve(sub) -> None:
    p = sub.add_parser(
        "kserve",
        help="serve the model as a KServe predictor: v1 :predict, v2/OIP infer over REST and gRPC (needs dlrm-serve[kserve])",
    )
    p.add_argument("--artifacts", default="artifacts", help="artifacts folder (default: artifacts)")
    p.add_argument("--model-name", default="dlrm", help="model name in the URLs (default: dlrm)")
    p.add_argument("--http-port", type=int, default=8080, help="REST port (default: 8080)")
    p.add_argument("--grpc-port", type=int, default=8081, help="gRPC port (default: 8081)")
    p.add_argument("--workers", type=int, default=1, help="REST server processes (default: 1)")
    p.add_argument(
        "--host", default="127.0.0.1",
        help="address to listen on (default: 127.0.0.1; in a container 0.0.0.0, behind the cluster's own protection)",
    )
    p.add_argument("--backend", default="torch", choices=["torch", "onnxruntime"], help="model backend (default: torch)")
    p.add_argument("--threads", type=int, default=0, help="backend threads; 0 = the backend's default")
    p.add_argument("--max-rows", type=int, default=None, help="most rows one request may carry (default: 8192)")

    def run(args):
        from dlrm_serve.io.codecs import MAX_ROWS
        from dlrm_serve.serve.kserve_server import main_args

        if args.max_rows is None:
            args.max_rows = MAX_ROWS
        main_args(args)

    p.set_defaults(func=run)


def _add_explain(sub) -> None:
    p = sub.add_parser(
        "explain", help="explain predictions offline: per-feature attributions (JSON lines), or --global N: a ranking and chart"
    )
    p.add_argument(
        "input", nargs="+",
        help="Criteo TSV (labelled or not, .gz ok) or JSON lines of instances; with --engine ray also "
        "Parquet (I1.., C1.., optional label), several files, folders or globs",
    )
    p.add_argument("--artifacts", default="artifacts")
    p.add_argument("--out", required=True, help="JSON lines, one explanation per row; with --global, a markdown table")
    p.add_argument(
        "--method", default="integrated_gradients", help="integrated_gradients (default) or feature_ablation",
    )
    p.add_argument(
        "--global", dest="global_rows", type=int, default=None, metavar="N",
        help="explain the first N rows and write the mean |attribution| per feature, sorted, plus a bar chart",
    )
    p.add_argument("--chart", default=None, help="the bar chart PNG of --global (default: --out with .png)")

    def run(args):
        from dlrm_serve.cli.explain import explain_command

        explain_command(args)

    p.set_defaults(func=run)


def _add_baseline(sub) -> None:
    p = sub.add_parser(
        "baseline", help="store the explanation baseline (mean model input) of a data file in artifacts made without training"
    )
    p.add_argument("data", help="representative rows: Criteo TSV (.gz ok) or JSON lines")
    p.add_argument("--artifacts", default="artifacts")
    p.add_argument("--rows", type=int, default=None, help="use only the first N rows")

    def run(args):
        from dlrm_serve.cli.explain import baseline_command

        baseline_command(args)

    p.set_defaults(func=run)


def _add_loadgen(sub) -> None:
    p = sub.add_parser(
        "loadgen", help="measure serving with MLPerf LoadGen (Offline / Server; in process, REST or gRPC); docs/loadgen.md"
    )
    p.add_argument("--scenario", choices=["offline", "server"], required=True)
    p.add_argument("--sut", choices=["inprocess", "rest", "grpc"], required=True, help="what answers: this process, or TorchServe")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--artifacts", default=None, help="artifacts folder (needed for --sut inprocess)")
    src.add_argument("--config", default=None, help="the served model's artifacts folder or dlrm.json (rest/grpc)")
    p.add_argument("--model", default="dlrm", help="served model name (default: dlrm)")
    p.add_argument("--target-qps", type=float, default=None, help="Server: arrival rate; Offline: expected QPS (default: measured first)")
    p.add_argument("--latency-ms", type=float, default=60.0, help="Server p99 bound (default: 60, MLPerf's DLRMv2 bound)")
    p.add_argument(
        "--duration-ms", type=int, default=None,
        help="minimum duration per test (default: 3000, a smoke run; 600000 = MLPerf's own runs and query counts)",
    )
    p.add_argument("--accuracy", action="store_true", help="accuracy mode: every sample once, AUC from LoadGen's accuracy log")
    p.add_argument("--find-peak", action="store_true", help="Server: search the highest target QPS that is VALID")
    p.add_argument("--out", required=True, help="folder for LoadGen's logs and loadgen_result.json")
    g = p.add_argument_group("data and server (optional)")
    g.add_argument("--data", default=None, help="labelled Criteo TSV to cut users from (default: planted synthetic rows)")
    g.add_argument("--samples", type=int, default=1024, help="users in the query set (default: 1024)")
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument("--grpc-port", type=int, default=7070)
    g.add_argument("--http-port", type=int, default=8080)
    g.add_argument("--management-port", type=int, default=8081, help="REST management port, to renew tokens")
    g.add_argument("--key-file", default=None, help="TorchServe's key_file.json (default: $DLRM_SERVE_KEY_FILE or ./key_file.json)")
    g.add_argument("--concurrency", type=int, default=16, help="requests in flight (rest/grpc, default: 16)")
    g.add_argument("--no-progress", action="store_true")

    def run(args):
        from dlrm_serve.loadgen.runner import run_loadgen

        connection = dict(host=args.host, grpc_port=args.grpc_port, http_port=args.http_port,
                          management_port=args.management_port, key_file=args.key_file)
        result = run_loadgen(
            args.scenario, args.sut, args.out, artifacts=args.artifacts, config=args.config, model=args.model,
            target_qps=args.target_qps, latency_ms=args.latency_ms, duration_ms=args.duration_ms,
            accuracy=args.accuracy, find_peak_qps=args.find_peak, data=args.data, samples=args.samples,
            connection=connection, concurrency=args.concurrency, progress=not args.no_progress,
        )
        if not (result["valid"] or result["mode"] == "accuracy") or result["errors"]:
            raise SystemExit(1)

    p.set_defaults(func=run)


# Subcommands of later features register here, one function each.
REGISTRY: list[Callable] = [_add_train, _add_generate, _add_score, _add_import, _add_check, _add_init, _add_quantize, _add_predict, _add_models, _add_export_onnx, _add_kserve, _add_explain, _add_baseline, _add_loadgen]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dlrm-serve", description="Train, package, serve and call a DLRM click-through-rate model."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for add in REGISTRY:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except DLRMServeError as e:
        # The family is what the library reports as a user's mistake (or a missing
        # tool); anything else is a bug and keeps its traceback.
        print(f"dlrm-serve {args.command}: {e.message}", file=sys.stderr)
        return 2
    except (FileNotFoundError, IsADirectoryError) as e:
        # A path the user named that is not there (open() reports it, not the family).
        print(f"dlrm-serve {args.command}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
