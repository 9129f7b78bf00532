"""Keras in, Keras out: real Keras models folded at the layer level, compared by running them."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import ROOT, assert_close
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from bnfold.cli import app
from bnfold.core import errors
from bnfold.keras import file as keras_file
from bnfold.keras import fold as keras_fold
from bnfold.keras import layer_graph as keras_graph
from bnfold.keras import plan as keras_plan
from bnfold.keras.fold import fold_keras
from bnfold.keras.plan import LINEAR

L = keras.layers


def randomize_bn(model: object, seed: int = 0) -> None:
    """Trained-looking statistics (negative gammas too), so a wrong fold cannot hide behind identity BN."""
    rng = np.random.default_rng(seed)
    for layer in model._flatten_layers():  # type: ignore[attr-defined]
        if "BatchNormalization" in type(layer).__name__:
            c = layer.moving_mean.shape[0]
            values = {
                "gamma": rng.uniform(0.5, 1.5, c) * rng.choice([-1, 1], c),
                "beta": rng.normal(0, 0.3, c),
                "moving_mean": rng.normal(0, 0.3, c),
                "moving_variance": rng.uniform(0.5, 2.0, c),
            }
            for v in layer.weights:
                if keras_plan._weight_name(v) in values:  # renorm's extra statistics keep their initial values
                    v.assign(values[keras_plan._weight_name(v)].astype(keras_plan._numpy(v).dtype))


def predict(model: object, x: object) -> list[np.ndarray]:
    out = model(x, training=False)  # type: ignore[operator]
    flat = out if isinstance(out, list | tuple) else [out]
    return [np.asarray(keras.ops.convert_to_numpy(t), dtype=np.float64) for t in flat]


def sample(model: object, batch: int = 3, seed: int = 5) -> object:
    rng = np.random.default_rng(seed)
    xs = [rng.standard_normal((batch, *t.shape[1:])).astype("float32") for t in model.inputs]  # type: ignore[attr-defined]
    return xs[0] if len(xs) == 1 else xs


def assert_same_predictions(a: object, b: object, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    x = sample(a)
    for pa, pb in zip(predict(a, x), predict(b, x), strict=True):
        assert_close(pa, pb, rtol, atol)


def classes(model: object) -> list[str]:
    return [type(layer).__name__ for layer in model._flatten_layers(include_self=False)]  # type: ignore[attr-defined]


def bn_right_after_linear(model: object) -> list[str]:
    """BN layers whose input comes straight from a conv/dense layer, in the model and every nested model."""
    found = []

    def walk(m: object) -> None:
        config = m.get_config()  # type: ignore[attr-defined]
        layers = config["layers"]
        kinds = {(e.get("name") or e["config"]["name"]): e["class_name"] for e in layers}
        for i, entry in enumerate(layers):
            if entry["class_name"] != "BatchNormalization":
                continue
            if "inbound_nodes" in entry:
                sources = {r[0] for node in entry["inbound_nodes"] for _, r in keras_graph._walk_refs(node, True)}
            else:
                sources = {layers[i - 1]["config"]["name"]} if i else set()
            found.extend(entry["config"]["name"] for s in sources if kinds.get(s) in LINEAR)
        for layer in m.layers:  # type: ignore[attr-defined]
            if keras_graph._model_kind(layer):
                walk(layer)

    walk(model)
    return found


def site(result: object, name: str) -> object:
    return next(s for s in result.sites if s.name == name)  # type: ignore[attr-defined]


# ---------------------------------------------------------------- every layer type, forward

FORWARD = [
    ("Conv1D", (9, 3), lambda: L.Conv1D(4, 3, use_bias=False, name="lin")),
    ("Conv2D", (7, 7, 3), lambda: L.Conv2D(4, 3, padding="same", name="lin")),
    ("Conv3D", (5, 5, 5, 2), lambda: L.Conv3D(3, 2, name="lin")),
    ("DepthwiseConv1D", (9, 3), lambda: L.DepthwiseConv1D(3, depth_multiplier=2, name="lin")),
    ("DepthwiseConv2D", (7, 7, 3), lambda: L.DepthwiseConv2D(3, depth_multiplier=2, padding="same", use_bias=False, name="lin")),
    ("SeparableConv2D", (7, 7, 3), lambda: L.SeparableConv2D(5, 3, depth_multiplier=2, name="lin")),
    ("SeparableConv1D", (9, 3), lambda: L.SeparableConv1D(5, 3, name="lin")),
    ("Conv1DTranspose", (6, 3), lambda: L.Conv1DTranspose(4, 3, strides=2, name="lin")),
    ("Conv2DTranspose", (5, 5, 3), lambda: L.Conv2DTranspose(4, 3, strides=2, padding="same", use_bias=False, name="lin")),
    ("Conv3DTranspose", (3, 3, 3, 2), lambda: L.Conv3DTranspose(3, 2, name="lin")),
    ("Dense", (6,), lambda: L.Dense(5, name="lin")),
    ("Dense on 3-D input", (4, 6), lambda: L.Dense(5, use_bias=False, name="lin")),
    ("Conv2D channels_first", (3, 7, 7), lambda: L.Conv2D(4, 3, data_format="channels_first", name="lin")),
]


@pytest.mark.parametrize(("label", "shape", "make"), FORWARD, ids=[f[0] for f in FORWARD])
def test_bn_after_each_linear_layer_folds_into_it(label: str, shape: tuple[int, ...], make: object) -> None:
    inp = keras.Input(shape, name="x")
    lin = make()  # type: ignore[operator]
    axis = 1 if "channels_first" in label else -1
    y = L.BatchNormalization(axis=axis, name="bn")(lin(inp))
    out = L.Activation("tanh", name="act")(y)
    model = keras.Model(inp, out)
    randomize_bn(model)
    before = [w.copy() for w in model.get_layer("act").get_weights()]
    new, result = fold_keras(model)
    assert site(result, "bn").action == "folded" and site(result, "bn").folded_into == "lin"
    assert "BatchNormalization" not in classes(new)
    assert new.get_layer("lin").use_bias
    assert [layer.name for layer in new.layers] == ["x", "lin", "act"]
    assert result.verification is not None and result.verification.passed
    assert_same_predictions(model, new)
    assert all(np.array_equal(a, b) for a, b in zip(before, new.get_layer("act").get_weights(), strict=True))


# ---------------------------------------------------------------- backward (BN before the layer)


@pytest.mark.parametrize(
    ("make", "shape"),
    [
        (lambda: L.Dense(4, name="lin"), (6,)),
        (lambda: L.Conv2D(4, 3, padding="valid", name="lin"), (7, 7, 3)),
        (lambda: L.DepthwiseConv2D(3, depth_multiplier=2, name="lin"), (7, 7, 3)),
        (lambda: L.Conv1D(4, 1, padding="same", name="lin"), (8, 3)),
    ],
    ids=["Dense", "Conv2D-valid", "DepthwiseConv2D-valid", "Conv1D-1-wide-same"],  # a 1-wide kernel pads nothing
)
def test_bn_before_a_linear_layer_folds_where_exact(make: object, shape: tuple[int, ...]) -> None:
    inp = keras.Input(shape, name="x")
    y = L.ReLU(name="relu")(inp)
    y = make()(L.BatchNormalization(name="bn")(y))  # type: ignore[operator]
    model = keras.Model(inp, y)
    randomize_bn(model)
    new, result = fold_keras(model)
    s = site(result, "bn")
    assert s.action == "folded" and s.folded_into == "lin" and "backward" in s.reason
    assert "BatchNormalization" not in classes(new)
    assert_same_predictions(model, new)


@pytest.mark.parametrize(
    ("make", "shape"),
    [
        (lambda: L.Conv3D(3, 2, name="lin"), (5, 5, 5, 2)),
        (lambda: L.DepthwiseConv1D(3, depth_multiplier=2, name="lin"), (9, 3)),
        (lambda: L.Conv2D(4, 3, strides=2, data_format="channels_first", name="lin"), (3, 7, 7)),
        (lambda: L.Dense(5, use_bias=False, name="lin"), (4, 6)),
    ],
    ids=["Conv3D-valid", "DepthwiseConv1D-valid", "Conv2D-channels_first-strided", "Dense-3-D-no-bias"],
)
def test_bn_before_more_linear_layers_folds_backward(make: object, shape: tuple[int, ...]) -> None:
    inp = keras.Input(shape, name="x")
    lin = make()  # type: ignore[operator]
    axis = 1 if lin.get_config().get("data_format") == "channels_first" else -1
    y = lin(L.BatchNormalization(axis=axis, name="bn")(L.Activation("tanh", name="act")(inp)))
    model = keras.Model(inp, y)
    randomize_bn(model)
    new, result = fold_keras(model)
    s = site(result, "bn")
    assert s.action == "folded" and s.folded_into == "lin" and "backward" in s.reason
    assert [layer.name for layer in new.layers] == ["x", "act", "lin"] and new.get_layer("lin").use_bias
    assert_same_predictions(model, new)


BACKWARD_REFUSED = [
    ("SeparableConv2D", (7, 7, 3), lambda: L.SeparableConv2D(4, 3, name="lin")),
    ("SeparableConv1D", (9, 3), lambda: L.SeparableConv1D(4, 3, name="lin")),
    ("Conv1DTranspose", (6, 3), lambda: L.Conv1DTranspose(4, 3, name="lin")),
    ("Conv2DTranspose", (5, 5, 3), lambda: L.Conv2DTranspose(4, 3, strides=2, name="lin")),
    ("Conv3DTranspose", (3, 3, 3, 2), lambda: L.Conv3DTranspose(3, 2, name="lin")),
]


@pytest.mark.parametrize(("label", "shape", "make"), BACKWARD_REFUSED, ids=[b[0] for b in BACKWARD_REFUSED])
def test_bn_before_separable_or_transposed_conv_stays_with_a_reason(label: str, shape: tuple[int, ...], make: object) -> None:
    """A transposed conv spreads a shift unevenly at the borders; a separable conv would need its depthwise kernel changed too."""
    inp = keras.Input(shape, name="x")
    model = keras.Model(inp, make()(L.BatchNormalization(name="bn")(L.ReLU(name="relu")(inp))))  # type: ignore[operator]
    randomize_bn(model)
    kernels = [w.copy() for w in model.get_layer("lin").get_weights()]
    new, result = fold_keras(model)
    s = site(result, "bn")
    assert s.action == "skipped" and f"never folded into the input side of lin ({label})" in s.reason
    assert all(np.array_equal(a, b) for a, b in zip(kernels, new.get_layer("lin").get_weights(), strict=True))
    assert_same_predictions(model, new)
    affine, result = fold_keras(model, standalone_affine=True)
    assert site(result, "bn").action == "standalone" and type(affine.get_layer("bn")).__name__ == "ChannelAffine"
    assert "BatchNormalization" not in classes(affine)
    assert_same_predictions(model, affine)


def test_bn_before_a_padded_conv_folds_only_with_zero_shift() -> None:
    inp = keras.Input((6, 6, 3), name="x")
    y = L.Conv2D(4, 3, padding="same", name="lin")(L.BatchNormalization(name="bn")(L.ReLU()(inp)))
    model = keras.Model(inp, y)
    randomize_bn(model)
    _, result = fold_keras(model)
    assert site(result, "bn").action == "skipped" and "pads with zeros" in site(result, "bn").reason
    bn = model.get_layer("bn")
    gamma, beta, mean, var = bn.get_weights()
    bn.set_weights([gamma, np.zeros_like(beta), np.zeros_like(mean), var])  # shift = beta - mean * scale = 0 exactly
    new, result = fold_keras(model)
    assert site(result, "bn").action == "folded"
    assert_same_predictions(model, new)


def test_bn_between_two_convs_folds_both_ways_into_one_layer() -> None:
    inp = keras.Input((8, 8, 3), name="x")
    y = L.BatchNormalization(name="bn_in")(L.ReLU()(inp))
    y = L.BatchNormalization(name="bn_out")(L.Conv2D(4, 3, name="conv")(y))
    model = keras.Model(inp, L.ReLU(name="out")(y))
    randomize_bn(model)
    new, result = fold_keras(model)
    assert [(s.name, s.action, s.folded_into) for s in result.sites] == [("bn_in", "folded", "conv"), ("bn_out", "folded", "conv")]
    assert_same_predictions(model, new)


# ---------------------------------------------------------------- model kinds


def test_sequential_nested_and_shared_models() -> None:
    inner = keras.Sequential(
        [keras.Input((6, 6, 4)), L.Conv2D(2, 1, name="sc"), L.BatchNormalization(name="sbn"), L.ReLU(name="sr")], name="inner"
    )
    a, b = keras.Input((8, 8, 3), name="a"), keras.Input((8, 8, 3), name="b")
    conv, bn = L.Conv2D(4, 3, name="shared_conv"), L.BatchNormalization(name="shared_bn")
    ya, yb = inner(bn(conv(a))), inner(bn(conv(b)))  # conv+bn pair called twice: every call folds the same way
    dense = L.Dense(3, name="dense")
    za, zb = dense(L.GlobalAveragePooling2D(name="gap_a")(ya)), dense(L.GlobalAveragePooling2D(name="gap_b")(yb))
    model = keras.Model([a, b], [L.Add(name="sum")([za, zb]), ya], name="outer")
    randomize_bn(model)
    new, result = fold_keras(model)
    assert {s.name: (s.action, s.folded_into) for s in result.sites} == {
        "inner/sbn": ("folded", "inner/sc"),
        "shared_bn": ("folded", "shared_conv"),
    }
    assert [t.name for t in new.inputs] == [t.name for t in model.inputs] and new.output_names == model.output_names
    assert [layer.name for layer in new.layers] == [layer.name for layer in model.layers if layer.name != "shared_bn"]
    assert "BatchNormalization" not in classes(new)
    assert_same_predictions(model, new)
    for name in ("dense",):
        assert all(
            np.array_equal(x, y) for x, y in zip(model.get_layer(name).get_weights(), new.get_layer(name).get_weights(), strict=True)
        )
    assert model.get_layer("shared_bn") is not None  # the input model is not modified


def test_functional_models_nested_two_deep_fold_inside_and_keep_names() -> None:
    core_in = keras.Input((6, 6, 4), name="core_in")
    core = keras.Model(
        core_in, L.ReLU(name="core_relu")(L.BatchNormalization(name="core_bn")(L.DepthwiseConv2D(3, name="core_dw")(core_in))), name="core"
    )
    mid_in = keras.Input((8, 8, 3), name="mid_in")
    mid = keras.Model(mid_in, core(L.BatchNormalization(name="mid_bn")(L.Conv2D(4, 3, name="mid_conv")(mid_in))), name="mid")
    x = keras.Input((8, 8, 3), name="x")
    y = L.Dense(2, name="head")(L.BatchNormalization(name="top_bn")(L.GlobalAveragePooling2D(name="gap")(mid(x))))
    model = keras.Model(x, y, name="top")
    randomize_bn(model)
    new, result = fold_keras(model)
    assert {s.name: (s.action, s.folded_into) for s in result.sites} == {
        "mid/core/core_bn": ("folded", "mid/core/core_dw"),
        "mid/mid_bn": ("folded", "mid/mid_conv"),
        "top_bn": ("folded", "head"),
    }
    assert "BatchNormalization" not in classes(new)
    assert [layer.name for layer in new.get_layer("mid").get_layer("core").layers] == ["core_in", "core_dw", "core_relu"]
    assert [t.name for t in new.inputs] == ["x"] and new.output_names == model.output_names
    assert_same_predictions(model, new)


def test_shared_conv_followed_by_bn_in_only_one_call_is_skipped() -> None:
    """Folding would change the conv's other call, which reads no BN."""
    a, b = keras.Input((6, 6, 3), name="a"), keras.Input((6, 6, 3), name="b")
    conv = L.Conv2D(4, 3, name="conv")
    model = keras.Model([a, b], [L.BatchNormalization(name="bn")(conv(a)), L.ReLU(name="plain")(conv(b))])
    randomize_bn(model)
    new, result = fold_keras(model)
    s = site(result, "bn")
    assert s.action == "skipped" and "conv is called 2 times and not every call is followed by this BN" in s.reason
    assert np.array_equal(new.get_layer("conv").get_weights()[0], model.get_layer("conv").get_weights()[0])
    assert_same_predictions(model, new)


