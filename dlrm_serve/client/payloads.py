"""Rows -> request bodies, and answers -> probabilities or errors.  numpy only.

Rows come in three shapes (:func:`rows_kind`):

- ``instances``: a list of dicts, as the JSON API takes them;
- ``lines``: a list of Criteo TSV lines (with or without the label);
- ``arrays``: a ``(dense, sparse)`` pair, dense ``[B, num_dense]`` numbers
  (NaN = missing), sparse ``[B, num_sparse]`` hex strings (``""`` = missing)
  or int row ids (negative = missing).

Bodies come in three formats: ``binary`` (needs the model's config; the
rows are validated and hashed here with the server's own
:class:`~dlrm_serve.io.features.FeatureEncoder`), ``json`` and ``tsv`` (no config
needed; the server validates).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from dlrm_serve.io.replies import decode_predictions, is_binary_reply

from dlrm_serve.io.codecs import BINARY_CONTENT_TYPE, JSON_CONTENT_TYPE, TSV_CONTENT_TYPE, encode_binary, split_tsv
from dlrm_serve.config import CRITEO_DENSE, CRITEO_SPARSE, DLRMConfig
from dlrm_serve.errors import AuthError, DLRMServeError, InvalidInput, ServerError, UsageError
from dlrm_serve.io.features import FeatureEncoder, RawBatch

__all__ = [
    "FORMATS",
    "Payload",
    "rows_kind",
    "count_rows",
    "slice_rows",
    "default_format",
    "encode_rows",
    "parse_predictions",
    "parse_explanations",
    "error_for",
    "error_from_body",
]

FORMATS = ("binary", "json", "tsv")
_CONTENT_TYPES = {"binary": BINARY_CONTENT_TYPE, "json": JSON_CONTENT_TYPE, "tsv": TSV_CONTENT_TYPE}


@dataclass(frozen=True)
class Payload:
    """One request body: ``rows`` rows in ``format`` (its ``content_type`` for REST)."""

    body: bytes
    format: str
    rows: int

    @property
    def content_type(self) -> str:
        return _CONTENT_TYPES[self.format]


# ----- rows ---------------------------------------------------------------------
def rows_kind(rows: Any) -> str:
    """``instances``, ``lines`` or ``arrays``; ``ValueError`` for anything else."""
    if isinstance(rows, tuple) and len(rows) == 2 and all(hasattr(r, "__len__") for r in rows):
        if not isinstance(rows[0], (str, dict)):
            return "arrays"
    if isinstance(rows, (str, bytes, dict)):
        raise UsageError(
            f"rows must be a list of instances (dicts), of Criteo lines (str) or a (dense, sparse) "
            f"pair of arrays, got a single {type(rows).__name__}; wrap one row in a list"
        )
    if isinstance(rows, np.ndarray):
        raise UsageError("pass arrays as a (dense, sparse) pair, not one array")
    try:
        first = rows[0]
    except (TypeError, KeyError):
        raise UsageError(f"rows must be a list (or a (dense, sparse) pair), got {type(rows).__name__}") from None
    except IndexError:
        raise UsageError("rows is empty: there is nothing to predict") from None
    if isinstance(first, dict):
        return "instances"
    if isinstance(first, str):
        return "lines"
    raise UsageError(
        f"rows must hold dicts (instances) or str (Criteo lines), got {type(first).__name__} first"
    )


def count_rows(rows: Any, kind: str) -> int:
    if kind == "arrays":
        dense, sparse = rows
        if len(dense) != len(sparse):
            raise UsageError(f"dense has {len(dense)} rows but sparse has {len(sparse)}")
        return len(dense)
    return len(rows)


def slice_rows(rows: Any, kind: str, start: int, stop: int) -> Any:
    if kind == "arrays":
        dense, sparse = rows
        return dense[start:stop], sparse[start:stop]
    return rows[start:stop]


def default_format(kind: str, config: DLRMConfig | None) -> str:
    """Binary when the config is known (fastest), else the rows' natural text format."""
    if config is not None:
        return "binary"
    return "tsv" if kind == "lines" else "json"


