"""``bnfold IN out.onnx``: fold, convert with tf2onnx, fold again on the ONNX side, check in onnxruntime.

The TF fold runs first (as for ``.pb`` output), tf2onnx converts the folded
graph, and :mod:`bnfold.onnx.fold` removes what tf2onnx's own patterns leave
behind. The result is checked with ``onnx.checker`` and run in onnxruntime with
graph optimizations *disabled* against the original TensorFlow graph, so the
check proves the file itself is folded and correct, not that a runtime happens
to fold it at load time. ONNX input (``bnfold in.onnx out.onnx``) skips the TF
stages and compares original and folded ONNX, both in onnxruntime.

Names: tf2onnx's default is kept, so TF tensor ``x:0`` (node ``x``) is ONNX
input/output ``x:0``. ``input_names``/``output_names`` in the report map each.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, TYPE_CHECKING, Any

import numpy as np
import onnx

from bnfold.core import serve
from bnfold.core.comparison import CheckOptions, compare_runners, parse_input
from bnfold.core.errors import InputError, UsageError, first_line
from bnfold.core.protocol import send
from bnfold.core.result import FoldResult, OnnxStage
from bnfold.core.trust import trusting
from bnfold.onnx.fold import fold_model
from bnfold.onnx.io import OrtRunner, op_counts
from bnfold.onnx.pipeline import check_output_model, raise_if_failed

if TYPE_CHECKING:
    from tensorflow.core.framework import graph_pb2

# tf2onnx 1.17 prefers opset 15 and converts up to 18; 17 is the newest that every
# onnxruntime >= 1.14 and most edge runtimes (TensorRT 8.6, OpenVINO, TFLite converters) load.
DEFAULT_OPSET = 17
MIN_OPSET, MAX_OPSET = 9, 18

Source = Any  # a tensorflow GraphDef, an onnx.ModelProto, or a path


def load_onnx(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Parse and check an ONNX file (external data read beside it); see :func:`bnfold.onnx.io.load_onnx`."""
    from bnfold.onnx.io import load_onnx as load

    return load(path)[0]


