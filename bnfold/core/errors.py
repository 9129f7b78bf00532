"""Errors users can act on, each tied to one documented exit code.

The CLI prints ``str(error)`` as a single line and exits with ``exit_code``;
anything that is not a :class:`BnfoldError` is a bug in bnfold (exit 70).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FINDINGS = 1
EXIT_USAGE = 2
EXIT_INPUT = 3
EXIT_VERIFY = 4
EXIT_OUTPUT = 5
EXIT_UNSAFE = 6
EXIT_INTERNAL = 70


class BnfoldError(Exception):
    """Base of every error bnfold reports to users."""

    exit_code = EXIT_INTERNAL


class UsageError(BnfoldError):
    """An option that cannot be honoured (a bad --feed, --input-shape, --inputs...)."""

    exit_code = EXIT_USAGE


class InputError(BnfoldError):
    """The input is missing, unreadable, not a model, or a graph bnfold cannot use."""

    exit_code = EXIT_INPUT


class VerificationError(BnfoldError):
    """The folded model does not compute what the original did, or could not be checked."""

    exit_code = EXIT_VERIFY

    def __init__(self, message: str, result: object | None = None) -> None:
        super().__init__(message)
        self.result = result


class OutputError(BnfoldError):
    """The output cannot be written where asked (or would overwrite the input)."""

    exit_code = EXIT_OUTPUT


class UnsafeModelError(BnfoldError):
    """The model carries code, or its graph would reach outside the process if run (docs/security.md).

    Its own exit code, so that scripts tell "refused to run untrusted content"
    from a broken input; ``--trust-model`` / ``trust_model=True`` lifts it.
    """

    exit_code = EXIT_UNSAFE


class BrokenOutputError(BnfoldError):
    """bnfold wrote a model that fails to load or run while the original runs: a bug in bnfold, not the user's."""

    exit_code = EXIT_INTERNAL


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message: what fits bnfold's one-line errors."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
