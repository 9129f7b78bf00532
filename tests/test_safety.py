"""Never silently wrong: unsafe sites are skipped with a reason, the input is never changed."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_close, bn_ops, run_graph
from tensorflow.core.framework import graph_pb2

from bnfold import fold
from sample_models.make_samples import SAMPLES, Spec, build


def _graph(body) -> graph_pb2.GraphDef:  # type: ignore[no-untyped-def]
    graph = tf.Graph()
    with graph.as_default():
        body()
    return graph.as_graph_def()


def _const(values: list[float] | np.ndarray, name: str | None = None) -> tf.Tensor:
    return tf.constant(np.asarray(values, np.float32), name=name)


def _conv_bn(mean=(0.1, -0.2), var=(1.0, 2.0), gamma=(1.0, -1.5), beta=(0.3, 0.0), eps=1e-3) -> graph_pb2.GraphDef:  # type: ignore[no-untyped-def]
    def body() -> None:
        x = tf.compat.v1.placeholder(tf.float32, [None, 5, 5, 2], name="x")
        w = _const(np.random.default_rng(0).standard_normal((3, 3, 2, 2)), "w")
        y = tf.nn.conv2d(x, w, 1, "SAME", name="conv")
        bn = tf.raw_ops.FusedBatchNormV3(
            x=y,
            scale=_const(gamma),
            offset=_const(beta),
            mean=_const(mean),
            variance=_const(var),
            epsilon=eps,
            is_training=False,
            name="bn",
        )[0]
        tf.nn.relu(bn, name="output")

    return _graph(body)


def _sites(graph_def: graph_pb2.GraphDef) -> list[tuple[str, str | None]]:
    return [(s.action, s.reason) for s in fold(graph_def, verify_outputs=False).sites]


def test_training_mode_bn_is_skipped_and_kept() -> None:
    result = fold(build(SAMPLES["skip_training_bn"]), verify_outputs=False)
    assert [(s.action, "is_training" in (s.reason or "")) for s in result.sites] == [("skipped", True)]
    assert "bn" in {n.name for n in result.graph_def.node if n.op == "FusedBatchNormV3"}


def test_is_training_defaults_to_true_when_the_attribute_is_absent() -> None:
    graph_def = build(Spec())
    for node in graph_def.node:
        if node.op == "FusedBatchNormV3":
            del node.attr["is_training"]
    assert _sites(graph_def)[0][0] == "skipped"


def test_shared_linear_output_is_not_folded_into() -> None:
    spec = SAMPLES["skip_shared_conv"]
    graph_def = build(spec)
    result = fold(graph_def, verify_outputs=False)
    site = result.sites[0]
    assert site.action == "standalone" and "also feeds" in (site.reason or "")
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 8, 8, 3)).astype(np.float32)}
    for a, b in zip(
        run_graph(graph_def, feeds, ["output", "pre_bn_output"]),
        run_graph(result.graph_def, feeds, ["output", "pre_bn_output"]),
        strict=True,
    ):
        assert_close(a, b)


def test_bn_fed_by_placeholders_is_skipped() -> None:
    def body() -> None:
        x = tf.compat.v1.placeholder(tf.float32, [None, 4, 4, 2], name="x")
        mean = tf.compat.v1.placeholder(tf.float32, [2], name="mean")
        y = tf.nn.conv2d(x, _const(np.ones((1, 1, 2, 2))), 1, "SAME")
        tf.raw_ops.FusedBatchNormV3(
            x=y, scale=_const([1, 1]), offset=_const([0, 0]), mean=mean, variance=_const([1, 1]), is_training=False, name="bn"
        )

    action, reason = _sites(_graph(body))[0]
    assert action == "skipped" and "not constants" in reason


def _runtime_norm(axes: list[int]) -> graph_pb2.GraphDef:
    def body() -> None:
        x = tf.compat.v1.placeholder(tf.float32, [None, 4, 4, 2], name="x")
        y = tf.nn.conv2d(x, _const(np.ones((1, 1, 2, 2))), 1, "SAME")
        mean, var = tf.nn.moments(y, axes=axes, keepdims=True)
        tf.nn.batch_normalization(y, mean, var, None, None, 1e-3, name="norm")

    return _graph(body)


@pytest.mark.parametrize("axes", [[1, 2], [3], [1, 2, 3]], ids=["instance", "layer", "layer_all"])
def test_instance_and_layer_norm_are_other_normalizations_not_bn(axes: list[int]) -> None:
    result = fold(_runtime_norm(axes), verify_outputs=False)
    assert result.sites == [] and result.count("skipped") == 0
    assert [s.name for s in result.other_normalizations] == ["norm/Rsqrt"]
    assert result.to_json()["other_normalizations"][0]["name"] == "norm/Rsqrt"


def test_training_mode_decomposed_bn_is_a_skipped_bn_site() -> None:
    """Statistics averaged over the batch axis: a BN left in training mode, reported as a skipped BN."""
    sites = _sites(_runtime_norm([0, 1, 2]))
    assert sites == [("skipped", "mean/variance are computed at run time over the batch (training-mode BN), not constants")]


def test_keras_model_with_two_layer_norms_reports_no_skipped_bn() -> None:
    import keras

    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8),
            keras.layers.LayerNormalization(),
            keras.layers.Dense(4),
            keras.layers.LayerNormalization(),
        ]
    )
    result = fold(model, verify_outputs=False)
    assert result.count("skipped") == 0 and result.sites == []
    assert len(result.other_normalizations) == 2


def test_other_bn_outputs_in_use_block_the_fold() -> None:
    def body() -> None:
        x = tf.compat.v1.placeholder(tf.float32, [None, 4, 4, 2], name="x")
        y = tf.nn.conv2d(x, _const(np.ones((1, 1, 2, 2))), 1, "SAME")
        out = tf.raw_ops.FusedBatchNormV3(
            x=y, scale=_const([1, 1]), offset=_const([0, 0]), mean=_const([0, 0]), variance=_const([1, 1]), is_training=False
        )
        tf.identity(out[0], name="y")
        tf.identity(out[1], name="batch_mean")

    action, reason = _sites(_graph(body))[0]
    assert action == "skipped" and "output 1" in reason


@pytest.mark.parametrize(
    "stats",
    [
        dict(var=(np.nan, 1.0)),
        dict(mean=(np.inf, 0.0)),
        dict(var=(0.0, 1.0), eps=0.0),
        dict(var=(-1.0, 1.0)),
        dict(gamma=(np.nan, 1.0)),
    ],
)
def test_unsafe_numbers_are_skipped(stats: dict) -> None:  # type: ignore[type-arg]
    action, reason = _sites(_conv_bn(**stats))[0]
    assert action == "skipped" and reason


def test_shared_weights_are_copied_not_changed() -> None:
    """conv_a is followed by BN, conv_b (same weights constant) is not: conv_b must keep its weights."""

    def body() -> None:
        x = tf.compat.v1.placeholder(tf.float32, [None, 5, 5, 2], name="x")
        w = _const(np.random.default_rng(3).standard_normal((3, 3, 2, 2)), "shared_w")
        a = tf.nn.conv2d(x, w, 1, "SAME", name="conv_a")
        b = tf.nn.conv2d(x, w, 1, "SAME", name="conv_b")
        bn = tf.raw_ops.FusedBatchNormV3(
            x=a,
            scale=_const([2, -3]),
            offset=_const([1, 1]),
            mean=_const([0.5, 0]),
            variance=_const([0.5, 4]),
            is_training=False,
            name="bn",
        )[0]
        tf.add(bn, b, name="output")

    graph_def = _graph(body)
    result = fold(graph_def, verify_outputs=False)
    assert result.sites[0].action == "folded"
    nodes = {n.name: n for n in result.graph_def.node}
    assert nodes["conv_b"].input[1] == "shared_w"
    assert nodes["conv_a"].input[1] != "shared_w"
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 5, 5, 2)).astype(np.float32)}
    assert_close(run_graph(graph_def, feeds, ["output"])[0], run_graph(result.graph_def, feeds, ["output"])[0])


def test_input_graph_is_never_modified() -> None:
    graph_def = build(SAMPLES["conv_keras3"])
    before = graph_def.SerializeToString(deterministic=True)
    fold(graph_def, verify_outputs=False)
    assert graph_def.SerializeToString(deterministic=True) == before


def test_fold_is_deterministic() -> None:
    graph_def = build(SAMPLES["dense_nn_transpose_b"])
    first = fold(graph_def, verify_outputs=False).graph_def.SerializeToString(deterministic=True)
    second = fold(graph_def, verify_outputs=False).graph_def.SerializeToString(deterministic=True)
    assert first == second


@pytest.mark.parametrize("padding,beta,expected", [("VALID", True, "folded"), ("SAME", False, "folded"), ("SAME", True, "standalone")])
def test_backward_fold_only_where_exact(padding: str, beta: bool, expected: str) -> None:
    """BN before a conv folds into its input channels unless zero padding would meet the shift."""
    stats = {
        "gamma": np.array([1.5, -0.5, 2.0]),
        "beta": np.array([0.4, 0.1, -0.3]) if beta else np.zeros(3),
        "mean": np.zeros(3) if not beta else np.array([0.2, -0.1, 0.3]),
        "var": np.array([1.0, 0.5, 2.0]),
    }
    spec = Spec(bn="fused_v3", bn_before=True, padding=padding, stats=stats, bias=None)
    graph_def = build(spec)
    result = fold(graph_def, verify_outputs=False)
    assert result.sites[0].action == expected, result.sites
    if expected == "standalone":
        assert "pads with zeros" in (result.sites[0].reason or "")
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 8, 8, 3)).astype(np.float32)}
    assert_close(run_graph(graph_def, feeds, ["output"])[0], run_graph(result.graph_def, feeds, ["output"])[0])


def test_bn_before_transposed_conv_is_not_folded_into_it() -> None:
    spec = Spec(linear="conv_transpose", bn_before=True, stride=2, padding="VALID")
    result = fold(build(spec), verify_outputs=False)
    assert result.sites[0].action == "standalone" and "transposed" in (result.sites[0].reason or "")


def test_bn_with_nothing_to_fold_into_becomes_one_mul_and_one_add() -> None:
    def body() -> None:
        x = tf.compat.v1.placeholder(tf.float32, [None, 4, 4, 3], name="x")
        bn = tf.raw_ops.FusedBatchNormV3(
            x=x,
            scale=_const([1, 2, 3]),
            offset=_const([0, 1, 0]),
            mean=_const([0.5, 0, 0]),
            variance=_const([1, 2, 4]),
            is_training=False,
            name="bn",
        )[0]
        tf.nn.relu(bn, name="output")

    graph_def = _graph(body)
    result = fold(graph_def, verify_outputs=False)
    assert result.sites[0].action == "standalone"
    ops = sorted(n.op for n in result.graph_def.node if n.op not in ("Const", "Placeholder"))
    assert ops == ["AddV2", "Mul", "Relu"]
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 4, 4, 3)).astype(np.float32)}
    assert_close(run_graph(graph_def, feeds, ["output"])[0], run_graph(result.graph_def, feeds, ["output"])[0])


def test_two_bns_in_a_row_fold_into_one_conv() -> None:
    def body() -> None:
        x = tf.compat.v1.placeholder(tf.float32, [None, 5, 5, 2], name="x")
        y = tf.nn.conv2d(x, _const(np.random.default_rng(1).standard_normal((3, 3, 2, 2))), 1, "SAME", name="conv")
        y = tf.raw_ops.FusedBatchNormV3(
            x=y, scale=_const([1, 2]), offset=_const([0, 1]), mean=_const([0.5, 0]), variance=_const([1, 2]), is_training=False, name="bn1"
        )[0]
        y = tf.nn.batch_normalization(y, _const([0.1, 0.2]), _const([3, 0.5]), _const([0, 1]), _const([-1, 1]), 1e-3, name="bn2")
        tf.nn.relu(y, name="output")

    graph_def = _graph(body)
    result = fold(graph_def, verify_outputs=False)
    assert [s.action for s in result.sites] == ["folded", "folded"]
    assert bn_ops(result.graph_def) == []
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 5, 5, 2)).astype(np.float32)}
    assert_close(run_graph(graph_def, feeds, ["output"])[0], run_graph(result.graph_def, feeds, ["output"])[0])


def test_fp16_graph_folds_in_float64_and_keeps_fp16_weights() -> None:
    graph_def = build(SAMPLES["conv_fp16"])
    result = fold(graph_def, verify_outputs=False)
    assert result.sites[0].action == "folded"
    weights = [n for n in result.graph_def.node if n.name.endswith("bnfold_weights")]
    assert weights and weights[0].attr["dtype"].type == tf.float16.as_datatype_enum
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 8, 8, 3)).astype(np.float16)}
    assert_close(run_graph(graph_def, feeds, ["output"])[0], run_graph(result.graph_def, feeds, ["output"])[0], rtol=1e-2, atol=1e-2)


def test_requested_output_is_kept_even_if_it_is_the_conv() -> None:
    graph_def = build(Spec())
    result = fold(graph_def, outputs=["output", "conv"], verify_outputs=True)
    assert result.sites[0].action == "standalone"
    assert "conv" in {n.name for n in result.graph_def.node}


def _mixed_model(package: str, policy: str):  # type: ignore[no-untyped-def]
    """conv -> BN -> dense -> BN under a mixed-precision policy: weights reach the ops through Cast."""
    keras = __import__(package)
    keras.mixed_precision.set_global_policy(policy)
    try:
        layers = keras.layers
        model = keras.Sequential(
            [
                keras.Input((8, 8, 3)),
                layers.Conv2D(4, 3),
                layers.BatchNormalization(),
                layers.Flatten(),
                layers.Dense(5),
                layers.BatchNormalization(),
                layers.Activation("linear", dtype="float32"),
            ]
        )
    finally:
        keras.mixed_precision.set_global_policy("float32")
    rng = np.random.default_rng(0)
    for layer in model.layers:
        if isinstance(layer, layers.BatchNormalization):
            layer.set_weights([rng.uniform(0.5, 1.5, w.shape).astype(np.float32) for w in layer.get_weights()])
    return model


@pytest.mark.parametrize("package", ["tf_keras", "keras"])
@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_models_fold_and_load_without_the_check(package: str, policy: str) -> None:
    """Weights reach the fp16/bf16 conv through Cast (SrcT/DstT, no T): folded weights keep the conv's dtype."""
    from bnfold.sources import load

    model = _mixed_model(package, policy)
    original = load(model).graph_def
    result = fold(original, verify_outputs=False)
    assert "folded" in [s.action for s in result.sites], result.sites
    nodes = {n.name: n for n in result.graph_def.node}
    for node in result.graph_def.node:
        if node.op in ("Conv2D", "MatMul") and node.name + "/bnfold_weights" in nodes:
            assert nodes[node.name + "/bnfold_weights"].attr["dtype"].type == node.attr["T"].type
    feeds = {result.inputs[0]: np.random.default_rng(1).standard_normal((2, 8, 8, 3)).astype(np.float32)}
    before = run_graph(original, feeds, result.outputs)
    after = run_graph(result.graph_def, feeds, result.outputs)  # imports and runs: the old fold wrote float32 on fp16
    for a, b in zip(before, after, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert_close(a, b, rtol=5e-2 if policy == "mixed_bfloat16" else 1e-2, atol=1e-2)
    assert fold(original).verification.passed  # the default check agrees, at the default tolerances


def _feeds_x(graph_def: graph_pb2.GraphDef, shape: tuple[int, ...] = (2, 8, 8, 3)) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(3).standard_normal(shape).astype(np.float32)}


