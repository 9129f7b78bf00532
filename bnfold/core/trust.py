"""Whether the allowlist applies: ``--trust-model`` / ``trust_model=True`` raise trust for a block of work.

One switch for every format's allowlist (:mod:`bnfold.tf.allowlist`,
:mod:`bnfold.keras.allowlist`, :mod:`bnfold.onnx.allowlist`): trust lifts the
allowlist only, never the confinement (:mod:`bnfold.core.sandbox`).
"""

from __future__ import annotations

import contextvars
import os
from collections.abc import Iterator
from contextlib import contextmanager

# Test-only: with this set to 1 no allowlist refuses anything, so that tests can show the
# OS sandbox containing the same attacks on its own. Never set it in use.
DISABLE_ENV = "BNFOLD_TEST_DISABLE_ALLOWLIST"


_TRUSTED: contextvars.ContextVar[bool] = contextvars.ContextVar("bnfold_trust_model", default=False)


@contextmanager
def trusting(trust: bool) -> Iterator[None]:
    """Within this block (when ``trust``), nothing is refused: ``--trust-model`` / ``trust_model=True``.

    Only raises trust, never lowers it, so a trusted API call stays trusted
    through helpers that do not know about it.
    """
    token = _TRUSTED.set(trust or _TRUSTED.get())
    try:
        yield
    finally:
        _TRUSTED.reset(token)


def is_trusted() -> bool:
    return _TRUSTED.get()


def enforced(trust_model: bool = False) -> bool:
    """Whether the allowlist applies here: the file is not trusted, and the test-only switch is off."""
    return not (trust_model or is_trusted() or os.environ.get(DISABLE_ENV) == "1")
