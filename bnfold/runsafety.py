"""Which graphs bnfold may run: none that reach outside the process.

bnfold runs a model's graph for the equivalence check, for ``doctor --data`` and
(through tf2onnx's constant folding) for ONNX conversion. A downloaded graph is
untrusted input, and TensorFlow ops can read and write files, talk to the
network, run Python, or touch session resources. The decision is made from
TensorFlow's op registry, op by op, so that it covers every registered op rather
than a short list of names an attacker can step around.

The rule (README "Security"), for every node that would run -- the fetched
tensors and everything they depend on, data and control edges, plus every node
of every library function those nodes call, transitively:

1. Session resources are off limits: an op with a ``resource`` or reference-typed
   input or output (variables, queues, tables, readers, iterators,
   accumulators, mutexes, summary writers, ...) is refused. Exempt are the
   step-local containers of TF1 control flow (:func:`is_step_local`:
   ``TensorArray*``, ``Stack*V2``), which the run creates and drops itself
   (``tf.nn.dynamic_rnn`` graphs use them); rules 2 and 4 still apply.
2. Places are off limits: an op with a string input whose name names a place
   (``filename``, ``path``, ``prefix``, ``*_file``,
   ``*_dir``, ``logdir``, ``address``, ``protocol``, ``target``...) is refused, and
   so is a node whose string attribute named like a place (``memory_region_name``,
   ``descriptor_source``, ``*_prefix``, ``*_url*``, ``output_stream``) holds a value
   other than an in-process one (``""``, ``local://``, ``stderr``, ``log(info)``...).
3. Stateful ops (``op_def.is_stateful``) are refused unless they are in
   :data:`HARMLESS_STATEFUL`: random number generators whose state lives in
   the kernel, assertions and numeric checks, printing to the process's own
   streams, function arguments/results, and calls and control flow, whose
   bodies are checked by this same rule.
4. Stateless ops whose documented effect reaches outside and that the registry
   cannot show (:data:`DOCUMENTED_EFFECTS`: ``ImmutableConst`` memory-maps a
   file, ``MatchingFiles`` globs the file system, ``PyFuncStateless`` runs
   Python, ``DatasetFromGraph`` runs a graph the check cannot see) are refused.

An op TensorFlow does not know is not refused here: TensorFlow cannot import it,
so it cannot run either. Rule 1 also refuses what a frozen graph should not
have anyway (variables), which is why it holds for every graph bnfold runs.
"""

from __future__ import annotations

import contextvars
import functools
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from tensorflow.core.framework import graph_pb2, node_def_pb2, op_def_pb2, types_pb2
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow.python.framework import op_def_registry

from bnfold.errors import UnsafeModelError
from bnfold.graph import called_functions, parse_input, reachable_functions

# Rule 3: stateful ops whose state never leaves the process, each with why.
HARMLESS_STATEFUL: dict[str, str] = {
    **{
        op: "random numbers from the kernel's own generator"
        for op in (
            "RandomUniform",
            "RandomUniformInt",
            "RandomStandardNormal",
            "TruncatedNormal",
            "ParameterizedTruncatedNormal",
            "RandomGamma",
            "RandomPoisson",
            "RandomPoissonV2",
            "RandomShuffle",
            "RandomCrop",
            "Multinomial",
            "NonDeterministicInts",
            "SampleDistortedBoundingBox",
            "SampleDistortedBoundingBoxV2",
            "StatelessRandomGetAlg",
        )
    },
    "Assert": "fails the run or does nothing",
    "CheckNumerics": "fails the run or passes its input through",
    "CheckNumericsV2": "fails the run or passes its input through",
    "Print": "logs to the process's stderr",
    "PrintV2": "prints to the process's own streams (a file output_stream is refused by rule 2)",
    "_Arg": "a function's argument",
    "_Retval": "a function's result",
    "If": "control flow: both branches are checked",
    "While": "control flow: condition and body are checked",
    "Case": "control flow: every branch is checked",
    "StatefulPartitionedCall": "a function call: the function is checked",
}