def test_bias_add_named_in_outputs_survives_and_its_bn_is_skipped() -> None:
    graph_def = build(Spec())  # conv -> bias_add -> bn -> output
    result = fold(graph_def, outputs=["output", "bias_add"], verify_outputs=False)
    assert [(s.action, s.reason) for s in result.sites] == [
        ("skipped", "bias_add is a requested input/output/fed tensor, and folding would remove it")
    ]
    before = run_graph(graph_def, _feeds_x(graph_def), ["output", "bias_add"])
    after = run_graph(result.graph_def, _feeds_x(graph_def), ["output", "bias_add"])
    for a, b in zip(before, after, strict=True):
        assert_close(a, b)


def test_fed_bias_add_survives_and_the_feed_still_decides_the_output() -> None:
    graph_def = build(Spec())
    fed = {"bias_add:0": np.random.default_rng(4).standard_normal((2, 8, 8, 4)).astype(np.float32)}
    result = fold(graph_def, feeds=fed, verify_outputs=False)
    assert [s.action for s in result.sites] == ["skipped"] and "bias_add" in (result.sites[0].reason or "")
    feeds = {**_feeds_x(graph_def), **fed}
    assert_close(run_graph(graph_def, feeds, ["output"])[0], run_graph(result.graph_def, feeds, ["output"])[0])


