"""Request bytes <-> raw rows, for every wire format.  numpy only.

Formats (all end in :class:`~dlrm_serve.io.features.FeatureEncoder`):

- JSON (``application/json``): one instance, ``{"instances": [...]}``.
- Criteo TSV (``text/tab-separated-values``, ``text/plain``): one row per
  line, ``num_dense + num_sparse`` fields, or one more with the label first.
- Binary (``application/x-dlrm``), little-endian, for high-throughput clients::

      offset  type        field
      0       4 bytes     magic b"DLRM"
      4       uint8       version (1)
      5       uint8       flags: bit 0 set = bag lengths follow (multi-hot),
                          bit 1 set = ids are int64 (else int32)
      6       uint16      reserved, 0
      8       uint32      B, rows
      12      uint16      num_dense
      14      uint16      num_sparse (F)
      16      uint32      N, number of ids
      20      uint32      reserved, 0
      24      float32     dense[B * num_dense], raw values, NaN = missing
      ...     int32       lengths[B * F], only when flag bit 0 is set
      ...     int32/int64 ids[N], local row ids per table, bag by bag

  Without lengths every bag holds one id and ``N == B * F``.  Ids are int32
  unless a table has 2**31 rows or more, which keeps a Criteo row at 156 bytes.  Categorical
  strings are hashed by the client with the same code the server uses
  (:meth:`FeatureEncoder.raw_columns`), so decoding is a few ``frombuffer``
  calls and a range check.

Bodies without a content type (gRPC's ``data`` input) are sniffed: the
binary magic, else JSON when the first non-blank byte is ``{`` or ``[``, else
TSV text.
"""

from __future__ import annotations

import json
import struct
from typing import Any, Sequence

import numpy as np

from dlrm_serve.errors import InvalidInput
from dlrm_serve.io.features import FeatureBatch, FeatureEncoder, RawBatch, field_spans, int_fields

__all__ = [
    "MAX_ROWS",
    "MAGIC",
    "BINARY_CONTENT_TYPE",
    "JSON_CONTENT_TYPE",
    "TSV_CONTENT_TYPE",
    "decode_request",
    "fast_json",
    "fast_request",
    "decode_json",
    "decode_tsv",
    "decode_binary",
    "encode_binary",
    "split_tsv",
    "sniff",
    "predictions_body",
]

# Most rows one request may carry; bigger inputs are split by the client.
MAX_ROWS = 8192

MAGIC = b"DLRM"
VERSION = 1
_HEADER = struct.Struct("<4sBBHIHHII")
BINARY_CONTENT_TYPE = "application/x-dlrm"
JSON_CONTENT_TYPE = "application/json"
TSV_CONTENT_TYPE = "text/tab-separated-values"
_TEXT_TYPES = ("text/tab-separated-values", "text/plain", "text/tsv")
_BINARY_TYPES = (BINARY_CONTENT_TYPE, "application/octet-stream")


def _check_count(n: int, max_rows: int) -> None:
    if n == 0:
        raise InvalidInput("the request holds no rows")
    if n > max_rows:
        raise InvalidInput(
            f"the request holds {n} rows; at most {max_rows} are accepted per request "
            "(split the input; the dlrm-serve client does this for you)"
        )


# ----- JSON ---------------------------------------------------------------------
def decode_json(obj: Any, encoder: FeatureEncoder, max_rows: int = MAX_ROWS) -> FeatureBatch:
    """A decoded JSON body -> model inputs."""
    return encoder.finish(raw_json(obj, encoder, max_rows))


def raw_json(obj: Any, encoder: FeatureEncoder, max_rows: int = MAX_ROWS) -> RawBatch:
    if isinstance(obj, dict) and "instances" in obj:
        extra = sorted(set(obj) - {"instances"})
        if extra:
            raise InvalidInput(f"unexpected keys {extra} next to 'instances'")
        instances = obj["instances"]
        if not isinstance(instances, list):
            raise InvalidInput(f"'instances' must be a list of instances, got {type(instances).__name__}")
        if not instances:
            raise InvalidInput("'instances' is empty: send at least one instance")
        _check_count(len(instances), max_rows)
        return encoder.raw_instances(instances)
    if isinstance(obj, dict):
        return encoder.raw_instances([obj])
    raise InvalidInput(
        "the JSON body must be an object: one instance, or {\"instances\": [...]} for a batch"
    )


