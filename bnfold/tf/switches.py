"""Resolve training switches and training-mode BN before recognition (the canonicalize stage).

A ``tf.cond(is_training, train_bn, infer_bn)`` freezes into TF1 ``Switch``/``Merge``
nodes or into a TF2 ``If``/``StatelessIf`` whose branches live in the function
library. While the predicate is fed at run time no BN inside can be folded, and
the graph still carries the training path. When the predicate is known (a
constant, a ``PlaceholderWithDefault``, Keras' ``keras_learning_phase``, or a
flag the user names with ``--set``) only the taken branch is kept: Switch/Merge
pairs are short-circuited and dead nodes removed, and the taken ``If`` branch is
inlined from the library (the library itself is kept). ``while`` loops use
``Switch``/``Merge`` too, but their predicate is a ``LoopCond``, never a flag,
so they are left alone.

:func:`use_moving_stats` turns ``FusedBatchNorm*`` with ``is_training=True`` into
inference mode using the moving mean/variance constants the graph still holds.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from tensorflow.core.framework import attr_value_pb2, function_pb2, graph_pb2, node_def_pb2
from tensorflow.python.framework import tensor_util

from bnfold.core.comparison import looks_like_training_flag
from bnfold.core.errors import UsageError
from bnfold.core.result import Resolution, TrainingBnRewrite
from bnfold.tf.canonical import ConstEvaluator
from bnfold.tf.graph import GraphIndex, attr, live_library, make_node, parse_input, tensor_ref

IF_OPS = {"If", "StatelessIf"}
FLAG_SOURCES = {"Const", "Placeholder", "PlaceholderWithDefault"}
# Ops a flag passes through unchanged on its way to a predicate.
FLAG_PASS = {"Identity", "Snapshot", "StopGradient", "Cast", "Squeeze", "Reshape"}
KERAS_LEARNING_PHASE = "keras_learning_phase"


@dataclass
class Flag:
    """Where a predicate comes from: the source node, and whether it is negated on the way."""

    node: str
    op: str
    negated: bool


@dataclass
class CondSite:
    """One conditional on a flag: a TF1 ``Switch`` or a TF2 ``If``/``StatelessIf``."""

    node: str
    kind: str  # "Switch" | "If" | "StatelessIf"
    flag: Flag
    value: bool | None  # the predicate's value when known
    how: str  # why the value is known ("constant", "--set", "default", ...), or "fed at run time"


def trace_flag(index: GraphIndex, ref: str) -> Flag | None:
    """Follow a predicate back through Identity/Cast/LogicalNot to a Const or placeholder."""
    negated = False
    seen: set[str] = set()
    while True:
        node, _ = index.producer(ref)
        if node is None or node.name in seen:
            return None
        seen.add(node.name)
        if node.op in FLAG_SOURCES:
            return Flag(node.name, node.op, negated)
        if node.op == "LogicalNot":
            negated = not negated
        elif node.op not in FLAG_PASS:
            return None
        ref = index.data_inputs(node)[0]


def _normalize_flags(set_flags: dict[str, bool] | None) -> dict[str, bool]:
    return {parse_input(name)[0]: bool(value) for name, value in (set_flags or {}).items()}


def flag_value(index: GraphIndex, flag: Flag, set_flags: dict[str, bool], assume_inference: bool = False) -> tuple[bool | None, str]:
    """The flag's value at inference (before negation) and why it is known, or ``None``."""
    node = index.node(flag.node)
    if flag.node in set_flags:
        return set_flags[flag.node], "--set"
    if flag.op == "Const":
        value = tensor_util.MakeNdarray(attr(node, "value").tensor)
        return (bool(value.reshape(-1)[0]) if value.size else None), "constant"
    if flag.node.rsplit("/", 1)[-1] == KERAS_LEARNING_PHASE:
        return False, "Keras learning phase (inference)"
    if flag.op == "PlaceholderWithDefault":
        ev = ConstEvaluator(index)
        default = ev.value(index.data_inputs(node)[0])
        if default is not None and default.size:
            return bool(default.reshape(-1)[0]), "default of PlaceholderWithDefault"
    if assume_inference and looks_like_training_flag(flag.node):
        return False, "assumed false (inference)"
    return None, "fed at run time"


