"""Writing a folded Keras model, and only a file that gives the folded model back.

``model.save`` can write a file that does not load (safe mode refuses it) or
loads as something else, so a file's bytes are handed out only after it is
loaded again and predicts what the folded model does. A Keras 2 model written
as ``.keras`` needs Keras 3 to rebuild it first; that rebuild is accepted only
where it declares and computes the same thing, and refused in one line otherwise.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import keras

from bnfold.core.comparison import CheckOptions, Verification, compare_runners, failure_message
from bnfold.core.errors import OutputError, VerificationError, first_line
from bnfold.keras.fold import KerasRunner, custom_objects, input_names, input_specs, output_names
from bnfold.keras.layer_graph import _framework, _is_keras3, _model_kind


def write_model(model: Any, dst: Path, check_against: CheckOptions | None = None) -> None:
    """Save atomically, after proving the file loads (safe mode for .keras) and predicts what ``model`` does."""
    write_bytes(dst, saved_bytes(model, dst, check_against))


def write_bytes(dst: Path, data: bytes) -> None:
    """``dst`` atomically (a temporary file beside it, renamed over it), with the mode a new file gets."""
    from bnfold.core.files import atomic_write

    atomic_write(dst, lambda tmp: tmp.write_bytes(data))


def _same_predictions(model: Any, other: Callable[[], KerasRunner], options: CheckOptions) -> Verification:
    """``model`` against another form of it (its saved file loaded again, its Keras 3 rebuild) on the check's inputs.

    One batch size is enough: the fold's own check tried several on the model both forms come from.
    """
    return compare_runners(
        lambda: KerasRunner(model),
        other,
        input_specs(model),
        output_names(model),
        CheckOptions(feeds=options.feeds, input_shapes=options.input_shapes, seed=options.seed, batch_check=False),
    )


def saved_bytes(model: Any, dst: Path, check_against: CheckOptions | None = None) -> bytes:
    """The file ``model.save`` writes for ``dst``, once it is proven to load (safe mode for .keras) and to predict
    what ``model`` does. Saved in a temporary directory (the worker's private one), keeping ``dst``'s suffix,
    because Keras picks the format from it."""
    module = _framework(model)
    where = Path(tempfile.mkdtemp(prefix="bnfold-save-"))
    tmp = where / f"{dst.stem or 'model'}{dst.suffix}"
    try:
        if dst.suffix.lower() == ".keras" or _is_keras3(module):
            model.save(str(tmp))
        else:
            model.save(str(tmp), save_format="h5")
        if _is_keras3(module):
            reloaded = keras.saving.load_model(str(tmp), compile=False, safe_mode=True, custom_objects=custom_objects())
        else:
            reloaded = module.models.load_model(str(tmp), compile=False, custom_objects=custom_objects(module))
        same = _same_predictions(model, lambda: KerasRunner(reloaded), check_against or CheckOptions())
        if not same.passed:
            raise VerificationError(
                f"{dst}: the written file does not predict what the folded model does ({failure_message(same)}); nothing written"
            )
        return tmp.read_bytes()
    except OSError as exc:
        raise OutputError(f"{dst}: cannot write ({exc.strerror or exc})") from None
    finally:
        tmp.unlink(missing_ok=True)
        try:
            where.rmdir()
        except OSError:
            pass


# Keras 2 arguments that Keras 3 no longer accepts, dropped only at the value where they change nothing:
# ``groups=1`` (every conv), and a separable conv's ``kernel_*`` (Keras 2 stored them, its separable
# convs never used them: their kernels are the depthwise and pointwise ones).
_UNUSED_KERNEL_ARGS = ("kernel_initializer", "kernel_regularizer", "kernel_constraint")
_KERAS2_NO_OPS: dict[str, Callable[[str, Any], bool]] = {
    **{f"SeparableConv{d}D": (lambda key, value: key in _UNUSED_KERNEL_ARGS or (key == "groups" and value == 1)) for d in (1, 2)},
    **{f"DepthwiseConv{d}D": (lambda key, value: key == "groups" and value == 1) for d in (1, 2)},
    **{f"Conv{d}D": (lambda key, value: False) for d in (1, 2, 3)},
}


def keras2_config_for_keras3(config: Any) -> Any:
    """A Keras 2 model config with the arguments Keras 3 refuses but that change nothing removed (a copy).

    Anything else Keras 3 does not have stays, so Keras 3 refuses it and the
    refusal names it: a translation that changed the model would be worse.
    """
    if isinstance(config, list):
        return [keras2_config_for_keras3(item) for item in config]
    if not isinstance(config, dict):
        return config
    out = {key: keras2_config_for_keras3(value) for key, value in config.items()}
    no_op = _KERAS2_NO_OPS.get(str(out.get("class_name")))
    inner = out.get("config")
    if no_op is not None and isinstance(inner, dict):
        out["config"] = {key: value for key, value in inner.items() if not no_op(key, value)}
    return out


def keras_reason(exc: BaseException) -> str:
    """The cause in a Keras deserialization error, which opens with the whole layer config and ends with the reason."""
    text = str(exc)
    marker = "Exception encountered:"
    while marker in text:
        text = text.split(marker, 1)[1]
    text = text.strip()
    return (text.splitlines()[0] if text else first_line(exc))[:300]


def as_keras3(legacy: Any, src: Path, dst: Path, options: CheckOptions) -> Any:
    """The same model in Keras 3, for ``.keras`` output from a Keras 2 file; refused in one line where it is not the same.

    Keras 3 rebuilds a Keras 2 model from its ``.h5`` form with its own legacy
    reader. That rebuild is accepted only when it declares the same inputs and
    outputs (names where the file names them, ranks, known dims, dtypes) and
    predicts what the tf_keras model does; otherwise (a layer or argument Keras
    3 does not have, a name it refuses, a Sequential input it reads with another
    rank) :class:`OutputError` says why and suggests ``.h5`` output.
    """
    from bnfold.keras.load import TensorDecl, _loaded_decls, signature_difference

    def refuse(why: str) -> OutputError:
        return OutputError(
            f"{dst}: {src} was written by Keras 2 and Keras {keras.__version__} cannot rebuild it exactly ({why}); "
            f"write {dst.with_suffix('.h5').name} instead"
        )

    fd, tmp_name = tempfile.mkstemp(prefix=".bnfold-keras2-", suffix=".h5")
    os.close(fd)
    try:
        legacy.save(tmp_name, save_format="h5")
        import h5py

        with h5py.File(tmp_name, "r+") as handle:
            config = json.loads(handle.attrs["model_config"])
            handle.attrs["model_config"] = json.dumps(keras2_config_for_keras3(config))
        try:
            rebuilt = keras.saving.load_model(tmp_name, compile=False, safe_mode=True, custom_objects=custom_objects())
        except Exception as exc:  # noqa: BLE001 - Keras raises many kinds while deserializing legacy layers
            raise refuse(keras_reason(exc)) from None
    finally:
        Path(tmp_name).unlink(missing_ok=True)
    wanted = _loaded_decls(list(legacy.inputs)), _loaded_decls(list(legacy.outputs))
    if _model_kind(legacy) == "sequential":  # a Sequential's input is named by whoever builds it; compare the rest
        wanted = [TensorDecl(None, d.shape, d.dtype) for d in wanted[0]], [TensorDecl(None, d.shape, d.dtype) for d in wanted[1]]
    why = signature_difference(wanted, list(rebuilt.inputs), list(rebuilt.outputs))
    if why:
        raise refuse(why)
    runner_names = input_names(legacy), output_names(legacy)

    def renamed(model: Any) -> KerasRunner:
        runner = KerasRunner(model)
        runner.input_names, runner.output_names = list(runner_names[0]), list(runner_names[1])
        return runner

    same = _same_predictions(legacy, lambda: renamed(rebuilt), options)
    if not same.passed:
        raise refuse(f"it predicts differently: {failure_message(same)}")
    return rebuilt
