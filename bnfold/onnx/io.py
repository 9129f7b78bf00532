"""Read, check, run and write ONNX files, without TensorFlow.

External data follows the ONNX format: a tensor's ``location`` is relative to
the directory of the model file, never to the working directory. A location
that is absolute or leads out of that directory (``..``, a symlink out) is
refused before any data is read, because a model file is untrusted input and
must not make bnfold read (and then copy into the output) files elsewhere.

Writes keep tensors external when the input had them (or when the model would
pass protobuf's 2 GB limit), in one data file beside OUT named ``OUT.data``
(torch's convention); the model and its data file are written through
temporary files and renamed into place, data first.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from google.protobuf import message
from onnx import external_data_helper

from bnfold.core import protocol
from bnfold.core.comparison import InputSpec
from bnfold.core.errors import InputError, OutputError, UnsafeModelError, VerificationError, first_line
from bnfold.core.files import _umask, read_bytes

PROTOBUF_LIMIT = 2**31 - 1  # bytes: a serialized ModelProto cannot be larger
EXTERNAL_THRESHOLD = 1024  # bytes: smaller tensors stay inside the model file when writing external data



def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Node count per op type of the main graph: the before/after numbers of the report."""
    return dict(sorted(Counter(n.op_type for n in model.graph.node).items()))


def serialize_within_limit(model: onnx.ModelProto) -> bytes | None:
    """``model`` serialized, or None when it passes protobuf's 2 GB limit.

    With upb protobuf ``ByteSize()`` serializes the message to measure it (0.22 s
    for a 100 MB model, as long as ``SerializeToString()``), so asking the size
    first and then serializing does the work twice. ``onnx.checker`` and
    onnxruntime both take the bytes.
    """
    data = model.SerializeToString()
    return data if len(data) < PROTOBUF_LIMIT else None


def opset_of(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


# -- external data ---------------------------------------------------------------------
def _tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor that may hold external data: initializers, Constant values, subgraphs' too."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        yield from _node_tensors(node)


def _node_tensors(node: onnx.NodeProto) -> Iterator[onnx.TensorProto]:
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.TENSOR:
            yield attr.t
        elif attr.type == onnx.AttributeProto.TENSORS:
            yield from attr.tensors
        elif attr.type == onnx.AttributeProto.GRAPH:
            yield from _tensors(attr.g)
        elif attr.type == onnx.AttributeProto.GRAPHS:
            for sub in attr.graphs:
                yield from _tensors(sub)


def _function_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Tensors held by model-local functions' nodes (a function's Constant may keep its value in external data)."""
    for function in model.functions:
        for node in function.node:
            yield from _node_tensors(node)


def _model_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    yield from _tensors(model.graph)
    yield from _function_tensors(model)


def external_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    return [t for t in _model_tensors(model) if external_data_helper.uses_external_data(t)]


def check_locations(model: onnx.ModelProto, source: Path) -> None:
    """Refuse external-data locations outside the model's directory, before any of them is read."""
    base = source.resolve().parent
    for tensor in external_tensors(model):
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        where = f"{source}: tensor {tensor.name!r} has external data at {location!r}"
        if not location:
            raise InputError(f"{where}: no location; the model is corrupt")
        if os.path.isabs(location) or location.startswith(("/", "\\")) or ":" in Path(location).parts[0]:
            raise InputError(f"{where}, an absolute path; external data must lie beside the model (refused, nothing read)")
        if ".." in Path(location).parts:
            raise InputError(f"{where}, outside the model's directory; external data must lie beside the model (refused, nothing read)")
        target = (base / location).resolve()
        if base != target and base not in target.parents:
            raise InputError(f"{where}, a link out of the model's directory; external data must lie beside the model (refused, nothing read)")
        if not target.is_file():
            raise InputError(f"{where}: no such file beside the model; keep the data file next to {source.name}")
        try:
            offset, length = int(info.get("offset", 0)), int(info.get("length", -1))
        except ValueError:
            raise InputError(f"{where}: offset/length are not integers; the model is corrupt") from None
        if offset < 0 or (length >= 0 and offset + length > target.stat().st_size):
            raise InputError(f"{where}: offset {offset} + length {length} is past the end of the data file; the data file is truncated")


# -- reading -----------------------------------------------------------------------------
def check_input_model(model: onnx.ModelProto, source: str) -> None:
    if not model.graph.node:
        raise InputError(f"{source}: the ONNX model has no nodes (empty, truncated or not ONNX)")
    data = serialize_within_limit(model)
    try:
        onnx.checker.check_model(model if data is None else data, full_check=False)
    except (onnx.checker.ValidationError, ValueError) as exc:
        raise InputError(f"{source}: invalid ONNX model: {first_line(exc)}") from None


