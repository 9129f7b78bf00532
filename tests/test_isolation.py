"""An abort inside TensorFlow while bnfold runs a graph is one line and exit 4, never a dead process.

The graph here aborts TensorFlow for real (``Abort``, which ends the process
with SIGABRT as a failed C++ ``CHECK`` does): were it run in bnfold's own
process, pytest would die with it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import tensorflow as tf
from conftest import run_graph
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import bnfold
from bnfold.core import worker as isolation
from bnfold.core.errors import EXIT_VERIFY, VerificationError
from bnfold.core.protocol import decode_arrays, encode_arrays
from bnfold.tf import runner
from bnfold.tf.runner import IsolatedGraph, run_without_onednn
from bnfold.tf.verify import GraphAborted

ROOT = Path(__file__).resolve().parents[1]


def conv_bn_graph(abort: bool) -> tf.compat.v1.GraphDef:
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, 8, 8, 3], name="x")
        w = tf.constant(np.random.default_rng(0).standard_normal((3, 3, 3, 4)).astype(np.float32))
        deps = [tf.raw_ops.Abort(error_msg="bnfold isolation test")] if abort else []
        with tf.control_dependencies(deps):  # on the conv, so that every run that reaches the BN aborts
            y = tf.nn.conv2d(x, w, 1, "SAME")
        y, *_ = tf.compat.v1.nn.fused_batch_norm(
            y, tf.constant([1.0, 2, 3, 4]), tf.constant([0.5] * 4), tf.constant([0.1] * 4), tf.constant([2.0] * 4), is_training=False
        )
        tf.identity(y, name="output")
    return graph.as_graph_def()


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    return subprocess.run([sys.executable, "-m", "bnfold", *args], capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def abort_pb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("abort") / "abort.pb"
    path.write_bytes(conv_bn_graph(abort=True).SerializeToString())
    return path


def test_a_graph_that_aborts_tensorflow_during_the_check_is_one_line_and_exit_4(abort_pb: Path, tmp_path: Path) -> None:
    before = abort_pb.read_bytes()
    out = tmp_path / "out.pb"
    proc = run_cli(str(abort_pb), str(out))
    assert proc.returncode == EXIT_VERIFY == 4, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "aborted (SIGABRT)" in lines[0] and "Abort_op intentional failure; bnfold isolation test" in lines[0]
    assert "the input graph" in lines[0] and "nothing written" in lines[0]
    assert not out.exists() and list(tmp_path.iterdir()) == []
    assert abort_pb.read_bytes() == before


def test_the_same_graph_is_written_without_the_check(abort_pb: Path, tmp_path: Path) -> None:
    """--no-verify runs nothing, so nothing aborts: the fold itself never runs the graph."""
    out = tmp_path / "out.pb"
    proc = run_cli(str(abort_pb), str(out), "--no-verify", "--quiet")
    assert proc.returncode == 0, proc.stderr
    graph_def = tf.compat.v1.GraphDef.FromString(out.read_bytes())
    assert "FusedBatchNormV3" not in {n.op for n in graph_def.node} and "Abort" in {n.op for n in graph_def.node}


def test_doctor_data_on_a_graph_that_aborts_is_exit_4(abort_pb: Path, tmp_path: Path) -> None:
    data = tmp_path / "x.npy"
    np.save(data, np.random.default_rng(1).standard_normal((4, 8, 8, 3)).astype(np.float32))
    proc = run_cli("doctor", str(abort_pb), "--data", str(data))
    assert proc.returncode == 4, proc.stdout + proc.stderr
    assert "aborted (SIGABRT)" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_the_api_raises_and_this_process_lives_on(abort_pb: Path) -> None:
    graph_def = tf.compat.v1.GraphDef.FromString(abort_pb.read_bytes())
    with pytest.raises(VerificationError, match=r"aborted \(SIGABRT\)") as caught:
        bnfold.fold(graph_def)
    assert isinstance(caught.value, GraphAborted)
    # the dead worker is replaced: the next check runs (and passes) in a new one
    result = bnfold.fold(conv_bn_graph(abort=False))
    assert result.verification is not None and result.verification.passed
    assert [s.action for s in result.sites] == ["folded"]


def test_one_worker_serves_one_graph_after_another() -> None:
    bnfold.fold(conv_bn_graph(abort=False))
    (first,) = [w for w in isolation._spare if w.alive]
    bnfold.fold(conv_bn_graph(abort=False))
    (second,) = [w for w in isolation._spare if w.alive]
    assert second.process.pid == first.process.pid


def test_tensors_kept_in_the_worker_feed_later_runs_without_crossing_the_pipe() -> None:
    """``run_kept``: a fetch stashed under a key stays in the worker (only its shape and size come back, in
    chunks appended along axis 0); later runs feed row ranges of it by key, and give what feeding the values
    themselves gives; a dropped key is gone (the worker says so, and serves on)."""
    from bnfold.core.worker import GraphRunError

    graph_def = conv_bn_graph(abort=False)
    names = {n.name: n for n in graph_def.node}
    conv = next(n for n in names if names[n].op == "Conv2D")
    x = np.random.default_rng(1).standard_normal((10, 8, 8, 3)).astype(np.float32)
    graph = IsolatedGraph(graph_def.SerializeToString())
    try:
        full_conv, full_out = graph.run([f"{conv}:0", "output:0"], {"x:0": x})
        chunks = []
        for start, stop in ((0, 4), (4, 10)):
            values, shapes = graph.run_kept(["output:0", f"{conv}:0"], {"x:0": x[start:stop]}, stash={f"{conv}:0": "cut"})
            assert len(values) == 2 and shapes == [{"shape": [stop - start, 8, 8, 4], "nbytes": (stop - start) * 8 * 8 * 4 * 4}]
            np.testing.assert_allclose(values[1], full_conv[start:stop], rtol=1e-5, atol=1e-5)  # fetched and kept too
            chunks.append(values[0])
        np.testing.assert_allclose(np.concatenate(chunks), full_out, rtol=1e-5, atol=1e-5)
        # fed from the store (rows 3:7), with x all zeros: the output comes from the kept conv values, not from x
        (fed,), shapes = graph.run_kept(["output:0"], {"x:0": np.zeros((4, 8, 8, 3), np.float32)}, stored=[(f"{conv}:0", "cut", 3, 7)])
        (direct,) = graph.run(["output:0"], {f"{conv}:0": full_conv[3:7]})
        assert shapes == []
        np.testing.assert_array_equal(fed, direct)
        np.testing.assert_allclose(fed, full_out[3:7], rtol=1e-5, atol=1e-5)
        graph.drop(["cut"])
        with pytest.raises(GraphRunError, match="nothing is kept"):
            graph.run_kept(["output:0"], {"x:0": x[:2]}, stored=[(f"{conv}:0", "cut", 0, 2)])
        np.testing.assert_allclose(graph.run(["output:0"], {"x:0": x[:2]})[0], full_out[:2], rtol=1e-5, atol=1e-5)
    finally:
        graph.close()


def test_what_a_graph_prints_cannot_pass_for_an_answer() -> None:
    """The worker answers on a copy of its stdout; a graph's PrintV2 to stdout goes to its stderr."""
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [2], name="x")
        with tf.control_dependencies([tf.print("\x00\x00\x00\x10garbage", output_stream=sys.stdout)]):
            tf.identity(x * 2, name="y")
    runner = IsolatedGraph(graph.as_graph_def().SerializeToString())
    try:
        (value,) = runner.run(["y:0"], {"x:0": np.array([1.0, 2.0], np.float32)})
    finally:
        runner.close()
    np.testing.assert_array_equal(value, [2.0, 4.0])