@contextmanager
def _quiet_converter():  # type: ignore[no-untyped-def]
    """tf2onnx logs every pass at INFO and TF warns about its deprecated freeze API; keep bnfold's output readable."""
    loggers = [logging.getLogger(n) for n in ("tf2onnx", "tensorflow")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def convert(graph_def: graph_pb2.GraphDef, inputs: list[str], outputs: list[str], opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """tf2onnx's own converter on a frozen graph; ``inputs``/``outputs`` are TF node or tensor names.

    The stages are tf2onnx's (grappler, ``process_tf_graph``, its ONNX optimizers,
    ``make_model``), called the way :func:`_convert_lean` says, without the copies
    that made conversion cost more time and memory than the fold itself. Where one
    of tf2onnx's optimizers fails, the conversion is redone by
    ``tf2onnx.convert.from_graph_def``, which skips a failing optimizer.
    """
    in_tensors, out_tensors = [tensor_name(n) for n in inputs], [tensor_name(n) for n in outputs]
    with _quiet_converter(), _collecting_only_new_objects():
        try:
            model = _convert_lean(graph_def, in_tensors, out_tensors, opset)
            if model is None:
                import tf2onnx

                model, _ = tf2onnx.convert.from_graph_def(graph_def, input_names=in_tensors, output_names=out_tensors, opset=opset)
        except Exception as exc:  # noqa: BLE001 - tf2onnx raises bare ValueError/RuntimeError/AssertionError for graphs it cannot convert
            raise InputError(f"tf2onnx cannot convert the graph at opset {opset}: {first_line(exc)}; try another --opset") from None
        finally:
            gc.collect()  # tf2onnx's graphs are reference cycles holding every weight: free them before the next stage
    return model


def convert_confined(graph_def: graph_pb2.GraphDef, inputs: list[str], outputs: list[str], opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """:func:`convert` in bnfold's confined worker (:mod:`bnfold.core.worker`): tf2onnx runs grappler's constant
    folding, which evaluates the graph's ops. The GraphDef's bytes go in, the ONNX model's bytes come back; a
    model past 2 GB comes back as a file with external data in the worker's private directory."""
    from bnfold.core import worker as isolation

    if serve.in_worker():
        return convert(graph_def, inputs, outputs, opset)
    header = {"op": CONVERT, "inputs": list(inputs), "outputs": list(outputs), "opset": opset}
    worker = isolation.acquire()
    try:
        head, body = worker.request(header, graph_def.SerializeToString())
        if not head.get("path"):
            return onnx.ModelProto.FromString(body)
        from bnfold.core.trust import trusting

        where = os.path.realpath(worker.limits.private_dir)
        path = os.path.realpath(str(head["path"]))
        if os.path.commonpath([where, path]) != where:
            raise InputError("tf2onnx's worker answered with a path outside its directory")
        with trusting(True):  # tf2onnx's output, taken as the bytes route takes it
            return load_onnx(path)
    except isolation.GraphRunError as exc:
        raise isolation.as_bnfold_error(
            exc, lambda text: InputError(f"tf2onnx cannot convert the graph at opset {opset}: {text}; try another --opset")
        ) from None
    except isolation.WorkerDied as exc:
        exc.engine = "tf2onnx"
        raise InputError(f"converting the graph with tf2onnx ended bnfold's worker: {exc.describe()}") from None
    except BaseException:
        worker.stop()  # interrupted halfway through the exchange
        raise
    finally:
        isolation.release(worker)  # a worker that died or was stopped is stopped again, harmlessly


def _convert_lean(graph_def: graph_pb2.GraphDef, inputs: list[str], outputs: list[str], opset: int) -> onnx.ModelProto | None:
    """``tf2onnx.convert.from_graph_def`` without its waste; None where an ONNX optimizer failed.

    Profiled on bnfold's folded keras.applications ResNet50 (103 MB),
    ``from_graph_def`` took 12.7 s and peaked at 7.8 GB RSS; ``optimize_graph`` was
    9.4 s and 5.7 GB of that (``python -m tf2onnx.convert`` on the unfolded graph:
    11.5 of 21 s, 5.9 GB), for two reasons:

    - each of its 12 optimizers, in each of 2 rounds, runs on a ``copy.deepcopy``
      of the whole graph, weights included, so that a failing optimizer can be
      skipped (``catch_errors``), and the discarded copies are reference cycles
      that wait for the garbage collector;
    - after each optimizer ``Graph.update_proto`` rebuilds every node's
      ``NodeProto``, and for a ``Const`` node that copies its weight into the
      proto's arena again: with upb protobuf, a cleared repeated field does not
      give its memory back until the message is freed, so each round leaked one
      more copy of every weight (24 x 100 MB), and the copying itself was 4.1 s of
      the 4.9 s that ``optimize_graph`` took even without the deep copies
      (cProfile: ``RepeatedCompositeContainer.extend``).

    Here the optimizers run in place (``catch_errors=False``; on an exception the
    caller redoes the conversion the stock way), and ``Const`` nodes' protos are
    not rebuilt: :meth:`tf2onnx.graph.Graph.make_graph` writes a ``Const`` as an
    initializer from ``node.attr``, never from its ``NodeProto``, so the bytes of
    those protos never reach the model (tests compare the result with
    ``from_graph_def``'s). ``from_graph_def`` also imports the graph into a TF
    session and freezes it, then discards the frozen copy (it optimizes the graph
    it was given); that step is skipped, and the inputs it would filter out
    (resource-typed placeholders) are read from the GraphDef.
    """
    import tensorflow as tf
    from tf2onnx import optimizer, tf_loader
    from tf2onnx.tfonnx import process_tf_graph

    inputs = [n for n in inputs if not _is_resource_placeholder(graph_def, n)]
    with tf.device("/cpu:0"):
        with tf.Graph().as_default():
            optimized = tf_loader.tf_optimize(inputs, outputs, graph_def)
        with tf.Graph().as_default() as tf_graph:
            tf.import_graph_def(optimized, name="")
            del optimized
            graph = process_tf_graph(tf_graph, continue_on_error=True, opset=opset, input_names=inputs, output_names=outputs)
        del tf_graph
        gc.collect()  # the TF graph and its C++ copy of the weights
        _skip_const_protos(graph)
        try:
            graph = optimizer.optimize_graph(graph, catch_errors=False)
        except Exception:  # noqa: BLE001 - an optimizer failed on a graph it may have half edited
            return None
        _skip_const_protos(graph)  # in case an optimizer returned another graph object
        model = graph.make_model("converted from unknown")  # from_graph_def's doc string
        del graph.update_proto  # break the cycle so the graph goes with the next collection
    return model


@contextmanager
def _collecting_only_new_objects() -> Iterator[None]:
    """Let ``gc.collect()`` inside the block visit only objects created in it.

    tf2onnx's graphs (nodes point to their graph) and TF's are reference cycles,
    so their weights wait for a full collection; with TensorFlow imported a full
    collection walks millions of objects (0.3-0.6 s each on 2 cores). Freezing the
    objects that exist when the conversion starts keeps each collection to what
    the conversion made. Objects someone else froze are left as they are.
    """
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _skip_const_protos(graph: Any) -> None:
    """Make ``graph.update_proto()`` rebuild the protos of all nodes but ``Const``s (see :func:`_convert_lean`).

    Only this graph instance changes, not tf2onnx's classes; a graph an optimizer
    creates anew gets tf2onnx's own method, which is slower but equal.
    """

    def update_proto(external_tensor_storage: Any = None) -> None:
        for node in graph.get_nodes():
            if not node.is_const():
                node.update_proto(external_tensor_storage)

    graph.update_proto = update_proto


def _is_resource_placeholder(graph_def: graph_pb2.GraphDef, tensor: str) -> bool:
    """What tf2onnx's ``inputs_without_resource`` drops, read from the node's ``dtype`` attribute."""
    from tensorflow.core.framework import types_pb2

    name = parse_input(tensor)[0]
    node = next((n for n in graph_def.node if n.name == name), None)
    if node is None or not node.op.startswith("Placeholder") or "dtype" not in node.attr:
        return False
    return bool(node.attr["dtype"].type == types_pb2.DT_RESOURCE)


def tensor_name(ref: str) -> str:
    """``x`` -> ``x:0``: tf2onnx names ONNX inputs and outputs after TF tensors."""
    name, index, _ = parse_input(ref)
    return f"{name}:{index}"


def check_opset(opset: int) -> None:
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise UsageError(f"--opset {opset}: tf2onnx converts opsets {MIN_OPSET} to {MAX_OPSET} (default {DEFAULT_OPSET})")


def export_folded(result: FoldResult, opset: int, trust_model: bool) -> tuple[onnx.ModelProto, dict[str, str]]:
    """The folded TF graph in ``result`` as ONNX: tf2onnx in the confined worker, then the ONNX-side fold of what
    tf2onnx's own patterns left; ``result.onnx`` records that stage. Returns the model and TF -> ONNX tensor names."""
    from bnfold.tf.runsafety import check_runnable  # TF only here: the ONNX-only CLI imports this module without TensorFlow

    name, in_names, out_names = result.source, result.inputs, result.outputs
    if not out_names:
        raise InputError(f"{name}: the graph has no outputs; name them with --outputs")
    if not trust_model:  # tf2onnx runs grappler's constant folding, which evaluates ops (ReadFile of a constant path...)
        check_runnable(
            result.graph_def,
            out_names,
            f"{name}: converting to ONNX",
            hint="tf2onnx evaluates constant subgraphs with TensorFlow; --trust-model converts it anyway",
        )
    model = convert_confined(result.graph_def, in_names, out_names, opset)
    names = {n: tensor_name(n) for n in [*in_names, *out_names]}
    ops_before = op_counts(model)
    model, onnx_sites = fold_model(model, set(names.values()), in_place=True)  # tf2onnx's output is ours to edit
    result.onnx = OnnxStage(
        opset=opset,
        converter=f"tf2onnx {_tf2onnx_version()}",
        sites=onnx_sites,
        ops_before=ops_before,
        ops_after=op_counts(model),
        input_names={n: names[n] for n in in_names},
        output_names={n: names[n] for n in out_names},
    )
    check_output_model(model, name, result)
    return model, names


def check_against_graph(
    model: onnx.ModelProto, names: dict[str, str], graph_def: graph_pb2.GraphDef, result: FoldResult, check: CheckOptions, trust_model: bool
) -> None:
    """The ONNX file run in onnxruntime (optimizations off) against the original TF graph in TensorFlow.

    The original is fed the flags the TF stage resolved, and is compared after
    the moving-statistics rewrite when ``--training-bn`` made one (changed on
    purpose). Raises :class:`~bnfold.core.errors.VerificationError` on a
    difference unless ``check.force``.
    """
    from bnfold.tf.switches import use_moving_stats
    from bnfold.tf.verify import find_inputs, needed_inputs, open_graph_runner

    out_names = result.outputs
    if any(r.rewritten for r in result.training_bn):
        graph_def = use_moving_stats(graph_def)[0]
    fed = {parse_input(k)[0] for k in check.feeds}
    placeholders = {n.name for n in graph_def.node if n.op in ("Placeholder", "PlaceholderWithDefault")}
    flags = {r.flag: np.array(r.value) for r in result.switches if r.flag in placeholders and r.flag not in fed}
    check = dataclasses.replace(check, feeds={**flags, **check.feeds})
    needed = needed_inputs(graph_def, out_names, set())
    specs = [s for s in find_inputs(graph_def) if s.name in result.inputs]
    specs = [s for s in specs if s.name in needed or s.name in flags]
    with trusting(trust_model):
        result.verification = compare_runners(
            lambda: open_graph_runner(graph_def, "the input graph"),
            lambda: OrtRunner(model, names),
            {s.name: s for s in specs},
            out_names,
            check,
        )
    raise_if_failed(result, result.source, check.force)


def _tf2onnx_version() -> str:
    """From the package's metadata: tf2onnx itself is imported only by the worker that converts."""
    from importlib import metadata

    try:
        return metadata.version("tf2onnx")
    except metadata.PackageNotFoundError:
        import tf2onnx

        return str(tf2onnx.__version__)


def print_stage(result: Any, console: Any) -> None:
    """The ONNX stage as the same tables as the TF stage (sites, op counts), when there is one."""
    stage = getattr(result, "onnx", None)
    if stage is None or result.graph_def is None:
        return  # ONNX input: the main tables already are the ONNX stage
    from bnfold.core import report
    from bnfold.core.result import FoldResult

    view = FoldResult(
        graph_def=None,
        sites=stage.sites,
        inputs=list(stage.input_names.values()),
        outputs=list(stage.output_names.values()),
        ops_before=stage.ops_before,
        ops_after=stage.ops_after,
        source=f"ONNX from {stage.converter}, opset {stage.opset}",
    )
    if view.sites:
        console.print(report.sites_table(view))
    table = report.ops_table(view)
    table.title = "ONNX op counts (tf2onnx output -> written file)"
    console.print(table)
    names = ", ".join(f"{k} -> {v}" for k, v in {**stage.input_names, **stage.output_names}.items())
    console.print(f"ONNX names: {names}")


def serve_convert(state: serve.State, head: dict[str, Any], payload: bytes, reply: IO[bytes]) -> None:
    """tf2onnx's conversion of a folded GraphDef (:func:`bnfold.onnx.export.convert`), answered with the ONNX model's bytes;
    a model past protobuf's 2 GB is written with external data in the private directory instead, and its path answered."""
    from tensorflow.core.framework import graph_pb2

    from bnfold.onnx.export import convert
    from bnfold.onnx.io import serialize_within_limit

    graph_def = graph_pb2.GraphDef.FromString(payload)
    del payload
    model = convert(graph_def, list(head["inputs"]), list(head["outputs"]), int(head["opset"]))
    del graph_def
    data = serialize_within_limit(model)
    if data is not None:
        del model
        send(reply, {"ok": True}, data)
        return
    import onnx

    where = tempfile.mkdtemp(prefix="tf2onnx-")
    onnx.save_model(model, os.path.join(where, "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    send(reply, {"ok": True, "path": os.path.join(where, "model.onnx")})


CONVERT = f"{__name__}:serve_convert"
