"""Hostile models (issue #22): each case is a model built here, as an attacker would, and run through the real CLI.

Every attack aims at a canary directory beside the model (write a file into it,
overwrite or copy its file, delete it), or at bnfold's process itself (budgets:
constants of billions of elements or FLOPs; inputs that are not files; outputs
onto the input; odd input that once ended in an internal error). Each command of a case runs in a process
of its own, forked from :mod:`cli_driver` (which imported TensorFlow once) into
``bnfold.cli.main``, under a memory cap (``RLIMIT_AS``) and a time cap set here, and
checks what a user cares about: the documented exit code, one line on stderr
and no traceback, the canary exactly as it was (same files, same bytes), the
input byte-identical, and no output left behind by a refused run.

The suite runs twice (the ``layers`` fixture): as users run bnfold, where the
allowlist (:mod:`bnfold.tf.allowlist`) refuses every case before anything loads;
and with the allowlist switched off by its test-only switch, where the OS
sandbox alone must contain the same attacks. The second run is skipped until
the sandbox (``bnfold.core.sandbox``) is merged. Cases marked ``fires`` are also run
with ``--trust-model`` to show that the attack is real: there the canary is hit.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import resource
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import keras
import numpy as np
import onnx
import pytest
import tensorflow as tf
from conftest import ROOT
from onnx import TensorProto, helper
from tensorflow.core.framework import graph_pb2, node_def_pb2, variable_pb2
from tensorflow.core.protobuf import saved_model_pb2
from test_budgets import bn_model, first_two, onnx_bn, slice_two
from test_security import EvilResource, conv_bn, io_graph, lambda_model, saved_model

from bnfold.core.errors import EXIT_INPUT, EXIT_OK, EXIT_OUTPUT, EXIT_UNSAFE, EXIT_USAGE, EXIT_VERIFY
from bnfold.core.trust import DISABLE_ENV

MEMORY_CAP = 4 * 2**30  # bytes of address space for each bnfold process (TensorFlow starts in about 2 GiB)
TIME_CAP = 300  # seconds for each bnfold process
DOCUMENTED = {0, 1, 2, 3, 4, 5, 6}  # README "Exit codes", without 70 (a bug) and 130 (Ctrl-C)
F32 = tf.float32.as_datatype_enum
STR = tf.string.as_datatype_enum


# -- the harness ---------------------------------------------------------------------------
@dataclass
class Run:
    """One CLI invocation of a case: arguments ({IN}, {OUT}, {DIR} are filled in) and the exit code as users run bnfold."""

    args: list[str]
    code: int
    says: str | None = None  # text the output must carry as users run bnfold (a budget's reason for a skipped site)


@dataclass
class Case:
    name: str
    attack_class: str  # the issue's class, for the README table and the note
    build: Callable[[Path, Path], Path]  # (work dir, canary dir) -> the model's path
    runs: list[Run]
    fires: bool = False  # with --trust-model the attack is shown to hit the canary
    extra: Callable[[Path], None] | None = field(default=None)  # files the runs need (feeds), given the work dir


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` (or ``path`` itself) -> its bytes; links recorded as their target."""
    if path.is_symlink():
        return {".": b"link:" + os.readlink(path).encode()}
    if path.is_file():
        return {".": path.read_bytes()}
    if not path.exists():
        return {}
    if not path.is_dir():  # a FIFO or a device: never read here
        return {".": b"<special>"}
    out = {}
    for item in sorted(path.rglob("*")):
        key = str(item.relative_to(path))
        if item.is_symlink():
            out[key] = b"link:" + os.readlink(item).encode()
        elif item.is_file():
            out[key] = item.read_bytes()
        else:
            out[key] = b"<dir>"
    return out


def limits() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))


def bnfold_process(args: list[str], cwd: Path, env: dict[str, str], *, fresh: bool = False) -> subprocess.CompletedProcess[str]:
    """``bnfold ARGS`` in a process of its own under the caps: forked from :mod:`cli_driver`, or ``python -m bnfold`` when ``fresh``.

    The driver saves each command the 7 CPU seconds of starting Python and
    TensorFlow (the suite runs about two hundred); ``fresh`` runs the console
    entry point exactly as a shell would, for the cases that show an attack firing.
    """
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    if not fresh:
        answer = _driver().run({"args": args, "cwd": str(cwd), "env": full_env, "memory_cap": MEMORY_CAP, "time_cap": TIME_CAP})
        if answer["timed_out"]:
            raise subprocess.TimeoutExpired(["bnfold", *args], TIME_CAP, answer["stdout"], answer["stderr"])
        return subprocess.CompletedProcess(["bnfold", *args], answer["returncode"], answer["stdout"], answer["stderr"])
    return subprocess.run(
        [sys.executable, "-m", "bnfold", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=full_env,
        timeout=TIME_CAP,
        preexec_fn=limits,  # noqa: PLW1509 - the child only sets its own limit
    )


class _Driver:
    """The one :mod:`cli_driver` process of this test process, started on first use."""

    def __init__(self) -> None:
        self.process: subprocess.Popen[str] | None = None

    def run(self, request: dict[str, object]) -> dict[str, object]:
        if self.process is None or self.process.poll() is not None:
            self.process = subprocess.Popen(
                [sys.executable, str(Path(__file__).with_name("cli_driver.py"))],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        answer: dict[str, object] = json.loads(self.process.stdout.readline())
        return answer

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.close()
            self.process.wait(timeout=60)
        self.process = None


_DRIVER = _Driver()


def _driver() -> _Driver:
    return _DRIVER


@pytest.fixture(scope="module", autouse=True)
def _close_driver() -> Iterator[None]:
    yield
    _DRIVER.close()


def stderr_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


# -- graph builders ------------------------------------------------------------------------
def const(graph_def: graph_pb2.GraphDef | object, name: str, value: object, dtype: int) -> node_def_pb2.NodeDef:
    node = graph_def.node.add() if isinstance(graph_def, graph_pb2.GraphDef) else graph_def.node_def.add()  # type: ignore[attr-defined]
    node.name, node.op = name, "Const"
    node.attr["dtype"].type = dtype
    node.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(value))
    return node


def gated(graph_def: graph_pb2.GraphDef, *names: str) -> graph_pb2.GraphDef:
    """The output waits for ``names`` (control edges): a run of the output runs them."""
    out = next(n for n in graph_def.node if n.name == "output")
    out.input.extend(f"^{n}" for n in names)
    return graph_def


def plain_graph(hook: bool = False) -> graph_pb2.GraphDef:
    """x -> conv -> BN -> output (a site to fold, so the check runs); with ``hook`` the conv reads ``hook`` instead of x."""
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, 8, 8, 3], name="x")
        y = tf.identity(x, name="hook") if hook else x
        tf.identity(conv_bn(y), name="output")
    return graph.as_graph_def()


def write_node(graph_def: graph_pb2.GraphDef, target: Path, name: str = "evil") -> str:
    const(graph_def, f"{name}/path", str(target), STR)
    const(graph_def, f"{name}/text", "pwned", STR)
    node = graph_def.node.add(name=name, op="WriteFile")
    node.input.extend([f"{name}/path", f"{name}/text"])
    return name


