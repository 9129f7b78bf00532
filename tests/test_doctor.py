"""bnfold doctor and training-switch resolution, on real TF graphs built the way the seed questions built them.

Seeds: predictions change with batch size (BN left in training mode), decay=1
leaving moving statistics at 0/1 (update ops never run), a ``tf.cond`` train
switch fed by a placeholder (TF1 Switch/Merge, TF2 StatelessIf, Keras learning
phase), and data shifted by +2 against the training statistics.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator

import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_close, run_graph
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tensorflow.core.framework import graph_pb2
from tensorflow.python.ops import control_flow_util
from typer.testing import CliRunner

from bnfold import fold
from bnfold.cli import app
from bnfold.doctor import DRIFT_MEAN_Z, diagnose
from bnfold.errors import UsageError

COND_OPS = {"Switch", "Merge", "If", "StatelessIf"}
LOOP_OPS = {"Enter", "Exit", "NextIteration", "LoopCond"}
C = 4


@contextlib.contextmanager
def control_flow_v1() -> Iterator[None]:
    """Build TF1 Switch/Merge conds (and while loops) inside; restore v2 control flow afterwards."""
    saved = control_flow_util.ENABLE_CONTROL_FLOW_V2
    control_flow_util.ENABLE_CONTROL_FLOW_V2 = False
    try:
        yield
    finally:
        control_flow_util.ENABLE_CONTROL_FLOW_V2 = saved


def stats(seed: int = 0, channels: int = C) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "gamma": rng.uniform(0.5, 1.5, channels).astype(np.float32),
        "beta": rng.normal(0, 0.5, channels).astype(np.float32),
        "mean": rng.normal(0, 0.5, channels).astype(np.float32),
        "var": rng.uniform(0.3, 2.0, channels).astype(np.float32),
    }


def conv(x: tf.Tensor, seed: int = 0) -> tf.Tensor:
    w = np.random.default_rng(seed + 100).normal(0, 0.3, (3, 3, 3, C)).astype(np.float32)
    return tf.nn.conv2d(x, tf.constant(w, name="weights"), 1, "SAME", name="conv")


def fused(y: tf.Tensor, s: dict[str, np.ndarray], training: bool, name: str = "bn") -> tf.Tensor:
    if training:
        out, _, _ = tf.compat.v1.nn.fused_batch_norm(y, s["gamma"], s["beta"], epsilon=1e-3, is_training=True, name=name)
    else:
        out, _, _ = tf.compat.v1.nn.fused_batch_norm(
            y, s["gamma"], s["beta"], s["mean"], s["var"], epsilon=1e-3, is_training=False, name=name
        )
    return out


def build(body, v1: bool = False) -> graph_pb2.GraphDef:  # type: ignore[no-untyped-def]
    graph = tf.Graph()
    with graph.as_default(), control_flow_v1() if v1 else contextlib.nullcontext():
        x = tf.compat.v1.placeholder(tf.float32, [None, 6, 6, 3], name="x")
        tf.nn.relu(body(x), name="out")
    return graph.as_graph_def()


def cond_graph(v1: bool, flag: str = "placeholder", loop: bool = False) -> graph_pb2.GraphDef:
    """conv -> tf.cond(is_training, training BN, inference BN) -> relu, as in the seed question."""
    s = stats()

    def body(x: tf.Tensor) -> tf.Tensor:
        if flag == "placeholder":
            t = tf.compat.v1.placeholder(tf.bool, [], name="is_training")
        else:
            t = tf.compat.v1.placeholder_with_default(False, [], name="is_training")
        y = conv(x)
        z = tf.cond(t, lambda: fused(y, s, True, "bn_train"), lambda: fused(y, s, False, "bn_infer"), name="bn_cond")
        if loop:
            _, acc = tf.while_loop(lambda i, a: i < 3, lambda i, a: (i + 1, a * 0.5), [tf.constant(0), z], name="loop")
            return acc
        return z

    return build(body, v1)


def ops(graph_def: graph_pb2.GraphDef) -> set[str]:
    return {n.op for n in graph_def.node}


def x_data(batch: int = 3, seed: int = 5) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 6, 6, 3)).astype(np.float32)


# -- doctor findings ---------------------------------------------------------------
def test_healthy_model_has_no_findings() -> None:
    report = diagnose(build(lambda x: fused(conv(x), stats(), False)))
    assert report.findings == [] and report.exit_code == 0 and report.bn_count == 1


def test_decay_one_leaves_stats_at_init_fused_and_decomposed() -> None:
    init = {**stats(), "mean": np.zeros(C, np.float32), "var": np.ones(C, np.float32)}
    report = diagnose(build(lambda x: fused(conv(x), init, False)))
    assert report.codes() == ["BN_STATS_AT_INIT"] and report.exit_code == 1
    assert report.findings[0].severity == "warning" and report.findings[0].nodes == ["bn"]

    def decomposed(x: tf.Tensor) -> tf.Tensor:
        return tf.nn.batch_normalization(conv(x), tf.zeros([C]), tf.ones([C]), init["beta"], init["gamma"], 1e-3)

    assert diagnose(build(decomposed)).codes() == ["BN_STATS_AT_INIT"]


def test_trained_decomposed_bn_is_not_at_init() -> None:
    s = stats()
    report = diagnose(build(lambda x: tf.nn.batch_normalization(conv(x), s["mean"], s["var"], s["beta"], s["gamma"], 1e-3)))
    assert report.findings == []


def test_is_training_true_frozen_is_an_error() -> None:
    report = diagnose(build(lambda x: fused(conv(x), stats(), True)))
    assert report.codes() == ["BN_TRAINING_MODE", "BN_UNFOLDABLE"]
    assert [f.severity for f in report.findings] == ["error", "info"]
    assert "batch size" in report.findings[0].message
    assert "cannot rewrite" in report.findings[0].fix  # no moving statistics in this graph


def test_moments_over_batch_axis_is_training_mode() -> None:
    s = stats()

    def body(x: tf.Tensor) -> tf.Tensor:
        y = conv(x)
        mean, var = tf.nn.moments(y, [0, 1, 2])
        return tf.nn.batch_normalization(y, mean, var, s["beta"], s["gamma"], 1e-3)

    report = diagnose(build(body))
    assert "BN_TRAINING_MODE" in report.codes() and report.exit_code == 1


def test_layer_norm_statistics_are_not_training_mode() -> None:
    def body(x: tf.Tensor) -> tf.Tensor:
        y = conv(x)
        mean, var = tf.nn.moments(y, [1, 2, 3], keepdims=True)
        return (y - mean) * tf.math.rsqrt(var + 1e-3)

    assert "BN_TRAINING_MODE" not in diagnose(build(body)).codes()


@pytest.mark.parametrize("v1", [True, False], ids=["Switch-Merge", "StatelessIf"])
def test_train_switch_fed_by_placeholder(v1: bool) -> None:
    graph_def = cond_graph(v1)
    assert ops(graph_def) & ({"Switch", "Merge"} if v1 else {"StatelessIf", "If"})
    report = diagnose(graph_def)
    assert report.codes() == ["BN_TRAINING_SWITCH"], report.findings
    finding = report.findings[0]
    assert finding.severity == "warning" and "--set is_training=false" in finding.fix
    assert report.exit_code == 1


def test_moments_cond_from_the_seed_answer() -> None:
    """tf.cond(train, batch moments, moving averages) + tf.nn.batch_normalization, TF1 style."""
    s = stats()

    def body(x: tf.Tensor) -> tf.Tensor:
        train = tf.compat.v1.placeholder(tf.bool, [], name="train_phase")
        y = conv(x)
        mean, var = tf.cond(train, lambda: tf.nn.moments(y, [0, 1, 2]), lambda: (tf.constant(s["mean"]), tf.constant(s["var"])))
        return tf.nn.batch_normalization(y, mean, var, s["beta"], s["gamma"], 1e-3)

    graph_def = build(body, v1=True)
    assert diagnose(graph_def).codes() == ["BN_TRAINING_SWITCH"]
    result = fold(graph_def, set_flags={"train_phase": False})
    assert not ops(result.graph_def) & COND_OPS and [r.action for r in result.sites] == ["folded"]
    x = x_data()
    (expected,) = run_graph(graph_def, {"x": x, "train_phase": np.array(False)}, ["out"])
    (actual,) = run_graph(result.graph_def, {"x": x}, ["out"])
    assert_close(expected, actual)


def tf_keras_learning_phase_graph() -> tuple[graph_pb2.GraphDef, np.ndarray]:
    """A tf_keras model built in a TF1 graph: BN switches on the keras_learning_phase placeholder."""
    import tf_keras

    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, 6, 6, 3], name="x")
        bn = tf_keras.layers.BatchNormalization()
        y = tf.identity(bn(tf_keras.layers.Conv2D(C, 3)(x)), name="out")
        s = stats(3)
        with tf.compat.v1.Session() as session:
            session.run(tf.compat.v1.global_variables_initializer())
            bn.set_weights([s["gamma"], s["beta"], s["mean"], s["var"]])
            data = x_data()
            expected = session.run(y, {x: data})  # learning phase defaults to inference
            frozen = tf.compat.v1.graph_util.convert_variables_to_constants(session, graph.as_graph_def(), ["out"])
    return frozen, expected


def test_keras_learning_phase_switch_is_reported_and_folded() -> None:
    graph_def, expected = tf_keras_learning_phase_graph()
    assert any(n.name == "keras_learning_phase" for n in graph_def.node) and ops(graph_def) & {"If", "StatelessIf"}
    report = diagnose(graph_def)
    assert report.codes() == ["BN_TRAINING_SWITCH"] and "Keras" in report.findings[0].message
    result = fold(graph_def)  # the learning phase resolves to inference without --set
    assert not ops(result.graph_def) & COND_OPS
    assert [r.action for r in result.sites] == ["folded"]
    assert result.switches[0].flag == "keras_learning_phase" and result.switches[0].value is False
    assert len(result.graph_def.library.function) == len(graph_def.library.function)  # the library is kept
    (actual,) = run_graph(result.graph_def, {"x": x_data()}, ["out"])
    assert_close(expected, actual)


# -- drift ---------------------------------------------------------------------
def drift_graph(mean: np.ndarray, std: np.ndarray) -> graph_pb2.GraphDef:
    s = {"gamma": np.ones_like(mean), "beta": np.zeros_like(mean), "mean": mean, "var": std**2}
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, 8, 8, mean.size], name="x")
        tf.nn.relu(fused(x, s, False), name="out")
    return graph.as_graph_def()


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    channels=st.integers(1, 6),
    seed=st.integers(0, 2**16),
    center=st.floats(-3, 3),
    std=st.floats(0.3, 3.0),
)
def test_data_shifted_by_two_drifts_and_training_data_does_not(channels: int, seed: int, center: float, std: float) -> None:
    rng = np.random.default_rng(seed)
    mean = (center + rng.normal(0, 0.5, channels)).astype(np.float32)
    sd = (std * rng.uniform(0.8, 1.25, channels)).astype(np.float32)
    graph_def = drift_graph(mean, sd)
    train = (mean + sd * rng.standard_normal((16, 8, 8, channels))).astype(np.float32)
    assert "BN_STATS_DRIFT" not in diagnose(graph_def, data=[train]).codes()
    shift = max(2.0, 1.5 * DRIFT_MEAN_Z * float(np.max(sd)))  # always clear of the threshold: the check runs every example
    shifted = diagnose(graph_def, data={"x": train + shift})
    drift = [f for f in shifted.findings if f.code == "BN_STATS_DRIFT"]
    assert drift and drift[0].nodes == ["bn"] and shifted.exit_code == 1
    assert drift[0].details["max_mean_z"] > DRIFT_MEAN_Z


def test_variance_drift_alone_is_reported() -> None:
    graph_def = drift_graph(np.zeros(2, np.float32) + 1, np.ones(2, np.float32))
    data = (1 + 3.0 * np.random.default_rng(0).standard_normal((16, 8, 8, 2))).astype(np.float32)
    finding = next(f for f in diagnose(graph_def, data=[data]).findings if f.code == "BN_STATS_DRIFT")
    assert finding.details["max_var_ratio"] > 2


# -- folding through switches --------------------------------------------------
@pytest.mark.parametrize("v1", [True, False], ids=["Switch-Merge", "StatelessIf"])
def test_set_flag_false_folds_and_matches_the_original_fed_false(v1: bool) -> None:
    graph_def = cond_graph(v1)
    before = fold(graph_def, verify_outputs=False)
    assert "folded" not in [s.action for s in before.sites]  # nothing folds into the conv while the switch is live
    result = fold(graph_def, set_flags={"is_training": False})
    assert not ops(result.graph_def) & COND_OPS
    assert [r.action for r in result.sites] == ["folded"] and result.verification and result.verification.passed
    assert {"FusedBatchNorm", "FusedBatchNormV3"}.isdisjoint(ops(result.graph_def))
    x = x_data()
    (expected,) = run_graph(graph_def, {"x": x, "is_training": np.array(False)}, ["out"])
    (actual,) = run_graph(result.graph_def, {"x": x}, ["out"])
    assert_close(expected, actual)
    if not v1:
        assert len(result.graph_def.library.function) == len(graph_def.library.function)


@pytest.mark.parametrize("v1", [True, False], ids=["Switch-Merge", "StatelessIf"])
def test_placeholder_with_default_false_resolves_without_set(v1: bool) -> None:
    graph_def = cond_graph(v1, flag="default")
    result = fold(graph_def)
    assert not ops(result.graph_def) & COND_OPS and [r.action for r in result.sites] == ["folded"]
    assert result.switches[0].how.startswith("default")
    x = x_data()
    (expected,) = run_graph(graph_def, {"x": x}, ["out"])
    (actual,) = run_graph(result.graph_def, {"x": x}, ["out"])
    assert_close(expected, actual)


def test_set_flag_true_keeps_the_training_branch() -> None:
    graph_def = cond_graph(v1=True)
    result = fold(graph_def, set_flags={"is_training": True}, verify_outputs=False)
    assert not ops(result.graph_def) & COND_OPS
    assert [(r.action, "is_training=True" in (r.reason or "")) for r in result.sites] == [("skipped", True)]


def test_while_loop_is_left_alone() -> None:
    graph_def = cond_graph(v1=True, loop=True)
    loop_before = sorted(n.name for n in graph_def.node if n.op in LOOP_OPS or n.name.startswith("loop/"))
    result = fold(graph_def, set_flags={"is_training": False})
    loop_after = sorted(n.name for n in result.graph_def.node if n.op in LOOP_OPS or n.name.startswith("loop/"))
    assert loop_after == loop_before and LOOP_OPS <= ops(result.graph_def)
    assert not any(n.name.startswith("bn_cond") for n in result.graph_def.node if n.op in COND_OPS)
    x = x_data()
    (expected,) = run_graph(graph_def, {"x": x, "is_training": np.array(False)}, ["out"])
    (actual,) = run_graph(result.graph_def, {"x": x}, ["out"])
    assert_close(expected, actual)


def test_set_unknown_flag_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="no node named 'is_trainig'"):
        fold(cond_graph(v1=True), set_flags={"is_trainig": False})


# -- --training-bn=moving-stats ------------------------------------------------------
def training_bn_graph(with_moving: bool) -> tuple[graph_pb2.GraphDef, dict[str, np.ndarray]]:
    s = stats(7)

    def body(x: tf.Tensor) -> tf.Tensor:
        if with_moving:  # the moving averages a frozen tf.layers / slim BN leaves in its scope
            tf.constant(s["mean"], name="bn/moving_mean")
            tf.constant(s["var"], name="bn/moving_variance")
        return fused(conv(x), s, True, "bn/FusedBatchNorm")

    return build(body), s


def test_training_bn_moving_stats_folds_to_the_inference_bn() -> None:
    graph_def, s = training_bn_graph(with_moving=True)
    default = fold(graph_def, verify_outputs=False)
    assert [r.action for r in default.sites] == ["skipped"]
    result = fold(graph_def, training_bn="moving-stats")
    assert [r.action for r in result.sites] == ["folded"] and result.training_bn[0].rewritten
    assert result.verification is not None and result.verification.batch_independent is True
    inference = build(lambda x: fused(conv(x), s, False, "bn/FusedBatchNorm"))
    x = x_data()
    (expected,) = run_graph(inference, {"x": x}, ["out"])
    (actual,) = run_graph(result.graph_def, {"x": x}, ["out"])
    assert_close(expected, actual)
    assert "--training-bn=moving-stats" in diagnose(graph_def).findings[0].fix


def test_training_bn_without_moving_stats_says_it_cannot() -> None:
    graph_def, _ = training_bn_graph(with_moving=False)
    result = fold(graph_def, training_bn="moving-stats", verify_outputs=False)
    assert [r.action for r in result.sites] == ["skipped"]
    assert not result.training_bn[0].rewritten and "no constant moving" in result.training_bn[0].detail


# -- CLI -------------------------------------------------------------------------
def write(tmp_path, name: str, graph_def: graph_pb2.GraphDef):  # type: ignore[no-untyped-def]
    path = tmp_path / name
    path.write_bytes(graph_def.SerializeToString())
    return path


def test_cli_doctor_exit_codes_table_and_json(tmp_path) -> None:  # type: ignore[no-untyped-def]
    runner = CliRunner()
    healthy = write(tmp_path, "ok.pb", build(lambda x: fused(conv(x), stats(), False)))
    res = runner.invoke(app, ["doctor", str(healthy)])
    assert res.exit_code == 0 and "no BN problems found" in res.output
    bad = write(tmp_path, "bad.pb", build(lambda x: fused(conv(x), stats(), True)))
    report = tmp_path / "doctor.json"
    res = runner.invoke(app, ["doctor", str(bad), "--json", str(report)])
    assert res.exit_code == 1 and "BN_TRAINING_MODE" in res.output
    data = json.loads(report.read_text())
    assert [f["code"] for f in data["findings"]] == ["BN_TRAINING_MODE", "BN_UNFOLDABLE"]


def test_cli_doctor_data_and_fold_set(tmp_path) -> None:  # type: ignore[no-untyped-def]
    runner = CliRunner()
    graph = write(tmp_path, "g.pb", drift_graph(np.zeros(3, np.float32) + 0.5, np.ones(3, np.float32)))
    data = tmp_path / "x.npy"
    np.save(data, (0.5 + np.random.default_rng(0).standard_normal((8, 8, 8, 3)) + 2).astype(np.float32))
    res = runner.invoke(app, ["doctor", str(graph), "--data", str(data)])
    assert res.exit_code == 1 and "BN_STATS_DRIFT" in res.output
    cond = write(tmp_path, "cond.pb", cond_graph(v1=False))
    out = tmp_path / "folded.pb"
    res = runner.invoke(app, ["fold", str(cond), str(out), "--set", "is_training=false"])
    assert res.exit_code == 0, res.output
    assert "training switch is_training = false (--set)" in res.stdout
    folded = graph_pb2.GraphDef.FromString(out.read_bytes())
    assert not ops(folded) & COND_OPS
    res = runner.invoke(app, ["fold", str(cond), str(out), "--set", "is_training=maybe"])
    assert res.exit_code == 2


def test_keras_training_branch_with_moving_stats_equals_inference() -> None:
    """--set keras_learning_phase=true inlines the training branch; moving-stats turns it back into the inference BN."""
    graph_def, expected = tf_keras_learning_phase_graph()
    result = fold(graph_def, set_flags={"keras_learning_phase": True}, training_bn="moving-stats")
    assert not ops(result.graph_def) & COND_OPS and [r.action for r in result.sites] == ["folded"]
    assert result.training_bn[0].rewritten
    (actual,) = run_graph(result.graph_def, {"x": x_data()}, ["out"])
    assert_close(expected, actual)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(v1=st.booleans(), value=st.booleans(), negate=st.booleans(), batch=st.integers(1, 4))
def test_resolved_graph_matches_original_fed_the_same_flag(v1: bool, value: bool, negate: bool, batch: int) -> None:
    """Whatever the flag value and however it reaches the cond (LogicalNot too), resolution keeps what the original computes."""
    s = stats(2)

    def body(x: tf.Tensor) -> tf.Tensor:
        flag = tf.compat.v1.placeholder(tf.bool, [], name="is_inference" if negate else "is_training")
        pred = tf.logical_not(flag) if negate else flag
        y = conv(x)
        return tf.cond(pred, lambda: fused(y, s, True, "bn_train"), lambda: fused(y, s, False, "bn_infer"))

    graph_def = build(body, v1)
    name = "is_inference" if negate else "is_training"
    result = fold(graph_def, set_flags={name: value}, verify_outputs=False)
    assert not ops(result.graph_def) & COND_OPS
    x = x_data(batch)
    (expected,) = run_graph(graph_def, {"x": x, name: np.array(value)}, ["out"])
    (actual,) = run_graph(result.graph_def, {"x": x}, ["out"])
    assert_close(expected, actual)
    training = value != negate
    assert [r.action for r in result.sites] == (["skipped"] if training else ["folded"])
