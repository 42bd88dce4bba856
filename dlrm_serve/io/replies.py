"""Prediction replies as float32 bytes, for clients that ask (``Accept: application/x-dlrm``).

Layout, little-endian::

    magic  b"DLRP"   4 bytes
    count  uint32    rows
    probs  float32   [count]

The magic tells it apart from a JSON body (errors stay JSON, ``{...}``),
so a client that asked can read either answer.  numpy only.
"""

from __future__ import annotations

import struct

import numpy as np

__all__ = ["REPLY_MAGIC", "BINARY_REPLY_TYPE", "ACCEPT_INPUT", "encode_predictions", "decode_predictions", "is_binary_reply"]

REPLY_MAGIC = b"DLRP"
BINARY_REPLY_TYPE = "application/x-dlrm"  # asked for with REST's Accept header
ACCEPT_INPUT = "accept"  # gRPC: the input that carries the same value next to "data"
_HEAD = struct.Struct("<4sI")


def encode_predictions(probabilities: np.ndarray) -> bytes:
    """float32 ``[B]`` -> the binary reply (exact values)."""
    p = np.ascontiguousarray(probabilities, dtype="<f4")
    return _HEAD.pack(REPLY_MAGIC, p.shape[0]) + p.tobytes()


def is_binary_reply(body: bytes | bytearray | memoryview) -> bool:
    return bytes(body[:4]) == REPLY_MAGIC


def decode_predictions(body: bytes | bytearray | memoryview) -> np.ndarray:
    """The binary reply -> float32 ``[B]``; ``ValueError`` when its length disagrees with its count."""
    magic, n = _HEAD.unpack_from(body, 0)
    if magic != REPLY_MAGIC or len(body) != _HEAD.size + 4 * n:
        raise ValueError(f"a binary reply of {len(body)} bytes does not hold the {n} probabilities its header says")
    return np.frombuffer(body, dtype="<f4", count=n, offset=_HEAD.size).astype(np.float32)
