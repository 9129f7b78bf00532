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
from pathlib import Path

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
from bnfold.core.errors import UsageError
from bnfold.doctor.graph import DRIFT_MEAN_Z, diagnose

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


def assert_library_is_what_nodes_reach(folded: graph_pb2.GraphDef, original: graph_pb2.GraphDef) -> None:
    """After an If is inlined its branch functions go with it: no function of the library still holds the BN."""
    assert {f.signature.name for f in folded.library.function} <= {f.signature.name for f in original.library.function}
    assert any(n.op in ("FusedBatchNorm", "FusedBatchNormV3") for f in original.library.function for n in f.node_def)
    assert not any(n.op in ("FusedBatchNorm", "FusedBatchNormV3") for f in folded.library.function for n in f.node_def)


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
    assert_library_is_what_nodes_reach(result.graph_def, graph_def)
    (actual,) = run_graph(result.graph_def, {"x": x_data()}, ["out"])
    assert_close(expected, actual)


# -- drift ---------------------------------------------------------------------
def drift_graph(mean: np.ndarray, std: np.ndarray, size: int = 8) -> graph_pb2.GraphDef:
    s = {"gamma": np.ones_like(mean), "beta": np.zeros_like(mean), "mean": mean, "var": std**2}
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, size, size, mean.size], name="x")
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


def test_too_few_values_per_channel_are_not_drift() -> None:
    """One sample of a 2x2 map (4 values per channel) says nothing about the statistics: a note, no finding."""
    graph_def = drift_graph(np.zeros(3, np.float32), np.ones(3, np.float32), size=2)
    one = np.random.default_rng(0).standard_normal((1, 2, 2, 3)).astype(np.float32)
    report = diagnose(graph_def, data=[one])
    assert report.drift == [] and "BN_STATS_DRIFT" not in report.codes()
    assert "fewer than 16 values per channel" in report.notes[0]
    assert diagnose(graph_def, data=[one + 5]).notes == report.notes  # even far off: nothing measured, nothing claimed


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
        assert_library_is_what_nodes_reach(result.graph_def, graph_def)


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


# -- TF1 training checkpoints (issue #15) ------------------------------------------------
# tests/tf1_training.py trains each case a few steps in tf.compat.v1 graph mode and saves it with
# tf.compat.v1.train.Saver; it runs in a child process (disable_v2_behavior is process-global).
CKPT = "model.ckpt-3"
# case -> the findings the doctor must give, exactly: (code, severity, nodes)
TF1_EXPECTED: dict[str, list[tuple[str, str, list[str]]]] = {
    "ok": [],
    "not_wired": [
        ("BN_UPDATES_NOT_RUN", "error", ["bn1", "bn2"]),
        ("BN_STATS_AT_INIT", "warning", ["bn1"]),
        ("BN_STATS_AT_INIT", "warning", ["bn2"]),
    ],
    "decay1": [
        ("BN_MOMENTUM_DEGENERATE", "warning", ["bn1", "bn2"]),
        ("BN_STATS_AT_INIT", "warning", ["bn1"]),
        ("BN_STATS_AT_INIT", "warning", ["bn2"]),
    ],
    "decay0": [("BN_MOMENTUM_DEGENERATE", "warning", ["bn1", "bn2"])],
    "towers_early": [("BN_UPDATES_NOT_RUN", "warning", ["tower_1/bn1", "tower_1/bn2"])],
    "towers_ok": [],
    "towers_apart_early": [  # a replica per tower: tower_1's statistics are its own, and never move
        ("BN_UPDATES_NOT_RUN", "error", ["tower_1/bn1", "tower_1/bn2"]),
        ("BN_STATS_AT_INIT", "warning", ["tower_1/bn1"]),
        ("BN_STATS_AT_INIT", "warning", ["tower_1/bn2"]),
    ],
    "towers_apart_ok": [],
    "valid_copy": [("BN_STATS_AT_INIT", "warning", ["valid/bn1"]), ("BN_STATS_AT_INIT", "warning", ["valid/bn2"])],
    "valid_reuse": [],
    "ema_cond": [],
    "ema_cond_decay1": [("BN_MOMENTUM_DEGENERATE", "warning", ["bn1/bn1"])],
    "hostile": [],
}


