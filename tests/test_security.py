"""Untrusted models (issue #14): folding, inspecting or doctoring a file never runs its code or its I/O.

Each attack is built for real -- Keras models whose Lambda writes a marker file
when executed, frozen graphs whose WriteFile/ReadFile nodes name a path -- and
the tests check what a user cares about: the marker or target file does not
exist afterwards, the error is one line with exit 6, nothing was written at
OUT; and, so that the tests can fail, that the same attack does fire when the
user opts in with --trust-model.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_close, run_graph
from tensorflow.core.framework import graph_pb2
from tensorflow.python.framework import op_def_registry
from typer.testing import CliRunner

from bnfold import fold, fold_file
from bnfold.cli import app
from bnfold.core import sandbox
from bnfold.core.errors import EXIT_UNSAFE, InputError, UnsafeModelError, VerificationError
from bnfold.tf.io import load_graph_def
from bnfold.tf.runsafety import HARMLESS_STATEFUL, check_runnable, is_step_local, refused_nodes, registry_decisions
from bnfold.tf.verify import find_outputs

runner = CliRunner()


def invoke(*args: str | Path) -> object:
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(result: object) -> str:
    """The CLI's error: exactly one non-empty stderr line, no traceback."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]  # type: ignore[attr-defined]
    errors = [line for line in lines if line.startswith("bnfold: error:")]
    assert len(errors) == 1, result.stderr  # type: ignore[attr-defined]
    assert "Traceback" not in result.output  # type: ignore[attr-defined]
    return errors[0]


# -- attack builders -----------------------------------------------------------------
def conv_bn(x: tf.Tensor) -> tf.Tensor:
    rng = np.random.default_rng(0)
    w = tf.constant(rng.standard_normal((3, 3, 3, 4)).astype(np.float32), name="w")
    y = tf.nn.conv2d(x, w, 1, "SAME")
    params = [
        tf.constant(v.astype(np.float32))
        for v in (rng.uniform(0.5, 2, 4), rng.standard_normal(4), rng.standard_normal(4), rng.uniform(0.5, 2, 4))
    ]
    y, _, _ = tf.compat.v1.nn.fused_batch_norm(y, *params, is_training=False, name="bn")
    return y


def io_graph(path: Path, kind: str, *, control: bool = True, upstream: bool = False) -> graph_pb2.GraphDef:
    """A frozen conv+BN graph with a WriteFile (on a control edge) or ReadFile (in the data path).

    The I/O node gates the output, or with ``upstream`` the conv's input, so
    that also a run fetching only the BN's input (``doctor --data``) needs it.
    """
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, 8, 8, 3], name="x")

        def side(t: tf.Tensor) -> tf.Tensor:
            if kind == "write":
                write = tf.io.write_file(tf.constant(str(path)), tf.constant("pwned"), name="evil")
                with tf.control_dependencies([write]) if control else nullcontext():
                    return tf.identity(t)
            contents = tf.io.read_file(tf.constant(str(path)), name="evil")
            return t + 0.0 * tf.cast(tf.strings.length(contents), tf.float32)

        y = conv_bn(side(x) if upstream else x)
        tf.identity(y if upstream else side(y), name="output")
    return graph.as_graph_def()


def write_pb(graph_def: graph_pb2.GraphDef, path: Path) -> Path:
    path.write_bytes(graph_def.SerializeToString())
    return path


def lambda_model(module: object, marker: Path) -> object:
    """Dense -> BN -> Lambda whose body writes ``marker`` whenever Keras executes it."""
    inputs = module.Input((4,))  # type: ignore[attr-defined]
    x = module.layers.Dense(3)(inputs)  # type: ignore[attr-defined]
    x = module.layers.BatchNormalization()(x)  # type: ignore[attr-defined]
    # The path is a constant of the bytecode (no defaults, no closure): both Keras' h5 forms carry it as code.
    body = eval(f"lambda t: (__import__('pathlib').Path({str(marker)!r}).write_text('ran'), t * 2.0)[1]")  # noqa: S307
    x = module.layers.Lambda(body, name="evil_lambda")(x)  # type: ignore[attr-defined]
    model = module.Model(inputs, x)  # type: ignore[attr-defined]
    bn = model.layers[2]
    bn.set_weights([np.full(3, 1.5, np.float32), np.full(3, 0.1, np.float32), np.full(3, 0.2, np.float32), np.full(3, 2.0, np.float32)])
    return model


