"""Read a Keras file as its author saved it: the config as JSON first, then the Keras that wrote it.

The file's own ``keras_version`` picks the loader (Keras 3, or tf_keras for
files of Keras 1/2); the model that comes back must have the inputs and outputs
the file declares. Nothing here runs before the config passed the allowlist
(:mod:`bnfold.keras.allowlist`) unless the user trusts the file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bnfold.core.errors import InputError, UnsafeModelError, first_line
from bnfold.core.trust import enforced
from bnfold.keras.allowlist import keras_refusal


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


def code_in_config(config: Any) -> tuple[str, str] | None:
    """(layer name, why) for the first entry of a Keras config not on the allowlist (:func:`bnfold.keras.allowlist.keras_refusal`)."""
    return keras_refusal(config)


def check_keras_input(path: Path, trust_model: bool) -> None:
    """A Keras file about to be sent to the worker: refused here when it is missing, a directory, or (not trusted) off the allowlist."""
    from bnfold.core.trust import enforced

    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a directory; Keras output needs a .keras or .h5 model file as input")
    if enforced(trust_model):
        check_keras_file(path)


def check_keras_file(path: Path) -> None:
    """Refuse a Keras file whose config names anything off the allowlist, before Keras reads it (``trust_model`` skips this)."""
    found = keras_refusal(keras_config(path))
    if found:
        layer, why = found
        raise UnsafeModelError(
            f"{path}: layer {layer!r} {why}; bnfold does not run code from model files: "
            "rebuild the model without it, or pass --trust-model (trust_model=True) if you trust this file"
        )


@dataclass(frozen=True)
class KerasOrigin:
    """Which Keras wrote a model file and with which backend, as the file itself says.

    Read from the bytes alone (HDF5 attributes; a ``.keras`` zip's
    ``metadata.json``), before any Keras loads it, so the choice of loader can
    be made wherever the file is read (in this process or a confined worker).
    """

    keras_version: str | None
    backend: str | None

    @property
    def major(self) -> int | None:
        head = (self.keras_version or "").split(".")[0]
        return int(head) if head.isdigit() else None

    @property
    def legacy(self) -> bool:
        """Written by Keras 1 or 2: its config means what tf_keras (Keras 2) makes of it, not Keras 3."""
        return self.major is not None and self.major < 3

    def describe(self) -> str:
        version = f"Keras {self.keras_version}" if self.keras_version else "an unknown Keras version"
        return version + (f" ({self.backend} backend)" if self.backend else "")


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def keras_origin(path: Path) -> KerasOrigin:
    """The ``keras_version`` and ``backend`` a Keras file records (None where it records none)."""
    try:
        if path.suffix.lower() == ".keras":
            import zipfile

            with zipfile.ZipFile(path) as archive:
                names = set(archive.namelist())
                meta = json.loads(archive.read("metadata.json")) if "metadata.json" in names else {}
            if not isinstance(meta, dict):
                meta = {}
            return KerasOrigin(_text(meta.get("keras_version")), _text(meta.get("backend")))
        import h5py

        with h5py.File(path, "r") as handle:
            return KerasOrigin(_text(handle.attrs.get("keras_version")), _text(handle.attrs.get("backend")))
    except Exception:  # noqa: BLE001 - not a readable file: keras_config reports it in one line
        return KerasOrigin(None, None)


@dataclass(frozen=True)
class TensorDecl:
    """An input or output as a model file's config declares it; None where the config does not say."""

    name: str | None
    shape: tuple[int | None, ...] | None
    dtype: str | None

    def describe(self) -> str:
        shape = "?" if self.shape is None else "(" + ", ".join("None" if d is None else str(d) for d in self.shape) + ")"
        return f"{self.name or '?'} {shape} {self.dtype or ''}".strip()


def _shape(value: Any) -> tuple[int | None, ...] | None:
    if not isinstance(value, list | tuple):
        return None
    return tuple(int(d) if isinstance(d, int) else None for d in value)