def test_nested_model_called_twice_folds_once_for_both_calls() -> None:
    inner_in = keras.Input((6,), name="inner_in")
    inner = keras.Model(inner_in, L.BatchNormalization(name="ibn")(L.Dense(4, name="idense")(inner_in)), name="inner")
    a, b = keras.Input((6,), name="a"), keras.Input((6,), name="b")
    model = keras.Model([a, b], L.Subtract(name="diff")([inner(a), inner(b)]))
    randomize_bn(model)
    new, result = fold_keras(model)
    assert [(s.name, s.action) for s in result.sites] == [("inner/ibn", "folded")]
    assert_same_predictions(model, new)


def test_sequential_model() -> None:
    model = keras.Sequential(
        [
            keras.Input((8,)),
            L.Dense(6, name="d1"),
            L.BatchNormalization(name="bn1"),
            L.ReLU(),
            L.BatchNormalization(name="bn2"),
            L.Dense(2, name="d2"),
        ]
    )
    randomize_bn(model)
    new, result = fold_keras(model)
    assert [(s.name, s.folded_into) for s in result.sites] == [("bn1", "d1"), ("bn2", "d2")]
    assert isinstance(new, keras.Sequential) and "BatchNormalization" not in classes(new)
    assert_same_predictions(model, new)


