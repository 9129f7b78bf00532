"""Take models as users have them and freeze them the way TensorFlow does today.

SavedModel directories, ``.keras``/``.h5`` files, in-memory Keras models and
``tf.function``s all become a frozen ``GraphDef`` in inference mode
(``training=False``) through TF's own ``convert_variables_to_constants_v2``,
plus a :class:`Signature` that remembers the user-facing input and output names
so a folded SavedModel can be written back with the same interface.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tensorflow as tf
from tensorflow.core.framework import graph_pb2

from bnfold import io
from bnfold.errors import InputError, UnsafeModelError, first_line

DEFAULT_SIGNATURE = "serving_default"


@dataclass
class Signature:
    """A serving signature: its name, and key -> tensor name in the frozen graph for inputs and outputs."""

    name: str = DEFAULT_SIGNATURE
    inputs: dict[str, str] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)


@dataclass
class Loaded:
    """A frozen graph, where it came from, and its signature when the source had one."""

    graph_def: graph_pb2.GraphDef
    source: str
    signature: Signature | None = None


def freeze_concrete_function(function: Any, name: str = DEFAULT_SIGNATURE) -> Loaded:
    """Inline variables as constants; keys come from the function's structured inputs/outputs."""
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    frozen = convert_variables_to_constants_v2(function)
    placeholders = [t for t in frozen.inputs if t.dtype != tf.resource]
    _, kwargs = function.structured_input_signature if function.structured_input_signature else ((), {})
    if kwargs and len(kwargs) == len(placeholders):
        keys = [spec.name or key for key, spec in sorted(kwargs.items())]
        by_name = {t.name.split(":")[0]: t.name for t in placeholders}
        inputs = {key: by_name.get(key, t.name) for key, t in zip(keys, placeholders, strict=True)}
    else:
        inputs = {t.name.split(":")[0]: t.name for t in placeholders}
    structured = function.structured_outputs
    if isinstance(structured, dict) and len(structured) == len(frozen.outputs):
        keys = sorted(structured)  # tf.nest flattens dicts in sorted key order
    else:
        keys = [f"output_{i}" for i in range(len(frozen.outputs))]
    outputs = {key: t.name for key, t in zip(keys, frozen.outputs, strict=True)}
    return Loaded(frozen.graph.as_graph_def(), f"<{type(function).__name__}>", Signature(name, inputs, outputs))


def freeze_keras(model: Any, batch_size: int | None = None) -> Loaded:
    """Freeze a Keras 3 or tf_keras model in inference mode, named like ``model.export`` names things."""
    specs = [tf.TensorSpec([batch_size, *t.shape[1:]], t.dtype, name=_keras_input_name(t)) for t in model.inputs]
    single = len(specs) == 1

    @tf.function(input_signature=specs)
    def serve(*args: tf.Tensor) -> Any:
        outputs = model(args[0] if single else list(args), training=False)
        if isinstance(outputs, dict):
            return outputs
        flat = outputs if isinstance(outputs, list | tuple) else [outputs]
        return {f"output_{i}": t for i, t in enumerate(flat)}

    loaded = freeze_concrete_function(serve.get_concrete_function())
    placeholders = [n.name for n in loaded.graph_def.node if n.op == "Placeholder"]
    assert loaded.signature is not None
    loaded.signature.inputs = {spec.name: f"{name}:0" for spec, name in zip(specs, placeholders, strict=True)}
    loaded.source = f"<{type(model).__name__} {getattr(model, 'name', '')}>"
    return loaded


def _keras_input_name(tensor: Any) -> str:
    name = getattr(tensor, "name", "") or "input"
    return name.split(":")[0]


def check_saved_model(path: Path) -> None:
    """Refuse a SavedModel whose loading would run ops that reach outside the process (``trust_model`` skips this)."""
    from google.protobuf import message, text_format
    from tensorflow.core.protobuf import saved_model_pb2

    from bnfold.runsafety import saved_model_load_refusals

    proto = saved_model_pb2.SavedModel()
    try:
        if (path / "saved_model.pb").exists():
            proto.ParseFromString((path / "saved_model.pb").read_bytes())
        else:
            text_format.Parse((path / "saved_model.pbtxt").read_text(), proto)
    except (OSError, message.DecodeError, text_format.ParseError, UnicodeDecodeError, RecursionError) as exc:
        raise InputError(f"{path}: cannot load SavedModel ({first_line(exc)[:200]})") from None
    refusals = saved_model_load_refusals(proto)
    if refusals:
        first = refusals[0]
        raise UnsafeModelError(
            f"{path}: loading the SavedModel would run node {first.where!r} ({first.op}), which {first.reason}; "
            "bnfold does not run such graphs: --trust-model loads it anyway"
        )


def check_files_inside(path: Path) -> None:
    """Refuse a SavedModel whose files (``variables/``, ``assets/``) are links that leave its directory.

    TensorFlow follows them, so a model could make bnfold read ``~/.ssh/id_rsa``
    into the folded weights; bnfold refuses the same for ONNX external data.
    Checked with and without ``trust_model``: a link out is no property of a model.
    """
    root = os.path.realpath(path)
    for folder, dirs, names in os.walk(path):
        for name in [*dirs, *names]:
            entry = os.path.join(folder, name)
            real = os.path.realpath(entry)
            if os.path.commonpath([root, real]) != root:
                shown = os.path.relpath(entry, path)
                raise InputError(f"{path}: {shown} links outside the SavedModel (to {real}); copy the file into the model directory")