# Rule 4: stateless in the registry, documented to reach outside the process.
DOCUMENTED_EFFECTS: dict[str, str] = {
    "ImmutableConst": "memory-maps the file its memory_region_name names",
    "MatchingFiles": "lists files matching a pattern on the file system",
    "PyFuncStateless": "runs a Python function registered in the process",
    "DatasetFromGraph": "builds a dataset from a serialized graph bnfold cannot check",
}

# Rule 2: string inputs and string attributes that name a place.
PLACE_INPUT = re.compile(r"(^|_)(files?|filenames?|file_pattern|path|prefix|dir|logdir|address|protocol|target|ckpt_path)$")
PLACE_ATTR = re.compile(r"file|path|prefix|_dir$|url|memory_region|descriptor_source|output_stream|address")
IN_PROCESS_VALUES = {"", "local://", "global://", "stderr", "stdout", "log(info)", "log(warning)", "log(error)"}

RESOURCE_TYPES = {types_pb2.DT_RESOURCE}


@dataclass(frozen=True)
class Refusal:
    """One node bnfold will not run, and why."""

    node: str
    op: str
    reason: str
    function: str | None = None  # the library function holding the node, None in the graph itself

    @property
    def where(self) -> str:
        return f"{self.function}/{self.node}" if self.function else self.node

    def to_json(self) -> dict[str, str]:
        return {"node": self.where, "op": self.op, "reason": self.reason}


@functools.cache
def op_refusal(op: str, resources: bool = False) -> str | None:
    """Why an op type may never run (rules 1, 3, 4, and the input part of 2), or None.

    ``resources`` lifts rule 1 and the statefulness of resource ops: for what
    loading a SavedModel runs, where building the model's own tables and
    variables is the point.
    """
    op_def = op_def_registry.get(op)
    if op_def is None:
        return None
    return _op_def_refusal(op_def, resources)


def is_step_local(op: str) -> bool:
    """TensorArray and stack ops: resources living in the run's own step container, created and dropped by the run."""
    return op.startswith("TensorArray") or op in ("StackV2", "StackPushV2", "StackPopV2", "StackCloseV2")


def _op_def_refusal(op_def: op_def_pb2.OpDef, resources: bool = False) -> str | None:
    if op_def.name in DOCUMENTED_EFFECTS:
        return DOCUMENTED_EFFECTS[op_def.name]
    args = [*op_def.input_arg, *op_def.output_arg]
    uses_resources = any(a.type in RESOURCE_TYPES or a.is_ref for a in args)
    step_local = is_step_local(op_def.name) or (resources and uses_resources)
    if not step_local and uses_resources:
        return "uses session resources (variables, queues, tables, readers, iterators...)"
    for arg in op_def.input_arg:
        if arg.type == types_pb2.DT_STRING and PLACE_INPUT.search(arg.name):
            return f"takes a place to read or write (input {arg.name!r})"
    if op_def.is_stateful and op_def.name not in HARMLESS_STATEFUL and not step_local:
        return "is stateful (its effects reach outside the graph)"
    return None


def node_refusal(node: node_def_pb2.NodeDef, resources: bool = False) -> str | None:
    """Why this node may not run: its op type, or a place held in one of its attributes."""
    reason = op_refusal(node.op, resources)
    if reason is not None:
        return reason
    for key, value in node.attr.items():
        if not PLACE_ATTR.search(key):
            continue
        texts = [value.s] if value.HasField("s") else list(value.list.s)
        for text in texts:
            decoded = text.decode("utf-8", "replace")
            if decoded not in IN_PROCESS_VALUES:
                return f"names a place in attribute {key!r} ({decoded[:80]!r})"
    return None


def refused_nodes(
    graph_def: graph_pb2.GraphDef,
    fetches: list[str] | None = None,
    functions: Sequence[str] = (),
    resources: bool = False,
) -> list[Refusal]:
    """Every node that would run for ``fetches`` (all nodes when None) and the library ``functions``, that the rule refuses."""
    nodes = {n.name: n for n in graph_def.node}
    library = {f.signature.name: f for f in graph_def.library.function}
    names = set(library)
    if fetches is None:
        running = list(nodes)
    else:
        running, seen = [], set()
        stack = [parse_input(f)[0] for f in fetches]
        while stack:
            name = stack.pop()
            if name in seen or name not in nodes:
                continue
            seen.add(name)
            running.append(name)
            stack.extend(parse_input(ref)[0] for ref in nodes[name].input)
    refusals = []
    seeds: list[str] = list(functions)
    for name in running:
        node = nodes[name]
        reason = node_refusal(node, resources)
        if reason is not None:
            refusals.append(Refusal(node.name, node.op, reason))
        seeds += called_functions(node, names)
    for fname in reachable_functions(graph_def.library, seeds):
        for node in library[fname].node_def:
            reason = node_refusal(node, resources)
            if reason is not None:
                refusals.append(Refusal(node.name, node.op, reason, fname))
    return refusals