@pytest.fixture(params=["keras3", "tf_keras"])
def lambda_h5(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, Path]:
    module = keras if request.param == "keras3" else pytest.importorskip("tf_keras")
    marker = tmp_path / "marker.txt"
    model = lambda_model(module, marker)
    path = tmp_path / "evil.h5"
    model.save(path)  # type: ignore[attr-defined]
    marker.unlink(missing_ok=True)  # building and saving ran the lambda here, in the test
    return path, marker


# -- Keras files: no code runs on load --------------------------------------------------
@pytest.mark.parametrize("command", ["fold", "fold-to-keras", "inspect", "doctor"])
def test_lambda_h5_is_refused_before_any_code_runs(lambda_h5: tuple[Path, Path], tmp_path: Path, command: str) -> None:
    path, marker = lambda_h5
    out = tmp_path / ("out.h5" if command == "fold-to-keras" else "out.pb")
    args = {"inspect": ["inspect", path], "doctor": ["doctor", path]}.get(command, ["fold", path, out])
    result = invoke(*args)
    assert result.exit_code == EXIT_UNSAFE, result.output
    line = one_line_error(result)
    assert "'evil_lambda'" in line and "Lambda" in line and "--trust-model" in line
    assert not marker.exists()
    assert not out.exists()


def test_lambda_keras_file_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "marker.txt"
    path = tmp_path / "evil.keras"
    lambda_model(keras, marker).save(path)  # type: ignore[attr-defined]
    marker.unlink()
    for args in (["fold", path, tmp_path / "o.pb"], ["inspect", path], ["doctor", path]):
        result = invoke(*args)
        assert result.exit_code == EXIT_UNSAFE, result.output
        assert "'evil_lambda'" in one_line_error(result)
    assert not marker.exists() and not (tmp_path / "o.pb").exists()


def test_keras_safe_mode_stays_as_second_line(tmp_path: Path) -> None:
    """Without bnfold's allowlist (its test-only switch), Keras' own safe mode still refuses the lambda.

    A new bnfold process, so that its worker (where the file is loaded) starts with the switch set.
    """
    import os
    import subprocess
    import sys

    from bnfold.core.trust import DISABLE_ENV

    marker = tmp_path / "marker.txt"
    path = tmp_path / "evil.keras"
    lambda_model(keras, marker).save(path)  # type: ignore[attr-defined]
    marker.unlink()
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, DISABLE_ENV: "1", "PYTHONPATH": str(root)}
    result = subprocess.run([sys.executable, "-m", "bnfold", "inspect", str(path)], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 3, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "lambda" in lines[0].lower(), result.stderr
    assert not marker.exists()


# --trust-model lifts the allowlist, not the confinement (docs/security.md): where Landlock confines the
# worker, an attack the user let run is stopped there, and its error names what it tried.
CONFINED = sandbox.landlock_abi() > 0


def test_trusted_lambda_model_folds(lambda_h5: tuple[Path, Path], tmp_path: Path) -> None:
    path, marker = lambda_h5
    out = tmp_path / "out.pb"
    if CONFINED:  # the Lambda runs in the confined worker, where writing the marker fails
        with pytest.raises(InputError, match="Lambda"):
            fold_file(path, out, trust_model=True)
        assert not marker.exists() and not out.exists()
        return
    result = fold_file(path, out, trust_model=True)
    assert marker.exists()  # the opt-in really runs the file's code
    assert result.count("folded") == 1
    folded = load_graph_def(out)
    assert not [n for n in folded.node if "FusedBatchNorm" in n.op or n.op == "Rsqrt"]
    try:
        model = keras.saving.load_model(path, compile=False, safe_mode=False)
    except Exception:  # noqa: BLE001 - a tf_keras file: Keras 3 cannot read it
        model = pytest.importorskip("tf_keras").models.load_model(path, compile=False, safe_mode=False)
    x = np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32)
    (placeholder,) = [n.name for n in folded.node if n.op == "Placeholder"]
    assert_close(np.asarray(model(x, training=False)), run_graph(folded, {placeholder: x}, result.outputs)[0])


