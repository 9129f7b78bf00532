"""bnfold: fold batch normalization into the conv/dense layers of frozen TensorFlow graphs.

The public names are loaded lazily, so ``bnfold.cli`` can quiet TensorFlow's
start-up logging before TensorFlow is imported.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any

# TensorFlow's C++ start-up chatter would bury bnfold's one-line messages.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

if TYPE_CHECKING:
    from bnfold.api import fold, fold_file
    from bnfold.comparison import Verification
    from bnfold.errors import BnfoldError, InputError, OutputError, UsageError, VerificationError
    from bnfold.foldmath import SiteRecord
    from bnfold.keras_fold import fold_keras
    from bnfold.onnx_api import fold_onnx, fold_onnx_file
    from bnfold.onnx_export import to_onnx
    from bnfold.recalibration import RecalibrationResult, recalibrate, recalibrate_file
    from bnfold.result import FoldResult
    from bnfold.verification import verify

_EXPORTS = {
    "FoldResult": "bnfold.result",
    "fold": "bnfold.api",
    "fold_file": "bnfold.api",
    "fold_keras": "bnfold.keras_fold",
    "BnfoldError": "bnfold.errors",
    "InputError": "bnfold.errors",
    "OutputError": "bnfold.errors",
    "UsageError": "bnfold.errors",
    "VerificationError": "bnfold.errors",
    "SiteRecord": "bnfold.foldmath",
    "to_onnx": "bnfold.onnx_export",
    "fold_onnx": "bnfold.onnx_api",
    "fold_onnx_file": "bnfold.onnx_api",
    "Verification": "bnfold.comparison",
    "verify": "bnfold.verification",
    "recalibrate": "bnfold.recalibration",
    "recalibrate_file": "bnfold.recalibration",
    "RecalibrationResult": "bnfold.recalibration",
}
__all__ = [
    "BnfoldError",
    "FoldResult",
    "InputError",
    "OutputError",
    "SiteRecord",
    "UsageError",
    "Verification",
    "VerificationError",
    "fold",
    "fold_file",
    "fold_keras",
    "to_onnx",
    "fold_onnx",
    "fold_onnx_file",
    "verify",
    "recalibrate",
    "recalibrate_file",
    "RecalibrationResult",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'bnfold' has no attribute {name!r}")
