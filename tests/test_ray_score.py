"""``dlrm-serve score --engine ray`` on a real two-node local Ray cluster (loopback only).

The cluster (``ray start --head`` + ``ray start --address``, one CPU each, no
dashboard, temp dir under pytest's tmp path) is shared by the tests of this
module and always stopped, by the pids of its own processes.
"""

from __future__ import annotations

import gzip
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

pytest.importorskip("ray")
pa = pytest.importorskip("pyarrow")
import pyarrow.parquet as pq  # noqa: E402

from dlrm_serve.artifacts import save_artifacts  # noqa: E402
from dlrm_serve.config import DLRMConfig  # noqa: E402
from dlrm_serve.io.data import generate, read_criteo  # noqa: E402
from dlrm_serve.model.dlrm import DLRM  # noqa: E402
from dlrm_serve.offline._ray_cluster import cluster_processes, local_cluster  # noqa: E402

CONFIG = DLRMConfig(
    table_sizes=(50, 300, 1000), embedding_dim=4, bottom_mlp=(8, 4), top_mlp=(8, 1),
    dense_names=("I1", "I2"), sparse_names=("C1", "C2", "C3"),
)
BIN = Path(sys.executable).parent
TOL = 1e-6


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """``{address, env}`` of a two-node cluster, one CPU per node; always stopped."""
    with local_cluster(tmp_path_factory.mktemp("ray") / "rt", nodes=2, cpus=1) as c:
        yield c


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("raydata")
    torch.manual_seed(0)
    save_artifacts(DLRM(CONFIG), root / "art")
    (root / "tsv").mkdir()
    generate(root / "tsv" / "a.tsv", 1500, seed=4, config=CONFIG, progress=False)
    generate(root / "tsv" / "b.tsv.gz", 1000, seed=5, config=CONFIG, progress=False)
    plain = (root / "tsv" / "a.tsv").read_text() + gzip.open(root / "tsv" / "b.tsv.gz", "rt").read()
    (root / "all.tsv").write_text(plain)
    return root


def _score(args: list[str], env=None, timeout=180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "dlrm-serve"), "score", *args], capture_output=True, text=True, env=env, timeout=timeout,
    )


def _local(data: Path, src: Path, out: Path) -> np.ndarray:
    r = _score([str(src), "--artifacts", str(data / "art"), "--out", str(out), "--precision", "fp32"])
    assert r.returncode == 0, r.stderr
    return np.loadtxt(out, dtype=np.float64)


def _ray(cluster, data: Path, *args: str, timeout=180) -> subprocess.CompletedProcess:
    return _score(
        ["--engine", "ray", "--address", cluster["address"], "--artifacts", str(data / "art"),
         "--precision", "fp32", *args], env=cluster["env"], timeout=timeout,
    )


def test_tsv_folder_and_parquet_equal_the_single_process_scorer(cluster, data, tmp_path):
    want = _local(data, data / "all.tsv", tmp_path / "local.txt")
    assert want.shape == (2500,)
    # A folder: a.tsv then b.tsv.gz (sorted names), rows in file order; 4 units over 2 actors.
    r = _ray(cluster, data, str(data / "tsv"), "--out", str(tmp_path / "ray.txt"), "--actors", "2", "--unit-rows", "700")
    assert r.returncode == 0, r.stderr
    assert "scored 2500 rows in" in r.stdout and "rows/s" in r.stdout
    got = np.loadtxt(tmp_path / "ray.txt", dtype=np.float64)
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL)

    # The same rows as Parquet (ids as strings, missing counts as nulls), out to a Parquet folder.
    (chunk,) = read_criteo([str(data / "all.tsv")], 2, 3)
    cols = {"label": pa.array(chunk.labels.astype(np.int64))}
    for j, name in enumerate(CONFIG.dense_names):
        cols[name] = pa.array([None if v == "" else int(v) for v in chunk.dense[:, j]], pa.int64())
    for j, name in enumerate(CONFIG.sparse_names):
        cols[name] = pa.array([None if v == "" else v for v in chunk.sparse[:, j]], pa.string())
    pq.write_table(pa.table(cols), data / "rows.parquet", row_group_size=500)
    out = tmp_path / "scored"
    r = _ray(cluster, data, str(data / "rows.parquet"), "--out", str(out), "--keep-columns", "label", "--unit-rows", "1000")
    assert r.returncode == 0, r.stderr
    table = pq.read_table(out).sort_by("row")
    assert table.column("row").to_pylist() == list(range(2500))
    assert table.column("label").to_pylist() == chunk.labels.tolist()
    np.testing.assert_allclose(table.column("probability").to_numpy(), want, rtol=0, atol=TOL)