def test_nested_and_tfoplambda_configs(tmp_path: Path) -> None:
    """A Lambda inside a nested model is found; TFOpLambda calling a TF op is fine, one calling gfile is not."""
    from bnfold.keras.load import code_in_config

    marker = tmp_path / "m"
    inner = keras.Sequential([keras.Input((4,)), keras.layers.Dense(4), keras.layers.Lambda(lambda t: t + 1, name="deep")], name="inner")
    outer = keras.Model(inner.inputs, inner.outputs)
    outer.save(tmp_path / "nested.keras")
    from bnfold.keras.load import keras_config

    assert code_in_config(keras_config(tmp_path / "nested.keras"))[0] == "deep"  # type: ignore[index]
    op_layer = {"class_name": "TFOpLambda", "config": {"name": "tf.nn.relu", "function": "nn.relu"}}
    assert code_in_config({"layers": [op_layer]}) is None
    gfile = {"class_name": "TFOpLambda", "config": {"name": "rm", "function": "io.gfile.remove"}}
    assert code_in_config({"layers": [gfile]}) == (
        "rm",
        "is a TFOpLambda calling tf.io.gfile.remove, which is not on bnfold's list of pure tensor functions",
    )
    foreign = {"module": "os", "class_name": "function", "config": "system", "registered_name": "function"}
    layer = {"class_name": "Dense", "config": {"name": "d", "activation": foreign}}
    assert code_in_config({"layers": [layer]})[0] == "d"  # type: ignore[index]
    assert not marker.exists()


# -- graphs: nothing reaches outside the process ----------------------------------------
@pytest.mark.parametrize("outputs", [None, "output"])
def test_write_file_graph_is_not_run(tmp_path: Path, outputs: str | None) -> None:
    target = tmp_path / "written_by_graph.txt"
    src = write_pb(io_graph(target, "write"), tmp_path / "evil.pb")
    out = tmp_path / "out.pb"
    result = invoke("fold", src, out, *(["--outputs", outputs] if outputs else []))
    assert result.exit_code == EXIT_UNSAFE, result.output
    line = one_line_error(result)
    assert "'evil' (WriteFile)" in line and "--no-verify" in line and "--trust-model" in line
    assert not target.exists() and not out.exists()


def test_read_file_graph_is_not_run(tmp_path: Path) -> None:
    """A ReadFile of a missing path: had it run, TensorFlow would fail with NotFound (exit 4), not exit 6."""
    target = tmp_path / "secret.txt"
    src = write_pb(io_graph(target, "read"), tmp_path / "evil.pb")
    result = invoke("fold", src, tmp_path / "out.pb")
    assert result.exit_code == EXIT_UNSAFE, result.output
    assert "'evil' (ReadFile)" in one_line_error(result)
    assert not (tmp_path / "out.pb").exists()


def test_trust_model_runs_the_graph(tmp_path: Path) -> None:
    """The opt-in really runs the graph: the attack fires (so the refusal above is what stops it)."""
    target = tmp_path / "written_by_graph.txt"
    src = write_pb(io_graph(target, "write"), tmp_path / "evil.pb")
    result = invoke("fold", src, tmp_path / "out.pb", "--trust-model", "-q")
    if CONFINED:  # the attack fires in the worker, which may not write there
        assert result.exit_code == 4, result.output
        assert "Permission denied" in one_line_error(result) and not target.exists()
        return
    assert result.exit_code == 0, result.output
    assert target.read_text() == "pwned"