DTYPES = [np.float32, np.float16, np.float64, np.int8, np.uint8, np.int32, np.int64, np.bool_, np.complex64]


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_arrays_cross_the_pipe_unchanged(data: st.DataObject) -> None:
    dtype = data.draw(st.sampled_from(DTYPES))
    shape = data.draw(hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5))
    arrays = [data.draw(hnp.arrays(dtype, shape)) for _ in range(data.draw(st.integers(0, 3)))]
    back = decode_arrays(*encode_arrays(arrays))
    assert len(back) == len(arrays)
    for a, b in zip(arrays, back, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)


def test_bfloat16_and_string_tensors_cross_the_pipe() -> None:
    bf = np.array([[1.5, -2.0], [0.0, 3.25]], dtype=ml_dtypes.bfloat16)
    strings = np.array([[b"ab", b""], [b"\xff\x00z", b"png\x00\x00"]], dtype=object)  # as TF returns string tensors
    back_bf, back_str = decode_arrays(*encode_arrays([bf, strings]))
    assert back_bf.dtype == bf.dtype and np.array_equal(back_bf.astype(np.float32), bf.astype(np.float32))
    assert back_str.dtype == object and back_str.tolist() == strings.tolist()  # trailing NULs kept


def _function_graph() -> tf.compat.v1.GraphDef:
    """A graph that calls a library function (``StatefulPartitionedCall`` of a ``tf.function``), as TF2 exports do."""

    @tf.function
    def body(v: tf.Tensor) -> tf.Tensor:
        return tf.nn.relu(v * 3.0 - 1.0)

    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, 4], name="x")
        tf.identity(body(x), name="y")
    graph_def = graph.as_graph_def()
    assert graph_def.library.function, "the test needs a function library"
    return graph_def