def load_saved_model(path: Path, signature: str = DEFAULT_SIGNATURE, trust_model: bool = False) -> Loaded:
    """Unless ``trust_model``, what loading runs (resource initializers, init ops) is checked first."""
    check_files_inside(path)
    if not trust_model:
        check_saved_model(path)
    return load_in_worker("saved_model", path, signature, trust_model)


def _load_saved_model_here(path: Path, signature: str) -> Loaded:
    try:
        model = tf.saved_model.load(str(path))
    except (OSError, ValueError, tf.errors.OpError) as exc:
        from bnfold.isolation import op_error_text

        text = op_error_text(exc.message) if isinstance(exc, tf.errors.OpError) else str(exc)
        raise InputError(f"{path}: cannot load SavedModel ({first_line(Exception(text))[:300]})") from None
    signatures = getattr(model, "signatures", {})
    if signature not in signatures:
        known = ", ".join(sorted(signatures)) or "none"
        raise InputError(f"{path}: no signature {signature!r} (signatures: {known}); pick one with --signature")
    loaded = freeze_concrete_function(signatures[signature], signature)
    loaded.source = str(path)
    return loaded


# Keras layer classes whose config is Python code (marshalled bytecode, or a function to call by name).
CODE_LAYERS = {"Lambda", "TFOpLambda", "SlicingOpLambda"}
# Packages a Keras config may name in "module" without bnfold importing foreign code (bnfold: its own ChannelAffine).
KERAS_MODULES = ("keras", "tf_keras", "bnfold")


def keras_config(path: Path) -> Any:
    """The model config of a .keras (zip: config.json) or .h5 (HDF5 attribute ``model_config``), read without Keras.

    Reading the JSON runs nothing; it lets bnfold see what the file would make
    Keras execute before Keras deserializes anything.
    """
    try:
        if path.suffix.lower() == ".keras":
            import zipfile

            with zipfile.ZipFile(path) as archive:
                text: Any = archive.read("config.json")
        else:
            import h5py

            with h5py.File(path, "r") as handle:
                text = handle.attrs.get("model_config")
    except Exception as exc:  # noqa: BLE001 - zipfile.BadZipFile, KeyError (no config.json), h5py's OSError
        raise InputError(f"{path}: not a Keras model file ({first_line(exc)[:200]})") from None
    if text is None:
        raise InputError(f"{path}: no model config in the file (a weights-only .h5?); save the whole model (model.save)")
    try:
        return json.loads(text.decode() if isinstance(text, bytes) else str(text))
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: the model config is not JSON ({first_line(exc)[:200]})") from None


def code_in_config(config: Any, layer: str = "<model>") -> tuple[str, str] | None:
    """(layer name, why) for the first object in a Keras config that carries or names Python code, else None.

    Walks every nested dict and list, so layers inside nested models and
    wrappers (Bidirectional, TimeDistributed) are seen; an object is code when it
    is a code layer, a serialized lambda (``__lambda__``, ``function_type:
    lambda``), a function or class from a module outside Keras (loading would
    import and call it), or a ``TFOpLambda`` that calls something that is not a
    TensorFlow op.
    """
    if isinstance(config, list):
        for item in config:
            found = code_in_config(item, layer)
            if found:
                return found
        return None
    if not isinstance(config, dict):
        return None
    inner = config.get("config")
    name = config.get("name") or (inner.get("name") if isinstance(inner, dict) else None)
    if "class_name" in config and isinstance(name, str):
        layer = name
    class_name = config.get("class_name")
    if class_name in ("TFOpLambda", "SlicingOpLambda") and isinstance(inner, dict):
        target = inner.get("function")
        if not _is_tf_op(target):
            return layer, f"{class_name} calls tf.{target}, which is not a TensorFlow op"
    elif class_name in CODE_LAYERS:
        return layer, f"is a {class_name} layer: its config is Python code"
    if class_name == "__lambda__" or config.get("function_type") == "lambda" or config.get("output_shape_type") == "lambda":
        return layer, "carries a serialized Python lambda"
    module = config.get("module")
    if isinstance(module, str) and "class_name" in config and module.split(".")[0] not in KERAS_MODULES:
        return layer, f"names {module}.{class_name}: loading it would import and run code from outside Keras"
    for key, value in config.items():
        if key != "module":
            found = code_in_config(value, layer)
            if found:
                return found
    return None


def _is_tf_op(name: object) -> bool:
    """``nn.relu`` -> True: a TFOpLambda target that builds TensorFlow graph ops (checked again before any run)."""
    import functools

    if not isinstance(name, str):
        return False
    try:
        symbol = functools.reduce(getattr, name.split("."), tf)
    except AttributeError:
        return False
    module = getattr(symbol, "__module__", "") or ""
    return module.startswith("tensorflow.python.ops.") and module != "tensorflow.python.ops.script_ops"