def test_bn_as_model_output_keeps_the_output_name() -> None:
    inp = keras.Input((6,), name="x")
    model = keras.Model(inp, L.BatchNormalization(name="scores")(L.Dense(3, name="d")(inp)))
    randomize_bn(model)
    new, result = fold_keras(model)
    assert site(result, "scores").action == "folded"
    assert new.output_names == ["scores"] and type(new.get_layer("scores")).__name__ == "Identity"
    assert_same_predictions(model, new)


def test_mixed_precision_policy_is_kept() -> None:
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        inp = keras.Input((8, 8, 3), name="x")
        y = L.BatchNormalization(name="bn")(L.Conv2D(4, 3, name="conv")(inp))
        model = keras.Model(inp, L.Activation("linear", dtype="float32", name="out")(y))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    randomize_bn(model)
    new, result = fold_keras(model)
    assert site(result, "bn").action == "folded"
    assert new.get_layer("conv").dtype_policy.name == "mixed_float16" and new.get_layer("out").dtype_policy.name == "float32"
    assert new.get_layer("conv").kernel.dtype == "float32"
    assert result.verification is not None and result.verification.outputs[0].rtol == 1e-2  # float16 tolerance
    assert_same_predictions(model, new, rtol=1e-2, atol=1e-2)


def test_subclassed_model_is_refused_with_one_line() -> None:
    class Net(keras.Model):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = L.Conv2D(2, 1), L.BatchNormalization()

        def call(self, x: object) -> object:
            return self.bn(self.conv(x))

    net = Net()
    net(np.zeros((1, 4, 4, 3), "float32"))
    with pytest.raises(errors.InputError) as info:
        fold_keras(net)
    message = str(info.value)
    assert "\n" not in message and "subclassed" in message and "out.pb" in message and "saved_model" in message


