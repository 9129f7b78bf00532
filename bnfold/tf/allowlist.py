"""What an untrusted TensorFlow graph or SavedModel may make bnfold run: an allowlist, decided from the file's own bytes.

A denylist of dangerous ops held op by op, but it was applied to the code
bnfold expected to run, and four routes nobody foresaw slipped past it (a
tf_keras ``ClassMethod`` layer, a function passed as a value, a SavedModel's
saver and table initializers, restore functions). So the rule is turned
around (docs/security.md): everything a loader, the check, ``doctor --data``
or constant evaluation could reach must be shown to be pure computation, and
anything that cannot be shown so is refused before any framework loader sees
the file (:class:`~bnfold.core.errors.UnsafeModelError`, exit 6), unless the user
trusts the file (``--trust-model``).

- TensorFlow: an op may run when TensorFlow's registry marks it stateless and
  it has no resource, variant or reference inputs or outputs, no string input
  naming a place and no attribute naming one; plus :data:`PURE_EXCEPTIONS`,
  each with why it is pure. Function bodies count wherever a function is named:
  on a node, in ``func``/``list(func)`` attributes nested at any depth (a
  function passed as a value through another function's parameter), and every
  function of the library, reached or not.
- SavedModels: everything the loaders (TF1 and TF2) may run, see
  :func:`saved_model_refusals`.
- Keras configs and ONNX models have their own lists, by the same rule
  (:mod:`bnfold.keras.allowlist`, :mod:`bnfold.onnx.allowlist`); trust is one
  switch for all three (:mod:`bnfold.core.trust`).

This module imports TensorFlow lazily: an ONNX-only run never loads it.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tensorflow.core.framework import attr_value_pb2, graph_pb2, node_def_pb2, op_def_pb2
    from tensorflow.core.protobuf import meta_graph_pb2, saved_model_pb2


# =====================================================================================
# TensorFlow ops


# Ops allowed although the registry marks them stateful (or they hold a resource or a
# variant), each with why it is pure. Every other stateful op is refused.
PURE_EXCEPTIONS: dict[str, str] = {
    **{
        op: "random numbers from the kernel's own generator: no state outside the op"
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
    "PrintV2": "prints to the process's own streams (an output_stream naming a file is refused as a place)",
    "_Arg": "a function's argument",
    "_Retval": "a function's result",
    "If": "control flow: both branches are checked by this rule",
    "While": "control flow: condition and body are checked by this rule",
    "Case": "control flow: every branch is checked by this rule",
    "StatefulPartitionedCall": "a function call: the function is checked by this rule",
}

# Stateless ops passing variants that are plain values of the same run, each with why.
VARIANT_VALUES: dict[str, str] = {
    op: "an optional value holding tensors of the same run (cond_v2 keeps its intermediates in them)"
    for op in ("OptionalFromValue", "OptionalNone", "OptionalHasValue", "OptionalGetValue")
}

# Stateless in the registry, documented to reach outside the process in a way the registry cannot show.
DOCUMENTED_EFFECTS: dict[str, str] = {
    "ImmutableConst": "memory-maps the file its memory_region_name names",
    "MatchingFiles": "lists files matching a pattern on the file system",
    "PyFuncStateless": "runs a Python function registered in the process",
    "DatasetFromGraph": "builds a dataset from a serialized graph bnfold cannot check",
}

# What loading a SavedModel builds and fills: the model's own variables and lookup tables,
# living in the loading process. Allowed only in what a SavedModel loader runs
# (:func:`saved_model_refusals`), never in a graph bnfold runs for a check.
MODEL_STATE: dict[str, str] = {
    **{
        op: "the model's own variable"
        for op in (
            "VarHandleOp",
            "ReadVariableOp",
            "AssignVariableOp",
            "AssignAddVariableOp",
            "AssignSubVariableOp",
            "VarIsInitializedOp",
            "DestroyResourceOp",
            "ResourceGather",
            "ResourceGatherNd",
            "VariableV2",
            "Variable",
            "Assign",
            "AssignAdd",
            "AssignSub",
            "IsVariableInitialized",
            "RefIdentity",
        )
    },
    **{
        op: "the model's own in-memory lookup table"
        for op in (
            "HashTableV2",
            "HashTable",
            "MutableHashTableV2",
            "MutableHashTableOfTensorsV2",
            "MutableDenseHashTableV2",
            "AnonymousHashTable",
            "AnonymousMutableHashTable",
            "LookupTableFindV2",
            "LookupTableImportV2",
            "LookupTableInsertV2",
            "LookupTableSizeV2",
            "LookupTableExportV2",
            "LookupTableRemoveV2",
            "InitializeTableV2",
        )
    },
}

# Reading the model's own checkpoint: allowed in a TF1 restore op only when the file
# prefix is the tensor the loader feeds with the SavedModel's own variables path.
CHECKPOINT_READS = {"RestoreV2", "Restore", "RestoreSlice"}

# String inputs and string attributes that name a place (a file, a URL, an address).
PLACE_INPUT = re.compile(r"(^|_)(files?|filenames?|file_pattern|path|prefix|dir|logdir|address|protocol|target|ckpt_path)$")
PLACE_ATTR = re.compile(r"file|path|prefix|_dir$|url|memory_region|descriptor_source|output_stream|address")
IN_PROCESS_VALUES = {"", "local://", "global://", "stderr", "stdout", "log(info)", "log(warning)", "log(error)"}

RUN = "run"  # a graph bnfold runs: the check, doctor --data, constant evaluation, tf2onnx
LOAD = "load"  # what a SavedModel loader runs: the model's own variables and tables may be built


def is_step_local(op: str) -> bool:
    """Containers that live and die inside one run: TF1 TensorArrays and stacks (resources), TF2 TensorLists (values).

    ``tf.nn.dynamic_rnn`` graphs hold the first, Keras RNN layers frozen from TF2
    the second; neither reaches anything the run did not create.
    """
    return (
        op.startswith(("TensorArray", "TensorList"))
        or op == "EmptyTensorList"
        or op in ("StackV2", "StackPushV2", "StackPopV2", "StackCloseV2")
    )


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
def op_refusal(op: str, context: str = RUN) -> str | None:
    """Why an op type is not on the allowlist, or None when it is."""
    from tensorflow.python.framework import op_def_registry

    op_def = op_def_registry.get(op)
    if op_def is None:
        return "is not an op TensorFlow registers, so bnfold cannot show what it does"
    return op_def_refusal(op_def, context)


def op_def_refusal(op_def: op_def_pb2.OpDef, context: str = RUN) -> str | None:
    from tensorflow.core.framework import types_pb2

    name = op_def.name
    if name in DOCUMENTED_EFFECTS:
        return DOCUMENTED_EFFECTS[name]
    for arg in op_def.input_arg:
        if arg.type == types_pb2.DT_STRING and PLACE_INPUT.search(arg.name):
            return f"takes a place to read or write (input {arg.name!r})"
    if is_step_local(name) or name in PURE_EXCEPTIONS or name in VARIANT_VALUES:
        return None
    if context == LOAD and name in MODEL_STATE:
        return None
    args = [*op_def.input_arg, *op_def.output_arg]
    if any(a.type == types_pb2.DT_RESOURCE or a.is_ref for a in args):
        return "uses session resources (variables, queues, tables, readers, iterators...)"
    if any(a.type == types_pb2.DT_VARIANT for a in args):
        return "passes variant values (datasets, optionals...) bnfold cannot look into"
    if op_def.is_stateful:
        return "is stateful (its effects reach outside the graph)"
    return None


def attr_places(node: node_def_pb2.NodeDef) -> str | None:
    """A string attribute named like a place holding something other than an in-process value."""
    for key, value in node.attr.items():
        if not PLACE_ATTR.search(key):
            continue
        texts = [value.s] if value.HasField("s") else list(value.list.s)
        for text in texts:
            decoded = text.decode("utf-8", "replace")
            if decoded not in IN_PROCESS_VALUES:
                return f"names a place in attribute {key!r} ({decoded[:80]!r})"
    return None


def node_refusal(node: node_def_pb2.NodeDef, context: str = RUN, functions: Iterable[str] = ()) -> str | None:
    """Why this node is not on the allowlist: its op type, or a place in its attributes. A call of a library function is allowed (the body is checked)."""
    if node.op not in functions:
        reason = op_refusal(node.op, context)
        if reason is not None:
            return reason
    return attr_places(node)


def attr_functions(value: attr_value_pb2.AttrValue) -> Iterator[str]:
    """Every function an attribute value names, at any depth: a ``func`` carries its own attributes, which may name more."""
    stack = [value]
    while stack:
        current = stack.pop()
        funcs = [current.func] if current.HasField("func") else list(current.list.func)
        for func in funcs:
            yield func.name
            stack.extend(func.attr.values())


def node_functions(node: node_def_pb2.NodeDef, functions: set[str]) -> list[str]:
    """Library functions a node may run: its op (a call by name) and every function in its attributes, nested ones included."""
    called = [node.op] if node.op in functions else []
    for value in node.attr.values():
        called += [f for f in attr_functions(value) if f in functions]
    return called


def closure(nodes: dict[str, node_def_pb2.NodeDef], fetches: Iterable[str]) -> list[str]:
    """Names of the nodes a run of ``fetches`` needs (data and control edges), found iteratively."""
    from bnfold.core.comparison import parse_input

    running, seen = [], set()
    stack = [parse_input(f)[0] for f in fetches]
    while stack:
        name = stack.pop()
        if name in seen or name not in nodes:
            continue
        seen.add(name)
        running.append(name)
        stack.extend(parse_input(ref)[0] for ref in nodes[name].input)
    return running


def reachable(library: Any, seeds: Iterable[str]) -> list[str]:
    """Functions reached from ``seeds`` through bodies, nested attributes and registered gradients."""
    from bnfold.tf.graph import reachable_functions

    return reachable_functions(library, seeds, with_gradients=True, calls=node_functions, own_attributes=attr_functions)


def graph_refusals(
    graph_def: graph_pb2.GraphDef,
    fetches: Iterable[str] | None = None,
    context: str = RUN,
    library_functions: Iterable[str] | None = None,
) -> list[Refusal]:
    """Every node that would run for ``fetches`` (all nodes when None), and every node of
    ``library_functions`` (all library functions when None), not on the allowlist.

    All library functions by default, reached or not: a function can be reached
    through routes (values passed through parameters, gradients, attributes of
    attributes) that a reachability walk must foresee; checking them all needs
    no foresight.
    """
    nodes = {n.name: n for n in graph_def.node}
    library = {f.signature.name: f for f in graph_def.library.function}
    names = set(library)
    running = list(nodes) if fetches is None else closure(nodes, fetches)
    refusals = []
    for name in running:
        reason = node_refusal(nodes[name], context, names)
        if reason is not None:
            refusals.append(Refusal(name, nodes[name].op, reason))
    checked = sorted(names) if library_functions is None else reachable(graph_def.library, library_functions)
    for fname in checked:
        for node in library[fname].node_def:
            reason = node_refusal(node, context, names)
            if reason is not None:
                refusals.append(Refusal(node.name, node.op, reason, fname))
    return refusals


# -- SavedModels -------------------------------------------------------------------------
def saved_model_refusals(saved_model: saved_model_pb2.SavedModel) -> list[Refusal]:
    """What ``tf.saved_model.load`` could run, refused by the allowlist, for every MetaGraph.

    Checked, with the model's own variables and tables allowed (:data:`MODEL_STATE`):

    - every library function, reached or not: resource creators, initializers and
      destructors (``_create_resource``, ``_initialize``, ``_destroy_resource``),
      checkpoint restore functions (``_restore_from_tensors``), signatures,
      gradients. The one exception is the TF2 saver's ``_traced_save`` /
      ``_traced_restore`` pair, reached only from ``saver_def`` nodes, which the
      TF2 loader never runs (it restores through the object graph);
    - in the graph: the closure of every node any collection names
      (``table_initializer``, ``legacy_init_op``, ``saved_model_main_op``,
      ``init_op``, ``local_init_op``..., and the initializers of variables kept
      in collections), of every signature (``__saved_model_init_op`` included)
      and, for a TF1 model, of the saver's ``restore_op_name``, where a checkpoint
      read is allowed only from the file prefix the loader feeds.
    """
    refusals: list[Refusal] = []
    for meta in saved_model.meta_graphs:
        refusals += _meta_graph_refusals(meta)
    return refusals


def _meta_graph_refusals(meta: meta_graph_pb2.MetaGraphDef) -> list[Refusal]:
    from tensorflow.core.framework import variable_pb2

    graph_def = meta.graph_def
    nodes = {n.name: n for n in graph_def.node}
    tf2 = len(meta.object_graph_def.nodes) > 0
    fetches: list[str] = []
    for collection in meta.collection_def.values():
        fetches += list(collection.node_list.value)
        for raw in collection.bytes_list.value:
            variable = variable_pb2.VariableDef()
            try:
                variable.ParseFromString(raw)
            except Exception:  # noqa: BLE001,S112 - not a VariableDef: bytes TF does not run
                continue
            fetches += [variable.initializer_name, variable.snapshot_name, variable.initial_value_name]
    for signature in meta.signature_def.values():
        fetches += [t.name for t in signature.inputs.values()] + [t.name for t in signature.outputs.values()]
    fetches = [f for f in fetches if f]
    saver = meta.saver_def
    restore = [saver.restore_op_name] if saver.restore_op_name else []
    names = {f.signature.name for f in graph_def.library.function}

    # The TF2 saver functions: reached only from the saver_def's own nodes.
    saver_only: set[str] = set()
    if tf2 and (saver.save_tensor_name or saver.restore_op_name):
        saver_nodes = set(closure(nodes, [saver.save_tensor_name, saver.restore_op_name]))
        elsewhere = set(closure(nodes, fetches))
        other_seeds = [f for n in nodes.values() if n.name not in saver_nodes or n.name in elsewhere for f in node_functions(n, names)]
        other_seeds += list(meta.object_graph_def.concrete_functions)
        other_seeds += [f for obj in meta.object_graph_def.nodes for f in _object_functions(obj)]
        from_others = set(reachable(graph_def.library, other_seeds))
        from_saver = reachable(graph_def.library, [f for n in saver_nodes for f in node_functions(nodes[n], names)])
        saver_only = set(from_saver) - from_others
    checked = sorted(names - saver_only)
    refusals = graph_refusals(graph_def, fetches, LOAD, checked)
    if restore and not tf2:
        refusals += _restore_refusals(graph_def, nodes, restore, saver.filename_tensor_name)
    return refusals


def _object_functions(obj: Any) -> list[str]:
    kind = obj.WhichOneof("kind")
    if kind == "bare_concrete_function":
        return [obj.bare_concrete_function.concrete_function_name]
    if kind == "function":
        return list(obj.function.concrete_functions)
    return []


def _restore_refusals(graph_def: graph_pb2.GraphDef, nodes: dict[str, Any], restore: list[str], filename_tensor: str) -> list[Refusal]:
    """The TF1 restore op: allowlisted like loading, and its checkpoint reads only from the prefix the loader feeds."""
    from bnfold.core.comparison import parse_input

    names = {f.signature.name for f in graph_def.library.function}
    feed = parse_input(filename_tensor)[0] if filename_tensor else None
    refusals = []
    for name in closure(nodes, restore):
        node = nodes[name]
        if node.op in CHECKPOINT_READS:
            prefix = parse_input(node.input[0])[0] if node.input else None
            while prefix in nodes and nodes[prefix].op == "Identity" and nodes[prefix].input:
                prefix = parse_input(nodes[prefix].input[0])[0]
            ok = feed is not None and prefix == feed and attr_places(node) is None
            reason = None if ok else "reads a checkpoint from a place other than the SavedModel's own variables"
        else:
            reason = node_refusal(node, LOAD, names)
        if reason is not None:
            refusals.append(Refusal(name, node.op, reason))
    return refusals
