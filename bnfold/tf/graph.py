"""A thin, mutable index over a ``GraphDef``.

Every pass goes through this index instead of walking ``node.input`` strings by
hand, so that the consumer map is built once and kept current by each edit:
folding stays linear in graph size however many sites a model has.
"""

from __future__ import annotations

import gc
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np
from tensorflow.core.framework import attr_value_pb2, function_pb2, graph_pb2, node_def_pb2, tensor_pb2
from tensorflow.python.framework import dtypes, tensor_util

from bnfold.core.comparison import parse_input
from bnfold.tf.tensors import ContentBuffer, Scratch, plain_dtype, varint

if TYPE_CHECKING:
    from bnfold.tf.streaming import Contents, LazyTensor

__all__ = ["ContentBuffer", "GraphIndex", "Scratch", "plain_dtype", "collection_paused", "varint", "attr", "const_array", "make_node", "op_counts", "parse_input", "tensor_ref"]


@contextmanager
def collection_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector for a pass over a whole graph.

    A pass makes several small objects per node (index entries, edges, node
    wrappers) and frees few, so the collector's full sweeps run again and again
    over a heap that grows with the graph: on 1600 conv blocks that made each
    block cost more the more blocks there were. The objects form no cycles worth
    collecting mid-pass; collection resumes (as it was) when the pass ends.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def tensor_ref(node: str, index: int = 0) -> str:
    """The NodeDef spelling of output ``index`` of ``node``."""
    return node if index == 0 else f"{node}:{index}"


class Consumer:
    """One edge into a node: which node reads, at which input slot."""

    __slots__ = ("node", "slot", "index", "control")

    def __init__(self, node: str, slot: int, index: int, control: bool) -> None:
        self.node = node
        self.slot = slot
        self.index = index
        self.control = control


