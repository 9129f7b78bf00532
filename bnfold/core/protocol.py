"""How bnfold and its worker talk over a pipe: a JSON header and raw array bytes, never a pickle.

A message is ``HEADER`` (JSON length, payload length), the JSON, then the
payload. Arrays travel as their dtype, shape and bytes, so nothing the worker
sends can make bnfold run code when it is read.
"""

from __future__ import annotations

import json
import re
import struct
from typing import IO, Any

import numpy as np

HEADER = struct.Struct(">IQ")  # JSON header length, payload length


def _resolve_dtype(name: str) -> np.dtype:
    try:
        return np.dtype(name)
    except TypeError:  # bfloat16 and TF's other extension types are known by name to ml_dtypes only
        import ml_dtypes

        return np.dtype(getattr(ml_dtypes, name))


def encode_arrays(arrays: list[np.ndarray]) -> tuple[list[dict[str, Any]], bytes]:
    """Numbers as their raw bytes; TF string tensors (object arrays of bytes) as lengths and bytes,
    since a fixed-width numpy bytes dtype would drop trailing NUL bytes."""
    meta, chunks = [], []
    for value in arrays:
        array = np.asarray(value)
        if array.dtype == object or array.dtype.kind in "SU":
            items = [x if isinstance(x, bytes) else str(x).encode() for x in array.ravel().tolist()]
            data = b"".join(items)
            meta.append({"dtype": "bytes", "shape": list(array.shape), "nbytes": len(data), "lengths": [len(x) for x in items]})
            chunks.append(data)
            continue
        name = array.dtype.str if array.dtype.kind in "biufcM" else array.dtype.name
        meta.append({"dtype": name, "shape": list(array.shape), "nbytes": array.nbytes})
        chunks.append(array.tobytes(order="C"))  # not ascontiguousarray, which makes a scalar 1-d
    return meta, b"".join(chunks)


def decode_arrays(meta: list[dict[str, Any]], payload: bytes) -> list[np.ndarray]:
    arrays, offset = [], 0
    for item in meta:
        size = int(item["nbytes"])
        if item["dtype"] == "bytes":
            items, start = [], offset
            for length in item["lengths"]:
                items.append(payload[start : start + int(length)])
                start += int(length)
            strings = np.empty(len(items), dtype=object)
            strings[:] = items
            arrays.append(strings.reshape(item["shape"]))
        else:
            dtype = _resolve_dtype(str(item["dtype"]))
            count = size // dtype.itemsize if dtype.itemsize else 0
            arrays.append(np.frombuffer(payload, dtype=dtype, count=count, offset=offset).reshape(item["shape"]).copy())
        offset += size
    return arrays


def send(stream: IO[bytes], header: dict[str, Any], payload: bytes = b"") -> None:
    head = json.dumps(header).encode()
    stream.write(HEADER.pack(len(head), len(payload)))
    stream.write(head)
    if payload:
        stream.write(payload)
    stream.flush()


def read_exactly(stream: IO[bytes], size: int) -> bytes | None:
    chunks, left = [], size
    while left:
        chunk = stream.read(left)
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def receive(stream: IO[bytes]) -> tuple[dict[str, Any], bytes] | None:
    fixed = read_exactly(stream, HEADER.size)
    if fixed is None:
        return None
    head_size, payload_size = HEADER.unpack(fixed)
    head = read_exactly(stream, head_size)
    payload = read_exactly(stream, payload_size) if payload_size else b""
    if head is None or payload is None:
        return None
    return json.loads(head), payload


def first_line_of(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[0][:300] if lines else "no message"


def op_error_text(message: str) -> str:
    """TensorFlow's run errors start "Graph execution error:" and say what failed lines later
    ("/home/u/x; Permission denied" above "[[{{node WriteFile}}]]"): that comes first, for one-line errors."""
    lines = [line.strip() for line in message.splitlines()]
    for i, line in enumerate(lines):
        found = re.match(r"\[\[\{\{node ([^}]+)\}\}\]\]", line)
        if found and i > 0 and lines[i - 1] and not lines[i - 1].startswith("Node: "):
            return f"node {found.group(1)!r}: {lines[i - 1]}\n{message}"
    return message