def evil_function(graph_def: graph_pb2.GraphDef, target: Path, name: str = "Evil") -> None:
    """A library function x -> x that writes ``target`` on the way."""
    function = graph_def.library.function.add()
    function.signature.name = name
    function.signature.input_arg.add(name="x", type=F32)
    function.signature.output_arg.add(name="y", type=F32)
    const(function, "path", str(target), STR)
    const(function, "text", "pwned", STR)
    write = function.node_def.add(name="hidden_write", op="WriteFile")
    write.input.extend(["path:output:0", "text:output:0"])
    out = function.node_def.add(name="out", op="Identity")
    out.input.extend(["x", "^hidden_write"])
    out.attr["T"].type = F32
    function.ret["y"] = "out:output:0"


def call_node(graph_def: graph_pb2.GraphDef, name: str, source: str) -> node_def_pb2.NodeDef:
    node = graph_def.node.add(name=name, op="PartitionedCall")
    node.input.append(source)
    node.attr["Tin"].list.type.append(F32)
    node.attr["Tout"].list.type.append(F32)
    return node


def hooked(graph_def: graph_pb2.GraphDef, node: str) -> graph_pb2.GraphDef:
    """The conv reads ``node``'s output instead of x (``plain_graph(hook=True)``)."""
    hook = next(n for n in graph_def.node if n.name == "hook")
    hook.input[0] = node
    return graph_def


def pb_write_control(d: Path, canary: Path) -> graph_pb2.GraphDef:
    return io_graph(canary / "new.txt", "write")


def pb_function_value(d: Path, canary: Path) -> graph_pb2.GraphDef:
    """The issue's critical case: Evil reaches the graph only as the value of Outer's ``f`` parameter."""
    graph_def = plain_graph(hook=True)
    evil_function(graph_def, canary / "new.txt")
    outer = graph_def.library.function.add()
    outer.signature.name = "Outer"
    outer.signature.input_arg.add(name="x", type=F32)
    outer.signature.output_arg.add(name="y", type=F32)
    outer.signature.attr.add(name="f", type="func")
    call = outer.node_def.add(name="call", op="PartitionedCall")
    call.input.append("x")
    call.attr["Tin"].list.type.append(F32)
    call.attr["Tout"].list.type.append(F32)
    call.attr["f"].placeholder = "f"
    outer.ret["y"] = "call:output:0"
    node = call_node(graph_def, "c", "x")
    node.attr["f"].func.name = "Outer"
    node.attr["f"].func.attr["f"].func.name = "Evil"
    return hooked(graph_def, "c")


def pb_function_call(d: Path, canary: Path) -> graph_pb2.GraphDef:
    graph_def = plain_graph(hook=True)
    evil_function(graph_def, canary / "new.txt")
    call_node(graph_def, "c", "x").attr["f"].func.name = "Evil"
    return hooked(graph_def, "c")


def pb_function_by_op(d: Path, canary: Path) -> graph_pb2.GraphDef:
    """The function is the node's op type (a call by name), as older exporters wrote it."""
    graph_def = plain_graph(hook=True)
    evil_function(graph_def, canary / "new.txt")
    node = graph_def.node.add(name="c", op="Evil")
    node.input.append("x")
    return hooked(graph_def, "c")


def pb_gradient(d: Path, canary: Path) -> graph_pb2.GraphDef:
    """Evil is only registered as the gradient of a pure function the graph calls."""
    graph_def = plain_graph(hook=True)
    evil_function(graph_def, canary / "new.txt")
    pure = graph_def.library.function.add()
    pure.signature.name = "Pure"
    pure.signature.input_arg.add(name="x", type=F32)
    pure.signature.output_arg.add(name="y", type=F32)
    pure.ret["y"] = "x"
    graph_def.library.gradient.add(function_name="Pure", gradient_func="Evil")
    call_node(graph_def, "c", "x").attr["f"].func.name = "Pure"
    return hooked(graph_def, "c")


def pb_unreferenced(d: Path, canary: Path) -> graph_pb2.GraphDef:
    """A library function nothing names: checked anyway, since routes to it need not be foreseen."""
    graph_def = plain_graph()
    evil_function(graph_def, canary / "new.txt")
    return graph_def


def traced(body: Callable[[tf.Tensor], tf.Tensor]) -> graph_pb2.GraphDef:
    """x -> tf.function(body) -> conv -> BN -> output, as a v1 graph holding the function in its library."""
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, 8, 8, 3], name="x")
        tf.identity(conv_bn(tf.function(body)(x)), name="output")
    return graph.as_graph_def()