# ---------------------------------------------------------------- safety skips


def conv_bn(**bn: object) -> tuple[keras.Model, keras.layers.Layer]:
    inp = keras.Input((6, 6, 3), name="x")
    layer = L.BatchNormalization(name="bn", **bn)
    model = keras.Model(inp, L.ReLU(name="out")(layer(L.Conv2D(4, 3, name="conv")(inp))))
    randomize_bn(model)
    return model, layer


def test_fan_out_conv_read_by_another_layer_is_skipped() -> None:
    inp = keras.Input((6, 6, 3), name="x")
    c = L.Conv2D(4, 3, name="conv")(inp)
    model = keras.Model(inp, L.Add(name="add")([L.BatchNormalization(name="bn")(c), c]))
    randomize_bn(model)
    new, result = fold_keras(model)
    s = site(result, "bn")
    assert s.action == "skipped" and "fan-out" in s.reason and "add" in s.reason
    assert "BatchNormalization" in classes(new)
    assert_same_predictions(model, new)


def test_bn_called_on_two_different_layers_is_skipped() -> None:
    a, b = keras.Input((6,), name="a"), keras.Input((6,), name="b")
    bn = L.BatchNormalization(name="bn")
    model = keras.Model([a, b], L.Add()([bn(L.Dense(3, name="d1")(a)), bn(L.Dense(3, name="d2")(b))]))
    randomize_bn(model)
    _, result = fold_keras(model)
    assert site(result, "bn").action == "skipped" and "called 2 times" in site(result, "bn").reason


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda w: [w[0], w[1], w[2], np.full_like(w[3], np.nan)], "non-finite"),
        (lambda w: [w[0], w[1], np.full_like(w[2], np.inf), w[3]], "non-finite"),
        (lambda w: [w[0], w[1], w[2], np.full_like(w[3], -1.0)], "not positive"),
    ],
    ids=["nan-variance", "inf-mean", "negative-variance"],
)
def test_bad_statistics_are_skipped(change: object, reason: str) -> None:
    model, bn = conv_bn()
    bn.set_weights(change(bn.get_weights()))  # type: ignore[operator]
    new, result = fold_keras(model, verify_outputs=False)
    assert site(result, "bn").action == "skipped" and reason in site(result, "bn").reason
    assert np.array_equal(new.get_layer("conv").get_weights()[0], model.get_layer("conv").get_weights()[0])


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(eps_exp=st.integers(-10, -1), k=st.integers(-4, 4), channels=st.integers(1, 4))
def test_variance_plus_epsilon_not_positive_is_skipped_exactly_at_zero(eps_exp: int, k: int, channels: int) -> None:
    """var + eps <= 0 is skipped, > 0 folds: var = -eps + k * eps / 4 with a power-of-two eps, so the sum is exact."""
    eps = 2.0**eps_exp
    inp = keras.Input((5,), name="x")
    bn = L.BatchNormalization(name="bn", epsilon=eps)
    model = keras.Model(inp, bn(L.Dense(channels, name="d")(inp)))
    var = np.full(channels, -eps + k * eps / 4, "float32")
    bn.set_weights([np.full(channels, 0.5, "float32"), np.zeros(channels, "float32"), np.zeros(channels, "float32"), var])
    new, result = fold_keras(model, verify_outputs=k > 0)
    s = site(result, "bn")
    if k <= 0:
        assert s.action == "skipped" and "variance + epsilon is not positive" in s.reason
        assert "BatchNormalization" in classes(new)
    else:
        assert s.action == "folded"
        assert_same_predictions(model, new)


