"""The one place that tells a path's format: which adapter reads an input, which writer an output names.

Decided from the path alone (suffix, directory, trailing slash), without
importing any framework, so that the CLI and the API pick the route before
TensorFlow or onnx is loaded: an ONNX-only run never imports TensorFlow.

The suffix of OUT picks the writer. A name bnfold does not know (``out.xyz``,
``out.tflite``) used to become a SavedModel directory of that name, which a user
only discovers when loading it fails; now it is a usage error that lists the
formats. A SavedModel directory is a name without a suffix, or any name written
with a trailing ``/``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from bnfold.core.errors import UsageError

# Suffix -> what is written. The one list of known outputs: a new writer registers its suffix here
# (e.g. ".keras"/".h5" for Keras models) and both the CLI and fold_file accept it.
OUTPUT_FORMATS: dict[str, str] = {
    ".pb": "frozen GraphDef",
    ".pbtxt": "text GraphDef",
    ".pbtext": "text GraphDef",
    ".txt": "text GraphDef",
    ".onnx": "ONNX model",
    ".keras": "Keras model",
    ".h5": "Keras HDF5 model",
    ".hdf5": "Keras HDF5 model",
}

if TYPE_CHECKING:
    _PathBase = Path
else:
    _PathBase = type(Path())  # PosixPath or WindowsPath: Path itself cannot be subclassed before Python 3.12


class DirectoryPath(_PathBase):
    """A destination typed with a trailing ``/``: ``Path`` drops the slash, this type remembers it."""


def output_path(text: str) -> Path:
    """The CLI's parser for OUT: keeps the trailing-slash meaning that ``Path(text)`` would lose."""
    return DirectoryPath(text) if text.endswith(("/", os.sep)) else Path(text)


def is_saved_model_destination(dst: str | os.PathLike[str]) -> bool:
    """OUT names a SavedModel directory: no suffix, or a trailing ``/``."""
    if isinstance(dst, DirectoryPath) or (isinstance(dst, str) and dst.endswith(("/", os.sep))):
        return True
    return not Path(dst).suffix


def is_onnx_path(path: str | os.PathLike[str] | None) -> bool:
    """A path bnfold reads or writes as ONNX, told without importing onnx (a .pb run never needs it)."""
    return path is not None and Path(path).suffix.lower() == ONNX_SUFFIX


def check_output_format(dst: str | os.PathLike[str]) -> None:
    """Refuse an OUT whose suffix names no format bnfold writes (exit 2), before any work is done."""
    if is_saved_model_destination(dst):
        return
    suffix = Path(dst).suffix.lower()
    if suffix in OUTPUT_FORMATS:
        return
    known = ", ".join(f"{s} ({what})" for s, what in OUTPUT_FORMATS.items())
    raise UsageError(
        f"{os.fspath(dst)}: unknown output format {suffix!r}; bnfold writes {known}, "
        f"or a SavedModel directory (a name without suffix, or ending in /)"
    )


# Formats, as :func:`input_format` and :func:`output_format` name them.
GRAPH = "graph"  # a frozen GraphDef, binary (.pb) or text (.pbtxt)
SAVED_MODEL = "saved_model"
KERAS = "keras"
ONNX = "onnx"
KERAS_SUFFIXES = (".keras", ".h5", ".hdf5")
ONNX_SUFFIX = ".onnx"


def is_keras_path(path: str | os.PathLike[str] | None) -> bool:
    """A ``.keras``/``.h5``/``.hdf5`` file name."""
    return path is not None and Path(path).suffix.lower() in KERAS_SUFFIXES


def input_format(src: str | os.PathLike[str]) -> str:
    """What reads ``src``: :data:`ONNX`, :data:`KERAS`, :data:`SAVED_MODEL` (a directory) or :data:`GRAPH` (anything else)."""
    if is_onnx_path(src):
        return ONNX
    if is_keras_path(src):
        return KERAS
    return SAVED_MODEL if Path(src).is_dir() else GRAPH


def output_format(dst: str | os.PathLike[str]) -> str:
    """What writes ``dst`` (refused by :func:`check_output_format` when its suffix names nothing bnfold writes)."""
    check_output_format(dst)
    if is_saved_model_destination(dst):
        return SAVED_MODEL
    return ONNX if is_onnx_path(dst) else KERAS if is_keras_path(dst) else GRAPH


def route(src: str | os.PathLike[str], dst: str | os.PathLike[str] | None) -> str:
    """Which pipeline folds ``src`` into ``dst`` (None: a dry run): :data:`KERAS` (the layer-level fold, Keras in and
    out), :data:`ONNX` (ONNX in, or a TF model converted with tf2onnx), else :data:`GRAPH` (TF graph out)."""
    if dst is not None and is_keras_path(dst):
        return KERAS
    return ONNX if is_onnx_path(src) or (dst is not None and is_onnx_path(dst)) else GRAPH