def _load_function_data(model: onnx.ModelProto, base: Path) -> None:
    """Read the external data of model-local functions' tensors from the model's directory.

    ``load_external_data_for_model`` covers the main graph only; left alone, a
    function's ``Constant`` was resolved by onnxruntime against the working
    directory. Locations were checked by :func:`check_locations` already.
    """
    for tensor in _function_tensors(model):
        if external_data_helper.uses_external_data(tensor):
            external_data_helper.load_external_data_for_tensor(tensor, str(base))
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]


def check_allowlist(model: onnx.ModelProto, source: str) -> None:
    """Refuse a model with ops outside ONNX's standard domains, unless trusted (:func:`bnfold.onnx.allowlist.onnx_refusal`)."""
    from bnfold.core.trust import enforced
    from bnfold.onnx.allowlist import onnx_refusal

    if not enforced():
        return
    found = onnx_refusal(model)
    if found:
        node, why = found
        raise UnsafeModelError(f"{source}: node {node!r} {why}; bnfold does not run such models: --trust-model runs it anyway")


def load_onnx(path: str | os.PathLike[str]) -> tuple[onnx.ModelProto, bool]:
    """Parse and check an ONNX file and its external data; returns the model and whether it had external data.

    Anything unusable is an :class:`InputError` (exit 3).
    """
    path = Path(path)
    data = read_bytes(path)
    if not data:
        raise InputError(f"{path}: file is empty")
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (message.DecodeError, RuntimeWarning) as exc:
        raise InputError(f"{path}: not an ONNX model ({first_line(exc)}); pass a .onnx file written by an ONNX exporter") from None
    del data
    check_allowlist(model, str(path))
    external = bool(external_tensors(model))
    if external:
        check_locations(model, path)
        try:
            external_data_helper.load_external_data_for_model(model, str(path.resolve().parent))
            _load_function_data(model, path.resolve().parent)
        except OSError as exc:
            raise InputError(f"{path}: cannot read its external data ({exc.strerror or exc})") from None
    check_input_model(model, str(path))
    return model, external


def known_dim(dim: Any) -> int | None:
    """An ONNX ``TensorShapeProto.Dimension`` as a size, or None where the model leaves it unknown.

    The spec's unknown is a ``dim_param`` (symbolic) or neither field set;
    exporters say it other ways too: ``dim_value: -1`` (PaddlePaddle, some
    TF converters) and ``dim_value: 0`` (older converters that write 0 for a
    free batch). No model input or weight is a zero-length axis on purpose, so
    a size must be positive to be known. A shape with no dims is a scalar, and
    a missing shape an unknown rank; both are read by the caller.
    """
    if dim.HasField("dim_value") and dim.dim_value > 0:
        return int(dim.dim_value)
    return None


def dims_of(tensor_type: Any) -> list[int | None] | None:
    """A tensor type's shape with unknown dims as None (:func:`known_dim`); None for an unknown rank."""
    if not tensor_type.HasField("shape"):
        return None
    return [known_dim(d) for d in tensor_type.shape.dim]


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """Graph inputs that are not initializers, as :class:`~bnfold.core.comparison.InputSpec` (symbolic dims: None)."""
    inits = {t.name for t in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in inits:
            continue
        tensor = value.type.tensor_type
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)) if tensor.elem_type else np.dtype(object)
        shape = dims_of(tensor)
        specs.append(InputSpec(value.name, dtype, shape))
    return specs


# -- running -------------------------------------------------------------------------------
def _free_unknown_dims(model: onnx.ModelProto) -> Any:
    """Make an input's ``-1``/``0`` dims symbolic for the session the check runs; returns what puts them back.

    onnxruntime holds a fed tensor to every ``dim_value`` (0 included), so a
    model that says "unknown" with 0 could not be checked at all. Only the
    session sees the change: the model written is the exporter's, as it came.
    """
    changed = []
    for value in model.graph.input:
        tensor = value.type.tensor_type
        if not tensor.HasField("shape"):
            continue
        for i, dim in enumerate(tensor.shape.dim):
            if dim.HasField("dim_value") and dim.dim_value <= 0:
                changed.append((dim, dim.dim_value))
                dim.dim_param = f"bnfold_unknown_{value.name}_{i}"

    def restore() -> None:
        for dim, size in changed:
            dim.dim_value = size

    return restore