def pb_while_body(d: Path, canary: Path) -> graph_pb2.GraphDef:
    target = str(canary / "new.txt")

    def body(x: tf.Tensor) -> tf.Tensor:
        def step(i: tf.Tensor, t: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            with tf.control_dependencies([tf.io.write_file(target, "pwned")]):
                return i + 1, tf.identity(t)

        return tf.while_loop(lambda i, t: i < 2, step, [tf.constant(0), x])[1]

    return traced(body)


def pb_if_branch(d: Path, canary: Path) -> graph_pb2.GraphDef:
    target = str(canary / "new.txt")

    def body(x: tf.Tensor) -> tf.Tensor:
        def evil() -> tf.Tensor:
            with tf.control_dependencies([tf.io.write_file(target, "pwned")]):
                return tf.identity(x)

        return tf.cond(tf.reduce_sum(x) > -1e30, evil, lambda: x)

    return traced(body)


def pb_case_branch(d: Path, canary: Path) -> graph_pb2.GraphDef:
    target = str(canary / "new.txt")

    def body(x: tf.Tensor) -> tf.Tensor:
        def evil() -> tf.Tensor:
            with tf.control_dependencies([tf.io.write_file(target, "pwned")]):
                return tf.identity(x)

        return tf.switch_case(tf.constant(1) + tf.cast(tf.reduce_sum(x) * 0, tf.int32), [lambda: x, evil])

    return traced(body)


def pb_print_to_file(d: Path, canary: Path) -> graph_pb2.GraphDef:
    target = canary / "new.txt"

    def body(x: tf.Tensor) -> tf.Tensor:
        with tf.control_dependencies([tf.print("pwned", output_stream=f"file://{target}")]):
            return tf.identity(x)

    return traced(body)


def pb_immutable_const(d: Path, canary: Path) -> graph_pb2.GraphDef:
    graph_def = plain_graph()
    node = graph_def.node.add(name="mapped", op="ImmutableConst")
    node.attr["dtype"].type = F32
    node.attr["shape"].shape.dim.add(size=1)
    node.attr["memory_region_name"].s = str(canary / "keep.txt").encode()
    return gated(graph_def, "mapped")


def pb_debug_identity(d: Path, canary: Path) -> graph_pb2.GraphDef:
    graph_def = plain_graph(hook=True)
    node = graph_def.node.add(name="dbg", op="DebugIdentity", input=["x"])
    node.attr["T"].type = F32
    node.attr["debug_urls"].list.s.append(f"file://{canary}".encode())
    return hooked(graph_def, "dbg")


def pb_matching_files(d: Path, canary: Path) -> graph_pb2.GraphDef:
    graph_def = plain_graph()
    const(graph_def, "pattern", str(canary / "*"), STR)
    graph_def.node.add(name="glob", op="MatchingFiles", input=["pattern"])
    return gated(graph_def, "glob")


def pb_pyfunc(d: Path, canary: Path) -> graph_pb2.GraphDef:
    graph_def = plain_graph()
    node = graph_def.node.add(name="py", op="PyFunc")
    node.attr["token"].s = b"pyfunc_0"
    node.attr["Tin"].list.SetInParent()
    node.attr["Tout"].list.SetInParent()
    return gated(graph_def, "py")


def pb_unknown_op(d: Path, canary: Path) -> graph_pb2.GraphDef:
    graph_def = plain_graph()
    node = graph_def.node.add(name="custom", op="EvilCustomOpFromALoadedLibrary")
    node.attr["path"].s = str(canary).encode()
    return gated(graph_def, "custom")


def pb_dataset(d: Path, canary: Path) -> graph_pb2.GraphDef:
    graph_def = plain_graph()
    const(graph_def, "files", [str(canary / "keep.txt")], STR)
    const(graph_def, "compression", "", STR)
    const(graph_def, "buffer", np.int64(0), tf.int64.as_datatype_enum)
    graph_def.node.add(name="records", op="TFRecordDataset", input=["files", "compression", "buffer"])
    return gated(graph_def, "records")


def pb_save(d: Path, canary: Path) -> graph_pb2.GraphDef:
    graph_def = plain_graph()
    const(graph_def, "prefix", str(canary / "ckpt"), STR)
    const(graph_def, "names", ["w"], STR)
    const(graph_def, "slices", [""], STR)
    node = graph_def.node.add(name="save", op="SaveV2", input=["prefix", "names", "slices", "w"])
    node.attr["dtypes"].list.type.append(F32)
    return gated(graph_def, "save")


def pb_merge_checkpoints(d: Path, canary: Path) -> graph_pb2.GraphDef:
    """MergeV2Checkpoints with delete_old_dirs deletes the directories of its source prefixes."""
    graph_def = plain_graph()
    const(graph_def, "sources", [str(canary / "keep.txt")], STR)
    const(graph_def, "dest", str(canary / "merged"), STR)
    node = graph_def.node.add(name="merge", op="MergeV2Checkpoints", input=["sources", "dest"])
    node.attr["delete_old_dirs"].b = True
    return gated(graph_def, "merge")


def pb_summary_writer(d: Path, canary: Path) -> graph_pb2.GraphDef:
    graph_def = plain_graph()
    graph_def.node.add(name="writer", op="SummaryWriter")
    const(graph_def, "logdir", str(canary), STR)
    const(graph_def, "queue", np.int32(1), tf.int32.as_datatype_enum)
    const(graph_def, "flush", np.int32(1), tf.int32.as_datatype_enum)
    const(graph_def, "suffix", ".evil", STR)
    graph_def.node.add(name="create", op="CreateSummaryFileWriter", input=["writer", "logdir", "queue", "flush", "suffix"])
    return gated(graph_def, "create")


def pb_upstream_write(d: Path, canary: Path) -> graph_pb2.GraphDef:
    """The write gates the conv's input, so that doctor --data (which fetches the BN's input) needs it."""
    return io_graph(canary / "new.txt", "write", upstream=True)


def write_graph(builder: Callable[[Path, Path], graph_pb2.GraphDef], suffix: str = ".pb") -> Callable[[Path, Path], Path]:
    def build(d: Path, canary: Path) -> Path:
        path = d / f"model{suffix}"
        graph_def = builder(d, canary)
        if suffix == ".pbtxt":
            from google.protobuf import text_format

            path.write_text(text_format.MessageToString(graph_def))
        else:
            path.write_bytes(graph_def.SerializeToString())
        return path

    return build


def feeds(d: Path) -> None:
    np.save(d / "x.npy", np.random.default_rng(0).standard_normal((4, 8, 8, 3)).astype(np.float32))


# -- SavedModel builders -----------------------------------------------------------------
class WritingCreator(tf.saved_model.experimental.TrackableResource):
    """A resource whose creator writes a file (run by tf.saved_model.load)."""

    def __init__(self, target: str) -> None:
        self.target = target
        super().__init__()

    def _create_resource(self) -> tf.Tensor:
        with tf.control_dependencies([tf.io.write_file(self.target, "pwned")]):
            return tf.raw_ops.HashTableV2(key_dtype=tf.string, value_dtype=tf.int64)


class WritingDestroyer(tf.saved_model.experimental.TrackableResource):
    """A resource whose destructor writes a file: it runs when the loaded object is freed."""

    def __init__(self, target: str) -> None:
        self.target = target
        super().__init__()

    def _create_resource(self) -> tf.Tensor:
        return tf.raw_ops.HashTableV2(key_dtype=tf.string, value_dtype=tf.int64)

    def _destroy_resource(self) -> tf.Operation:
        with tf.control_dependencies([tf.io.write_file(self.target, "pwned")]):
            return tf.raw_ops.DestroyResourceOp(resource=self.resource_handle)


class WritingRestorer(tf.Module):
    """A trackable whose checkpoint restore function writes a file (run while loading, even by --no-verify)."""

    def __init__(self, target: str) -> None:
        super().__init__()
        self.target = target

    def _serialize_to_tensors(self) -> dict[str, tf.Tensor]:
        return {"v": tf.constant(1.0)}

    def _restore_from_tensors(self, restored: dict[str, tf.Tensor]) -> tf.Operation:
        return tf.io.write_file(self.target, "pwned")


def sm_tf2(kind: str) -> Callable[[Path, Path], Path]:
    def build(d: Path, canary: Path) -> Path:
        target = str(canary / "new.txt")
        obj = {"initialize": EvilResource, "create": WritingCreator, "destroy": WritingDestroyer, "restore": WritingRestorer}[kind](target)
        return saved_model(d / "sm", obj)

    return build


def sm_tf2_signature(d: Path, canary: Path) -> Path:
    """The serving function itself writes (loading does not run it; the check would)."""
    module = tf.Module()
    module.w = tf.Variable(np.full((3,), 2.0, np.float32))
    target = str(canary / "new.txt")

    @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32)])
    def serve(x: tf.Tensor) -> dict[str, tf.Tensor]:
        with tf.control_dependencies([tf.io.write_file(target, "pwned")]):
            return {"y": x * module.w}

    module.f = serve
    tf.saved_model.save(module, str(d / "sm"), signatures=serve)
    return d / "sm"


def sm_tf2_spliced(d: Path, canary: Path) -> Path:
    """A function spliced into a TF2 SavedModel's library that nothing names."""
    path = saved_model(d / "sm", tf.Module())
    proto = read_saved_model(path)
    graph_def = graph_pb2.GraphDef()
    evil_function(graph_def, canary / "new.txt", "__inference_spliced_1")
    proto.meta_graphs[0].graph_def.library.function.extend(graph_def.library.function)
    (path / "saved_model.pb").write_bytes(proto.SerializeToString())
    return path


def read_saved_model(path: Path) -> saved_model_pb2.SavedModel:
    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString((path / "saved_model.pb").read_bytes())
    return proto


def tf1_saved_model(path: Path) -> Path:
    """A TF1 SavedModel (Builder, a saver, a variable): what tf.saved_model.load reads through load_v1_in_v2."""
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, 8, 8, 3], name="x")
        scale = tf.compat.v1.Variable(np.full((4,), 1.5, np.float32), name="scale", use_resource=False)
        y = tf.identity(conv_bn(x) * scale, name="output")
        with tf.compat.v1.Session(graph=graph) as session:
            session.run(tf.compat.v1.global_variables_initializer())
            builder = tf.compat.v1.saved_model.Builder(str(path))
            signature = tf.compat.v1.saved_model.predict_signature_def({"x": x}, {"y": y})
            builder.add_meta_graph_and_variables(session, ["serve"], signature_def_map={"serving_default": signature})
            builder.save()
    return path