class GraphIndex:
    """Name -> node and name -> consumers, kept in step with every edit.

    Nodes are held in the original order; new nodes go at the end, so the
    written graph is deterministic for the same input and options. Nodes of the
    caller's GraphDef are shared, never edited: every edit replaces a node.
    """

    def __init__(self, graph_def: graph_pb2.GraphDef, in_place: bool = False, contents: Contents | None = None) -> None:
        self._template_source = graph_def  # versions and library of the result
        self.contents = contents  # values of large constants left in the model file (bnfold.tf.streaming)
        self.nodes: dict[str, node_def_pb2.NodeDef] = {node.name: node for node in graph_def.node}
        in_place = in_place and len(self.nodes) == len(graph_def.node)
        # New constants are built inside the GraphDef that becomes the result: the source itself
        # in place (it belongs to the caller's fold), else a new one. Either way the bytes of new
        # weights are written once, never copied into the result afterwards.
        self._target: graph_pb2.GraphDef | None = graph_def if in_place else None
        self._in_place = in_place
        self._original: dict[str, node_def_pb2.NodeDef] = dict(self.nodes) if in_place else {}
        self._appended: list[node_def_pb2.NodeDef] = []  # built inside the target's node list, in order
        self._readded: set[str] = set()  # original names removed and then added again (they move to the end)
        self._consumers: dict[str, list[Consumer]] = defaultdict(list)
        self._stale_controls: dict[str, set[str]] = {}  # reader -> ^inputs to drop (drop_control_readers)
        for node in self.nodes.values():
            self._link(node)

    # -- reading -------------------------------------------------------------
    @property
    def library(self):  # type: ignore[no-untyped-def]
        """The graph's function library (kept as it is in the result)."""
        return self._template_source.library

    @property
    def versions(self):  # type: ignore[no-untyped-def]
        """The graph's producer versions (how TensorFlow reads its nodes)."""
        return self._template_source.versions

    def __contains__(self, name: str) -> bool:
        return name in self.nodes

    def __iter__(self) -> Iterator[node_def_pb2.NodeDef]:
        return iter(list(self.nodes.values()))

    def node(self, name: str) -> node_def_pb2.NodeDef:
        return self.nodes[name]

    def const_value(self, node: node_def_pb2.NodeDef) -> np.ndarray:
        """A ``Const`` node's value, read from the model file where the graph holds a stub of it."""
        lazy = self.contents.get(node) if self.contents is not None else None
        if lazy is not None:
            return lazy.read()
        return const_array(attr(node, "value").tensor)

    def lazy_value(self, ref: str) -> LazyTensor | None:
        """The values behind ``ref`` when they are a stub's (through ops that only forward them), else None."""
        if self.contents is None:
            return None
        from bnfold.tf.graph import PASS_THROUGH

        node, port = self.producer(ref)
        while node is not None and node.op in PASS_THROUGH:
            inputs = self.data_inputs(node)
            if not inputs:
                return None
            node, port = self.producer(inputs[port if node.op == "IdentityN" else 0])
        return self.contents.get(node) if node is not None and node.op == "Const" and port == 0 else None

    def full_node(self, node: node_def_pb2.NodeDef) -> node_def_pb2.NodeDef:
        """``node`` with its values in it (a copy where it is a stub), for a graph TensorFlow will run."""
        return self.contents.materialized(node) if self.contents is not None else node

    def producer(self, ref: str) -> tuple[node_def_pb2.NodeDef | None, int]:
        """The node behind an input string, and which of its outputs it is."""
        name, index, _ = parse_input(ref)
        return self.nodes.get(name), index

    def data_inputs(self, node: node_def_pb2.NodeDef) -> list[str]:
        return [ref for ref in node.input if not ref.startswith("^")]

    def consumers(self, name: str, index: int | None = None) -> list[Consumer]:
        """Data consumers of ``name`` (of one output when ``index`` is given)."""
        return [c for c in self._consumers.get(name, ()) if not c.control and (index is None or c.index == index)]

    def control_consumers(self, name: str) -> list[Consumer]:
        return [c for c in self._consumers.get(name, ()) if c.control]

    def has_consumers(self, name: str) -> bool:
        return bool(self._consumers.get(name))

    def walk(
        self,
        start: str,
        limit: int | None = None,
        stop: Callable[[node_def_pb2.NodeDef], bool] | None = None,
        forward: bool = False,
    ) -> Iterator[node_def_pb2.NodeDef]:
        """Nodes reachable from ``start`` through data inputs (or readers, ``forward``), depth first.

        ``stop(node)`` keeps a node from being expanded; ``limit`` bounds how many
        nodes are visited. The one graph walk every pass shares.
        """
        stack, seen = [start], set[str]()
        while stack and (limit is None or len(seen) < limit):
            name = stack.pop()
            if name in seen or name not in self.nodes:
                continue
            seen.add(name)
            node = self.nodes[name]
            yield node
            if stop is not None and stop(node):
                continue
            if forward:
                stack.extend(c.node for c in self.consumers(name))
            else:
                stack.extend(parse_input(r)[0] for r in node.input if not r.startswith("^"))

    def topological_order(self) -> list[str]:
        """Kahn's order over data and control edges; nodes on cycles (loops) last."""
        pending = {name: 0 for name in self.nodes}
        for node in self.nodes.values():
            pending[node.name] = sum(1 for ref in node.input if parse_input(ref)[0] in self.nodes)
        ready = [name for name, count in pending.items() if count == 0]
        order: list[str] = []
        while ready:
            name = ready.pop()
            order.append(name)
            for consumer in self._consumers.get(name, ()):
                pending[consumer.node] -= 1
                if pending[consumer.node] == 0:
                    ready.append(consumer.node)
        if len(order) < len(self.nodes):
            seen = set(order)
            order.extend(name for name in self.nodes if name not in seen)
        return order

    # -- editing -------------------------------------------------------------
    def _link(self, node: node_def_pb2.NodeDef) -> None:
        consumers, reader = self._consumers, node.name
        for slot, ref in enumerate(node.input):
            if ":" not in ref and not ref.startswith("^"):  # the common case, without parse_input's work
                consumers[ref].append(Consumer(reader, slot, 0, False))
                continue
            name, index, control = parse_input(ref)
            consumers[name].append(Consumer(reader, slot, index, control))

    def _unlink(self, node: node_def_pb2.NodeDef) -> None:
        for ref in node.input:
            name = parse_input(ref)[0]
            edges = self._consumers.get(name)
            if edges:
                edges[:] = [c for c in edges if c.node != node.name]

    def add(self, node: node_def_pb2.NodeDef) -> node_def_pb2.NodeDef:
        if node.name in self.nodes:
            raise ValueError(f"node {node.name!r} already exists")
        if node.name in self._original:
            self._readded.add(node.name)
        self.nodes[node.name] = node
        self._link(node)
        return node

    def replace(self, node: node_def_pb2.NodeDef) -> node_def_pb2.NodeDef:
        """Put ``node`` in place of the node with the same name, keeping its position."""
        self._unlink(self.nodes[node.name])
        self.nodes[node.name] = node
        self._link(node)
        return node

    def remove(self, name: str) -> None:
        node = self.nodes.pop(name)
        self._unlink(node)

    def _own_copy(self, name: str) -> node_def_pb2.NodeDef:
        """Copy a node before editing it: the caller's GraphDef is never modified."""
        node = node_def_pb2.NodeDef()
        node.CopyFrom(self.nodes[name])
        return node

    def set_input(self, name: str, slot: int, ref: str) -> None:
        node = self._own_copy(name)
        node.input[slot] = ref
        self.replace(node)

    def drop_control_readers(self, source: str) -> None:
        """Remove ``^source`` from every node that has it.

        The readers are rewritten once, when the graph is built (:meth:`to_graph_def`):
        a Keras graph's final ``NoOp`` waits on hundreds of constants, and copying it
        for each constant a fold removes was quadratic. Until then the stale control
        inputs are in no edge list, and no pass reads control inputs by name.
        """
        edges = self._consumers.get(source)
        if not edges:
            return
        for c in edges:
            if c.control:
                self._stale_controls.setdefault(c.node, set()).add(f"^{source}")
        edges[:] = [c for c in edges if not c.control]

    def _drop_stale_controls(self) -> None:
        for name, refs in self._stale_controls.items():
            if name in self.nodes:
                node = self._own_copy(name)
                kept = [ref for ref in node.input if ref not in refs]
                del node.input[:]
                node.input.extend(kept)
                self.nodes[name] = node
        self._stale_controls.clear()

    def drop_control_input(self, name: str, source: str) -> None:
        """Remove ``^source`` from ``name``'s inputs.

        Control inputs come last in a NodeDef, so no data slot shifts and only
        ``source``'s edge list needs updating: a NoOp with hundreds of control
        inputs is not relinked once per dropped edge.
        """
        node = self._own_copy(name)
        kept = [ref for ref in node.input if ref != f"^{source}"]
        del node.input[:]
        node.input.extend(kept)
        self.nodes[name] = node
        edges = self._consumers.get(source)
        if edges:
            edges[:] = [c for c in edges if not (c.node == name and c.control)]

    def unique_name(self, base: str) -> str:
        name, n = base, 1
        while name in self.nodes:
            name = f"{base}_{n}"
            n += 1
        return name

    def add_const(self, name: str, value: np.ndarray | ContentBuffer, dtype: int) -> str:
        """Add a Const node holding ``value`` and return its (unique) name."""
        node = self._new_const(name, dtype)
        fill_tensor_proto(node.attr["value"].tensor, value, dtype)
        self.add(node)
        return node.name

    def add_stub(self, name: str, lazy: LazyTensor, dtype: int) -> str:
        """Add a Const whose values stay outside the graph (computed when written, bnfold.tf.streaming)."""
        from bnfold.tf.streaming import stub_tensor

        assert self.contents is not None, "stubs need the model file's contents"
        node = self._new_const(name, dtype)
        stub_tensor(node.attr["value"].tensor, lazy, dtype)
        self.contents.add(node.name, lazy)
        self.add(node)
        return node.name

    def _new_const(self, name: str, dtype: int) -> node_def_pb2.NodeDef:
        """An empty Const under a unique name, built inside the result: its bytes are never copied again."""
        if self._target is None:
            self._target = graph_pb2.GraphDef()
        node = self._target.node.add()
        self._appended.append(node)
        node.name, node.op = self.unique_name(name), "Const"
        node.attr["dtype"].type = dtype
        return node

    def to_graph_def(self) -> graph_pb2.GraphDef:
        """The edited graph: original order, replaced nodes in place, new nodes at the end.

        In place, the source GraphDef itself is edited into this result and returned;
        otherwise the result is the GraphDef the new constants were built in, with the
        other nodes copied in. The index no longer mirrors a GraphDef afterwards.
        """
        self._drop_stale_controls()
        graph = self._target if self._target is not None else graph_pb2.GraphDef()
        if not self._in_place:
            source = self._template_source
            for field in ("versions", "library"):  # only fields the source has: an empty library is not written
                if source.HasField(field):
                    getattr(graph, field).CopyFrom(getattr(source, field))
        nodes, container = self.nodes, graph.node
        rank = {name: i for i, name in enumerate(nodes)}
        placed: set[str] = set()
        stale: list[int] = []
        slots = list(self._original.items()) + [(n.name, n) for n in self._appended]
        for position, (name, node) in enumerate(slots):
            current = nodes.get(name)
            if current is node and name not in placed and (name not in self._readded or position >= len(self._original)):
                placed.add(name)
            else:
                stale.append(position)
        # Replaced nodes and, in a copy, every node the fold kept: small ones, but for the weights it kept.
        container.extend(node for name, node in nodes.items() if name not in placed)
        # Stale nodes are emptied and renamed, one sort moves them to the end, and one cut drops them
        # (deleting each where it stands would be quadratic in graph size).
        for position in stale:
            container[position].Clear()
            container[position].name = _STALE
        end = len(rank)
        if stale or slots:
            container.sort(key=lambda n: rank.get(n.name, end))
        del container[end:]
        self._target, self._in_place, self._original, self._appended = None, False, {}, []
        self._template_source = graph
        return graph