def test_no_verify_folds_and_passes_foreign_ops_through(tmp_path: Path) -> None:
    target = tmp_path / "written_by_graph.txt"
    graph_def = io_graph(target, "write")
    src = write_pb(graph_def, tmp_path / "evil.pb")
    out, report = tmp_path / "out.pb", tmp_path / "r.json"
    result = invoke("fold", src, out, "--no-verify", "--report", report)
    assert result.exit_code == 0, result.output
    assert "passed through untouched: evil (WriteFile)" in result.stderr
    assert json.loads(report.read_text())["foreign_ops"] == [
        {"node": "evil", "op": "WriteFile", "reason": "takes a place to read or write (input 'filename')"}
    ]
    folded = load_graph_def(out)
    original = {n.name: n for n in graph_def.node}
    kept = {n.name: n for n in folded.node}
    for name in ("evil", *[i.lstrip("^") for i in original["evil"].input]):
        assert kept[name] == original[name]  # untouched
    assert not [n for n in folded.node if n.op == "FusedBatchNormV3"]
    assert not target.exists()


def test_no_verify_to_saved_model_runs_nothing(tmp_path: Path) -> None:
    """Writing a SavedModel traces the folded graph; it must not execute the foreign node either."""
    target = tmp_path / "written_by_graph.txt"
    src = write_pb(io_graph(target, "write"), tmp_path / "evil.pb")
    result = invoke("fold", src, tmp_path / "out_model", "--no-verify", "-q")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out_model" / "saved_model.pb").exists()
    assert not target.exists()


def test_inspect_and_doctor_run_nothing(tmp_path: Path) -> None:
    target = tmp_path / "written_by_graph.txt"
    src = write_pb(io_graph(target, "write"), tmp_path / "evil.pb")
    result = invoke("inspect", src)
    assert result.exit_code == 0, result.output
    assert "evil (WriteFile)" in result.stderr
    doctor = invoke("doctor", src)
    assert doctor.exit_code in (0, 1), doctor.output
    assert not target.exists()


@pytest.mark.parametrize("kind", ["write", "read"])
def test_doctor_data_refuses_to_run(tmp_path: Path, kind: str) -> None:
    target = tmp_path / "target.txt"  # written by WriteFile; missing for ReadFile (a run would fail, exit 4)
    src = write_pb(io_graph(target, kind, upstream=True), tmp_path / "evil.pb")
    data = tmp_path / "x.npy"
    np.save(data, np.random.default_rng(0).standard_normal((4, 8, 8, 3)).astype(np.float32))
    report = tmp_path / "d.json"
    result = invoke("doctor", src, "--data", f"x={data}", "--json", report)
    assert result.exit_code == EXIT_UNSAFE, result.output
    line = one_line_error(result)
    assert line.startswith("bnfold: error: --data would run node 'evil'") and "--trust-model" in line
    assert not target.exists() and not report.exists()
    plain = invoke("doctor", src)  # without --data doctor runs nothing
    assert plain.exit_code in (0, 1), plain.output
    assert not target.exists()


def test_doctor_data_runs_what_reaches_nothing(tmp_path: Path) -> None:
    """The gate looks at what a run needs: I/O after the BN does not stop the drift check, and does not run."""
    target = tmp_path / "target.txt"
    src = write_pb(io_graph(target, "write"), tmp_path / "evil.pb")
    data = tmp_path / "x.npy"
    np.save(data, 5.0 + np.random.default_rng(0).standard_normal((4, 8, 8, 3)).astype(np.float32))
    report = tmp_path / "d.json"
    result = invoke("doctor", src, "--data", f"x={data}", "--json", report)
    assert result.exit_code == 1, result.output
    assert "BN_STATS_DRIFT" in {f["code"] for f in json.loads(report.read_text())["findings"]}
    assert not target.exists()


def test_write_file_sink_is_no_output_and_never_runs(tmp_path: Path) -> None:
    """A dangling WriteFile is not an output (it has none); the check runs the real output only."""
    target = tmp_path / "written_by_graph.txt"
    graph_def = io_graph(target, "write", control=False)
    assert find_outputs(graph_def) == ["output"]
    result = invoke("fold", write_pb(graph_def, tmp_path / "evil.pb"), tmp_path / "out.pb", "-q")
    assert result.exit_code == 0, result.output
    assert not target.exists()