def sm_tf1(kind: str) -> Callable[[Path, Path], Path]:
    def build(d: Path, canary: Path) -> Path:
        path = tf1_saved_model(d / "sm")
        proto = read_saved_model(path)
        meta = proto.meta_graphs[0]
        graph_def = meta.graph_def
        if kind == "restore_read":  # the restore op reads a checkpoint the file chose, not its own variables
            const(graph_def, "elsewhere", str(canary / "ckpt"), STR)
            restore = next(n for n in graph_def.node if n.op == "RestoreV2")
            restore.input[0] = "elsewhere"
        else:
            name = write_node(graph_def, canary / "new.txt")
            if kind == "restore":
                group = graph_def.node.add(name="evil_restore", op="NoOp", input=[f"^{name}", f"^{meta.saver_def.restore_op_name}"])
                meta.saver_def.restore_op_name = group.name
            elif kind in ("table_initializer", "legacy_init_op", "saved_model_main_op"):
                meta.collection_def[kind].node_list.value.append(name)
            elif kind == "init_signature":
                signature = meta.signature_def["__saved_model_init_op"]
                signature.outputs["__saved_model_init_op"].name = name
            elif kind == "local_variable":
                variable = variable_pb2.VariableDef(variable_name="scale:0", initializer_name=name, snapshot_name="scale/read:0")
                meta.collection_def["local_variables"].bytes_list.value.append(variable.SerializeToString())
        (path / "saved_model.pb").write_bytes(proto.SerializeToString())
        return path

    return build


# -- Keras builders ------------------------------------------------------------------------
def keras_file(suffix: str, module_name: str = "keras") -> tuple[Callable[[Path], Path], Callable[[Path, Callable[[dict], None]], None]]:
    """A small Dense -> BN model saved as ``suffix``, and a function that rewrites its config (read as bytes, never loaded)."""

    def save(d: Path) -> Path:
        module = keras if module_name == "keras" else pytest.importorskip("tf_keras")
        inputs = module.Input((4,), name="x")
        y = module.layers.BatchNormalization(name="bn")(module.layers.Dense(3, name="dense")(inputs))
        path = d / f"model{suffix}"
        module.Model(inputs, y).save(path)
        return path

    def patch(path: Path, change: Callable[[dict], None]) -> None:
        if path.suffix == ".keras":
            with zipfile.ZipFile(path) as archive:
                members = {name: archive.read(name) for name in archive.namelist()}
            config = json.loads(members["config.json"])
            change(config)
            members["config.json"] = json.dumps(config).encode()
            with zipfile.ZipFile(path, "w") as archive:
                for name, data in members.items():
                    archive.writestr(name, data)
        else:
            with h5py.File(path, "r+") as handle:
                raw = handle.attrs["model_config"]
                config = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
                change(config)
                handle.attrs["model_config"] = json.dumps(config).encode()

    return save, patch


def layers_of(config: dict) -> list[dict]:
    return config["config"]["layers"]


def keras_case(suffix: str, module_name: str, entry: Callable[[Path], dict], where: str = "layer") -> Callable[[Path, Path], Path]:
    """Put ``entry`` (built from the canary path) into the config: as a new layer, or as the Dense layer's activation."""
    save, patch = keras_file(suffix, module_name)

    def build(d: Path, canary: Path) -> Path:
        path = save(d)
        item = entry(canary)

        def change(config: dict) -> None:
            layers = layers_of(config)
            if where == "layer":
                layers.append(item)
            else:
                dense = next(layer for layer in layers if layer["class_name"] == "Dense")
                dense["config"][where] = item

        patch(path, change)
        return path

    return build


def tf_op_layer(class_name: str, config: dict) -> Callable[[Path], dict]:
    """A tf_keras op layer fed by the model's input (the call arguments come from the file too)."""

    def entry(canary: Path) -> dict:
        filled = json.loads(json.dumps(config).replace("CANARY", str(canary)))
        return {
            "class_name": class_name,
            "config": {"name": "evil", "trainable": True, "dtype": "float32", **filled},
            "name": "evil",
            "inbound_nodes": [[["x", 0, 0, {"name": str(canary / "copied.txt")}]]],
        }

    return entry


def keras_lambda(module_name: str, suffix: str) -> Callable[[Path, Path], Path]:
    def build(d: Path, canary: Path) -> Path:
        module = keras if module_name == "keras" else pytest.importorskip("tf_keras")
        model = lambda_model(module, canary / "new.txt")
        path = d / f"model{suffix}"
        model.save(path)  # type: ignore[attr-defined]
        (canary / "new.txt").unlink(missing_ok=True)  # building ran the lambda here, in the test
        return path

    return build


def keras_wrapped_lambda(d: Path, canary: Path) -> Path:
    target = str(canary / "new.txt")
    body = eval(f"lambda t: (__import__('pathlib').Path({target!r}).write_text('ran'), t)[1]")  # noqa: S307
    inputs = keras.Input((2, 4))
    y = keras.layers.TimeDistributed(keras.layers.Lambda(body, name="inner_lambda"), name="wrapper")(inputs)
    y = keras.layers.BatchNormalization()(keras.layers.Dense(3)(y))
    path = d / "model.keras"
    keras.Model(inputs, y).save(path)
    Path(target).unlink(missing_ok=True)
    return path


def k3(module: str, class_name: str, config: object, registered: object = None) -> Callable[[Path], dict]:
    def entry(canary: Path) -> dict:
        filled = json.loads(json.dumps(config).replace("CANARY", str(canary)))
        return {"module": module, "class_name": class_name, "config": filled, "registered_name": registered}

    return entry


def k3_layer(module: str, class_name: str, config: dict, registered: object = None) -> Callable[[Path], dict]:
    def entry(canary: Path) -> dict:
        item = k3(module, class_name, {"name": "evil", **config}, registered)(canary)
        item["name"] = "evil"
        item["inbound_nodes"] = [{"args": [{"class_name": "__keras_tensor__", "config": {"shape": [None, 3], "dtype": "float32", "keras_history": ["bn", 0, 0]}}], "kwargs": {}}]
        return item

    return entry


# -- ONNX builders -------------------------------------------------------------------------
def onnx_model(nodes: list[onnx.NodeProto], functions: list[onnx.FunctionProto] = (), domains: dict[str, int] | None = None) -> onnx.ModelProto:  # type: ignore[assignment]
    """x -> Conv -> BatchNormalization -> ``nodes`` (reading "bn", writing "y")."""
    rng = np.random.default_rng(0)
    inits = [
        onnx.numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
        *(onnx.numpy_helper.from_array(v.astype(np.float32), n) for n, v in (("g", rng.uniform(0.5, 2, 4)), ("b", rng.standard_normal(4)), ("m", rng.standard_normal(4)), ("v", rng.uniform(0.5, 2, 4)))),
    ]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["bn"]), *nodes],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
        inits,
    )
    opsets = [helper.make_opsetid("", 17), *(helper.make_opsetid(k, v) for k, v in (domains or {}).items())]
    return helper.make_model(graph, opset_imports=opsets, functions=list(functions), ir_version=8)


def onnx_save(model: Callable[[Path], onnx.ModelProto]) -> Callable[[Path, Path], Path]:
    def build(d: Path, canary: Path) -> Path:
        path = d / "model.onnx"
        path.write_bytes(model(canary).SerializeToString())
        return path

    return build


