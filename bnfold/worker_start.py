"""The spawned worker's first lines: confine the process, then serve (:mod:`bnfold.core.serve`).

A module of its own so that nothing before the confinement imports numpy,
whose BLAS threads would start unconfined: Landlock covers the thread that
asks for it and the threads started after, not those already running.
"""

from __future__ import annotations

import json
import os


def main() -> None:
    from bnfold.core import sandbox

    settings = json.loads(os.environ.pop("BNFOLD_WORKER_LIMITS", "{}") or "{}")
    limits = sandbox.Limits()
    if settings:
        limits = sandbox.Limits(int(settings["memory"]), float(settings["time"]), [str(p) for p in settings.get("read", [])], str(settings.get("private", "")))
    sandbox.confine(limits)
    from bnfold.core.serve import serve

    serve()
