"""``bnfold recalibrate`` on real models trained on scikit-learn's digits with each BN mistake users make.

The recalibrated model differs from its input on purpose, so equivalence is not
the proof. What is (docs/recalibrate.md):

1. Inference-mode output of the recalibrated model on the calibration samples
   matches the training-mode output (BN on batch statistics) of the same network
   on those samples as one batch. Tolerance: ``max|a - b| <= 1e-3 * max|a| + 1e-4``:
   the two run different float32 kernels (batch moments vs stored statistics),
   which differ by rounding only; a wrong statistic moves logits by whole units.
2. ``doctor --data`` on the calibration data finds no BN_STATS_AT_INIT and no BN_STATS_DRIFT.
3. Test accuracy returns to near the training-mode accuracy (with a margin: no
   test asserts a number the benchmark measures exactly).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from conftest import run_graph
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tensorflow.core.framework import graph_pb2
from typer.testing import CliRunner

import bnfold
from bnfold.cli import app
from bnfold.core.errors import UnsafeModelError, UsageError
from bnfold.core.recalibration import Moments
from bnfold.doctor.graph import MIN_DRIFT_VALUES, diagnose
from bnfold.recalibration.graph import recalibrate_graph
from bnfold.tf.io import load_graph_def

ROOT = Path(__file__).resolve().parents[1]
TF1_CASES = ("not_wired", "decay1", "valid_copy", "ema_cond", "frozen_training")
CALIBRATION = 256


def _train(out: Path, *args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "digits_training.py"), str(out), *args], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("sklearn")
    out = tmp_path_factory.mktemp("digits")
    _train(out)
    _train(out, "--keras")
    return out


def digits(models: Path) -> dict[str, np.ndarray]:
    with np.load(models / "digits.npz") as data:
        return dict(data)


def logits(graph_def: graph_pb2.GraphDef, x: np.ndarray, training: bool = False) -> np.ndarray:
    feeds = {"x": x}
    if any(n.name == "is_training" and n.op == "Placeholder" for n in graph_def.node):
        feeds["is_training"] = np.array(training)
    return run_graph(graph_def, feeds, ["logits:0"])[0]


def accuracy(values: np.ndarray, labels: np.ndarray) -> float:
    return float((values.argmax(1) == labels).mean())


def close(a: np.ndarray, b: np.ndarray) -> bool:
    return float(np.max(np.abs(a - b))) <= 1e-3 * float(np.max(np.abs(a))) + 1e-4


def stats_findings(graph_def: graph_pb2.GraphDef, x: np.ndarray) -> list[str]:
    report = diagnose(graph_def, data=[x])
    return [f.code for f in report.findings if f.code in ("BN_STATS_AT_INIT", "BN_STATS_DRIFT")]


@pytest.mark.parametrize("case", TF1_CASES)
def test_tf1_mistake_is_repaired(models: Path, case: str) -> None:
    data = digits(models)
    shipped, training = load_graph_def(models / f"{case}.pb"), load_graph_def(models / f"{case}_train.pb")
    calibration = data["x_train"][:CALIBRATION]
    result = bnfold.recalibrate(shipped, [calibration], outputs=["logits"])
    assert result.recalibrated == 2 and all(r.drift_after is not None and r.drift_after < 0.05 for r in result.layers)
    # 1. inference on the calibration samples == training mode on them as one batch
    assert close(logits(training, calibration, True), logits(result.graph_def, calibration))
    # 2. the doctor finds the statistics healthy on the same data
    assert stats_findings(result.graph_def, calibration) == []
    # 3. accuracy: near chance before (one sample at a time for the training-mode export), near training mode after
    train_acc = accuracy(logits(training, data["x_test"], True), data["y_test"])
    if case == "frozen_training":
        before = accuracy(np.concatenate([logits(shipped, data["x_test"][i : i + 1]) for i in range(0, 60)]), data["y_test"][:60])
    else:
        before = accuracy(logits(shipped, data["x_test"]), data["y_test"])
        assert stats_findings(shipped, calibration)  # the doctor saw the mistake
    after = accuracy(logits(result.graph_def, data["x_test"]), data["y_test"])
    assert before < 0.4 and train_acc > 0.85
    assert after > train_acc - 0.06, (before, after, train_acc)


def test_keras_momentum_one_is_repaired(models: Path) -> None:
    import keras

    data = digits(models)
    calibration = data["x_train"][:CALIBRATION]
    model = keras.saving.load_model(models / "keras_momentum1.keras")
    before = accuracy(np.asarray(model(data["x_test"], training=False)), data["y_test"])
    train_acc = accuracy(np.asarray(model(data["x_test"], training=True)), data["y_test"])
    result = bnfold.recalibrate(models / "keras_momentum1.keras", [calibration])
    assert result.recalibrated == 2
    (out,) = [n for n in result.outputs]
    inputs = result.inputs[0]
    ran = run_graph(result.graph_def, {inputs: calibration}, [f"{out}:0"])[0]
    assert close(np.asarray(model(calibration, training=True)), ran)
    after = accuracy(run_graph(result.graph_def, {inputs: data["x_test"]}, [f"{out}:0"])[0], data["y_test"])
    assert before < 0.4 and after > train_acc - 0.06, (before, after, train_acc)
    assert stats_findings(result.graph_def, calibration) == []


def test_keras_file_gets_new_moving_statistics_written_back(models: Path, tmp_path: Path) -> None:
    import keras

    data = digits(models)
    calibration = data["x_train"][:CALIBRATION]
    src, dst = models / "keras_momentum1.keras", tmp_path / "fixed.keras"
    original = keras.saving.load_model(src)
    result = bnfold.recalibrate_file(src, dst, [calibration])
    assert [r.name for r in result.layers] == ["batch_normalization", "batch_normalization_1"] and result.recalibrated == 2
    fixed = keras.saving.load_model(dst)
    assert type(fixed) is type(original) and [type(x) for x in fixed.layers] == [type(x) for x in original.layers]
    # inference of the written model == training mode of the original on the calibration batch
    assert close(np.asarray(original(calibration, training=True)), np.asarray(fixed(calibration, training=False)))
    for layer in fixed.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            assert not np.all(np.asarray(layer.moving_mean) == 0) and layer.moving_mean.dtype == "float32"
    for weight, before in zip(fixed.weights, original.weights, strict=True):  # nothing but the moving statistics changed
        if "moving" not in weight.path:
            np.testing.assert_array_equal(np.asarray(weight), np.asarray(before))
    assert stats_findings(bnfold.recalibrate(dst, [calibration]).graph_def, calibration) == []
    h5_in, h5_out = tmp_path / "model.h5", tmp_path / "fixed.h5"  # the legacy HDF5 format, written back as HDF5
    original.save(h5_in)
    bnfold.recalibrate_file(h5_in, h5_out, [calibration])
    assert close(np.asarray(fixed(calibration, training=False)), np.asarray(keras.saving.load_model(h5_out)(calibration, training=False)))
    with pytest.raises(UsageError, match="Keras output needs a Keras model"):
        bnfold.recalibrate_file(models / "not_wired.pb", tmp_path / "x.keras", [calibration])


def test_tf1_checkpoint_with_outputs(models: Path, tmp_path: Path) -> None:
    data = digits(models)
    calibration = data["x_train"][:CALIBRATION]
    result = bnfold.recalibrate(models / "not_wired" / "model.ckpt-400", [calibration], outputs=["logits"])
    frozen = bnfold.recalibrate(load_graph_def(models / "not_wired.pb"), [calibration], outputs=["logits"])
    assert close(logits(frozen.graph_def, data["x_test"]), logits(result.graph_def, data["x_test"]))
    with pytest.raises(UsageError, match="--outputs"):
        bnfold.recalibrate(models / "not_wired" / "model.ckpt-400", [calibration])


def test_cli_recalibrate_every_output_format_and_fold(models: Path, tmp_path: Path) -> None:
    data = digits(models)
    cal = tmp_path / "cal.npy"
    np.save(cal, data["x_train"][:CALIBRATION].astype(np.float64))  # cast to the input's float32
    src = models / "not_wired.pb"
    runner = CliRunner()
    expected = logits(bnfold.recalibrate(load_graph_def(src), [data["x_train"][:CALIBRATION]]).graph_def, data["x_test"])
    for name in ("out.pb", "out.pbtxt", "saved/", "out.onnx"):
        dst = tmp_path / name
        report = tmp_path / "report.json"
        res = runner.invoke(app, ["recalibrate", str(src), str(dst), "--data", f"x={cal}", "--json", str(report)])
        assert res.exit_code == 0, res.output
        records = json.loads(report.read_text())
        assert records["recalibrated"] == 2 and records["layers"][0]["values_per_channel"] == CALIBRATION * 64
        assert records["layers"][0]["drift_before"] > 1 > records["layers"][0]["drift_after"]
        if name == "out.onnx":
            import onnxruntime as ort

            session = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])
            feeds = {i.name: (data["x_test"] if i.name.startswith("x") else np.array(False)) for i in session.get_inputs()}
            got = session.run(None, feeds)[0]
        elif name == "saved/":
            loaded = tf.saved_model.load(str(dst))
            got = next(iter(loaded.signatures["serving_default"](x=tf.constant(data["x_test"]), is_training=tf.constant(False)).values())).numpy()
            again = bnfold.recalibrate(dst, [data["x_train"][:CALIBRATION]])  # SavedModel in: its statistics are right already
            assert all(r.drift_before is not None and r.drift_before < 0.05 for r in again.layers)
        else:
            got = logits(load_graph_def(dst), data["x_test"])
        assert close(expected, got), name
    # recalibrate, then fold, in one step: the fold is verified against the recalibrated model
    folded = tmp_path / "folded.pb"
    res = runner.invoke(app, ["fold", str(src), str(folded), "--recalibrate", str(cal)])
    assert res.exit_code == 0, res.output
    graph = load_graph_def(folded)
    assert not [n for n in graph.node if n.op.startswith("FusedBatchNorm")]
    assert close(expected, logits(graph, data["x_test"]))
    # usage errors: no data; a data file for an input that does not exist
    assert runner.invoke(app, ["recalibrate", str(src), str(tmp_path / "o.pb")]).exit_code == 2
    res = runner.invoke(app, ["recalibrate", str(src), str(tmp_path / "o.pb"), "--data", f"nope={cal}"])
    assert res.exit_code == 2 and "nope" in res.output and not (tmp_path / "o.pb").exists()


# -- small graphs built here: forms, data sources, properties ------------------------------
def standalone_bn(mean: np.ndarray, var: np.ndarray, dtype: tf.DType = tf.float32, rank: int = 4) -> graph_pb2.GraphDef:
    """A fused BN (or, for rank 2, tf.nn.batch_normalization) standing alone on the input: recalibrated like any other."""
    channels = mean.size

    @tf.function(input_signature=[tf.TensorSpec([None, *([4] * (rank - 2)), channels], dtype, name="x")])
    def f(x):  # type: ignore[no-untyped-def]
        gamma, beta = np.linspace(0.5, 1.5, channels), np.linspace(-1, 1, channels)
        if rank == 4:
            y = tf.compat.v1.nn.fused_batch_norm(
                x, gamma.astype(np.float32), beta.astype(np.float32), mean.astype(np.float32), var.astype(np.float32), 1e-3, is_training=False
            )[0]
        else:
            d = dtype.as_numpy_dtype
            stat = [tf.constant(v.astype(d)) for v in (mean, var, beta, gamma)]  # numpy would add var + eps before TF sees it
            y = tf.nn.batch_normalization(x, *stat, 1e-3)
        return tf.identity(y, name="y")

    from tensorflow.python.framework import convert_to_constants

    return convert_to_constants.convert_variables_to_constants_v2(f.get_concrete_function()).graph.as_graph_def()


def new_stats(result: bnfold.RecalibrationResult) -> tuple[np.ndarray, np.ndarray]:
    """The statistics the recalibrated graph holds, read back from its constants."""
    from bnfold.tf.canonical import ConstEvaluator
    from bnfold.tf.graph import GraphIndex

    index = GraphIndex(result.graph_def)
    ev = ConstEvaluator(index)
    node = result.layers[0].node
    (stat,) = [s for s in _sites(result.graph_def) if s.name == node]
    mean = ev.raw(index.node(stat.mean_at[0]).input[stat.mean_at[1]])
    var = ev.raw(index.node(stat.var_at[0]).input[stat.var_at[1]])
    assert mean is not None and var is not None
    return mean.reshape(-1), var.reshape(-1)


def _sites(graph_def: graph_pb2.GraphDef):  # type: ignore[no-untyped-def]
    from bnfold.recalibration.sites import find_sites

    return find_sites(graph_def)[0]


@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    channels=st.integers(1, 5),
    center=st.floats(-3, 3),
    std=st.floats(0.2, 4),
    samples=st.integers(40, 200),
    rank=st.sampled_from([2, 4]),
    seed=st.integers(0, 2**16),
)
def test_statistics_already_right_move_less_than_sampling_error(channels: int, center: float, std: float, samples: int, rank: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    mean = center + rng.uniform(-1, 1, channels)
    var = (std * rng.uniform(0.5, 1.5, channels)) ** 2
    graph = standalone_bn(mean, var, rank=rank)
    x = (mean + np.sqrt(var) * rng.standard_normal((samples, *([4] * (rank - 2)), channels))).astype(np.float32)
    result = recalibrate_graph(graph, [x])
    got_mean, got_var = new_stats(result)
    n = x.size // channels
    assert np.all(np.abs(got_mean - mean) <= 5 * np.sqrt(var / n))  # the standard error of a mean of n values, 5 sigma
    assert np.all(np.abs(got_var / var - 1) <= 5 * np.sqrt(2 / n) + 1e-6)  # and of a variance
    assert result.layers[0].values_per_channel == n


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(seed=st.integers(0, 2**16), sizes=st.lists(st.integers(1, 30), min_size=2, max_size=6))
def test_batch_order_does_not_matter(seed: int, sizes: list[int]) -> None:
    rng = np.random.default_rng(seed)
    graph = standalone_bn(np.zeros(3), np.ones(3))
    batches = [(rng.standard_normal((n, 4, 4, 3)) * 3 + 1).astype(np.float32) for n in sizes]
    forward = recalibrate_graph(graph, iter(batches))  # a generator: read once
    backward = recalibrate_graph(graph, list(reversed([(b,) for b in batches])))  # tuples, in the other order
    whole = recalibrate_graph(graph, [np.concatenate(batches)])
    for a, b in ((forward, backward), (forward, whole)):
        (ma, va), (mb, vb) = new_stats(a), new_stats(b)
        np.testing.assert_allclose(ma, mb, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(va, vb, rtol=1e-6)


@settings(max_examples=4, deadline=None, suppress_health_check=list(HealthCheck))
@given(rank=st.sampled_from([2, 4]), seed=st.integers(0, 100))
def test_fp16_models_keep_their_dtype(rank: int, seed: int) -> None:
    graph = standalone_bn(np.zeros(3), np.ones(3), tf.float16, rank)
    before = {n.name: n.attr["dtype"].type for n in graph.node if n.op == "Placeholder"}
    x = (np.random.default_rng(seed).standard_normal((64, *([4] * (rank - 2)), 3)) * 2 + 3).astype(np.float16)
    result = recalibrate_graph(graph, [x])
    after = {n.name: n.attr["dtype"].type for n in result.graph_def.node if n.op == "Placeholder"}
    assert before == after
    (out,) = run_graph(result.graph_def, {"x": x}, ["y:0"])
    assert out.dtype == np.float16
    mean, var = new_stats(result)
    assert mean.dtype == (np.float32 if rank == 4 else np.float16)  # a fused BN keeps float32 statistics on half tensors
    np.testing.assert_allclose(mean, x.astype(np.float64).reshape(-1, 3).mean(0), rtol=1e-2)


def test_data_sources_dataset_dict_and_iterables_agree() -> None:
    graph = standalone_bn(np.zeros(2), np.ones(2))
    x = (np.random.default_rng(0).standard_normal((50, 4, 4, 2)) + 2).astype(np.float32)
    reference = new_stats(recalibrate_graph(graph, [x]))
    sources = [
        {"x": x},
        x,
        tf.data.Dataset.from_tensor_slices((x, np.zeros(50))).batch(7),  # (x, y) pairs from a training pipeline
        [{"x": x[:20]}, {"x": x[20:]}],
    ]
    for source in sources:
        got = new_stats(recalibrate_graph(graph, source))
        np.testing.assert_allclose(got[0], reference[0], rtol=1e-6)
        np.testing.assert_allclose(got[1], reference[1], rtol=1e-6)
    tiny = recalibrate_graph(graph, [x], memory_budget=1)  # one sample per batch
    assert tiny.batch_sizes == [1] * 50
    np.testing.assert_allclose(new_stats(tiny)[1], reference[1], rtol=1e-6)


def test_too_few_values_per_channel_keep_their_statistics() -> None:
    graph = standalone_bn(np.full(3, 0.5), np.full(3, 2.0), rank=2)
    x = np.random.default_rng(0).standard_normal((MIN_DRIFT_VALUES - 1, 3)).astype(np.float32)
    result = recalibrate_graph(graph, [x])
    (layer,) = result.layers
    assert layer.action == "kept" and "fewer than the doctor's minimum" in layer.reason
    np.testing.assert_allclose(new_stats(result)[0], 0.5)


def test_moments_merge_matches_numpy() -> None:
    rng = np.random.default_rng(1)
    parts = [rng.standard_normal((n, 3)) * 1e3 + 1e6 for n in (1, 5, 17)]
    m = Moments()
    for p in parts:
        m.add(p, -1)
    whole = np.concatenate(parts)
    assert m.mean is not None
    np.testing.assert_allclose(m.mean, whole.mean(0), rtol=1e-12)
    np.testing.assert_allclose(m.var, whole.var(0), rtol=1e-9)


def test_a_graph_that_writes_files_is_not_run(tmp_path: Path) -> None:
    graph = tf.Graph()
    marker = tmp_path / "MARKER"
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, 4, 4, 2], name="x")
        write = tf.io.write_file(str(marker), "ran")
        with tf.control_dependencies([write]):
            y = tf.compat.v1.nn.fused_batch_norm(tf.identity(x), np.ones(2, np.float32), np.zeros(2, np.float32),
                                                 np.zeros(2, np.float32), np.ones(2, np.float32), is_training=False)[0]  # fmt: skip
        tf.identity(y, name="y")
    x = np.ones((8, 4, 4, 2), np.float32)
    with pytest.raises(UnsafeModelError, match="recalibrate"):
        bnfold.recalibrate(graph.as_graph_def(), [x])
    assert not marker.exists()


def moments_network(layout: str, gamma: bool, beta: bool, keepdims: bool, channels: int, seed: int) -> graph_pb2.GraphDef:
    """Two layers, each a linear map then tf.nn.moments over the batch + tf.nn.batch_normalization (a decomposed BN in
    training mode, as TF1 code wrote it): NHWC (moments over [0, 1, 2]), NCHW ([0, 2, 3], keepdims) or dense ([0])."""
    rng = np.random.default_rng(seed)
    spatial = {"nhwc": [4, 4], "nchw": [4, 4], "dense": []}[layout]
    shape = [None, 2, *spatial] if layout == "nchw" else [None, *spatial, 2]
    axes = {"nhwc": [0, 1, 2], "nchw": [0, 2, 3], "dense": [0]}[layout]
    keep = keepdims or layout == "nchw"  # NCHW moments must keep their dims to broadcast
    stat_shape = [1, channels, 1, 1] if layout == "nchw" else [1] * (len(spatial) + 1) + [channels] if keep else [channels]

    def bn(h, i):  # type: ignore[no-untyped-def]
        mean, var = tf.nn.moments(h, axes, keepdims=keep)
        scale = tf.constant(rng.uniform(0.5, 2, stat_shape).astype(np.float32)) if gamma else None
        offset = tf.constant(rng.uniform(-1, 1, stat_shape).astype(np.float32)) if beta else None
        return tf.nn.batch_normalization(h, mean, var, offset, scale, 1e-3, name=f"bn{i}")

    @tf.function(input_signature=[tf.TensorSpec(shape, tf.float32, name="x")])
    def f(x):  # type: ignore[no-untyped-def]
        h = x
        for i, cin in enumerate((2, channels)):
            w = tf.constant(rng.standard_normal((cin, channels)).astype(np.float32))
            h = tf.einsum("nchw,cd->ndhw" if layout == "nchw" else "...c,cd->...d", h, w) + 1.5
            h = bn(h, i)
            h = tf.nn.relu(h) if i == 0 else h
        return tf.identity(h, name="y")

    return f.get_concrete_function().graph.as_graph_def()


@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    layout=st.sampled_from(["nhwc", "nchw", "dense"]),
    gamma=st.booleans(),
    beta=st.booleans(),
    keepdims=st.booleans(),
    channels=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_batch_moments_normalization_becomes_inference_mode(layout: str, gamma: bool, beta: bool, keepdims: bool, channels: int, seed: int) -> None:
    """tf.nn.moments over the batch + tf.nn.batch_normalization (a decomposed BN in training mode) gets stored statistics:
    channels last or first, with or without gamma (scale=False) and beta (center=False), two BNs deep."""
    graph = moments_network(layout, gamma, beta, keepdims, channels, seed)
    shape = {"nhwc": (4, 4, 2), "nchw": (2, 4, 4), "dense": (2,)}[layout]
    x = (np.random.default_rng(seed).standard_normal((64, *shape)) * 3 + 2).astype(np.float32)
    result = recalibrate_graph(graph, [x])
    assert [(r.action, r.form, r.level) for r in result.layers] == [("recalibrated", "decomposed on batch moments (training mode -> inference)", i) for i in (0, 1)]
    assert all(r.drift_after is not None and r.drift_after < 0.05 for r in result.layers)
    (training,) = run_graph(graph, {"x": x}, ["y:0"])  # the whole calibration set as one batch
    (inference,) = run_graph(result.graph_def, {"x": x}, ["y:0"])
    assert close(training, inference)
    (one,) = run_graph(result.graph_def, {"x": x[:1]}, ["y:0"])  # no longer depends on the batch
    np.testing.assert_allclose(one, inference[:1], rtol=1e-4, atol=1e-4)
    assert "BN_TRAINING_MODE" not in [f.code for f in diagnose(result.graph_def).findings]
    assert not [n for n in result.graph_def.node if n.op == "Mean"]
    for mean, var in result.values.values():  # the statistics keep the moments' layout
        assert mean.shape == var.shape and mean.size == channels
        assert mean.shape[1 if layout == "nchw" else -1] == channels


def test_doctor_fix_names_a_ready_to_run_recalibrate_line(models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shlex

    data = digits(models)
    cal = tmp_path / "x.npy"
    np.save(cal, data["x_train"][:CALIBRATION])
    report = diagnose(models / "not_wired.pb")
    (at_init,) = [f for f in report.findings if f.code == "BN_STATS_AT_INIT"][:1]
    line = at_init.fix.split(": ")[-1]
    assert line == f"bnfold recalibrate {models / 'not_wired.pb'} recalibrated.pb --data x.npy"
    checkpoint = diagnose(models / "not_wired" / "model.ckpt-400", outputs=["logits"])
    assert any("--outputs logits" in f.fix for f in checkpoint.findings if f.code == "BN_UPDATES_NOT_RUN")
    args = shlex.split(line)[1:]
    monkeypatch.chdir(tmp_path)  # the line's relative paths: x.npy here, recalibrated.pb written here
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert stats_findings(load_graph_def(tmp_path / "recalibrated.pb"), data["x_train"][:CALIBRATION]) == []


def onnx_export(models: Path, tmp_path: Path) -> Path:
    """The shipped TF1 model (BNs at 0/1) exported to ONNX as exporters write it: BatchNormalization nodes."""
    import onnx
    from tf2onnx import tfonnx

    from bnfold.tf.switches import resolve_switches

    src = tmp_path / "model.onnx"
    shipped = load_graph_def(models / "not_wired.pb")
    inference, _ = resolve_switches(shipped, {"is_training": False}, {"x", "logits"})
    graph = tf.Graph()
    with graph.as_default():
        tf.compat.v1.import_graph_def(inference, name="")
    # tf2onnx's conversion before its optimizers (which would fold the BN into the conv): BatchNormalization
    # nodes, as PyTorch and most exporters write them
    onnx.save(tfonnx.process_tf_graph(graph, input_names=["x:0"], output_names=["logits:0"], opset=17).make_model("digits"), src)
    assert [n.op_type for n in onnx.load(src).graph.node].count("BatchNormalization") == 2
    return src


def run_onnx(path: Path | bytes, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(path if isinstance(path, bytes) else str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def test_onnx_export_of_the_model_is_repaired(models: Path, tmp_path: Path) -> None:
    """The shipped TF1 model exported to ONNX (BatchNormalization at 0/1), recalibrated in onnxruntime."""
    import onnx
    import onnxruntime as ort

    data = digits(models)
    calibration = data["x_train"][:CALIBRATION]
    src, dst = onnx_export(models, tmp_path), tmp_path / "fixed.onnx"
    cal = tmp_path / "cal.npy"
    np.save(cal, calibration)
    res = CliRunner().invoke(app, ["recalibrate", str(src), str(dst), "--data", str(cal), "--json", str(tmp_path / "r.json")])
    assert res.exit_code == 0, res.output
    records = json.loads((tmp_path / "r.json").read_text())
    assert records["recalibrated"] == 2 and all(r["drift_after"] < 0.05 < 1 < r["drift_before"] for r in records["layers"])

    def run(path: Path, x: np.ndarray) -> np.ndarray:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(None, {session.get_inputs()[0].name: x})[0]

    training = load_graph_def(models / "not_wired_train.pb")
    assert close(logits(training, calibration, True), run(dst, calibration))
    train_acc = accuracy(logits(training, data["x_test"], True), data["y_test"])
    before, after = accuracy(run(src, data["x_test"]), data["y_test"]), accuracy(run(dst, data["x_test"]), data["y_test"])
    assert before < 0.4 and after > train_acc - 0.06, (before, after, train_acc)
    fixed, original = onnx.load(dst), onnx.load(src)
    assert [n.op_type for n in fixed.graph.node] == [n.op_type for n in original.graph.node]
    assert [i.name for i in fixed.graph.input] == [i.name for i in original.graph.input]
    from bnfold.doctor.onnx import diagnose as onnx_diagnose

    assert not [f for f in onnx_diagnose(dst, data=[calibration]).findings if f.code in ("BN_STATS_AT_INIT", "BN_STATS_DRIFT")]
    in_memory = bnfold.recalibrate(onnx.load(src), [calibration])  # the API on a ModelProto: the same statistics
    session = ort.InferenceSession(in_memory.onnx_model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert close(run(dst, calibration), session.run(None, {session.get_inputs()[0].name: calibration})[0])
    at_init = [f for f in onnx_diagnose(src).findings if f.code == "BN_STATS_AT_INIT"]
    assert at_init and all(f.fix.endswith(f"bnfold recalibrate {src} recalibrated.onnx --data x.npy") for f in at_init)


def test_onnx_recalibrate_then_fold_in_one_step(models: Path, tmp_path: Path) -> None:
    """``bnfold IN.onnx OUT.onnx --recalibrate x.npy``: recalibrated in onnxruntime, then folded and checked against
    the recalibrated model. The output has no BatchNormalization left, predicts what ``bnfold recalibrate`` writes,
    and recovers the training-mode accuracy; ONNX input is written as ONNX only."""
    import onnx

    data = digits(models)
    calibration = data["x_train"][:CALIBRATION]
    src, dst, recalibrated = onnx_export(models, tmp_path), tmp_path / "folded.onnx", tmp_path / "recalibrated.onnx"
    cal = tmp_path / "cal.npy"
    np.save(cal, calibration)
    runner = CliRunner()
    res = runner.invoke(app, ["fold", str(src), str(dst), "--recalibrate", str(cal), "--report", str(tmp_path / "fold.json")])
    assert res.exit_code == 0, res.output
    assert "recalibrated" in res.output and "verification" in res.output.lower()
    report = json.loads((tmp_path / "fold.json").read_text())
    assert report["verification"]["passed"] is True
    folded = onnx.load(dst)
    assert not [n for n in folded.graph.node if n.op_type == "BatchNormalization"]
    res = runner.invoke(app, ["recalibrate", str(src), str(recalibrated), "--data", str(cal)])
    assert res.exit_code == 0, res.output
    assert close(run_onnx(recalibrated, data["x_test"]), run_onnx(dst, data["x_test"]))
    training = load_graph_def(models / "not_wired_train.pb")
    assert close(logits(training, calibration, True), run_onnx(dst, calibration))
    train_acc = accuracy(logits(training, data["x_test"], True), data["y_test"])
    before, after = accuracy(run_onnx(src, data["x_test"]), data["y_test"]), accuracy(run_onnx(dst, data["x_test"]), data["y_test"])
    assert before < 0.4 and after > train_acc - 0.06, (before, after, train_acc)
    res = runner.invoke(app, ["fold", str(src), str(tmp_path / "out.pb"), "--recalibrate", str(cal)])
    assert res.exit_code == 2 and "written as ONNX" in res.output, res.output
    assert not (tmp_path / "out.pb").exists()


def test_onnx_training_mode_batchnormalization_becomes_inference_mode(models: Path, tmp_path: Path) -> None:
    """An ONNX BatchNormalization with training_mode=1 (a model exported in training mode, statistics at 0/1) comes
    out as an inference-mode BatchNormalization (no training_mode, one output) holding the data's statistics."""
    import onnx

    from bnfold.doctor.onnx import diagnose as onnx_diagnose

    data = digits(models)
    calibration = data["x_train"][:CALIBRATION]
    model = onnx.load(onnx_export(models, tmp_path))
    for node in model.graph.node:
        if node.op_type == "BatchNormalization":
            node.attribute.append(onnx.helper.make_attribute("training_mode", 1))
            node.output.extend([f"{node.output[0]}/running_mean", f"{node.output[0]}/running_var"])
    onnx.checker.check_model(model)
    src, dst = tmp_path / "training.onnx", tmp_path / "fixed.onnx"
    onnx.save(model, src)
    modes = [f for f in onnx_diagnose(src).findings if f.code == "BN_TRAINING_MODE"]
    assert len(modes) == 2 and all(f.fix.endswith(f"bnfold recalibrate {src} recalibrated.onnx --data x.npy") for f in modes)
    # the data as a tf.data.Dataset of (x, y) batches, as a training pipeline gives it
    dataset = tf.data.Dataset.from_tensor_slices((calibration, data["y_train"][:CALIBRATION])).batch(50)
    result = bnfold.recalibrate_file(src, dst, dataset)
    assert result.recalibrated == 2 and result.batch_sizes == [50] * 5 + [6]
    assert all(r.form == "BatchNormalization (training mode -> inference)" and r.drift_after < 0.05 for r in result.layers)
    fixed = onnx.load(dst)
    bns = [n for n in fixed.graph.node if n.op_type == "BatchNormalization"]
    assert len(bns) == 2 and all(len(n.output) == 1 and not any(a.name == "training_mode" for a in n.attribute) for n in bns)
    onnx.checker.check_model(fixed)
    training = load_graph_def(models / "not_wired_train.pb")
    assert close(logits(training, calibration, True), run_onnx(dst, calibration))
    train_acc = accuracy(logits(training, data["x_test"], True), data["y_test"])
    after = accuracy(run_onnx(dst, data["x_test"]), data["y_test"])
    assert after > train_acc - 0.06, (after, train_acc)
    codes = {f.code for f in onnx_diagnose(dst, data=[calibration]).findings}
    assert not codes & {"BN_TRAINING_MODE", "BN_STATS_AT_INIT", "BN_STATS_DRIFT"}, codes
    # a training-mode BN whose running statistics the model reads is left as it is, and the note says why
    reads = onnx.ModelProto()
    reads.CopyFrom(model)
    reads.graph.output.append(onnx.helper.make_tensor_value_info(bns[0].output[0] + "/running_mean", onnx.TensorProto.FLOAT, None))
    kept = bnfold.recalibrate(reads, [calibration])
    assert len(kept.layers) == 1 and any("reads its running mean/variance" in n for n in kept.notes)


