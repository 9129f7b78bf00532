"""Any model source as a frozen TensorFlow graph: GraphDef files, SavedModels, Keras files and objects, tf.functions.

The one place that picks the adapter for an input (by :mod:`bnfold.core.formats`'
rules and the source's type) and composes them where one format becomes
another: a Keras file is read by :mod:`bnfold.keras.load` and frozen by
:mod:`bnfold.tf.freeze`. Loading a SavedModel or a Keras file runs what the
model carries, so it happens in the confined worker (:func:`load_in_worker`);
this module also holds that request (:func:`serve_freeze`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO, Any

from tensorflow.core.framework import graph_pb2

from bnfold.core import sandbox, serve
from bnfold.core.errors import BnfoldError, InputError
from bnfold.core.formats import is_keras_path
from bnfold.core.protocol import send
from bnfold.core.result import DEFAULT_SIGNATURE, Signature
from bnfold.core.trust import enforced
from bnfold.core.worker import GraphRunError, WorkerDied, as_bnfold_error, ask
from bnfold.keras.fold import custom_objects
from bnfold.keras.load import check_keras_file, load_keras_model
from bnfold.tf import io
from bnfold.tf.freeze import Loaded, check_files_inside, check_saved_model, freeze_concrete_function, freeze_keras, load_saved_model_here

FREEZE = f"{__name__}:serve_freeze"


def freeze_in_worker(request: dict[str, Any]) -> tuple[bytes, dict[str, Any]]:
    """Ask a worker to load and freeze a model file (:func:`load_in_worker`); errors keep their exit codes."""
    path = str(request.get("path", ""))
    try:
        head, body = ask({"op": FREEZE, **request})
    except GraphRunError as exc:
        raise as_bnfold_error(exc, lambda text: InputError(f"{path}: cannot load the model ({text})")) from None
    except WorkerDied as exc:
        raise InputError(f"{path}: loading the model ended bnfold's worker: {exc.describe()}") from None
    return body, head


def serve_freeze(state: serve.State, head: dict[str, Any], payload: bytes, reply: IO[bytes]) -> None:
    """The worker's side of :func:`freeze_in_worker`: load and freeze the file, answer the GraphDef's bytes and the signature."""
    state.need_tensorflow("freeze")
    try:
        loaded = load_here(str(head["kind"]), Path(str(head["path"])), str(head["signature"]), bool(head["trust_model"]))
    except BnfoldError:
        raise
    except Exception as exc:  # noqa: BLE001 - a loader's own failure on a hostile or broken file: the parent reports it
        raise InputError(f"{head['path']}: cannot load the model ({type(exc).__name__}: {exc})") from None
    sig = loaded.signature
    signature = {"name": sig.name, "inputs": sig.inputs, "outputs": sig.outputs} if sig is not None else None
    data = loaded.graph_def.SerializeToString()
    del loaded
    send(reply, {"ok": True, "signature": signature}, data)


def load_saved_model(path: Path, signature: str = DEFAULT_SIGNATURE, trust_model: bool = False) -> Loaded:
    """Unless ``trust_model``, everything loading could run is checked against the allowlist first (:mod:`bnfold.tf.allowlist`);
    then the model is loaded in the confined worker (:func:`load_in_worker`)."""
    check_files_inside(path)
    if enforced(trust_model):
        check_saved_model(path)
    return load_in_worker("saved_model", path, signature, trust_model)


def load_keras_file(path: Path, trust_model: bool = False) -> Loaded:
    """A Keras file, loaded by the Keras that wrote it (:func:`load_keras_model`) and frozen in inference mode,
    in the confined worker (:func:`load_in_worker`); the allowlist is checked here first."""
    if enforced(trust_model):
        check_keras_file(path)
    return load_in_worker("keras", path, DEFAULT_SIGNATURE, trust_model)


def _load_keras_file_here(path: Path, trust_model: bool) -> Loaded:
    model = load_keras_model(path, trust_model, custom_objects)
    loaded = freeze_keras(model)
    loaded.source = str(path)
    return loaded


def load_in_worker(kind: str, path: Path, signature: str, trust_model: bool) -> Loaded:
    """Load and freeze a SavedModel or Keras file in the confined worker (:mod:`bnfold.core.sandbox`): loading
    runs what the model carries (restore functions, resource destructors, layer code under
    ``trust_model``); the worker may read the model's files and nothing else of the user's, and
    answers with the frozen GraphDef's bytes and the signature as JSON (no pickle)."""

    if serve.in_worker():
        return load_here(kind, path, signature, trust_model)
    sandbox.allow_read(path)
    graph_bytes, head = freeze_in_worker({"kind": kind, "path": str(path), "signature": signature, "trust_model": trust_model})
    graph_def = graph_pb2.GraphDef.FromString(graph_bytes)
    del graph_bytes
    sig = head.get("signature")
    found = Signature(str(sig["name"]), dict(sig["inputs"]), dict(sig["outputs"])) if isinstance(sig, dict) else None
    return Loaded(graph_def, str(path), found)


def load_here(kind: str, path: Path, signature: str, trust_model: bool) -> Loaded:
    """The worker's side of :func:`load_in_worker`; the checks of the model's bytes ran in bnfold's process."""
    if kind == "saved_model":
        return load_saved_model_here(path, signature)
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
        if is_keras_path(path):
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