def _keras3_conv_bn() -> graph_pb2.GraphDef:
    import keras

    from bnfold.sources import load

    model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3, name="conv"), keras.layers.BatchNormalization(name="bn")])
    rng = np.random.default_rng(0)
    model.layers[1].set_weights([rng.uniform(0.5, 1.5, 4).astype(np.float32) for _ in range(4)])
    return load(model).graph_def


def _placeholder(graph_def: graph_pb2.GraphDef) -> str:
    return next(n.name for n in graph_def.node if n.op == "Placeholder")


def _mul_2(graph_def: graph_pb2.GraphDef) -> str:
    return next(n.name for n in graph_def.node if n.name.endswith("bn/mul_2") or n.name.endswith("batchnorm/mul_2"))


def test_keras3_bn_mul_2_named_in_outputs_survives() -> None:
    graph_def = _keras3_conv_bn()
    mul_2 = _mul_2(graph_def)
    result = fold(graph_def, outputs=["Identity", mul_2], verify_outputs=False)
    assert mul_2 in {n.name for n in result.graph_def.node}
    feeds = {_placeholder(graph_def): np.random.default_rng(5).standard_normal((2, 8, 8, 3)).astype(np.float32)}
    for a, b in zip(run_graph(graph_def, feeds, ["Identity", mul_2]), run_graph(result.graph_def, feeds, ["Identity", mul_2]), strict=True):
        assert_close(a, b)


