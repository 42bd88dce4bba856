"""gRPC against REST through TorchServe: ``bench_serve.py`` with both transports.

The same script, payloads, load driver (:func:`common.drive`) and defaults
(batch size, ``--max-batch-delay``) as ``bench_serve.py``; only the defaults
``--transports rest,grpc`` (interleaved rounds per cell), ``--library`` (a
table for ``dlrm_serve.client``) and ``--name bench_grpc`` differ.

    python bench/bench_grpc.py            # full run
    python bench/bench_grpc.py --quick    # smoke run

Target: gRPC with binary payloads at 1024 rows per request reaches at least
the REST throughput.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_serve  # noqa: E402

if __name__ == "__main__":
    sys.exit(bench_serve.main(defaults={"name": "bench_grpc", "transports": "rest,grpc", "library": True}))