class OrtRunner:
    """One onnxruntime session with graph optimizations off, fed and fetched by caller-side names.

    Optimizations are off so the check proves the file itself computes the
    original's outputs, not that a runtime folds it at load time. The session
    lives in bnfold's confined worker (:mod:`bnfold.core.worker`), whatever the
    model came from: the model's bytes, the feeds and the outputs cross as
    bytes, and a model past protobuf's 2 GB is written (external data) into
    the worker's private directory for it to load.
    """

    # onnxruntime's errors, as the worker reports them, and the worker's end.
    errors: tuple[type[BaseException], ...] = (Exception,)

    def __init__(self, model: onnx.ModelProto, names: dict[str, str] | None = None) -> None:
        from bnfold.core import worker as isolation
        from bnfold.onnx import runner

        self.names = names or {}
        restore = _free_unknown_dims(model)
        try:
            data = serialize_within_limit(model)
            self.worker = isolation.acquire(tensorflow=False)
            header: dict[str, object] = {"op": runner.LOAD}
            if data is None:
                where = tempfile.mkdtemp(prefix="ort-", dir=self.worker.limits.private_dir)
                copy = onnx.ModelProto()
                copy.CopyFrom(model)
                onnx.save_model(copy, os.path.join(where, "m.onnx"), save_as_external_data=True, location="m.onnx.data")
                del copy
                header["path"] = os.path.join(where, "m.onnx")
        finally:
            restore()
        try:
            head, _ = self.worker.request(header, data or b"")
        except isolation.GraphRunError as exc:
            isolation.release(self.worker)
            raise VerificationError(f"onnxruntime cannot load the model: {first_line(exc)}") from None
        except isolation.WorkerDied as exc:
            self.worker.stop()
            exc.engine = "onnxruntime"
            raise VerificationError(f"{exc.describe()} (loading the model in onnxruntime)") from None
        except BaseException:
            self.worker.stop()
            raise
        finally:
            if "path" in header:
                shutil.rmtree(os.path.dirname(str(header["path"])), ignore_errors=True)
        self.inputs = set(head.get("inputs", []))

    def run(self, fetches: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        from bnfold.core import worker as isolation

        mapped = {self.names.get(k, k): v for k, v in feeds.items()}
        fed = {k: v for k, v in mapped.items() if k in self.inputs}
        meta, payload = protocol.encode_arrays(list(fed.values()))
        header = {"op": "run", "fetches": [self.names.get(f, f) for f in fetches], "feeds": list(fed), "arrays": meta}
        try:
            head, body = self.worker.request(header, payload)
        except isolation.WorkerDied as exc:
            self.worker.stop()
            exc.engine = "onnxruntime"
            raise
        return protocol.decode_arrays(head["arrays"], body)

    def close(self) -> None:
        from bnfold.core import worker as isolation

        if not self.worker.alive:
            self.worker.stop()
            return
        try:
            self.worker.request({"op": "unload"})
        except (isolation.GraphRunError, isolation.WorkerDied):
            self.worker.stop()
            return
        isolation.release(self.worker)


# -- writing ---------------------------------------------------------------------------------
def data_file_for(dst: Path) -> Path:
    """Where the external data of ``dst`` goes: one file beside it, ``OUT.data`` (torch writes ``m.onnx.data``)."""
    return dst.with_name(dst.name + ".data")


def needs_external(model: onnx.ModelProto, external_input: bool, size: int | None = None) -> bool:
    """Write tensors external when the input had them or the model passes 2 GB (``size``: its serialized size, if known)."""
    if external_input:
        return True
    return (model.ByteSize() if size is None else size) >= PROTOBUF_LIMIT


def write_onnx(model: onnx.ModelProto, dst: str | os.PathLike[str], external: bool = False) -> Path | None:
    """Write ``model`` atomically; with ``external``, its large tensors go to one data file beside ``dst``.

    Returns the data file written, if any. ``model`` is left as it was (the
    tensors are converted on a copy).
    """
    dst = Path(dst)
    parent = dst.parent if str(dst.parent) else Path(".")
    if not external:
        data = model.SerializeToString(deterministic=True)
        from bnfold.core.files import atomic_write

        atomic_write(dst, lambda tmp: tmp.write_bytes(data))
        return None
    data_path = data_file_for(dst)
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=parent))
    try:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        for tensor in copy.graph.initializer:  # tensors loaded from the input's data files: forget their old places
            if external_data_helper.uses_external_data(tensor):
                tensor.data_location = onnx.TensorProto.DEFAULT
                del tensor.external_data[:]
        onnx.save_model(
            copy,
            str(tmpdir / dst.name),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data_path.name,
            size_threshold=EXTERNAL_THRESHOLD,
        )
        mode = 0o644 & ~_umask()
        written_data = tmpdir / data_path.name
        if not written_data.exists():
            written_data.write_bytes(b"")  # no tensor over the threshold: an empty data file keeps OUT's pair consistent
        for path in (written_data, tmpdir / dst.name):
            os.chmod(path, mode)
        os.replace(written_data, data_path)  # data before the model that names it
        os.replace(tmpdir / dst.name, dst)
    except OSError as exc:
        raise OutputError(f"{dst}: cannot write ({exc.strerror or exc})") from None
    finally:
        for leftover in tmpdir.iterdir() if tmpdir.exists() else []:
            leftover.unlink(missing_ok=True)
        if tmpdir.exists():
            tmpdir.rmdir()
    return data_path