def function_with_constant(location: str) -> onnx.FunctionProto:
    """A local function y = x + c whose Constant c keeps its value in external data at ``location``."""
    tensor = onnx.TensorProto(name="c", data_type=TensorProto.FLOAT, dims=[1], data_location=TensorProto.EXTERNAL)
    tensor.external_data.add(key="location", value=location)
    return helper.make_function(
        "local", "AddConst", ["x"], ["y"],
        [helper.make_node("Constant", [], ["c"], value=tensor), helper.make_node("Add", ["x", "c"], ["y"])],
        [helper.make_opsetid("", 17)],
    )


def onnx_function_data(location: str) -> Callable[[Path, Path], Path]:
    def build(d: Path, canary: Path) -> Path:
        (canary / "secret.bin").write_bytes(np.float32(7.0).tobytes())
        (d / "link.bin").symlink_to(canary / "secret.bin")
        model = onnx_model([helper.make_node("AddConst", ["bn"], ["y"], domain="local")], [function_with_constant(location)], {"local": 1})
        path = d / "model.onnx"
        path.write_bytes(model.SerializeToString())
        return path

    return build


def custom_op(domain: str) -> Callable[[Path], onnx.ModelProto]:
    return lambda canary: onnx_model([helper.make_node("EvilOp", ["bn"], ["y"], domain=domain, path=str(canary))], domains={domain: 1})


def custom_in_function(canary: Path) -> onnx.ModelProto:
    function = helper.make_function("local", "Wrap", ["x"], ["y"], [helper.make_node("EvilOp", ["x"], ["y"], domain="com.evil")], [helper.make_opsetid("com.evil", 1)])
    return onnx_model([helper.make_node("Wrap", ["bn"], ["y"], domain="local")], [function], {"local": 1, "com.evil": 1})


# -- the cases -----------------------------------------------------------------------------
# -- budgets, inputs that are not files, outputs onto the input, odd input (classes 2-6) -----
def pb_file(make: Callable[[], graph_pb2.GraphDef], suffix: str = ".pb") -> Callable[[Path, Path], Path]:
    def build(d: Path, canary: Path) -> Path:
        path = d / f"model{suffix}"
        path.write_bytes(make().SerializeToString())
        return path

    return build


def fill_2e9() -> graph_pb2.GraphDef:
    return bn_model(lambda: first_two(tf.fill(tf.constant([1100000000, 2]), 1.0))).as_graph_def()


def matmul_chain() -> graph_pb2.GraphDef:
    def chain() -> tf.Tensor:
        m = tf.fill(tf.constant([8000, 8000]), 1e-4)
        for _ in range(40):
            m = tf.matmul(m, m)
        return first_two(m)

    return bn_model(chain).as_graph_def()


def const_1e10() -> graph_pb2.GraphDef:
    graph_def = bn_model(lambda: first_two(tf.constant(1.0, shape=[2], name="huge"))).as_graph_def()
    tensor = next(n for n in graph_def.node if n.name == "huge").attr["value"].tensor
    tensor.ClearField("tensor_content")
    del tensor.float_val[:]
    tensor.float_val.append(1.0)
    tensor.tensor_shape.dim[0].size = 10**10
    return graph_def


def placeholder_1e10() -> graph_pb2.GraphDef:
    return bn_model(lambda: tf.ones([2]), placeholder_shape=(100000, 100000, 1, 3)).as_graph_def()


def small() -> graph_pb2.GraphDef:
    return bn_model(lambda: tf.ones([2])).as_graph_def()


def identity_chain() -> graph_pb2.GraphDef:
    def chained() -> tf.Tensor:
        value = tf.constant(np.array([1.5, 0.5], np.float32))
        for i in range(10000):
            value = tf.identity(value, name=f"c{i}")
        return value

    return bn_model(chained).as_graph_def()


def invalid_utf8() -> graph_pb2.GraphDef:
    graph_def = small()
    next(n for n in graph_def.node if n.name == "bn").attr["data_format"].s = b"NH\xff\xfe"
    return graph_def


def nested_pbtxt(d: Path, canary: Path) -> Path:
    depth = 3000
    text = 'node { name: "c" op: "Const" attr { key: "value" value { list { '
    text += 'func { name: "f" attr { key: "a" value { ' * depth + "} } } " * depth + "} } } }"
    path = d / "deep.pbtxt"
    path.write_text(text)
    return path


def onnx_constant_of_shape(d: Path, canary: Path) -> Path:
    tail, inits = slice_two("big")
    make = helper.make_node("ConstantOfShape", ["shape"], ["big"], value=onnx.numpy_helper.from_array(np.ones(1, np.float32)))
    return onnx_bn([make, *tail], [onnx.numpy_helper.from_array(np.array([2_500_000_000], np.int64), "shape"), *inits], d / "cos.onnx")


def onnx_conv_transpose(d: Path, canary: Path) -> Path:
    tail, inits = slice_two("ct")
    big = onnx.numpy_helper.from_array(np.ones((1, 1, 2048, 2048), np.float32), "plane")
    return onnx_bn([helper.make_node("ConvTranspose", ["plane", "plane"], ["ct"]), *tail], [big, *inits], d / "ct.onnx")


def device(d: Path, canary: Path) -> Path:
    return Path("/dev/zero")


def fifo(d: Path, canary: Path) -> Path:
    path = d / "model.pb"
    os.mkfifo(path)
    return path


def newline_path(d: Path, canary: Path) -> Path:
    return d / "no\nsuch.pb"  # not there: the error line must show the newline escaped


def sm_variables_linked_out(d: Path, canary: Path) -> Path:
    """A SavedModel whose variables file is a link to the canary's copy of it: its values must never be read."""
    module = tf.Module()
    module.v = tf.Variable(np.ones((3, 4), np.float32))
    module.f = tf.function(lambda x: tf.matmul(x, module.v), input_signature=[tf.TensorSpec([None, 3], tf.float32)])
    export = d / "sm"
    tf.saved_model.save(module, str(export), signatures={"serving_default": module.f})
    for data in (export / "variables").glob("variables.data-*"):
        target = canary.parent / "elsewhere" / data.name  # beside the canary (prepare() renews the canary itself)
        target.parent.mkdir(exist_ok=True)
        shutil.move(data, target)
        data.symlink_to(target)
    return export



FOLD = Run(["fold", "{IN}", "{OUT}"], EXIT_UNSAFE)
INSPECT = Run(["inspect", "{IN}"], EXIT_UNSAFE)
DOCTOR = Run(["doctor", "{IN}"], EXIT_UNSAFE)
INSPECT_PB = Run(["inspect", "{IN}"], EXIT_OK)


def INSPECT_AS(code: int) -> Run:  # noqa: N802 - reads like the Run constants beside it
    return Run(["inspect", "{IN}"], code)
  # a frozen graph is read, never run: nothing to refuse
NO_VERIFY = Run(["fold", "{IN}", "{OUT}", "--no-verify"], EXIT_UNSAFE)
DATA = Run(["doctor", "{IN}", "--data", "{DIR}/x.npy"], EXIT_UNSAFE)
KERAS_OUT = Run(["fold", "{IN}", "{DIR}/out.keras"], EXIT_UNSAFE)  # the layer-level fold, loaded and checked in the worker
GRAPH = "code in a frozen graph"
FUNCTIONS = "function routes (values, calls, gradients)"
SAVED = "SavedModel loading runs more than the checked initializers"
KERAS = "Keras config names a callable"
ONNX_CLASS = "ONNX custom ops and function data"

