"""bnfold: fold batch normalization into the conv/dense layers of frozen TensorFlow graphs."""

from bnfold.api import FoldResult, fold, fold_file
from bnfold.errors import BnfoldError, InputError, OutputError, UsageError, VerificationError
from bnfold.fold import SiteRecord
from bnfold.verify import Verification, verify

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
    "verify",
]
__version__ = "0.1.0"
