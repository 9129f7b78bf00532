"""How bnfold writes tensor bytes into protobufs by hand: the wire header, varints, plain dtypes.

Below both the graph index (:mod:`bnfold.tf.graph`) and the streamed writer
(:mod:`bnfold.tf.streaming`), which both build ``TensorProto`` contents without
copying the weights twice.
"""

from __future__ import annotations

import numpy as np
from tensorflow.core.framework import tensor_pb2
from tensorflow.python.framework import dtypes


class ContentBuffer:
    """An array whose bytes sit right behind the wire header of a ``TensorProto.tensor_content``.

    The Python protobuf runtime stores only ``bytes`` in a bytes field, so filling a proto
    from an array costs two copies (``tobytes``, then the field's own). Parsing accepts any
    buffer: with the header in front, the fold math writes the new weights into ``array``
    and the proto takes them with one copy (:func:`fill_tensor_proto`).
    """

    _ALIGN = 16  # the array starts at this offset into the buffer, so the values are aligned

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype, scratch: Scratch | None = None) -> None:
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header = b"\x22" + varint(nbytes)  # field 4 (tensor_content), wire type 2
        self._raw = scratch.take(self._ALIGN + nbytes) if scratch is not None else np.empty(self._ALIGN + nbytes, dtype=np.uint8)
        self._start = self._ALIGN - len(header)
        self._raw[self._start : self._ALIGN] = np.frombuffer(header, dtype=np.uint8)
        self.array: np.ndarray = self._raw[self._ALIGN :].view(dtype).reshape(shape)

    def write_content(self, proto: tensor_pb2.TensorProto) -> None:
        proto.MergeFromString(memoryview(self._raw)[self._start :])  # type: ignore[arg-type]


def varint(value: int) -> bytes:
    """Protobuf's base-128 varint: the length prefix of a length-delimited field."""
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | 0x80 if value else byte)
        if not value:
            return bytes(out)


def plain_dtype(dtype: int) -> np.dtype | None:
    """The numpy dtype whose bytes ``tensor_content`` holds as they are (numbers), else None; looked up once per enum."""
    if dtype not in _PLAIN_DTYPES:
        try:
            np_dtype: np.dtype | None = np.dtype(dtypes.as_dtype(dtype).as_numpy_dtype)
        except TypeError:
            np_dtype = None
        if np_dtype is not None and not (np_dtype.kind in "fiub" or np_dtype.name == "bfloat16"):
            np_dtype = None
        _PLAIN_DTYPES[dtype] = np_dtype
    return _PLAIN_DTYPES[dtype]


class Scratch:
    """One buffer that each new kernel of a fold is computed in, in turn, before the graph copies it.

    Fresh memory for every kernel costs a page fault per 4 KiB on first touch, which on
    a 100 MB model took longer than the arithmetic; a buffer reused from kernel to
    kernel is touched once. Only the last :meth:`take` is valid.
    """

    def __init__(self) -> None:
        self._buffer = np.empty(0, dtype=np.uint8)

    def take(self, nbytes: int) -> np.ndarray:
        if self._buffer.size < nbytes:
            self._buffer = np.empty(nbytes, dtype=np.uint8)
        return self._buffer[:nbytes]


_PLAIN_DTYPES: dict[int, np.dtype | None] = {}
