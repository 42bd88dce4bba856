"""``dlrm-serve predict`` and ``dlrm-serve models``: argument sets and the commands.

:mod:`dlrm_serve.cli` registers the subcommands; their options and the work
live here, on top of :mod:`dlrm_serve.client`.
"""

from __future__ import annotations

import argparse
import json
import sys

from dlrm_serve.client.core import DEFAULT_CONCURRENCY, DEFAULT_RETRIES, DEFAULT_ROWS_PER_REQUEST, Client, connect
from dlrm_serve.client.files import predict_file
from dlrm_serve.client.payloads import FORMATS
from dlrm_serve.client.rolling import rolling_update
from dlrm_serve.errors import UsageError

__all__ = ["add_connection_options", "add_predict_options", "add_models_subcommands", "client_from_args", "predict_command", "models_command"]


def add_connection_options(p: argparse.ArgumentParser, default: str = "grpc") -> None:
    """Transport, addresses, model and tokens: shared by ``predict`` and ``models``."""
    g = p.add_argument_group("server")
    t = g.add_mutually_exclusive_group()
    t.add_argument("--grpc", dest="transport", action="store_const", const="grpc", help="use gRPC" + (" (default)" if default == "grpc" else ""))
    t.add_argument("--rest", dest="transport", action="store_const", const="rest", help="use REST" + (" (default)" if default == "rest" else ""))
    p.set_defaults(transport=default)
    g.add_argument("--host", default="127.0.0.1", help="server host (default: 127.0.0.1)")
    g.add_argument("--grpc-port", type=int, default=7070, help="gRPC inference port (default: 7070)")
    g.add_argument("--grpc-management-port", type=int, default=7071, help="gRPC management port (default: 7071)")
    g.add_argument("--http-port", type=int, default=8080, help="REST inference port (default: 8080)")
    g.add_argument("--management-port", type=int, default=8081, help="REST management port, also used to renew tokens (default: 8081)")
    g.add_argument("--inference-url", default=None, help="REST inference URL (overrides --host/--http-port)")
    g.add_argument("--management-url", default=None, help="REST management URL (overrides --host/--management-port)")
    g.add_argument(
        "--key-file",
        default=None,
        help="TorchServe's key_file.json (default: $DLRM_SERVE_KEY_FILE, else ./key_file.json if present; "
        "keys may also come from $DLRM_SERVE_INFERENCE_KEY, $DLRM_SERVE_MANAGEMENT_KEY, $DLRM_SERVE_API_KEY)",
    )
    g.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds per prediction before it is sent again (default: 10 s + 2 ms per row, so a "
        "request lost with a dead worker is retried within seconds)",
    )


