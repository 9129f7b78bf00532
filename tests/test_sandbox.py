"""The worker that loads and runs models is confined by the OS (bnfold.core.sandbox): real workers, real CLI runs.

Each attack runs as a user would run bnfold (a subprocess of the CLI, under a
memory cap the test sets), and is also given ``--trust-model`` with the
allowlist switched off (``BNFOLD_TEST_DISABLE_ALLOWLIST=1``), so that only the
sandbox stands between the model and the files or network it reaches for.
Canary files must stay absent and inputs byte-identical.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from bnfold.core import sandbox
from bnfold.core import worker as isolation

ROOT = Path(__file__).resolve().parents[1]
LANDLOCK = sandbox.landlock_abi()
needs_landlock = pytest.mark.skipif(LANDLOCK == 0, reason=sandbox.status())
CAP = 8 << 30  # the memory the test lets the whole bnfold process use (RLIMIT_DATA)


def cli(*args: str | Path, cwd: Path, disable_allowlist: bool = False, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env["COLUMNS"] = "200"
    if disable_allowlist:
        env["BNFOLD_TEST_DISABLE_ALLOWLIST"] = "1"

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_DATA, (CAP, CAP))

    return subprocess.run(
        [sys.executable, "-m", "bnfold", *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout, preexec_fn=cap
    )


def error_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.startswith("bnfold: ")]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    return lines[0]


@pytest.fixture
def listener() -> Iterator[int]:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    try:
        yield server.getsockname()[1]
    finally:
        server.close()


def bn_graph(extra=None) -> tf.Graph:  # type: ignore[no-untyped-def]
    """conv -> BN -> output; ``extra(x, y)`` returns the output to use instead of ``y`` (the attack)."""
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, 8, 8, 3], name="x")
        w = tf.constant(np.random.default_rng(0).standard_normal((3, 3, 3, 4)).astype(np.float32))
        y = tf.nn.conv2d(x, w, 1, "SAME")
        scale = np.linspace(0.5, 1.5, 4).astype(np.float32)
        y = tf.compat.v1.nn.fused_batch_norm(y, scale, np.zeros(4, np.float32), np.zeros(4, np.float32), np.ones(4, np.float32), is_training=False)[0]
        out = extra(x, y) if extra is not None else y
        tf.identity(out, name="out")
    return graph


def write(graph: tf.Graph, path: Path) -> bytes:
    data = graph.as_graph_def().SerializeToString()
    path.write_bytes(data)
    return data


# -- the worker itself ------------------------------------------------------------------------


SELF_TEST = """
import json, sys
from bnfold.core import worker as isolation
if sys.argv[1] == "forked":  # as the CLI forks it: from a process that has imported TensorFlow, before any run
    import tensorflow
    isolation._fork_preferred = True
    isolation._can_fork = lambda: True
