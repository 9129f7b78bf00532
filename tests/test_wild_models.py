"""Models as published projects ship them (#23): Keras 2 files, op layers with constants, ONNX -1 dims,
TF1 training switches to ONNX, `.keras` from a Keras 2 `.h5`, checkpoints whose `checkpoint` file names
another machine. Each is built here with the library that writes such files (tf_keras, TF1 graph mode,
onnx.helper) and run for real; the published files of ../shared/realworld/keras are in
test_realworld_keras.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import onnx
import pytest
from conftest import ROOT, assert_close, run_graph
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

import bnfold
from bnfold.cli import app
from bnfold.core.errors import OutputError
from bnfold.keras.load import declared_signature, keras_config, keras_origin, signature_difference
from bnfold.tf.io import load_graph_def

tf_keras = pytest.importorskip("tf_keras")
runner = CliRunner()


def _set_bn_stats(model, seed: int = 0) -> None:  # type: ignore[no-untyped-def]
    """Trained-looking statistics, so a fold that drops or misplaces one changes the outputs."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if type(layer).__name__ == "BatchNormalization":
            weights = layer.get_weights()
            n = weights[0].shape[0]
            gamma, beta = rng.uniform(0.5, 1.5, n), rng.normal(0, 0.5, n)
            mean, var = rng.normal(0, 0.5, n), rng.uniform(0.5, 2.0, n)
            layer.set_weights([w.astype(np.float32) for w in (gamma, beta, mean, var)][: len(weights)])


def keras2_sequential(path: Path) -> object:
    """A Keras 2 Sequential whose first layer carries ``batch_input_shape`` (no InputLayer), like inaSpeechSegmenter's."""
    layers = tf_keras.layers
    model = tf_keras.Sequential(
        [
            layers.Reshape((6, 5, 1), batch_input_shape=(None, 6, 5), name="reshape"),
            layers.Conv2D(4, 3, padding="same", use_bias=False, name="conv"),
            layers.BatchNormalization(name="bn"),
            layers.Flatten(name="flatten"),
            layers.Dense(3, name="dense"),
        ]
    )
    _set_bn_stats(model)
    model.save(path, save_format="h5")
    return model


def test_keras2_sequential_with_batch_input_shape_keeps_its_rank_on_every_output(tmp_path: Path) -> None:
    src = tmp_path / "seq.h5"
    original = keras2_sequential(src)
    config = keras_config(src)
    assert "batch_input_shape" in config["config"]["layers"][0]["config"]  # the form under test
    assert keras_origin(src).legacy and keras_origin(src).backend == "tensorflow"
    declared = declared_signature(config)
    assert declared is not None and declared[0][0].shape == (None, 6, 5)
    x = np.random.default_rng(1).standard_normal((4, 6, 5)).astype(np.float32)
    expected = original.predict(x, verbose=0)

    result = bnfold.fold_file(src, tmp_path / "seq.pb")
    assert result.count("folded") == 1
    graph_def = load_graph_def(tmp_path / "seq.pb")
    placeholder = [n for n in graph_def.node if n.op == "Placeholder"]
    assert len(placeholder) == 1
    assert [d.size for d in placeholder[0].attr["shape"].shape.dim] == [-1, 6, 5]  # rank 3, as declared
    assert_close(expected, run_graph(graph_def, {placeholder[0].name: x}, [result.outputs[0]])[0])

    bnfold.fold_file(src, tmp_path / "seq.keras")
    import keras

    rebuilt = keras.saving.load_model(tmp_path / "seq.keras", compile=False)
    assert tuple(rebuilt.inputs[0].shape) == (None, 6, 5)
    assert_close(expected, np.asarray(rebuilt(x, training=False)))


