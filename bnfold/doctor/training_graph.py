"""What a TF1 training graph says about its BN layers, and the findings it and its checkpoint give.

The MetaGraphDef is analysed as a proto, nothing of it is run: each BN layer's
moving-statistics variables, every op that updates them with its decay, and
whether the train op reaches those updates (:func:`analyse`). The checks turn
that, and the values :mod:`bnfold.doctor.training` reads from the checkpoint,
into findings: updates the train op never runs, a degenerate decay, statistics
still at their initial 0/1 (and the trained layer a never-updated copy
duplicates).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from google.protobuf.message import DecodeError
from tensorflow.core.framework import node_def_pb2
from tensorflow.core.protobuf import meta_graph_pb2

from bnfold.core.errors import UsageError
from bnfold.core.findings import Finding
from bnfold.tf.canonical import ConstEvaluator
from bnfold.tf.graph import GraphIndex, attr, parse_input
from bnfold.tf.recognize import FUSED_BN_OPS

VARIABLE_OPS = {"VariableV2", "Variable", "VarHandleOp"}
ASSIGN_OPS = {"Assign", "AssignSub", "AssignAdd", "AssignVariableOp", "AssignSubVariableOp", "AssignAddVariableOp"}
# Ops between a variable and the op that writes or reads it.
_HANDLE_PASS = {"Identity", "RefIdentity", "Snapshot", "ReadVariableOp", "Switch", "RefSwitch", "Enter", "RefEnter"}
# Ops a scalar decay passes through in the update (``1 - decay``, a cond on the training flag).
_SCALAR_BINARY = {"Sub": np.subtract, "Mul": np.multiply, "AddV2": np.add, "Add": np.add, "RealDiv": np.divide}
_SCALAR_PASS = {"Identity", "Snapshot", "Cast", "StopGradient", "Switch", "Squeeze", "Reshape"}
_RESTORE_OPS = {"RestoreV2", "Restore", "RestoreSlice"}
OPTIMIZER_PREFIXES = ("Apply", "ResourceApply", "SparseApply", "ResourceSparseApply")
_UNIQUIFIER = re.compile(r"_\d+$")


# -- what the training graph says ------------------------------------------------
@dataclass
class Update:
    """One op that writes a moving statistic: the call site it belongs to, its weight for the new batch, whether it runs."""

    node: str
    variable: str
    site: str
    factor: float | None  # 1 - decay: 0 never moves, 1 keeps only the last batch; None when not constant
    run: bool | None = None  # reachable from the train op; None when no train op is known


@dataclass
class Layer:
    """The moving statistics of one BN (its variables), and every op that updates them."""

    scope: str
    order: int
    mean: str | None = None
    variance: str | None = None
    updates: list[Update] = field(default_factory=list)

    @property
    def variables(self) -> list[str]:
        return [v for v in (self.mean, self.variance) if v is not None]


@dataclass
class TrainingGraph:
    """The BN layers of a training graph, its train op, and the nodes the train op runs."""

    layers: list[Layer]
    train_op: list[str]
    train_op_how: str
    update_collection: set[str]


def _trace_variable(index: GraphIndex, ref: str, limit: int = 8) -> str | None:
    for _ in range(limit):
        node, _ = index.producer(ref)
        if node is None:
            return None
        if node.op in VARIABLE_OPS:
            return node.name
        if node.op not in _HANDLE_PASS:
            return None
        ref = index.data_inputs(node)[0]
    return None


def _initializers(meta: meta_graph_pb2.MetaGraphDef) -> set[str]:
    """Initializer ops named by the variable collections (``VariableDef.initializer_name``)."""
    from tensorflow.core.framework import variable_pb2

    names = set()
    for collection in meta.collection_def.values():
        for raw in collection.bytes_list.value:
            var = variable_pb2.VariableDef()
            try:
                var.ParseFromString(raw)
            except DecodeError:
                continue
            if var.initializer_name:
                names.add(parse_input(var.initializer_name)[0])
    return names


def _collection_nodes(meta: meta_graph_pb2.MetaGraphDef, key: str) -> list[str]:
    if key not in meta.collection_def:
        return []
    return [parse_input(v)[0] for v in meta.collection_def[key].node_list.value]


def possible_scalars(index: GraphIndex, ev: ConstEvaluator, ref: str, depth: int = 0) -> set[float] | None:
    """Every value a scalar can take, following both sides of a cond (``Merge``, ``If``), or None.

    Keras and ``tf.layers`` write the momentum as ``smart_cond(training, momentum, 1.0)``;
    both branches are returned, and the caller decides which is the training one.
    """
    value = ev.value(ref)
    if value is not None:
        return {float(v) for v in np.ravel(value)} if value.size == 1 else None
    node, port = index.producer(ref)
    if node is None or depth > 12:
        return None
    inputs = index.data_inputs(node)
    if node.op == "Merge":
        found: set[float] = set()
        for r in inputs:
            sub = possible_scalars(index, ev, r, depth + 1)
            if sub is None:
                return None
            found |= sub
        return found
    if node.op in _SCALAR_PASS:
        return possible_scalars(index, ev, inputs[0], depth + 1)
    if node.op in _SCALAR_BINARY:
        a, b = (possible_scalars(index, ev, r, depth + 1) for r in inputs[:2])
        if a is None or b is None or len(a) * len(b) > 16:
            return None
        with np.errstate(all="ignore"):
            return {float(_SCALAR_BINARY[node.op](x, y)) for x in a for y in b}
    if node.op in ("If", "StatelessIf"):
        found = set[float]()
        for key in ("then_branch", "else_branch"):
            scalar = _function_output_scalar(index, attr(node, key).func.name, port)
            if scalar is None:
                return None
            found.add(scalar)
        return found
    return None


def _function_output_scalar(index: GraphIndex, name: str, port: int) -> float | None:
    """A branch function's output ``port`` when it is a constant scalar."""
    for function in index.library.function:
        if function.signature.name != name or port >= len(function.signature.output_arg):
            continue
        ref = function.ret[function.signature.output_arg[port].name]
        node_name = ref.split(":")[0]
        for node in function.node_def:
            if node.name == node_name and node.op == "Identity" and node.input:
                node_name = node.input[0].split(":")[0]
        for node in function.node_def:
            if node.name == node_name and node.op == "Const":
                from tensorflow.python.framework import tensor_util

                value = tensor_util.MakeNdarray(node.attr["value"].tensor)
                return float(np.ravel(value)[0]) if value.size == 1 else None
    return None