def test_keras3_bn_mul_2_fed_is_not_a_constant() -> None:
    """A fed tensor overrides its subgraph: BN parameters computed from it cannot be folded as constants."""
    graph_def = _keras3_conv_bn()
    mul_2 = _mul_2(graph_def)
    fed = {f"{mul_2}:0": np.full(4, 7.0, np.float32)}
    result = fold(graph_def, feeds=fed, verify_outputs=False)
    assert [s.action for s in result.sites] == ["skipped"], result.sites
    assert result.sites[0].reason == f"{mul_2} is fed (--feed), so the BN parameters computed from it are not constants"
    feeds = {_placeholder(graph_def): np.random.default_rng(5).standard_normal((2, 8, 8, 3)).astype(np.float32), **fed}
    assert_close(run_graph(graph_def, feeds, ["Identity"])[0], run_graph(result.graph_def, feeds, ["Identity"])[0])


def test_keras3_bn_mul_1_named_in_outputs_keeps_the_bn() -> None:
    graph_def = _keras3_conv_bn()
    mul_1 = _mul_2(graph_def)[: -len("mul_2")] + "mul_1"
    result = fold(graph_def, outputs=["Identity", mul_1], verify_outputs=False)
    assert [s.action for s in result.sites] == ["skipped"] and mul_1 in (result.sites[0].reason or "")
    assert mul_1 in {n.name for n in result.graph_def.node}


