"""Built-in verification: tolerances, feeds, unknown shapes, batch independence, standalone use."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import ROOT
from hypothesis import given, settings
from hypothesis import strategies as st
from tensorflow.core.framework import graph_pb2
from test_keras import randomize_bn
from typer.testing import CliRunner

import bnfold
from bnfold.cli import app
from bnfold.core.errors import EXIT_VERIFY, VerificationError
from bnfold.tf.freeze import freeze_keras
from sample_models.make_samples import SAMPLES, Spec, build

runner = CliRunner()


def _graph(body) -> graph_pb2.GraphDef:  # type: ignore[no-untyped-def]
    graph = tf.Graph()
    with graph.as_default():
        body()
    return graph.as_graph_def()


def _conv_bn(x: tf.Tensor) -> tf.Tensor:
    w = tf.constant(np.random.default_rng(0).standard_normal((3, 3, 3, 4)).astype(np.float32))
    y = tf.nn.conv2d(x, w, 1, "SAME", name="conv")
    c = lambda v: tf.constant(np.asarray(v, np.float32))  # noqa: E731
    return tf.raw_ops.FusedBatchNormV3(
        x=y,
        scale=c([1, 2, -1, 0.5]),
        offset=c([0, 1, 0, 2]),
        mean=c([0.1, 0, 0.3, 0]),
        variance=c([1, 2, 3, 4]),
        is_training=False,
        name="bn",
    )[0]


def test_verify_on_its_own_compares_two_graphs(tmp_path: Path) -> None:
    a = build(Spec(seed=1))
    same = bnfold.fold(a, verify_outputs=False).graph_def
    path = tmp_path / "a.pb"
    path.write_bytes(a.SerializeToString())
    assert bnfold.verify(path, same).passed
    different = build(Spec(seed=2))  # other weights and statistics, same names
    result = bnfold.verify(a, different)
    assert not result.passed and result.worst().name == "output"


def test_tolerances_follow_the_output_dtype() -> None:
    result = bnfold.fold(build(SAMPLES["conv_fp16"]))
    assert result.verification.outputs[0].rtol == 1e-2
    result = bnfold.fold(build(SAMPLES["conv_fused_nhwc"]))
    assert result.verification.outputs[0].rtol == 1e-4


def test_samples_run_several_batches_and_record_inputs() -> None:
    result = bnfold.fold(build(Spec()), samples=3)
    assert result.verification.samples == 3
    assert "random float32 [2, 8, 8, 3]" in result.verification.inputs["x"]
    assert result.verification.batch_independent is True


def test_bool_flag_is_fed_from_the_command_line(tmp_path: Path) -> None:
    def body() -> None:
        x = tf.compat.v1.placeholder(tf.float32, [None, 6, 6, 3], name="x")
        flag = tf.compat.v1.placeholder(tf.bool, [], name="use_bias")
        y = _conv_bn(x)
        tf.identity(tf.where(flag, y + 1.0, y), name="output")

    src = tmp_path / "flag.pb"
    src.write_bytes(_graph(body).SerializeToString())
    report = tmp_path / "r.json"
    result = runner.invoke(app, ["fold", str(src), str(tmp_path / "o.pb"), "--feed", "use_bias=true", "--report", str(report)])
    assert result.exit_code == 0, result.output
    assert json.loads(report.read_text())["verification"]["inputs"]["use_bias"] == "user feed"


def test_string_input_blocks_the_check_until_an_internal_tensor_is_fed(tmp_path: Path) -> None:
    def body() -> None:
        raw = tf.compat.v1.placeholder(tf.string, [], name="raw_bytes")
        decoded = tf.reshape(tf.io.decode_raw(raw, tf.float32), [-1, 6, 6, 3], name="decoded")
        tf.nn.relu(_conv_bn(decoded), name="output")

    src = tmp_path / "decode.pb"
    src.write_bytes(_graph(body).SerializeToString())
    out = tmp_path / "o.pb"
    blocked = runner.invoke(app, ["fold", str(src), str(out)])
    assert blocked.exit_code == EXIT_VERIFY and "raw_bytes" in blocked.stderr and "--feed" in blocked.stderr
    assert not out.exists()
    x = tmp_path / "x.npy"
    np.save(x, np.random.default_rng(0).standard_normal((2, 6, 6, 3)).astype(np.float32))
    fed = runner.invoke(app, ["fold", str(src), str(out), "--feed", f"decoded:0={x}"])
    assert fed.exit_code == 0, fed.output
    assert out.exists()


def test_unknown_height_and_width_of_an_image_get_the_default_size(tmp_path: Path) -> None:
    """``[None, None, None, 3]``: checked at the documented default size, said in the table and the JSON."""

    def body() -> None:
        x = tf.compat.v1.placeholder(tf.float32, [None, None, None, 3], name="x")
        tf.nn.relu(_conv_bn(x), name="output")

    src = tmp_path / "dyn.pb"
    src.write_bytes(_graph(body).SerializeToString())
    out, report = tmp_path / "o.pb", tmp_path / "r.json"
    result = runner.invoke(app, ["fold", str(src), str(out), "--report", str(report)])
    assert result.exit_code == 0, result.output
    how = json.loads(report.read_text())["verification"]["inputs"]["x"]
    assert "[2, 64, 64, 3]" in how and "default for an image-like NHWC input" in how
    assert "default for an image-like NHWC input" in " ".join(result.stdout.split())
    out.unlink()
    assert runner.invoke(app, ["fold", str(src), str(out), "--input-shape", "x=1,9,7,3"]).exit_code == 0


@pytest.mark.parametrize(
    ("shape", "defaulted"),
    [([None, None, None, 3], True), ([None, 3, None, None], True), ([None, None, None, 5], False), ([None, None, None], False), ([None, 3, None, 4], False)],
)
def test_default_size_only_for_image_like_inputs(shape: list[int | None], defaulted: bool) -> None:
    from bnfold.core.comparison import image_spatial_axes

    assert (image_spatial_axes(shape) is not None) == defaulted


def test_a_graph_that_fails_at_the_default_size_asks_for_an_input_shape(tmp_path: Path) -> None:
    def body() -> None:
        x = tf.compat.v1.placeholder(tf.float32, [None, None, None, 3], name="x")
        flat = tf.reshape(tf.nn.relu(_conv_bn(x)), [-1, 9 * 7 * 4])  # only 9x7 images fit
        tf.matmul(flat, tf.ones([9 * 7 * 4, 2]), name="output")

    src = tmp_path / "dyn.pb"
    src.write_bytes(_graph(body).SerializeToString())
    out = tmp_path / "o.pb"
    result = runner.invoke(app, ["fold", str(src), str(out)])
    assert result.exit_code == EXIT_VERIFY and "--input-shape x=" in result.stderr and "default size 64x64" in result.stderr and not out.exists()
    assert runner.invoke(app, ["fold", str(src), str(out), "--input-shape", "x=1,9,7,3"]).exit_code == 0
    out.unlink()
    assert runner.invoke(app, ["fold", str(src), str(out), "--no-verify"]).exit_code == 0 and out.exists()


def test_api_raises_with_the_result_attached() -> None:
    with pytest.raises(VerificationError) as info:
        bnfold.fold(build(SAMPLES["conv_keras3"]), rtol=0, atol=0)
    assert "differs by" in str(info.value)
    assert info.value.result.verification.passed is False
    forced = bnfold.fold(build(SAMPLES["conv_keras3"]), rtol=0, atol=0, force=True)
    assert forced.verification.passed is False


@pytest.fixture(scope="module")
def resnet50_pb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = keras.applications.ResNet50(weights=None, input_shape=(32, 32, 3))
    randomize_bn(model)
    path = tmp_path_factory.mktemp("resnet") / "resnet50.pb"
    path.write_bytes(freeze_keras(model).graph_def.SerializeToString())
    return path


def test_resnet50_cli_passes_and_zero_tolerance_fails(resnet50_pb: Path, tmp_path: Path) -> None:
    out = tmp_path / "folded.pb"
    ok = runner.invoke(app, ["fold", str(resnet50_pb), str(out), "--report", str(tmp_path / "r.json")])
    assert ok.exit_code == 0, ok.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["verification"]["passed"] and report["summary"]["folded"] == 53
    strict = tmp_path / "strict.pb"
    failed = runner.invoke(app, ["fold", str(resnet50_pb), str(strict), "--rtol", "0", "--atol", "0"])
    assert failed.exit_code == EXIT_VERIFY and not strict.exists()


def test_sample_models_are_small() -> None:
    for path in (ROOT / "sample_models").glob("*.pb"):
        assert path.stat().st_size < 1_000_000, path


def _bn_with_fan_out_behind_a_string_input() -> None:
    """A serving graph that decodes its input (strings bnfold cannot make up), then a conv and a BN
    left in training mode: the one BN site is skipped, nothing changes."""
    raw = tf.compat.v1.placeholder(tf.string, [None], name="image_bytes")
    x = tf.reshape(tf.io.decode_raw(raw, tf.float32), [-1, 8, 8, 3])
    w = tf.constant(np.random.default_rng(0).standard_normal((3, 3, 3, 4)).astype(np.float32))
    y = tf.nn.conv2d(x, w, 1, "SAME", name="conv")
    c = lambda v: tf.constant(np.asarray(v, np.float32))  # noqa: E731
    y = tf.raw_ops.FusedBatchNormV3(x=y, scale=c([1] * 4), offset=c([0] * 4), mean=c([]), variance=c([]), is_training=True, name="bn")[0]
    tf.identity(y, name="output")


def test_nothing_changed_is_written_as_it_was_without_a_check(tmp_path: Path) -> None:
    graph_def = _graph(_bn_with_fan_out_behind_a_string_input)
    src, out, report = tmp_path / "in.pb", tmp_path / "out.pb", tmp_path / "report.json"
    src.write_bytes(graph_def.SerializeToString())
    result = runner.invoke(app, ["fold", str(src), str(out), "--report", str(report)])
    assert result.exit_code == 0, result.output
    assert "nothing to fold: the model is written unchanged" in result.output
    assert graph_pb2.GraphDef.FromString(out.read_bytes()) == graph_def
    data = json.loads(report.read_text())
    assert data["unchanged"] is True and data["verification"] is None
    assert [s["action"] for s in data["sites"]] == ["skipped"] and "training" in data["sites"][0]["reason"]
    # the API says the same, and gives the input graph back
    folded = bnfold.fold(graph_def)
    assert folded.unchanged and folded.graph_def is graph_def and folded.verification is None


def test_a_fold_that_changes_the_graph_is_still_checked() -> None:
    result = bnfold.fold(_graph(lambda: tf.identity(_conv_bn(tf.compat.v1.placeholder(tf.float32, [None, 8, 8, 3], name="x")), name="y")))
    assert not result.unchanged and result.verification is not None and result.verification.passed


FORMATS = [None, b"NHWC", b"NCHW", b"NDHWC", b"NCDHW", b"NWC", b"NCW", "placeholder"]


@settings(max_examples=80, deadline=None)
@given(
    top=st.lists(st.sampled_from(FORMATS), max_size=4),
    bodies=st.lists(st.lists(st.sampled_from(FORMATS), max_size=3), max_size=2),
)
def test_the_layout_pass_is_kept_where_an_op_may_be_channels_first(top: list, bodies: list[list]) -> None:
    """The check starts grappler (its layout pass only) for a graph with a channels-first op anywhere, in
    function bodies too, and where a body takes its ``data_format`` from the caller; else not at all."""
    from bnfold.tf.verify import channels_first

    def fill(node: Any, value: object) -> None:
        if value == "placeholder":
            node.attr["data_format"].placeholder = "data_format"
        elif value is not None:
            node.attr["data_format"].s = value  # type: ignore[assignment]

    graph_def = graph_pb2.GraphDef()
    for i, value in enumerate(top):
        fill(graph_def.node.add(name=f"n{i}", op="Conv2D"), value)
    for j, body in enumerate(bodies):
        function = graph_def.library.function.add()
        function.signature.name = f"f{j}"
        for i, value in enumerate(body):
            fill(function.node_def.add(name=f"b{i}", op="Conv2D"), value)
    wanted = any(v == "placeholder" or (v is not None and v.startswith(b"NC")) for v in [*top, *(v for b in bodies for v in b)])
    assert channels_first(graph_def) == wanted
    assert [("data_format" in n.attr) for n in graph_def.node] == [v is not None for v in top]  # read, never added


def test_the_check_runs_graphs_without_optimizers() -> None:
    """No grappler pass but the layout pass (and that only for channels-first graphs), no constant folding."""
    from tensorflow.core.protobuf import config_pb2

    from bnfold.tf.runner import runner_config

    for layout in (True, False):
        config = runner_config(layout)
        assert config.graph_options.optimizer_options.opt_level == config_pb2.OptimizerOptions.L0
        rewrites = config.graph_options.rewrite_options
        assert rewrites.disable_meta_optimizer is not layout
        assert list(rewrites.optimizers) == (["layout"] if layout else [])


@pytest.mark.parametrize("name", ["conv_fused_nchw", "conv_fused_nhwc", "conv3d_fused"])
def test_channels_first_and_last_graphs_pass_the_check(name: str) -> None:
    from bnfold.tf.verify import channels_first

    graph_def = build(SAMPLES[name])
    assert channels_first(graph_def) == (name == "conv_fused_nchw")
    result = bnfold.fold(graph_def)
    assert result.verification is not None and result.verification.passed and result.verification.batch_independent is True


def test_the_input_graph_runs_while_the_fold_runs_and_errors_wait_for_finish() -> None:
    """``PendingCheck`` (what ``bnfold.fold`` starts before folding): the input graph's half runs on a thread;
    what makes the check impossible is raised by ``finish``, not when it starts (a fold that changes nothing
    needs no check); a check never finished leaves the worker to the next one."""
    from bnfold.core.comparison import CheckOptions
    from bnfold.tf.verify import PendingCheck

    blocked = PendingCheck(_graph(_bn_with_fan_out_behind_a_string_input), None, ["output"], CheckOptions())
    assert blocked.thread is None
    with pytest.raises(VerificationError, match="is a string"):
        blocked.finish(graph_pb2.GraphDef())

    graph_def = build(Spec(seed=3))
    abandoned = PendingCheck(graph_def, None, None, CheckOptions())  # as when the fold raises
    assert abandoned.thread is not None
    abandoned.thread.join(timeout=120)
    assert abandoned.reference is not None and abandoned.error is None

    pending = PendingCheck(graph_def, None, None, CheckOptions(samples=2))
    folded = bnfold.fold(graph_def, verify_outputs=False).graph_def
    result = pending.finish(folded)
    assert result.passed and result.samples == 2 and result.batch_independent is True
    assert result.outputs and all(o.name == "output" for o in result.outputs)
    assert not pending.thread.is_alive()


def test_a_failing_gate_is_reported_by_finish_and_nothing_runs() -> None:
    from bnfold.core.comparison import CheckOptions
    from bnfold.core.errors import UnsafeModelError
    from bnfold.tf.verify import PendingCheck

    def refuse() -> None:
        raise UnsafeModelError("refused for the test")

    pending = PendingCheck(build(Spec(seed=4)), None, None, CheckOptions(), gate=refuse)
    assert pending.thread is None
    with pytest.raises(UnsafeModelError, match="refused for the test"):
        pending.finish(build(Spec(seed=4)))
    trusted = PendingCheck(build(Spec(seed=4)), None, None, CheckOptions(), trust_model=True, gate=refuse)
    assert trusted.thread is not None and trusted.finish(build(Spec(seed=4))).passed