def test_a_loader_that_changes_the_declared_signature_is_caught(tmp_path: Path) -> None:
    """Keras 3's own reading of a Keras 2 Sequential, compared with what the file declares."""
    import keras

    src = tmp_path / "seq.h5"
    keras2_sequential(src)
    declared = declared_signature(keras_config(src))
    assert declared is not None
    legacy = tf_keras.models.load_model(src, compile=False)
    assert signature_difference(declared, legacy.inputs, legacy.outputs) is None
    try:
        k3 = keras.saving.load_model(src, compile=False)
    except Exception:  # noqa: BLE001 - a Keras 3 that refuses the file cannot change it either
        return
    why = signature_difference(declared, k3.inputs, k3.outputs)
    if tuple(k3.inputs[0].shape) != (None, 6, 5):
        assert why is not None and "input" in why


def constant_value_model(path: Path) -> object:
    """tf_keras op layers whose first argument is a constant: inbound nodes hold ``_CONSTANT_VALUE`` entries."""
    import tensorflow as tf

    x = tf_keras.Input((4, 4, 3), name="x")
    y = tf_keras.layers.Conv2D(8, 3, padding="same", use_bias=False, name="conv")(x)
    y = tf_keras.layers.BatchNormalization(name="bn")(y)
    tiled = tf.tile(np.array([[1.5, -2.0]], np.float32), [tf.shape(y)[0], 1])  # constant first argument
    # a scalar integer constant: [_CONSTANT_VALUE, -1, 1000000, kwargs] has the shape of a [layer, node, tensor] reference
    rows = tf.minimum(1_000_000, tf.shape(y)[0])  # the batch size, computed from a scalar constant first argument
    counts = tf.cast(tf.tile(np.array([[3, 0]], np.int32), [rows, 1]), tf.float32)
    z = tf_keras.layers.Concatenate(name="cat")([tf_keras.layers.Flatten(name="flat")(y), tiled, counts])
    model = tf_keras.Model(x, z)
    _set_bn_stats(model)
    model.save(path, save_format="h5")
    return model


def test_constant_value_inbound_nodes_fold_to_keras_output(tmp_path: Path) -> None:
    src = tmp_path / "tile.h5"
    original = constant_value_model(src)
    with h5py.File(src) as handle:
        text = handle.attrs["model_config"]
        assert '["_CONSTANT_VALUE", -1, 1000000,' in text and '["_CONSTANT_VALUE", -1, [[1.5, -2.0]],' in text  # the forms under test
    result = bnfold.fold_file(src, tmp_path / "tile_folded.h5")
    assert result.count("folded") == 1 and result.verification is not None and result.verification.passed
    folded = tf_keras.models.load_model(tmp_path / "tile_folded.h5", compile=False)
    assert "bn" not in [layer.name for layer in folded.layers]
    x = np.random.default_rng(2).standard_normal((3, 4, 4, 3)).astype(np.float32)
    assert_close(original.predict(x, verbose=0), folded.predict(x, verbose=0))
    # Keras 3 has no TFOpLambda: .keras output is refused in one line that says so and suggests .h5
    out = runner.invoke(app, ["fold", str(src), str(tmp_path / "tile.keras"), "-q"])
    assert out.exit_code == OutputError.exit_code, out.output
    assert "TFOpLambda" in out.output and "tile.h5 instead" in out.output and not (tmp_path / "tile.keras").exists()


