"""Models as users have them: .keras, .h5, SavedModel, Keras objects, tf.functions; SavedModel output."""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_close, bn_ops, run_graph
from test_keras import randomize_bn
from typer.testing import CliRunner

import bnfold
from bnfold.cli import app
from bnfold.core.errors import EXIT_INPUT, InputError

runner = CliRunner()
RNG = np.random.default_rng(5)
IMAGE = RNG.standard_normal((3, 10, 10, 3)).astype(np.float32)
META = RNG.standard_normal((3, 4)).astype(np.float32)


def multi_io_model(layers: object, model_cls: object, sequential: object) -> object:
    """Two inputs, two outputs, a nested Sequential and a layer shared by both branches."""
    image = layers.Input((10, 10, 3), name="image")
    meta = layers.Input((4,), name="meta")
    block = sequential([layers.Conv2D(6, 3, padding="same"), layers.BatchNormalization(), layers.ReLU()], name="block")
    shared = layers.Dense(5, name="shared")
    h = layers.GlobalAveragePooling2D()(block(image))
    h = layers.BatchNormalization()(layers.Dense(5)(h))
    m = layers.BatchNormalization()(shared(meta))
    score = shared(layers.Dense(4)(h))
    model = model_cls([image, meta], {"features": layers.Add()([h, m]), "score": score})
    randomize_bn(block)
    randomize_bn(model)
    return model


@pytest.fixture(scope="module")
def model() -> object:
    return multi_io_model(keras.layers, keras.Model, keras.Sequential)


def expected_outputs(model: object) -> dict[str, np.ndarray]:
    out = model([IMAGE, META], training=False)  # type: ignore[operator]
    return {k: np.asarray(v) for k, v in out.items()}


def check_graph(result: bnfold.FoldResult, expected: dict[str, np.ndarray]) -> None:
    assert bn_ops(result.graph_def) == []
    sig = result.signature
    assert sig is not None and set(sig.outputs) == set(expected)
    feeds = {sig.inputs["image"]: IMAGE, sig.inputs["meta"]: META}
    keys = sorted(sig.outputs)
    actual = run_graph(result.graph_def, feeds, [sig.outputs[k] for k in keys])
    for key, value in zip(keys, actual, strict=True):
        assert_close(expected[key], value)


def test_keras_model_object(model: object) -> None:
    result = bnfold.fold(model)
    assert result.count("folded") >= 3
    check_graph(result, expected_outputs(model))


def test_keras_file(model: object, tmp_path: Path) -> None:
    path = tmp_path / "m.keras"
    model.save(path)  # type: ignore[attr-defined]
    check_graph(bnfold.fold(path), expected_outputs(model))


def test_h5_file_with_keras3(model: object, tmp_path: Path) -> None:
    path = tmp_path / "m.h5"
    model.save(path)  # type: ignore[attr-defined]
    check_graph(bnfold.fold(path), expected_outputs(model))


def test_legacy_h5_file_with_tf_keras(tmp_path: Path) -> None:
    tf_keras = pytest.importorskip("tf_keras")
    legacy = multi_io_model(tf_keras.layers, tf_keras.Model, tf_keras.Sequential)
    path = tmp_path / "legacy.h5"
    legacy.save(path)
    check_graph(bnfold.fold(path), expected_outputs(legacy))


def test_saved_model_directory_and_signature(model: object, tmp_path: Path) -> None:
    path = tmp_path / "sm"
    model.export(path, verbose=False)  # type: ignore[attr-defined]
    check_graph(bnfold.fold(path), expected_outputs(model))
    with pytest.raises(InputError, match="serving_default"):
        bnfold.fold(path, signature="nope")


def test_concrete_function_and_tf_function(model: object) -> None:
    specs = [tf.TensorSpec([None, 10, 10, 3], tf.float32, name="image"), tf.TensorSpec([None, 4], tf.float32, name="meta")]

    @tf.function(input_signature=specs)
    def serve(image: tf.Tensor, meta: tf.Tensor) -> dict[str, tf.Tensor]:
        return model([image, meta], training=False)  # type: ignore[operator]

    check_graph(bnfold.fold(serve.get_concrete_function()), expected_outputs(model))
    check_graph(bnfold.fold(serve), expected_outputs(model))

    @tf.function
    def unsigned(x: tf.Tensor) -> tf.Tensor:
        return x

    with pytest.raises(InputError, match="input_signature"):
        bnfold.fold(unsigned)


def test_saved_model_output_round_trip(model: object, tmp_path: Path) -> None:
    src = tmp_path / "sm"
    model.export(src, verbose=False)  # type: ignore[attr-defined]
    original = tf.saved_model.load(str(src)).signatures["serving_default"]
    dst = tmp_path / "folded_sm"
    result = runner.invoke(app, ["fold", str(src), str(dst)])
    assert result.exit_code == 0, result.output
    folded = tf.saved_model.load(str(dst)).signatures["serving_default"]
    assert folded.structured_input_signature[1].keys() == original.structured_input_signature[1].keys()
    assert folded.structured_outputs.keys() == original.structured_outputs.keys()
    want = original(image=tf.constant(IMAGE), meta=tf.constant(META))
    got = folded(image=tf.constant(IMAGE), meta=tf.constant(META))
    for key in want:
        assert_close(want[key].numpy(), got[key].numpy())
    # writing again replaces the SavedModel atomically
    assert runner.invoke(app, ["fold", str(src), str(dst)]).exit_code == 0


def test_frozen_pb_to_saved_model(tmp_path: Path) -> None:
    from sample_models.make_samples import SAMPLES, build

    src = tmp_path / "m.pb"
    graph_def = build(SAMPLES["conv_fused_nhwc"])
    src.write_bytes(graph_def.SerializeToString())
    dst = tmp_path / "sm_out"
    assert runner.invoke(app, ["fold", str(src), str(dst)]).exit_code == 0
    fn = tf.saved_model.load(str(dst)).signatures["serving_default"]
    x = RNG.standard_normal((2, 8, 8, 3)).astype(np.float32)
    got = fn(x=tf.constant(x))
    assert_close(run_graph(graph_def, {"x": x}, ["output"])[0], got["output"].numpy())


def test_directory_that_is_not_a_saved_model(tmp_path: Path) -> None:
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file.txt").write_text("hi")
    result = runner.invoke(app, ["fold", str(tmp_path / "junk"), str(tmp_path / "o.pb")])
    assert result.exit_code == EXIT_INPUT and "not a SavedModel" in result.stderr


def test_non_empty_directory_is_not_overwritten(tmp_path: Path) -> None:
    from bnfold.core.errors import EXIT_OUTPUT

    target = tmp_path / "precious"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    result = runner.invoke(app, ["fold", str(Path(__file__).parents[1] / "sample_models" / "conv_fused_nhwc.pb"), str(target)])
    assert result.exit_code == EXIT_OUTPUT and (target / "notes.txt").read_text() == "keep me"


def test_doctor_reads_keras_files(tmp_path: Path) -> None:
    """An untrained Keras model still has moving mean 0 / variance 1: the doctor says so from the .keras file."""
    inp = keras.Input((6, 6, 3))
    model = keras.Model(inp, keras.layers.BatchNormalization()(keras.layers.Conv2D(2, 3)(inp)))
    path = tmp_path / "untrained.keras"
    model.save(path)
    report = tmp_path / "doctor.json"
    result = runner.invoke(app, ["doctor", str(path), "--json", str(report)])
    assert result.exit_code == 1
    assert [f["code"] for f in json.loads(report.read_text())["findings"]] == ["BN_STATS_AT_INIT"]
