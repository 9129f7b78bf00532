"""Weights and BN parameters computed from constants by stateless ops are constants (#11).

Published graphs store weights as uint8 behind ``Dequantize``, transposed,
concatenated or packed from pieces; bnfold evaluates such subgraphs with
TensorFlow itself (in its worker process) and folds the values in float64.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf
from conftest import assert_close, bn_ops, run_graph
from hypothesis import given, settings
from hypothesis import strategies as st
from tensorflow.core.framework import graph_pb2

import bnfold
from bnfold.tf.canonical import ConstEvaluator, evaluable_by_tf
from bnfold.tf.graph import GraphIndex

C = 4


def _weights(form: str, rng: np.random.Generator) -> tf.Tensor:
    """A [3, 3, 3, C] conv kernel, built the way ``form`` names."""
    w = rng.standard_normal((3, 3, 3, C)).astype(np.float32)
    if form == "dequantize":  # uint8 storage, as a quantized face detector ships its weights
        lo, hi = float(w.min()), float(w.max())
        q = np.round((w - lo) / (hi - lo) * 255).astype(np.uint8)
        return tf.raw_ops.Dequantize(
            input=tf.constant(q, tf.quint8), min_range=tf.constant(lo), max_range=tf.constant(hi), mode="MIN_COMBINED"
        )
    if form == "transpose":  # stored as [C, 3, 3, 3] (another framework's layout)
        return tf.transpose(tf.constant(np.transpose(w, (3, 0, 1, 2))), [1, 2, 3, 0])
    if form == "concat":  # two halves of the output channels
        return tf.concat([tf.constant(w[..., :2]), tf.constant(w[..., 2:])], axis=3)
    if form == "pack":
        return tf.stack([tf.constant(w[..., i]) for i in range(C)], axis=3)
    raise AssertionError(form)


def _bn_param(form: str, values: np.ndarray) -> tf.Tensor:
    if form == "const":
        return tf.constant(values.astype(np.float32))
    if form == "fill":  # one value for every channel
        return (
            tf.fill([C], tf.constant(float(values[0]), tf.float32))
            if np.all(values == values[0])
            else tf.constant(values.astype(np.float32))
        )
    if form == "pack":
        return tf.stack([tf.constant(np.float32(v)) for v in values])
    if form == "expand":
        return tf.reshape(tf.expand_dims(tf.constant(values.astype(np.float32)), 0), [C])
    raise AssertionError(form)


def graph(weights: str, params: str, seed: int, gamma: np.ndarray, var: np.ndarray) -> graph_pb2.GraphDef:
    rng = np.random.default_rng(seed)
    g = tf.Graph()
    with g.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, 6, 6, 3], name="x")
        y = tf.nn.conv2d(x, _weights(weights, rng), 1, "SAME")
        y = tf.raw_ops.FusedBatchNormV3(
            x=y,
            scale=_bn_param(params, gamma),
            offset=_bn_param(params, rng.standard_normal(C)),
            mean=_bn_param(params, rng.standard_normal(C) * 3),
            variance=_bn_param(params, var),
            epsilon=1e-3,
            is_training=False,
        )[0]
        tf.identity(y, name="output")
    return g.as_graph_def()


@settings(max_examples=12, deadline=None)
@given(
    weights=st.sampled_from(["dequantize", "transpose", "concat", "pack"]),
    params=st.sampled_from(["const", "fill", "pack", "expand"]),
    seed=st.integers(0, 100),
    gamma=st.sampled_from([np.array([1.0, -2.0, 0.5, 3.0]), np.full(C, 0.7)]),
    var=st.sampled_from([np.array([1.0, 1e-4, 4.0, 0.3]), np.full(C, 2.0)]),
)
def test_weights_and_parameters_behind_pure_ops_fold(weights: str, params: str, seed: int, gamma: np.ndarray, var: np.ndarray) -> None:
    graph_def = graph(weights, params, seed, gamma, var)
    result = bnfold.fold(graph_def, verify_outputs=False)
    assert [s.action for s in result.sites] == ["folded"], result.sites
    assert bn_ops(result.graph_def) == []
    assert "Dequantize" not in {n.op for n in result.graph_def.node}  # the uint8 weights became the folded float ones
    feeds = {"x": np.random.default_rng(seed).standard_normal((2, 6, 6, 3)).astype(np.float32)}
    assert_close(run_graph(graph_def, feeds, ["output"])[0], run_graph(result.graph_def, feeds, ["output"])[0], rtol=2e-4, atol=1e-4)


def test_dequantized_weights_fold_with_the_check() -> None:
    result = bnfold.fold(graph("dequantize", "const", 3, np.array([1.0, -2.0, 0.5, 3.0]), np.array([1.0, 1e-4, 4.0, 0.3])))
    assert result.verification is not None and result.verification.passed
    assert [s.action for s in result.sites] == ["folded"]


def test_stateful_and_fed_values_are_never_constants() -> None:
    g = tf.Graph()
    with g.as_default():
        tf.random.uniform([C], name="random")  # stateful: a new value every run
        p = tf.compat.v1.placeholder_with_default(tf.ones([C]), [C], name="overridable")
        tf.identity(p * 2.0, name="from_default")
        tf.transpose(tf.constant(np.eye(C, dtype=np.float32)), name="pure")
    index = GraphIndex(g.as_graph_def())
    evaluator = ConstEvaluator(index)
    assert not evaluable_by_tf(index.nodes["random/RandomUniform"])
    assert not evaluator.is_const("from_default") and evaluator.value("from_default") is None
    assert evaluator.is_const("pure")
    np.testing.assert_array_equal(evaluator.value("pure"), np.eye(C))


def test_a_constant_tensorflow_cannot_compute_is_not_a_constant() -> None:
    """A Transpose whose permutation names an axis the tensor lacks: TF refuses it in the worker."""
    g = tf.Graph()
    with g.as_default():
        tf.raw_ops.Transpose(x=tf.constant(np.ones(C, np.float32)), perm=tf.constant([0], name="perm"), name="scale")
    graph_def = g.as_graph_def()
    perm = next(n for n in graph_def.node if n.name == "perm")
    perm.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(np.array([3], np.int32)))  # axis 3 of a 1-d tensor
    evaluator = ConstEvaluator(GraphIndex(graph_def))
    assert evaluator.is_const("scale") and evaluator.value("scale") is None


def test_a_uniform_standalone_scale_stays_a_broadcast_scalar() -> None:
    """Input rescaling (x / 255, then a Normalization with mean 0 and variance 1) before a zero Pad:
    nothing to fold into, so it stays standalone, with one-value constants of the chain's rank, as
    the chain had them; a converter fuses such a scalar through the Pad (TFLite did not fuse a
    per-channel one: EfficientNetB0 gained a MUL, #11). Per-channel values stay per channel."""
    for per_channel in (False, True):
        g = tf.Graph()
        with g.as_default():
            x = tf.compat.v1.placeholder(tf.float32, [None, 6, 6, 3], name="x")
            scale = np.array([1 / 255, 2 / 255, 3 / 255], np.float32) if per_channel else np.float32(1 / 255)
            y = (x * scale + 0.0 - tf.constant(np.zeros((1, 1, 1, 3), np.float32))) / tf.maximum(tf.sqrt(tf.ones((1, 1, 1, 3))), 1e-7)
            y = tf.pad(y, [[0, 0], [1, 1], [1, 1], [0, 0]])
            tf.identity(tf.nn.conv2d(y, tf.constant(np.ones((3, 3, 3, 2), np.float32)), 1, "VALID"), name="output")
        graph_def = g.as_graph_def()
        result = bnfold.fold(graph_def)
        assert [s.action for s in result.sites] == ["standalone"] and result.verification and result.verification.passed
        consts = {n.name: tf.make_ndarray(n.attr["value"].tensor) for n in result.graph_def.node if n.name.endswith("bnfold_scale/value")}
        (value,) = consts.values()
        assert value.shape == ((1, 1, 1, 3) if per_channel else (1, 1, 1, 1))