def test_keras_output_from_a_tf_keras_h5(tmp_path: Path) -> None:
    layers = tf_keras.layers
    x = tf_keras.Input((8, 8, 3), name="image")
    h = layers.SeparableConv2D(6, 3, padding="same", use_bias=False, name="sep")(x)
    h = layers.BatchNormalization(name="bn1")(h)
    h = layers.DepthwiseConv2D(3, padding="same", use_bias=False, name="dw")(h)
    h = layers.BatchNormalization(name="bn2")(h)
    y = layers.Dense(2, name="logits")(layers.GlobalAveragePooling2D(name="gap")(h))
    model = tf_keras.Model(x, y)
    _set_bn_stats(model, 3)
    src = tmp_path / "net.h5"
    model.save(src, save_format="h5")
    out = runner.invoke(app, ["fold", str(src), str(tmp_path / "net.keras")])
    assert out.exit_code == 0, out.output
    import keras

    rebuilt = keras.saving.load_model(tmp_path / "net.keras", compile=False)
    assert [layer.name for layer in rebuilt.layers if "BatchNormalization" in type(layer).__name__] == []
    assert rebuilt.inputs[0].name.split(":")[0] == "image" and tuple(rebuilt.inputs[0].shape) == (None, 8, 8, 3)
    data = np.random.default_rng(4).standard_normal((2, 8, 8, 3)).astype(np.float32)
    assert_close(model.predict(data, verbose=0), np.asarray(rebuilt(data, training=False)))


def test_keras_output_refused_where_keras3_refuses_a_name(tmp_path: Path) -> None:
    x = tf_keras.Input((6, 6, 3), name="x")
    h = tf_keras.layers.Conv2D(4, 3, use_bias=False, name="block1/conv")(x)
    y = tf_keras.layers.BatchNormalization(name="block1/bn")(h)
    src = tmp_path / "slash.h5"
    tf_keras.Model(x, y).save(src, save_format="h5")
    out = runner.invoke(app, ["fold", str(src), str(tmp_path / "slash.keras")])
    assert out.exit_code == OutputError.exit_code
    lines = [line for line in out.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "cannot contain character" in lines[0] and "slash.h5 instead" in lines[0]
    assert not (tmp_path / "slash.keras").exists()
    assert runner.invoke(app, ["fold", str(src), str(tmp_path / "slash_folded.h5"), "-q"]).exit_code == 0


# -- ONNX: unknown dims however the exporter writes them ------------------------------------------
UNKNOWN_DIMS = {"dim_param": "N", "minus_one": -1, "zero": 0, "unset": None}


def conv_bn_onnx(batch: object, spatial: object) -> onnx.ModelProto:
    rng = np.random.default_rng(0)

    def value_info(name: str, channels: int) -> onnx.ValueInfoProto:
        info = helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, channels, 1, 1])
        for d, value in zip(info.type.tensor_type.shape.dim, [batch, channels, spatial, spatial], strict=True):
            d.Clear()  # None: a Dimension with neither field set
            if isinstance(value, str):
                d.dim_param = value
            elif value is not None:
                d.dim_value = value
        return info

    x, y = value_info("x", 3), value_info("y", 4)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.5, (4, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.uniform(0.5, 1.5, 4).astype(np.float32), "g"),
        numpy_helper.from_array(rng.normal(0, 0.5, 4).astype(np.float32), "b"),
        numpy_helper.from_array(rng.normal(0, 0.5, 4).astype(np.float32), "m"),
        numpy_helper.from_array(rng.uniform(0.5, 2, 4).astype(np.float32), "v"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["y"], name="bn"),
    ]
    graph = helper.make_graph(nodes, "g", [x], [y], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.sampled_from(sorted(UNKNOWN_DIMS)), spatial=st.sampled_from([*sorted(UNKNOWN_DIMS), "known"]))
def test_onnx_negative_zero_and_symbolic_dims_are_unknown(batch: str, spatial: str) -> None:
    from bnfold.onnx.io import input_specs
    from bnfold.onnx.pipeline import fold_onnx

    model = conv_bn_onnx(UNKNOWN_DIMS[batch], 8 if spatial == "known" else UNKNOWN_DIMS[spatial])
    shape = input_specs(model)[0].shape
    assert shape == [None, 3, 8 if spatial == "known" else None, 8 if spatial == "known" else None]
    folded, result = fold_onnx(model)
    assert result.count("folded") == 1 and result.verification is not None and result.verification.passed
    assert {n.op_type for n in folded.graph.node} == {"Conv"}


