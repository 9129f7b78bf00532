"""Make real-world graphs look alike before recognition.

Frozen graphs reach their constants through wrappers (``Identity`` left by
``ReadVariableOp``, ``Reshape``/``Squeeze`` of a Keras 3 bias, ``Rsqrt(var +
eps) * gamma``). Rather than rewriting those subgraphs, :class:`ConstEvaluator`
evaluates any constant-only subgraph on demand in float64, so every recognizer
sees plain numbers and the graph is only touched where a site is folded.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from tensorflow.core.framework import node_def_pb2, op_def_pb2, types_pb2
from tensorflow.python.framework import op_def_registry, tensor_util

from bnfold.core.budgets import BudgetExceeded
from bnfold.tf.graph import PASS_THROUGH, GraphIndex, attr, parse_input

FLOAT_TYPES = {types_pb2.DT_FLOAT, types_pb2.DT_HALF, types_pb2.DT_BFLOAT16, types_pb2.DT_DOUBLE}


_UNARY: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "Rsqrt": lambda x: 1.0 / np.sqrt(x),
    "Sqrt": np.sqrt,
    "Reciprocal": lambda x: 1.0 / x,
    "Inv": lambda x: 1.0 / x,
    "Neg": np.negative,
    "Square": np.square,
}
_BINARY: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "Add": np.add,
    "AddV2": np.add,
    "Sub": np.subtract,
    "Mul": np.multiply,
    "RealDiv": np.divide,
    "Div": np.divide,
    "Maximum": np.maximum,
    "Minimum": np.minimum,
}
_EVALUABLE = set(_UNARY) | set(_BINARY) | {"Cast", "Reshape", "Squeeze", "ExpandDims"}
# Ops whose presence in a constant subgraph marks it as normalization statistics.
NORMALIZATION_EVIDENCE = {"Rsqrt", "Sqrt"}


def to_float64(value: np.ndarray) -> np.ndarray:
    """Widen floating values (fp16/bf16 included) so all fold math runs in float64."""
    if value.dtype.kind in "fV" or value.dtype.name == "bfloat16":
        return value.astype(np.float64)
    return value


class ConstEvaluator:
    """Value of any tensor whose subgraph is constant-only, or ``None``.

    Memoized per tensor, so a parameter read by several sites is evaluated once.
    """

    def __init__(self, index: GraphIndex) -> None:
        self.index = index
        self._memo: dict[str, dict[int, np.ndarray | None]] = {}
        self._const_memo: dict[str, bool] = {}
        self._contains_memo: dict[str, dict[frozenset[str], bool]] = {}
        self._walking: set[str] = set()  # nodes the running is_const walk will decide
        self.notes: dict[str, str] = {}  # why a node that looks constant has no value: a budget (bnfold.core.budgets)

    def forget(self, name: str) -> None:
        """Drop memoized values of a node that an edit replaced."""
        self._memo.pop(name, None)
        self._const_memo.pop(name, None)
        self._contains_memo.pop(name, None)

    def raw(self, ref: str) -> np.ndarray | None:
        """The value in the tensor's own dtype (used for weights, to cast back)."""
        node, index = self.index.producer(ref)
        if node is None:
            return None
        try:
            for _ in range(len(self.index.nodes) + 1):  # a loop, not recursion: a chain of 10,000 Identity ops is a valid graph
                if node is None or node.op not in PASS_THROUGH:
                    break
                ref = node.input[index if node.op == "IdentityN" else 0]
                node, index = self.index.producer(ref)
            if node is None:
                return None
            if node.op == "Const":
                return self.index.const_value(node)
            value = self.value(ref)
            dtype = output_dtype(node, index)
            if value is None or dtype is None:
                return None
            return value.astype(tensor_util.dtypes.as_dtype(dtype).as_numpy_dtype)
        except (ValueError, TypeError, IndexError):
            return None  # a corrupt constant is not a constant bnfold can fold

    def value(self, ref: str) -> np.ndarray | None:
        name, index, _ = parse_input(ref)
        outputs = self._memo.setdefault(name, {})
        if index not in outputs:
            for key in self._upstream_first(name, index):  # inputs before their readers: each _evaluate looks one level up
                outputs_of = self._memo.setdefault(key[0], {})
                outputs_of[key[1]] = self._evaluate(*key)
        return outputs[index]

    def _upstream_first(self, name: str, index: int) -> list[tuple[str, int]]:
        """The tensors :meth:`_evaluate` of ``name:index`` reads, transitively, not yet memoized, inputs first.

        Each is memoized as ``None`` when found, so a cycle (a corrupt graph)
        evaluates to "not constant"; an explicit stack, since a valid graph may
        chain more ops than Python's recursion allows.
        """
        order: list[tuple[str, int]] = []
        self._memo.setdefault(name, {})[index] = None
        stack: list[tuple[tuple[str, int], bool]] = [((name, index), False)]
        while stack:
            key, expanded = stack.pop()
            if expanded:
                order.append(key)
                continue
            stack.append((key, True))
            for child in self._reads(*key):
                memo = self._memo.setdefault(child[0], {})
                if child[1] not in memo:
                    memo[child[1]] = None
                    stack.append((child, False))
        return order

    def _reads(self, name: str, index: int) -> list[tuple[str, int]]:
        node = self.index.nodes.get(name)
        if node is None or node.op == "Const":
            return []
        inputs = [r for r in node.input if not r.startswith("^")]
        if node.op in PASS_THROUGH:
            picked = inputs[index if node.op == "IdentityN" else 0 : (index if node.op == "IdentityN" else 0) + 1]
        elif node.op in _EVALUABLE:
            picked = inputs
        else:
            return []  # evaluated whole in the worker
        return [(n, i) for n, i, _ in map(parse_input, picked)]

    def is_const(self, ref: str) -> bool:
        """Whether ``ref`` depends on constants only, decided from op types alone.

        Cheaper than :meth:`value`: a conv's weights are never converted just to
        learn that they are constant.
        """
        name = parse_input(ref)[0]
        known = self._const_memo.get(name)
        if known is None and name not in self._walking:
            self._const_inputs_first(name)
            known = self._const_memo.get(name)
        if known is None:
            self._const_memo[name] = False  # a cycle (a corrupt graph) is not constant
            node = self.index.nodes.get(name)
            if node is None:
                known = False
            elif node.op == "Const":
                known = True
            elif node.op in PASS_THROUGH or node.op in _EVALUABLE:
                known = all(self.is_const(r) for r in node.input if not r.startswith("^"))
            elif evaluable_by_tf(node):
                data = [r for r in node.input if not r.startswith("^")]
                known = bool(data) and all(self.is_const(r) for r in data)
            else:
                known = False
            self._const_memo[name] = known
        return known

    def _const_inputs_first(self, name: str) -> None:
        """Decide :meth:`is_const` for what ``name`` reads before ``name`` itself, without recursion (long chains)."""
        stack: list[tuple[str, bool]] = [(name, False)]
        pending = self._walking
        pending.add(name)
        try:
            self._walk_const(name, stack, pending)
        finally:
            pending.clear()

    def _walk_const(self, name: str, stack: list[tuple[str, bool]], pending: set[str]) -> None:
        while stack:
            current, expanded = stack.pop()
            if expanded:
                if current != name:
                    self.is_const(current)  # its inputs are decided: one level deep
                continue
            stack.append((current, True))
            node = self.index.nodes.get(current)
            if node is None:
                continue
            for ref in node.input:
                if ref.startswith("^"):
                    continue
                child = parse_input(ref)[0]
                if child not in self._const_memo and child not in pending:
                    pending.add(child)
                    stack.append((child, False))

    def contains_op(self, ref: str, ops: set[str]) -> bool:
        """Whether the constant subgraph behind ``ref`` holds one of ``ops`` (memoized like values)."""
        name = parse_input(ref)[0]
        memo = self._contains_memo.setdefault(name, {})
        key = frozenset(ops)
        if key not in memo:
            memo[key] = any(node.op in ops for node in self.index.walk(name))
        return memo[key]

    def _evaluate(self, name: str, index: int) -> np.ndarray | None:
        node = self.index.nodes.get(name)
        if node is None:
            return None
        op = node.op
        inputs = [r for r in node.input if not r.startswith("^")]
        try:
            if op == "Const":
                return to_float64(self.index.const_value(node))
            if op in PASS_THROUGH:
                return self.value(inputs[index if op == "IdentityN" else 0])
            if op not in _EVALUABLE:
                return self._evaluate_in_tf(name, index) if self.is_const(name) else None
            maybe = [self.value(r) for r in inputs]
            args = [a for a in maybe if a is not None]
            if len(args) != len(maybe):
                return None
            if op in _UNARY:
                with np.errstate(all="ignore"):
                    return _UNARY[op](args[0])
            if op in _BINARY:
                with np.errstate(all="ignore"):
                    return _BINARY[op](args[0], args[1])
            if op == "Cast":
                dst = tensor_util.dtypes.as_dtype(attr(node, "DstT").type)
                return to_float64(args[0].astype(dst.as_numpy_dtype))
            if op == "Reshape":
                return np.reshape(args[0], [int(d) for d in args[1]])
            if op == "Squeeze":
                dims = tuple(attr(node, "squeeze_dims").list.i)
                return np.squeeze(args[0], axis=dims or None)
            if op == "ExpandDims":
                return np.expand_dims(args[0], int(args[1]))
        except BudgetExceeded as exc:
            self.notes[name] = str(exc)
            return None
        except (ValueError, TypeError, IndexError):
            return None
        return None

    def note(self, refs: list[str]) -> str:
        """The budget that kept one of ``refs`` (or what it is computed from) from being a constant, if one did."""
        if not self.notes:
            return ""
        for ref in refs:
            for node in self.index.walk(parse_input(ref)[0]):
                if node.name in self.notes:
                    return self.notes[node.name]
        return ""

    def _evaluate_in_tf(self, name: str, index: int) -> np.ndarray | None:
        """A constant computed by an op the table above does not mirror (``Dequantize``, ``Transpose``,
        ``ConcatV2``, ``Pack``, ``Fill``...), evaluated by TensorFlow itself, in native dtypes.

        The subgraph (constants and stateless ops only, see :func:`evaluable_by_tf`) runs in
        the check's worker process (:mod:`bnfold.core.worker`), so a constant crafted to make a
        kernel abort ends as "not a constant", never as a dead bnfold. The fold math on
        the result stays float64.
        """
        from tensorflow.core.framework import graph_pb2

        from bnfold.core.worker import GraphRunError, WorkerDied
        from bnfold.tf.runner import IsolatedGraph

        sub = graph_pb2.GraphDef()
        sub.versions.CopyFrom(self.index.versions)
        for node in self.index.walk(name):
            copy = sub.node.add()
            copy.CopyFrom(self.index.full_node(node))
            del copy.input[:]
            copy.input.extend(r for r in node.input if not r.startswith("^"))  # order does not change a value
            copy.device = ""
        try:
            graph = IsolatedGraph(sub.SerializeToString(), layout_pass=False, budget=f"the constant {name}")
        except GraphRunError as exc:
            if exc.kind == "BudgetExceeded":
                self.notes[name] = str(exc)
            return None
        except WorkerDied as exc:
            if exc.limit:
                self.notes[name] = f"evaluating the constant {name} ran past bnfold's {exc.limit}"
            return None
        try:
            (value,) = graph.run([f"{name}:{index}"], {})
        except (GraphRunError, WorkerDied):
            return None
        finally:
            graph.close()
        return to_float64(value) if value.dtype != object else None