def tensor_proto(value: np.ndarray, dtype: int) -> tensor_pb2.TensorProto:
    """A TensorProto for ``value``, whose dtype already matches ``dtype``."""
    proto = tensor_pb2.TensorProto()
    fill_tensor_proto(proto, value, dtype)
    return proto


def fill_tensor_proto(proto: tensor_pb2.TensorProto, value: np.ndarray | ContentBuffer, dtype: int) -> None:
    """Write ``value`` into an empty ``proto`` (possibly one inside a graph).

    Writes the bytes directly: ``make_tensor_proto`` makes an extra converted
    copy of every array, which is a large share of folding a 100 MB model; a
    :class:`ContentBuffer` saves one more.
    """
    array = value.array if isinstance(value, ContentBuffer) else value
    if array.dtype.kind == "O" or array.dtype != dtypes.as_dtype(dtype).as_numpy_dtype:
        proto.CopyFrom(tensor_util.make_tensor_proto(array, dtype=dtype))
        return
    proto.dtype = dtype
    for d in array.shape:
        proto.tensor_shape.dim.add().size = d
    if not array.size:
        return
    if isinstance(value, ContentBuffer):
        value.write_content(proto)
    else:
        proto.tensor_content = np.ascontiguousarray(array).tobytes()


_LITTLE_ENDIAN = sys.byteorder == "little"
_STALE = "\x00bnfold/stale"  # not a valid node name: marks nodes an in-place fold drops


