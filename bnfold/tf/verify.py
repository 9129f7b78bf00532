"""Run frozen TensorFlow graphs for the check: the TF side of :mod:`bnfold.core.comparison`.

Both graphs run in TensorFlow on the same inputs and :func:`compare_runners`
compares them; the numpy-only comparison lives in :mod:`bnfold.core.comparison` so
that ONNX and Keras checks share it without importing TensorFlow.
"""

from __future__ import annotations

import contextvars
import dataclasses
import itertools
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import graph_pb2, node_def_pb2

from bnfold.core.comparison import (
    DEFAULT_BATCH,
    TOLERANCES,
    CheckArgs,
    CheckOptions,
    InputSpec,
    OutputCheck,
    ReferenceRun,
    Runner,
    Verification,
    compare,
    compare_runners,
    failure_message,
    parse_feed_value,
    run_candidate,
    run_reference,
)
from bnfold.core.errors import BnfoldError, BrokenOutputError, UsageError, VerificationError, first_line
from bnfold.core.worker import GraphRunError, WorkerDied
from bnfold.tf.canonical import output_dtype
from bnfold.tf.graph import GraphIndex, attr, parse_input
from bnfold.tf.runner import IsolatedGraph

if TYPE_CHECKING:
    from typing_extensions import Unpack


__all__ = [
    "DEFAULT_BATCH",
    "TOLERANCES",
    "CheckOptions",
    "GraphRunner",
    "InputSpec",
    "OutputCheck",
    "PendingCheck",
    "Runner",
    "Verification",
    "compare",
    "compare_runners",
    "failure_message",
    "find_inputs",
    "find_outputs",
    "needed_inputs",
    "open_graph_runner",
    "parse_feed_value",
    "verify",
]

NON_OUTPUT_OPS = {"Const", "NoOp", "Placeholder", "PlaceholderWithDefault", "Assert", "SaveV2", "RestoreV2"}


def find_inputs(graph_def: graph_pb2.GraphDef) -> list[InputSpec]:
    """The graph's placeholders, with their declared dtype and shape, read as TensorFlow reads them.

    Up to GraphDef producer 21 an empty ``shape {}`` meant "unknown", not
    "scalar" (TF 1.x graphs): feeding such a placeholder a scalar can abort TF.
    """
    from bnfold.tf.io import legacy_empty_shape_is_unknown

    legacy = legacy_empty_shape_is_unknown(graph_def)
    specs = []
    for node in graph_def.node:
        if node.op == "Placeholder":
            shape_proto = attr(node, "shape").shape
            unknown = shape_proto.unknown_rank or "shape" not in node.attr or (legacy and not shape_proto.dim)
            shape = None if unknown else [d.size if d.size >= 0 else None for d in shape_proto.dim]
            specs.append(InputSpec(node.name, numpy_dtype(attr(node, "dtype").type), shape))
    return specs


def numpy_dtype(dtype: int) -> np.dtype:
    """A TF dtype enum as numpy's dtype (strings and resources as ``object``)."""
    try:
        return np.dtype(tf.dtypes.as_dtype(dtype).as_numpy_dtype)
    except TypeError:
        return np.dtype(object)


def find_outputs(graph_def: graph_pb2.GraphDef) -> list[str]:
    """Sinks: nodes no other node reads data from, that compute something (an op without outputs, like WriteFile, is no output)."""
    read = {parse_input(ref)[0] for node in graph_def.node for ref in node.input if not ref.startswith("^")}
    return [n.name for n in graph_def.node if n.name not in read and n.op not in NON_OUTPUT_OPS and has_outputs(n, graph_def)]


def has_outputs(node: node_def_pb2.NodeDef, graph_def: graph_pb2.GraphDef) -> bool:
    """Whether a node produces a tensor, from the op registry (or the library function it calls).

    An output arg is empty when its list length attribute is 0 or its type list is
    empty (an ``If`` returning nothing); an op TF does not know is assumed to have outputs.
    """
    from tensorflow.python.framework import op_def_registry

    op_def = op_def_registry.get(node.op)
    if op_def is None:
        functions = {f.signature.name: f for f in graph_def.library.function}
        return node.op not in functions or len(functions[node.op].signature.output_arg) > 0
    for arg in op_def.output_arg:
        if arg.number_attr:
            if attr(node, arg.number_attr).i > 0 or arg.number_attr not in node.attr:
                return True
        elif arg.type_list_attr:
            if len(attr(node, arg.type_list_attr).list.type) > 0 or arg.type_list_attr not in node.attr:
                return True
        else:
            return True
    return False