def _batch_moment_behind(index: GraphIndex, ref: str) -> tuple[bool, bool]:
    """(whether ``ref`` is computed from a batch statistic, whether that statistic is a variance)."""
    for node in index.walk(parse_input(ref)[0], limit=40, stop=lambda n: n.op in VARIABLE_OPS):
        if node.op in FUSED_BN_OPS:
            return True, False
        if node.op == "SquaredDifference":
            return True, True
        if node.op == "Mean":
            return True, False
    return False, False


def _factor(index: GraphIndex, ev: ConstEvaluator, node: node_def_pb2.NodeDef, variable: str) -> tuple[float | None, str | None]:
    """The update's weight for the new batch statistic (1 - decay), and the batch statistic's tensor.

    ``assign_moving_average`` writes ``var -= (var - value) * (1 - decay)``; a fused
    Keras BN computes the new average in the kernel (``exponential_avg_factor``)
    and assigns it.
    """
    inputs = index.data_inputs(node)
    if len(inputs) < 2:
        return None, None
    if node.op in ("AssignSub", "AssignSubVariableOp"):
        for mul in index.walk(parse_input(inputs[1])[0], limit=6, stop=lambda n: n.op == "Mul"):
            if mul.op != "Mul":
                continue
            operands = index.data_inputs(mul)
            for pos, ref in enumerate(operands[:2]):
                values = possible_scalars(index, ev, ref)
                other = operands[1 - pos]
                diff, _ = index.producer(other)
                if values is None or diff is None or diff.op != "Sub":
                    continue
                value_ref = index.data_inputs(diff)[1]
                # the no-update branch of smart_cond(training, momentum, 1.0) weighs the batch 0: take the largest
                return max(values), value_ref
        return None, None
    value, port = index.producer(inputs[1])
    while value is not None and value.op in _HANDLE_PASS - {"ReadVariableOp"}:
        value, port = index.producer(index.data_inputs(value)[0])
    if value is not None and value.op in FUSED_BN_OPS and port in (1, 2):
        factor = attr(value, "exponential_avg_factor").f if "exponential_avg_factor" in value.attr else 1.0
        return float(factor), inputs[1]
    return None, inputs[1]


def _role(variable: str, value_ref: str | None, index: GraphIndex) -> str:
    low = variable.lower().rsplit("/", 1)[-1]
    if "var" in low:
        return "variance"
    if "mean" in low:
        return "mean"
    if value_ref is not None:
        return "variance" if _batch_moment_behind(index, value_ref)[1] else "mean"
    return "mean"