def const_array(tensor: tensor_pb2.TensorProto) -> np.ndarray:
    """A Const's value; a read-only view of ``tensor_content`` when it holds the values.

    ``MakeNdarray`` copies the bytes once more than reading the field does, which
    for the kernels of a 100 MB model is a large share of a fold. Callers must not
    write into the result.
    """
    content = tensor.tensor_content
    if content and _LITTLE_ENDIAN:
        np_dtype = plain_dtype(tensor.dtype)
        if np_dtype is not None:
            shape = [d.size for d in tensor.tensor_shape.dim]
            count = 1
            for d in shape:
                count *= d
            if min(shape, default=0) >= 0 and count * np_dtype.itemsize == len(content):
                return np.frombuffer(content, dtype=np_dtype).reshape(shape)
    from bnfold.core.budgets import check_tensor

    # Values not all stored (one float broadcast to the declared shape): the shape alone decides the memory.
    check_tensor("a Const", [d.size for d in tensor.tensor_shape.dim])
    return tensor_util.MakeNdarray(tensor)


def make_node(
    name: str,
    op: str,
    inputs: Iterable[str],
    attrs: dict[str, attr_value_pb2.AttrValue] | None = None,
    device: str = "",
) -> node_def_pb2.NodeDef:
    node = node_def_pb2.NodeDef(name=name, op=op, input=list(inputs), device=device)
    for key, value in (attrs or {}).items():
        node.attr[key].CopyFrom(value)
    return node