# Stateless ops whose value TensorFlow computes from their inputs alone; what a constant may be
# made of beyond the numpy table. Placeholders (fed, or overridable defaults) never are, nor is
# TF1 control flow: which input a Merge forwards depends on which side runs, and a cond's
# branches (momentum vs 1.0 in a training graph) are what the doctor and the switch pass read.
_NEVER_CONSTANT = {
    "Placeholder", "PlaceholderV2", "PlaceholderWithDefault",
    "Switch", "RefSwitch", "_SwitchN", "Merge", "RefMerge", "Enter", "RefEnter", "Exit", "RefExit",
    "NextIteration", "RefNextIteration", "LoopCond", "ControlTrigger",
}  # fmt: skip


def evaluable_by_tf(node: node_def_pb2.NodeDef) -> bool:
    """Whether TensorFlow's registry says ``node`` is a pure function of its inputs: registered,
    not stateful, no function attributes (no library code), and allowed by bnfold's run rule."""
    if node.op in _NEVER_CONSTANT:
        return False
    op_def = op_def_registry.get(node.op)
    if op_def is None or op_def.is_stateful or any(a.type in ("func", "list(func)") for a in op_def.attr):
        return False
    if any(a.type in (types_pb2.DT_RESOURCE, types_pb2.DT_VARIANT) or a.is_ref for a in [*op_def.input_arg, *op_def.output_arg]):
        return False
    from bnfold.tf.runsafety import node_refusal

    return node_refusal(node) is None