def _layer_scope(variable: str) -> str:
    name = variable
    if name.endswith("/ExponentialMovingAverage"):
        name = name[: -len("/ExponentialMovingAverage")]
    if "/moments/" in name:
        return name.split("/moments/")[0]
    return name.rsplit("/", 1)[0] if "/" in name else ""


def _site(update: str) -> str:
    """The BN call site an update belongs to: its name scope, without the update's own scopes."""
    name = update.split("/AssignMovingAvg")[0] if "/AssignMovingAvg" in update else update.rsplit("/", 1)[0]
    return name[: -len("/ExponentialMovingAverage")] if name.endswith("/ExponentialMovingAverage") else name


def _is_moving_stat_name(name: str) -> bool:
    low = name.lower().rsplit("/", 1)[-1]
    return low in ("moving_mean", "moving_variance", "moving_var", "running_mean", "running_var", "running_variance")


def find_train_op(index: GraphIndex, meta: meta_graph_pb2.MetaGraphDef, train_op: list[str] | None) -> tuple[list[str], str]:
    """The train op: ``--train-op``, the ``train_op`` collection, or the sinks the optimizer's apply ops lead to."""
    if train_op:
        names = [parse_input(n)[0] for n in train_op]
        missing = [n for n in names if n not in index]
        if missing:
            raise UsageError(f"--train-op: no node named {missing[0]!r} in the training graph")
        return names, "--train-op"
    listed = sorted({n for n in _collection_nodes(meta, "train_op") if n in index})
    if listed:
        return listed, "the train_op collection"
    applies = [n.name for n in index if n.op.startswith(OPTIMIZER_PREFIXES)]
    if not applies:
        return [], "none found"
    sinks, seen, stack = [], set(), list(applies)
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        readers = [c.node for c in index.consumers(name)] + [c.node for c in index.control_consumers(name)]
        if not readers:
            sinks.append(name)
        stack.extend(readers)
    return sorted(sinks), "the optimizer's apply ops"


def _reachable(index: GraphIndex, roots: list[str]) -> set[str]:
    """Every node that running ``roots`` runs: ancestors through data and control edges."""
    seen: set[str] = set()
    stack = list(roots)
    while stack:
        name = stack.pop()
        if name in seen or name not in index:
            continue
        seen.add(name)
        stack.extend(parse_input(r)[0] for r in index.node(name).input)
    return seen


def analyse(meta: meta_graph_pb2.MetaGraphDef, train_op: list[str] | None = None) -> TrainingGraph:
    """The BN layers of a training graph, statically: variables, their updates, and which updates the train op runs."""
    index = GraphIndex(meta.graph_def)
    ev = ConstEvaluator(index)
    initializers = _initializers(meta)
    layers: dict[str, Layer] = {}
    order = {node.name: i for i, node in enumerate(meta.graph_def.node)}

    def layer_of(variable: str, role: str) -> Layer:
        scope = _layer_scope(variable)
        layer = layers.setdefault(scope, Layer(scope, order[variable]))
        if getattr(layer, role) is None:
            setattr(layer, role, variable)
        return layer

    for node in index:
        if node.op not in ASSIGN_OPS or node.name in initializers:
            continue
        inputs = index.data_inputs(node)
        variable = _trace_variable(index, inputs[0]) if inputs else None
        if variable is None or len(inputs) < 2 or ev.is_const(inputs[1]):
            continue
        if any(n.op in _RESTORE_OPS for n in index.walk(parse_input(inputs[1])[0], limit=6)):
            continue
        factor, value_ref = _factor(index, ev, node, variable)
        from_batch = value_ref is not None and _batch_moment_behind(index, value_ref)[0]
        if not (_is_moving_stat_name(variable) or (factor is not None and from_batch)):
            continue  # an EMA of weights, a counter, an optimizer slot: not BN statistics
        layer = layer_of(variable, _role(variable, value_ref, index))
        layer.updates.append(Update(node.name, variable, _site(node.name), factor))
    # statistics no op updates (a BN built with training=False only, the validation copy)
    for node in index:
        if node.op in VARIABLE_OPS and _is_moving_stat_name(node.name):
            layer_of(node.name, _role(node.name, None, index))
    roots, how = find_train_op(index, meta, train_op)
    if roots:
        runs = _reachable(index, roots)
        for layer in layers.values():
            for update in layer.updates:
                update.run = update.node in runs
    return TrainingGraph(sorted(layers.values(), key=lambda layer: layer.order), roots, how, set(_collection_nodes(meta, "update_ops")))