def op_counts(graph_def: graph_pb2.GraphDef) -> dict[str, int]:
    """How many nodes of each op type: the before/after numbers of the report."""
    counts: dict[str, int] = defaultdict(int)
    for node in graph_def.node:
        counts[node.op] += 1
    return dict(sorted(counts.items()))


def attr(node: node_def_pb2.NodeDef, key: str) -> attr_value_pb2.AttrValue:
    """Read an attribute without inserting it: indexing a proto map adds the key,
    which would edit the caller's GraphDef."""
    return node.attr[key] if key in node.attr else attr_value_pb2.AttrValue()


def attr_text(node: node_def_pb2.NodeDef, key: str, default: str = "") -> str:
    """A string attribute as text; bytes that are not UTF-8 (a hostile or corrupt file) become U+FFFD,
    which matches no known value, so the node is skipped with its reason instead of ending bnfold."""
    return node.attr[key].s.decode("utf-8", "replace") if key in node.attr else default


def called_functions(node: node_def_pb2.NodeDef, functions: set[str]) -> list[str]:
    """Library functions a node runs: its op (a function call by name) and its function attributes
    (``f`` of ``PartitionedCall``, ``then_branch``/``else_branch``, ``cond``/``body`` of ``While``...)."""
    if not functions:  # most frozen graphs: no library, nothing to look for in the attributes
        return []
    called = [node.op] if node.op in functions else []
    for value in node.attr.values():
        called += [value.func.name] if value.HasField("func") else [f.name for f in value.list.func]
    return [f for f in called if f in functions]


def reachable_functions(
    library: function_pb2.FunctionDefLibrary,
    seeds: Iterable[str],
    with_gradients: bool = False,
    calls: Callable[[node_def_pb2.NodeDef, set[str]], list[str]] = called_functions,
    own_attributes: Callable[[attr_value_pb2.AttrValue], Iterable[str]] | None = None,
) -> list[str]:
    """Library functions reached from ``seeds`` through calls in function bodies (and, with
    ``with_gradients``, the gradient registered for each reached function), in visit order.

    The one library walk of bnfold: the dead-function pass uses it as it is, the
    allowlist (:func:`bnfold.tf.allowlist.reachable`) with a wider ``calls`` (functions
    nested in attribute values at any depth) and ``own_attributes`` (functions a
    function's own attributes name)."""
    bodies = {f.signature.name: f for f in library.function}
    gradients = {g.function_name: g.gradient_func for g in library.gradient} if with_gradients else {}
    names = set(bodies)
    pending = [f for f in seeds if f in names]
    reached: list[str] = []
    seen: set[str] = set()
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        reached.append(name)
        function = bodies[name]
        for node in function.node_def:
            pending += calls(node, names)
        if own_attributes is not None:
            for value in function.attr.values():
                pending += [f for f in own_attributes(value) if f in names]
        if gradients.get(name) in names:
            pending.append(gradients[name])
    return reached


def live_library(graph_def: graph_pb2.GraphDef) -> function_pb2.FunctionDefLibrary:
    """The library cut to what the graph's nodes reach, transitively through function bodies and
    the gradients registered for reached functions; unreached functions and their gradients go.
    Gradients registered per op type are kept with their functions."""
    library = graph_def.library
    names = {f.signature.name for f in library.function}
    seeds = [f for node in graph_def.node for f in called_functions(node, names)]
    seeds += [g.gradient_func for g in library.registered_gradients]  # keyed by op type: kept
    live = set(reachable_functions(library, seeds, with_gradients=True))
    out = function_pb2.FunctionDefLibrary()
    out.function.extend(f for f in library.function if f.signature.name in live)
    out.gradient.extend(g for g in library.gradient if g.function_name in live)
    out.registered_gradients.extend(library.registered_gradients)
    return out


# Ops that only forward their input: constants are seen through them.
PASS_THROUGH = {"Identity", "Snapshot", "StopGradient", "PreventGradient", "CheckNumerics", "IdentityN"}
