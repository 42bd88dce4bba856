"""Raw feature values -> model inputs.  One implementation for every route.

The trainer, the offline scorer, the TorchServe handler and the clients all
turn raw values into a :class:`FeatureBatch` through :class:`FeatureEncoder`.
numpy only, so clients do not need torch.

Raw values accepted per field:

- dense: a number, or ``None`` / missing (read as 0).  Booleans, strings,
  NaN, infinities and values outside float32 are errors.  Every route first
  casts the raw value to float32, then applies the config's transform, so a
  row gives bit-identical inputs whether it came as JSON, TSV or binary.
- categorical: a hex string (Criteo style, ``int(s, 16) % table_size``), a
  non-negative int that is already a row index (``0 <= id < table_size``),
  ``None`` / ``""`` / missing / ``[]`` (the empty bag, pooled to zeros), or a
  list of those (a multi-hot bag; a repeated id counts twice).

Errors raise :class:`~dlrm_serve.errors.InvalidInput` naming the instance,
the field and the reason.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from itertools import chain
from operator import itemgetter
from typing import Any, Sequence

import numpy as np

try:  # optional: re-encodes parsed JSON columns in C, so they can be read vectorised
    import orjson
except ImportError:  # pragma: no cover - orjson is pinned in requirements.txt
    orjson = None

from dlrm_serve.config import DLRMConfig
from dlrm_serve.errors import InvalidInput

__all__ = [
    "FeatureBatch",
    "RawBatch",
    "FeatureEncoder",
    "hash_hex",
    "hash_segments",
    "MAX_CATEGORICAL_CHARS",
    "MAX_NUMBER_CHARS",
    "MAX_BAG_IDS",
    "int_fields",
    "field_spans",
]

_F32_MAX = float(np.finfo(np.float32).max)

# Limits on values that are never legitimate.  They are checked before any
# array is built from the values, so memory stays bounded by the body.
# A Criteo categorical is 8 hex digits; 64 leaves room for longer hashes.
MAX_CATEGORICAL_CHARS = 64
# A dense value sent as text (Criteo TSV): a float32 needs far fewer characters.
MAX_NUMBER_CHARS = 64
# Ids in one multi-hot bag (one feature of one row).
MAX_BAG_IDS = 1024
_NONE = type(None)

# Hex digit value per byte; -1 is not a hex digit.
_HEX_LUT8 = np.full(256, -1, dtype=np.int8)
for _c in "0123456789abcdef":
    _HEX_LUT8[ord(_c)] = int(_c, 16)
    _HEX_LUT8[ord(_c.upper())] = int(_c, 16)


@dataclass
class FeatureBatch:
    """Model inputs for ``B`` rows and ``F`` tables.

    - ``dense``: float32 ``[B, num_dense]``, already transformed.
    - ``indices``: int64 ``[N]``, rows of the concatenated table (each table's
      local id plus its offset), bag by bag in row-major ``(b, f)`` order.
    - ``offsets``: int64 ``[B*F + 1]`` start of each bag, or ``None`` when every
      bag holds exactly one id (then ``N == B*F`` and the lookup is a plain
      gather, the fast path).
    """

    dense: np.ndarray
    indices: np.ndarray
    offsets: np.ndarray | None

    @property
    def batch_size(self) -> int:
        return int(self.dense.shape[0])

    def __len__(self) -> int:
        return self.batch_size

    def bag_offsets(self, num_tables: int) -> np.ndarray:
        """``offsets``, materialised also for the one-id-per-bag case."""
        if self.offsets is not None:
            return self.offsets
        return np.arange(self.batch_size * num_tables + 1, dtype=np.int64)

    def bag_ids(self, num_tables: int) -> np.ndarray:
        """int64 ``[N]``: the bag ``b*F + f`` each id belongs to."""
        if self.offsets is None:
            return np.arange(self.indices.shape[0], dtype=np.int64)
        lengths = np.diff(self.offsets)
        return np.repeat(np.arange(lengths.shape[0], dtype=np.int64), lengths)

    def slice(self, start: int, stop: int, num_tables: int) -> "FeatureBatch":
        """Rows ``start:stop`` as their own batch."""
        if self.offsets is None:
            return FeatureBatch(
                self.dense[start:stop], self.indices[start * num_tables : stop * num_tables], None
            )
        lo, hi = self.offsets[start * num_tables], self.offsets[stop * num_tables]
        offsets = self.offsets[start * num_tables : stop * num_tables + 1] - lo
        return FeatureBatch(self.dense[start:stop], self.indices[lo:hi], offsets)

    @staticmethod
    def concat(batches: Sequence["FeatureBatch"], num_tables: int) -> "FeatureBatch":
        """One batch holding the rows of ``batches`` in order."""
        if not batches:
            raise ValueError("concat needs at least one FeatureBatch")
        if len(batches) == 1:
            return batches[0]
        dense = np.concatenate([b.dense for b in batches])
        indices = np.concatenate([b.indices for b in batches])
        if all(b.offsets is None for b in batches):
            return FeatureBatch(dense, indices, None)
        parts, base = [np.zeros(1, dtype=np.int64)], 0
        for b in batches:
            off = b.bag_offsets(num_tables)
            parts.append(off[1:] + base)
            base += int(off[-1])
        return FeatureBatch(dense, indices, np.concatenate(parts))


@dataclass
class RawBatch:
    """Validated raw inputs, before the dense transform: what the binary format carries.

    - ``dense``: float32 ``[B, num_dense]`` raw values, NaN = missing.
    - ``ids``: int64 ``[N]`` local row ids (per table), bag by bag.
    - ``lengths``: int64 ``[B*F]`` ids per bag, or ``None`` for one id per bag.
    """

    dense: np.ndarray
    ids: np.ndarray
    lengths: np.ndarray | None

    @property
    def batch_size(self) -> int:
        return int(self.dense.shape[0])


def hash_segments(buf: np.ndarray, starts: np.ndarray, lengths: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """``int(text, 16) % size`` for ``M`` hex strings that are slices of one byte buffer.

    ``buf``: uint8 ``[C]``; ``starts``, ``lengths``: int64 ``[M]`` (each
    length >= 1); ``sizes``: int64 ``[M]``.  Returns int64 ``[M]``.  Work and
    memory are linear in the number of strings and their bytes: strings of up
    to 15 digits are read as one or two 64-bit words each and converted eight
    digits at a time, never padded to the longest one.  Raises
    :class:`_HexError` with the index of the first string that is not plain hex.
    """
    m = starts.shape[0]
    out = np.empty(m, dtype=np.int64)
    if m == 0:
        return out
    # 16 bytes in front, so the word ending at any string's end can be read.
    padded = np.empty(buf.shape[0] + 16, dtype=np.uint8)
    padded[:16] = 0x30
    padded[16:] = buf
    words = np.ndarray((padded.shape[0] - 7,), dtype="<u8", buffer=padded, strides=(1,))
    first_bad = m
    lmin, lmax = int(lengths.min()), int(lengths.max())
    groups = [lmin] if lmin == lmax else np.unique(lengths).tolist()
    for width in groups:
        idx = None if lmin == lmax else np.flatnonzero(lengths == width)
        st = starts if idx is None else starts[idx]
        if width > 15:
            # Beyond int64: Python ints, for a few rare long strings.
            for k, s0 in enumerate(st.tolist()):
                text = bytes(buf[s0 : s0 + width])
                j = k if idx is None else int(idx[k])
                if _HEX_LUT8[np.frombuffer(text, np.uint8)].min() < 0:
                    first_bad = min(first_bad, j)
                    continue
                out[j] = int(text, 16) % int(sizes[j])
            continue
        end = st + (16 + width)  # in padded coordinates
        values, ok = _hex_word(words[end - 8], min(width, 8))
        if width > 8:
            high, ok_high = _hex_word(words[end - 16], width - 8)
            values |= high << np.uint64(32)
            ok &= ok_high
        if not ok.all():
            k = int(np.argmin(ok))
            first_bad = min(first_bad, k if idx is None else int(idx[k]))
            continue
        values = values.view(np.int64)
        if idx is None:
            np.remainder(values, sizes, out=out)
        else:
            out[idx] = values % sizes[idx]
    if first_bad < m:
        raise _HexError(first_bad, "")
    return out


_U = np.uint64
_LOW_NIBBLES, _ONES = _U(0x0F0F0F0F0F0F0F0F), _U(0x0101010101010101)


def _hex_word(x: np.ndarray, digits: int) -> tuple[np.ndarray, np.ndarray]:
    """Eight ASCII characters per little-endian uint64 (the last ``digits`` of them hex) -> values.

    Returns (uint64 values < 2**32, bool ok).  The leading ``8 - digits``
    bytes belong to other text and read as '0'.  Each byte becomes its digit
    (``c & 15``, plus 9 for letters), is checked by re-encoding it, and the
    eight digits are folded pairwise into one number (SWAR: no per-byte loop).
    """
    if digits < 8:
        keep = ~_U((1 << (8 * (8 - digits))) - 1)
        x = (x & keep) | (_U(0x3030303030303030) & ~keep)
    v = (x & _LOW_NIBBLES) + ((x >> _U(6)) & _ONES) * _U(9)
    letter = ((v + _U(0x0606060606060606)) >> _U(4)) & _ONES  # digit >= 10
    canonical = v + _U(0x3030303030303030) + letter * _U(0x27)  # '0'..'9', 'a'..'f'
    ok = ((v & ~_LOW_NIBBLES) == 0) & ((x | (letter * _U(0x20))) == canonical)
    # First character is the most significant digit: fold byte pairs, then 16- and 32-bit lanes.
    v = ((v & _U(0x000F000F000F000F)) << _U(4)) | ((v >> _U(8)) & _U(0x000F000F000F000F))
    v = ((v & _U(0x000000FF000000FF)) << _U(8)) | ((v >> _U(16)) & _U(0x000000FF000000FF))
    v = ((v & _U(0xFFFF)) << _U(16)) | (v >> _U(32))
    return v, ok


def field_spans(seps: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Start and end (exclusive) of the ``len(seps) + 1`` fields of a buffer of ``size`` bytes split at ``seps``."""
    starts = np.empty(seps.shape[0] + 1, dtype=np.int64)
    starts[0] = 0
    starts[1:] = seps + 1
    ends = np.empty(seps.shape[0] + 1, dtype=np.int64)
    ends[:-1] = seps
    ends[-1] = size
    return starts, ends