def _public_import(graph_def: tf.compat.v1.GraphDef) -> tf.compat.v1.GraphDef:
    graph = tf.Graph()
    with graph.as_default():
        tf.graph_util.import_graph_def(graph_def, name="")
    return graph.as_graph_def()


@pytest.mark.parametrize("name", ["conv_fused_nhwc", "conv_fused_nchw", "conv_fp16", "conv3d_fused", "skip_training_bn", "functions"])
def test_the_worker_imports_the_bytes_as_import_graph_def_does(name: str) -> None:
    """``import_serialized`` hands the received bytes to TF's C importer without parsing them in Python:
    the graph it builds is the one ``tf.graph_util.import_graph_def`` builds (defaults added, functions kept)."""
    from sample_models.make_samples import SAMPLES, build

    graph_def = _function_graph() if name == "functions" else build(SAMPLES[name])
    imported = runner.import_serialized(tf, graph_def.SerializeToString()).as_graph_def()
    expected = _public_import(graph_def)
    assert imported.SerializeToString(deterministic=True) == expected.SerializeToString(deterministic=True)


def test_a_graph_with_functions_runs_in_the_worker() -> None:
    runner = IsolatedGraph(_function_graph().SerializeToString(), channels_first=False)
    try:
        (value,) = runner.run(["y:0"], {"x:0": np.array([[0.0, 1.0, -1.0, 2.0]], np.float32)})
    finally:
        runner.close()
    np.testing.assert_allclose(value, [[0.0, 2.0, 0.0, 5.0]])


def test_a_graph_tensorflow_rejects_is_an_error_and_the_worker_lives_on() -> None:
    """An input naming no node: TF's importer refuses it (``ValueError``, as ``import_graph_def`` raises), no abort."""
    graph_def = tf.compat.v1.GraphDef()
    node = graph_def.node.add(name="y", op="Identity", input=["nowhere:0"])
    node.attr["T"].type = tf.float32.as_datatype_enum
    with pytest.raises(isolation.GraphRunError, match="nowhere") as caught:
        IsolatedGraph(graph_def.SerializeToString())
    assert caught.value.kind == "ValueError"
    assert any(w.alive for w in isolation._spare)  # kept for the next graph, not replaced


