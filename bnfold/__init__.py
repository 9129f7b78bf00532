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
    from bnfold.api import fold, fold_file, to_onnx
    from bnfold.core.comparison import Verification
    from bnfold.core.errors import BnfoldError, InputError, OutputError, UsageError, VerificationError
    from bnfold.core.foldmath import SiteRecord
    from bnfold.core.recalibration import RecalibrationResult
    from bnfold.core.result import FoldResult
    from bnfold.keras.fold import fold_keras
    from bnfold.onnx.pipeline import fold_onnx, fold_onnx_file
    from bnfold.recalibration import recalibrate, recalibrate_file
    from bnfold.tf.verify import verify

_EXPORTS = {
    "FoldResult": "bnfold.core.result",
    "fold": "bnfold.api",
    "fold_file": "bnfold.api",
    "fold_keras": "bnfold.keras.fold",
    "BnfoldError": "bnfold.core.errors",
    "InputError": "bnfold.core.errors",
    "OutputError": "bnfold.core.errors",
    "UsageError": "bnfold.core.errors",
    "VerificationError": "bnfold.core.errors",
    "SiteRecord": "bnfold.core.foldmath",
    "to_onnx": "bnfold.api",
    "fold_onnx": "bnfold.onnx.pipeline",
    "fold_onnx_file": "bnfold.onnx.pipeline",
    "Verification": "bnfold.core.comparison",
    "verify": "bnfold.tf.verify",
    "recalibrate": "bnfold.recalibration",
    "recalibrate_file": "bnfold.recalibration",
    "RecalibrationResult": "bnfold.core.recalibration",
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