def _plain_dtype(value: Any) -> str | None:
    """``float32`` from ``"float32"`` or a Keras 3 ``DTypePolicy`` entry; None for a mixed policy (no one input dtype)."""
    if isinstance(value, dict):
        value = (value.get("config") or {}).get("name")
    if not isinstance(value, str) or value.startswith("mixed"):
        return None
    return value


def _layer_refs(value: Any) -> list[str] | None:
    """Layer names of ``input_layers``/``output_layers``: ``[name, 0, 0]`` or a list of them (Keras 3 writes one bare).

    None for a structure whose order the loaded model's flat list need not
    follow (a dict of inputs): such a model is not compared.
    """
    if isinstance(value, list) and len(value) == 3 and isinstance(value[0], str) and isinstance(value[1], int):
        return [value[0]]
    if not isinstance(value, list):
        return None
    names: list[str] = []
    for item in value:
        inner = _layer_refs(item)
        if inner is None:
            return None
        names.extend(inner)
    return names


def declared_signature(config: Any) -> tuple[list[TensorDecl], list[TensorDecl]] | None:
    """The inputs (name, shape with batch, dtype) and outputs (name) a Keras model config declares.

    Functional models declare input layers whose ``batch_input_shape`` (Keras 2)
    or ``batch_shape`` (Keras 3) is the input; a Sequential declares it on its
    first layer (an ``InputLayer`` or ``batch_input_shape`` on the first real
    layer). None when the config is neither, or a Sequential declares no input.
    """
    if not isinstance(config, dict) or not isinstance(config.get("config"), dict | list):
        return None
    inner = config["config"]
    layers = inner if isinstance(inner, list) else inner.get("layers")
    if not isinstance(layers, list) or not layers or not all(isinstance(e, dict) for e in layers):
        return None

    def entry_config(entry: dict[str, Any]) -> dict[str, Any]:
        value = entry.get("config")
        return value if isinstance(value, dict) else {}

    def name_of(entry: dict[str, Any]) -> str | None:
        return _text(entry.get("name") or entry_config(entry).get("name"))

    def decl(entry: dict[str, Any], name: str | None) -> TensorDecl:
        cfg = entry_config(entry)
        shape = cfg.get("batch_shape", cfg.get("batch_input_shape"))
        return TensorDecl(name, _shape(shape), _plain_dtype(cfg.get("dtype")))

    if config.get("class_name") == "Sequential":
        first = layers[0]
        cfg = entry_config(first)
        if first.get("class_name") == "InputLayer":
            inputs = [decl(first, None)]
            rest = layers[1:]
        elif "batch_input_shape" in cfg or "batch_shape" in cfg:
            inputs = [decl(first, None)]
            rest = layers
        else:
            return None
        return inputs, ([TensorDecl(name_of(rest[-1]), None, None)] if rest else [])
    by_name = {name_of(e): e for e in layers}
    input_names, output_names = _layer_refs(inner.get("input_layers")), _layer_refs(inner.get("output_layers"))
    if input_names is None or output_names is None:
        return None
    inputs = []
    for name in input_names:
        entry = by_name.get(name)
        if entry is None:
            return None
        inputs.append(decl(entry, name))
    return inputs, [TensorDecl(name, None, None) for name in output_names]


def _loaded_decls(tensors: list[Any]) -> list[TensorDecl]:
    decls = []
    for tensor in tensors:
        history = getattr(tensor, "_keras_history", None)
        layer = getattr(history[0], "name", None) if history else None
        shape = getattr(tensor, "shape", None)
        dims = None if shape is None else tuple(getattr(shape, "as_list", lambda s=shape: list(s))())
        dtype = getattr(tensor, "dtype", None)
        decls.append(TensorDecl(layer, _shape(dims), getattr(dtype, "name", None) or _text(dtype)))
    return decls