# -- TF1 is_training switch to ONNX ------------------------------------------------------------
def tf1_switch_graph() -> object:
    """conv -> tf.cond(is_training, training BN, inference BN), the flag of unknown rank, in TF1 control flow."""
    import tensorflow as tf
    from tensorflow.python.ops import control_flow_v2_toggles

    rng = np.random.default_rng(5)
    gamma, beta = rng.uniform(0.5, 1.5, 4).astype(np.float32), rng.normal(0, 0.5, 4).astype(np.float32)
    mean, var = rng.normal(0, 0.5, 4).astype(np.float32), rng.uniform(0.5, 2, 4).astype(np.float32)
    was_v2 = control_flow_v2_toggles.control_flow_v2_enabled()
    control_flow_v2_toggles.disable_control_flow_v2()
    try:
        graph = tf.Graph()
        with graph.as_default():
            x = tf.compat.v1.placeholder(tf.float32, [None, 6, 6, 3], name="x")
            flag = tf.compat.v1.placeholder(tf.bool, None, name="is_training")
            w = tf.constant(rng.normal(0, 0.3, (3, 3, 3, 4)).astype(np.float32))
            y = tf.nn.conv2d(x, w, 1, "SAME", name="conv")

            def train() -> tf.Tensor:
                return tf.compat.v1.nn.fused_batch_norm(y, gamma, beta, epsilon=1e-3, is_training=True, name="bn_train")[0]

            def infer() -> tf.Tensor:
                return tf.compat.v1.nn.fused_batch_norm(y, gamma, beta, mean, var, epsilon=1e-3, is_training=False, name="bn_infer")[0]

            tf.nn.relu(tf.cond(flag, train, infer), name="out")
        return graph.as_graph_def()
    finally:
        if was_v2:
            control_flow_v2_toggles.enable_control_flow_v2()


@pytest.mark.parametrize("with_set", [False, True])
def test_tf1_is_training_switch_to_onnx(tmp_path: Path, with_set: bool) -> None:
    import onnxruntime as ort

    graph_def = tf1_switch_graph()
    assert {"Switch", "Merge"} <= {n.op for n in graph_def.node}
    src = tmp_path / "switch.pb"
    src.write_bytes(graph_def.SerializeToString())
    args = ["fold", str(src), str(tmp_path / "switch.onnx"), "--report", str(tmp_path / "r.json")]
    out = runner.invoke(app, [*args, *(["--set", "is_training=false"] if with_set else [])])
    assert out.exit_code == 0, out.output
    report = json.loads((tmp_path / "r.json").read_text())
    actions = sorted(s["action"] for s in report["sites"])
    if with_set:
        assert actions == ["folded"] and report["switches"][0]["value"] is False
    else:  # the flag is fed at run time: the BN inside the switch stays as it was, the inference one is resolved
        assert "folded" not in actions and "skipped" in actions
    model = onnx.load(tmp_path / "switch.onnx")
    x = np.random.default_rng(6).standard_normal((2, 6, 6, 3)).astype(np.float32)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    assert "x:0" in names
    feeds = {"x:0": x, **({"is_training:0": np.array(False)} if "is_training:0" in names else {})}
    got = session.run(["out:0"], feeds)[0]
    expected = run_graph(graph_def, {"x": x, "is_training": np.array(False)}, ["out"])[0]
    assert_close(expected, got)
    if with_set:
        assert not ({"If", "BatchNormalization"} & {n.op_type for n in model.graph.node})


def test_set_on_onnx_input_says_why_it_does_not_apply(tmp_path: Path) -> None:
    src = tmp_path / "m.onnx"
    onnx.save(conv_bn_onnx("N", 8), src)
    out = runner.invoke(app, ["fold", str(src), str(tmp_path / "o.onnx"), "--set", "is_training=false"])
    assert out.exit_code == 2 and "no TensorFlow training switch" in out.output