# ----- encoding -----------------------------------------------------------------
def encode_rows(
    rows: Any, kind: str, fmt: str, encoder: FeatureEncoder | None = None, *, first_row: int = 0
) -> Payload:
    """One chunk of rows as a request body.

    Invalid rows raise :class:`InvalidInput` numbered from ``first_row`` (the
    chunk's place in the caller's input) for the binary format; the text
    formats leave validation to the server.
    """
    if fmt not in FORMATS:
        raise UsageError(f"payload format must be one of {FORMATS}, got {fmt!r}")
    n = count_rows(rows, kind)
    if n == 0:
        raise UsageError("a request needs at least one row")
    if fmt == "binary":
        if encoder is None:
            raise UsageError(
                "the binary format needs the model's config (pass config=DLRMConfig, an artifacts "
                "folder or a dlrm.json); or use payload='json' / 'tsv'"
            )
        try:
            raw = _raw_batch(rows, kind, encoder)
        except InvalidInput as e:
            raise e.shifted(first_row) from None
        return Payload(encode_binary(raw), "binary", n)
    if fmt == "json":
        return Payload(_json_body(rows, kind, encoder), "json", n)
    if kind != "lines":
        raise UsageError(
            "the tsv format carries Criteo lines; send instances or arrays as json or binary"
        )
    text = "\n".join(line.rstrip("\r\n") for line in rows) + "\n"
    return Payload(text.encode("utf-8"), "tsv", n)


def _raw_batch(rows: Any, kind: str, encoder: FeatureEncoder) -> RawBatch:
    if kind == "instances":
        return encoder.raw_instances(rows)
    if kind == "lines":
        _, dense, sparse = split_tsv(rows, encoder.num_dense, encoder.num_sparse)
        return encoder.raw_columns(dense, sparse)
    dense, sparse = rows
    return encoder.raw_columns(dense, sparse)


def _json_body(rows: Any, kind: str, encoder: FeatureEncoder | None) -> bytes:
    if kind == "instances":
        instances = list(rows)
    elif kind == "lines":
        nd = encoder.num_dense if encoder is not None else len(CRITEO_DENSE)
        ns = encoder.num_sparse if encoder is not None else len(CRITEO_SPARSE)
        instances = _lines_to_instances(rows, nd, ns)
    else:
        instances = _arrays_to_instances(*rows)
    return json.dumps({"instances": instances}, separators=(",", ":"), allow_nan=False).encode("utf-8")


def _number(text: str) -> Any:
    """A dense TSV field as a JSON value; text that is no number goes as is, for the server to reject."""
    if text == "":
        return None
    try:
        return int(text)
    except ValueError:
        pass
    try:
        x = float(text)
    except ValueError:
        return text
    return x if np.isfinite(x) else text


def _lines_to_instances(lines: Sequence[str], nd: int, ns: int) -> list[dict]:
    out = []
    for line in lines:
        fields = line.rstrip("\r\n").split("\t")
        if len(fields) == nd + ns + 1:
            fields = fields[1:]
        # A line of the wrong width goes as is; the server names the row.
        dense = [_number(f) for f in fields[:nd]]
        sparse = [f if f != "" else None for f in fields[nd:]]
        out.append({"dense": dense, "sparse": sparse})
    return out


def _arrays_to_instances(dense: Any, sparse: Any) -> list[dict]:
    d = np.asarray(dense)
    if d.dtype.kind == "f":
        dense_rows = [[None if x != x else x for x in row] for row in d.astype(np.float64).tolist()]
    else:
        dense_rows = d.tolist()
    s = np.asarray(sparse)
    if s.dtype.kind in "US":
        sparse_rows = [[v if v != "" else None for v in row] for row in s.tolist()]
    elif s.dtype.kind in "iu":
        sparse_rows = [[v if v >= 0 else None for v in row] for row in s.tolist()]
    else:
        sparse_rows = [list(row) for row in sparse]
    return [{"dense": a, "sparse": b} for a, b in zip(dense_rows, sparse_rows)]


