"""Keras in, Keras out: fold BatchNormalization layers into the layers around them, at the layer level.

The graph fold needs TensorFlow and gives back a frozen graph; users who keep
training, quantize, convert with ``keras.export`` or run Keras 3 on JAX need
the Keras model itself. So this adapter reads the model's own config
(:mod:`bnfold.keras.layer_graph`), decides per BN whether it can fold
(:mod:`bnfold.keras.plan`: the same rules as the graph fold), rebuilds the
model with ``from_config``, copies every weight across, and checks the new
model against the old with :func:`bnfold.core.comparison.compare_runners` and a
Keras runner. Only Keras and numpy are used, so the fold and its check run on
whichever backend Keras is configured with. Files (loading in the confined
worker, saving) are :mod:`bnfold.keras.file` and :mod:`bnfold.keras.write`.

The standalone affine layer lives here because a saved config names the module
that defines it (``bnfold.keras.fold``) and because the rebuild needs it registered.

Works for Keras 3 and legacy ``tf_keras`` (``.h5``).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import keras
import numpy as np

from bnfold.core.comparison import TOLERANCES, CheckArgs, CheckOptions, InputSpec, Verification, compare_runners, failure_message
from bnfold.core.errors import InputError, UsageError, VerificationError, first_line
from bnfold.core.result import FoldResult
from bnfold.keras.layer_graph import _model_kind, _sublayers, layer_counts, subclassed_error
from bnfold.keras.plan import FoldOptions, _Plan, plan_model

if TYPE_CHECKING:
    from typing_extensions import Unpack


# --------------------------------------------------------------------------------------------
# The standalone affine layer (--standalone-affine)


def _affine_init(layer: Any, axis: int) -> None:
    layer.axis = int(axis)
    layer.supports_masking = True


def _add_affine_weights(layer: Any, input_shape: Any) -> None:
    """The per-channel scale and shift, fixed (not trainable): the same two weights for Keras 3 and tf_keras."""
    channels = int(input_shape[layer.axis])
    layer.scale = layer.add_weight(name="scale", shape=(channels,), initializer="ones", trainable=False)
    layer.shift = layer.add_weight(name="shift", shape=(channels,), initializer="zeros", trainable=False)


@keras.saving.register_keras_serializable(package="bnfold", name="ChannelAffine")
class ChannelAffine(keras.layers.Layer):
    """``y = x * scale + shift`` per channel, with fixed weights: a BN that has no statistics to misuse.

    A BN that stays can still be switched to batch statistics (``training=True``,
    fine-tuning with the layer unfrozen); this layer cannot. Registered as
    ``bnfold>ChannelAffine``, so ``keras.saving.load_model`` accepts it in safe
    mode once ``bnfold.keras.fold`` is imported (or with the class passed in
    ``custom_objects``; docs/keras.md).
    """

    def __init__(self, axis: int = -1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        _affine_init(self, axis)

    def build(self, input_shape: Any) -> None:
        _add_affine_weights(self, input_shape)

    def call(self, inputs: Any, mask: Any = None) -> Any:
        ops = keras.ops
        shape = [1] * len(inputs.shape)
        shape[self.axis] = -1
        scale = ops.reshape(ops.cast(self.scale, inputs.dtype), shape)
        shift = ops.reshape(ops.cast(self.shift, inputs.dtype), shape)
        return inputs * scale + shift

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "axis": self.axis}


_LEGACY_AFFINE: dict[int, type] = {}


def legacy_affine_class(tf_keras: Any) -> type:
    """The same layer for legacy ``tf_keras`` (``.h5``), registered there as ``bnfold>ChannelAffine``."""
    if id(tf_keras) in _LEGACY_AFFINE:
        return _LEGACY_AFFINE[id(tf_keras)]

    @tf_keras.saving.register_keras_serializable(package="bnfold", name="ChannelAffine")
    class LegacyChannelAffine(tf_keras.layers.Layer):  # type: ignore[misc,name-defined]
        def __init__(self, axis: int = -1, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            _affine_init(self, axis)

        def build(self, input_shape: Any) -> None:
            _add_affine_weights(self, input_shape)
            super().build(input_shape)

        def call(self, inputs: Any, mask: Any = None) -> Any:
            import tensorflow as tf

            shape = [1] * inputs.shape.rank
            shape[self.axis] = -1
            return inputs * tf.reshape(tf.cast(self.scale, inputs.dtype), shape) + tf.reshape(tf.cast(self.shift, inputs.dtype), shape)

        def get_config(self) -> dict[str, Any]:
            return {**super().get_config(), "axis": self.axis}

    _LEGACY_AFFINE[id(tf_keras)] = LegacyChannelAffine
    return LegacyChannelAffine


def custom_objects(module: Any = None) -> dict[str, type]:
    """What to pass as ``custom_objects`` to load a file with standalone affine layers (``module``: tf_keras for .h5)."""
    cls = ChannelAffine if module is None or module is keras else legacy_affine_class(module)
    return {"bnfold>ChannelAffine": cls, "ChannelAffine": cls}


# --------------------------------------------------------------------------------------------
# Running a Keras model for the check


class KerasRunner:
    """A Keras model as a :class:`bnfold.core.comparison.Runner`: inference mode, inputs in the model's order."""

    errors: tuple[type[BaseException], ...] = (ValueError, TypeError)

    def __init__(self, model: Any) -> None:
        self.model = model
        self.input_names = input_names(model)
        self.output_names = output_names(model)

    def run(self, fetches: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        args = [feeds[n] for n in self.input_names]
        result = self.model(args[0] if len(args) == 1 else args, training=False)
        if isinstance(result, dict):
            flat = [result[k] for k in (self.output_names if set(self.output_names) <= set(result) else result)]
        elif isinstance(result, list | tuple):
            flat = list(result)
        else:
            flat = [result]
        arrays = dict(zip(self.output_names, (_to_numpy(t) for t in flat), strict=False))
        return [arrays[f] for f in fetches]

    def close(self) -> None:
        pass


def _to_numpy(tensor: Any) -> np.ndarray:
    if hasattr(tensor, "numpy"):
        return np.asarray(tensor.numpy())
    return np.asarray(keras.ops.convert_to_numpy(tensor))


def input_names(model: Any) -> list[str]:
    """The names of the model's InputLayers, in order: what a rebuilt model keeps (a tensor's own name may not)."""
    names = []
    for i, tensor in enumerate(model.inputs):
        history = getattr(tensor, "_keras_history", None)
        owner = getattr(history, "operation", None) or getattr(history, "layer", None)
        names.append(str(getattr(owner, "name", None) or getattr(tensor, "name", f"input_{i}")).split(":")[0])
    return names


def output_names(model: Any) -> list[str]:
    names = list(getattr(model, "output_names", None) or [f"output_{i}" for i in range(len(model.outputs))])
    seen: dict[str, int] = {}
    unique = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        unique.append(name if seen[name] == 1 else f"{name}_{seen[name] - 1}")
    return unique


def input_specs(model: Any) -> dict[str, InputSpec]:
    specs = {}
    for name, tensor in zip(input_names(model), model.inputs, strict=True):
        dtype = tensor.dtype
        dtype = getattr(dtype, "as_numpy_dtype", dtype)
        shape = [None if d is None else int(d) for d in tensor.shape]
        specs[name] = InputSpec(name, np.dtype(dtype), shape)
    return specs


def _compute_dtype(model: Any) -> str:
    """The narrowest float any layer computes in: mixed precision makes every output that coarse, whatever its dtype."""
    order = ["float64", "float32", "float16", "bfloat16"]
    worst = "float32"
    for layer in _sublayers(model) or model.layers:
        dtype = str(getattr(layer, "compute_dtype", "float32") or "float32")
        if dtype in order and order.index(dtype) > order.index(worst):
            worst = dtype
    return worst


def compare_models(original: Any, folded: Any, options: CheckOptions) -> Verification:
    """Run both models on the same inputs (inference mode) and compare every output, as every format does."""
    compute = _compute_dtype(original)
    if compute in ("float16", "bfloat16") and (options.rtol is None or options.atol is None):
        rtol, atol = TOLERANCES[compute]
        options = dataclasses.replace(
            options, rtol=rtol if options.rtol is None else options.rtol, atol=atol if options.atol is None else options.atol
        )
    unknown = [n for n in options.feeds if n not in input_names(original)]
    if unknown:
        raise UsageError(f"--feed: the Keras model has no input {unknown[0]!r} (inputs: {', '.join(input_names(original))})")
    result = compare_runners(
        lambda: KerasRunner(original), lambda: KerasRunner(folded), input_specs(original), output_names(original), options
    )
    if compute in ("float16", "bfloat16"):
        result.notes.append(f"layers compute in {compute} (mixed precision): {compute} tolerances")
    return result


# --------------------------------------------------------------------------------------------
# The API


def fold_keras(
    model: Any, *, standalone_affine: bool = False, source: str | None = None, **check: Unpack[CheckArgs]
) -> tuple[Any, FoldResult]:
    """Fold a Functional or Sequential Keras model's BN layers; return the new model and the report.

    The input model is not modified. The new model keeps layer names, input and
    output names and order, the dtype policy, and every unfolded layer's weights
    bit for bit. With ``verify_outputs`` both models run on the same inputs in
    inference mode and :class:`~bnfold.core.errors.VerificationError` is raised when
    an output differs beyond tolerance (unless ``force``); ``check`` takes the
    check's options (:class:`~bnfold.core.comparison.CheckArgs`).
    """
    options = CheckOptions.of(check)
    name = source or f"<{type(model).__name__} {getattr(model, 'name', '')}>"
    if _model_kind(model) is None:
        raise subclassed_error(model, name)
    try:
        plan = plan_model(model, FoldOptions(standalone_affine=standalone_affine))
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:  # a config form the reader does not know
        raise InputError(
            f"{name}: cannot read the layer graph in the model's config ({type(exc).__name__}: {first_line(exc)[:200]}); "
            "fold it as a graph (out.pb) or save it with a current Keras"
        ) from None
    new_model = _rebuild(model, plan, name)
    _carry_compile(model, new_model)
    result = FoldResult(
        graph_def=None,
        sites=plan.sites,
        inputs=input_names(model),
        outputs=output_names(model),
        ops_before=layer_counts(model),
        ops_after=layer_counts(new_model),
        source=name,
    )
    if options.verify:
        result.verification = compare_models(model, new_model, options)
        if not result.verification.passed and not options.force:
            raise VerificationError(f"{name}: verification failed: {failure_message(result.verification)}", result)
    return new_model, result


def _rebuild(model: Any, plan: _Plan, name: str) -> Any:
    plan.edit()
    try:
        new_model = type(model).from_config(plan.scope.config)
    except Exception as exc:  # noqa: BLE001 - Keras raises many kinds while deserializing layers
        raise InputError(
            f"{name}: cannot rebuild the Keras model from its config ({first_line(exc)[:200]}); fold it as a graph (out.pb)"
        ) from None
    plan.copy_weights(new_model)
    return new_model


def _carry_compile(model: Any, new_model: Any) -> None:
    """Keep the loss/optimizer/metrics settings, so the folded model can be trained further as it was."""
    get = getattr(model, "get_compile_config", None)
    compile_from = getattr(new_model, "compile_from_config", None)
    if get is None or compile_from is None or not getattr(model, "compiled", False):
        return
    try:
        config = get()
        if config:
            compile_from(config)
    except Exception:  # noqa: BLE001 - a custom loss that does not deserialize: the user compiles again
        pass
