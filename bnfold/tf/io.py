"""Load frozen graphs and write results atomically.

Writes go to a temporary file in the destination directory and are renamed into
place, so an interrupted run never leaves a half-written model behind and the
input is never touched.
"""

from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from google.protobuf import message, text_format
from tensorflow.core.framework import graph_pb2, node_def_pb2

from bnfold.core.errors import InputError, OutputError, first_line
from bnfold.core.files import _umask, atomic_write, read_bytes, terminating_cleanly
from bnfold.core.formats import check_output_format, is_saved_model_destination
from bnfold.core.result import FoldResult, Signature
from bnfold.tf.graph import parse_input

if TYPE_CHECKING:
    from bnfold.tf.streaming import Contents

TEXT_SUFFIXES = {".pbtxt", ".pbtext", ".txt"}
VARIABLE_OPS = {"VariableV2", "Variable", "VarHandleOp", "ReadVariableOp", "ResourceGather", "AssignVariableOp"}


def load_graph_def_streaming(path: str | os.PathLike[str]) -> tuple[graph_pb2.GraphDef, Contents | None]:
    """A binary GraphDef read node by node, its large constants left in the file (:mod:`bnfold.tf.streaming`),
    with the same checks as :func:`load_graph_def`; a file that cannot be read that way is read whole."""
    path = Path(path)
    if path.suffix.lower() not in TEXT_SUFFIXES and path.is_file():
        from bnfold.tf.streaming import read_graph_def

        try:
            parsed = read_graph_def(path)
        except OSError:
            parsed = None  # read whole below, which reports why
        if parsed is not None and parsed[0].node:
            graph_def, contents = parsed
            try:
                check_versions(graph_def, str(path))
                check_graph(graph_def, str(path))
            except BaseException:
                contents.close()
                raise
            return graph_def, contents
        if parsed is not None:
            parsed[1].close()
    return load_graph_def(path), None


def load_graph_def(path: str | os.PathLike[str]) -> graph_pb2.GraphDef:
    """Parse a binary or text GraphDef and check that it is a usable frozen graph."""
    path = Path(path)
    data = read_bytes(path)
    graph_def = graph_pb2.GraphDef()
    if not data:
        raise InputError(f"{path}: file is empty")
    try:
        if path.suffix.lower() in TEXT_SUFFIXES:
            text_format.Parse(data.decode("utf-8"), graph_def)
        else:
            graph_def.ParseFromString(data)
    except RecursionError:  # protobuf's text parser recurses once per nesting level
        raise InputError(f"{path}: nested too deeply to be a GraphDef; pass a frozen .pb or .pbtxt") from None
    except (message.DecodeError, text_format.ParseError, UnicodeDecodeError, RuntimeWarning) as exc:
        kind = "text" if path.suffix.lower() in TEXT_SUFFIXES else "binary"
        raise InputError(f"{path}: not a {kind} GraphDef ({first_line(exc)}); pass a frozen .pb or .pbtxt") from None
    # No `versions` record is no sign of a cut file: TF 1.x wrote none (GraphDef producer 0).
    # A cut is detected only where certain: a parse error above, a node reading a missing
    # node (check_graph), an output the user named that is not there (api._check_names).
    check_versions(graph_def, str(path))
    check_graph(graph_def, str(path))
    return graph_def