def add_predict_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="Criteo TSV (labelled or not, .gz ok) or JSON lines of instances")
    p.add_argument("--out", required=True, help="output file, one probability per line, in input order")
    add_connection_options(p)
    p.add_argument("--model", default="dlrm", help="model name (default: dlrm)")
    p.add_argument("--model-version", default=None, help="model version (default: the server's default)")
    p.add_argument(
        "--config",
        default=None,
        help="the served model's artifacts folder or dlrm.json; enables the binary payload (the fastest)",
    )
    p.add_argument(
        "--payload",
        choices=FORMATS,
        default=None,
        help="request format (default: binary with --config, else tsv for TSV input and json for JSON lines)",
    )
    p.add_argument("--rows-per-request", type=int, default=DEFAULT_ROWS_PER_REQUEST, help=f"rows per request (default: {DEFAULT_ROWS_PER_REQUEST})")
    p.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY, help=f"requests in flight (default: {DEFAULT_CONCURRENCY})")
    p.add_argument(
        "--retries",
        type=int,
        default=DEFAULT_RETRIES,
        help="times a request is sent again after a full queue (503), a dead worker, a reset or a timeout, "
        f"with exponential backoff and jitter (default: {DEFAULT_RETRIES})",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def client_from_args(args: argparse.Namespace, **options) -> Client:
    return connect(
        args.transport,
        host=args.host,
        http_port=args.http_port,
        management_port=args.management_port,
        grpc_port=args.grpc_port,
        grpc_management_port=args.grpc_management_port,
        inference_url=args.inference_url,
        management_url=args.management_url,
        key_file=args.key_file,
        timeout=args.timeout,
        **options,
    )


def predict_command(args: argparse.Namespace) -> None:
    with client_from_args(
        args,
        model=args.model,
        version=args.model_version,
        config=args.config,
        payload=args.payload,
        rows_per_request=args.rows_per_request,
        concurrency=args.concurrency,
        retries=args.retries,
    ) as client:
        stats = predict_file(client, args.input, args.out, progress=not args.no_progress)
    print(
        f"wrote {stats.rows} probabilities to {args.out}: {stats.requests} {args.transport} requests "
        f"({stats.payload}), {stats.seconds:.2f} s, {stats.rows_per_s:,.0f} rows/s"
        + (f", {stats.retries} retries" if stats.retries else ""),
        file=sys.stderr,
    )


def add_models_subcommands(p: argparse.ArgumentParser) -> None:
    add_connection_options(p)
    sub = p.add_subparsers(dest="models_command", required=True, metavar="ACTION")

    sub.add_parser("ping", help="the server's health")

    s = sub.add_parser("list", help="registered models")
    s.add_argument("--limit", type=int, default=100, help="models per page (default: 100; all pages are read)")

    s = sub.add_parser("describe", help="a model's versions, workers and batch settings")
    s.add_argument("name")
    s.add_argument("--version", default=None)
    s.add_argument("--customized", action="store_true", help="also the handler's own description")

    s = sub.add_parser("register", help="register an archive (a .mar name in the model store, or an allowed URL)")
    s.add_argument("url")
    s.add_argument("--name", default=None, help="model name (default: the archive's)")
    s.add_argument("--batch-size", type=int, default=None)
    s.add_argument("--max-batch-delay", type=int, default=None, help="milliseconds")
    s.add_argument("--initial-workers", type=int, default=None)
    s.add_argument("--response-timeout", type=int, default=None, help="seconds")
    s.add_argument("--startup-timeout", type=int, default=None, help="seconds")
    s.add_argument("--no-wait", action="store_true", help="return before the workers are up (synchronous=false)")

    s = sub.add_parser("scale", help="set a model's number of workers")
    s.add_argument("name")
    s.add_argument("--min", dest="min_worker", type=int, required=True)
    s.add_argument("--max", dest="max_worker", type=int, default=None, help="default: --min")
    s.add_argument("--version", default=None)
    s.add_argument("--no-wait", action="store_true", help="return before the workers are up")

    s = sub.add_parser("set-default", help="make a version the default")
    s.add_argument("name")
    s.add_argument("version")

    s = sub.add_parser(
        "update",
        help="rolling update: register a new version beside the old, wait for its workers, "
        "make it the default, unregister the old once drained",
    )
    s.add_argument("name")
    s.add_argument("--archive", required=True, help="the new archive (a .mar name in the model store)")
    s.add_argument("--version", required=True, help="the new archive's version (build_mar.sh --version)")
    s.add_argument("--initial-workers", type=int, default=None, help="default: the archive's minWorkers")
    s.add_argument("--drain", type=float, default=5.0, help="seconds the old version keeps answering queued requests (default: 5)")
    s.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to wait for the new workers (default: 300)")
    s.add_argument("--keep-old", action="store_true", help="keep the old version registered (rollback = set-default NAME OLD)")

    s = sub.add_parser("unregister", help="unregister a model (or one version)")
    s.add_argument("name")
    s.add_argument("--version", default=None)


def models_command(args: argparse.Namespace) -> None:
    with client_from_args(args, concurrency=1) as client:
        action = args.models_command
        if action == "ping":
            result = {"status": client.ping()}
        elif action == "list":
            result = {"models": client.list_models(limit=args.limit)}
        elif action == "describe":
            result = client.describe_model(args.name, args.version, customized=args.customized)
        elif action == "register":
            result = client.register_model(
                args.url,
                args.name,
                batch_size=args.batch_size,
                max_batch_delay=args.max_batch_delay,
                initial_workers=args.initial_workers,
                synchronous=not args.no_wait,
                response_timeout=args.response_timeout,
                startup_timeout=args.startup_timeout,
            )
        elif action == "scale":
            result = client.scale_workers(
                args.name, args.min_worker, args.max_worker, version=args.version, synchronous=not args.no_wait
            )
        elif action == "set-default":
            result = client.set_default(args.name, args.version)
        elif action == "update":
            result = rolling_update(
                client,
                args.name,
                args.archive,
                args.version,
                initial_workers=args.initial_workers,
                ready_timeout_s=args.ready_timeout,
                drain_s=args.drain,
                keep_old=args.keep_old,
                log=lambda msg: print(msg, file=sys.stderr),
            ).to_dict()
        elif action == "unregister":
            result = client.unregister_model(args.name, args.version)
        else:  # argparse only lets the actions above through
            raise UsageError(f"unknown models action {action!r}")
    print(json.dumps(result, indent=2))