# -- TF1 checkpoints as projects ship them -----------------------------------------------------
@pytest.fixture(scope="module")
def directory_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A TF1 checkpoint whose prefix is its directory (files ``.index``, ``.meta``, ``.data-...``) and whose
    ``checkpoint`` file names the author's absolute path on another machine."""
    out = tmp_path_factory.mktemp("ckpt")
    script = (
        "import sys; sys.path.insert(0, sys.argv[2]); import tf1_training as t; "
        "t.v1.disable_v2_behavior(); t.single(sys.argv[1], 'ok', collection=True)"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", script, str(out), str(ROOT / "tests")], check=True, capture_output=True, timeout=600, env=env)
    shipped = out / "shipped_model"
    shipped.mkdir()
    for file in (out / "ok").iterdir():
        if file.name.startswith("model.ckpt-3"):
            file.rename(shipped / file.name.replace("model.ckpt-3", ""))
    (shipped / "checkpoint").write_text(
        'model_checkpoint_path: "/home/author/experiments/shipped_model/"\n'
        'all_model_checkpoint_paths: "/home/author/experiments/shipped_model/"\n'
    )
    assert sorted(p.name for p in shipped.iterdir()) == [".data-00000-of-00001", ".index", ".meta", "checkpoint"]
    return shipped


@pytest.mark.parametrize("how", ["directory", "directory/", "meta", "meta --checkpoint directory/"])
def test_checkpoint_whose_prefix_is_its_directory(directory_checkpoint: Path, how: str) -> None:
    d = str(directory_checkpoint)
    args = {
        "directory": [d],
        "directory/": [d + "/"],
        "meta": [f"{d}/.meta"],
        "meta --checkpoint directory/": [f"{d}/.meta", "--checkpoint", d + "/"],
    }[how]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "bnfold", "doctor", *args], capture_output=True, text=True, env=env, timeout=300, cwd=ROOT
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "tensorflow" not in done.stderr.lower() and "ERROR" not in done.stdout + done.stderr
    if how in ("directory", "directory/"):  # the checkpoint file was read: it names the author's path, and the note says so
        assert "/home/author/experiments/shipped_model/" in done.stdout and "beside it" in done.stdout


def test_checkpoint_prefix_found_like_saver_restore(directory_checkpoint: Path) -> None:
    from bnfold.doctor.training import find_prefix

    d = directory_checkpoint
    prefix, note = find_prefix(d)
    assert prefix == str(d) + os.sep and note is not None and "/home/author" in note
    assert find_prefix(Path(f"{d}/.index")) == (str(d) + "/", None)
    assert find_prefix(Path(f"{d}/.data-00000-of-00001")) == (str(d) + "/", None)


# -- Keras output reads every form the functional deserializer reads ---------------------------------
def forms_model(k: object) -> object:
    """A nested model called twice, a shared conv whose BN follows only one call, a layer called with
    tensors in kwargs (MultiHeadAttention's query/value/key), a list input (Add, Concatenate)."""
    layers = k.layers  # type: ignore[attr-defined]
    inner_in = k.Input((8, 8, 4), name="inner_in")  # type: ignore[attr-defined]
    h = layers.BatchNormalization(name="inner_bn")(layers.Conv2D(4, 3, padding="same", use_bias=False, name="inner_conv")(inner_in))
    inner = k.Model(inner_in, h, name="inner")  # type: ignore[attr-defined]
    x = k.Input((8, 8, 3), name="x")  # type: ignore[attr-defined]
    c = layers.BatchNormalization(name="stem_bn")(layers.Conv2D(4, 1, name="stem")(x))
    a, b = inner(c), inner(layers.ReLU(name="relu")(c))
    shared = layers.Conv2D(4, 1, use_bias=False, name="shared")
    s1, s2 = layers.BatchNormalization(name="after_shared")(shared(a)), shared(b)
    seq = layers.Reshape((64, 4), name="seq")(layers.Add(name="add")([s1, s2]))
    att = layers.MultiHeadAttention(2, 4, name="mha")(query=seq, value=seq, key=seq)
    out = layers.Concatenate(name="cat")([layers.Flatten(name="f1")(att), layers.Flatten(name="f2")(s2)])
    model = k.Model(x, out)  # type: ignore[attr-defined]
    _set_bn_stats(model, 7)
    _set_bn_stats(inner, 8)
    return model