@pytest.fixture(scope="session")
def tf1_cases(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    import subprocess
    import sys

    from conftest import ROOT

    out = tmp_path_factory.mktemp("tf1")
    subprocess.run([sys.executable, str(ROOT / "tests" / "tf1_training.py"), str(out)], check=True, capture_output=True, timeout=600)
    return out


def found(report) -> list[tuple[str, str, list[str]]]:  # type: ignore[no-untyped-def]
    return [(f.code, f.severity, f.nodes) for f in report.findings]


@pytest.mark.parametrize("case", sorted(TF1_EXPECTED))
def test_tf1_checkpoint_mistakes_and_their_correct_twins(tf1_cases, case: str) -> None:  # type: ignore[no-untyped-def]
    report = diagnose(tf1_cases / case / CKPT)
    assert found(report) == TF1_EXPECTED[case], report.findings
    assert report.exit_code == (1 if TF1_EXPECTED[case] else 0)
    assert report.bn_count == {"valid_copy": 4, "towers_apart_early": 4, "towers_apart_ok": 4, "ema_cond": 1, "ema_cond_decay1": 1}.get(
        case, 2
    )


def test_tf1_findings_say_where_and_what_to_do(tf1_cases) -> None:  # type: ignore[no-untyped-def]
    (updates, *_) = diagnose(tf1_cases / "not_wired" / CKPT).findings
    assert "UPDATE_OPS" in updates.message and "control_dependencies" in updates.fix
    assert updates.details["train_op"] and set(updates.details["in_update_ops"]) == set(updates.details["updates"])
    assert "from the train_op collection" in updates.message  # tf.compat.v1 optimizers add their apply op to it
    (towers,) = diagnose(tf1_cases / "towers_early" / CKPT).findings
    assert towers.details["run"] == ["tower_0/bn1", "tower_0/bn2"] and "after every tower" in towers.fix
    decay = {f.details["decay"]: f for f in diagnose(tf1_cases / "decay1" / CKPT).findings if f.code == "BN_MOMENTUM_DEGENERATE"}
    assert list(decay) == [1.0] and "never move" in decay[1.0].message
    (zero,) = diagnose(tf1_cases / "decay0" / CKPT).findings
    assert zero.details["decay"] == 0.0 and "last training batch" in zero.message
    copy = diagnose(tf1_cases / "valid_copy" / CKPT).findings
    assert [f.details["duplicates"] for f in copy] == ["model/bn1", "model/bn2"]
    assert all("reuse=True" in f.fix and "shares no variables" in f.message for f in copy)


def test_tf1_meta_and_checkpoint_given_apart(tf1_cases, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A .meta elsewhere with --checkpoint PREFIX, a checkpoint directory, and the errors for what is missing."""
    import shutil

    meta = tmp_path / "train_graph.meta"
    shutil.copy(tf1_cases / "not_wired" / f"{CKPT}.meta", meta)
    prefix = tf1_cases / "not_wired" / CKPT
    apart = diagnose(meta, checkpoint=prefix)
    assert found(apart) == TF1_EXPECTED["not_wired"] and apart.source == f"{meta} + {prefix}"
    assert found(diagnose(tf1_cases / "not_wired")) == TF1_EXPECTED["not_wired"]  # the directory: its latest checkpoint
    runner = CliRunner()
    res = runner.invoke(app, ["doctor", str(meta), "--checkpoint", str(prefix), "--json", str(tmp_path / "r.json")])
    assert res.exit_code == 1 and "1 error(s), 2 warning(s)" in res.output
    assert [f["code"] for f in json.loads((tmp_path / "r.json").read_text())["findings"]][0] == "BN_UPDATES_NOT_RUN"
    res = runner.invoke(app, ["doctor", str(meta)])  # no checkpoint beside it
    assert res.exit_code == 3 and "--checkpoint" in res.output
    lone = tmp_path / "lone"
    lone.mkdir()
    for suffix in (".index", ".data-00000-of-00001"):
        shutil.copy(tf1_cases / "ok" / f"{CKPT}{suffix}", lone / f"{CKPT}{suffix}")
    res = runner.invoke(app, ["doctor", str(lone / CKPT)])  # no .meta beside the checkpoint
    assert res.exit_code == 3 and "graph.meta --checkpoint" in res.output
    res = runner.invoke(app, ["doctor", str(prefix), "--checkpoint", str(prefix)])
    assert res.exit_code == 2


def without_train_op_collection(case, tmp_path):  # type: ignore[no-untyped-def]
    """The case's checkpoint beside a .meta whose train_op collection is gone (hand-built optimizers, pruned exports)."""
    import shutil

    from tensorflow.core.protobuf import meta_graph_pb2

    meta = meta_graph_pb2.MetaGraphDef.FromString((case / f"{CKPT}.meta").read_bytes())
    assert "train_op" in meta.collection_def
    del meta.collection_def["train_op"]
    out = tmp_path / case.name
    out.mkdir()
    (out / f"{CKPT}.meta").write_bytes(meta.SerializeToString())
    for suffix in (".index", ".data-00000-of-00001"):
        shutil.copy(case / f"{CKPT}{suffix}", out / f"{CKPT}{suffix}")
    return out / CKPT


@pytest.mark.parametrize("case", ["ok", "not_wired", "towers_early", "towers_ok", "towers_apart_early"])
def test_tf1_train_op_found_from_the_optimizers_apply_ops(tf1_cases, tmp_path, case: str) -> None:  # type: ignore[no-untyped-def]
    from bnfold.doctor.training import open_artifacts
    from bnfold.doctor.training_graph import analyse

    prefix = without_train_op_collection(tf1_cases / case, tmp_path)
    graph = analyse(open_artifacts(prefix).meta)
    assert graph.train_op_how == "the optimizer's apply ops" and graph.train_op
    report = diagnose(prefix)
    assert found(report) == TF1_EXPECTED[case]
    if case == "not_wired":
        assert "from the optimizer's apply ops" in report.findings[0].message


def test_tf1_train_op_option(tf1_cases) -> None:  # type: ignore[no-untyped-def]
    ok = tf1_cases / "ok" / CKPT
    train_op = diagnose(tf1_cases / "not_wired" / CKPT).findings[0].details["train_op"]
    report = diagnose(tf1_cases / "not_wired" / CKPT, train_op=train_op)
    assert found(report) == TF1_EXPECTED["not_wired"] and "from --train-op" in report.findings[0].message
    # naming an update op as the train op: what it runs is what counts
    report = diagnose(ok, train_op=["bn1/AssignMovingAvg", "bn1/AssignMovingAvg_1"])
    assert found(report) == [("BN_UPDATES_NOT_RUN", "error", ["bn2"])]
    with pytest.raises(UsageError, match="no node named 'nope'"):
        diagnose(ok, train_op=["nope"])
    with pytest.raises(UsageError, match="--train-op"):
        diagnose(build(lambda x: fused(conv(x), stats(), False)), train_op=["x"])


def test_tf1_checkpoint_is_read_and_nothing_runs(tf1_cases) -> None:  # type: ignore[no-untyped-def]
    """No training op runs: the checkpoint's files stay as they were; a WriteFile in the train op and the
    inference path never fires (checked without --data, refused with it); the values reported are the checkpoint's."""
    case = tf1_cases / "hostile"
    before = {p.name: p.read_bytes() for p in case.iterdir()}
    assert found(diagnose(case / CKPT)) == []
    report = diagnose(case / CKPT, outputs=["logits"])
    assert report.codes() == ["BN_TRAINING_SWITCH"] and report.findings[0].details["flag"] == "is_training"
    from bnfold.core.errors import UnsafeModelError

    x = np.random.default_rng(0).standard_normal((8, 8, 8, 3)).astype(np.float32)
    with pytest.raises(UnsafeModelError, match="write_marker"):
        diagnose(case / CKPT, outputs=["logits"], data=[x])
    assert {p.name: p.read_bytes() for p in case.iterdir()} == before  # no MARKER, no new checkpoint
    reader = tf.train.load_checkpoint(str(tf1_cases / "decay0" / CKPT))
    assert not np.all(reader.get_tensor("bn1/moving_mean") == 0)  # decay=0: trained stats, so no BN_STATS_AT_INIT


def test_tf1_inference_path_with_outputs_and_data(tf1_cases, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """--outputs freezes the named path from the checkpoint: the validation net is clean, the training net is in training mode."""
    valid = tf1_cases / "valid_reuse" / CKPT
    assert found(diagnose(valid, outputs=["valid_logits"])) == []
    training = diagnose(valid, outputs=["model/fc/BiasAdd"])
    assert [(f.code, f.severity) for f in training.findings][:2] == [("BN_TRAINING_MODE", "error")] * 2
    x = (1 + 2 * np.random.default_rng(1).standard_normal((16, 8, 8, 3))).astype(np.float32)  # the training data's distribution
    report = diagnose(valid, outputs=["valid_logits"], data=[x])
    assert [row.name for row in report.drift] == ["model_1/bn1", "model_1/bn2"]
    with pytest.raises(UsageError, match="--outputs"):
        diagnose(valid, data=[x])


# -- layer/instance norm lowered to FusedBatchNormV3: probed, not guessed --------------
def keras_layer_norm_graph() -> graph_pb2.GraphDef:
    """tf_keras LayerNormalization as TF 2.x lowers it: reshape to [1, N*rows, cols, 1] and FusedBatchNormV3(is_training=True)."""
    import tf_keras
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    inp = tf_keras.Input((6, 8))
    model = tf_keras.Model(inp, tf_keras.layers.LayerNormalization()(tf_keras.layers.Dense(8)(inp)))
    function = tf.function(lambda x: model(x, training=False)).get_concrete_function(tf.TensorSpec([None, 6, 8], tf.float32))
    return convert_variables_to_constants_v2(function).graph.as_graph_def()


def test_keras_layer_norm_lowered_to_fused_bn_raises_nothing() -> None:
    graph_def = keras_layer_norm_graph()
    fused_nodes = [n for n in graph_def.node if n.op == "FusedBatchNormV3"]
    assert fused_nodes and all(n.attr["is_training"].b for n in fused_nodes)
    assert any(n.op == "Reshape" for n in graph_def.node)
    report = diagnose(graph_def)
    assert found(report) == [("BN_PER_SAMPLE_NORM", "info", [fused_nodes[0].name])] and report.exit_code == 0
    assert "per-sample statistics" in report.findings[0].message and "differ by 0" in report.findings[0].details["probe"]


def test_reshape_that_keeps_the_batch_in_the_statistics_stays_an_error() -> None:
    """Same structure (reshape, then a training-mode fused BN) with the batch folded into the rows: batch-dependent, so an error."""

    def body(x: tf.Tensor) -> tf.Tensor:
        y = tf.reshape(conv(x), [1, -1, 6, C])  # [N, 6, 6, C] -> [1, N*6, 6, C]: per-channel statistics over the whole batch
        out, _, _ = tf.compat.v1.nn.fused_batch_norm(y, np.ones(C, np.float32), np.zeros(C, np.float32), is_training=True, name="bn")
        return tf.reshape(out, [-1, 6, 6, C])

    report = diagnose(build(body))
    assert [(f.code, f.severity) for f in report.findings][0] == ("BN_TRAINING_MODE", "error")
    assert "BN_PER_SAMPLE_NORM" not in report.codes()


# -- Keras model with --data: drift per layer, and the plot ------------------------------
def keras_two_bn_model(tmp_path):  # type: ignore[no-untyped-def]
    import keras

    inp = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(4, 3, padding="same", name="conv1")(inp)
    h = keras.layers.BatchNormalization(name="bn1")(h)
    h = keras.layers.Conv2D(4, 3, padding="same", name="conv2")(keras.layers.ReLU()(h))
    h = keras.layers.BatchNormalization(name="bn2")(h)
    model = keras.Model(inp, keras.layers.GlobalAveragePooling2D()(h))
    train = np.random.default_rng(0).standard_normal((64, 8, 8, 3)).astype(np.float32)
    for layer in ("bn1", "bn2"):  # moving statistics from the training data, layer by layer
        bn = model.get_layer(layer)
        value = keras.Model(inp, bn.input).predict(train, verbose=0)
        gamma, beta, _, _ = bn.get_weights()
        bn.set_weights([gamma, beta, value.mean((0, 1, 2)), value.var((0, 1, 2))])
    path = tmp_path / "two_bn.keras"
    model.save(path)
    return path, train


def test_keras_data_drift_per_layer_and_plot(tmp_path) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("matplotlib")
    path, train = keras_two_bn_model(tmp_path)
    fresh = np.random.default_rng(1).standard_normal((32, 8, 8, 3)).astype(np.float32)
    clean = diagnose(path, data=[fresh])
    import re

    names = [row.name.rsplit("/", 1)[-1] for row in clean.drift]  # Keras' own name scopes (bn1_1 when traced twice)
    assert [re.sub(r"_\d+$", "", n) for n in names] == ["bn1", "bn2"] and "BN_STATS_DRIFT" not in clean.codes(), names
    assert all(row.inference.score < 1 for row in clean.drift)
    np.save(tmp_path / "shifted.npy", fresh + 2)
    shifted = diagnose(path, data=[fresh + 2])
    assert shifted.drift[0].inference.score > 1 and "BN_STATS_DRIFT" in shifted.codes()
    plot = tmp_path / "drift.png"
    res = CliRunner().invoke(app, ["doctor", str(path), "--data", str(tmp_path / "shifted.npy"), "--plot", str(plot)])
    assert res.exit_code == 1 and "drift per BN layer" in res.output, res.output
    data = plot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    from matplotlib.image import imread

    assert imread(plot).shape[1] >= 600  # a drawn figure, not an empty file
    res = CliRunner().invoke(app, ["doctor", str(path), "--plot", str(tmp_path / "none.png")])
    assert res.exit_code == 2 and "needs --data" in res.output and not (tmp_path / "none.png").exists()


def test_plot_without_matplotlib_says_how_to_get_it(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import sys

    path, _ = keras_two_bn_model(tmp_path)
    np.save(tmp_path / "x.npy", np.random.default_rng(1).standard_normal((8, 8, 8, 3)).astype(np.float32))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # an environment without it: importing it fails
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    res = CliRunner().invoke(app, ["doctor", str(path), "--data", str(tmp_path / "x.npy"), "--plot", str(tmp_path / "d.png")])
    assert res.exit_code == 2 and "pip install 'bnfold[plot]'" in res.output and not (tmp_path / "d.png").exists()


# -- published frozen graphs: no false alarms ----------------------------------------------
# every warning checked by hand against the file (see notes): a 1-channel BN whose constants are exactly 0/1 (and gamma 1, beta 0)
REALWORLD_WARNINGS = {
    "ONE/res/TensorFlowTests/NET_0003/test.pbtxt": [("BN_STATS_AT_INIT", "warning", ["FusedBatchNorm"])],
    "ONE/res/TensorFlowTests/UNIT_FusedBatchNorm_000/test.pbtxt": [("BN_STATS_AT_INIT", "warning", ["FBN_01"])],
}


def test_doctor_on_every_published_tf_graph_raises_no_error(realworld: Path) -> None:
    files = sorted(p for p in (realworld / "tf").rglob("*") if p.suffix in (".pb", ".pbtxt"))
    assert len(files) == 15
    for path in files:
        relative = path.relative_to(realworld / "tf").as_posix()
        report = diagnose(path)
        assert [f for f in found(report) if f[1] != "info"] == REALWORLD_WARNINGS.get(relative, []), (relative, report.findings)
