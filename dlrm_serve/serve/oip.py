"""The Open Inference Protocol (KServe v2) for DLRM: tensors in, probabilities out.  numpy only.

One model, two input tensors and one output tensor:

========== =========================== ==============================================
name       datatype, shape             values
========== =========================== ==============================================
dense      FP32 ``[B, num_dense]``     raw counts.  Missing: ``null`` in JSON, NaN in
                                       binary tensors, or simply ``0`` (the model
                                       reads a missing count as 0, so all three give
                                       the same prediction).  FP64, INT32 and INT64
                                       are accepted too.
sparse     BYTES ``[B, num_sparse]``   Criteo hex strings; ``""`` (or ``null``) = missing
           INT64 / INT32 ``[B, F]``    local row ids per table; ``-1`` (any negative)
                                       = missing
probability FP32 ``[B]``               the click probability (output)
========== =========================== ==============================================

Multi-hot bags are not expressible as these rectangular tensors; send them
with the other formats (JSON instances or the binary ``application/x-dlrm``).

Every route decodes through :class:`~dlrm_serve.io.features.FeatureEncoder`
(``raw_columns`` then ``finish``), the code every other format uses, so a row
gives the same model inputs whichever protocol carried it.

Where the bodies come from:

- TorchServe REST ``/v2/models/{m}/infer``: the JSON body as the client sent it
  (tritonclient sends no Content-Type, so it may arrive as bytes).
- TorchServe's OIP gRPC ``ModelInfer``: the frontend rewrites the typed
  ``contents`` into a JSON body ``{"id", "model_name", "inputs"}`` and encodes
  BYTES elements as **base64** (``base64_bytes=True``).
- The KServe predictor (:mod:`dlrm_serve.serve.kserve_server`): kserve's
  ``InferInput`` objects, whose data is a list (JSON, gRPC typed contents) or a
  numpy array (binary data); see :func:`tensors_of_kserve`.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from dlrm_serve.errors import DLRMServeError, InvalidInput
from dlrm_serve.io.features import FeatureBatch, FeatureEncoder, RawBatch

__all__ = [
    "DENSE",
    "SPARSE",
    "OUTPUT",
    "Tensor",
    "OIPRequest",
    "classify",
    "parse_request",
    "tensors_of_kserve",
    "raw_batch",
    "decode",
    "response_body",
    "error_body",
    "metadata",
]

DENSE = "dense"
SPARSE = "sparse"
OUTPUT = "probability"
_DENSE_TYPES = ("FP32", "FP64", "INT32", "INT64")
_SPARSE_TYPES = ("BYTES", "INT64", "INT32")
_REQUEST_KEYS = {"id", "inputs", "outputs", "parameters", "model_name", "model_version"}
# classify()'s stand-in for an OIP body followed by binary tensor data.
BINARY_EXTENSION = object()


@dataclass
class Tensor:
    """One input tensor: ``data`` is a (flat or nested) list, or a numpy array (binary data)."""

    name: str
    datatype: str
    shape: list
    data: Any


@dataclass
class OIPRequest:
    """A parsed inference request: its id and input tensors."""

    id: str | None
    tensors: list[Tensor]
    model_name: str | None = None


# ----- recognising a body ------------------------------------------------------------
def _is_oip(obj: Any) -> bool:
    return isinstance(obj, dict) and "inputs" in obj and "instances" not in obj


def classify(body: Any, content_type: str | None) -> tuple[str, Any]:
    """``("oip", dict)`` for an OIP request body, else ``("other", body)``.

    An OIP body followed by binary tensor data gives ``("oip",
    BINARY_EXTENSION)``, which :func:`parse_request` refuses with a clear message.

    A JSON body that came as bytes (tritonclient sends no Content-Type) is
    parsed here once; when it is not OIP, the parsed value is returned so the
    other codecs need not parse it again.  Bodies that are not JSON are
    returned unchanged.
    """
    if isinstance(body, dict):
        return ("oip", body) if _is_oip(body) else ("other", body)
    if not isinstance(body, (bytes, bytearray, str)):
        return "other", body
    ctype = (content_type or "").split(";")[0].strip().lower()
    if ctype not in ("", "application/json"):
        return "other", body
    head = body[:64].lstrip()
    if head[:1] not in ("{", b"{"):
        return "other", body
    try:
        text = body if isinstance(body, str) else bytes(body).decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None:
        try:
            obj = json.loads(text)
        except ValueError:
            obj = None
        else:
            return ("oip", obj) if _is_oip(obj) else ("other", obj)
    # JSON followed by bytes: the binary tensor extension (tritonclient's
    # binary_data=True), which TorchServe cannot pass on.
    raw = body if isinstance(body, str) else bytes(body).decode("utf-8", errors="replace")
    try:
        obj, end = json.JSONDecoder().raw_decode(raw.lstrip())
    except ValueError:
        return "other", body  # let the JSON codec report the syntax error
    return ("oip", BINARY_EXTENSION) if _is_oip(obj) else ("other", body)


# ----- JSON request -> tensors ---------------------------------------------------------
def parse_request(obj: Any) -> OIPRequest:
    """A decoded OIP JSON body -> :class:`OIPRequest` (structure checked, data not yet)."""
    if obj is BINARY_EXTENSION:
        raise InvalidInput(
            "binary tensor data (the Inference-Header-Content-Length extension) cannot be read here: "
            "send the tensors as JSON (tritonclient: binary_data=False), or use the KServe predictor "
            "(dlrm-serve kserve), which reads binary data"
        )
    if not isinstance(obj, dict):
        raise InvalidInput("an inference request must be a JSON object with 'inputs'")
    extra = sorted(set(obj) - _REQUEST_KEYS)
    if extra:
        raise InvalidInput(f"unexpected keys {extra} in the inference request")
    inputs = obj.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidInput("'inputs' must be a non-empty list of tensors")
    tensors = []
    for i, t in enumerate(inputs):
        if not isinstance(t, dict):
            raise InvalidInput(f"inputs[{i}] must be an object with name, shape, datatype and data")
        name = t.get("name")
        if not isinstance(name, str):
            raise InvalidInput(f"inputs[{i}] has no 'name' string")
        missing = [k for k in ("shape", "datatype", "data") if k not in t]
        if missing:
            raise InvalidInput(f"input '{name}': missing {missing}")
        if not isinstance(t["datatype"], str):
            raise InvalidInput(f"input '{name}': 'datatype' must be a string")
        tensors.append(Tensor(name, t["datatype"], t["shape"], t["data"]))
    outputs = obj.get("outputs")
    if outputs is not None:
        if not isinstance(outputs, list):
            raise InvalidInput("'outputs' must be a list of requested outputs")
        for o in outputs:
            name = o.get("name") if isinstance(o, dict) else None
            if name != OUTPUT:
                raise InvalidInput(f"unknown output {name!r}: this model has one output, '{OUTPUT}'")
    rid = obj.get("id")
    if rid is not None and not isinstance(rid, str):
        raise InvalidInput("'id' must be a string")
    name = obj.get("model_name")
    return OIPRequest(rid, tensors, name if isinstance(name, str) else None)


def tensors_of_kserve(inputs: Sequence[Any]) -> list[Tensor]:
    """kserve ``InferInput`` objects -> tensors (binary data as numpy, the rest as lists)."""
    out = []
    for inp in inputs:
        # kserve keeps binary (raw) tensor data aside in _raw_data (from REST's
        # binary extension or gRPC's raw_input_contents); as_numpy() decodes it.
        binary = getattr(inp, "_raw_data", None) is not None or inp.data is None
        data = inp.as_numpy() if binary else inp.data
        out.append(Tensor(inp.name, inp.datatype, list(inp.shape), data))
    return out


# ----- tensors -> raw columns ----------------------------------------------------------
def _shape(t: Tensor, width: int, max_rows: int) -> int:
    s = t.shape
    if (
        not isinstance(s, (list, tuple))
        or len(s) != 2
        or not all(isinstance(d, int) and not isinstance(d, bool) for d in s)
    ):
        raise InvalidInput(f"input '{t.name}': shape must be [B, {width}], got {s!r}"[:200])
    b, w = s
    if w != width:
        raise InvalidInput(f"input '{t.name}': shape must be [B, {width}], got {list(s)}")
    if b < 1:
        raise InvalidInput(f"input '{t.name}': shape {list(s)} holds no rows")
    if b > max_rows:
        raise InvalidInput(
            f"input '{t.name}': {b} rows; at most {max_rows} are accepted per request (split the batch)"
        )
    return b


def _flat(t: Tensor, count: int) -> list:
    """JSON data as a flat list of ``count`` elements (nested rows are allowed)."""
    data = t.data
    if not isinstance(data, list):
        raise InvalidInput(f"input '{t.name}': 'data' must be a list, got {type(data).__name__}")
    if data and isinstance(data[0], list):
        flat = []
        for row in data:
            if not isinstance(row, list):
                raise InvalidInput(f"input '{t.name}': 'data' mixes nested lists and values")
            flat.extend(row)
        data = flat
    if len(data) != count:
        raise InvalidInput(f"input '{t.name}': shape {list(t.shape)} needs {count} values, 'data' holds {len(data)}")
    return data


def _where(t: Tensor, k: int, width: int) -> str:
    r, c = divmod(k, width)
    return f"input '{t.name}': element [{r}, {c}]"


def _binary(t: Tensor, b: int, width: int, kinds: str, what: str) -> np.ndarray:
    """Binary tensor data (a numpy array) as ``[b, width]``, checked for kind and size."""
    arr = t.data
    if arr.dtype.kind not in kinds or arr.size != b * width:
        raise InvalidInput(f"input '{t.name}': binary data does not hold {b * width} {what}")
    return arr.reshape(b, width)


def _dense(t: Tensor, b: int, width: int) -> np.ndarray:
    if t.datatype not in _DENSE_TYPES:
        raise InvalidInput(f"input '{t.name}': datatype must be FP32 (or FP64, INT32, INT64), got {t.datatype!r}")
    if isinstance(t.data, np.ndarray):
        return _binary(t, b, width, "fiu", "numbers").astype(np.float64)
    data = _flat(t, b * width)
    out = np.empty(b * width, dtype=np.float64)
    for k, v in enumerate(data):
        tv = type(v)
        if tv is float or tv is int:
            out[k] = v
        elif v is None:
            out[k] = np.nan
        else:
            shown = "boolean" if isinstance(v, bool) else type(v).__name__
            raise InvalidInput(f"{_where(t, k, width)}: must be a number or null, got {shown} {v!r}"[:200])
    return out.reshape(b, width)


def _text(t: Tensor, k: int, v: Any, width: int, base64_bytes: bool) -> str:
    if isinstance(v, (bytes, bytearray, np.bytes_)):
        try:
            return bytes(v).decode("ascii")
        except UnicodeDecodeError:
            raise InvalidInput(f"{_where(t, k, width)}: is not ASCII text (expected a Criteo hex string)") from None
    if isinstance(v, str):
        if not base64_bytes:
            return v
        try:
            return base64.b64decode(v, validate=True).decode("ascii")
        except (binascii.Error, UnicodeDecodeError):
            raise InvalidInput(f"{_where(t, k, width)}: is not a base64-encoded ASCII string") from None
    if v is None:
        return ""
    raise InvalidInput(f"{_where(t, k, width)}: BYTES elements must be strings, got {type(v).__name__} {v!r}"[:200])


def _sparse(t: Tensor, b: int, width: int, base64_bytes: bool) -> np.ndarray:
    if t.datatype not in _SPARSE_TYPES:
        raise InvalidInput(
            f"input '{t.name}': datatype must be BYTES (hex strings) or INT64/INT32 (row ids), got {t.datatype!r}"
        )
    if t.datatype == "BYTES":
        values = t.data.reshape(-1).tolist() if isinstance(t.data, np.ndarray) else _flat(t, b * width)
        if len(values) != b * width:
            raise InvalidInput(f"input '{t.name}': binary data does not hold {b * width} strings")
        texts = np.empty(b * width, dtype=object)
        # An object array of the strings themselves: a fixed-width str array would
        # take rows x features x the longest value (the encoder refuses long ones).
        texts[:] = [_text(t, k, v, width, base64_bytes) for k, v in enumerate(values)]
        return texts.reshape(b, width)
    if isinstance(t.data, np.ndarray):
        return _binary(t, b, width, "iu", "integers").astype(np.int64)
    data = _flat(t, b * width)
    for k, v in enumerate(data):
        if type(v) is not int:
            shown = "boolean" if isinstance(v, bool) else type(v).__name__
            raise InvalidInput(f"{_where(t, k, width)}: row ids must be integers (-1 = missing), got {shown} {v!r}"[:200])
    try:
        return np.asarray(data, dtype=np.int64).reshape(b, width)
    except OverflowError:
        raise InvalidInput(f"input '{t.name}': a row id does not fit in int64") from None


def raw_batch(
    tensors: Sequence[Tensor], encoder: FeatureEncoder, max_rows: int, *, base64_bytes: bool = False
) -> RawBatch:
    """The ``dense`` and ``sparse`` tensors -> validated raw columns (FeatureEncoder.raw_columns).

    ``base64_bytes``: BYTES elements are base64 text (TorchServe's OIP gRPC).
    Raises :class:`InvalidInput` naming the tensor (and the element or the
    row and feature) for anything the model cannot read.
    """
    by_name: dict[str, Tensor] = {}
    for t in tensors:
        if t.name in by_name:
            raise InvalidInput(f"input '{t.name}' is given twice")
        if t.name not in (DENSE, SPARSE):
            raise InvalidInput(f"unknown input '{t.name}': this model reads '{DENSE}' and '{SPARSE}'")
        by_name[t.name] = t
    for name in (DENSE, SPARSE):
        if name not in by_name:
            raise InvalidInput(f"input '{name}' is missing: this model reads '{DENSE}' and '{SPARSE}'")
    dense_t, sparse_t = by_name[DENSE], by_name[SPARSE]
    b = _shape(dense_t, encoder.num_dense, max_rows)
    b2 = _shape(sparse_t, encoder.num_sparse, max_rows)
    if b != b2:
        raise InvalidInput(f"input '{DENSE}' has {b} rows but input '{SPARSE}' has {b2}")
    dense = _dense(dense_t, b, encoder.num_dense)
    sparse = _sparse(sparse_t, b, encoder.num_sparse, base64_bytes)
    try:
        return encoder.raw_columns(dense, sparse)
    except InvalidInput as e:
        tensor = DENSE if e.field in encoder.dense_names else SPARSE if e.field in encoder.sparse_names else None
        raise InvalidInput(f"input '{tensor}': {e.message}" if tensor else e.message) from None


def decode(
    obj: Any, encoder: FeatureEncoder, max_rows: int, *, base64_bytes: bool = False
) -> tuple[FeatureBatch, OIPRequest]:
    """An OIP JSON body -> model inputs and the parsed request (for its id)."""
    req = parse_request(obj)
    return encoder.finish(raw_batch(req.tensors, encoder, max_rows, base64_bytes=base64_bytes)), req


# ----- replies -------------------------------------------------------------------------
def response_body(probabilities: np.ndarray, model_name: str, model_version: str, request_id: str | None) -> dict:
    """The OIP answer: one FP32 output ``probability`` of shape ``[B]``.

    ``id`` is always present ("" when the request had none): TorchServe's
    gRPC frontend reads it unconditionally.
    """
    p = np.asarray(probabilities, dtype=np.float32)
    return {
        "id": request_id or "",
        "model_name": model_name,
        "model_version": model_version,
        "outputs": [{"name": OUTPUT, "datatype": "FP32", "shape": [int(p.shape[0])], "data": [float(x) for x in p]}],
    }


def error_body(e: DLRMServeError) -> dict:
    """The OIP error shape: ``{"error": message}``."""
    return {"error": e.message}


def metadata(encoder: FeatureEncoder, name: str, versions: Sequence[str] = ()) -> dict:
    """Model metadata in OIP form (``GET /v2/models/{name}``)."""
    return {
        "name": name,
        "versions": list(versions),
        "platform": "dlrm-serve",
        "inputs": [
            {"name": DENSE, "datatype": "FP32", "shape": [-1, encoder.num_dense]},
            {"name": SPARSE, "datatype": "BYTES", "shape": [-1, encoder.num_sparse]},
        ],
        "outputs": [{"name": OUTPUT, "datatype": "FP32", "shape": [-1]}],
    }
