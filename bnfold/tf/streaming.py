"""Large constants stay in the model file: read a frozen graph node by node, write it node by node.

``bnfold in.pb out.pb --no-verify`` would otherwise hold the model twice or three
times (the file's bytes while they are parsed, the parsed graph, the new weights
beside the old ones in the same protobuf arena, which never frees a field). Here
each node record is read from the file on its own, and a ``Const`` whose
``tensor_content`` is large is kept as a *stub*: the same node with a one-byte
content, which TensorFlow and :func:`bnfold.tf.graph.const_array` both refuse (the
size no longer matches the shape), so a stub that leaked anywhere would fail
loudly, never compute with wrong values. The values are read from the file when
the fold needs them; the fold's new weights are kept as *how to compute them* from
their source (:class:`ScaledTensor`), computed again when the node is written. The
writer splices the values into each stub's serialization, so the bytes written
are exactly ``SerializeToString(deterministic=True)`` of the full graph.

Peak memory is then the graph without its large constants plus a couple of the
largest kernels, instead of two to three times the model.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

import numpy as np
from google.protobuf import message
from tensorflow.core.framework import graph_pb2, node_def_pb2, tensor_pb2

from bnfold.core.errors import BrokenOutputError, InputError
from bnfold.core.foldmath import scaled
from bnfold.tf.tensors import ContentBuffer, plain_dtype, varint

STUB = b"\xff"  # the content of a stub: one byte, never the size of a tensor this large
LARGE = 64 * 1024  # bytes of tensor_content from which a constant stays in the file
_COPY_CHUNK = 1 << 20


class LazyTensor(Protocol):
    """Values that are not in the graph: read from the model file, or computed from such values."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def dtype(self) -> np.dtype: ...

    def read(self, out: np.ndarray | None = None) -> np.ndarray: ...


@dataclass
class FileTensor:
    """A constant's values where they sit in the model file."""

    source: SourceFile
    offset: int
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def read(self, out: np.ndarray | None = None) -> np.ndarray:
        if out is None:
            out = np.empty(self.shape, dtype=self.dtype)
        self.source.read_into(self.offset, out.reshape(-1).view(np.uint8).data)
        return out

    def copy_to(self, f: BinaryIO) -> None:
        """Copy the values to ``f`` a chunk at a time: an unchanged constant never sits in memory whole."""
        done = 0
        while done < self.nbytes:
            size = min(_COPY_CHUNK, self.nbytes - done)
            chunk = bytearray(size)
            self.source.read_into(self.offset + done, memoryview(chunk))
            f.write(chunk)
            done += size


@dataclass
class ScaledTensor:
    """New weights of a fold, ``source * factor`` (:func:`bnfold.core.foldmath.scaled`), computed when read.

    The same arithmetic as when the fold computed them to check that they are
    finite, so the values written are the values checked.
    """

    source: LazyTensor
    factor: np.ndarray
    dtype: np.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return self.source.shape

    def read(self, out: np.ndarray | None = None) -> np.ndarray:
        return scaled(self.source.read(), self.factor, out if out is not None else np.empty(self.shape, dtype=self.dtype))


class SourceFile:
    """The model file, open for reading values while the graph is folded and written.

    A file changed in the meantime is refused at write time: its values would not
    be the ones the graph was read with.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDONLY)
        self._stat = os.fstat(self._fd)

    def read_into(self, offset: int, view: memoryview) -> None:
        done = 0
        while done < len(view):
            try:
                if hasattr(os, "preadv"):
                    n = os.preadv(self._fd, [view[done:]], offset + done)
                else:  # no preadv (Windows): a seek and a read, bnfold reads from one thread
                    os.lseek(self._fd, offset + done, os.SEEK_SET)
                    chunk = os.read(self._fd, len(view) - done)
                    view[done : done + len(chunk)] = chunk
                    n = len(chunk)
            except OSError as exc:
                raise InputError(f"{self.path}: cannot read it any more ({exc.strerror or exc})") from None
            if n <= 0:
                raise InputError(f"{self.path}: the file became shorter while bnfold read it; run again")
            done += n

    def check_unchanged(self) -> None:
        now = os.fstat(self._fd)
        if (now.st_size, now.st_mtime_ns) != (self._stat.st_size, self._stat.st_mtime_ns):
            raise InputError(f"{self.path}: the file changed while bnfold read it; run again")

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class Contents:
    """Node name -> the values of a stub in the graph; the one place stubs are made and known."""

    def __init__(self, source: SourceFile) -> None:
        self.source = source
        self._tensors: dict[str, LazyTensor] = {}
        self._stubs: set[str] = set()  # every name ever stubbed: a stub the writer cannot fill is a bug

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def get(self, node: node_def_pb2.NodeDef) -> LazyTensor | None:
        """The values of ``node`` if it is one of the stubs (a node that replaced a stub is not)."""
        lazy = self._tensors.get(node.name)
        if lazy is None or not is_stub(node, lazy):
            return None
        return lazy

    def add(self, name: str, lazy: LazyTensor) -> None:
        self._tensors[name] = lazy
        self._stubs.add(name)

    def materialized(self, node: node_def_pb2.NodeDef) -> node_def_pb2.NodeDef:
        """``node`` with its values in it (a copy) where it is a stub; else ``node`` itself."""
        lazy = self.get(node)
        if lazy is None:
            return node
        full = node_def_pb2.NodeDef()
        full.CopyFrom(node)
        _fill(full.attr["value"].tensor, lazy)
        return full

    def was_stubbed(self, name: str) -> bool:
        return name in self._stubs

    def close(self) -> None:
        self.source.close()


def is_stub(node: node_def_pb2.NodeDef, lazy: LazyTensor) -> bool:
    if node.op != "Const" or "value" not in node.attr:
        return False
    tensor = node.attr["value"].tensor
    shape = tuple(d.size for d in tensor.tensor_shape.dim)
    return tensor.tensor_content == STUB and shape == tuple(lazy.shape) and plain_dtype(tensor.dtype) == lazy.dtype


def stub_tensor(tensor: tensor_pb2.TensorProto, lazy: LazyTensor, dtype: int) -> None:
    """Fill an empty ``tensor`` as the stub of ``lazy``'s values."""
    tensor.dtype = dtype
    for d in lazy.shape:
        tensor.tensor_shape.dim.add().size = d
    tensor.tensor_content = STUB