def has_conds(graph_def: graph_pb2.GraphDef) -> bool:
    """Whether any node is a Switch/If/StatelessIf: one pass over op names, no index."""
    return any(node.op == "Switch" or node.op in IF_OPS for node in graph_def.node)


def find_conds(
    graph_def: graph_pb2.GraphDef,
    set_flags: dict[str, bool] | None = None,
    assume_inference: bool = False,
    index: GraphIndex | None = None,
) -> list[CondSite]:
    """Every Switch/If/StatelessIf whose predicate is a flag; loop switches are not listed."""
    if not has_conds(graph_def):
        return []
    index = index or GraphIndex(graph_def)
    flags = _normalize_flags(set_flags)
    sites = []
    for node in index:
        if node.op == "Switch":
            pred = index.data_inputs(node)[1]
        elif node.op in IF_OPS:
            pred = index.data_inputs(node)[0]
        else:
            continue
        flag = trace_flag(index, pred)
        if flag is None:
            continue
        value, how = flag_value(index, flag, flags, assume_inference)
        if value is not None and flag.negated:
            value = not value
        sites.append(CondSite(node.name, "Switch" if node.op == "Switch" else node.op, flag, value, how))
    return sites


def resolve_switches(
    graph_def: graph_pb2.GraphDef,
    set_flags: dict[str, bool] | None = None,
    protected: Iterable[str] = (),
    assume_inference: bool = False,
) -> tuple[graph_pb2.GraphDef, list[Resolution]]:
    """Keep only the taken branch of every conditional whose flag is known.

    Runs to a fixed point, so a cond nested in an inlined branch is resolved too.
    ``set_flags`` maps placeholder names to values (``--set is_training=false``);
    a name that is not a node of the graph is a usage error. Placeholders stay in
    the graph (unconnected) so callers that feed them keep working.
    """
    flags = _normalize_flags(set_flags)
    known = {n.name for n in graph_def.node}
    for name in flags:
        if name not in known:
            raise UsageError(f"--set: no node named {name!r} in the graph")
    keep = {parse_input(n)[0] for n in protected}
    resolutions: dict[tuple[str, bool], Resolution] = {}
    current, inlined = graph_def, False
    for _ in range(64):
        if not has_conds(current):
            break  # most graphs: no index is built at all
        index = GraphIndex(current)
        sites = [s for s in find_conds(current, flags, assume_inference, index) if s.value is not None]
        if not sites:
            break
        for site in sites:
            key = (site.flag.node, bool(site.value) != site.flag.negated)
            res = resolutions.setdefault(key, Resolution(site.flag.node, key[1], site.how))
            res.nodes.append(site.node)
        switches = {s.node: bool(s.value) for s in sites if s.kind == "Switch"}
        ifs = {s.node: bool(s.value) for s in sites if s.kind != "Switch"}
        if switches:
            _resolve_v1(index, switches, keep)
        for name, value in ifs.items():
            _inline_if(index, name, value, keep)
        _drop_flag_controls(index, {s.flag.node for s in sites}, keep)
        current = index.to_graph_def()
        inlined = inlined or bool(ifs)
    if inlined and current.HasField("library"):
        # Both branch functions stayed in the library, BN and all, with nothing calling them
        # (a converter or a reader would still see the BN). Only an inlined If makes dead
        # functions; a graph without one keeps its library as it was.
        current.library.CopyFrom(live_library(current))
    return current, list(resolutions.values())