def test_json_lines_equal_the_single_process_scorer(cluster, data, tmp_path):
    (chunk,) = read_criteo([str(data / "tsv" / "a.tsv")], 2, 3)
    with open(tmp_path / "rows.jsonl", "w") as fh:
        for i, (d, s) in enumerate(zip(chunk.dense.tolist(), chunk.sparse.tolist())):
            dense = [None if x == "" else int(x) for x in d]
            sparse = [None if x == "" else x for x in s]
            if i % 2:  # both shapes the server accepts: by position and by name
                fh.write(json.dumps({"dense": dense, "sparse": sparse}) + "\n")
            else:
                fh.write(json.dumps(dict(zip(CONFIG.dense_names + CONFIG.sparse_names, dense + sparse))) + "\n")
            if i == 10:
                fh.write("\n")  # blank lines are skipped, as by the single-process scorer
    want = _local(data, tmp_path / "rows.jsonl", tmp_path / "local.txt")
    r = _ray(cluster, data, str(tmp_path / "rows.jsonl"), "--out", str(tmp_path / "ray.txt"), "--unit-rows", "600")
    assert r.returncode == 0, r.stderr
    np.testing.assert_allclose(np.loadtxt(tmp_path / "ray.txt"), want, rtol=0, atol=TOL)


def _with_bad_row(data: Path, tmp_path: Path) -> tuple[Path, int]:
    lines = (data / "all.tsv").read_text().splitlines(keepends=True)
    fields = lines[1234].split("\t")
    fields[2] = "many"  # I2 is an integer field
    lines[1234] = "\t".join(fields)
    path = tmp_path / "bad.tsv"
    path.write_text("".join(lines))
    return path, 1235


def test_bad_row_fails_the_job_naming_file_and_line(cluster, data, tmp_path):
    bad, line = _with_bad_row(data, tmp_path)
    r = _ray(cluster, data, str(bad), "--out", str(tmp_path / "out.txt"), "--unit-rows", "1000")
    assert r.returncode == 2
    assert f"{bad}, line {line}, field I2" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "out.txt").exists() and not (tmp_path / "out.txt.part").exists()


def test_bad_row_skipped_is_nan_and_counted(cluster, data, tmp_path):
    bad, line = _with_bad_row(data, tmp_path)
    want = _local(data, data / "all.tsv", tmp_path / "local.txt")
    r = _ray(cluster, data, str(bad), "--out", str(tmp_path / "out.txt"), "--on-error", "skip", "--unit-rows", "1000")
    assert r.returncode == 0, r.stderr
    assert "1 bad rows written as NaN" in r.stdout
    got = np.loadtxt(tmp_path / "out.txt", dtype=np.float64)
    assert got.shape == want.shape and np.isnan(got[line - 1]) and np.isnan(got).sum() == 1
    keep = np.arange(len(want)) != line - 1
    np.testing.assert_allclose(got[keep], want[keep], rtol=0, atol=TOL)


def _actors(marker: str) -> list[psutil.Process]:
    found = []
    for p in cluster_processes(marker):
        try:
            if "UnitScorer" in " ".join(p.cmdline()):
                found.append(p)
        except psutil.Error:  # gone (or a zombie) since it was listed
            pass
    return found


def test_an_actor_killed_mid_job_is_restarted_and_every_row_comes_once_in_order(cluster, data, tmp_path):
    big = tmp_path / "big.tsv"
    generate(big, 40000, seed=7, config=CONFIG, progress=False)
    want = _local(data, big, tmp_path / "local.txt")
    out = tmp_path / "out.txt"
    cmd = [str(BIN / "dlrm-serve"), "score", "--engine", "ray", "--address", cluster["address"], "--artifacts",
           str(data / "art"), "--precision", "fp32", str(big), "--out", str(out), "--actors", "2",
           "--unit-rows", "1000", "--batch-rows", "250"]
    job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cluster["env"])
    killed = None
    try:
        deadline = time.monotonic() + 120
        part = Path(str(out) + ".part")
        # Kill once rows have started to come back, while most units are still to do.
        while time.monotonic() < deadline and job.poll() is None:
            actors = _actors(cluster["temp_dir"])
            if actors and part.exists() and part.stat().st_size > 0:
                killed = actors[0]
                killed.send_signal(signal.SIGKILL)
                break
            time.sleep(0.05)
        done_lines = sum(1 for _ in open(part)) if part.exists() else None
        stdout, stderr = job.communicate(timeout=180)
    finally:
        if job.poll() is None:
            job.kill()
    assert killed is not None, "no actor was seen while the job ran"
    assert done_lines is not None and done_lines < len(want), "the job was done before the kill"
    assert job.returncode == 0, stderr[-3000:]
    got = np.loadtxt(out, dtype=np.float64)
    assert got.shape == want.shape  # every row exactly once ...
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL)  # ... in input order