def _join(strings: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Strings as one ASCII buffer plus start and length of each; None if not all ASCII str.

    The strings are joined with NUL separators, so the lengths come from a
    vectorised search; a string that itself holds a NUL is not hex anyway
    and sends the caller to the per-string path.
    """
    try:
        joined = "\0".join(strings).encode("ascii")
    except (TypeError, UnicodeEncodeError):
        return None
    buf = np.frombuffer(joined, dtype=np.uint8)
    seps = np.flatnonzero(buf == 0)
    m = len(strings)
    if seps.shape[0] != m - 1:
        lengths = np.fromiter(map(len, strings), dtype=np.int64, count=m)
        starts = np.zeros(m, dtype=np.int64)
        np.cumsum(lengths[:-1] + 1, out=starts[1:])
        return buf, starts, lengths
    starts, ends = field_spans(seps, buf.shape[0])
    return buf, starts, ends - starts


def hash_hex(values: Sequence[str] | np.ndarray, sizes: Any) -> np.ndarray:
    """``int(v, 16) % size`` for a sequence of non-empty hex strings, vectorised.

    ``values``: ``[M]`` strings (a list, or a str/object array); ``sizes``:
    int64 ``[M]`` (or a scalar).  Returns int64 ``[M]``.  Raises
    ``ValueError`` with the position of the first string that is not plain
    hex (no sign, prefix, underscore or space, which ``int()`` would accept).
    """
    strings = [str(v) for v in values] if isinstance(values, np.ndarray) else list(values)
    m = len(strings)
    sizes = np.broadcast_to(np.asarray(sizes, dtype=np.int64), (m,))
    if m == 0:
        return np.zeros(0, dtype=np.int64)
    joined = _join(strings)
    if joined is None:
        first = next(i for i, v in enumerate(strings) if not v.isascii())
        raise _HexError(first, strings[first])
    buf, starts, lengths = joined
    if (lengths == 0).any():
        first = int(np.argmax(lengths == 0))
        raise _HexError(first, strings[first])
    try:
        return hash_segments(buf, starts, lengths, sizes)
    except _HexError as e:
        raise _HexError(e.position, strings[e.position]) from None


class _HexError(ValueError):
    def __init__(self, position: int, value: str):
        super().__init__(value)
        self.position = position
        self.value = value


def _hex_message(value: str) -> str:
    shown = value if len(value) <= 40 else value[:37] + "..."
    return (
        f"{shown!r} is not a hex string (categorical strings are Criteo hex "
        f"values like '68fd1e64'; use an int for a row index, null for missing)"
    )


_MINUS, _ZERO, _COMMA, _QUOTE, _N = 45, 48, 44, 34, 110
_DENSE, _SPARSE = itemgetter("dense"), itemgetter("sparse")


def int_fields(buf: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray | None:
    """Integer text fields of one byte buffer (``-?[0-9]{1,16}``; empty = NaN) -> float32.

    Returns None when any field holds other text (the caller's per-value
    path then parses or names it).  Each field is read as two 64-bit words
    and converted eight digits at a time, so the work does not grow with
    the longest field.
    """
    m = starts.shape[0]
    out = np.full(m, np.nan, dtype=np.float32)
    if m == 0:
        return out
    lengths = ends - starts
    if int(lengths.max()) > 17:
        return None
    neg = (buf[np.minimum(starts, buf.shape[0] - 1)] == _MINUS) & (lengths > 1)
    digits = lengths - neg
    if int(digits.max()) > 16:
        return None
    # 16 bytes in front, so the words ending at any field's end can be read.
    padded = np.empty(buf.shape[0] + 16, dtype=np.uint8)
    padded[:16] = _ZERO
    padded[16:] = buf
    words = np.ndarray((padded.shape[0] - 7,), dtype="<u8", buffer=padded, strides=(1,))
    end = ends + 16
    value, ok = _decimal_word(words[end - 8], np.minimum(digits, 8))
    if not ok.all():
        return None
    if int(digits.max()) > 8:
        high, ok = _decimal_word(words[end - 16], np.maximum(digits - 8, 0))
        if not ok.all():
            return None
        value += high * _U(100_000_000)
    value = value.view(np.int64)
    np.negative(value, out=value, where=neg)
    present = lengths > 0
    out[present] = value[present].astype(np.float64)
    return out


def _decimal_word(x: np.ndarray, digits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eight ASCII characters per little-endian uint64, the last ``digits[i]`` of them decimal -> values.

    The leading bytes belong to other text and read as '0'.  Returns
    (uint64 values < 10**8, bool ok).  SWAR: bytes are checked together,
    then folded into 2-, 4- and 8-digit lanes by multiply-and-shift.
    """
    other = (8 - digits).astype(np.uint64) * _U(8)  # bits of leading non-digit text
    mask = np.where(digits == 0, _U(0), ~((_U(1) << other) - _U(1)))
    x = (x & mask) | (_U(0x3030303030303030) & ~mask)
    ok = ((x & _U(0xF0F0F0F0F0F0F0F0)) == _U(0x3030303030303030)) & (
        ((x + _U(0x0606060606060606)) & _U(0xF0F0F0F0F0F0F0F0)) == _U(0x3030303030303030)
    )
    x = x - _U(0x3030303030303030)
    x = (x * _U(10) + (x >> _U(8))) & _U(0x00FF00FF00FF00FF)
    x = (x * _U(100) + (x >> _U(16))) & _U(0x0000FFFF0000FFFF)
    x = (x * _U(10000) + (x >> _U(32))) & _U(0xFFFFFFFF)
    return x, ok


def _json_fields(values: list) -> tuple[bytes, np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """JSON scalars re-encoded by orjson -> (text, buffer, starts, ends, first byte), one field per value.

    Inside the outer brackets the text is one comma-separated list.  A
    comma inside a value changes the count (None is returned, as for
    anything orjson cannot encode); a nested list, object or escaped text
    shows in the fields themselves, which the callers check.
    orjson writes None (and NaN or infinity) as ``null``: a field whose
    first byte is ``n``.
    """
    try:
        text = orjson.dumps(values)
    except TypeError:  # ints beyond 64 bits, and non-JSON objects
        return None
    m = len(values)
    buf = np.frombuffer(text, dtype=np.uint8)[1:-1]
    commas = np.flatnonzero(buf == _COMMA)
    if commas.shape[0] != m - 1:
        return None
    starts, ends = field_spans(commas, buf.shape[0])
    return text, buf, starts, ends, buf[np.minimum(starts, buf.shape[0] - 1)]


def _getter(names: Sequence[str]):
    """A C-level getter of ``names`` that always returns a tuple."""
    get = itemgetter(*names)
    return get if len(names) > 1 else (lambda d: (get(d),))


def _is_text(arr: np.ndarray) -> bool:
    """An object array that holds only str (text columns, e.g. from :func:`codecs.split_tsv`)."""
    return arr.dtype == object and set(map(type, arr.reshape(-1).tolist())) <= {str}


def _fast_dense(rows: list) -> np.ndarray | None:
    """Rows of raw dense values (numbers or None) -> float32 ``[B, num_dense]``, None -> NaN.

    Returns None when any value needs the per-value path: booleans,
    strings, NaN, infinities and values beyond float32, which it names.
    """
    if orjson is not None:
        flat = list(chain.from_iterable(rows))
        fields = _json_fields(flat)
        if fields is not None:
            _, buf, starts, ends, first = fields
            is_null = first == _N
            out = int_fields(buf, starts, np.where(is_null, starts, ends))
            # Every null must be a None: orjson also writes NaN and infinity as null.
            if out is not None and int(is_null.sum()) == flat.count(None):
                return out.reshape(len(rows), -1)
    kinds = set(map(type, chain.from_iterable(rows)))
    if not kinds <= {int, float, _NONE}:
        return None
    try:
        arr = np.array(rows, dtype=np.float64)
    except (OverflowError, TypeError, ValueError):
        return None
    if float in kinds:
        # A NaN that was sent (Python's json reads NaN) is an error; None is missing.
        nones = sum(r.count(None) for r in rows) if _NONE in kinds else 0
        if int(np.count_nonzero(np.isnan(arr))) != nones:
            return None
    with np.errstate(invalid="ignore"):
        if (np.abs(arr) > _F32_MAX).any():
            return None
    return arr.astype(np.float32)


def _type_name(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, dict):
        return "object"
    if isinstance(v, (list, tuple)):
        return "list"
    if isinstance(v, str):
        return "string"
    if isinstance(v, float):
        return "float"
    return type(v).__name__


class FeatureEncoder:
    """Validates, transforms and hashes raw values for one :class:`DLRMConfig`."""

    def __init__(self, config: DLRMConfig):
        self.config = config
        self.dense_names = config.dense_names
        self.sparse_names = config.sparse_names
        self.num_dense = config.num_dense
        self.num_sparse = config.num_sparse
        self.table_sizes = np.asarray(config.table_sizes, dtype=np.int64)
        self.table_offsets = np.asarray(config.table_offsets, dtype=np.int64)
        self.transform = config.dense_transform
        self._dense_index = {n: i for i, n in enumerate(self.dense_names)}
        self._sparse_index = {n: i for i, n in enumerate(self.sparse_names)}
        self._template = dict.fromkeys(self.dense_names + self.sparse_names)
        self._get_dense = _getter(self.dense_names)
        self._get_sparse = _getter(self.sparse_names)

    # ----- the public routes ---------------------------------------------------
    def encode_instances(self, instances: Sequence[Any]) -> FeatureBatch:
        """JSON-style instances: ``{"dense": [...], "sparse": [...]}`` or by name."""
        return self.finish(self.raw_instances(instances))

    def encode_columns(self, dense: Any, sparse: Any) -> FeatureBatch:
        """Columns of raw values (see :meth:`raw_columns`) -> model inputs."""
        return self.finish(self.raw_columns(dense, sparse))

    def raw_instances(self, instances: Sequence[Any]) -> "RawBatch":
        """JSON-style instances, validated and hashed but not transformed.

        Instances of the common shapes (all positional or all by name, plain
        numbers and hex strings or int ids) take a vectorised path; anything
        else, and every error, goes through the per-value path, which names
        the instance and field.
        """
        fast = self._fast_instances(instances)
        if fast is not None:
            return fast
        dense_rows: list[list[Any]] = []
        sparse_rows: list[list[Any]] = []
        for row, inst in enumerate(instances):
            d, s = self._split_instance(inst, row)
            dense_rows.append(d)
            sparse_rows.append(s)
        return self.raw_columns(dense_rows, sparse_rows)

    def _fast_instances(self, instances: Sequence[Any]) -> "RawBatch | None":
        """The vectorised path of :meth:`raw_instances`; None when it does not apply."""
        b = len(instances)
        if b == 0 or set(map(type, instances)) != {dict}:
            return None
        first = instances[0]
        if "dense" in first:
            if set(map(len, instances)) != {2}:
                return None
            try:
                dense_rows = list(map(_DENSE, instances))
                sparse_rows = list(map(_SPARSE, instances))
            except KeyError:
                return None
            nd, ns = self.num_dense, self.num_sparse
            if set(map(type, dense_rows)) != {list} or set(map(type, sparse_rows)) != {list}:
                return None
            if set(map(len, dense_rows)) != {nd} or set(map(len, sparse_rows)) != {ns}:
                return None
        else:
            width = self.num_dense + self.num_sparse
            lengths = set(map(len, instances))
            if 0 in lengths:
                return None  # an empty instance: the per-value path words it
            if lengths != {width}:
                # Missing fields read as None: merge each instance over a template of
                # all names; an unknown name then shows as one key too many.
                template = self._template
                instances = [{**template, **i} for i in instances]
                if set(map(len, instances)) != {width}:
                    return None
            try:
                dense_rows = list(map(self._get_dense, instances))
                sparse_rows = list(map(self._get_sparse, instances))
            except KeyError:
                return None
        dense = _fast_dense(dense_rows)
        if dense is None:
            return None
        strings = self._json_strings(sparse_rows, b) if orjson is not None else None
        if strings is not None:
            return RawBatch(dense, *strings)
        flat = list(chain.from_iterable(sparse_rows))
        # Hex strings (null = missing) are the common case: try them first; join
        # refuses anything that is not a str.
        joined = _join(flat)
        if joined is None and None in flat:
            flat = ["" if v is None else v for v in flat]
            joined = _join(flat)
        if joined is not None:
            local, lengths = self.hash_text(*joined, b, flat.__getitem__)
        elif set(map(type, flat)) == {int}:
            try:
                local = np.array(flat, dtype=np.int64)
            except OverflowError:
                return None
            self._check_range(local, None, b)
            lengths = None
        else:
            return None
        return RawBatch(dense, local, lengths)

    def _json_strings(self, rows: list, b: int) -> tuple[np.ndarray, np.ndarray | None] | None:
        """Rows of hex strings or None, read from orjson's encoding; None for any other values."""
        flat = list(chain.from_iterable(rows))
        fields = _json_fields(flat)
        if fields is None:
            return None
        text, buf, starts, ends, first = fields
        # Each value is null or a quoted string; a quote inside a value breaks the count.
        is_null = first == _N
        quoted = (first == _QUOTE) & (buf[ends - 1] == _QUOTE)
        if not (is_null | quoted).all() or text.count(b'"') != 2 * (len(flat) - int(is_null.sum())):
            return None
        lengths = np.where(is_null, 0, ends - starts - 2)
        return self.hash_text(buf, starts + 1, lengths, b, flat.__getitem__)

    def _hash_cells(self, flat: list[str], b: int) -> tuple[np.ndarray, np.ndarray | None]:
        """``B*F`` categorical strings, ``""`` = missing -> local ids and bag lengths."""
        joined = _join(flat)
        if joined is None:
            first = next(i for i, v in enumerate(flat) if not v.isascii())
            raise self._cell_error(first, _hex_message(flat[first]))
        return self.hash_text(*joined, b, flat.__getitem__)

    def hash_text(
        self, buf: np.ndarray, starts: np.ndarray, lengths: np.ndarray, b: int, text_of=None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """``B*F`` categorical cells given as slices of one byte buffer -> ids and bag lengths.

        A cell of length 0 is missing (an empty bag).  ``text_of(cell)``
        gives a cell's text for error messages (default: decoded from ``buf``).
        """
        if text_of is None:
            text_of = lambda k: bytes(buf[starts[k] : starts[k] + lengths[k]]).decode("utf-8", "replace")  # noqa: E731
        self._check_lengths(lengths, None)
        present = lengths > 0
        all_present = bool(present.all())
        cells = np.arange(lengths.shape[0], dtype=np.int64) if all_present else np.flatnonzero(present)
        sizes = np.tile(self.table_sizes, b) if all_present else self.table_sizes[cells % self.num_sparse]
        try:
            if all_present:
                ids = hash_segments(buf, starts, lengths, sizes)
            else:
                ids = hash_segments(buf, starts[cells], lengths[cells], sizes)
        except _HexError as e:
            cell = int(cells[e.position])
            raise self._cell_error(cell, _hex_message(text_of(cell))) from None
        return ids, (None if all_present else present.astype(np.int64))

    def raw_columns(self, dense: Any, sparse: Any) -> "RawBatch":
        """Columns of raw values, validated and hashed but not transformed.

        ``dense``: ``[B, num_dense]`` numbers/None (a float array may use NaN
        for missing).  ``sparse``: ``[B, num_sparse]`` raw categorical values;
        a str array (``""`` = missing) or an int array of row ids
        (negative = missing) takes the vectorised path.
        """
        dense_f32 = self._dense_raw(dense)
        b = dense_f32.shape[0]
        if isinstance(sparse, np.ndarray) and (sparse.dtype.kind in "US" or _is_text(sparse)):
            local, lengths = self._sparse_strings(sparse, b)
        elif isinstance(sparse, np.ndarray) and sparse.dtype.kind in "iu":
            local, lengths = self._sparse_int_array(sparse, b)
        else:
            local, lengths = self._sparse_objects(sparse, b)
        return RawBatch(dense_f32, local, lengths)

    def encode_arrays(
        self, dense: np.ndarray, ids: np.ndarray, lengths: np.ndarray | None = None
    ) -> FeatureBatch:
        """Already-hashed inputs (the binary format) -> model inputs."""
        return self.finish(self.raw_arrays(dense, ids, lengths))

    def raw_arrays(
        self, dense: np.ndarray, ids: np.ndarray, lengths: np.ndarray | None = None
    ) -> "RawBatch":
        """Already-hashed inputs (the binary format), validated.

        ``dense``: float ``[B, num_dense]`` raw values, NaN = missing.
        ``ids``: int ``[N]`` local row ids, bag by bag.  ``lengths``: int
        ``[B*F]`` ids per bag, or ``None`` for exactly one id per bag.
        """
        dense_f32 = self._dense_raw(np.asarray(dense))
        b = dense_f32.shape[0]
        ids = np.asarray(ids).astype(np.int64, copy=False).reshape(-1)
        if lengths is None:
            if ids.shape[0] != b * self.num_sparse:
                raise InvalidInput(
                    f"expected {b * self.num_sparse} ids ({b} rows x {self.num_sparse} "
                    f"categorical features), got {ids.shape[0]}"
                )
        else:
            lengths = np.asarray(lengths).astype(np.int64, copy=False).reshape(-1)
            if lengths.shape[0] != b * self.num_sparse:
                raise InvalidInput(
                    f"expected {b * self.num_sparse} bag lengths, got {lengths.shape[0]}"
                )
            if (lengths < 0).any():
                cell = int(np.argmax(lengths < 0))
                raise self._cell_error(cell, "bag length is negative")
            if (lengths > MAX_BAG_IDS).any():
                cell = int(np.argmax(lengths > MAX_BAG_IDS))
                raise self._cell_error(cell, self._bag_message(int(lengths[cell])))
            if int(lengths.sum()) != ids.shape[0]:
                raise InvalidInput(
                    f"bag lengths add up to {int(lengths.sum())} but {ids.shape[0]} ids were sent"
                )
        self._check_range(ids, lengths, b)
        if lengths is not None and (lengths == 1).all():
            lengths = None
        return RawBatch(dense_f32, ids, lengths)

    # ----- instance parsing --------------------------------------------------
    def _split_instance(self, inst: Any, row: int) -> tuple[list[Any], list[Any]]:
        if not isinstance(inst, dict):
            raise InvalidInput(
                f"an instance must be a JSON object, got {_type_name(inst)}", row=row
            )
        if not inst:
            raise InvalidInput(
                "empty instance: send {\"dense\": [...], \"sparse\": [...]} or fields by name "
                f"({self.dense_names[0]}, ..., {self.sparse_names[-1]})",
                row=row,
            )
        if "dense" in inst or "sparse" in inst:
            extra = sorted(set(inst) - {"dense", "sparse"})
            if extra:
                raise InvalidInput(
                    f"unexpected keys {extra} next to 'dense'/'sparse' (use either the two "
                    "lists or fields by name, not both)",
                    row=row,
                )
            dense = self._positional(inst, "dense", self.num_dense, row)
            sparse = self._positional(inst, "sparse", self.num_sparse, row)
            return dense, sparse
        unknown = [k for k in inst if k not in self._dense_index and k not in self._sparse_index]
        if unknown:
            raise InvalidInput(
                f"unknown feature name {unknown[0]!r}; known names are "
                f"{self.dense_names[0]}..{self.dense_names[-1]} and "
                f"{self.sparse_names[0]}..{self.sparse_names[-1]}",
                row=row,
            )
        dense = [inst.get(n) for n in self.dense_names]
        sparse = [inst.get(n) for n in self.sparse_names]
        return dense, sparse

    @staticmethod
    def _positional(inst: dict, key: str, width: int, row: int) -> list[Any]:
        if key not in inst:
            raise InvalidInput(f"missing '{key}' (a list of {width} values)", row=row, field=key)
        values = inst[key]
        if not isinstance(values, list):
            raise InvalidInput(
                f"must be a list of {width} values, got {_type_name(values)}", row=row, field=key
            )
        if len(values) != width:
            raise InvalidInput(
                f"expected {width} values, got {len(values)}", row=row, field=key
            )
        return values

    # ----- dense ---------------------------------------------------------------
    def _dense_raw(self, dense: Any) -> np.ndarray:
        """Raw dense values as float32 ``[B, num_dense]``, NaN = missing."""
        if isinstance(dense, np.ndarray) and dense.dtype.kind == "f":
            with np.errstate(over="ignore"):
                arr = dense.astype(np.float32, copy=False)
            if arr.ndim != 2 or arr.shape[1] != self.num_dense:
                raise InvalidInput(
                    f"dense array must have shape [B, {self.num_dense}], got {list(arr.shape)}"
                )
            with np.errstate(over="ignore", invalid="ignore"):
                bad = np.isinf(dense) | (np.abs(dense) > _F32_MAX)
            if bad.any():
                cell = int(np.argmax(bad.reshape(-1)))
                raise self._dense_error(cell, dense.reshape(-1)[cell])
            return arr
        if isinstance(dense, np.ndarray) and (dense.dtype.kind in "US" or _is_text(dense)):
            return self._dense_strings(dense)
        rows = list(dense)
        b = len(rows)
        out = np.empty((b, self.num_dense), dtype=np.float32)
        flat = out.reshape(-1)
        k = 0
        for r, values in enumerate(rows):
            if len(values) != self.num_dense:
                raise InvalidInput(
                    f"expected {self.num_dense} dense values, got {len(values)}", row=r, field="dense"
                )
            for c, v in enumerate(values):
                flat[k] = self._dense_value(v, r, c)
                k += 1
        return out

    def _dense_value(self, v: Any, row: int, col: int) -> float:
        if v is None:
            return np.nan
        t = type(v)
        if t is int or t is float or (isinstance(v, (int, float)) and not isinstance(v, bool)):
            try:
                x = float(v)
            except OverflowError:
                raise InvalidInput(
                    "number is too large for float32", row=row, field=self.dense_names[col]
                ) from None
            if x != x or x in (float("inf"), float("-inf")):
                raise InvalidInput(
                    f"{v!r} is not a finite number", row=row, field=self.dense_names[col]
                )
            if abs(x) > _F32_MAX:
                raise InvalidInput(
                    f"{v!r} is too large for float32", row=row, field=self.dense_names[col]
                )
            return x
        raise InvalidInput(
            f"dense values must be numbers or null, got {_type_name(v)} {v!r}"[:200],
            row=row,
            field=self.dense_names[col],
        )

    def _dense_strings(self, dense: np.ndarray) -> np.ndarray:
        """Dense columns as text (Criteo TSV), ``[B, num_dense]``: ``""`` is missing."""
        if dense.ndim != 2 or dense.shape[1] != self.num_dense:
            raise InvalidInput(f"dense text must have shape [B, {self.num_dense}], got {list(dense.shape)}")
        texts = [str(v) for v in dense.reshape(-1).tolist()]
        joined = _join(texts)
        if joined is not None:
            buf, starts, lengths = joined
            values = int_fields(buf, starts, starts + lengths)
            if values is not None:
                return values.reshape(dense.shape)
        # Decimals, exponents or bad text: field by field (names the bad one).
        return self.parse_numbers(texts).reshape(dense.shape)

    def parse_numbers(self, texts: list[str], first_cell: int = 0) -> np.ndarray:
        """Dense values as text, cell by cell in row-major order -> float32 ``[len]``, NaN = missing.

        ``first_cell`` is the row-major cell index of ``texts[0]`` (for messages).
        """
        out = np.empty(len(texts), dtype=np.float32)
        for k, text in enumerate(texts):
            if text == "":
                out[k] = np.nan
                continue
            if len(text) > MAX_NUMBER_CHARS:
                row, col = divmod(first_cell + k, self.num_dense)
                raise InvalidInput(
                    f"a number of {len(text)} characters is longer than the limit of {MAX_NUMBER_CHARS}",
                    row=row,
                    field=self.dense_names[col],
                )
            try:
                x = float(text)
            except ValueError:
                x = None
            # float() also parses 'nan' and 'inf'; those are not counts.
            if x is None or x != x or abs(x) > _F32_MAX:
                raise self._dense_error(first_cell + k, text)
            out[k] = x
        return out

    def _dense_error(self, cell: int, value: Any) -> InvalidInput:
        row, col = divmod(cell, self.num_dense)
        shown = repr(value)[:60]
        return InvalidInput(
            f"{shown} is not a finite number that fits in float32", row=row, field=self.dense_names[col]
        )

    def _transform(self, raw: np.ndarray) -> np.ndarray:
        x = np.where(np.isnan(raw), np.float32(0), raw)
        if self.transform == "log1p":
            return np.log1p(np.maximum(x.astype(np.float64), 0.0)).astype(np.float32)
        return x.astype(np.float32, copy=False)

    # ----- categorical ---------------------------------------------------------
    def _cell_error(self, cell: int, message: str) -> InvalidInput:
        row, f = divmod(int(cell), self.num_sparse)
        return InvalidInput(message, row=row, field=self.sparse_names[f])

    def _check_shape(self, arr: np.ndarray, b: int) -> None:
        if arr.ndim != 2 or arr.shape != (b, self.num_sparse):
            raise InvalidInput(
                f"categorical values must have shape [{b}, {self.num_sparse}], got {list(arr.shape)}"
            )

    def _sparse_strings(self, sparse: np.ndarray, b: int) -> tuple[np.ndarray, np.ndarray | None]:
        self._check_shape(sparse, b)
        if sparse.dtype.kind == "U" and sparse.dtype.itemsize:
            # A caller's fixed-width str array: its ASCII bytes are already one buffer.
            width = sparse.dtype.itemsize // 4
            codes = np.ascontiguousarray(sparse).reshape(-1).view(np.uint32)  # UCS-4 code points
            if codes.size and int(codes.max()) < 128:
                buf = codes.astype(np.uint8)
                lengths = np.count_nonzero(buf.reshape(-1, width), axis=1).astype(np.int64)
                starts = np.arange(lengths.shape[0], dtype=np.int64) * width
                return self.hash_text(buf, starts, lengths, b, lambda k: str(sparse.reshape(-1)[k]))
        return self._hash_cells([str(v) for v in sparse.reshape(-1).tolist()], b)

    def _sparse_int_array(self, sparse: np.ndarray, b: int) -> tuple[np.ndarray, np.ndarray | None]:
        self._check_shape(sparse, b)
        flat = sparse.reshape(-1).astype(np.int64)
        present = flat >= 0
        if present.all():
            self._check_range(flat, None, b)
            return flat, None
        lengths = present.astype(np.int64)
        ids = flat[present]
        self._check_range(ids, lengths, b)
        return ids, lengths

    def _sparse_objects(self, sparse: Any, b: int) -> tuple[np.ndarray, np.ndarray | None]:
        rows = list(sparse)
        if len(rows) != b:
            raise InvalidInput(f"got {b} dense rows but {len(rows)} categorical rows")
        f_count = self.num_sparse
        sizes = self.table_sizes.tolist()
        lengths = np.ones(b * f_count, dtype=np.int64)
        # Ids in stream order (strings hashed afterwards into their slots);
        # typed arrays keep 8 bytes an id instead of a list of int objects.
        ids_out = array("q")
        str_vals: list[str] = []
        str_pos = array("q")  # slot in the id stream
        str_cell = array("q")
        cell = -1
        for r, values in enumerate(rows):
            if len(values) != f_count:
                raise InvalidInput(
                    f"expected {f_count} categorical values, got {len(values)}", row=r, field="sparse"
                )
            for v in values:
                cell += 1
                size = sizes[cell % f_count]
                # A single value is a bag of one; None and "" are empty bags either way.
                in_list = type(v) is list or type(v) is tuple
                if in_list and len(v) > MAX_BAG_IDS:
                    raise self._cell_error(cell, self._bag_message(len(v)))
                n = 0
                for item in (v if in_list else (v,)):
                    t = type(item)
                    if t is not str and t is not int and item is not None:
                        item = self._plain(item)
                        t = type(item)
                    if t is str:
                        if item:
                            str_vals.append(item)
                            str_pos.append(len(ids_out))
                            str_cell.append(cell)
                            ids_out.append(0)
                            n += 1
                    elif t is int:
                        # Python ints may exceed int64: compare before storing.
                        if item < 0 or item >= size:
                            raise self._cell_error(cell, self._range_message(item, cell))
                        ids_out.append(item)
                        n += 1
                    elif item is None:
                        pass
                    elif in_list and (t is list or t is tuple or t is dict):
                        raise self._cell_error(
                            cell, "a multi-hot bag is a flat list of ids; nested lists and objects are not allowed"
                        )
                    else:
                        raise self._cell_error(cell, self._id_type_message(item))
                lengths[cell] = n
        ids = np.frombuffer(ids_out, dtype=np.int64).copy() if ids_out else np.zeros(0, dtype=np.int64)
        if str_vals:
            s_cell = np.frombuffer(str_cell, dtype=np.int64)
            ids[np.frombuffer(str_pos, dtype=np.int64)] = self._hash_values(str_vals, s_cell)
        if (lengths == 1).all():
            return ids, None
        return ids, lengths

    def _check_lengths(self, lengths: np.ndarray, cells: np.ndarray | None) -> None:
        """Refuse categorical strings over the limit, naming the first (``cells[k]``, or ``k`` itself)."""
        long = lengths > MAX_CATEGORICAL_CHARS
        if long.any():
            k = int(np.argmax(long))
            raise self._cell_error(
                k if cells is None else int(cells[k]),
                f"a categorical string of {int(lengths[k])} characters is longer than the limit of "
                f"{MAX_CATEGORICAL_CHARS} (Criteo values are 8 hex digits)",
            )

    def _hash_values(self, values: list[str], cells: np.ndarray) -> np.ndarray:
        """Non-empty hex strings of the given cells -> local ids."""
        self._check_lengths(np.fromiter(map(len, values), dtype=np.int64, count=len(values)), cells)
        try:
            return hash_hex(values, self.table_sizes[cells % self.num_sparse])
        except _HexError as e:
            raise self._cell_error(int(cells[e.position]), _hex_message(e.value)) from None

    @staticmethod
    def _plain(v: Any) -> Any:
        """numpy scalars and str/int subclasses as plain str/int; anything else unchanged."""
        if isinstance(v, str):
            return str(v)
        if isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)):
            return int(v)
        return v

    @staticmethod
    def _bag_message(n: int) -> str:
        return f"a bag of {n} ids is longer than the limit of {MAX_BAG_IDS} ids per feature"

    def _id_type_message(self, v: Any) -> str:
        return (
            f"categorical values must be a hex string, a non-negative int row id, null, "
            f"or a list of those; got {_type_name(v)} {v!r}"[:240]
        )

    def _range_message(self, v: int, cell: int) -> str:
        f = cell % self.num_sparse
        size = int(self.table_sizes[f])
        if v < 0:
            return f"row id {v} is negative (valid ids are 0..{size - 1})"
        return f"row id {v} is out of range for a table of {size} rows (valid ids are 0..{size - 1})"

    def _check_range(self, ids: np.ndarray, lengths: np.ndarray | None, b: int) -> None:
        """Check local ids against their tables' sizes."""
        f_count = self.num_sparse
        if lengths is None:
            sizes = np.tile(self.table_sizes, b)
            cells = None
        else:
            cells = np.repeat(np.arange(b * f_count, dtype=np.int64), lengths)
            sizes = self.table_sizes[cells % f_count]
        bad = (ids < 0) | (ids >= sizes)
        if bad.any():
            k = int(np.argmax(bad))
            cell = k if cells is None else int(cells[k])
            raise self._cell_error(cell, self._range_message(int(ids[k]), cell))

    def finish(self, raw: "RawBatch") -> FeatureBatch:
        """Transform dense values and move ids into the concatenated table."""
        dense_raw, local, lengths = raw.dense, raw.ids, raw.lengths
        b = dense_raw.shape[0]
        f_count = self.num_sparse
        if lengths is not None and (lengths == 1).all():
            lengths = None
        if lengths is None:
            base = np.tile(self.table_offsets, b)
            offsets = None
        else:
            base = np.repeat(np.tile(self.table_offsets, b), lengths)
            offsets = np.zeros(b * f_count + 1, dtype=np.int64)
            np.cumsum(lengths, out=offsets[1:])
        return FeatureBatch(self._transform(dense_raw), local + base, offsets)