# ----- answers ------------------------------------------------------------------
def error_for(status: int, message: str, server_type: str | None = None) -> DLRMServeError:
    """The library's error for an HTTP-style status and the server's message.

    - a token problem (TorchServe's ``InvalidKeyException``, which REST sends
      as 400, or 401/403) -> :class:`AuthError`;
    - 400, 413, 422 (the request itself is wrong) -> :class:`InvalidInput`;
    - anything else -> :class:`ServerError` with that status (503 is retried).
    """
    if server_type == "InvalidKeyException" or status == 401 or (
        status == 403 and "token" in message.lower()
    ):
        err: DLRMServeError = AuthError(message, status=status)
    elif status in (400, 413, 422):
        err = InvalidInput(message)
        err.status = status
    else:
        err = ServerError(message, status=status)
    err.server_type = server_type
    return err


def error_from_body(obj: Any) -> DLRMServeError | None:
    """The error an answer body describes (``{"code", "type", "message"}``), or None."""
    if not isinstance(obj, dict) or "predictions" in obj or "explanations" in obj:
        return None
    code = obj.get("code")
    message = obj.get("message")
    if isinstance(code, bool) or not isinstance(code, int) or code < 400 or not isinstance(message, str):
        return None
    server_type = obj.get("type") if isinstance(obj.get("type"), str) else None
    return error_for(code, message, server_type)


def _json_answer(body: bytes) -> Any:
    """An answer body as JSON; an error body (gRPC answers them with OK) raises its error."""
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        shown = bytes(body[:200])
        raise ServerError(f"the server answered with a body that is not JSON: {shown!r}") from None
    err = error_from_body(obj)
    if err is not None:
        raise err
    return obj


def parse_explanations(body: bytes, rows: int | None) -> list[dict]:
    """An explanation answer (``{"explanations": [...]}``) as its list, one dict per row."""
    obj = _json_answer(body)
    out = obj.get("explanations") if isinstance(obj, dict) else None
    if not isinstance(out, list) or not all(isinstance(e, dict) for e in out):
        raise ServerError(f"the server's answer has no 'explanations' list: {str(obj)[:200]}")
    if rows is not None and len(out) != rows:
        raise ServerError(f"sent {rows} rows but the server answered {len(out)} explanations")
    return out


def parse_predictions(body: bytes, rows: int | None) -> np.ndarray:
    """A prediction answer as float32 ``[rows]``, exactly the values the server sent.

    ``rows`` None accepts any number of predictions.

    An error body with a success status (gRPC drops per-request status codes,
    so a 400 arrives as an OK answer) raises the same error REST would.
    """
    if is_binary_reply(body):  # asked for with Accept: application/x-dlrm (gRPC: the input "accept")
        try:
            values = decode_predictions(body)
        except ValueError as e:
            raise ServerError(str(e)) from None
        if rows is not None and values.shape[0] != rows:
            raise ServerError(f"sent {rows} rows but the server answered {values.shape[0]} predictions")
        return values
    obj = _json_answer(body)
    preds = obj.get("predictions") if isinstance(obj, dict) else None
    if not isinstance(preds, list):
        raise ServerError(f"the server's answer has no 'predictions' list: {str(obj)[:200]}")
    if rows is not None and len(preds) != rows:
        raise ServerError(f"sent {rows} rows but the server answered {len(preds)} predictions")
    try:
        values = np.asarray(preds, dtype=np.float64)
    except (TypeError, ValueError):
        raise ServerError(f"the server's predictions are not all numbers: {str(preds)[:200]}") from None
    # The server sends float32 values, which survive JSON's decimal text exactly.
    return values.astype(np.float32)