CASES = [
    Case("pb-write-control", GRAPH, write_graph(pb_write_control), [FOLD, INSPECT_PB, Run(["fold", "{IN}", "{OUT}", "--no-verify"], EXIT_OK)], fires=True),
    Case("pbtxt-write-control", GRAPH, write_graph(pb_write_control, ".pbtxt"), [FOLD]),
    Case("pb-write-upstream-doctor-data", GRAPH, write_graph(pb_upstream_write), [DATA], extra=feeds),
    Case("pb-to-onnx-no-verify", GRAPH, write_graph(pb_write_control), [Run(["fold", "{IN}", "{DIR}/out.onnx", "--no-verify"], EXIT_UNSAFE)]),
    Case("pb-function-as-value", FUNCTIONS, write_graph(pb_function_value), [FOLD], fires=True),
    Case("pb-function-call", FUNCTIONS, write_graph(pb_function_call), [FOLD]),
    Case("pb-function-by-op-name", FUNCTIONS, write_graph(pb_function_by_op), [FOLD]),
    Case("pb-gradient-function", FUNCTIONS, write_graph(pb_gradient), [FOLD]),
    Case("pb-unreferenced-function", FUNCTIONS, write_graph(pb_unreferenced), [FOLD]),
    Case("pb-while-body", FUNCTIONS, write_graph(pb_while_body), [FOLD], fires=True),
    Case("pb-if-branch", FUNCTIONS, write_graph(pb_if_branch), [FOLD]),
    Case("pb-case-branch", FUNCTIONS, write_graph(pb_case_branch), [FOLD]),
    Case("pb-print-to-file", GRAPH, write_graph(pb_print_to_file), [FOLD]),
    Case("pb-immutable-const", GRAPH, write_graph(pb_immutable_const), [FOLD]),
    Case("pb-debug-identity", GRAPH, write_graph(pb_debug_identity), [FOLD]),
    Case("pb-matching-files", GRAPH, write_graph(pb_matching_files), [FOLD]),
    Case("pb-pyfunc", GRAPH, write_graph(pb_pyfunc), [FOLD]),
    Case("pb-unregistered-op", GRAPH, write_graph(pb_unknown_op), [FOLD]),
    Case("pb-file-dataset", GRAPH, write_graph(pb_dataset), [FOLD]),
    Case("pb-save-checkpoint", GRAPH, write_graph(pb_save), [FOLD]),
    Case("pb-merge-checkpoints-deletes", GRAPH, write_graph(pb_merge_checkpoints), [FOLD]),
    Case("pb-summary-writer", GRAPH, write_graph(pb_summary_writer), [FOLD]),
    Case("sm-resource-initialize", SAVED, sm_tf2("initialize"), [FOLD, INSPECT]),
    Case("sm-resource-create", SAVED, sm_tf2("create"), [INSPECT]),
    Case("sm-resource-destroy", SAVED, sm_tf2("destroy"), [INSPECT, DOCTOR], fires=True),
    Case("sm-restore-from-tensors", SAVED, sm_tf2("restore"), [NO_VERIFY, INSPECT], fires=True),
    Case("sm-serving-function-writes", SAVED, sm_tf2_signature, [FOLD]),
    Case("sm-spliced-library-function", SAVED, sm_tf2_spliced, [INSPECT]),
    Case("sm-tf1-saver-restore-op", SAVED, sm_tf1("restore"), [INSPECT, NO_VERIFY], fires=True),
    Case("sm-tf1-restore-elsewhere", SAVED, sm_tf1("restore_read"), [INSPECT]),
    Case("sm-tf1-table-initializer", SAVED, sm_tf1("table_initializer"), [INSPECT, DOCTOR], fires=True),
    Case("sm-tf1-legacy-init-op", SAVED, sm_tf1("legacy_init_op"), [INSPECT]),
    Case("sm-tf1-main-op", SAVED, sm_tf1("saved_model_main_op"), [INSPECT]),
    Case("sm-tf1-init-signature", SAVED, sm_tf1("init_signature"), [INSPECT]),
    Case("sm-tf1-local-variable-initializer", SAVED, sm_tf1("local_variable"), [INSPECT]),
    Case("h5-tf-keras-classmethod-copy", KERAS, keras_case(".h5", "tf_keras", tf_op_layer("ClassMethod", {"cls_symbol": "io.gfile", "method_name": "copy"})), [INSPECT, DOCTOR, FOLD]),
    Case("h5-tf-keras-classmethod-rmtree", KERAS, keras_case(".h5", "tf_keras", tf_op_layer("ClassMethod", {"cls_symbol": "io.gfile", "method_name": "rmtree"})), [DOCTOR]),
    Case("h5-tf-keras-tfoplambda-remove", KERAS, keras_case(".h5", "tf_keras", tf_op_layer("TFOpLambda", {"function": "io.gfile.remove"})), [INSPECT]),
    Case("h5-tf-keras-tfoplambda-write-file", KERAS, keras_case(".h5", "tf_keras", tf_op_layer("TFOpLambda", {"function": "compat.v1.io.write_file"})), [INSPECT]),
    Case("h5-tf-keras-slicing-rmtree", KERAS, keras_case(".h5", "tf_keras", tf_op_layer("SlicingOpLambda", {"function": "io.gfile.rmtree"})), [INSPECT]),
    Case("h5-tf-keras-instance-method", KERAS, keras_case(".h5", "tf_keras", tf_op_layer("InstanceMethod", {"attr_name": "__reduce_ex__"})), [INSPECT]),
    Case("h5-keras3-lambda", KERAS, keras_lambda("keras", ".h5"), [INSPECT, Run(["fold", "{IN}", "{DIR}/out.h5"], EXIT_UNSAFE)], fires=True),
    Case("h5-tf-keras-lambda", KERAS, keras_lambda("tf_keras", ".h5"), [DOCTOR]),
    Case("keras-lambda", KERAS, keras_lambda("keras", ".keras"), [INSPECT]),
    Case("keras-lambda-keras-out", KERAS, keras_lambda("keras", ".keras"), [KERAS_OUT, Run(["fold", "{IN}", "{DIR}/out.keras", "--dry-run"], EXIT_UNSAFE)], fires=True),
    Case("h5-tf-keras-lambda-h5-out", KERAS, keras_lambda("tf_keras", ".h5"), [Run(["fold", "{IN}", "{DIR}/out.h5"], EXIT_UNSAFE)], fires=True),
    Case("keras-lambda-in-wrapper", KERAS, keras_wrapped_lambda, [INSPECT]),
    Case("keras-get-file-cve-2025-8747", KERAS, keras_case(".keras", "keras", k3("keras.utils", "get_file", {"fname": "CANARY/new.txt", "origin": "file://CANARY/keep.txt"}), "activation"), [INSPECT]),
    Case("keras-enable-unsafe-cve-2025-9906", KERAS, keras_case(".keras", "keras", k3("keras.config", "function", "enable_unsafe_deserialization", "function"), "activation"), [INSPECT]),
    Case("keras-builtins-exec", KERAS, keras_case(".keras", "keras", k3("builtins", "function", "exec", "function"), "activation"), [INSPECT]),
    Case("keras-os-system", KERAS, keras_case(".keras", "keras", k3("os", "system", "touch CANARY/new.txt"), "activation"), [INSPECT]),
    Case("keras-file-utils-rmtree", KERAS, keras_case(".keras", "keras", k3("keras.src.utils.file_utils", "function", "rmtree", "function"), "kernel_initializer"), [INSPECT]),
    Case("keras-custom-registered", KERAS, keras_case(".keras", "keras", k3_layer("keras.layers", "Dense", {"units": 3}, "Custom>Evil")), [INSPECT]),
    Case("keras-lookup-vocabulary-file", KERAS, keras_case(".keras", "keras", k3_layer("keras.layers", "StringLookup", {"vocabulary": "CANARY/keep.txt"})), [INSPECT]),
    Case("keras-tfsm-layer", KERAS, keras_case(".keras", "keras", k3_layer("keras.layers", "TFSMLayer", {"filepath": "CANARY"})), [INSPECT]),
    Case("keras-serialized-lambda-activation", KERAS, keras_case(".keras", "keras", k3("keras", "__lambda__", {"code": "ZXZpbA==", "defaults": None, "closure": None}), "activation"), [INSPECT]),
    Case("keras-ops-callable", KERAS, keras_case(".keras", "keras", k3_layer("keras.src.ops.core", "Cond", {})), [INSPECT]),
    Case("onnx-custom-domain", ONNX_CLASS, onnx_save(custom_op("com.evil")), [INSPECT, DOCTOR, Run(["fold", "{IN}", "{DIR}/out.onnx", "--no-verify"], EXIT_UNSAFE)]),
    Case("onnx-contrib-domain", ONNX_CLASS, onnx_save(custom_op("com.microsoft")), [INSPECT]),
    Case("onnx-custom-domain-onnx-out", ONNX_CLASS, onnx_save(custom_op("com.evil")), [Run(["fold", "{IN}", "{DIR}/out.onnx"], EXIT_UNSAFE)]),
    Case("onnx-custom-op-in-function", ONNX_CLASS, onnx_save(custom_in_function), [INSPECT]),
    Case("onnx-function-data-outside", ONNX_CLASS, onnx_function_data("../canary/secret.bin"), [Run(["inspect", "{IN}"], EXIT_INPUT)]),
    Case("onnx-function-data-link-out", ONNX_CLASS, onnx_function_data("link.bin"), [Run(["inspect", "{IN}"], EXIT_INPUT)]),
    Case("onnx-function-data-from-cwd", ONNX_CLASS, onnx_function_data("secret.bin"), [Run(["inspect", "{IN}"], EXIT_INPUT)]),
]