def check_versions(graph_def: graph_pb2.GraphDef, source: str) -> None:
    """Refuse a graph only on TensorFlow's own versioning rules (``VersionDef``, core/public/version.h).

    TF imports any producer from ``GRAPH_DEF_VERSION_MIN_PRODUCER`` (0: TF 1.x graphs
    without a ``versions`` record) up; it refuses a graph whose ``min_consumer`` is newer
    than itself or that lists its version in ``bad_consumers``. Conventions that changed
    with the producer version (an empty placeholder ``shape {}`` is "unknown" up to producer 21) are read by
    :func:`legacy_empty_shape_is_unknown`.
    """
    import tensorflow as tf

    versions = graph_def.versions
    current = tf.version.GRAPH_DEF_VERSION
    if versions.producer < tf.version.GRAPH_DEF_VERSION_MIN_PRODUCER:
        raise InputError(
            f"{source}: GraphDef producer {versions.producer} is older than TensorFlow {tf.__version__} reads "
            f"(min producer {tf.version.GRAPH_DEF_VERSION_MIN_PRODUCER}); convert it with an older TensorFlow"
        )
    if versions.min_consumer > current:
        raise InputError(
            f"{source}: the graph needs a TensorFlow reading GraphDef version {versions.min_consumer}; "
            f"TensorFlow {tf.__version__} reads up to {current}: upgrade TensorFlow"
        )
    if current in versions.bad_consumers:
        raise InputError(f"{source}: the graph declares GraphDef version {current} (TensorFlow {tf.__version__}) a bad consumer")


# GraphDef version 22 (core/public/version.h: "Placeholder now can specify and enforce scalar"):
# TensorFlow's Placeholder shape function reads an empty shape as unknown when producer <= 21.
EMPTY_SHAPE_IS_SCALAR_SINCE = 22


def legacy_empty_shape_is_unknown(graph_def: graph_pb2.GraphDef) -> bool:
    """Whether a placeholder's empty ``shape {}`` means "unknown shape", as TF reads graphs of producer 21 and older."""
    return graph_def.versions.producer < EMPTY_SHAPE_IS_SCALAR_SINCE


def check_graph(graph_def: graph_pb2.GraphDef, source: str) -> None:
    """Refuse graphs that are not frozen or not well formed, naming the first culprit."""
    if not graph_def.node:
        raise InputError(f"{source}: the graph has no nodes; pass a frozen .pb or .pbtxt")
    names: set[str] = set()
    for node in graph_def.node:
        if not node.name or not node.op:
            raise InputError(f"{source}: not a GraphDef (a node without name or op)")
        if node.name in names:
            raise InputError(f"{source}: duplicate node name {node.name!r}; the graph is corrupt")
        names.add(node.name)
        if node.op in VARIABLE_OPS:
            raise InputError(
                f"{source}: not frozen: node {node.name!r} is a variable ({node.op}); "
                "pass the SavedModel directory or Keras file instead, or freeze it first"
            )
    for node in graph_def.node:
        for ref in node.input:
            if parse_input(ref)[0] not in names:
                raise InputError(f"{source}: node {node.name!r} reads missing node {ref!r}; the graph is corrupt")
        missing = _missing_attr(node)
        if missing:
            raise InputError(f"{source}: node {node.name!r} ({node.op}) lacks required attribute {missing!r}; the graph is corrupt")


def _missing_attr(node: node_def_pb2.NodeDef) -> str | None:
    """A required attribute (no default in TF's op registry) that the node lacks.

    TensorFlow can abort the whole process when it runs such a node, so it is
    refused before verification runs anything. Unknown (custom) ops pass.
    """
    for name in _required_attrs(node.op):
        if name not in node.attr:
            return name
    return None


@functools.lru_cache(maxsize=4096)
def _required_attrs(op: str) -> tuple[str, ...]:
    """The attributes of ``op`` without a default, read from the registry once per op type."""
    from tensorflow.python.framework import op_def_registry

    op_def = op_def_registry.get(op)
    if op_def is None:
        return ()
    return tuple(a.name for a in op_def.attr if not a.HasField("default_value"))


def write_saved_model(graph_def: graph_pb2.GraphDef, signature: str, inputs: dict[str, str], outputs: dict[str, str], dst: Path) -> None:
    """Write a frozen graph as a SavedModel with one signature, built in a temporary directory and renamed in.

    Keys of ``inputs``/``outputs`` become the signature's argument and output
    names, so TF Serving clients of the original keep working.
    """
    import tensorflow as tf

    def imported() -> None:
        tf.compat.v1.import_graph_def(graph_def, name="")

    wrapped = tf.compat.v1.wrap_function(imported, [])
    graph = wrapped.graph
    in_keys = list(inputs)
    feeds = [graph.get_tensor_by_name(inputs[k]) for k in in_keys]
    fetches = {k: graph.get_tensor_by_name(v if ":" in v else f"{v}:0") for k, v in outputs.items()}
    pruned = wrapped.prune(feeds=feeds, fetches=fetches)
    specs = [tf.TensorSpec(t.shape, t.dtype, name=k) for k, t in zip(in_keys, feeds, strict=True)]

    @tf.function(input_signature=specs)
    def serve(*args: tf.Tensor) -> dict[str, tf.Tensor]:
        return pruned(*args)

    module = tf.Module()
    module.serve = serve
    parent = dst.parent if str(dst.parent) else Path(".")
    with terminating_cleanly():
        _save_in_place(module, signature, serve, dst, parent)