def _parse_json(data: bytes | bytearray | str) -> Any:
    # JSON on the wire is UTF-8 (RFC 8259); json.loads would also guess UTF-16/32.
    text = _text(data)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidInput(f"invalid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:
        raise InvalidInput("invalid JSON: nested too deeply") from None
    except ValueError:
        # Python refuses integers of more than 4300 digits.
        raise InvalidInput("invalid JSON: a number has too many digits") from None


# The vectorised reader of the common JSON body, straight from its bytes.
_QUOTE, _V = 34, ord("v")
_NULL = int.from_bytes(b"null", "little")


def fast_json(data: bytes | bytearray | memoryview, encoder: FeatureEncoder, max_rows: int = MAX_ROWS) -> RawBatch | None:
    """Positional JSON rows read straight from the body bytes; None when the body is not of that shape.

    The shape is ``{"instances": [{"dense": [...], "sparse": [...]}, ...]}``
    or one such row, with numbers that are JSON integers or null and
    categorical values that are strings or null, any whitespace between
    tokens.  The body's skeleton (its structure, one character per value) is
    compared with the skeleton such a body must have, so nothing that is not
    valid JSON of that shape passes; every other body (named fields, floats,
    bags, escapes, errors) returns None and is parsed as JSON by the caller.
    Memory: a few arrays of one entry per body byte.
    """
    if isinstance(data, memoryview):
        data = data.tobytes()
    if not data.startswith(b"{") or b'"dense"' not in data[:4096] or b"\\" in data:
        return None
    # Cheap counts first: one row holds one object and two lists, a batch one more of each.
    objects, lists = data.count(b"{"), data.count(b"[")
    if lists != 2 * objects - (1 if objects > 1 else 0):
        return None
    buf = np.frombuffer(data, dtype=np.uint8)
    quotes = np.flatnonzero(buf == _QUOTE)
    if quotes.shape[0] % 2:
        return None
    opens, closes = quotes[0::2], quotes[1::2]
    # Bytes inside strings, quotes included: alternating runs between the quotes.
    bounds = np.empty(quotes.shape[0] + 2, dtype=np.int64)
    bounds[0], bounds[1:-1], bounds[-1] = 0, quotes, buf.shape[0]
    bounds[2:-1:2] += 1
    runs = np.zeros(bounds.shape[0] - 1, dtype=bool)
    runs[1::2] = True
    outside = np.repeat(runs, np.diff(bounds))
    np.logical_not(outside, out=outside)
    # JSON whitespace is space, tab, CR and LF; other control bytes are not JSON.
    control = buf < 32
    control &= outside
    if control.any() and not np.isin(buf[control], (9, 10, 13)).all():
        return None
    del control
    # Value bytes outside strings: '-' to '9' (numbers; '.' and '/' fail later) and
    # the letters of null.  Whitespace ends a value, so "1 2" is two values.
    # In place, so the peak stays a few bytes per body byte.
    value = buf - np.uint8(45)
    value = value <= 12
    for letter in (110, 117, 108):
        value |= buf == letter
    value &= outside
    first_byte = value.copy()
    first_byte[1:] &= ~value[:-1]
    last_byte = value.copy()
    last_byte[:-1] &= ~value[1:]
    # The skeleton: structure bytes, one byte per value and one '"' per string.
    keep = buf > 32
    keep &= outside
    del outside
    keep &= ~value
    keep |= first_byte
    keep[opens] = True
    del value
    pos = np.flatnonzero(keep)
    got = buf[pos]
    if (got == _V).any():  # a stray 'v' would pass for a value below
        return None
    is_value = first_byte[pos]
    got[is_value] = _V
    run_start = pos[is_value]
    run_end = np.flatnonzero(last_byte) + 1
    nd, ns = encoder.num_dense, encoder.num_sparse
    row = b'{":[' + b"v," * (nd - 1) + b'v],":[' + b"?," * (ns - 1) + b"?]}"
    batch = got.shape[0] > 4 and got[4] == ord("{")
    if batch:
        b, rem = divmod(got.shape[0] - 5, len(row) + 1)
        if rem or b < 1 or b > max_rows:
            return None
        want = b'{":[' + b",".join([row] * b) + b"]}"
    else:
        b, want = 1, row
    expect = np.frombuffer(want, dtype=np.uint8)
    if got.shape[0] != expect.shape[0]:
        return None
    # Wildcards ('?') take a value (null) or a string; everything else must match.
    either = (expect == ord("?")) & ((got == _V) | (got == _QUOTE))
    if ((got != expect) & ~either).any():
        return None
    # Tokens in skeleton order ("instances", then per row: "dense", nd values, "sparse", ns values).
    tokens = got[(got == _V) | (got == _QUOTE)]
    tok_is_str = tokens == _QUOTE
    tok_start = np.empty(tokens.shape[0], dtype=np.int64)
    tok_end = np.empty(tokens.shape[0], dtype=np.int64)
    tok_start[tok_is_str], tok_end[tok_is_str] = opens + 1, closes
    tok_start[~tok_is_str], tok_end[~tok_is_str] = run_start, run_end
    if batch and bytes(buf[tok_start[0] : tok_end[0]]) != b"instances":
        return None
    per_row = nd + ns + 2
    table = np.arange(int(batch), int(batch) + b * per_row).reshape(b, per_row)
    for col, key in ((0, b"dense"), (nd + 1, b"sparse")):
        k = table[:, col]
        if ((tok_end[k] - tok_start[k]) != len(key)).any():
            return None
        if (buf[tok_start[k][:, None] + np.arange(len(key))] != np.frombuffer(key, np.uint8)).any():
            return None
    d_tok = table[:, 1 : nd + 1].reshape(-1)
    dense = _json_numbers(buf, tok_start[d_tok], tok_end[d_tok])
    if dense is None:
        return None
    s_tok = table[:, nd + 2 :].reshape(-1)
    s_start, s_end, s_str = tok_start[s_tok], tok_end[s_tok], tok_is_str[s_tok]
    if not s_str.all():  # nulls; a number (a row id) is for the JSON path
        if not _is_null(buf, s_start[~s_str], s_end[~s_str]):
            return None
        s_end = np.where(s_str, s_end, s_start)
    ids, lengths = encoder.hash_text(buf, s_start, s_end - s_start, b)
    return RawBatch(dense.reshape(b, nd), ids, lengths)


def _is_null(buf: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> bool:
    if ((ends - starts) != 4).any():
        return False
    words = buf[starts[:, None] + np.arange(4)].copy().view("<u4").reshape(-1)
    return bool((words == _NULL).all())


def _json_numbers(buf: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray | None:
    """JSON integers or null -> float32 (null = NaN); None for anything else (floats, true, 01)."""
    nulls = buf[starts] == ord("n")
    if nulls.any():
        if not _is_null(buf, starts[nulls], ends[nulls]):
            return None
        ends = np.where(nulls, starts, ends)
    # JSON has no leading zeros: "01" and "-01" are not numbers.
    lead = np.where(buf[np.minimum(starts, buf.shape[0] - 1)] == ord("-"), starts + 1, starts)
    if ((ends - lead > 1) & (buf[np.minimum(lead, buf.shape[0] - 1)] == ord("0"))).any():
        return None
    return int_fields(buf, starts, ends)


# ----- TSV ----------------------------------------------------------------------
def split_tsv(
    lines: Sequence[str], num_dense: int, num_sparse: int, *, first_row: int = 0
) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """Criteo lines -> ``(labels, dense, sparse)`` as text columns.

    Each line has ``num_dense + num_sparse`` tab-separated fields, or one
    more with the label first; all lines of a call must agree.  Returns
    ``labels`` (int8 ``[B]``, or ``None`` when unlabelled), ``dense``
    ``[B, num_dense]`` and ``sparse`` ``[B, num_sparse]`` object arrays of
    str (``""`` = missing), which :class:`FeatureEncoder` reads as text.
    Object arrays hold the field strings themselves, so memory follows the
    text instead of rows x fields x the longest value.  ``first_row``
    numbers the rows in error messages.
    """
    width = num_dense + num_sparse
    if not lines:
        raise InvalidInput("no Criteo lines")
    # Fields are counted before any line is split, so a line of a million
    # tabs costs no million strings.
    counts = [line.count("\t") + 1 for line in lines]
    n0 = counts[0]
    if n0 not in (width, width + 1):
        raise InvalidInput(
            f"a Criteo line has {width} fields ({num_dense} integer, {num_sparse} categorical) "
            f"or {width + 1} with the label first; got {n0}",
            row=first_row,
        )
    for i, n in enumerate(counts):
        if n != n0:
            raise InvalidInput(
                f"has {n} tab-separated fields but the first line has {n0}; "
                f"expected {width}, or {width + 1} with the label first",
                row=first_row + i,
            )
    rows = [line.rstrip("\r\n").split("\t") for line in lines]
    table = np.empty((len(rows), n0), dtype=object)
    table[:] = rows
    labels = None
    if n0 == width + 1:
        lab = table[:, 0]
        ok = (lab == "0") | (lab == "1")
        if not ok.all():
            i = int(np.argmax(~ok))
            raise InvalidInput(f"label must be 0 or 1, got {str(lab[i])[:40]!r}", row=first_row + i, field="label")
        labels = (lab == "1").astype(np.int8)
        table = table[:, 1:]
    return labels, table[:, :num_dense], table[:, num_dense:]


def raw_tsv(data: bytes | bytearray | memoryview | str, encoder: FeatureEncoder, max_rows: int = MAX_ROWS) -> RawBatch:
    """Criteo TSV (bytes or text) -> validated raw rows (labels ignored).

    Regular bodies (ASCII, ``\n`` line ends, integer dense values, one
    field count) are decoded straight from the bytes; any other body takes
    the per-line path, which gives the same answers and names what is wrong.
    """
    raw = data.encode("utf-8") if isinstance(data, str) else data
    fast = _fast_tsv(np.frombuffer(raw, dtype=np.uint8), encoder, max_rows)
    if fast is not None:
        return fast
    text = _text(data)
    lines = [ln for ln in text.split("\n") if ln.strip("\r")]
    if not lines:
        raise InvalidInput("the body is empty: send one Criteo line per row")
    _check_count(len(lines), max_rows)
    _, dense, sparse = split_tsv(lines, encoder.num_dense, encoder.num_sparse)
    return encoder.raw_columns(dense, sparse)


_TAB, _NL = 9, 10


def _fast_tsv(buf: np.ndarray, encoder: FeatureEncoder, max_rows: int) -> RawBatch | None:
    """The vectorised TSV path; None when the body is not of the regular shape."""
    n = buf.shape[0]
    if n and buf[-1] == _NL:
        n -= 1
        buf = buf[:n]
    if n == 0 or buf[0] == _NL or buf.max() >= 128 or (buf == 13).any():
        return None
    nd, ns = encoder.num_dense, encoder.num_sparse
    is_nl = buf == _NL
    is_sep = is_nl | (buf == _TAB)
    b = int(np.count_nonzero(is_nl)) + 1
    fields = int(np.count_nonzero(is_sep)) + 1
    width = fields // b
    # Counted before the separators are listed: their positions then take at
    # most max_rows x (width) entries, whatever the body holds.
    if b > max_rows or width not in (nd + ns, nd + ns + 1) or width * b != fields:
        return None  # the per-line path words the problem
    seps = np.flatnonzero(is_sep)
    # Every line must end exactly at every width-th separator.
    line_ends = seps[width - 1 :: width]
    if line_ends.shape[0] != b - 1 or not is_nl[line_ends].all():
        return None
    starts, ends = field_spans(seps, n)
    starts, ends = starts.reshape(b, width), ends.reshape(b, width)
    if width == nd + ns + 1:
        # Labels must be "0" or "1"; other values go to the per-line path for the message.
        lab = starts[:, 0]
        if ((ends[:, 0] - lab) != 1).any() or ((buf[lab] | 1) != 49).any():
            return None
        starts, ends = starts[:, 1:], ends[:, 1:]
    dense = int_fields(buf, starts[:, :nd].reshape(-1), ends[:, :nd].reshape(-1))
    if dense is None:
        return None
    s_starts = np.ascontiguousarray(starts[:, nd:]).reshape(-1)
    s_lengths = np.ascontiguousarray(ends[:, nd:]).reshape(-1) - s_starts
    ids, lengths = encoder.hash_text(buf, s_starts, s_lengths, b)
    return RawBatch(dense.reshape(b, nd), ids, lengths)


def decode_tsv(text: bytes | str, encoder: FeatureEncoder, max_rows: int = MAX_ROWS) -> FeatureBatch:
    """Criteo TSV -> model inputs (labels ignored)."""
    return encoder.finish(raw_tsv(text, encoder, max_rows))


# ----- binary -------------------------------------------------------------------
def encode_binary(raw: RawBatch) -> bytes:
    """A :class:`RawBatch` (e.g. from ``encoder.raw_columns``) as the binary format."""
    dense = np.ascontiguousarray(raw.dense, dtype="<f4")
    b, nd = dense.shape
    wide = raw.ids.size > 0 and int(raw.ids.max()) >= 2**31
    ids = np.ascontiguousarray(raw.ids, dtype="<i8" if wide else "<i4")
    flags = 2 if wide else 0
    parts = []
    if raw.lengths is not None:
        flags |= 1
        parts.append(np.ascontiguousarray(raw.lengths, dtype="<i4").tobytes())
        nf = raw.lengths.shape[0] // max(b, 1)
    else:
        nf = ids.shape[0] // max(b, 1)
    header = _HEADER.pack(MAGIC, VERSION, flags, 0, b, nd, nf, ids.shape[0], 0)
    return b"".join([header, dense.tobytes(), *parts, ids.tobytes()])


def raw_binary(data: bytes | bytearray | memoryview, encoder: FeatureEncoder, max_rows: int = MAX_ROWS) -> RawBatch:
    buf = memoryview(data)
    if len(buf) < _HEADER.size:
        raise InvalidInput(f"binary body of {len(buf)} bytes is shorter than the {_HEADER.size}-byte header")
    magic, version, flags, _, b, nd, nf, n, _ = _HEADER.unpack_from(buf, 0)
    if magic != MAGIC:
        raise InvalidInput(f"binary body does not start with the magic {MAGIC!r}")
    if version != VERSION:
        raise InvalidInput(f"binary format version {version} is not supported (this server reads {VERSION})")
    if flags & ~3:
        raise InvalidInput(f"binary header has unknown flags {flags:#x}")
    id_size = 8 if flags & 2 else 4
    if nd != encoder.num_dense or nf != encoder.num_sparse:
        raise InvalidInput(
            f"binary header says {nd} dense and {nf} categorical features; "
            f"this model has {encoder.num_dense} and {encoder.num_sparse}"
        )
    _check_count(b, max_rows)
    has_lengths = bool(flags & 1)
    if not has_lengths and n != b * nf:
        raise InvalidInput(f"binary header says {n} ids, but {b} rows x {nf} features need {b * nf}")
    expected = _HEADER.size + 4 * b * nd + (4 * b * nf if has_lengths else 0) + id_size * n
    if len(buf) != expected:
        raise InvalidInput(f"binary body has {len(buf)} bytes; its header implies {expected}")
    pos = _HEADER.size
    dense = np.frombuffer(buf, dtype="<f4", count=b * nd, offset=pos).reshape(b, nd)
    pos += 4 * b * nd
    lengths = None
    if has_lengths:
        lengths = np.frombuffer(buf, dtype="<i4", count=b * nf, offset=pos)
        pos += 4 * b * nf
    ids = np.frombuffer(buf, dtype="<i8" if id_size == 8 else "<i4", count=n, offset=pos)
    return encoder.raw_arrays(dense, ids, lengths)


def decode_binary(data: bytes | bytearray | memoryview, encoder: FeatureEncoder, max_rows: int = MAX_ROWS) -> FeatureBatch:
    """The binary format -> model inputs."""
    return encoder.finish(raw_binary(data, encoder, max_rows))


# ----- dispatch -----------------------------------------------------------------
def sniff(data: bytes | bytearray) -> str:
    """The format of a body that came without a content type: json, binary or tsv."""
    if bytes(data[:4]) == MAGIC:
        return "binary"
    head = bytes(data[:64]).lstrip()
    if head[:1] in (b"{", b"["):
        return "json"
    return "tsv"


def _text(data: bytes | bytearray | str) -> str:
    if isinstance(data, str):
        return data
    try:
        return bytes(data).decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidInput(f"the body is not valid UTF-8 text (bad byte at offset {e.start})") from None


def decode_request(
    body: Any, content_type: str | None, encoder: FeatureEncoder, max_rows: int = MAX_ROWS
) -> FeatureBatch:
    """One request body, as TorchServe hands it over, -> model inputs.

    ``body`` is a decoded JSON value (dict/list), ``str`` or bytes.
    ``content_type`` may be ``None`` (gRPC), in which case bytes are sniffed.
    """
    ctype = (content_type or "").split(";")[0].strip().lower()
    if isinstance(body, (dict, list)):
        return decode_json(body, encoder, max_rows)
    if body is None or (isinstance(body, (bytes, bytearray, str)) and len(body) == 0):
        raise InvalidInput("the body is empty: send JSON, Criteo TSV lines or the binary format")
    if not isinstance(body, (bytes, bytearray, str, memoryview)):
        raise InvalidInput(f"unsupported body of type {type(body).__name__}")
    if ctype in ("", "application/x-www-form-urlencoded"):
        kind = sniff(body.encode() if isinstance(body, str) else body)
    elif ctype == JSON_CONTENT_TYPE or ctype.endswith("+json"):
        kind = "json"
    elif ctype in _TEXT_TYPES:
        kind = "tsv"
    elif ctype in _BINARY_TYPES:
        kind = "binary"
    else:
        raise InvalidInput(
            f"unsupported content type {ctype!r}; send application/json, "
            f"text/tab-separated-values (or text/plain) or {BINARY_CONTENT_TYPE}"
        )
    if kind == "binary":
        if isinstance(body, str):
            raise InvalidInput("a binary body arrived as text; send it as application/x-dlrm bytes")
        return decode_binary(body, encoder, max_rows)
    if kind == "json":
        if not isinstance(body, str):
            fast = fast_json(body, encoder, max_rows)
            if fast is not None:
                return encoder.finish(fast)
        return decode_json(_parse_json(body), encoder, max_rows)
    return decode_tsv(body, encoder, max_rows)


def fast_request(body: Any, content_type: str | None, encoder: FeatureEncoder, max_rows: int = MAX_ROWS) -> FeatureBatch | None:
    """Model inputs of a positional JSON body given as bytes (:func:`fast_json`), or None.

    None means: decode it some other way (it may be another format, named
    fields, an Open Inference Protocol body, or bad input to be worded).
    """
    if not isinstance(body, (bytes, bytearray)) or not body:
        return None
    ctype = (content_type or "").split(";")[0].strip().lower()
    if ctype not in ("", "application/x-www-form-urlencoded", JSON_CONTENT_TYPE) or body[:1] != b"{":
        return None
    raw = fast_json(body, encoder, max_rows)
    return None if raw is None else encoder.finish(raw)


def predictions_body(probabilities: np.ndarray) -> dict:
    """The JSON answer: ``{"predictions": [p, ...]}`` (float32 values, exact)."""
    return {"predictions": [float(p) for p in np.asarray(probabilities, dtype=np.float32)]}