def test_bn_on_another_axis_renorm_activation_and_training_call_are_skipped() -> None:
    model, _ = conv_bn(axis=1)
    assert "not the channel axis" in site(fold_keras(model)[1], "bn").reason
    model, _ = conv_bn(renorm=True)
    assert "renorm" in site(fold_keras(model)[1], "bn").reason
    inp = keras.Input((6,), name="x")
    model = keras.Model(inp, L.BatchNormalization(name="bn")(L.Dense(3, activation="relu", name="d")(inp)))
    assert "activation relu" in site(fold_keras(model)[1], "bn").reason
    inp = keras.Input((6,), name="x")
    model = keras.Model(inp, L.ReLU()(L.BatchNormalization(name="bn")(L.Dense(3, name="d")(inp), training=True)))
    # the author asked for batch statistics in this call: not folded, even where Keras 3's outer training=False wins
    assert "training=True" in site(fold_keras(model)[1], "bn").reason


def test_standalone_affine_replaces_a_lonely_bn() -> None:
    inp = keras.Input((6, 6, 3), name="x")
    model = keras.Model(inp, L.Conv2D(2, 3, padding="same", name="conv")(L.BatchNormalization(name="bn")(L.ReLU()(inp))))
    randomize_bn(model)
    new, result = fold_keras(model, standalone_affine=True)
    assert site(result, "bn").action == "standalone" and type(new.get_layer("bn")).__name__ == "ChannelAffine"
    assert not new.get_layer("bn").trainable_weights
    # training mode cannot switch it to batch statistics
    x = sample(model)
    assert_close(predict(new, x)[0], np.asarray(new(x, training=True)))
    assert_same_predictions(model, new)