def _run_unremapped(graph_def: graph_pb2.GraphDef, feeds: dict[str, np.ndarray], fetch: str) -> np.ndarray:
    """Run without grappler's remapper: with oneDNN on (conftest), it fuses MatMul + a (1, 1, C) Add into
    _FusedMatMul and drops the broadcast to rank 3, a TensorFlow bug that would hide the shape."""
    from conftest import session_config
    from tensorflow.core.protobuf import rewriter_config_pb2

    config = session_config()
    config.graph_options.rewrite_options.remapping = rewriter_config_pb2.RewriterConfig.OFF
    graph = tf.Graph()
    with graph.as_default():
        tf.graph_util.import_graph_def(graph_def, name="")
    with tf.compat.v1.Session(graph=graph, config=config) as session:
        return session.run(f"{fetch}:0", {f"{k}:0": v for k, v in feeds.items()})


def test_rank_raising_constant_after_matmul_is_skipped_and_keeps_the_shape() -> None:
    """(1, 1, C) added to a (N, C) MatMul output makes (1, N, C): not a per-channel affine of the MatMul."""

    def body() -> None:
        x = tf.compat.v1.placeholder(tf.float32, [None, 3], name="x")
        y = tf.matmul(x, _const(np.random.default_rng(0).standard_normal((3, 4))), name="dense")
        y = tf.add(y, _const(np.arange(4.0).reshape(1, 1, 4)), name="bias")
        inv = tf.math.rsqrt(_const([1.0, 2.0, 3.0, 4.0]) + 1e-3)  # Keras 3 BN: x * inv + (beta - mean * inv)
        tf.identity(y * inv + (_const([0.5, 0.5, 0.5, 0.5]) - _const([0.1, 0.2, 0.3, 0.4]) * inv), name="output")

    graph_def = _graph(body)
    result = fold(graph_def, verify_outputs=False)
    assert [s.action for s in result.sites] == ["skipped"] and "rank-3" in (result.sites[0].reason or "")
    feeds = {"x": np.random.default_rng(1).standard_normal((5, 3)).astype(np.float32)}
    a, b = _run_unremapped(graph_def, feeds, "output"), _run_unremapped(result.graph_def, feeds, "output")
    assert a.shape == b.shape == (1, 5, 4)
    assert_close(a, b)


def test_rank_raising_bias_before_a_bn_is_skipped_with_the_reason() -> None:
    def body() -> None:
        x = tf.compat.v1.placeholder(tf.float32, [None, 3], name="x")
        y = tf.matmul(x, _const(np.random.default_rng(0).standard_normal((3, 4))), name="dense")
        y = tf.add(y, _const(np.arange(4.0).reshape(1, 1, 4)), name="bias")
        tf.nn.batch_normalization(y, _const([0.1] * 4), _const([2.0] * 4), _const([0.3] * 4), _const([1.5] * 4), 1e-3, name="bn")

    graph_def = _graph(body)
    result = fold(graph_def, verify_outputs=False)
    assert [s.action for s in result.sites] == ["skipped"]
    assert "rank-3 constant broadcasts the rank-2 dense" in (result.sites[0].reason or "")
    feeds = {"x": np.random.default_rng(1).standard_normal((5, 3)).astype(np.float32)}
    out = [n.name for n in graph_def.node][-1]
    a, b = _run_unremapped(graph_def, feeds, out), _run_unremapped(result.graph_def, feeds, out)
    assert a.shape == b.shape == (1, 5, 4)
    assert_close(a, b)