# -- TF1 Switch/Merge --------------------------------------------------------
def _resolve_v1(index: GraphIndex, switches: dict[str, bool], keep: set[str]) -> None:
    """Short-circuit known Switches, then remove what only the untaken side computed."""
    alias: dict[str, str] = {}
    dead_tensors: set[str] = set()
    for name, value in switches.items():
        source = index.data_inputs(index.node(name))[0]
        taken, untaken = (1, 0) if value else (0, 1)
        alias[tensor_ref(name, taken)] = source
        dead_tensors.add(tensor_ref(name, untaken))

    def resolve(ref: str) -> str:
        while ref in alias:
            ref = alias[ref]
        return ref

    dead: set[str] = set()

    def is_dead(ref: str) -> bool:
        name, port, control = parse_input(ref)
        if control:
            return name in dead
        return name in dead or resolve(tensor_ref(name, port)) in dead_tensors

    for name in index.topological_order():
        if name in switches or name not in index:
            continue
        node = index.node(name)
        data = index.data_inputs(node)
        if node.op in ("Merge", "RefMerge"):
            live = [r for r in data if not is_dead(r)]
            entries = [r for r in data if getattr(index.producer(r)[0], "op", None) != "NextIteration"]
            if all(is_dead(r) for r in entries):
                dead.add(name)
            elif len(live) < len(data):
                _shrink_merge(index, node, live)
            continue
        if any(is_dead(r) for r in node.input):
            dead.add(name)
    hit = sorted(dead & keep)
    if hit:
        raise UsageError(f"output {hit[0]!r} is only computed on the branch not taken; choose the other flag value or other --outputs")
    seeds: list[str] = list(switches)
    for name in dead:
        seeds.extend(parse_input(r)[0] for r in index.node(name).input)
        index.remove(name)
    for node in index:
        refs = list(node.input)
        new = []
        for ref in refs:
            name, port, control = parse_input(ref)
            if control:
                new.append(None if name in switches else ref)
            else:
                new.append(resolve(tensor_ref(name, port)))
        if new != refs:
            copy = node_def_pb2.NodeDef()
            copy.CopyFrom(node)
            del copy.input[:]
            copy.input.extend(r for r in new if r is not None)
            index.replace(copy)
    _prune(index, seeds, keep)


def _shrink_merge(index: GraphIndex, node: node_def_pb2.NodeDef, live: list[str]) -> None:
    """A Merge left with one live input becomes an Identity (a Merge when its value_index is read)."""
    controls = [r for r in node.input if r.startswith("^")]
    if len(live) == 1 and not index.consumers(node.name, 1):
        new = make_node(node.name, "Identity", [live[0], *controls], {"T": node.attr["T"]}, node.device)
    else:
        new = node_def_pb2.NodeDef()
        new.CopyFrom(node)
        del new.input[:]
        new.input.extend([*live, *controls])
        new.attr["N"].i = len(live)
    index.replace(new)


def _drop_flag_controls(index: GraphIndex, flags: set[str], keep: set[str]) -> None:
    """Drop control edges from a resolved flag (and the pivots that only forward it).

    TF1 cond pins branch constants on ``^cond/switch_t``; once the Switch is gone
    that pivot is an Identity of the flag, and the edge would make the flag a
    required feed again.
    """
    pivots = set(flags)
    for node in index:
        if node.op in FLAG_PASS | {"LogicalNot"}:
            flag = trace_flag(index, node.name)
            if flag is not None and flag.node in flags:
                pivots.add(node.name)
    seeds = []
    for pivot in pivots:
        for reader in index.control_consumers(pivot):
            index.drop_control_input(reader.node, pivot)
            seeds.append(pivot)
    _prune(index, seeds, keep)


# -- TF2 If/StatelessIf ------------------------------------------------------
def _function(index: GraphIndex, name: str) -> function_pb2.FunctionDef:
    for fdef in index.library.function:
        if fdef.signature.name == name:
            return fdef
    raise UsageError(f"function {name!r} of a conditional is missing from the graph's library")


