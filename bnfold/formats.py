"""Which output format a destination path names, without importing any framework.

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
    return path is not None and Path(path).suffix.lower() == ".onnx"


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