def small_onnx(channels: int, seed: int) -> bytes:
    """Conv -> BN -> Relu -> Conv -> BN, NCHW, statistics at 0/1: two BN depth levels."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)

    def init(name: str, value: np.ndarray) -> onnx.TensorProto:
        return numpy_helper.from_array(value.astype(np.float32), name)

    inits, nodes = [], []
    previous = "x"
    for i, cin in enumerate((2, channels)):
        inits += [
            init(f"w{i}", rng.standard_normal((channels, cin, 3, 3))),
            init(f"s{i}", rng.uniform(0.5, 1.5, channels)),
            init(f"b{i}", rng.uniform(-1, 1, channels)),
            init(f"m{i}", np.zeros(channels)),
            init(f"v{i}", np.ones(channels)),
        ]
        nodes += [
            helper.make_node("Conv", [previous, f"w{i}"], [f"c{i}"], pads=[1, 1, 1, 1], name=f"conv{i}"),
            helper.make_node("BatchNormalization", [f"c{i}", f"s{i}", f"b{i}", f"m{i}", f"v{i}"], [f"n{i}"], name=f"bn{i}"),
        ]
        previous = f"n{i}"
    nodes.append(helper.make_node("Relu", [previous], ["y"]))
    graph = helper.make_graph(
        nodes,
        "small",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", channels, 6, 6])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


@settings(max_examples=5, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    channels=st.integers(1, 4),
    seed=st.integers(0, 2**16),
    sizes=st.lists(st.integers(1, 25), min_size=2, max_size=5),
    budget_samples=st.integers(1, 40),
)
def test_onnx_data_sources_and_memory_budget(channels: int, seed: int, sizes: list[int], budget_samples: int) -> None:
    """ONNX takes what the TF path takes (arrays, by name, an iterable of batches, a generator, a tf.data.Dataset), and
    arrays are cut into batches whose inputs and BN inputs fit the memory budget: the same statistics from each."""
    import onnx
    from onnx import numpy_helper

    from bnfold.recalibration.onnx import recalibrate_onnx

    model = onnx.load_from_string(small_onnx(channels, seed))
    rng = np.random.default_rng(seed)
    batches = [(rng.standard_normal((n, 2, 6, 6)) * 2 + 1).astype(np.float32) for n in sizes]
    x = np.concatenate(batches)
    per_sample = 4 * (2 * 36 + 2 * channels * 36)  # the input, and the input of each of the two BNs
    budget = budget_samples * per_sample + per_sample // 2
    reference, result = recalibrate_onnx(model, [x], memory_budget=budget)
    assert result.batch_sizes == [min(budget_samples, len(x) - s) for s in range(0, len(x), budget_samples)]
    assert result.samples == len(x) and result.recalibrated == 2
    sources = [
        {"x": x},
        x.astype(np.float64),  # cast to the input's dtype
        [{"x": b} for b in reversed(batches)],  # the order of the batches does not matter
        (b for b in batches),  # a generator: read once
        tf.data.Dataset.from_tensor_slices((x, np.zeros(len(x)))).batch(max(sizes)),
    ]
    want = {i.name: numpy_helper.to_array(i) for i in reference.graph.initializer if i.name[0] in "mv"}
    for source in sources:
        got, _ = recalibrate_onnx(model, source)
        for init in got.graph.initializer:
            if init.name in want:
                np.testing.assert_allclose(numpy_helper.to_array(init), want[init.name], rtol=1e-5, atol=1e-6)