@pytest.mark.parametrize("which", ["keras", "tf_keras"])
def test_keras_output_reads_nested_shared_and_kwargs_forms(tmp_path: Path, which: str) -> None:
    import keras

    k = keras if which == "keras" else tf_keras
    src = tmp_path / ("m.keras" if which == "keras" else "m.h5")
    model = forms_model(k)
    model.save(src)
    dst = tmp_path / ("o.keras" if which == "keras" else "o.h5")
    result = bnfold.fold_file(src, dst)
    actions = {s.name: s.action for s in result.sites}
    assert actions == {"inner/inner_bn": "folded", "stem_bn": "folded", "after_shared": "skipped"}
    reason = next(s.reason for s in result.sites if s.name == "after_shared")
    assert reason is not None and "shared is called 2 times" in reason
    folded = keras.saving.load_model(dst, compile=False) if which == "keras" else tf_keras.models.load_model(dst, compile=False)
    data = np.random.default_rng(9).standard_normal((2, 8, 8, 3)).astype(np.float32)
    assert_close(np.asarray(model(data, training=False)), np.asarray(folded(data, training=False)))


# -- the declared signature, against real Keras tensors ---------------------------------------------
dims = st.lists(st.one_of(st.none(), st.integers(1, 64)), min_size=1, max_size=4)


@settings(max_examples=30, deadline=None)
@given(shape=dims, change=st.sampled_from(["none", "rank", "dim", "dtype", "name"]))
def test_signature_difference_finds_every_kind_of_change(shape: list[int | None], change: str) -> None:
    import keras

    from bnfold.keras.load import TensorDecl

    tensor = keras.Input(shape=tuple(shape), name="audio", dtype="float32")
    declared = TensorDecl("audio", (None, *shape), "float32")
    if change == "rank":
        declared = TensorDecl("audio", (None, None, *shape), "float32")
    elif change == "dim":
        known = [i for i, d in enumerate(shape) if d is not None]
        if not known:  # the loader knows no dim: a file that declares one known is different
            declared = TensorDecl("audio", (None, *[7] * len(shape)), "float32")
        else:
            dims_changed = list(shape)
            dims_changed[known[0]] = int(dims_changed[known[0]] or 0) + 1
            declared = TensorDecl("audio", (None, *dims_changed), "float32")
    elif change == "dtype":
        declared = TensorDecl("audio", (None, *shape), "float16")
    elif change == "name":
        declared = TensorDecl("speech", (None, *shape), "float32")
    why = signature_difference(([declared], []), [tensor], [])
    if change == "none":
        assert why is None
    else:
        assert why is not None and "input" in why
    # an unknown dim in the file's declaration accepts whatever the loader knows
    loose = TensorDecl(None, (None,) * (len(shape) + 1), None)
    assert signature_difference(([loose], []), [tensor], []) is None


def test_keras2_file_without_tf_keras_is_one_line_naming_the_package(tmp_path: Path) -> None:
    src = tmp_path / "seq.h5"
    keras2_sequential(src)
    # tf_keras made unimportable in the child (sys.modules[...] = None), as on a machine without it
    script = "import sys; sys.modules['tf_keras'] = None; from bnfold.cli import main; sys.argv[0] = 'bnfold'; main()"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", script, str(src), str(tmp_path / "o.pb")], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 3, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "written by Keras 2." in lines[0] and "pip install tf_keras" in lines[0], done.stderr
    assert not (tmp_path / "o.pb").exists()
