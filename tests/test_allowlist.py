"""The allowlist (bnfold.tf.allowlist) lets real models through and finds functions however deep they hide.

The hostile suite (test_hostile.py) shows what is refused through the CLI;
these tests show the other half that makes an allowlist usable: models users
have (Keras applications in both Keras versions, TF1 and TF2 SavedModels, a
tf_keras model with TF op layers, ONNX local functions) pass it and fold.
"""

from __future__ import annotations

from pathlib import Path

import keras
import onnx
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper
from test_hostile import evil_function, onnx_model, plain_graph, read_saved_model, tf1_saved_model

from bnfold import fold
from bnfold.core.trust import DISABLE_ENV, enforced, trusting
from bnfold.keras.allowlist import keras_refusal, tf_function_allowed
from bnfold.keras.load import keras_config
from bnfold.onnx.allowlist import onnx_refusal
from bnfold.tf.allowlist import graph_refusals, node_functions, saved_model_refusals


@settings(max_examples=20, deadline=None)
@given(depth=st.integers(1, 6), in_list=st.booleans())
def test_function_values_are_found_at_any_depth(depth: int, in_list: bool) -> None:
    """Evil passed as a value through ``depth`` levels of nested func attributes is still checked."""
    graph_def = plain_graph(hook=True)
    evil_function(graph_def, Path("/nonexistent/never-written"))
    node = graph_def.node.add(name="c", op="PartitionedCall", input=["x"])
    value = node.attr["f"]
    for level in range(depth):
        func = value.list.func.add() if in_list and level == 0 else value.func
        func.name = f"Level{level}"
        value = func.attr["f"]
    value.func.name = "Evil"
    refused = graph_refusals(graph_def, ["output"])  # every library function
    assert [(r.function, r.op) for r in refused] == [("Evil", "WriteFile")]
    # and the walk that follows attributes reaches it from the call alone, however deep it is nested
    levels = {f"Level{i}" for i in range(depth)}
    assert set(node_functions(node, levels | {"Evil"})) == levels | {"Evil"}


@pytest.mark.parametrize(
    ("name", "allowed"),
    [
        ("nn.relu", True),
        ("math.add", True),
        ("reshape", True),
        ("compat.v1.transpose", True),
        ("__operators__.add", True),
        ("io.gfile.remove", False),
        ("io.write_file", False),
        ("compat.v1.io.write_file", False),
        ("py_function", False),
        ("numpy_function", False),
        ("debugging.experimental.enable_dump_debug_info", False),
        ("math.__class__", False),
        ("nn.experimental", False),
        ("", False),
        (None, False),
    ],
)
def test_tf_function_list(name: object, allowed: bool) -> None:
    assert tf_function_allowed(name) is allowed


def test_keras_applications_pass(tmp_path: Path) -> None:
    """Built-in layers only: MobileNetV3 (Rescaling, HardSwish activations, nested ops) in Keras 3 and tf_keras."""
    model = keras.applications.MobileNetV3Small(weights=None, input_shape=(96, 96, 3))
    model.save(tmp_path / "m.keras")
    assert keras_refusal(keras_config(tmp_path / "m.keras")) is None
    tf_keras = pytest.importorskip("tf_keras")
    legacy = tf_keras.applications.MobileNetV3Small(weights=None, input_shape=(96, 96, 3))
    legacy.save(tmp_path / "m.h5")
    assert keras_refusal(keras_config(tmp_path / "m.h5")) is None


def test_tf_keras_op_layers_on_the_list_fold(tmp_path: Path) -> None:
    """A tf_keras model whose functional graph calls tf.nn.relu and tf.reshape (TFOpLambda layers) passes and folds."""
    tf_keras = pytest.importorskip("tf_keras")
    inputs = tf_keras.Input((4,))
    x = tf_keras.layers.BatchNormalization()(tf_keras.layers.Dense(6)(inputs))
    x = tf.reshape(tf.nn.relu(x), [-1, 3, 2])
    model = tf_keras.Model(inputs, x)
    model.save(tmp_path / "ops.h5")
    config = keras_config(tmp_path / "ops.h5")
    assert "TFOpLambda" in str(config)
    assert keras_refusal(config) is None
    result = fold(tmp_path / "ops.h5")
    assert result.verification is not None and result.verification.passed


def test_saved_models_users_have_pass(tmp_path: Path) -> None:
    """TF1 (Builder, saver, restore op reading its own variables) and Keras 3 export: nothing refused, and they fold."""
    tf1 = tf1_saved_model(tmp_path / "tf1")
    assert saved_model_refusals(read_saved_model(tf1)) == []
    result = fold(tf1)
    assert result.verification is not None and result.verification.passed
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.BatchNormalization()(keras.layers.Dense(3)(inputs)))
    model.export(str(tmp_path / "k3"), verbose=False)
    assert saved_model_refusals(read_saved_model(tmp_path / "k3")) == []


def test_onnx_local_functions_pass_and_custom_domains_do_not() -> None:
    body = [helper.make_node("Relu", ["x"], ["y"])]
    function = helper.make_function("local", "MyRelu", ["x"], ["y"], body, [helper.make_opsetid("", 17)])
    model = onnx_model([helper.make_node("MyRelu", ["bn"], ["y"], domain="local")], [function], {"local": 1})
    onnx.checker.check_model(model)
    assert onnx_refusal(model) is None
    model.functions[0].node.append(helper.make_node("Spy", ["x"], ["z"], domain="com.evil"))
    assert onnx_refusal(model) is not None and "com.evil" in onnx_refusal(model)[1]  # type: ignore[index]


def test_trust_and_the_test_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    assert enforced()
    with trusting(True):
        assert not enforced()
    assert enforced() and not enforced(trust_model=True)
    monkeypatch.setenv(DISABLE_ENV, "1")
    assert not enforced()