# -- findings -----------------------------------------------------------------------
FIX_UPDATES = (
    "build the optimizer step inside `with tf.control_dependencies(tf.compat.v1.get_collection(tf.compat.v1.GraphKeys.UPDATE_OPS)):`, "
    "reading the collection after every tower is built (or pass updates_collections=None), then retrain or recompute the statistics"
)


def _names(items: list[str], limit: int = 6) -> str:
    return ", ".join(items[:limit]) + (f" (+{len(items) - limit} more)" if len(items) > limit else "")


def check_updates(graph: TrainingGraph) -> list[Finding]:
    """BN_UPDATES_NOT_RUN: moving-average updates the train op does not reach."""
    if not graph.train_op:
        if any(layer.updates for layer in graph.layers):
            return [
                Finding(
                    "BN_UPDATES_NOT_RUN",
                    "info",
                    [],
                    "no train op found (no train_op collection, no optimizer apply ops), so bnfold cannot tell whether the BN updates run.",
                    "name the train op: bnfold doctor CKPT --train-op NAME",
                )
            ]
        return []
    never: list[Layer] = []
    partly: list[tuple[Layer, list[str], list[str]]] = []
    for layer in graph.layers:
        if not layer.updates:
            continue
        sites_run = sorted({u.site for u in layer.updates if u.run})
        sites_not = sorted({u.site for u in layer.updates if not u.run} - set(sites_run))
        if not sites_run:
            never.append(layer)
        elif sites_not:
            partly.append((layer, sites_not, sites_run))
    train = _names(graph.train_op, 3)
    findings = []
    if never:
        updates = [u.node for layer in never for u in layer.updates]
        in_collection = [u for u in updates if u in graph.update_collection]
        where = (
            "They are in UPDATE_OPS, so the collection was never wired to the train op (or read before these layers existed)."
            if in_collection
            else "They are in no UPDATE_OPS collection the train op depends on."
        )
        findings.append(
            Finding(
                "BN_UPDATES_NOT_RUN",
                "error",
                [layer.scope for layer in never],
                f"the train op ({train}, from {graph.train_op_how}) never runs the moving-average updates of {len(never)} BN layer(s) "
                f"({_names([layer.scope for layer in never])}): no data or control edge leads from it to {_names(updates, 4)}. "
                f"Their moving mean/variance keep their initial values, and inference normalizes with them. {where}",
                FIX_UPDATES,
                {"train_op": graph.train_op, "updates": updates, "in_update_ops": in_collection},
            )
        )
    if partly:
        sites = sorted({s for _, not_run, _ in partly for s in not_run})
        run_sites = sorted({s for _, _, run in partly for s in run})
        findings.append(
            Finding(
                "BN_UPDATES_NOT_RUN",
                "warning",
                sites,
                f"the train op ({train}) does not run the moving-average updates built at {_names(sites)}; the same variables are updated "
                f"only from {_names(run_sites)}, so the statistics see that tower's share of each batch. This is what reading UPDATE_OPS "
                "before the other towers are built does (deliberate in some multi-GPU code, which keeps one tower's updates).",
                FIX_UPDATES,
                {"train_op": graph.train_op, "not_run": sites, "run": run_sites, "layers": [layer.scope for layer, _, _ in partly]},
            )
        )
    return findings


def check_momentum(graph: TrainingGraph) -> list[Finding]:
    """BN_MOMENTUM_DEGENERATE: decay (momentum) 1 keeps the statistics still, 0 keeps only the last batch."""
    findings = []
    for decay, meaning, fix in (
        (1.0, "the statistics never move from their initial 0/1", "use decay/momentum below 1 (0.9-0.999), then retrain"),
        (0.0, "the statistics are those of the last training batch only", "use decay/momentum near 1 (0.9-0.999), then retrain"),
    ):
        hits = [
            layer
            for layer in graph.layers
            if layer.updates and all(u.factor is not None and abs(u.factor - (1.0 - decay)) < 1e-6 for u in layer.updates)
        ]
        if hits:
            findings.append(
                Finding(
                    "BN_MOMENTUM_DEGENERATE",
                    "warning",
                    [layer.scope for layer in hits],
                    f"the moving-average updates of {len(hits)} BN layer(s) ({_names([layer.scope for layer in hits])}) use decay (momentum) "
                    f"{decay:g} (read from the update ops' constants: each step moves the average by {1.0 - decay:g} of the way): {meaning}.",
                    fix,
                    {"decay": decay, "updates": [u.node for layer in hits for u in layer.updates]},
                )
            )
    return findings