FORK_SCRIPT = r"""
import json, sys, threading, time
from bnfold.core import worker as isolation
isolation.prefer_fork()
from bnfold.tf import runner
import numpy as np
import tensorflow as tf

data = open(sys.argv[1], "rb").read()  # building a graph here would start TF's graph-runner thread
facts = {}

first = runner.IsolatedGraph(data, channels_first=False)
second = runner.IsolatedGraph(data, channels_first=False)  # forked while the first worker is held
facts["kinds"] = [type(g.worker.process).__name__ for g in (first, second)]
(value,) = second.run(["y:0"], {"x:0": np.ones((2, 3), np.float32)})
facts["value"] = value.tolist()
started = time.monotonic()
first.worker.stop()  # EOF on its pipe must reach it: the second worker holds no copy of the first's pipe
facts["first_stopped"] = [first.worker.process.returncode, time.monotonic() - started < 5]
second.close()

stop = threading.Event()
thread = threading.Thread(target=stop.wait)
thread.start()
facts["with_a_thread"] = type(isolation.Worker().process).__name__
stop.set()
thread.join()

tf.constant(1.0) + 1.0  # the eager runtime starts its thread pools
facts["after_eager_ops"] = type(isolation.Worker().process).__name__
print(json.dumps(facts))
"""