def check_keras_file(path: Path) -> None:
    """Refuse a Keras file whose config carries code, before Keras reads it (``trust_model`` skips this)."""
    found = code_in_config(keras_config(path))
    if found:
        layer, why = found
        raise UnsafeModelError(
            f"{path}: layer {layer!r} {why}; bnfold does not run code from model files: "
            "rebuild the model without it, or pass --trust-model (trust_model=True) if you trust this file"
        )


def load_keras_file(path: Path, trust_model: bool = False) -> Loaded:
    """A ``.keras`` file with Keras 3; an ``.h5`` with Keras 3, else legacy tf_keras.

    Unless ``trust_model``, the config is checked for code first and Keras 3
    loads in safe mode (no lambdas); legacy tf_keras has no safe mode for .h5,
    which is why the config check comes before either.
    """
    if not trust_model:
        check_keras_file(path)
    return load_in_worker("keras", path, DEFAULT_SIGNATURE, trust_model)


def _load_keras_file_here(path: Path, trust_model: bool) -> Loaded:
    errors = []
    try:
        import keras

        model = keras.saving.load_model(str(path), compile=False, safe_mode=not trust_model)
    except Exception as exc:  # noqa: BLE001 - Keras raises many kinds for files it cannot read
        errors.append(f"keras: {first_line(exc)[:200]}")
        model = None
    if model is None and path.suffix.lower() in (".h5", ".hdf5"):
        try:
            import tf_keras
        except ImportError:
            raise InputError(
                f"{path}: Keras 3 cannot load this .h5 ({errors[0]}); install tf_keras (pip install tf_keras) for legacy files"
            ) from None
        try:
            model = tf_keras.models.load_model(str(path), compile=False, safe_mode=not trust_model)
        except Exception as exc:  # noqa: BLE001
            errors.append(f"tf_keras: {first_line(exc)[:200]}")
    if model is None:
        raise InputError(f"{path}: not a loadable Keras model ({'; '.join(errors)})")
    loaded = freeze_keras(model)
    loaded.source = str(path)
    return loaded


def load_in_worker(kind: str, path: Path, signature: str, trust_model: bool) -> Loaded:
    """Load and freeze a SavedModel or Keras file in the confined worker (:mod:`bnfold.sandbox`): loading
    runs what the model carries (restore functions, resource destructors, layer code under
    ``trust_model``); the worker may read the model's files and nothing else of the user's, and
    answers with the frozen GraphDef's bytes and the signature as JSON (no pickle)."""
    from bnfold import isolation, sandbox

    if isolation.in_worker():
        return load_here(kind, path, signature, trust_model)
    sandbox.allow_read(path)
    graph_bytes, head = isolation.freeze_in_worker({"kind": kind, "path": str(path), "signature": signature, "trust_model": trust_model})
    graph_def = graph_pb2.GraphDef.FromString(graph_bytes)
    del graph_bytes
    sig = head.get("signature")
    found = Signature(str(sig["name"]), dict(sig["inputs"]), dict(sig["outputs"])) if isinstance(sig, dict) else None
    return Loaded(graph_def, str(path), found)


def load_here(kind: str, path: Path, signature: str, trust_model: bool) -> Loaded:
    """The worker's side of :func:`load_in_worker`; the checks of the model's bytes ran in bnfold's process."""
    if kind == "saved_model":
        return _load_saved_model_here(path, signature)
    return _load_keras_file_here(path, trust_model)


def load(source: Any, signature: str = DEFAULT_SIGNATURE, trust_model: bool = False) -> Loaded:
    """Any supported source -> frozen GraphDef (never modifying the source); ``trust_model`` lets Keras files run their code."""
    if isinstance(source, graph_pb2.GraphDef):
        io.check_graph(source, "<GraphDef>")
        return Loaded(source, "<GraphDef>")
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        if path.is_dir():
            if not (path / "saved_model.pb").exists() and not (path / "saved_model.pbtxt").exists():
                raise InputError(
                    f"{path}: directory is not a SavedModel (no saved_model.pb); pass a SavedModel, .keras, .h5, .pb or .pbtxt"
                )
            return load_saved_model(path, signature, trust_model)
        if path.suffix.lower() in (".keras", ".h5", ".hdf5"):
            if not path.exists():
                raise InputError(f"{path}: no such file")
            return load_keras_file(path, trust_model)
        return Loaded(io.load_graph_def(path), str(path))
    if hasattr(source, "structured_outputs") and hasattr(source, "graph"):
        return freeze_concrete_function(source)
    if hasattr(source, "get_concrete_function") and not hasattr(source, "inputs"):
        try:
            function = source.get_concrete_function()
        except (TypeError, ValueError):
            raise InputError("tf.function has no input_signature; pass fn.get_concrete_function(tf.TensorSpec(...))") from None
        return freeze_concrete_function(function)
    if hasattr(source, "inputs") and callable(source):
        return freeze_keras(source)
    raise InputError(f"cannot fold a {type(source).__name__}: pass a GraphDef, a path, a Keras model or a tf.function")