def test_onnx_conversion_is_gated(tmp_path: Path) -> None:
    pytest.importorskip("tf2onnx")
    target = tmp_path / "written_by_graph.txt"
    src = write_pb(io_graph(target, "write"), tmp_path / "evil.pb")
    out = tmp_path / "out.onnx"
    result = invoke("fold", src, out, "--no-verify")
    assert result.exit_code == EXIT_UNSAFE, result.output
    assert "converting to ONNX" in one_line_error(result)
    assert not target.exists() and not out.exists()


def test_function_bodies_count(tmp_path: Path) -> None:
    target = tmp_path / "written_by_graph.txt"
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, 4], name="x")

        @tf.function
        def body(t: tf.Tensor) -> tf.Tensor:
            tf.io.write_file(str(target), "pwned", name="hidden")
            return t * 2.0

        c = lambda v: tf.constant(np.asarray(v, np.float32))  # noqa: E731
        # a BN to fold (into a standalone scale-and-shift), so that the graph changes and the check runs
        y = tf.raw_ops.FusedBatchNormV3(
            x=tf.reshape(body(x), [-1, 1, 1, 4]), scale=c([1, 2, 3, 4]), offset=c([0] * 4), mean=c([0.5] * 4), variance=c([2] * 4), is_training=False
        )[0]
        tf.identity(y, name="output")
    graph_def = graph.as_graph_def()
    refusals = refused_nodes(graph_def, ["output"])
    assert [(r.node, r.op) for r in refusals if r.function] == [("hidden", "WriteFile")]
    with pytest.raises(UnsafeModelError, match=r"hidden' \(WriteFile\)"):
        fold(graph_def, outputs=["output"])
    assert not target.exists()
    if CONFINED:  # trusted, the body runs: in the confined worker, where the write fails
        with pytest.raises(VerificationError, match="Permission denied"):
            fold(graph_def, outputs=["output"], trust_model=True)
        assert not target.exists()
        return
    trusted = fold(graph_def, outputs=["output"], trust_model=True)
    assert trusted.verification is not None and trusted.verification.passed and target.exists()


def test_attribute_places() -> None:
    graph_def = graph_pb2.GraphDef()
    node = graph_def.node.add(name="mm", op="ImmutableConst")
    node.attr["memory_region_name"].s = b"/etc/passwd"
    printer = graph_def.node.add(name="p", op="PrintV2")
    printer.attr["output_stream"].s = b"file:///tmp/leak"
    quiet = graph_def.node.add(name="q", op="PrintV2")
    quiet.attr["output_stream"].s = b"stderr"
    refused = {r.node: r.reason for r in refused_nodes(graph_def)}
    assert set(refused) == {"mm", "p"}
    assert "output_stream" in refused["p"]


# -- the rule over TensorFlow's whole op registry --------------------------------------
def test_rule_over_the_registry() -> None:
    decisions = registry_decisions()
    refused = {op for op, reason in decisions.items() if reason}
    for op in (
        "ReadFile",
        "WriteFile",
        "MatchingFiles",
        "Save",
        "SaveV2",
        "Restore",
        "RestoreV2",
        "ImmutableConst",
        "TFRecordReaderV2",
        "ReaderReadV2",
        "TFRecordDataset",
        "FixedLengthRecordDatasetV2",
        "CreateSummaryFileWriter",
        "WriteScalarSummary",
        "VarHandleOp",
        "ReadVariableOp",
        "VariableV2",
        "FIFOQueueV2",
        "HashTableV2",
        "IteratorGetNext",
        "PyFunc",
        "EagerPyFunc",
        "PyFuncStateless",
        "Send",
        "Recv",
        "CollectiveReduceV2",
        "RemoteCall",
        "RegisterDataset",
        "DataServiceDatasetV4",
        "DebugIdentityV2",
        "SnapshotDatasetV2",
        "LoadAndRemapMatrix",
    ):
        assert op in refused, op
    for op in ("Conv2D", "FusedBatchNormV3", "MatMul", "Relu", "Const", "Identity", "NoOp", "Placeholder", "StatelessIf", "If", "While"):
        assert decisions[op] is None, op
    for op in HARMLESS_STATEFUL:
        op_def = op_def_registry.get(op)
        assert op_def is not None and op_def.is_stateful, op
        assert decisions[op] is None, op
    # every stateful op outside the written allow-list is refused
    for op, reason in decisions.items():
        if op_def_registry.get(op).is_stateful and op not in HARMLESS_STATEFUL and not is_step_local(op):
            assert reason, op
    assert {op for op in decisions if is_step_local(op)} >= {"TensorArrayV3", "TensorArrayReadV3", "StackV2"}
    assert 500 < len(refused) < 800, len(refused)


