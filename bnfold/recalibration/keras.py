"""``bnfold recalibrate a.keras b.keras``: new BN statistics for a Keras model, written back as the same Keras model.

The statistics are measured where every model's are, on its frozen graph
(:func:`bnfold.recalibration.graph.recalibrate_graph`); what is Keras-specific is
telling which graph BN is which layer, and putting the values back into the
layers and saving the file. Loading a Keras file runs what it carries, so those
two steps run in bnfold's confined worker; both sides of that request (the
sender and the handler :data:`KERAS` names) are here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO, Any

import numpy as np
from tensorflow.core.framework import graph_pb2

from bnfold.core import protocol, serve
from bnfold.core.errors import BnfoldError, UsageError
from bnfold.core.protocol import decode_arrays, encode_arrays, first_line_of, send
from bnfold.core.recalibration import DEFAULT_MEMORY_BUDGET, Data, RecalibrationResult
from bnfold.recalibration.graph import recalibrate_graph
from bnfold.recalibration.sites import Site
from bnfold.tf.graph import parse_input


def _keras_bns(model: Any) -> list[Any]:
    from bnfold.keras.layer_graph import _sublayers

    return [layer for layer in _sublayers(model) if type(layer).__name__.endswith("BatchNormalization") and hasattr(layer, "moving_mean")]


def recalibrate_keras_file(
    src: Path,
    dst: Path,
    data: Data,
    *,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    trust_model: bool = False,
    outputs: list[str] | None = None,
    set_flags: dict[str, bool] | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
) -> RecalibrationResult:
    """A Keras model in, the same Keras model out with new ``moving_mean``/``moving_variance`` in each BN layer.

    The statistics are measured on the frozen graph like any other model's. To
    know which graph BN is which layer, the model is frozen once with each layer's
    moving mean set to a tag (layer number + 0.5); the real values are put back
    before anything runs, and the graph's BNs start from them.

    The model file is loaded only in bnfold's confined worker (:mod:`bnfold.core.worker`),
    twice: once to freeze the tagged graph (:func:`keras_tagged_here`; the GraphDef's
    bytes, the layer names and their statistics come back), once to set the new
    statistics and save the model in the worker's private directory
    (:func:`keras_write_here`; the file's bytes come back). This process measures
    (the runs happen in a worker too) and writes ``dst`` atomically.
    """
    from bnfold.keras.write import write_bytes
    from bnfold.tf.runsafety import trusting

    if outputs or set_flags or checkpoint:
        raise UsageError("--outputs/--set/--checkpoint apply to graphs and checkpoints; a Keras model takes none of them")
    if serve.in_worker():
        loaded, names, real = keras_tagged_here(str(src), trust_model)
    else:
        loaded, names, real = _keras_tagged_in_worker(src, trust_model)
    layer_of: dict[str, int] = {}

    def adopt(sites: list[Site]) -> None:
        for site in sites:
            if site.old_mean is None or not site.old_mean.size:
                continue
            number = float(np.ravel(site.old_mean)[0]) - 0.5
            if number.is_integer() and 0 <= number < len(names) and np.all(site.old_mean == number + 0.5):
                layer_of[site.name] = int(number)
                site.old_mean, site.old_var = real[int(number)][0].reshape(-1), real[int(number)][1].reshape(-1)
                site.label = names[int(number)]

    outputs = [parse_input(t)[0] for t in loaded.signature.outputs.values()] if loaded.signature else None
    with trusting(trust_model):
        result = recalibrate_graph(loaded.graph_def, data, outputs=outputs, memory_budget=memory_budget, source=str(src), adopt=adopt)
    missing = [names[i] for i in range(len(names)) if i not in layer_of.values()]
    if missing:
        result.notes.append(f"Keras BN layer(s) {', '.join(missing)} not found in the traced graph: their statistics are kept")
    values = {layer_of[name]: stats for name, stats in result.values.items() if name in layer_of}
    if serve.in_worker():
        saved = keras_write_here(str(src), str(dst), trust_model, values)
    else:
        saved = _keras_write_in_worker(src, dst, trust_model, values)
    write_bytes(dst, saved)
    result.signature = loaded.signature
    return result


def keras_tagged_here(src: str, trust_model: bool) -> tuple[Any, list[str], list[tuple[np.ndarray, np.ndarray]]]:
    """The worker's first step of :func:`recalibrate_keras_file`: the model frozen with each BN layer's moving mean
    set to its tag (layer number + 0.5), the layers' names, and their real moving means and variances."""
    from bnfold.keras.file import load_model
    from bnfold.tf.freeze import freeze_keras

    model = load_model(Path(src), trust_model)
    bns = _keras_bns(model)
    real = [(np.array(layer.moving_mean.numpy()), np.array(layer.moving_variance.numpy())) for layer in bns]
    try:
        for number, layer in enumerate(bns):
            layer.moving_mean.assign(np.full(real[number][0].shape, number + 0.5, real[number][0].dtype))
        loaded = freeze_keras(model)
    finally:
        for layer, (mean, _) in zip(bns, real, strict=True):
            layer.moving_mean.assign(mean)
    loaded.source = src
    return loaded, [layer.name for layer in bns], real


def keras_write_here(src: str, dst: str, trust_model: bool, values: dict[int, tuple[np.ndarray, np.ndarray]]) -> bytes:
    """The worker's second step of :func:`recalibrate_keras_file`: the model loaded again, ``values`` (by BN layer
    number, as :func:`keras_tagged_here` numbered them) set as the layers' moving statistics, in their shapes
    and dtypes, and the file saved for ``dst`` (and proven to load and predict the same) as bytes."""
    from bnfold.keras.file import load_model
    from bnfold.keras.write import saved_bytes

    model = load_model(Path(src), trust_model)
    bns = _keras_bns(model)
    for number, (mean, var) in values.items():
        if not 0 <= number < len(bns):
            raise UsageError(f"{src}: no BN layer number {number} in the model")
        layer = bns[number]
        for variable, value in ((layer.moving_mean, mean), (layer.moving_variance, var)):
            now = np.asarray(variable.numpy())
            variable.assign(np.asarray(value).reshape(now.shape).astype(now.dtype))
    return saved_bytes(model, Path(dst))


def _keras_request(src: Path, header: dict[str, Any], payload: bytes = b"") -> tuple[dict[str, Any], bytes]:
    """One ``keras_recalibrate`` step in a confined worker; its errors keep their exit codes."""
    from bnfold.core import worker as isolation
    from bnfold.core.errors import InputError

    try:
        return isolation.ask({"op": KERAS, "src": str(src), **header}, payload, engine="Keras")
    except isolation.GraphRunError as exc:
        raise isolation.as_bnfold_error(exc, lambda text: InputError(f"{src}: cannot recalibrate the model ({text})")) from None
    except isolation.WorkerDied as exc:
        raise InputError(f"{src}: recalibrating the model ended bnfold's worker: {exc.describe()}") from None


def _keras_tagged_in_worker(src: Path, trust_model: bool) -> tuple[Any, list[str], list[tuple[np.ndarray, np.ndarray]]]:
    """:func:`keras_tagged_here` in the worker: the file's checks here (nothing of it loaded), then GraphDef bytes,
    the signature and layer names as JSON and the statistics as arrays come back."""
    from bnfold.core import sandbox
    from bnfold.core.errors import InputError
    from bnfold.core.result import Signature
    from bnfold.keras.load import check_keras_input
    from bnfold.tf.freeze import Loaded

    check_keras_input(src, trust_model)  # refused here, before any Keras reads the file
    sandbox.allow_read(src)
    head, body = _keras_request(src, {"step": "freeze", "trust_model": trust_model})
    size = int(head["graph_bytes"])
    graph_def = graph_pb2.GraphDef.FromString(body[:size])
    arrays = protocol.decode_arrays(head["arrays"], body[size:])
    names = [str(n) for n in head["names"]]
    if len(arrays) != 2 * len(names):
        raise InputError(f"{src}: bnfold's worker answered {len(arrays)} statistics for {len(names)} BN layers")
    sig = head.get("signature")
    signature = Signature(str(sig["name"]), dict(sig["inputs"]), dict(sig["outputs"])) if isinstance(sig, dict) else None
    real = [(arrays[2 * i], arrays[2 * i + 1]) for i in range(len(names))]
    return Loaded(graph_def, str(src), signature), names, real


def _keras_write_in_worker(src: Path, dst: Path, trust_model: bool, values: dict[int, tuple[np.ndarray, np.ndarray]]) -> bytes:
    """:func:`keras_write_here` in the worker: layer numbers and the new statistics go in, the saved file's bytes come back."""

    numbers = sorted(values)
    meta, payload = protocol.encode_arrays([np.asarray(a, np.float64) for n in numbers for a in values[n]])
    header = {"step": "write", "dst": str(dst), "trust_model": trust_model, "layers": numbers, "arrays": meta}
    _, body = _keras_request(src, header, payload)
    return body


def serve_keras(state: serve.State, head: dict[str, Any], payload: bytes, reply: IO[bytes]) -> None:
    """``bnfold recalibrate a.keras b.keras`` in the worker (:func:`recalibrate_keras_file`), in two steps.

    ``freeze``: load the file, freeze it with each BN layer's moving mean tagged; answered with the GraphDef's bytes
    followed by the layers' real statistics as arrays, their names and the signature as JSON. ``write``: load the
    file again, set the new statistics sent as arrays (by layer number), save it in the private directory and
    check the saved file; answered with its bytes.
    """
    from bnfold.core.errors import InputError

    src, trust_model = str(head["src"]), bool(head["trust_model"])
    try:
        if head["step"] == "freeze":
            loaded, names, real = keras_tagged_here(src, trust_model)
            sig = loaded.signature
            signature = {"name": sig.name, "inputs": sig.inputs, "outputs": sig.outputs} if sig is not None else None
            graph = loaded.graph_def.SerializeToString()
            del loaded
            meta, data = encode_arrays([a for pair in real for a in pair])
            send(reply, {"ok": True, "graph_bytes": len(graph), "names": names, "arrays": meta, "signature": signature}, graph + data)
            return
        if head["step"] != "write":
            raise ValueError(f"unknown keras_recalibrate step {head['step']!r}")
        arrays = decode_arrays(head["arrays"], payload)
        numbers = [int(n) for n in head["layers"]]
        if len(arrays) != 2 * len(numbers):
            raise ValueError("keras_recalibrate: two arrays per layer")
        values = {n: (arrays[2 * i], arrays[2 * i + 1]) for i, n in enumerate(numbers)}
        data = keras_write_here(src, str(head["dst"]), trust_model, values)
    except (BnfoldError, MemoryError, ValueError):
        raise
    except Exception as exc:  # noqa: BLE001 - a layer's own code (a trusted Lambda) failing in the confined worker
        raise InputError(f"{src}: the model failed in bnfold's worker ({type(exc).__name__}: {first_line_of(str(exc))})") from None
    send(reply, {"ok": True}, data)


KERAS = f"{__name__}:serve_keras"
