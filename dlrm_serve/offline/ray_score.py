"""``dlrm-serve score --engine ray``: batch scoring on a Ray cluster with Ray Data.

The driver plans *units* (a file's rows ``start:stop``; Parquet by row group)
from row counts it reads cheaply (newline count, Parquet footers), so every
row's global index is known before any is scored.  A ``ray.data`` dataset of
the units goes through an actor pool (``map_batches`` with one unit per
call): each actor loads the artifacts once with :func:`load_backend`, reads
its unit, decodes it with the project's own codecs and features code and
answers ``row`` (int64 ``[R]``), ``probability`` (float32 ``[R]``, NaN for a
skipped bad row) and ``error`` (str ``[R]``, "" when fine).  Ray Data keeps
the order of units (``preserve_order``), so output streams to a ``.txt`` in
input order, or each block is written as Parquet with its row index, and the
driver never holds more than one block.

Reading in the actor (not with ``ray.data.read_text``) is what lets an error
name the file and line, the 400-style message the server gives.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import re
import time
import zlib
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from dlrm_serve.errors import InvalidInput
from dlrm_serve.io.codecs import split_tsv
from dlrm_serve.io.data import at_line, count_rows, detect_format, format_probabilities, open_text

__all__ = ["expand_inputs", "plan_units", "UnitScorer", "score_ray"]

UNIT_ROWS = 65536  # rows per Ray task: big enough that a task's overhead stays small
PARQUET = (".parquet", ".pq")


# ----- planning (driver) ----------------------------------------------------------
def expand_inputs(inputs: list[str]) -> list[str]:
    """Files of ``inputs`` (files, folders, globs), in the order given; a folder or
    a glob gives its files in sorted name order (hidden files skipped)."""
    out: list[str] = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(str(p) for p in Path(item).iterdir() if p.is_file() and not p.name.startswith((".", "_")))
        elif os.path.isfile(item):
            found = [item]
        else:
            found = sorted(p for p in glob.glob(item) if os.path.isfile(p))
        if not found:
            raise FileNotFoundError(f"input {item!r} names no file")
        out += found
    return out


def _format(path: str) -> str:
    return "parquet" if path.endswith(PARQUET) else detect_format(path)


def _json_rows(path: str) -> int:
    with open_text(path) as fh:
        return sum(1 for line in fh if line.strip())


def plan_units(paths: list[str], unit_rows: int = UNIT_ROWS) -> list[dict]:
    """Units of work: ``{path, fmt, start, stop, offset}`` (rows ``start:stop`` of the
    file, ``offset`` = global index of its first row), in input order."""
    units: list[dict] = []
    offset = 0
    for path in paths:
        fmt = _format(path)
        if fmt == "parquet":
            import pyarrow.parquet as pq

            meta = pq.ParquetFile(path).metadata
            bounds, pos = [0], 0
            for g in range(meta.num_row_groups):
                pos += meta.row_group(g).num_rows
                if pos - bounds[-1] >= unit_rows or g == meta.num_row_groups - 1:
                    bounds.append(pos)
        else:
            n = count_rows([path]) if fmt == "tsv" else _json_rows(path)
            bounds = list(range(0, n, unit_rows)) + [n]
        for start, stop in zip(bounds[:-1], bounds[1:]):
            if stop > start:
                units.append({"path": path, "fmt": fmt, "start": start, "stop": stop, "offset": offset + start})
        offset += bounds[-1]
    return units


# ----- scoring (actor) ------------------------------------------------------------
class UnitScorer:
    """One Ray actor: the model loaded once, scoring whole units.

    ``__call__`` takes a batch of units (columns of :func:`plan_units` dicts)
    and returns ``row``, ``probability``, ``error`` and the ``keep`` columns.
    """

    def __init__(self, artifacts: str, precision: str, threads: int, batch_rows: int, on_error: str, keep: list[str]):
        from dlrm_serve.io.features import FeatureEncoder
        from dlrm_serve.runtime.backends import load_backend

        self.model = load_backend(artifacts, kind="torch", precision=precision, threads=threads)
        self.encoder = FeatureEncoder(self.model.config)
        self.batch_rows, self.on_error, self.keep = batch_rows, on_error, keep
        cfg = self.model.config
        self.names = list(cfg.dense_names) + list(cfg.sparse_names)

    def __call__(self, units: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        parts = [self._unit({k: v[i] for k, v in units.items()}) for i in range(len(units["path"]))]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def _unit(self, u: dict) -> dict[str, np.ndarray]:
        n = int(u["stop"]) - int(u["start"])
        prob = np.full(n, np.nan, dtype=np.float32)
        error = np.full(n, "", dtype=object)
        kept = {k: np.full(n, None, dtype=object) for k in self.keep}
        done = 0
        for where, encode, cols in self._read(u):
            b = len(where)
            good = np.ones(b, dtype=bool)
            for i, message in cols.pop("__bad__", []):
                good[i] = False
                error[done + i] = message
            idx = np.flatnonzero(good)
            while idx.size:
                try:
                    prob[done + idx] = self.model.predict(encode(idx))
                    break
                except InvalidInput as e:
                    if e.row is None or not 0 <= e.row < idx.size:
                        raise
                    error[done + int(idx[e.row])] = self._where(u, where[idx[e.row]], e)
                    idx = np.delete(idx, e.row)
            for k in self.keep:
                if k in cols:
                    kept[k][done : done + b] = cols[k]
            done += b
        if done != n:
            raise InvalidInput(f"{u['path']}: holds {done} rows from row {int(u['start'])}, planned {n}; did it change?")
        bad = np.flatnonzero(error != "")
        if bad.size and self.on_error == "fail":
            raise InvalidInput(str(error[bad[0]]))
        return {"row": np.arange(n, dtype=np.int64) + int(u["offset"]), "probability": prob, "error": error, **kept}

    @staticmethod
    def _where(u: dict, line: int, e: InvalidInput) -> str:
        if u["fmt"] == "parquet":
            field = f", field {e.field}" if e.field else ""
            return f"{u['path']}, row {line}{field}: {e.reason}"
        return at_line(e, str(u["path"]), int(line)).message

    def _read(self, u: dict) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, dict]]:
        """Chunks of the unit: ``(lines [b], encode(rows) -> FeatureBatch, columns)``; the
        columns hold the ``keep`` values and ``__bad__``: (row, message) of rows that did not parse."""
        if u["fmt"] == "parquet":
            yield from self._read_parquet(u)
            return
        lines: list[str] = []
        numbers: list[int] = []
        row, start, stop = 0, int(u["start"]), int(u["stop"])
        blank = (lambda s: not s.strip()) if u["fmt"] == "json" else (lambda s: not s.strip("\r\n"))
        number = 0
        try:
            with open_text(str(u["path"])) as fh:
                for number, line in enumerate(fh, start=1):
                    if blank(line):
                        continue
                    if row >= start:
                        lines.append(line)
                        numbers.append(number)
                        if len(lines) == self.batch_rows:
                            yield self._text_chunk(u, lines, numbers)
                            lines, numbers = [], []
                    row += 1
                    if row >= stop:
                        break
        except (gzip.BadGzipFile, EOFError, zlib.error) as e:
            raise InvalidInput(f"{u['path']}, after line {number}: not a readable gzip file ({e})") from None
        if lines:
            yield self._text_chunk(u, lines, numbers)

    def _text_chunk(self, u, lines, numbers):
        nd, ns = self.encoder.num_dense, self.encoder.num_sparse
        where = np.asarray(numbers, dtype=np.int64)
        bad: list[tuple[int, str]] = []
        if u["fmt"] == "json":
            instances: list[Any] = [{}] * len(lines)
            for i, line in enumerate(lines):
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    bad.append((i, f"{u['path']}, line {numbers[i]}: invalid JSON: {e.msg} at column {e.colno}"))
                    continue
                if not isinstance(obj, dict):
                    bad.append((i, f"{u['path']}, line {numbers[i]}: each line must hold one JSON object (an instance), "
                                   f"got {type(obj).__name__}"))
                    continue
                instances[i] = obj
            cols: dict[str, Any] = {"__bad__": bad}
            for k in self.keep:
                cols[k] = np.array([inst.get(k) for inst in instances], dtype=object)
            return where, lambda idx: self.encoder.encode_instances([instances[i] for i in idx]), cols
        good = list(range(len(lines)))
        while True:
            try:
                labels, d, s = split_tsv([lines[i] for i in good], nd, ns)
                break
            except InvalidInput as e:
                if e.row is None:
                    raise
                i = good.pop(e.row)
                bad.append((i, at_line(e, str(u["path"]), numbers[i]).message))
                if not good:
                    labels, d, s = None, np.empty((0, nd), object), np.empty((0, ns), object)
                    break
        dense = np.full((len(lines), nd), "", dtype=object)
        sparse = np.full((len(lines), ns), "", dtype=object)
        dense[good], sparse[good] = d, s
        cols = {"__bad__": bad}
        if self.keep:
            for j, name in enumerate(self.encoder.dense_names):
                cols[name] = dense[:, j]
            for j, name in enumerate(self.encoder.sparse_names):
                cols[name] = sparse[:, j]
            lab = np.full(len(lines), None, dtype=object)
            if labels is not None:
                lab[good] = labels.astype(np.int64)
            cols["label"] = lab
        return where, lambda idx: self.encoder.encode_columns(dense[idx], sparse[idx]), cols

    def _read_parquet(self, u: dict):
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(str(u["path"]))
        start, stop = int(u["start"]), int(u["stop"])
        pos = 0
        for batch in pf.iter_batches(batch_size=self.batch_rows):
            lo, hi = max(start - pos, 0), min(stop - pos, batch.num_rows)
            if hi > lo:
                t = batch.slice(lo, hi - lo)
                cols = {name: t.column(name).to_numpy(zero_copy_only=False) for name in t.schema.names}
                missing = [n for n in self.names if n not in cols]
                if missing:
                    raise InvalidInput(f"{u['path']}: has no column(s) {', '.join(missing)}")
                # Python values (None = missing), what the JSON route gets too.
                dense = np.empty((hi - lo, len(self.encoder.dense_names)), dtype=object)
                sparse = np.empty((hi - lo, len(self.encoder.sparse_names)), dtype=object)
                for j, n in enumerate(self.encoder.dense_names):
                    dense[:, j] = t.column(n).to_pylist()
                for j, n in enumerate(self.encoder.sparse_names):
                    sparse[:, j] = t.column(n).to_pylist()
                where = np.arange(pos + lo, pos + hi, dtype=np.int64) + 1  # 1-based row of the file
                cols["__bad__"] = []
                yield where, (lambda idx, d=dense, s=sparse: self.encoder.encode_columns(d[idx], s[idx])), cols
            pos += batch.num_rows
            if pos >= stop:
                return


# ----- the job (driver) -----------------------------------------------------------
def _invalid_cause(exc: BaseException) -> InvalidInput | None:
    """The user's InvalidInput inside Ray's wrappers, if there is one."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, InvalidInput):
            return exc
        text = str(exc)
        # Ray Data re-raises a UDF's error as UserCodeException holding only its traceback text.
        found = re.search(r"dlrm_serve\.errors\.InvalidInput: (.+)", text)
        if found:
            return InvalidInput(found.group(1).strip())
        exc = getattr(exc, "cause", None) or exc.__cause__ or exc.__context__
    return None


