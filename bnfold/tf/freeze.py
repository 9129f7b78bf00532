"""Take models as users have them and freeze them the way TensorFlow does today.

SavedModel directories, ``.keras``/``.h5`` files, in-memory Keras models and
``tf.function``s all become a frozen ``GraphDef`` in inference mode
(``training=False``) through TF's own ``convert_variables_to_constants_v2``,
plus a :class:`Signature` that remembers the user-facing input and output names
so a folded SavedModel can be written back with the same interface.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tensorflow as tf
from tensorflow.core.framework import graph_pb2

from bnfold.core.errors import InputError, UnsafeModelError, first_line
from bnfold.core.result import DEFAULT_SIGNATURE, Signature


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

    from bnfold.tf.allowlist import saved_model_refusals

    proto = saved_model_pb2.SavedModel()
    try:
        if (path / "saved_model.pb").exists():
            proto.ParseFromString((path / "saved_model.pb").read_bytes())
        else:
            text_format.Parse((path / "saved_model.pbtxt").read_text(), proto)
    except (OSError, message.DecodeError, text_format.ParseError, UnicodeDecodeError, RecursionError) as exc:
        raise InputError(f"{path}: cannot load SavedModel ({first_line(exc)[:200]})") from None
    refusals = saved_model_refusals(proto)
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


def load_saved_model_here(path: Path, signature: str) -> Loaded:
    try:
        model = tf.saved_model.load(str(path))
    except (OSError, ValueError, tf.errors.OpError) as exc:
        from bnfold.core.protocol import op_error_text

        text = op_error_text(exc.message) if isinstance(exc, tf.errors.OpError) else str(exc)
        raise InputError(f"{path}: cannot load SavedModel ({first_line(Exception(text))[:300]})") from None
    signatures = getattr(model, "signatures", {})
    if signature not in signatures:
        known = ", ".join(sorted(signatures)) or "none"
        raise InputError(f"{path}: no signature {signature!r} (signatures: {known}); pick one with --signature")
    loaded = freeze_concrete_function(signatures[signature], signature)
    loaded.source = str(path)
    return loaded