BUDGET = "no budget on constant evaluation"
FILES = "files outside the model"
NOT_FILES = "inputs that are not files"
ONTO_INPUT = "the input overwritten"
ODD = "internal errors on valid or odd input"
CASES += [
    Case("budget-fill-2e9", BUDGET, pb_file(fill_2e9), [Run(["inspect", "{IN}"], EXIT_OK, "2.2e+09 elements"), Run(["fold", "{IN}", "{OUT}", "--no-verify"], EXIT_OK)]),
    Case("budget-matmul-chain", BUDGET, pb_file(matmul_chain), [Run(["inspect", "{IN}"], EXIT_OK, "FLOPs")]),
    Case("budget-const-1e10", BUDGET, pb_file(const_1e10), [Run(["inspect", "{IN}"], EXIT_OK, "1e+10 elements")]),
    Case("budget-placeholder-1e10", BUDGET, pb_file(placeholder_1e10), [Run(["fold", "{IN}", "{OUT}"], EXIT_VERIFY)]),
    Case("budget-onnx-constant-of-shape", BUDGET, onnx_constant_of_shape, [Run(["inspect", "{IN}"], EXIT_OK, "2.5e+09 elements")]),
    Case("budget-onnx-conv-transpose", BUDGET, onnx_conv_transpose, [Run(["inspect", "{IN}"], EXIT_OK, "FLOPs")]),
    Case("sm-variables-linked-out", FILES, sm_variables_linked_out, [INSPECT_AS(EXIT_INPUT), Run(["fold", "{IN}", "{OUT}"], EXIT_INPUT)]),
    Case("input-device", NOT_FILES, device, [Run(["fold", "{IN}", "{OUT}"], EXIT_INPUT)]),
    Case("input-fifo", NOT_FILES, fifo, [Run(["fold", "{IN}", "{OUT}"], EXIT_INPUT), INSPECT_AS(EXIT_INPUT), Run(["doctor", "{IN}"], EXIT_INPUT)]),
    Case("output-onto-input", ONTO_INPUT, pb_file(small), [Run(["fold", "{IN}", "{OUT}", "--report", "{IN}"], EXIT_OUTPUT), Run(["doctor", "{IN}", "--json", "{IN}"], EXIT_OUTPUT)]),
    Case("odd-identity-chain-10000", ODD, pb_file(identity_chain), [Run(["fold", "{IN}", "{OUT}", "--no-verify"], EXIT_OK)]),
    Case("odd-pbtxt-nested-3000", ODD, nested_pbtxt, [INSPECT_AS(EXIT_INPUT)]),
    Case("odd-invalid-utf8-attribute", ODD, pb_file(invalid_utf8), [Run(["inspect", "{IN}"], EXIT_OK, "data_format")]),
    Case("odd-negative-input-shape", ODD, pb_file(small), [Run(["fold", "{IN}", "{OUT}", "--input-shape", "x=-1,4,4,3"], EXIT_USAGE)]),
    Case("odd-newline-in-path", ODD, newline_path, [Run(["fold", "{IN}", "{OUT}"], EXIT_INPUT)]),
]

# What the one error line must name (the node, op or layer the attack sits in), as users run bnfold.
CULPRITS = {
    **dict.fromkeys(["pb-write-control", "pbtxt-write-control", "pb-write-upstream-doctor-data", "pb-to-onnx-no-verify"], "'evil' (WriteFile)"),
    **dict.fromkeys(["pb-function-as-value", "pb-function-call", "pb-function-by-op-name", "pb-gradient-function", "pb-unreferenced-function"], "Evil/hidden_write' (WriteFile)"),
    **dict.fromkeys(["pb-while-body", "pb-if-branch", "pb-case-branch"], "(WriteFile)"),
    "pb-print-to-file": "(PrintV2)",
    "pb-immutable-const": "(ImmutableConst)",
    "pb-debug-identity": "(DebugIdentity)",
    "pb-matching-files": "(MatchingFiles)",
    "pb-pyfunc": "(PyFunc)",
    "pb-unregistered-op": "(EvilCustomOpFromALoadedLibrary)",
    "pb-file-dataset": "(TFRecordDataset)",
    "pb-save-checkpoint": "(SaveV2)",
    "pb-merge-checkpoints-deletes": "(MergeV2Checkpoints)",
    "pb-summary-writer": "Summary",
    **dict.fromkeys(["sm-resource-initialize", "sm-resource-create", "sm-resource-destroy", "sm-restore-from-tensors", "sm-serving-function-writes"], "(WriteFile)"),
    "sm-spliced-library-function": "__inference_spliced_1/hidden_write",
    **dict.fromkeys(["sm-tf1-saver-restore-op", "sm-tf1-table-initializer", "sm-tf1-legacy-init-op", "sm-tf1-main-op", "sm-tf1-init-signature", "sm-tf1-local-variable-initializer"], "'evil' (WriteFile)"),
    "sm-tf1-restore-elsewhere": "(RestoreV2)",
    "h5-keras3-lambda": "'evil_lambda'",
    "h5-tf-keras-lambda": "'evil_lambda'",
    "keras-lambda": "'evil_lambda'",
    "keras-lambda-keras-out": "'evil_lambda'",
    "h5-tf-keras-lambda-h5-out": "'evil_lambda'",
    "keras-lambda-in-wrapper": "'inner_lambda'",
    **dict.fromkeys([c for c in ("onnx-custom-domain", "onnx-contrib-domain", "onnx-custom-op-in-function", "onnx-custom-domain-onnx-out")], "EvilOp"),
    "onnx-function-data-outside": "outside the model's directory",
    "onnx-function-data-link-out": "a link out of the model's directory",
    "onnx-function-data-from-cwd": "no such file beside the model",
    "budget-placeholder-1e10": "--input-shape",
    "sm-variables-linked-out": "links outside the SavedModel",
    "input-device": "is a device",
    "input-fifo": "is a FIFO",
    "output-onto-input": "is the input",
    "odd-pbtxt-nested-3000": "nested too deeply",
    "odd-negative-input-shape": "--input-shape",
    "odd-newline-in-path": "no\\nsuch.pb",
}


