"""``bnfold a.keras b.keras``: a Keras file in, a Keras file out, by way of bnfold's confined worker.

Loading a Keras file runs what it carries (a trusted Lambda's code, a custom
layer), so the file-level fold happens in the worker (:mod:`bnfold.core.worker`)
and only options, arrays, the report's JSON and the saved file's bytes cross.
Both sides of that request are here, the sender and the handler that
:data:`FOLD` names, apart from the fold itself (:mod:`bnfold.keras.fold`),
which also runs in process on a live model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO, Any

import keras

from bnfold.core import protocol, serve
from bnfold.core.comparison import CheckOptions
from bnfold.core.errors import BnfoldError, InputError, UsageError, VerificationError
from bnfold.core.files import check_output_path
from bnfold.core.formats import is_keras_path
from bnfold.core.protocol import decode_arrays, first_line_of, send
from bnfold.core.result import FoldResult
from bnfold.keras.fold import custom_objects, fold_keras
from bnfold.keras.layer_graph import _framework, _is_keras3
from bnfold.keras.write import as_keras3, saved_bytes, write_bytes


def load_model(path: Path, trust_model: bool = False) -> Any:
    """The model as its author saved it: :func:`bnfold.keras.load.load_keras_model` (Keras 2 files with tf_keras).

    An ``.h5`` written by Keras 2 is folded with tf_keras, so the ``.h5``
    written back loads where the input did.
    """
    from bnfold.keras.load import load_keras_model

    if path.is_dir():
        raise InputError(f"{path}: is a directory; Keras output needs a .keras or .h5 model file as input")
    return load_keras_model(path, trust_model, custom_objects)


def fold_keras_file(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    in_place: bool = False,
    dry_run: bool = False,
    trust_model: bool = False,
    **options: Any,
) -> tuple[Any, FoldResult]:
    """``bnfold model.keras folded.keras``: load, fold, check, write (nothing is written when the check fails).

    The model is loaded, folded, checked and saved in bnfold's confined worker
    (:mod:`bnfold.core.worker`), since loading a file runs what it carries; the
    worker answers with the saved file's bytes and the report as JSON, and this
    process writes ``dst``. The folded model stays in the worker: the first
    item returned is None (load ``dst`` to use it). Inside a worker, or for a
    live model (:func:`fold_keras`), everything runs where it is called.
    """

    src_path, dst_path = Path(src), Path(dst)
    if not is_keras_path(src_path):
        raise UsageError(f"{dst_path}: Keras output needs a Keras model as input (.keras or .h5), not {src_path.name}")
    if not dry_run:
        check_output_path(src_path, dst_path, in_place)
    if serve.in_worker():
        data, result = fold_here(str(src_path), str(dst_path), dry_run, trust_model, options)
        if data is not None:
            write_bytes(dst_path, data)
        return None, result
    return None, _fold_in_worker(src_path, dst_path, dry_run, trust_model, options)


_WORKER_OPTIONS = ("verify_outputs", "standalone_affine", "input_shapes", "rtol", "atol", "samples", "seed", "force")


def _fold_in_worker(src: Path, dst: Path, dry_run: bool, trust_model: bool, options: dict[str, Any]) -> FoldResult:
    """:func:`fold_here` in the confined worker: only the options, the feeds' arrays, the file's bytes and the report's JSON cross."""
    from bnfold.core import sandbox
    from bnfold.core import worker as isolation
    from bnfold.core.result import result_from_json
    from bnfold.keras.load import check_keras_input

    unknown = set(options) - {*_WORKER_OPTIONS, "feeds", "on_batch"}
    if unknown:
        raise TypeError(f"fold_keras_file() got unexpected keyword arguments {sorted(unknown)}")
    check_keras_input(src, trust_model)  # refused here, before any Keras reads the file
    feeds = dict(options.get("feeds") or {})
    meta, payload = protocol.encode_arrays(list(feeds.values()))
    header = {
        "op": FOLD, "src": str(src), "dst": str(dst), "dry_run": dry_run, "trust_model": trust_model,
        "options": {k: options[k] for k in _WORKER_OPTIONS if k in options}, "feeds": list(feeds), "arrays": meta,
    }  # fmt: skip
    sandbox.allow_read(src)
    try:
        head, body = isolation.ask(header, payload, engine="Keras")
    except isolation.GraphRunError as exc:
        raise isolation.as_bnfold_error(exc, lambda text: InputError(f"{src}: cannot fold the model ({text})")) from None
    except isolation.WorkerDied as exc:
        raise InputError(f"{src}: folding the model ended bnfold's worker: {exc.describe()}") from None
    result = result_from_json(head["result"])
    if head.get("failed"):
        raise VerificationError(str(head["failed"]), result)
    on_batch = options.get("on_batch")
    if on_batch is not None and result.verification is not None:
        on_batch(1, 1)
    if not dry_run:
        write_bytes(dst, body)
    return result


def fold_here(src: str, dst: str, dry_run: bool, trust_model: bool, options: dict[str, Any]) -> tuple[bytes | None, FoldResult]:
    """The worker's side of :func:`fold_keras_file`: the saved file's bytes (None with ``dry_run``) and the report."""
    src_path, dst_path = Path(src), Path(dst)
    model = load_model(src_path, trust_model)
    new_model, result = fold_keras(model, source=str(src_path), **options)
    checked = CheckOptions.of({k: v for k, v in options.items() if k != "standalone_affine"})
    check_options = CheckOptions(feeds=checked.feeds, input_shapes=checked.input_shapes, seed=checked.seed)
    if not _is_keras3(_framework(new_model)) and dst_path.suffix.lower() == ".keras":
        new_model = as_keras3(new_model, src_path, dst_path, check_options)
        if result.verification is not None:
            result.verification.notes.append(f"written by Keras 2: {dst_path.name} is its Keras {keras.__version__} rebuild, checked against it")
    return (None if dry_run else saved_bytes(new_model, dst_path, check_options)), result


def serve_fold(state: serve.State, head: dict[str, Any], payload: bytes, reply: IO[bytes]) -> None:
    """``bnfold a.keras b.keras`` in the worker: load, fold, check, save to the private directory and check the
    saved file (:func:`fold_here`); answered with the file's bytes and the report as JSON."""
    from bnfold.core.errors import InputError, VerificationError

    options = dict(head["options"])
    options["feeds"] = dict(zip(head["feeds"], decode_arrays(head["arrays"], payload), strict=True))
    try:
        data, result = fold_here(str(head["src"]), str(head["dst"]), bool(head["dry_run"]), bool(head["trust_model"]), options)
    except VerificationError as exc:
        if exc.result is None:
            raise
        send(reply, {"ok": True, "failed": str(exc), "result": exc.result.to_json()})  # type: ignore[attr-defined]
        return
    except (BnfoldError, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - a layer's own code (a trusted Lambda) failing in the confined worker
        raise InputError(f"{head['src']}: the model failed in bnfold's worker ({type(exc).__name__}: {first_line_of(str(exc))})") from None
    send(reply, {"ok": True, "result": result.to_json()}, data or b"")


FOLD = f"{__name__}:serve_fold"