def _normalized(scope: str) -> list[str]:
    return [_UNIQUIFIER.sub("", part) for part in scope.split("/") if part]


def _suffix_match(a: list[str], b: list[str]) -> int:
    count = 0
    while count < min(len(a), len(b)) and a[-1 - count] == b[-1 - count]:
        count += 1
    return count


def probable_original(layer: Layer, trained: list[Layer], shapes: dict[str, tuple[int, ...]], rank: dict[str, int]) -> Layer | None:
    """The trained layer a never-updated copy most likely duplicates: same shape, most of its scope, nearest in order."""
    shape = shapes.get(layer.mean or "")
    candidates = [t for t in trained if shapes.get(t.mean or "") == shape]
    if not candidates:
        return None
    mine = _normalized(layer.scope)
    return max(candidates, key=lambda t: (_suffix_match(mine, _normalized(t.scope)), -abs(rank[t.scope] - rank[layer.scope])))


def check_stats_at_init(graph: TrainingGraph, reader: Any) -> tuple[list[Finding], list[str]]:
    """BN_STATS_AT_INIT from the checkpoint's values; for a BN no op updates, the trained layer it probably duplicates."""
    values: dict[str, np.ndarray] = {}
    missing: list[str] = []
    for layer in graph.layers:
        for name in layer.variables:
            if reader.has_tensor(name):
                values[name] = np.asarray(reader.get_tensor(name))
            else:
                missing.append(name)
    shapes = {name: tuple(v.shape) for name, v in values.items()}

    def at_init(layer: Layer) -> bool:
        mean, var = values.get(layer.mean or ""), values.get(layer.variance or "")
        return mean is not None and var is not None and mean.size > 0 and bool(np.all(mean == 0) and np.all(var == 1))

    trained = [layer for layer in graph.layers if layer.updates and not at_init(layer)]
    rank: dict[str, int] = {}
    for group in (trained, [layer for layer in graph.layers if not layer.updates]):
        by_shape: dict[tuple[int, ...], int] = {}
        for layer in group:
            shape = shapes.get(layer.mean or "", ())
            rank[layer.scope] = by_shape.get(shape, 0)
            by_shape[shape] = rank[layer.scope] + 1
    findings = []
    for layer in graph.layers:
        if not at_init(layer):
            continue
        channels = int(values[layer.mean].size)  # type: ignore[index]
        details: dict[str, object] = {"channels": channels, "variables": layer.variables, "from": "checkpoint"}
        if layer.updates:
            message = (
                f"in the checkpoint, moving mean is exactly 0 and moving variance exactly 1 on all {channels} channels of {layer.scope}: "
                "the moving averages were never updated, so inference normalizes with placeholder statistics."
            )
            fix = "run the update ops with the train op (see BN_UPDATES_NOT_RUN / BN_MOMENTUM_DEGENERATE), then retrain or recompute the statistics"
        else:
            original = probable_original(layer, trained, shapes, rank)
            copy_note = ""
            gamma, beta = f"{layer.scope}/gamma", f"{layer.scope}/beta"
            if reader.has_tensor(gamma) and reader.has_tensor(beta):
                g, b = np.asarray(reader.get_tensor(gamma)), np.asarray(reader.get_tensor(beta))
                if np.all(g == 1) and np.all(b == 0):
                    copy_note = " Its gamma/beta are still 1/0 too: it shares no variables with the trained layer."
            dup = (
                f" It probably duplicates the training layer {original.scope} (same shape {list(shapes[layer.mean])}, same role, another scope)."  # type: ignore[index]
                if original is not None
                else ""
            )
            details["duplicates"] = original.scope if original is not None else None
            message = (
                f"in the checkpoint, {layer.scope} has moving mean exactly 0 and moving variance exactly 1 on all {channels} channels, "
                f"and no op in the graph ever updates them: a BN built apart from training (a validation copy without reuse?).{dup}{copy_note}"
            )
            fix = (
                "build the evaluation network in the training layer's variable scope with reuse=True (or tf.compat.v1.AUTO_REUSE), "
                "or build the network once with training=<a placeholder>"
            )
        findings.append(Finding("BN_STATS_AT_INIT", "warning", [layer.scope], message, fix, details))
    return findings, missing