def signature_difference(declared: tuple[list[TensorDecl], list[TensorDecl]], inputs: list[Any], outputs: list[Any]) -> str | None:
    """Why a loaded model's inputs/outputs are not the ones its file declares (None: they are).

    Compared: how many, names (where the file names them), ranks and known
    dimensions, dtypes (where the file gives one). A dimension the file leaves
    unknown may stay unknown; one it knows must come back the same.
    """
    for kind, wanted, got in (("input", declared[0], _loaded_decls(inputs)), ("output", declared[1], _loaded_decls(outputs))):
        if len(wanted) != len(got):
            return f"the file declares {len(wanted)} {kind}(s), the loaded model has {len(got)}"
        for want, have in zip(wanted, got, strict=True):
            if want.name is not None and have.name is not None and want.name != have.name:
                return f"{kind} {want.name!r} came back as {have.name!r}"
            if want.shape is not None and have.shape is not None:
                if len(want.shape) != len(have.shape) or any(
                    w is not None and h != w for w, h in zip(want.shape, have.shape, strict=False)
                ):
                    return f"{kind} {want.describe()} came back as {have.describe()}"
            if want.dtype is not None and have.dtype is not None and want.dtype != have.dtype:
                return f"{kind} {want.describe()} came back as {have.describe()}"
    return None


def load_keras_model(path: Path, trust_model: bool = False, objects: Any = None) -> Any:
    """The Keras model in a ``.keras``/``.h5`` file, loaded by the Keras that wrote it, with the signature it declares.

    The file's own ``keras_version`` picks the loader (:func:`keras_origin`): a
    file written by Keras 1 or 2 is read by tf_keras, whose config semantics
    are Keras 2's (Keras 3 reads some of them differently: a Sequential's
    ``batch_input_shape`` gains a dimension); anything else by Keras 3 (safe
    mode unless ``trust_model``). The model that comes back must have the
    inputs and outputs the file declares (:func:`declared_signature`), else
    :class:`InputError`: never a model whose signature differs from the file's.
    ``objects(module)`` gives the ``custom_objects`` for the chosen Keras.
    Unless ``trust_model``, the config is checked for code first.
    """
    if not path.exists():
        raise InputError(f"{path}: no such file")
    config = keras_config(path)
    if enforced(trust_model):
        check_keras_file(path)
    origin = keras_origin(path)
    if origin.major is not None and origin.major < 2:
        raise InputError(f"{path}: written by {origin.describe()}, which no installed Keras reads; load and re-save it with Keras 2")
    if origin.legacy:
        try:
            import tf_keras
        except ImportError:
            raise InputError(
                f"{path}: written by {origin.describe()}; Keras 3 reads such files differently: "
                "install tf_keras (pip install tf_keras) to load it as it was saved"
            ) from None
        try:
            model = tf_keras.models.load_model(str(path), compile=False, custom_objects=objects(tf_keras) if objects else None)
        except Exception as exc:  # noqa: BLE001 - tf_keras raises many kinds for files it cannot read
            raise InputError(f"{path}: tf_keras cannot load this {origin.describe()} file ({first_line(exc)[:200]})") from None
    else:
        import keras

        try:
            model = keras.saving.load_model(
                str(path), compile=False, safe_mode=not trust_model, custom_objects=objects(keras) if objects else None
            )
        except Exception as exc:  # noqa: BLE001 - Keras raises many kinds for files it cannot read
            raise InputError(f"{path}: Keras {keras.__version__} cannot load this file ({first_line(exc)[:200]})") from None
    declared = declared_signature(config)
    if declared is not None and hasattr(model, "inputs") and model.inputs is not None:
        why = signature_difference(declared, list(model.inputs), list(model.outputs))
        if why:
            raise InputError(f"{path}: loaded, the model does not match the file ({why}); bnfold does not fold a model whose signature changed")
    return model