# ---------------------------------------------------------------- hypothesis: shapes, channels, statistics


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    channels=st.integers(1, 6),
    kernel=st.integers(1, 3),
    kind=st.sampled_from(["Conv2D", "DepthwiseConv2D", "Dense", "Conv2DTranspose"]),
    var_scale=st.sampled_from([1e-6, 1e-2, 1.0, 1e3]),
    mean_scale=st.sampled_from([0.0, 1.0, 1e3]),
    seed=st.integers(0, 10_000),
)
def test_fold_matches_for_random_shapes_and_statistics(
    channels: int, kernel: int, kind: str, var_scale: float, mean_scale: float, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    inp = keras.Input((5, 5, 2), name="x")
    make = {
        "Conv2D": lambda: L.Conv2D(channels, kernel, name="lin"),
        "DepthwiseConv2D": lambda: L.DepthwiseConv2D(kernel, depth_multiplier=channels, name="lin"),
        "Dense": lambda: L.Dense(channels, name="lin"),
        "Conv2DTranspose": lambda: L.Conv2DTranspose(channels, kernel, name="lin"),
    }[kind]
    bn = L.BatchNormalization(name="bn", epsilon=1e-3)
    model = keras.Model(inp, bn(make()(inp)))
    c = bn.moving_mean.shape[0]
    gamma = rng.uniform(0.2, 2, c) * rng.choice([-1, 1], c)
    bn.set_weights([gamma, rng.normal(0, 1, c), rng.normal(0, 1, c) * mean_scale, rng.uniform(0.1, 1, c) * var_scale])
    new, result = fold_keras(model)  # raises if the check fails
    assert site(result, "bn").action == "folded"
    x = sample(model)
    expected, actual = predict(model, x)[0], predict(new, x)[0]
    assert_close(expected, actual, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- files and the command line


def bnfold_cli(*args: str, cwd: Path) -> object:
    """The real command line, in process (a subprocess would pay TensorFlow's start-up per call)."""
    old = Path.cwd()
    os.chdir(cwd)
    try:
        return CliRunner().invoke(app, ["fold", *args])
    finally:
        os.chdir(old)


def small_model() -> keras.Model:
    inp = keras.Input((8, 8, 3), name="image")
    y = L.BatchNormalization(name="bn1")(L.Conv2D(4, 3, use_bias=False, name="conv1")(inp))
    y = L.BatchNormalization(name="bn2")(L.ReLU(name="relu")(y))
    y = L.Dense(2, name="head")(L.GlobalAveragePooling2D(name="gap")(y))
    model = keras.Model(inp, y, name="small")
    randomize_bn(model)
    return model


def test_cli_keras_to_keras_loads_in_safe_mode_predicts_and_trains(tmp_path: Path) -> None:
    model = small_model()
    model.save(tmp_path / "in.keras")
    done = bnfold_cli("in.keras", "out.keras", "--standalone-affine", "--report", "r.json", cwd=tmp_path)
    assert done.exit_code == 0, done.output
    loaded = keras.saving.load_model(tmp_path / "out.keras", safe_mode=True)
    assert "BatchNormalization" not in classes(loaded) and type(loaded.get_layer("bn2")).__name__ == "ChannelAffine"
    assert [layer.name for layer in loaded.layers] == [layer.name for layer in model.layers if layer.name != "bn1"]
    assert_same_predictions(model, loaded)
    loaded.compile(optimizer="sgd", loss="mse")
    x = sample(model, batch=4)
    history = loaded.fit(x, np.zeros((4, 2), "float32"), epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    # the way docs/keras.md tells users to load it with their own copy of the layer class
    again = keras.saving.load_model(tmp_path / "out.keras", safe_mode=True, custom_objects=keras_fold.custom_objects())
    assert_same_predictions(model, again)


def test_cli_keras_errors_are_one_line_and_write_nothing(tmp_path: Path) -> None:
    small_model().save(tmp_path / "in.keras")
    done = bnfold_cli("in.keras", "out.keras", "--opset", "13", cwd=tmp_path)
    assert done.exit_code == errors.EXIT_USAGE and "--opset" in done.output and not (tmp_path / "out.keras").exists()
    done = bnfold_cli("in.keras", "out.pb", "--standalone-affine", cwd=tmp_path)
    assert done.exit_code == errors.EXIT_USAGE and "--standalone-affine" in done.output
    done = bnfold_cli("missing.keras", "out.keras", cwd=tmp_path)
    assert done.exit_code == errors.EXIT_INPUT and "missing.keras" in done.output and not (tmp_path / "out.keras").exists()
    assert len(done.output.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.keras"]  # no temporary left behind


def test_keras_check_runs_batch_independence_and_a_failed_check_writes_nothing(tmp_path: Path) -> None:
    model = small_model()
    _, result = fold_keras(model)
    assert result.verification is not None and result.verification.batch_independent is True
    model.save(tmp_path / "in.keras")
    # zero tolerance: the folded kernel rounds differently from conv-then-BN, so the real check fails
    done = bnfold_cli("in.keras", "out.keras", "--rtol", "0", "--atol", "0", cwd=tmp_path)
    assert done.exit_code == errors.EXIT_VERIFY and "nothing written" in done.output, done.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.keras"]


def test_legacy_tf_keras_h5_round_trip(tmp_path: Path) -> None:
    tf_keras = pytest.importorskip("tf_keras")
    TL = tf_keras.layers
    inp = tf_keras.Input((8, 8, 3), name="img")
    y = TL.BatchNormalization(name="bn1")(TL.Conv2D(4, 3, use_bias=False, name="c1")(inp))
    y = TL.Dense(5, name="d")(TL.BatchNormalization(name="bn2")(TL.ReLU()(y)))
    model = tf_keras.Model(inp, y)
    randomize_bn(model)
    model.save(tmp_path / "in.h5")
    _, result = keras_file.fold_keras_file(tmp_path / "in.h5", tmp_path / "out.h5")
    assert [(s.name, s.action, s.folded_into) for s in result.sites] == [("bn1", "folded", "c1"), ("bn2", "folded", "d")]
    loaded = tf_keras.models.load_model(tmp_path / "out.h5")
    assert "BatchNormalization" not in [type(layer).__name__ for layer in loaded.layers]
    x = np.random.default_rng(0).standard_normal((2, 8, 8, 3)).astype("float32")
    assert_close(model.predict(x, verbose=0), loaded.predict(x, verbose=0))


def test_cli_legacy_h5_standalone_affine_loads_predicts_and_trains(tmp_path: Path) -> None:
    tf_keras = pytest.importorskip("tf_keras")
    TL = tf_keras.layers
    inp = tf_keras.Input((8, 8, 3), name="img")
    y = TL.BatchNormalization(name="bn1")(TL.DepthwiseConv2D(3, name="dw")(inp))
    y = TL.BatchNormalization(name="lonely")(TL.ReLU(name="relu")(y))  # nothing linear after it
    y = TL.Dense(2, name="head")(TL.GlobalAveragePooling2D(name="gap")(y))
    model = tf_keras.Model(inp, y)
    randomize_bn(model)
    model.save(tmp_path / "in.h5")
    done = bnfold_cli("in.h5", "out.h5", "--standalone-affine", cwd=tmp_path)
    assert done.exit_code == 0, done.output
    loaded = tf_keras.models.load_model(tmp_path / "out.h5", custom_objects=keras_fold.custom_objects(tf_keras))
    assert [type(layer).__name__ for layer in loaded.layers] == [
        "InputLayer",
        "DepthwiseConv2D",
        "ReLU",
        "LegacyChannelAffine",
        "GlobalAveragePooling2D",
        "Dense",
    ]
    x = np.random.default_rng(0).standard_normal((4, 8, 8, 3)).astype("float32")
    assert_close(model.predict(x, verbose=0), loaded.predict(x, verbose=0))
    assert not loaded.get_layer("lonely").trainable_weights
    assert_close(loaded(x, training=True).numpy(), loaded(x, training=False).numpy())  # no batch statistics to switch to
    loaded.compile(optimizer="sgd", loss="mse")
    assert np.isfinite(loaded.fit(x, np.zeros((4, 2), "float32"), epochs=1, verbose=0).history["loss"][0])
    done = bnfold_cli("in.h5", "out.keras", cwd=tmp_path)  # Keras 3 rebuilds this Keras 2 model exactly (#23)
    assert done.exit_code == 0, done.output
    rebuilt = keras.saving.load_model(tmp_path / "out.keras", compile=False)
    assert_close(model.predict(x, verbose=0), np.asarray(rebuilt(x, training=False)))


def test_keras3_model_to_h5_and_non_keras_input_refused(tmp_path: Path) -> None:
    model = small_model()
    model.save(tmp_path / "in.keras")
    _, result = keras_file.fold_keras_file(tmp_path / "in.keras", tmp_path / "out.h5")
    assert result.count("folded") == 1  # bn2 follows a ReLU and precedes pooling: it stays
    loaded = keras.saving.load_model(tmp_path / "out.h5")
    assert [type(layer).__name__ for layer in loaded.layers].count("BatchNormalization") == 1
    assert_same_predictions(model, loaded)
    (tmp_path / "in.pb").write_bytes(b"")
    done = bnfold_cli("in.pb", "out2.keras", cwd=tmp_path)
    assert done.exit_code == errors.EXIT_USAGE and "needs a Keras model as input" in done.output
    assert not (tmp_path / "out2.keras").exists()


def test_jax_backend_folds_and_checks(tmp_path: Path) -> None:
    if subprocess.run([sys.executable, "-c", "import jax"], capture_output=True).returncode != 0:
        pytest.skip("jax is not installed")
    code = textwrap.dedent(
        f"""
        import numpy as np, keras
        assert keras.backend.backend() == "jax"
        from bnfold.keras.fold import fold_keras
        L = keras.layers
        inp = keras.Input((8, 8, 3), name="x")
        y = L.BatchNormalization(name="bn")(L.DepthwiseConv2D(3, name="dw")(inp))
        y = L.BatchNormalization(name="lonely")(L.ReLU()(y))
        m = keras.Model(inp, y)
        for layer in m.layers:
            if type(layer).__name__ == "BatchNormalization":
                layer.set_weights([np.full(3, -1.5), np.full(3, 0.3), np.full(3, 0.2), np.full(3, 0.7)])
        new, result = fold_keras(m, standalone_affine=True)
        assert [s.action for s in result.sites] == ["folded", "standalone"], result.sites
        assert result.verification.passed
        new.save({str(tmp_path / "j.keras")!r})
        r = keras.saving.load_model({str(tmp_path / "j.keras")!r})
        x = np.random.default_rng(0).standard_normal((2, 8, 8, 3)).astype("float32")
        print(float(np.abs(np.asarray(r(x)) - np.asarray(m(x, training=False))).max()))
        """
    )
    env = {**os.environ, "KERAS_BACKEND": "jax", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout.strip().splitlines()[-1]) < 1e-4


# ---------------------------------------------------------------- a real application


def test_mobilenetv2_small_comes_out_without_bn_after_conv() -> None:
    model = keras.applications.MobileNetV2(input_shape=(96, 96, 3), alpha=0.35, weights=None, classifier_activation=None)
    randomize_bn(model)
    before = bn_right_after_linear(model)
    new, result = fold_keras(model)
    assert len(before) == 52 and bn_right_after_linear(new) == []
    assert result.count("folded") == 52 and "BatchNormalization" not in classes(new)
    assert result.verification is not None and result.verification.passed
    assert_same_predictions(model, new)


# With MobileNetV2 above, all four applications of #17 at 64x64 (~25 s on 2 cores); benchmarks/keras_fold.py folds them at 224x224.
@pytest.mark.parametrize("name", ["ResNet50", "EfficientNetB0", "DenseNet121"])
def test_keras_applications_come_out_without_bn_after_conv_or_dense(name: str) -> None:
    # logits, not softmax: near-uniform probabilities of an untrained model would hide a wrong fold inside atol
    model = getattr(keras.applications, name)(input_shape=(64, 64, 3), weights=None, classifier_activation=None)
    randomize_bn(model)
    assert bn_right_after_linear(model)
    new, result = fold_keras(model)
    assert bn_right_after_linear(new) == []
    assert result.verification is not None and result.verification.passed
    x = sample(model, batch=2)
    for pa, pb in zip(predict(model, x), predict(new, x), strict=True):
        assert_close(pa, pb, 1e-4, 1e-6)