def _arg_dtype(node: node_def_pb2.NodeDef, args: Sequence[op_def_pb2.OpDef.ArgDef], position: int) -> int | None:
    """The dtype of the ``position``-th tensor of an op's argument list (inputs or outputs)."""
    for arg in args:
        if arg.type_list_attr:
            types = list(node.attr[arg.type_list_attr].list.type) if arg.type_list_attr in node.attr else []
            count = len(types)
        else:
            count = node.attr[arg.number_attr].i if arg.number_attr and arg.number_attr in node.attr else 1
        if position < count:
            if arg.type_list_attr:
                return types[position]
            if arg.type:
                return arg.type
            return node.attr[arg.type_attr].type if arg.type_attr in node.attr else None
        position -= count
    return None


def output_dtype(node: node_def_pb2.NodeDef, port: int = 0) -> int | None:
    """The dtype of output ``port`` of ``node``, read from TensorFlow's op registry.

    Which attribute names an output's dtype differs per op (``T``, ``DstT`` of
    ``Cast``, ``U`` of a fused BN's statistics, ``dtype`` of ``Const``, a type
    list of ``IdentityN``); guessing ``T`` wrote float32 weights on float16
    convs of mixed-precision models. ``None`` for ops the registry lacks.
    """
    op_def = op_def_registry.get(node.op)
    return None if op_def is None or port < 0 else _arg_dtype(node, op_def.output_arg, port)


def consumer_dtype(node: node_def_pb2.NodeDef, slot: int) -> int | None:
    """The dtype that input ``slot`` of ``node`` must have (the registry's ``input_arg``), or None."""
    op_def = op_def_registry.get(node.op)
    return None if op_def is None or slot < 0 else _arg_dtype(node, op_def.input_arg, slot)


def input_dtype(index: GraphIndex, ref: str) -> int | None:
    """The dtype of a tensor, read per op from TensorFlow's op registry."""
    node, port = index.producer(ref)
    if node is None:
        return None
    return output_dtype(node, port)
