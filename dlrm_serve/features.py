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

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .config import DLRMConfig
from .errors import InvalidInput

__all__ = ["FeatureBatch", "RawBatch", "FeatureEncoder", "hash_hex"]

_F32_MAX = float(np.finfo(np.float32).max)

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


def hash_hex(values: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """``int(v, 16) % size`` for an array of hex strings, vectorised.

    ``values``: str array ``[M]`` of non-empty strings; ``sizes``: int64 ``[M]``
    (or a scalar).  Returns int64 ``[M]``.  Raises ``ValueError`` with the
    position of the first string that is not plain hex (no sign, prefix,
    underscore or space, which ``int()`` would accept).
    """
    values = np.asarray(values, dtype=np.str_)
    m = values.shape[0]
    sizes = np.broadcast_to(np.asarray(sizes, dtype=np.int64), (m,))
    if m == 0:
        return np.zeros(0, dtype=np.int64)
    try:
        # One byte per character: several times faster to index than UCS-4.
        raw = values.astype(np.bytes_)
    except UnicodeEncodeError:
        first = next(i for i, v in enumerate(values.tolist()) if not v.isascii())
        raise _HexError(first, str(values[first])) from None
    width = raw.dtype.itemsize
    codes = raw.view(np.uint8).reshape(m, width)
    lengths = np.char.str_len(values)
    digits = _HEX_LUT8[codes]  # NUL and non-hex bytes are -1
    inside = np.arange(width)[None, :] < lengths[:, None]
    bad = ((digits < 0) & inside).any(axis=1) | (lengths == 0)
    if bad.any():
        first = int(np.argmax(bad))
        raise _HexError(first, str(values[first]))
    out = np.empty(m, dtype=np.int64)
    short = lengths <= 15
    if short.all():
        d, n = digits, lengths
    else:
        d, n = digits[short], lengths[short]
    # Up to 15 hex digits fit in int64: fold column by column.
    acc = np.zeros(d.shape[0], dtype=np.int64)
    for j in range(min(width, 15)):
        acc = np.where(j < n, (acc << 4) | d[:, j], acc)
    out[short] = acc % sizes[short]
    for i in np.flatnonzero(~short):
        out[i] = int(values[i], 16) % int(sizes[i])
    return out


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

    # ----- the public routes ---------------------------------------------------
    def encode_instances(self, instances: Sequence[Any]) -> FeatureBatch:
        """JSON-style instances: ``{"dense": [...], "sparse": [...]}`` or by name."""
        return self.finish(self.raw_instances(instances))

    def encode_columns(self, dense: Any, sparse: Any) -> FeatureBatch:
        """Columns of raw values (see :meth:`raw_columns`) -> model inputs."""
        return self.finish(self.raw_columns(dense, sparse))

    def raw_instances(self, instances: Sequence[Any]) -> "RawBatch":
        """JSON-style instances, validated and hashed but not transformed."""
        dense_rows: list[list[Any]] = []
        sparse_rows: list[list[Any]] = []
        for row, inst in enumerate(instances):
            d, s = self._split_instance(inst, row)
            dense_rows.append(d)
            sparse_rows.append(s)
        return self.raw_columns(dense_rows, sparse_rows)

    def raw_columns(self, dense: Any, sparse: Any) -> "RawBatch":
        """Columns of raw values, validated and hashed but not transformed.

        ``dense``: ``[B, num_dense]`` numbers/None (a float array may use NaN
        for missing).  ``sparse``: ``[B, num_sparse]`` raw categorical values;
        a str array (``""`` = missing) or an int array of row ids
        (negative = missing) takes the vectorised path.
        """
        dense_f32 = self._dense_raw(dense)
        b = dense_f32.shape[0]
        if isinstance(sparse, np.ndarray) and sparse.dtype.kind in "US":
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
        if isinstance(dense, np.ndarray) and dense.dtype.kind in "US":
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
        """Dense columns as text (Criteo TSV): ``""`` is missing."""
        if dense.ndim != 2 or dense.shape[1] != self.num_dense:
            raise InvalidInput(f"dense text must have shape [B, {self.num_dense}], got {list(dense.shape)}")
        empty = dense == ""
        filled = np.where(empty, "0", dense)
        try:
            values = filled.astype(np.float64)
        except ValueError:
            values = None
        if values is not None:
            # numpy also parses 'nan' and 'inf'; those are not counts.
            bad = ~np.isfinite(values) | (np.abs(values) > _F32_MAX)
            if not bad.any():
                out = values.astype(np.float32)
                out[empty] = np.nan
                return out
        # Slow path, only to name the first bad field.
        for cell, text in enumerate(dense.reshape(-1)):
            if text == "":
                continue
            try:
                x = float(text)
            except ValueError:
                x = None
            if x is None or not np.isfinite(x) or abs(x) > _F32_MAX:
                raise self._dense_error(cell, str(text))
        raise InvalidInput("dense values could not be parsed")  # pragma: no cover

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

    def _hash(self, strings: np.ndarray, cells: np.ndarray) -> np.ndarray:
        try:
            return hash_hex(strings, self.table_sizes[cells % self.num_sparse])
        except _HexError as e:
            raise self._cell_error(int(cells[e.position]), _hex_message(e.value)) from None

    def _sparse_strings(self, sparse: np.ndarray, b: int) -> tuple[np.ndarray, np.ndarray | None]:
        self._check_shape(sparse, b)
        flat = sparse.reshape(-1).astype(np.str_, copy=False)
        present = flat != ""
        if present.all():
            cells = np.arange(flat.shape[0], dtype=np.int64)
            return self._hash(flat, cells), None
        cells = np.flatnonzero(present)
        return self._hash(flat[cells], cells), present.astype(np.int64)

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
        lengths = np.ones(b * f_count, dtype=np.int64)
        str_vals: list[str] = []
        str_pos: list[int] = []  # position in the id stream
        str_cell: list[int] = []
        int_vals: list[int] = []
        int_pos: list[int] = []
        int_cell: list[int] = []
        pos = 0
        cell = -1
        for r, values in enumerate(rows):
            if len(values) != f_count:
                raise InvalidInput(
                    f"expected {f_count} categorical values, got {len(values)}", row=r, field="sparse"
                )
            for v in values:
                cell += 1
                # A single value is a bag of one; None and "" are empty bags either way.
                in_list = type(v) is list or type(v) is tuple
                n = 0
                for item in (v if in_list else (v,)):
                    t = type(item)
                    if t is not str and t is not int and item is not None:
                        item = self._plain(item)
                        t = type(item)
                    if t is str:
                        if item:
                            str_vals.append(item)
                            str_pos.append(pos)
                            str_cell.append(cell)
                            pos += 1
                            n += 1
                    elif t is int:
                        int_vals.append(item)
                        int_pos.append(pos)
                        int_cell.append(cell)
                        pos += 1
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
        ids = np.empty(pos, dtype=np.int64)
        if str_vals:
            s_cell = np.asarray(str_cell, dtype=np.int64)
            ids[np.asarray(str_pos, dtype=np.int64)] = self._hash(np.asarray(str_vals, dtype=np.str_), s_cell)
        if int_vals:
            i_cell = np.asarray(int_cell, dtype=np.int64)
            sizes = self.table_sizes[i_cell % f_count]
            # Python ints may exceed int64; compare before converting.
            for k, v in enumerate(int_vals):
                if v < 0 or v >= sizes[k]:
                    raise self._cell_error(int(i_cell[k]), self._range_message(v, int(i_cell[k])))
            ids[np.asarray(int_pos, dtype=np.int64)] = np.asarray(int_vals, dtype=np.int64)
        if (lengths == 1).all():
            return ids, None
        return ids, lengths

    @staticmethod
    def _plain(v: Any) -> Any:
        """numpy scalars and str/int subclasses as plain str/int; anything else unchanged."""
        if isinstance(v, str):
            return str(v)
        if isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)):
            return int(v)
        return v

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