# -- the wire format, as far as a Const's tensor_content ------------------------------------


class _Unsupported(Exception):
    """A record this module does not take apart (groups, several values where one is expected)."""


def _varint_at(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= end or shift > 63:
            raise _Unsupported("truncated varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


@dataclass(frozen=True)
class _Span:
    """A length-delimited field: where its length varint starts, where its value starts and ends."""

    length_at: int
    start: int
    end: int


def _fields(buf: memoryview, start: int, end: int) -> Iterator[tuple[int, _Span | None]]:
    pos = start
    while pos < end:
        tag, pos = _varint_at(buf, pos, end)
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            _, pos = _varint_at(buf, pos, end)
            yield field, None
        elif wire == 1:
            pos += 8
            yield field, None
        elif wire == 5:
            pos += 4
            yield field, None
        elif wire == 2:
            length_at = pos
            length, pos = _varint_at(buf, pos, end)
            if pos + length > end:
                raise _Unsupported("field runs past its message")
            yield field, _Span(length_at, pos, pos + length)
            pos += length
        else:
            raise _Unsupported("group")
    if pos != end:
        raise _Unsupported("field runs past its message")


def _only(spans: list[_Span]) -> _Span:
    if len(spans) != 1:
        raise _Unsupported("not exactly one")
    return spans[0]


def content_path(buf: memoryview, start: int, end: int) -> list[_Span]:
    """The spans from a NodeDef's ``attr["value"]`` entry down to its tensor's ``tensor_content``.

    NodeDef.attr (5) -> map entry (key 1 == "value", value 2) -> AttrValue.tensor (8) ->
    TensorProto.tensor_content (4). Raises :class:`_Unsupported` unless each is there exactly once.
    """
    entries = []
    for field, span in _fields(buf, start, end):
        if field == 5 and span is not None:
            keys = [s for f, s in _fields(buf, span.start, span.end) if f == 1 and s is not None]
            if keys and bytes(buf[keys[-1].start : keys[-1].end]) == b"value":
                entries.append(span)
    entry = _only(entries)
    value = _only([s for f, s in _fields(buf, entry.start, entry.end) if f == 2 and s is not None])
    tensor = _only([s for f, s in _fields(buf, value.start, value.end) if f == 8 and s is not None])
    content = _only([s for f, s in _fields(buf, tensor.start, tensor.end) if f == 4 and s is not None])
    return [entry, value, tensor, content]


def splice(buf: memoryview, start: int, end: int, path: list[_Span], length: int) -> tuple[bytes, bytes]:
    """Head and tail such that ``head + values + tail`` is the record with ``length`` bytes of values
    in place of the innermost span of ``path``; each enclosing length is written anew."""
    new_lengths = [length]
    for outer, inner in zip(reversed(path[:-1]), reversed(path[1:]), strict=True):
        old_inner = inner.end - inner.length_at
        new_inner = len(varint(new_lengths[-1])) + new_lengths[-1]
        new_lengths.append(outer.end - outer.start - old_inner + new_inner)
    new_lengths.reverse()
    head = bytearray()
    pos = start
    for span, new_length in zip(path, new_lengths, strict=True):
        head += buf[pos : span.length_at]
        head += varint(new_length)
        pos = span.start
    return bytes(head), bytes(buf[path[-1].end : end])


# -- reading ----------------------------------------------------------------------------------


def _read_varint(f: BinaryIO) -> tuple[int, bytes] | None:
    """A varint and its bytes as they were; None at the end of the file."""
    raw = bytearray()
    while True:
        byte = f.read(1)
        if not byte:
            if raw:
                raise _Unsupported("truncated varint")
            return None
        raw += byte
        if not byte[0] & 0x80:
            value = 0
            for i, b in enumerate(raw):
                value |= (b & 0x7F) << (7 * i)
            return value, bytes(raw)
        if len(raw) > 10:
            raise _Unsupported("varint too long")


def _read_exactly(f: BinaryIO, size: int) -> bytes:
    data = f.read(size)
    if len(data) != size:
        raise _Unsupported("truncated field")
    return data


def read_graph_def(path: Path) -> tuple[graph_pb2.GraphDef, Contents] | None:
    """The graph with its large constants left in the file, or None where the file is not a plain
    sequence of GraphDef fields (the caller then parses it whole and reports any error)."""
    source = SourceFile(path)
    contents = Contents(source)
    graph = graph_pb2.GraphDef()
    rest = bytearray()  # every field but the nodes (versions, library, unknown fields), parsed at the end
    try:
        with open(path, "rb") as f:
            while (tag := _read_varint(f)) is not None:
                value, tag_bytes = tag
                field, wire = value >> 3, value & 7
                if wire == 2:
                    length = _read_varint(f)
                    if length is None:
                        raise _Unsupported("truncated field")
                    value_at = f.tell()
                    data = _read_exactly(f, length[0])
                    if field == 1:
                        _add_node(graph, data, value_at, contents)
                    else:
                        rest += tag_bytes + length[1] + data
                elif wire == 0:
                    number = _read_varint(f)
                    if number is None:
                        raise _Unsupported("truncated field")
                    rest += tag_bytes + number[1]
                elif wire in (1, 5):
                    rest += tag_bytes + _read_exactly(f, 8 if wire == 1 else 4)
                else:
                    raise _Unsupported("group")
        graph.MergeFromString(bytes(rest))
    except (_Unsupported, message.DecodeError, ValueError, RuntimeWarning, OSError):
        source.close()
        return None
    return graph, contents


def _add_node(graph: graph_pb2.GraphDef, data: bytes, data_at: int, contents: Contents) -> None:
    """Parse one node record into ``graph``; a large Const goes in as a stub."""
    node = graph.node.add()
    if len(data) >= LARGE:
        buf = memoryview(data)
        try:
            path = content_path(buf, 0, len(buf))
        except _Unsupported:
            path = []
        if path and path[-1].end - path[-1].start >= LARGE:
            head, tail = splice(buf, 0, len(buf), path, len(STUB))
            node.ParseFromString(head + STUB + tail)
            tensor = node.attr["value"].tensor if "value" in node.attr else None
            np_dtype = plain_dtype(tensor.dtype) if tensor is not None else None
            if node.op == "Const" and tensor is not None and np_dtype is not None:
                lazy = FileTensor(contents.source, data_at + path[-1].start, tuple(d.size for d in tensor.tensor_shape.dim), np_dtype)
                if all(d >= 0 for d in lazy.shape) and lazy.nbytes == path[-1].end - path[-1].start:
                    contents.add(node.name, lazy)
                    return
    node.ParseFromString(data)


# -- writing ----------------------------------------------------------------------------------


def write_node(node: node_def_pb2.NodeDef, f: BinaryIO, contents: Contents | None) -> None:
    """One node record of a GraphDef (field 1), its values spliced in where the node is a stub."""
    lazy = contents.get(node) if contents is not None else None
    if lazy is None:
        if contents is not None and contents.was_stubbed(node.name) and _looks_stubbed(node):
            raise BrokenOutputError(f"node {node.name!r}: its values were left in the input file and are lost; this is a bug in bnfold")
        data = node.SerializeToString(deterministic=True)
        f.write(b"\n" + varint(len(data)))
        f.write(data)
        return
    record = memoryview(node.SerializeToString(deterministic=True))
    path = content_path(record, 0, len(record))
    nbytes = int(np.prod(lazy.shape, dtype=np.int64)) * lazy.dtype.itemsize
    head, tail = splice(record, 0, len(record), path, nbytes)
    f.write(b"\n" + varint(len(head) + nbytes + len(tail)))
    f.write(head)
    if isinstance(lazy, FileTensor):
        lazy.copy_to(f)
    else:
        f.write(lazy.read().reshape(-1).view(np.uint8).data)
    f.write(tail)


def _looks_stubbed(node: node_def_pb2.NodeDef) -> bool:
    return node.op == "Const" and "value" in node.attr and node.attr["value"].tensor.tensor_content == STUB


def materialize_all(graph_def: graph_pb2.GraphDef, contents: Contents) -> None:
    """Put every stub's values into ``graph_def`` (for writers that need the whole graph: text, SavedModel)."""
    for node in graph_def.node:
        lazy = contents.get(node)
        if lazy is None:
            continue
        _fill(node.attr["value"].tensor, lazy)


def _fill(tensor: tensor_pb2.TensorProto, lazy: LazyTensor) -> None:
    """A stub's tensor with its values put in: read straight into the buffer the proto copies from."""
    tensor.ClearField("tensor_content")
    buffer = ContentBuffer(lazy.shape, lazy.dtype)
    lazy.read(buffer.array)
    buffer.write_content(tensor)