def culprit(case: Case) -> str:
    """The attack's node or layer: named in CULPRITS, else the layer the Keras builders call 'evil' or the patched Dense."""
    if case.name in CULPRITS:
        return CULPRITS[case.name]
    patched_dense = ("get-file", "enable-unsafe", "builtins-exec", "os-system", "file-utils", "lambda-activation")
    return "layer 'dense'" if any(p in case.name for p in patched_dense) else "'evil'"


@pytest.fixture(params=["allowlist", "sandbox-alone"])
def layers(request: pytest.FixtureRequest) -> dict[str, str]:
    """The environment of the bnfold processes: as users run it, or with the allowlist off (test-only switch)."""
    if request.param == "allowlist":
        return {}
    if importlib.util.find_spec("bnfold.core.sandbox") is None:
        pytest.skip("sandbox not merged yet: the allowlist-off run needs bnfold.core.sandbox")
    return {DISABLE_ENV: "1"}


def prepare(case: Case, tmp_path: Path) -> tuple[Path, Path, Path]:
    d = tmp_path / "work"
    d.mkdir()
    canary = tmp_path / "canary"
    canary.mkdir()
    model = case.build(d, canary)
    gc.collect()  # a destructor the test built (WritingDestroyer) runs here, in the test, not in bnfold
    shutil.rmtree(canary)  # building may have fired the attack in the test process: the canary starts afresh
    canary.mkdir()
    (canary / "keep.txt").write_text("precious")
    if case.name.startswith("onnx-function-data"):
        (canary / "secret.bin").write_bytes(np.float32(7.0).tobytes())
    if case.extra:
        case.extra(d)
    return d, canary, model


def fill(args: list[str], model: Path, d: Path) -> list[str]:
    return [a.replace("{IN}", str(model)).replace("{OUT}", str(d / "out.pb")).replace("{DIR}", str(d)) for a in args]


def test_case_count() -> None:
    assert len(CASES) >= 40
    assert len({c.name for c in CASES}) == len(CASES)
    assert set(CULPRITS) <= {c.name for c in CASES}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_model(case: Case, layers: dict[str, str], tmp_path: Path) -> None:
    d, canary, model = prepare(case, tmp_path)
    before_canary, before_model = snapshot(canary), snapshot(model)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "secret.bin").write_bytes(np.float32(7.0).tobytes())  # what a CWD-relative read would pick up
    for run in case.runs:
        args = fill(run.args, model, d)
        before_work = set(snapshot(d))
        result = bnfold_process(args, cwd, layers)
        lines = stderr_lines(result)
        assert "Traceback" not in result.stderr, result.stderr
        if layers:  # the sandbox alone: any documented outcome, as long as nothing got out
            assert result.returncode in DOCUMENTED, (args, result.stderr)
        else:
            assert result.returncode == run.code, (args, result.returncode, result.stderr)
            if result.returncode != 0:
                assert culprit(case) in result.stderr, (culprit(case), result.stderr)
            if run.says is not None:
                assert run.says in result.stdout + result.stderr, (run.says, result.stdout, result.stderr)
        if result.returncode != 0:
            assert len(lines) == 1 and lines[0].startswith("bnfold: error:"), lines
            assert set(snapshot(d)) == before_work, "a refused run left files behind"
        else:
            assert len(lines) <= 1, lines
        assert snapshot(canary) == before_canary, f"{case.name}: the canary was touched by {args}"
        assert snapshot(model) == before_model, f"{case.name}: the input changed"


FIRING = [c for c in CASES if c.fires]


@pytest.mark.parametrize("case", FIRING, ids=[c.name for c in FIRING])
def test_attack_is_real(case: Case, tmp_path: Path) -> None:
    """With --trust-model (the allowlist lifted) the attack does fire: only bnfold's layers stopped it above.

    ``--trust-model`` lifts the allowlist, not the confinement: the attack then runs
    in the worker, where Landlock denies the write (TensorFlow's "Permission
    denied" for the canary's path is in the error line, where the route reports
    errors at all; a resource destructor's failure is swallowed by TensorFlow).
    Without Landlock nothing else stands in its way, and the canary is hit.
    """
    from bnfold.core import sandbox

    d, canary, model = prepare(case, tmp_path)
    before = snapshot(canary)
    run = case.runs[0]
    result = bnfold_process([*fill(run.args, model, d), "--trust-model"], tmp_path, {}, fresh=True)
    assert "Traceback" not in result.stderr, result.stderr
    if sandbox.landlock_abi() <= 0:
        assert snapshot(canary) != before, (case.name, result.returncode, result.stderr)
        return
    assert snapshot(canary) == before, (case.name, result.returncode, result.stderr)
    evidence = CONTAINED_EVIDENCE.get(case.name, "Permission denied")
    if evidence is not None:
        assert result.returncode != 0 and evidence in result.stderr, (case.name, result.returncode, result.stderr)
        assert len(stderr_lines(result)) == 1, result.stderr


# What the error line shows when the sandbox stopped a trusted attack: TensorFlow's "Permission denied" unless the
# route wraps it (Keras reports the Lambda's failure by the layer) or swallows it (a resource destructor).
CONTAINED_EVIDENCE: dict[str, str | None] = {
    "h5-keras3-lambda": "Lambda.call",
    "keras-lambda-keras-out": "Lambda.call",  # the Keras-to-Keras fold loads the model in the worker: Keras' shape inference runs the Lambda there
    "h5-tf-keras-lambda-h5-out": "evil_lambda",
    "sm-resource-destroy": None,
}


def test_function_constant_data_is_read_beside_the_model(tmp_path: Path) -> None:
    """A model-local function's Constant with external data takes its value from the model's directory, not the CWD."""
    from bnfold.onnx.io import load_onnx

    d = tmp_path / "model"
    d.mkdir()
    (d / "c.bin").write_bytes(np.float32(2.0).tobytes())
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "c.bin").write_bytes(np.float32(7.0).tobytes())
    model = onnx_model([helper.make_node("AddConst", ["bn"], ["y"], domain="local")], [function_with_constant("c.bin")], {"local": 1})
    path = d / "m.onnx"
    path.write_bytes(model.SerializeToString())
    old = os.getcwd()
    os.chdir(cwd)
    try:
        loaded, external = load_onnx(path)
    finally:
        os.chdir(old)
    assert external
    constant = loaded.functions[0].node[0].attribute[0].t
    assert onnx.numpy_helper.to_array(constant).tolist() == [2.0]
    result = bnfold_process(["fold", str(path), str(tmp_path / "out.onnx")], cwd, {})
    assert result.returncode == 0, result.stderr