def score_ray(
    artifacts: str,
    inputs: list[str],
    out: str,
    *,
    address: str | None = None,
    actors: int | None = None,
    threads: int = 1,
    batch_rows: int = 4096,
    unit_rows: int = UNIT_ROWS,
    precision: str = "auto",
    on_error: str = "fail",
    keep_columns: list[str] | None = None,
    progress: bool = True,
) -> dict:
    """Score ``inputs`` on Ray; returns ``{rows, bad, seconds, actors}``.

    ``out`` ending in ``.txt``: one probability per line (``nan`` for a skipped
    row); otherwise a folder of Parquet files with ``row``, ``probability``,
    ``error`` and the ``keep_columns``.
    """
    import ray

    if on_error not in ("skip", "fail"):
        raise InvalidInput(f"--on-error must be skip or fail, got {on_error!r}")
    began = time.perf_counter()
    artifacts = str(Path(artifacts).resolve())
    units = plan_units(expand_inputs(inputs), unit_rows)
    if not units:
        raise InvalidInput("the inputs hold no rows")
    started_here = not ray.is_initialized()
    if started_here:
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True
        ctx.enable_progress_bars = progress
        cpus = int(ray.cluster_resources().get("CPU", 1))
        actors = actors or max(1, cpus // threads)
        ds = ray.data.from_items(units, override_num_blocks=len(units))
        ds = ds.map_batches(
            UnitScorer,
            fn_constructor_args=(artifacts, precision, threads, batch_rows, on_error, list(keep_columns or [])),
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=threads,
            # Ray Data's actor pools default to max_restarts=-1, max_task_retries=-1: a killed
            # actor is restarted and its unit retried; a unit's rows count only once it completes.
        )
        rows, bad = _write(ds, out)
    except Exception as e:
        cause = _invalid_cause(e)
        if cause is not None:
            raise InvalidInput(cause.message) from None
        raise
    finally:
        if started_here:
            ray.shutdown()
    seconds = time.perf_counter() - began
    return {"rows": rows, "bad": bad, "seconds": seconds, "actors": actors}


def _write(ds, out: str) -> tuple[int, int]:
    """Stream ``ds`` to ``out`` in order; returns (rows, bad rows)."""
    rows = bad = 0
    if out.endswith(".txt"):
        tmp = Path(out + ".part")
        try:
            with open(tmp, "w", encoding="utf-8", newline="\n") as fh:
                for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                    p = batch["probability"]
                    fh.write(format_probabilities(p))
                    rows += len(p)
                    bad += int(np.count_nonzero(batch["error"] != ""))
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
        return rows, bad
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    ds.write_parquet(out)
    # Counted from the files written (streamed by pyarrow), not from rows held here.
    written = pads.dataset(out, format="parquet")
    return written.count_rows(), written.count_rows(filter=pc.field("error") != "")
