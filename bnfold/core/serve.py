"""The worker's side: read requests, run them, answer; the requests themselves belong to the formats.

The loop knows four requests of its own (``run``, ``drop``, ``unload``,
``selftest``). Any other request names its handler as ``module:function``
inside bnfold (``bnfold.tf.runner:load``); the loop imports that module on
first use. So the worker core imports no format, and each format keeps its
requests next to the code that sends them (the layering of docs/design.md).
A handler gets the :class:`State` (the loaded session and the arrays kept
between runs), the request's header and payload, and the reply stream.
"""

from __future__ import annotations

import importlib
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any

import numpy as np

from bnfold.core import sandbox
from bnfold.core.errors import BnfoldError
from bnfold.core.protocol import decode_arrays, encode_arrays, op_error_text, receive, send

_serving: list[bool] = []  # set in a worker process: loads there run in place


def in_worker() -> bool:
    return bool(_serving)


def _stored(store: dict[str, Any], key: str) -> np.ndarray:
    """The array kept under ``key``: the chunks that runs appended, joined along axis 0 once, on first use."""
    if key not in store:
        raise KeyError(f"nothing is kept under {key!r} in this worker")
    value = store[key]
    if isinstance(value, list):
        value = store[key] = np.concatenate(value) if len(value) > 1 else value[0]
    return value  # type: ignore[no-any-return]


def _stash(store: dict[str, Any], outputs: list[Any], stash: list[list[Any]]) -> tuple[list[Any], list[dict[str, Any]]]:
    """The outputs to send back; the ones ``stash`` names ([fetch index, key] pairs) are appended to the store under
    their key instead, and only their shapes and sizes are answered, in ``stash``'s order."""
    if not stash:
        return outputs, []
    kept: list[dict[str, Any]] = []
    for index, key in stash:
        array = np.asarray(outputs[int(index)])
        chunks = store.setdefault(str(key), [])
        if not isinstance(chunks, list):
            raise ValueError(f"{key!r} was read already; appending to it is not allowed")
        chunks.append(array)
        kept.append({"shape": list(array.shape), "nbytes": int(array.nbytes)})
    stashed = {int(index) for index, _ in stash}
    return [value for i, value in enumerate(outputs) if i not in stashed], kept


FLAVOR_ENV = "BNFOLD_WORKER_FLAVOR"  # "onnx": a spawned worker that serves ONNX requests without importing TensorFlow
# Called with the tensorflow module when a worker that imports TensorFlow starts (bnfold.tf.runner's warm-up).
ON_START: list[Callable[[Any], None]] = []


@dataclass
class State:
    """What one worker holds between requests: the loaded model's session and the arrays runs kept."""

    tf: Any = None  # the tensorflow module, in a worker that imported it
    session: Any = None  # anything with run(fetches, feeds) -> list of arrays, and close()
    store: dict[str, Any] = field(default_factory=dict)  # arrays a run kept for later runs (``stash``/``stored``)

    def need_tensorflow(self, op: str) -> Any:
        if self.tf is None:
            raise ValueError(f"request {op!r} needs TensorFlow, which this worker did not import")
        return self.tf

    def close(self) -> None:
        """Forget the loaded model and what its runs kept; a request that loads another model calls this first,
        so that the old one's memory is free before the new one is read."""
        self.store.clear()
        if self.session is not None:
            self.session.close()
        self.session = None


Handler = Callable[[State, dict[str, Any], bytes, IO[bytes]], None]


def _run(state: State, head: dict[str, Any], payload: bytes, reply: IO[bytes]) -> None:
    if state.session is None:
        raise ValueError("no graph is loaded")
    values = decode_arrays(head["arrays"], payload)
    feeds = dict(zip(head["feeds"], values, strict=True))
    for name, key, start, stop in head.get("stored") or []:
        feeds[str(name)] = _stored(state.store, str(key))[int(start) : int(stop)]
    outputs = state.session.run(head["fetches"], feeds)
    del feeds, values
    outputs, stashed = _stash(state.store, outputs, list(head.get("stash") or []))
    meta, data = encode_arrays(outputs)
    send(reply, {"ok": True, "arrays": meta, "stashed": stashed}, data)


def _drop(state: State, head: dict[str, Any], payload: bytes, reply: IO[bytes]) -> None:
    for key in head["keys"]:
        state.store.pop(str(key), None)
    send(reply, {"ok": True})


def _unload(state: State, head: dict[str, Any], payload: bytes, reply: IO[bytes]) -> None:
    state.close()
    send(reply, {"ok": True})


def _selftest(state: State, head: dict[str, Any], payload: bytes, reply: IO[bytes]) -> None:
    answers = sandbox.self_test(tempfile.gettempdir(), head["outside"], head["secret"], int(head["port"]))
    send(reply, {"ok": True, "answers": answers, "abi": sandbox.landlock_abi()})


CORE_REQUESTS: dict[str, Handler] = {"run": _run, "drop": _drop, "unload": _unload, "selftest": _selftest}


def handler(op: object) -> Handler:
    """The handler a request names: one of :data:`CORE_REQUESTS`, or ``bnfold.<module>:<function>``."""
    if isinstance(op, str) and op in CORE_REQUESTS:
        return CORE_REQUESTS[op]
    module, _, name = str(op).partition(":")
    if not module.startswith("bnfold.") or not name.isidentifier():
        raise ValueError(f"unknown request {op!r}")
    try:
        found = getattr(importlib.import_module(module), name, None)
    except ImportError:
        found = None
    if not callable(found):
        raise ValueError(f"unknown request {op!r}")
    return found  # type: ignore[no-any-return]


def serve(requests: IO[bytes] | None = None, reply: IO[bytes] | None = None) -> None:
    """The worker's loop: read requests on stdin, answer on the original stdout until stdin closes.

    Anything the graph or TensorFlow prints to stdout goes to stderr instead,
    so it cannot be taken for an answer. A forked worker passes its pipes.
    A spawned worker for ONNX models only (``BNFOLD_WORKER_FLAVOR=onnx``) does not import TensorFlow.
    """
    if reply is None:
        reply = os.fdopen(os.dup(1), "wb")
        os.dup2(2, 1)
    if requests is None:
        requests = sys.stdin.buffer
    _serving.append(True)
    state = State()
    caught: tuple[type[BaseException], ...] = (ValueError, TypeError, KeyError, BnfoldError, MemoryError)
    if os.environ.pop(FLAVOR_ENV, "") != "onnx":
        import tensorflow as tf

        state.tf = tf
        caught = (tf.errors.OpError, *caught)
        for hook in ON_START:
            try:
                hook(tf)
            except Exception:  # noqa: BLE001 - only a head start: the requests run all the same without it
                pass
    send(reply, {"ok": True, "ready": True})  # from here on, the parent's deadline counts
    while True:
        message = receive(requests)
        if message is None:
            return
        head, payload = message
        # The handler holds the only reference to the payload (a model's bytes), so that it can drop
        # them once the model is imported, before the session is built (peak memory of a large graph).
        parts = [payload]
        del message, payload
        try:
            handler(head["op"])(state, head, parts.pop(), reply)
        except caught as exc:
            kind = type(exc).__name__
            message_text = op_error_text(getattr(exc, "message", None) or str(exc))
            send(reply, {"ok": False, "kind": kind, "message": message_text})