def channels_first(graph_def: graph_pb2.GraphDef) -> bool:
    """Whether an op of the graph or of its function library may work channels-first (``NCHW``, ``NCDHW``).

    Decides whether the check needs grappler's layout pass (:func:`runner_config`).
    A ``data_format`` a function body takes from its caller (an attribute
    placeholder) counts as channels-first: unknown here, so the pass stays on.
    """
    bodies = (node for function in graph_def.library.function for node in function.node_def)
    for node in itertools.chain(graph_def.node, bodies):
        if "data_format" in node.attr:
            value = node.attr["data_format"]
            if value.placeholder or value.s.upper().startswith(b"NC"):
                return True
    return False


class GraphRunner:
    """One graph, loaded in a worker process (:mod:`bnfold.core.worker`) and reused across batches.

    The worker keeps an abort inside TensorFlow from killing bnfold: the run
    ends in :class:`GraphAborted` (exit 4), and nothing is written.
    Grappler is off but for its layout pass where the graph has a
    channels-first op (:func:`runner_config`): the check compares the graphs
    as written (as onnxruntime runs with optimizations off for ONNX), and
    grappler's other rewrites cost more than the run itself on large models
    (0.9 GB graph: 11 GB and 58 s with it, 5.9 GB and 10 s without).
    """

    errors: tuple[type[BaseException], ...] = (GraphRunError,)

    def __init__(self, graph_def: graph_pb2.GraphDef, which: str = "the graph", serialized: bytes | None = None) -> None:
        """``serialized``: ``graph_def.SerializeToString()`` when the caller has it already."""
        self.which = which
        self.graph_def = graph_def  # kept (not copied) for the run gate
        self.checked: set[tuple[str, ...]] = set()
        data = graph_def.SerializeToString() if serialized is None else serialized
        try:
            self.graph = IsolatedGraph(data, channels_first=channels_first(graph_def), reload=graph_def.SerializeToString)
        except WorkerDied as exc:
            raise self.died(exc) from None

    def died(self, exc: WorkerDied) -> BnfoldError:
        return GraphAborted(f"{exc.describe()} ({self.which}); if the graph is valid, report it to TensorFlow")

    def run(self, fetches: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        from bnfold.tf.runsafety import check_runnable, is_trusted

        if not is_trusted() and tuple(fetches) not in self.checked:  # the last line: callers check first, with their own hint
            check_runnable(self.graph_def, fetches, "running the graph")
            self.checked.add(tuple(fetches))
        names, fed = [_tensor_name(f) for f in fetches], {_tensor_name(k): v for k, v in feeds.items()}
        try:
            return self.graph.run(names, fed)
        except WorkerDied as exc:
            raise self.died(exc) from None

    def run_kept(
        self,
        fetches: list[str],
        feeds: dict[str, np.ndarray],
        stored: list[tuple[str, str, int, int]],
        stash: dict[str, str],
    ) -> tuple[list[np.ndarray], list[dict[str, Any]] | None]:
        """:meth:`run` with tensors kept in the worker between runs (:meth:`bnfold.core.worker.IsolatedGraph.run_kept`)."""
        from bnfold.tf.runsafety import check_runnable, is_trusted

        every = (*fetches, *stash)
        if not is_trusted() and every not in self.checked:
            check_runnable(self.graph_def, list(every), "running the graph")
            self.checked.add(every)
        names = [_tensor_name(f) for f in fetches]
        fed = {_tensor_name(k): v for k, v in feeds.items()}
        try:
            return self.graph.run_kept(
                names, fed, [(_tensor_name(t), key, a, b) for t, key, a, b in stored], {_tensor_name(f): key for f, key in stash.items()}
            )
        except WorkerDied as exc:
            raise self.died(exc) from None

    @property
    def generation(self) -> int:
        return self.graph.generation

    def drop(self, keys: list[str]) -> None:
        try:
            self.graph.drop(keys)
        except WorkerDied as exc:
            raise self.died(exc) from None

    def close(self) -> None:
        self.graph.close()


class GraphAborted(VerificationError):
    """TensorFlow aborted (a C++ check failure, SIGABRT) or was killed while running a graph: exit 4."""


def open_graph_runner(
    graph_def: graph_pb2.GraphDef, which: str, hint: str = "; --no-verify skips the check", serialized: bytes | None = None
) -> GraphRunner:
    """Load a graph for checking; a graph TF cannot load is reported, not a crash."""
    try:
        return GraphRunner(graph_def, which, serialized)
    except GraphRunner.errors as exc:
        raise VerificationError(f"TensorFlow cannot load {which} ({first_line(exc)}){hint}") from None


REPORT_BUG = "this is a bug in bnfold: please report it with the input model"


class FoldedGraphRunner(GraphRunner):
    """The folded graph, checked after the original ran: if it cannot load or run, bnfold broke it.

    That is exit 70 with a request to report it, never a hint to skip the check
    (skipping it would write the broken graph).
    """

    errors: tuple[type[BaseException], ...] = ()  # no failure of the folded graph is "the model cannot run here": the original just ran

    def __init__(self, graph_def: graph_pb2.GraphDef, serialized: bytes | None = None) -> None:
        try:
            super().__init__(graph_def, "the folded graph", serialized)
        except GraphRunner.errors as exc:
            raise BrokenOutputError(f"TensorFlow cannot load the folded graph ({first_line(exc)}); {REPORT_BUG}") from None

    def died(self, exc: WorkerDied) -> BnfoldError:
        return BrokenOutputError(f"{exc.describe()} (the folded graph, where the input graph ran); {REPORT_BUG}")

    def run(self, fetches: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        try:
            return super().run(fetches, feeds)
        except GraphRunner.errors as exc:
            raise BrokenOutputError(f"the folded graph fails to run where the input graph ran ({first_line(exc)}); {REPORT_BUG}") from None


def _tensor_name(ref: str) -> str:
    name, index, _ = parse_input(ref)
    return f"{name}:{index}"


def needed_inputs(graph_def: graph_pb2.GraphDef, outputs: list[str], fed: set[str]) -> set[str]:
    """Placeholders the outputs depend on, not counting those behind a fed tensor.

    Lets a user feed an internal tensor (``Mfcc:0``) in place of a string input
    that bnfold cannot synthesize.
    """
    nodes = {n.name: n for n in graph_def.node}
    stack = [parse_input(o)[0] for o in outputs]
    seen: set[str] = set()
    found: set[str] = set()
    while stack:
        name = stack.pop()
        if name in seen or name not in nodes:
            continue
        seen.add(name)
        if name in fed:
            continue
        node = nodes[name]
        if node.op == "Placeholder":
            found.add(name)
        stack.extend(parse_input(r)[0] for r in node.input)
    return found


def lowest_compute_precision(graph_def: graph_pb2.GraphDef) -> str | None:
    """``"bfloat16"``/``"float16"`` when some op of the graph computes in it (mixed precision), else None."""
    from tensorflow.core.framework import types_pb2

    seen = {n.attr["T"].type for n in graph_def.node if "T" in n.attr}
    if types_pb2.DT_BFLOAT16 in seen:
        return "bfloat16"
    return "float16" if types_pb2.DT_HALF in seen else None


def feedable_instead(graph_def: graph_pb2.GraphDef, outputs: list[str], source: str, fed: set[str], limit: int = 200) -> str | None:
    """The nearest floating tensor downstream of ``source`` that cuts it off from the outputs, or None.

    A decoder's output (``DecodeWav`` -> ... -> ``Mfcc:0``) is what a user can
    feed instead of an input bnfold cannot make up, such as WAV bytes.
    """
    index = GraphIndex(graph_def)
    reached = {node.name for node in index.walk(source, limit=limit, forward=True)} - {source}
    for name in (n for n in index.topological_order() if n in reached):  # nearest first
        if any(c.index != 0 for c in index.consumers(name)):
            continue  # feeding output 0 would leave another output still computed from the source
        try:
            dtype = output_dtype(index.node(name), 0)
        except (KeyError, ValueError, TypeError):
            continue
        if dtype is None or not tf.dtypes.as_dtype(dtype).is_floating:
            continue
        if source not in needed_inputs(graph_def, outputs, fed | {name}):
            return f"{name}:0"
    return None


def _as_graph_def(graph: graph_pb2.GraphDef | str | os.PathLike[str]) -> graph_pb2.GraphDef:
    if isinstance(graph, graph_pb2.GraphDef):
        return graph
    from bnfold.tf.io import load_graph_def

    return load_graph_def(graph)


def verify(
    original: graph_pb2.GraphDef | str | os.PathLike[str],
    folded: graph_pb2.GraphDef | str | os.PathLike[str],
    inputs: list[str] | None = None,
    outputs: list[str] | None = None,
    *,
    trust_model: bool = False,
    **check: Unpack[CheckArgs],
) -> Verification:
    """Run both graphs (GraphDefs or paths) on the same inputs and compare every output.

    ``check`` takes the check's options (:class:`~bnfold.core.comparison.CheckArgs`). Unless
    ``trust_model``, a graph that would reach outside the process is refused
    before anything runs (:mod:`bnfold.tf.runsafety`).
    """
    original, folded = _as_graph_def(original), _as_graph_def(folded)
    options = CheckOptions.of(check)
    plan = _plan(original, inputs, outputs, options, trust_model, also_gate=folded)
    from bnfold.tf.runsafety import trusting

    folded_bytes = _Serialization(folded)

    def open_original() -> GraphRunner:
        data = original.SerializeToString()
        folded_bytes.start()  # while the worker loads and runs the original, this process is idle but for this
        return open_graph_runner(original, "the input graph", serialized=data)

    with trusting(trust_model):
        return compare_runners(
            open_original, lambda: FoldedGraphRunner(folded, folded_bytes.result()), plan.specs, plan.outputs, plan.options
        )


@dataclass
class _Plan:
    """What a check of ``original`` feeds and compares, once every input and option was found valid."""

    original: graph_pb2.GraphDef
    specs: dict[str, InputSpec]
    outputs: list[str]
    options: CheckOptions


def _plan(
    original: graph_pb2.GraphDef,
    inputs: list[str] | None,
    outputs: list[str] | None,
    options: CheckOptions,
    trust_model: bool,
    also_gate: graph_pb2.GraphDef | None = None,
) -> _Plan:
    """Check the inputs, outputs and feeds a check names, gate the graphs (:mod:`bnfold.tf.runsafety`) and pick
    the inputs to make up and the tolerances; raises what makes the check impossible, runs nothing."""
    feeds = options.feeds
    specs = {s.name: s for s in find_inputs(original)}
    if inputs:
        missing = [n for n in inputs if n not in specs]
        if missing:
            raise UsageError(f"--inputs: {missing[0]!r} is not a placeholder of the graph")
        specs = {n: specs[n] for n in inputs}
    outputs = outputs or find_outputs(original)
    if not outputs:
        raise VerificationError("the graph has no outputs to compare; name them with --outputs")
    fed_names = {parse_input(k)[0] for k in feeds}
    unknown = [k for k in fed_names if k not in {n.name for n in original.node}]
    if unknown:
        raise UsageError(f"--feed: no node named {unknown[0]!r} in the graph")
    if not trust_model:
        from bnfold.tf.runsafety import check_runnable

        check_runnable(original, outputs, "the check")
        if also_gate is not None:
            check_runnable(also_gate, outputs, "the check")
    needed = needed_inputs(original, outputs, fed_names)
    specs = {n: s for n, s in specs.items() if n in needed}
    for name, spec in specs.items():
        if spec.dtype.kind in "OSU" and name not in fed_names:
            cut = feedable_instead(original, outputs, name, fed_names)
            instead = f"--feed {cut}=x.npy (the first tensor computed from it that the outputs need it only through)" if cut else f"--feed {name}=..."
            raise VerificationError(f"input {name!r} is a string; bnfold cannot make such data: pass {instead}, or --no-verify")
    low = lowest_compute_precision(original)
    if low is not None and options.rtol is None and options.atol is None:
        # a mixed-precision graph computes in fp16/bf16 even where its outputs are float32
        options = dataclasses.replace(options, rtol=TOLERANCES[low][0], atol=TOLERANCES[low][1])
    return _Plan(original, specs, outputs, options)


class PendingCheck:
    """The check of a fold still under way: the input graph runs in the worker while this process folds.

    ``bnfold.fold`` knows the graph it checks against (the input, or its
    canonical form) before it folds. The input graph's half of the check
    (:func:`~bnfold.core.comparison.run_reference`: make the inputs, load and run
    it) then starts on a thread that mostly waits on the worker, so the
    worker's import and first run of the input graph (0.9 s of ResNet50's
    1.9 s check) overlap the fold. :meth:`finish` runs the folded graph and
    compares, as :func:`verify` does.

    Nothing runs before the graph passed ``gate`` and the run-safety rule;
    whatever makes the check impossible (a refused op, a string input, a bad
    ``--feed``), and any failure of the input graph's run, is raised by
    :meth:`finish`, after what the fold itself raises, in :func:`verify`'s
    order; a fold that changed nothing needs no check and reports none of it.
    """

    def __init__(
        self,
        original: graph_pb2.GraphDef,
        inputs: list[str] | None,
        outputs: list[str] | None,
        options: CheckOptions,
        trust_model: bool = False,
        gate: Callable[[], None] | None = None,
    ) -> None:
        self.trust_model = trust_model
        self.error: BaseException | None = None
        self.reference: ReferenceRun | None = None
        self.thread: threading.Thread | None = None
        self.loaded = threading.Event()  # the input graph's bytes are in the worker, and gone from here
        try:
            if gate is not None and not trust_model:
                gate()
            self.plan: _Plan | None = _plan(original, inputs, outputs, options, trust_model)
        except BnfoldError as exc:
            self.error, self.plan = exc, None
            return
        # The caller's context (trust_model=True raised by an outer call) goes with the thread.
        context = contextvars.copy_context()
        self.thread = threading.Thread(target=context.run, args=(self._run_reference,), name="bnfold-check", daemon=True)
        self.thread.start()

    def _run_reference(self) -> None:
        from bnfold.tf.runsafety import trusting

        assert self.plan is not None
        plan = self.plan

        def open_original() -> GraphRunner:
            try:
                return open_graph_runner(plan.original, "the input graph")
            finally:
                self.loaded.set()

        try:
            with trusting(self.trust_model):
                self.reference = run_reference(open_original, plan.specs, plan.outputs, plan.options)
        except BaseException as exc:  # noqa: BLE001 - raised by finish(), in the caller's thread
            self.error = exc
        finally:
            self.loaded.set()

    def finish(self, folded: graph_pb2.GraphDef) -> Verification:
        """Run the folded graph on the same inputs and compare; raises what made the check impossible."""
        if self.plan is None or self.thread is None:
            assert self.error is not None
            raise self.error
        plan = self.plan
        if not self.trust_model:
            from bnfold.tf.runsafety import check_runnable

            check_runnable(folded, plan.outputs, "the check")
        # Serialized while the worker runs the input graph, once that graph's bytes are gone: not both at
        # once (100 MB each on ResNet50, where they made this process the largest of the check).
        self.loaded.wait()
        data = [folded.SerializeToString()]
        self.thread.join()
        if self.error is not None:
            raise self.error
        assert self.reference is not None
        from bnfold.tf.runsafety import trusting

        with trusting(self.trust_model):  # the bytes are dropped once sent (pop), not kept through the runs
            return run_candidate(self.reference, lambda: FoldedGraphRunner(folded, data.pop()), plan.specs, plan.outputs, plan.options)


class _Serialization:
    """``graph_def.SerializeToString()`` on a thread, so that it overlaps the worker running the other graph.

    The check's parent waits on the worker's pipe (without the GIL) while the
    original loads and runs; the folded graph's bytes (0.16 s on ResNet50) are
    made meanwhile instead of after. A failure is raised by :meth:`result`.
    """

    def __init__(self, graph_def: graph_pb2.GraphDef) -> None:
        self.graph_def: graph_pb2.GraphDef | None = graph_def
        self.data: bytes | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._work, name="bnfold-serialize", daemon=True)

    def _work(self) -> None:
        try:
            assert self.graph_def is not None
            self.data = self.graph_def.SerializeToString()
        except BaseException as exc:  # noqa: BLE001  (handed to the caller of result())
            self.error = exc
        self.graph_def = None

    def start(self) -> None:
        if self.thread.ident is None:
            self.thread.start()

    def result(self) -> bytes:
        if self.thread.ident is None:  # never started: serialize here
            self.thread.start()
        self.thread.join()
        if self.error is not None:
            raise self.error
        assert self.data is not None
        data, self.data = self.data, None
        return data