worker = isolation.Worker()
head, _ = worker.request({"op": "selftest", "outside": sys.argv[2], "secret": sys.argv[3], "port": int(sys.argv[4])})
private = worker.limits.private_dir
worker.stop()
print(json.dumps({"kind": type(worker.process).__name__, "answers": head["answers"], "private": private}))
"""


@needs_landlock
@pytest.mark.parametrize("how", ["spawned", "forked"])
def test_confined_worker_cannot_write_read_or_connect_outside(tmp_path: Path, listener: int, how: str) -> None:
    """What a hostile model could try from inside the worker, asked of a real worker (spawned, and forked
    as the CLI forks it, each from a fresh process): the private temp dir is writable, nothing else of the
    user's is readable or writable, and no TCP connection or listening socket is possible (Landlock ABI 4+)."""
    secret = tmp_path / "secret.txt"
    secret.write_text("api key")
    canary = tmp_path / "canary"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    proc = subprocess.run(
        [sys.executable, "-c", SELF_TEST, how, str(canary), str(secret), str(listener)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    facts = json.loads(proc.stdout.strip().splitlines()[-1])
    assert facts["kind"] == ("_Forked" if how == "forked" else "Popen")
    answers = facts["answers"]
    assert answers["write_outside"] == "blocked" and not canary.exists()
    assert answers["read_secret"] == "blocked"
    assert answers["write_private"] == "allowed"
    if LANDLOCK >= 4:
        assert answers["tcp_connect"] == "blocked" and answers["tcp_bind"] == "blocked"
    assert not os.path.exists(facts["private"])  # the parent removes the worker's private directory


def test_worker_limits_are_set_in_the_worker(tmp_path: Path) -> None:
    """The memory and CPU limits a caller configures are the worker's rlimits (read back from /proc)."""
    saved = sandbox.Limits(sandbox.limits.memory, sandbox.limits.time)
    sandbox.configure(memory_limit=3 << 30, time_limit=7)
    try:
        worker = isolation.Worker()
    finally:
        sandbox.configure(saved.memory, saved.time)
    try:
        text = Path(f"/proc/{worker.process.pid}/limits").read_text()
        worker.request({"op": "unload"})  # answered: confined and serving
        text = Path(f"/proc/{worker.process.pid}/limits").read_text()
    finally:
        worker.stop()
    data = next(line for line in text.splitlines() if line.startswith("Max data size")).split()
    cpu = next(line for line in text.splitlines() if line.startswith("Max cpu time")).split()
    assert int(data[3]) == 3 << 30
    assert int(cpu[3]) == 7 * (os.cpu_count() or 1)


# -- attacks through the command line ---------------------------------------------------------


@needs_landlock
@pytest.mark.parametrize("disable_allowlist", [False, True])
def test_trusted_graph_that_writes_a_file_is_stopped_by_the_sandbox(tmp_path: Path, disable_allowlist: bool) -> None:
    """``--trust-model`` lets the check run a graph's ``WriteFile``; the confined worker still cannot write outside."""
    canary = tmp_path / "outside" / "canary.txt"
    canary.parent.mkdir()

    def attack(x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        written = tf.io.write_file(str(canary), tf.strings.as_string(tf.reduce_sum(x)))
        with tf.control_dependencies([written]):
            return tf.identity(y)

    src = tmp_path / "model.pb"
    data = write(bn_graph(attack), src)
    proc = cli(src, tmp_path / "out.pb", "--trust-model", cwd=tmp_path, disable_allowlist=disable_allowlist)
    assert proc.returncode == 4, proc.stderr[-2000:]
    line = error_line(proc)
    assert "canary" in line or "ermission" in line
    assert not canary.exists() and not (tmp_path / "out.pb").exists()
    assert src.read_bytes() == data


@needs_landlock
def test_trusted_saved_model_whose_loading_writes_a_file_is_stopped(tmp_path: Path) -> None:
    """Loading a TF1 SavedModel runs its main op: under --trust-model it runs, in the confined worker, and fails there."""
    canary = tmp_path / "canary.txt"
    export = tmp_path / "sm"
    graph = bn_graph()
    with graph.as_default(), tf.compat.v1.Session(graph=graph) as session:
        main_op = tf.io.write_file(str(canary), "owned")
        builder = tf.compat.v1.saved_model.Builder(str(export))
        signature = tf.compat.v1.saved_model.predict_signature_def(
            {"x": graph.get_tensor_by_name("x:0")}, {"out": graph.get_tensor_by_name("out:0")}
        )
        builder.add_meta_graph_and_variables(session, ["serve"], {"serving_default": signature}, main_op=main_op)
        builder.save()
    before = {p: p.read_bytes() for p in export.rglob("*") if p.is_file()}
    proc = cli("inspect", export, "--trust-model", cwd=tmp_path, disable_allowlist=True)
    assert proc.returncode == 3, proc.stderr[-2000:]
    error_line(proc)
    assert not canary.exists()
    assert {p: p.read_bytes() for p in export.rglob("*") if p.is_file()} == before


def test_memory_limit_ends_a_run_that_allocates_past_it(tmp_path: Path) -> None:
    """A graph that allocates 4 GB at run time (its size depends on the input, so no budget sees it) under
    ``--memory-limit 1G``: exit 4, one line, nothing written."""

    def attack(x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        size = tf.cast(tf.reduce_mean(x) * 0.0 + 1e9, tf.int32)
        big = tf.fill(tf.reshape(size, [1]), tf.reduce_mean(x))
        return y + tf.reduce_sum(big) * 0.0

    src = tmp_path / "model.pb"
    data = write(bn_graph(attack), src)
    proc = cli(src, tmp_path / "out.pb", "--memory-limit", "1G", cwd=tmp_path)
    assert proc.returncode == 4, proc.stderr[-2000:]
    line = error_line(proc)
    assert "memory" in line.lower() or "OOM" in line or "alloc" in line.lower()
    assert not (tmp_path / "out.pb").exists() and src.read_bytes() == data


def test_time_limit_ends_a_run_that_never_finishes(tmp_path: Path) -> None:
    """A loop that never ends (its bound comes from the input) under ``--time-limit 20``: exit 4 naming the limit."""

    def attack(x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        bound = tf.cast(tf.reduce_mean(x) * 0.0, tf.int64) + (1 << 62)
        count = tf.while_loop(lambda i: i < bound, lambda i: i + 1, [tf.constant(0, tf.int64)])
        return y + tf.cast(count, tf.float32) * 0.0

    src = tmp_path / "model.pb"
    write(bn_graph(attack), src)
    proc = cli(src, tmp_path / "out.pb", "--time-limit", "20", cwd=tmp_path, timeout=240)
    assert proc.returncode == 4, proc.stderr[-2000:]
    assert "--time-limit" in error_line(proc)
    assert not (tmp_path / "out.pb").exists()


def test_version_reports_the_sandbox(tmp_path: Path) -> None:
    proc = cli("--version", cwd=tmp_path)
    assert proc.returncode == 0
    lines = proc.stdout.splitlines()
    assert lines[1].startswith("sandbox: ")
    assert (f"Landlock ABI {LANDLOCK}" in lines[1]) == (LANDLOCK > 0)


def test_bad_limit_values_are_usage_errors(tmp_path: Path) -> None:
    proc = cli("inspect", tmp_path / "m.pb", "--memory-limit", "lots", cwd=tmp_path)
    assert proc.returncode == 2 and "--memory-limit" in error_line(proc)


def test_parse_size() -> None:
    assert sandbox.parse_size("8G") == 8 << 30
    assert sandbox.parse_size("512M") == 512 << 20
    assert sandbox.parse_size("1.5GiB") == 3 << 29
    assert sandbox.parse_size("1000") == 1000
    for bad in ("", "-1G", "0", "8Q", "G"):
        with pytest.raises(ValueError):
            sandbox.parse_size(bad)


@needs_landlock
def test_saved_model_with_variables_linked_outside_is_refused(tmp_path: Path) -> None:
    """A SavedModel whose variables/ file is a link to a file outside: exit 3, the file is never read into weights."""
    module = tf.Module()
    module.v = tf.Variable(np.ones((3, 4), np.float32))
    module.f = tf.function(lambda x: tf.matmul(x, module.v), input_signature=[tf.TensorSpec([None, 3], tf.float32)])
    export = tmp_path / "sm"
    tf.saved_model.save(module, str(export), signatures={"serving_default": module.f})
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    for data in (export / "variables").glob("variables.data-*"):
        shutil.move(data, outside / data.name)
        data.symlink_to(outside / data.name)
    proc = cli("inspect", export, cwd=tmp_path)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "links outside the SavedModel" in error_line(proc)


# -- the routes moved into the worker by #22's last step ---------------------------------------


def lambda_keras(tmp_path: Path, target: Path) -> Path:
    """Dense -> BN -> a Lambda that writes ``target`` whenever Keras runs it (a trusted file's own code)."""
    import keras

    inputs = keras.Input((4,))
    x = keras.layers.Dense(3)(inputs)
    x = keras.layers.BatchNormalization()(x)
    body = eval(f"lambda t: (__import__('pathlib').Path({str(target)!r}).write_text('ran'), t * 2.0)[1]")  # noqa: S307
    model = keras.Model(inputs, keras.layers.Lambda(body, name="evil_lambda")(x))
    path = tmp_path / "lambda.keras"
    model.save(path)
    target.unlink(missing_ok=True)  # building ran the lambda here, in the test
    return path


@needs_landlock
@pytest.mark.parametrize("disable_allowlist", [False, True])
def test_trusted_keras_to_keras_fold_runs_the_lambda_in_the_confined_worker(tmp_path: Path, disable_allowlist: bool) -> None:
    """``bnfold a.keras b.keras --trust-model`` loads, folds and checks the model in the worker: the Lambda runs
    there and Landlock denies its write (the error line says so); nothing is written, the canary stays absent."""
    outside = tmp_path / "outside"
    outside.mkdir()
    canary = outside / "canary.txt"
    src = lambda_keras(tmp_path, canary)
    data = src.read_bytes()
    proc = cli(src, tmp_path / "out.keras", "--trust-model", cwd=tmp_path, disable_allowlist=disable_allowlist)
    assert proc.returncode in (3, 4), proc.stderr[-2000:]
    line = error_line(proc)
    assert "Permission denied" in line or "Lambda.call" in line, line  # Keras reports the Lambda's failure by the layer
    assert not canary.exists() and not (tmp_path / "out.keras").exists()
    assert src.read_bytes() == data


WHERE_IT_RAN = """
import json, os, sys
from pathlib import Path
import bnfold
src, work = Path(sys.argv[1]), Path(sys.argv[2])
bnfold.fold_file(src, work / "out.keras")  # the Keras fold
bnfold.fold_file(src, work / "out.onnx")  # tf2onnx, the ONNX fold, the check in onnxruntime
bnfold.fold_file(work / "out.onnx", work / "again.onnx")  # ONNX in: nothing to fold, nothing runs
seen = {m: m in sys.modules for m in ("onnxruntime", "tf2onnx", "onnx.reference")}
print(json.dumps(seen))
"""


def test_the_parent_never_loads_runs_or_converts_a_model_file(tmp_path: Path) -> None:
    """A process-level observation: after a Keras-to-Keras fold and a Keras-to-ONNX fold with the check,
    bnfold's own process has never imported onnxruntime, tf2onnx or the ONNX reference evaluator: the
    sessions, the conversion and the constants ran in the worker."""
    import keras

    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3)(inputs)
    x = keras.layers.BatchNormalization()(x)
    model = keras.Model(inputs, keras.layers.ReLU()(x))
    model.layers[2].set_weights([np.full(4, v, np.float32) for v in (1.5, 0.1, 0.2, 2.0)])
    src = tmp_path / "m.keras"
    model.save(src)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    proc = subprocess.run([sys.executable, "-c", WHERE_IT_RAN, str(src), str(tmp_path)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen == {"onnxruntime": False, "tf2onnx": False, "onnx.reference": False}
    assert (tmp_path / "out.keras").stat().st_size > 0 and (tmp_path / "out.onnx").stat().st_size > 0


@needs_landlock
def test_onnxruntime_session_lives_in_a_confined_worker(tmp_path: Path, listener: int) -> None:
    """The process that holds an OrtRunner's session is not bnfold's, and it is confined: asked the sandbox's
    self-test between two runs, it can neither write outside nor read the user's files."""
    import onnx
    from onnx import TensorProto, helper

    from bnfold.onnx.io import OrtRunner

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    secret = tmp_path / "secret.txt"
    secret.write_text("api key")
    runner = OrtRunner(model)
    try:
        assert runner.worker.process.pid != os.getpid()
        x = np.array([[-1.0, 2.0, -3.0], [4.0, -5.0, 6.0]], np.float32)
        (y,) = runner.run(["y"], {"x": x})
        np.testing.assert_array_equal(y, np.maximum(x, 0))
        head, _ = runner.worker.request({"op": "selftest", "outside": str(tmp_path / "canary"), "secret": str(secret), "port": listener})
        (again,) = runner.run(["y"], {"x": x})  # the session is still there after the self-test
    finally:
        runner.close()
    np.testing.assert_array_equal(again, y)
    assert head["answers"]["write_outside"] == "blocked" and head["answers"]["read_secret"] == "blocked"
    assert not (tmp_path / "canary").exists()


@needs_landlock
@pytest.mark.parametrize("disable_allowlist", [False, True])
def test_trusted_keras_recalibration_runs_the_lambda_in_the_confined_worker(tmp_path: Path, disable_allowlist: bool) -> None:
    """``bnfold recalibrate a.keras b.keras --data x.npy --trust-model`` loads the model only in the worker (to freeze
    it, and again to write the new statistics back): the Lambda runs there and Landlock denies its write; nothing
    is written, the canary stays absent, the input is unchanged."""
    outside = tmp_path / "outside"
    outside.mkdir()
    canary = outside / "canary.txt"
    src = lambda_keras(tmp_path, canary)
    data = src.read_bytes()
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32))
    proc = cli("recalibrate", src, tmp_path / "out.keras", "--data", tmp_path / "x.npy", "--trust-model", cwd=tmp_path,
               disable_allowlist=disable_allowlist)  # fmt: skip
    assert proc.returncode in (3, 4), proc.stderr[-2000:]
    line = error_line(proc)
    assert "Permission denied" in line or "Lambda" in line, line
    assert not canary.exists() and not (tmp_path / "out.keras").exists()
    assert src.read_bytes() == data


WHERE_RECALIBRATION_RAN = """
import json, sys
from pathlib import Path
import numpy as np
import keras
import bnfold
loads = []
real_load = keras.saving.load_model
def spy(*args, **kwargs):
    loads.append(str(args[0]) if args else "")
    return real_load(*args, **kwargs)
keras.saving.load_model = keras.models.load_model = spy
src, work = Path(sys.argv[1]), Path(sys.argv[2])
x = np.random.default_rng(1).normal(3.0, 2.0, size=(128, 8, 8, 3)).astype(np.float32)
result = bnfold.recalibrate_file(src, work / "fixed.keras", [x])
print(json.dumps({"loads": loads, "recalibrated": result.recalibrated}))
"""


def test_keras_recalibration_never_loads_the_model_in_bnfold_s_process(tmp_path: Path) -> None:
    """A process-level observation, with or without Landlock: ``bnfold.recalibrate_file(a.keras, b.keras)`` in a
    process whose ``keras.saving.load_model`` records every call writes the recalibrated file, and that process never
    loaded a Keras model (its workers are other interpreters, where the record does not reach). The test then loads the
    written file itself: its BN statistics are the data's."""
    import keras

    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 1, use_bias=False, kernel_initializer="ones")(inputs)
    x = keras.layers.BatchNormalization(momentum=1.0)(x)
    model = keras.Model(inputs, keras.layers.ReLU()(x))
    src = tmp_path / "m.keras"
    model.save(src)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    proc = subprocess.run([sys.executable, "-c", WHERE_RECALIBRATION_RAN, str(src), str(tmp_path)], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen == {"loads": [], "recalibrated": 1}
    fixed = keras.saving.load_model(tmp_path / "fixed.keras")
    bn = fixed.layers[2]
    data = np.random.default_rng(1).normal(3.0, 2.0, size=(128, 8, 8, 3)).astype(np.float64).sum(-1)  # ones kernel: the channel sum
    np.testing.assert_allclose(np.asarray(bn.moving_mean), np.full(4, data.mean()), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(bn.moving_variance), np.full(4, data.var()), rtol=1e-4)
