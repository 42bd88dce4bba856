"""A local multi-node Ray cluster on loopback, for tests and ``make bench-ray``.

``ray start --head`` plus ``ray start --address`` per extra node, each with
``cpus`` CPUs, no dashboard, token authentication, the temp dir given.  On
exit every process of *this* cluster is killed by pid (found by its temp dir
on the command line), never ``ray stop``, which stops every Ray on the host.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import psutil

__all__ = ["local_cluster", "cluster_processes"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cluster_processes(temp_dir: str) -> list[psutil.Process]:
    """Processes whose command line names ``temp_dir``, and their children."""
    found: dict[int, psutil.Process] = {}
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in a for a in p.info["cmdline"] or []):
                found[p.pid] = p
                for c in p.children(recursive=True):
                    found[c.pid] = c
        except psutil.Error:
            pass
    return list(found.values())


@contextlib.contextmanager
def local_cluster(temp_dir: str | os.PathLike, nodes: int = 2, cpus: int = 1) -> Iterator[dict]:
    """Yields ``{"address": "127.0.0.1:port", "env": environment for drivers}``.

    ``temp_dir`` should be short: Ray's socket paths must stay under 107 bytes.
    """
    temp_dir = str(temp_dir)
    ray = str(Path(sys.executable).parent / "ray")
    port = _free_port()
    env = {**os.environ, "RAY_TMPDIR": temp_dir, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token"}
    common = ["--num-cpus", str(cpus), "--node-ip-address", "127.0.0.1", "--disable-usage-stats"]
    try:
        subprocess.run(
            [ray, "start", "--head", "--port", str(port), "--include-dashboard", "false", "--temp-dir", temp_dir, *common],
            check=True, env=env, capture_output=True, timeout=120,
        )
        for _ in range(nodes - 1):
            subprocess.run(
                [ray, "start", "--address", f"127.0.0.1:{port}", *common],
                check=True, env=env, capture_output=True, timeout=120,
            )
        yield {"address": f"127.0.0.1:{port}", "env": env, "temp_dir": temp_dir}
    finally:
        procs = cluster_processes(temp_dir)
        for p in procs:
            with contextlib.suppress(psutil.Error):
                p.send_signal(signal.SIGKILL)
        psutil.wait_procs(procs, timeout=10)