def _save_in_place(module: object, signature: str, serve: object, dst: Path, parent: Path) -> None:
    """Save into a temporary directory beside ``dst`` and rename it in; nothing is left on any failure."""
    import shutil

    import tensorflow as tf

    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; a model directory follows the umask, like files
        tf.saved_model.save(module, str(tmp), signatures={signature: serve})
        if dst.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old.", dir=parent))
            os.replace(dst, old / "model")
            os.replace(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dst)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputError(f"{dst}: cannot write SavedModel ({exc.strerror or exc})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def graph_def_bytes(graph_def: graph_pb2.GraphDef, text: bool) -> bytes:
    if text:
        return text_format.MessageToString(graph_def).encode("utf-8")
    return graph_def.SerializeToString(deterministic=True)


def write_graph_def(graph_def: graph_pb2.GraphDef, dst: str | os.PathLike[str], contents: Contents | None = None) -> None:
    """Write ``.pb``/``.pbtxt`` atomically; ``contents`` fills the graph's stubs (:mod:`bnfold.tf.streaming`)."""
    dst = Path(dst)
    if dst.suffix.lower() in TEXT_SUFFIXES:
        if contents is not None:
            from bnfold.tf.streaming import materialize_all

            materialize_all(graph_def, contents)
        data = graph_def_bytes(graph_def, True)
        atomic_write(dst, lambda tmp: tmp.write_bytes(data))
        return

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            stream_graph_def(graph_def, f, contents)
        if contents is not None:
            contents.source.check_unchanged()  # the values spliced in are the ones the graph was read with

    atomic_write(dst, write)


def stream_graph_def(graph_def: graph_pb2.GraphDef, f: BinaryIO, contents: Contents | None = None) -> None:
    """Write exactly ``graph_def.SerializeToString(deterministic=True)``, one node at a time.

    A GraphDef is its nodes (field 1, length-delimited) followed by its other
    fields (library, versions), so the serialized model never has to sit in
    memory whole: the largest piece held is one node. A stub's values
    (``contents``) are spliced into its record as it is written.
    """
    from bnfold.tf.streaming import write_node

    for node in graph_def.node:
        write_node(node, f, contents)
    rest = graph_pb2.GraphDef()
    for descriptor, value in graph_def.ListFields():
        if descriptor.name == "node":
            continue
        if descriptor.message_type is not None:
            getattr(rest, descriptor.name).CopyFrom(value)
        else:
            setattr(rest, descriptor.name, value)
    f.write(rest.SerializeToString(deterministic=True))


def write_result(result: FoldResult, dst: str | os.PathLike[str]) -> None:
    """Write a folded TF graph as .pb/.pbtxt, or as a SavedModel directory with the source's signature."""
    assert result.graph_def is not None
    check_output_format(dst)
    if is_saved_model_destination(dst):
        signature = result.signature or Signature(
            inputs={n: f"{n}:0" for n in result.inputs},
            outputs={parse_input(n)[0]: f"{parse_input(n)[0]}:{parse_input(n)[1]}" for n in result.outputs},
        )
        if result.contents is not None:
            from bnfold.tf.streaming import materialize_all

            materialize_all(result.graph_def, result.contents)
        write_saved_model(result.graph_def, signature.name, signature.inputs, signature.outputs, Path(dst))
    else:
        write_graph_def(result.graph_def, dst, result.contents)