def _inline_if(index: GraphIndex, name: str, value: bool, keep: set[str]) -> None:
    """Replace an If by the nodes of its taken branch, with inputs renamed to the If's arguments."""
    from tensorflow.python.framework.function_def_to_graph import function_def_to_graph_def

    node = index.node(name)
    branch = "then_branch" if value else "else_branch"
    fdef = _function(index, node.attr[branch].func.name)
    body, flat = function_def_to_graph_def(fdef)
    args = index.data_inputs(node)[1:]
    controls = [r for r in node.input if r.startswith("^")]
    arg_map = {arg.name: args[i] for i, arg in enumerate(fdef.signature.input_arg)}
    base = f"{name}/{'then' if value else 'else'}"
    prefix, n = base, 1
    while any(f"{prefix}/{b.name}" in index for b in body.node):
        prefix, n = f"{base}_{n}", n + 1
    rename = {b.name: f"{prefix}/{b.name}" for b in body.node if b.name not in arg_map}

    def map_ref(ref: str) -> str:
        src, port, control = parse_input(ref)
        if src in arg_map:
            return f"^{parse_input(arg_map[src])[0]}" if control else arg_map[src]
        return f"^{rename[src]}" if control else tensor_ref(rename[src], port)

    added = []
    for b in body.node:
        if b.name in arg_map:
            continue
        new = node_def_pb2.NodeDef()
        new.CopyFrom(b)
        new.name = rename[b.name]
        del new.input[:]
        new.input.extend(map_ref(r) for r in b.input)
        if not b.input:
            new.input.extend(controls)
        if not new.device:
            new.device = node.device
        index.add(new)
        added.append(new.name)
    outputs = []
    for out_arg in fdef.signature.output_arg:
        ret = fdef.ret[out_arg.name]
        outputs.append(map_ref(flat[ret]) if ret in flat else map_ref(ret))
    for reader in index.consumers(name):
        index.set_input(reader.node, reader.slot, outputs[reader.index])
    seeds = [parse_input(r)[0] for r in node.input]
    if name in keep or index.control_consumers(name):
        attrs = {"T": attr_value_pb2.AttrValue(list=attr_value_pb2.AttrValue.ListValue(type=list(attr(node, "Tout").list.type)))}
        index.replace(make_node(name, "IdentityN", outputs, attrs, node.device))
    else:
        index.remove(name)
    _prune(index, seeds + added, keep)


def _prune(index: GraphIndex, seeds: list[str], keep: set[str]) -> None:
    """Remove nodes an edit left unread (never placeholders or protected nodes)."""
    stack = list(seeds)
    while stack:
        name = stack.pop()
        if name not in index or name in keep:
            continue
        node = index.node(name)
        if node.op in ("Placeholder", "PlaceholderWithDefault") or index.has_consumers(name):
            continue
        stack.extend(parse_input(r)[0] for r in node.input)
        index.remove(name)


# -- training-mode FusedBatchNorm -> moving statistics -------------------------
def _channels(index: GraphIndex, ev: ConstEvaluator, node: node_def_pb2.NodeDef) -> int | None:
    scale = ev.value(index.data_inputs(node)[1])
    return int(scale.size) if scale is not None else None


def _vector_const(ev: ConstEvaluator, ref: str, channels: int | None) -> bool:
    if not ev.is_const(ref):
        return False
    value = ev.value(ref)
    return value is not None and value.size > 0 and (channels is None or value.size == channels)


def find_moving_stats(index: GraphIndex, ev: ConstEvaluator, node: node_def_pb2.NodeDef) -> tuple[str, str, str] | None:
    """Moving mean/variance constants of a training-mode fused BN: (mean ref, var ref, where found).

    Looked for in order: the BN's own mean/variance inputs when non-empty (Keras
    passes them when momentum is applied in the kernel); the ``AssignMovingAvg``
    update, ``moving - (moving - batch_stat) * (1 - momentum)``, which reads the
    moving constant beside the BN's batch-statistic output; a constant named
    ``moving_mean``/``moving_variance`` in the BN's name scope.
    """
    channels = _channels(index, ev, node)
    inputs = index.data_inputs(node)
    if len(inputs) >= 5 and _vector_const(ev, inputs[3], channels) and _vector_const(ev, inputs[4], channels):
        return inputs[3], inputs[4], "the BN's mean/variance inputs"
    found = []
    for port in (1, 2):
        found.append(_assign_moving_avg_source(index, ev, node.name, port, channels))
    if all(found):
        return found[0], found[1], "the AssignMovingAvg update"  # type: ignore[return-value]
    by_name = _scope_constants(index, ev, node.name, channels)
    if by_name:
        return by_name[0], by_name[1], "constants named moving_mean/moving_variance in the BN's scope"
    return None


def _assign_moving_avg_source(index: GraphIndex, ev: ConstEvaluator, name: str, port: int, channels: int | None) -> str | None:
    frontier = [(name, port)]
    for _ in range(4):
        nxt = []
        for src, idx in frontier:
            for reader in index.consumers(src, idx):
                node = index.node(reader.node)
                if node.op == "Sub" and reader.slot == 1:
                    other = index.data_inputs(node)[0]
                    if _vector_const(ev, other, channels):
                        return other
                if node.op in ("Identity", "Snapshot"):
                    nxt.append((node.name, 0))
        frontier = nxt
    return None


