"""Real Keras 3, legacy tf_keras and TF1-style models, frozen the way users freeze them today."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_close, bn_ops, run_graph

from bnfold import fold
from bnfold.tf.fold import LINEAR_OPS
from bnfold.tf.freeze import freeze_keras
from bnfold.tf.verify import find_inputs, find_outputs


def randomize_bn(model: object, seed: int = 0) -> None:
    """Trained-looking statistics, so a wrong fold cannot hide behind gamma=1, beta=0, mean=0, var=1."""
    rng = np.random.default_rng(seed)
    for layer in model._flatten_layers() if hasattr(model, "_flatten_layers") else model.layers:  # type: ignore[attr-defined]
        if "BatchNormalization" in type(layer).__name__:
            weights = layer.get_weights()
            shape = weights[0].shape
            new = []
            for w, name in zip(weights, [v.name for v in layer.weights], strict=True):
                if "gamma" in name:
                    new.append(rng.uniform(0.5, 1.5, shape) * rng.choice([-1, 1], shape))
                elif "beta" in name:
                    new.append(rng.normal(0, 0.3, shape))
                elif "mean" in name:
                    new.append(rng.normal(0, 0.3, shape))
                else:
                    new.append(rng.uniform(0.5, 2.0, shape))
                del w
            layer.set_weights(new)


def check_model(model: object, shape: tuple[int, ...], batch: int = 2) -> object:
    graph_def = freeze_keras(model).graph_def
    result = fold(graph_def, verify_outputs=True)
    x = np.random.default_rng(7).standard_normal((batch, *shape)).astype(np.float32)
    expected = model(x, training=False)  # type: ignore[operator]
    expected = expected.numpy() if hasattr(expected, "numpy") else np.asarray(expected)
    inputs = [s.name for s in find_inputs(graph_def)]
    (actual,) = run_graph(result.graph_def, {inputs[0]: x}, find_outputs(graph_def)[:1])
    assert_close(expected, actual)
    return result


def test_keras3_small_cnn_folds_every_bn_after_a_linear_layer() -> None:
    model = keras.Model(*small_cnn_model(keras))
    randomize_bn(model)
    result = check_model(model, (12, 12, 3))
    actions = [s.action for s in result.sites]
    assert actions.count("folded") == 4 and actions.count("standalone") == 1, result.sites
    assert bn_ops(result.graph_def) == []


def test_keras3_channels_first_conv() -> None:
    inp = keras.Input((3, 8, 8))
    h = keras.layers.Conv2D(4, 3, data_format="channels_first")(inp)
    h = keras.layers.BatchNormalization(axis=1)(h)
    model = keras.Model(inp, keras.layers.ReLU()(h))
    randomize_bn(model)
    result = check_model(model, (3, 8, 8))
    assert [s.action for s in result.sites] == ["folded"]


def test_legacy_tf_keras_model() -> None:
    tf_keras = pytest.importorskip("tf_keras")
    model = tf_keras.Model(*small_cnn_model(tf_keras))
    randomize_bn(model)
    result = check_model(model, (12, 12, 3))
    forms = {s.form for s in result.sites}
    assert "FusedBatchNormV3" in forms  # tf_keras freezes 4-D BN as the fused op
    assert [s.action for s in result.sites].count("folded") == 4
    assert bn_ops(result.graph_def) == []


def test_tf1_style_graph_frozen_with_convert_variables_to_constants() -> None:
    graph = tf.Graph()
    rng = np.random.default_rng(0)
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, 8, 8, 3], name="x")
        w = tf.compat.v1.get_variable("w", initializer=rng.standard_normal((3, 3, 3, 4)).astype(np.float32))
        y = tf.nn.conv2d(x, w, 1, "SAME")
        params = [tf.compat.v1.get_variable(n, initializer=rng.uniform(0.5, 1.5, 4).astype(np.float32)) for n in ("g", "b", "m", "v")]
        y, _, _ = tf.compat.v1.nn.fused_batch_norm(y, params[0], params[1], params[2], params[3], is_training=False)
        tf.nn.relu(y, name="output")
        with tf.compat.v1.Session() as session:
            session.run(tf.compat.v1.global_variables_initializer())
            frozen = tf.compat.v1.graph_util.convert_variables_to_constants(session, graph.as_graph_def(), ["output"])
            feeds = {"x": rng.standard_normal((2, 8, 8, 3)).astype(np.float32)}
            expected = session.run("output:0", {"x:0": feeds["x"]})
    result = fold(frozen, verify_outputs=True)
    assert [s.action for s in result.sites] == ["folded"]
    assert_close(expected, run_graph(result.graph_def, feeds, ["output"])[0])


@pytest.mark.parametrize("name", ["ResNet50", "MobileNetV2", "DenseNet121"])
def test_keras_applications_fold_every_bn_after_conv(name: str) -> None:
    model = getattr(keras.applications, name)(weights=None, input_shape=(32, 32, 3))
    randomize_bn(model)
    result = check_model(model, (32, 32, 3))
    graph = {n.name: n for n in result.graph_def.node}
    assert not [n for n in graph.values() if n.op in ("Rsqrt", "FusedBatchNormV3")]
    for site in result.sites:
        assert site.action in ("folded", "standalone"), site
        if site.action == "standalone":  # DenseNet's pre-activation BN after a concat
            source = graph[site.name + "/bnfold_scale"].input[0].split(":")[0]
            assert graph[source].op not in LINEAR_OPS, site
    expected_folded = {"ResNet50": 53, "MobileNetV2": 52, "DenseNet121": 59}[name]
    assert result.count("folded") == expected_folded


def small_cnn_model(layers_module: object) -> tuple[object, object]:
    layers = layers_module.layers  # type: ignore[attr-defined]
    inp = layers.Input((12, 12, 3))
    h = layers.Conv2D(8, 3, padding="same")(inp)
    h = layers.BatchNormalization()(h)
    h = layers.ReLU()(h)
    h = layers.DepthwiseConv2D(3, depth_multiplier=2, use_bias=False)(h)
    h = layers.BatchNormalization()(h)
    h = layers.Conv2DTranspose(4, 3, strides=2, padding="same")(h)
    h = layers.BatchNormalization()(h)
    h = layers.ReLU()(h)
    h = layers.BatchNormalization()(h)  # after a ReLU: nothing to fold into
    h = layers.GlobalAveragePooling2D()(h)
    h = layers.Dense(6)(h)
    h = layers.BatchNormalization()(h)
    return inp, h