def test_the_command_line_forks_its_worker_only_while_no_thread_runs(tmp_path: Path) -> None:
    """``prefer_fork`` (the CLI's choice): a worker forked from a process that has TensorFlow imported and
    has started no thread since numpy; a new interpreter once a Python thread or TF's runtime runs."""
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, 3], name="x")
        tf.identity(x * 2.0 + 1.0, name="y")
    path = tmp_path / "g.pb"
    path.write_bytes(graph.as_graph_def().SerializeToString())
    proc = subprocess.run([sys.executable, "-c", FORK_SCRIPT, str(path)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    facts = json.loads(proc.stdout.strip().splitlines()[-1])
    assert facts["kinds"] == ["_Forked", "_Forked"]
    assert facts["value"] == [[3.0, 3.0, 3.0]] * 2
    assert facts["first_stopped"] == [0, True]  # ended by EOF (exit 0), not killed after the 10 s wait
    assert facts["with_a_thread"] == "Popen" and facts["after_eager_ops"] == "Popen"


def test_this_process_never_forks_once_tensorflow_has_run() -> None:
    """pytest's process has run TF eagerly (threads): even with the preference set, it spawns."""
    tf.constant(1.0) + 1.0
    preferred = isolation._fork_preferred
    try:
        isolation.prefer_fork()
        assert not isolation._can_fork()
    finally:
        isolation._fork_preferred = preferred


PROGRESS_SCRIPT = r"""
import sys
from bnfold import cli
from bnfold.core import worker as isolation

kinds = []
started = isolation.Worker.__init__


def record(self):
    started(self)
    kinds.append(type(self.process).__name__)


isolation.Worker.__init__ = record
sys.argv = ["bnfold", sys.argv[1], sys.argv[2]]
try:
    cli.main()
finally:
    with open(sys.argv[2] + ".kinds", "w") as f:
        f.write(",".join(kinds))
"""


def test_on_a_terminal_the_progress_bar_shows_and_the_worker_is_still_forked(tmp_path: Path) -> None:
    """The bar's refresh thread starts with the first batch, after the worker was forked."""
    import pty

    src, out = tmp_path / "in.pb", tmp_path / "out.pb"
    src.write_bytes(conv_bn_graph(abort=False).SerializeToString())
    leader, follower = pty.openpty()
    seen = bytearray()

    def drain() -> None:  # read while it runs: a full terminal buffer would block its writes
        try:
            while chunk := os.read(leader, 65536):
                seen.extend(chunk)
        except OSError:  # EIO: the terminal's other side is closed and drained
            pass

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        proc = subprocess.run(
            [sys.executable, "-c", PROGRESS_SCRIPT, str(src), str(out)],
            stdin=subprocess.DEVNULL, stdout=follower, stderr=follower, timeout=300, cwd=ROOT,
        )  # fmt: skip
    finally:
        os.close(follower)
        reader.join(timeout=30)
        os.close(leader)
    assert proc.returncode == 0, seen.decode(errors="replace")[-3000:]
    assert b"verifying" in seen and b"wrote" in seen
    assert (tmp_path / "out.pb.kinds").read_text() == "_Forked"


# -- TensorFlow's intermittent aborts: one policy (runner.ABORT_POLICY) ---------------------------------------


def test_an_aborted_run_is_tried_again_and_the_last_abort_is_raised() -> None:
    """``run_retrying_aborts``: an AbortedError (TF's "try again") is retried ABORT_RETRIES times, then raised."""
    calls: list[int] = []

    def aborts_twice() -> str:
        calls.append(1)
        if len(calls) <= 2:
            raise tf.errors.AbortedError(None, None, "could not create a primitive descriptor for the reorder primitive")
        return "ran"

    assert runner.ABORT_RETRIES >= 3
    assert runner.run_retrying_aborts(tf, aborts_twice) == "ran" and len(calls) == 3
    calls.clear()

    def always_aborts() -> str:
        calls.append(1)
        raise tf.errors.AbortedError(None, None, "aborted")

    with pytest.raises(tf.errors.AbortedError):
        runner.run_retrying_aborts(tf, always_aborts)
    assert len(calls) == runner.ABORT_RETRIES
    calls.clear()

    def invalid() -> str:
        calls.append(1)
        raise tf.errors.InvalidArgumentError(None, None, "no kernel")

    with pytest.raises(tf.errors.InvalidArgumentError):  # any other error is an answer: never retried
        runner.run_retrying_aborts(tf, invalid)
    assert len(calls) == 1


def test_the_fallback_runs_channels_first_graphs_with_onednn_off_and_the_same_outputs() -> None:
    """The policy's last step: a new interpreter with TF_ENABLE_ONEDNN_OPTS=0 (read from the live process),
    which still runs an NCHW conv + BN graph (grappler's layout pass) to the outputs of this process's run."""
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, 3, 6, 6], name="x")
        w = tf.constant(np.random.default_rng(0).standard_normal((3, 3, 3, 4)).astype(np.float32))
        y = tf.nn.conv2d(x, w, 1, "SAME", data_format="NCHW")
        ones, zeros = tf.ones([4]), tf.zeros([4])
        y = tf.compat.v1.nn.fused_batch_norm(y, ones * 1.5, zeros + 0.2, zeros + 0.1, ones * 2.0, is_training=False, data_format="NCHW")[0]
        tf.identity(y, name="y")
    graph_def = graph.as_graph_def()
    feeds = {"x:0": np.random.default_rng(1).standard_normal((2, 3, 6, 6)).astype(np.float32)}
    runner = IsolatedGraph(graph_def.SerializeToString(), onednn=False)
    try:
        assert not runner.worker.onednn
        environ = Path(f"/proc/{runner.worker.process.pid}/environ").read_bytes().split(b"\0")
        assert b"TF_ENABLE_ONEDNN_OPTS=0" in environ
        (folded_off,) = runner.run(["y:0"], feeds)
    finally:
        runner.close()
    assert not runner.worker.alive  # a oneDNN-off worker is not kept for other graphs
    (expected,) = run_graph(graph_def, feeds, ["y:0"])
    np.testing.assert_allclose(folded_off, expected, rtol=1e-5, atol=1e-5)
    (again,) = run_without_onednn(graph_def.SerializeToString(), ["y:0"], feeds)
    np.testing.assert_array_equal(again, folded_off)