def _scope_constants(index: GraphIndex, ev: ConstEvaluator, name: str, channels: int | None) -> tuple[str, str] | None:
    scope = name
    while "/" in scope:
        scope = scope.rsplit("/", 1)[0]
        found = []
        for stat in ("moving_mean", "moving_variance"):
            hits = [
                n.name
                for n in index
                if n.name.startswith(scope + "/")
                and (n.name.endswith(stat) or n.name.endswith(f"{stat}/read"))
                and _vector_const(ev, n.name, channels)
            ]
            found.append(sorted(hits, key=len)[0] if hits else None)
        if found[0] and found[1]:
            return found[0], found[1]
    return None


def use_moving_stats(graph_def: graph_pb2.GraphDef) -> tuple[graph_pb2.GraphDef, list[TrainingBnRewrite]]:
    """Switch every ``is_training=True`` fused BN to inference mode on its moving statistics.

    This changes what the graph computes (batch statistics -> moving averages),
    which is the point: the caller must verify against the rewritten graph.
    """
    index = GraphIndex(graph_def)
    ev = ConstEvaluator(index)
    records = []
    for node in index:
        if not node.op.startswith("FusedBatchNorm") or node.op.startswith("FusedBatchNormGrad"):
            continue
        if not (attr(node, "is_training").b if "is_training" in node.attr else True):
            continue
        found = find_moving_stats(index, ev, node)
        if found is None:
            records.append(TrainingBnRewrite(node.name, False, "no constant moving mean/variance found in the graph"))
            continue
        mean_ref, var_ref, where = found
        new = node_def_pb2.NodeDef()
        new.CopyFrom(node)
        new.attr["is_training"].b = False
        if "exponential_avg_factor" in new.attr:
            new.attr["exponential_avg_factor"].f = 1.0
        inputs = list(new.input)
        data_slots = [i for i, r in enumerate(inputs) if not r.startswith("^")]
        old = [inputs[data_slots[3]], inputs[data_slots[4]]]
        inputs[data_slots[3]], inputs[data_slots[4]] = mean_ref, var_ref
        del new.input[:]
        new.input.extend(inputs)
        index.replace(new)
        _prune(index, [parse_input(r)[0] for r in old], set())
        records.append(TrainingBnRewrite(node.name, True, f"moving statistics from {where}"))
    if not any(r.rewritten for r in records):
        return graph_def, records
    return index.to_graph_def(), records


def bool_feed(value: bool) -> np.ndarray:
    """The feed that matches a resolved flag, for verifying against the original graph."""
    return np.array(value)


TRAINING_BN_MODES = ("keep", "moving-stats")


def canonicalize(
    graph_def: graph_pb2.GraphDef,
    set_flags: dict[str, bool] | None = None,
    training_bn: str = "keep",
    protected: Iterable[str] = (),
) -> tuple[graph_pb2.GraphDef, list[Resolution], list[TrainingBnRewrite]]:
    """The canonicalize stage of ``bnfold.fold``: resolve training switches, then (if asked) training BN.

    Switches go first so a training-mode BN on the untaken branch is never
    rewritten, and one inlined from an ``If`` branch is.
    """
    if training_bn not in TRAINING_BN_MODES:
        raise UsageError(f"--training-bn: expected one of {', '.join(TRAINING_BN_MODES)}, got {training_bn!r}")
    resolved, resolutions = resolve_switches(graph_def, set_flags, protected)
    rewrites: list[TrainingBnRewrite] = []
    if training_bn == "moving-stats":
        resolved, rewrites = use_moving_stats(resolved)
    return resolved, resolutions, rewrites


def without_cond_plumbing(graph_def: graph_pb2.GraphDef, names: list[str]) -> list[str]:
    """Drop TF1 cond pivots (``cond/switch_t``: an Identity of a Switch read only by control edges) from sinks.

    They look like outputs to a sink search but only order the branch's constants;
    keeping them as outputs would pin the branch that resolution removes.
    """
    nodes = {n.name: n for n in graph_def.node}

    def pivot(name: str) -> bool:
        node = nodes.get(parse_input(name)[0])
        if node is None or node.op != "Identity" or not node.input:
            return False
        src = nodes.get(parse_input(node.input[0])[0])
        return src is not None and src.op == "Switch"

    return [n for n in names if not pivot(n)]