def check_runnable(
    graph_def: graph_pb2.GraphDef,
    fetches: list[str] | None,
    what: str,
    hint: str = "--no-verify folds without running anything, --trust-model runs it anyway",
) -> None:
    """Raise :class:`UnsafeModelError` naming the first node the rule refuses, before anything runs."""
    refusals = refused_nodes(graph_def, fetches)
    if refusals:
        first = refusals[0]
        more = f" (and {len(refusals) - 1} more)" if len(refusals) > 1 else ""
        raise UnsafeModelError(
            f"{what} would run node {first.where!r} ({first.op}), which {first.reason}{more}; bnfold does not run such graphs: {hint}"
        )


def saved_model_load_refusals(saved_model: saved_model_pb2.SavedModel) -> list[Refusal]:
    """What ``tf.saved_model.load`` itself would run, refused by the rule: resource creators and initializers, init ops.

    Loading runs graph code before bnfold sees a graph: each resource object's
    ``_create_resource``/``_initialize`` functions (TF2) and the main/init op
    (TF1). Building the model's own tables and variables is allowed (rule 1 is
    lifted); reaching files, the network or Python is not. Restoring the
    variables from the SavedModel's own ``variables/`` is TF's checkpoint
    reader, not a graph the model chose, and is not checked here.
    """
    refusals: list[Refusal] = []
    for meta in saved_model.meta_graphs:
        objects = meta.object_graph_def.nodes
        functions: list[str] = []
        for obj in objects:
            if obj.WhichOneof("kind") == "resource":
                for child in obj.children:
                    if child.local_name in ("_create_resource", "_initialize"):
                        functions += _concrete_functions(objects, child.node_id)
        fetches: list[str] = []
        if "__saved_model_init_op" in meta.signature_def:
            fetches += [t.name for t in meta.signature_def["__saved_model_init_op"].outputs.values()]
        for key in ("saved_model_main_op", "legacy_init_op"):
            if key in meta.collection_def:
                fetches += list(meta.collection_def[key].node_list.value)
        refusals += refused_nodes(meta.graph_def, fetches, functions, resources=True)
    return refusals


def _concrete_functions(objects: Any, node_id: int) -> list[str]:
    obj = objects[node_id]
    kind = obj.WhichOneof("kind")
    if kind == "bare_concrete_function":
        return [obj.bare_concrete_function.concrete_function_name]
    if kind == "function":
        return list(obj.function.concrete_functions)
    return []


_TRUSTED: contextvars.ContextVar[bool] = contextvars.ContextVar("bnfold_trust_model", default=False)


@contextmanager
def trusting(trust: bool) -> Iterator[None]:
    """Within this block (when ``trust``), graph runs skip the gate: ``--trust-model`` / ``trust_model=True``.

    Only raises trust, never lowers it, so a trusted API call stays trusted
    through helpers that do not know about it. The last-line gate in
    :class:`bnfold.verification.GraphRunner` reads it.
    """
    token = _TRUSTED.set(trust or _TRUSTED.get())
    try:
        yield
    finally:
        _TRUSTED.reset(token)


def is_trusted() -> bool:
    return _TRUSTED.get()


def registry_decisions() -> dict[str, str | None]:
    """Every registered op -> why it is refused, or None: the rule applied to the whole registry (for tests and the note)."""
    from tensorflow.python.client import pywrap_tf_session

    ops = op_def_pb2.OpList()
    ops.ParseFromString(pywrap_tf_session.TF_GetBuffer(pywrap_tf_session.TF_GetAllOpList()))
    return {op.name: _op_def_refusal(op) for op in ops.op}