def test_real_world_graphs_pass_the_gate(realworld: Path) -> None:
    """Frozen graphs from the wild keep their check: a TF1 dynamic_rnn (TensorArrayV3) is step-local, not refused."""
    models = realworld / "tf" / "ML-KWS-for-MCU" / "Pretrained_models"
    paths = [models / "CRNN" / "CRNN_S.pb", models / "DS_CNN" / "DS_CNN_S.pb"]
    for path in paths:
        graph_def = load_graph_def(path)
        assert refused_nodes(graph_def) == [], path
    assert "TensorArrayV3" in {n.op for n in load_graph_def(paths[0]).node}


def test_plain_graph_passes_and_matches() -> None:
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, 8, 8, 3], name="x")
        tf.identity(conv_bn(x), name="output")
    graph_def = graph.as_graph_def()
    check_runnable(graph_def, ["output"], "test")
    result = fold(graph_def)
    assert result.foreign_ops == []
    x = np.random.default_rng(2).standard_normal((2, 8, 8, 3)).astype(np.float32)
    assert_close(run_graph(graph_def, {"x": x}, ["output"])[0], run_graph(result.graph_def, {"x": x}, ["output"])[0])


# -- SavedModels: what tf.saved_model.load itself runs ---------------------------------
class EvilResource(tf.saved_model.experimental.TrackableResource):
    """A resource whose initializer -- run by tf.saved_model.load -- writes a file."""

    def __init__(self, target: str) -> None:
        super().__init__()
        self.target = target

    def _create_resource(self) -> tf.Tensor:
        return tf.raw_ops.HashTableV2(key_dtype=tf.string, value_dtype=tf.int64)

    def _initialize(self) -> tf.Operation:
        return tf.io.write_file(self.target, "pwned")


def saved_model(path: Path, resource: object) -> Path:
    module = tf.Module()
    module.r = resource
    module.w = tf.Variable(np.full((3,), 2.0, np.float32))
    module.f = tf.function(lambda x: {"y": x * module.w}, input_signature=[tf.TensorSpec([None, 3], tf.float32)])
    tf.saved_model.save(module, str(path), signatures=module.f)
    return path


def test_saved_model_initializer_is_not_run(tmp_path: Path) -> None:
    target = tmp_path / "written_at_load.txt"
    src = saved_model(tmp_path / "sm", EvilResource(str(target)))
    assert not target.exists()  # saving does not initialize
    for args in (["fold", src, tmp_path / "o.pb"], ["inspect", src], ["doctor", src]):
        result = invoke(*args)
        assert result.exit_code == EXIT_UNSAFE, result.output
        line = one_line_error(result)
        assert "loading the SavedModel would run node" in line and "(WriteFile)" in line and "--trust-model" in line
    assert not target.exists() and not (tmp_path / "o.pb").exists()
    result = invoke("fold", src, tmp_path / "o.pb", "--trust-model", "-q")
    if CONFINED:  # the attack is real: trusted, it runs while the worker loads the model, and fails there
        assert result.exit_code == 3, result.output
        assert "Permission denied" in one_line_error(result) and not target.exists()
        return
    assert result.exit_code == 0, result.output
    assert target.read_text() == "pwned"  # the attack is real: only the check stopped it


def test_saved_model_with_a_table_loads(tmp_path: Path) -> None:
    """Building the model's own tables and variables at load is what loading is for: not refused."""
    init = tf.lookup.KeyValueTensorInitializer(["a", "b"], [1, 2])
    src = saved_model(tmp_path / "sm", tf.lookup.StaticHashTable(init, -1))
    result = fold(src)  # nothing to fold there: written as it was, and not refused
    assert result.unchanged or (result.verification is not None and result.verification.passed)
