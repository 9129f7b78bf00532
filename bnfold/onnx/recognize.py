"""Recognize the BN sites of an ONNX model: its indexes, its constants, and the linear op before each site.

Exporters write BN in many shapes: ``BatchNormalization`` after a conv whose
bias is an initializer, a computed value (torch's ``Expand(CastLike(0, x),
Shape(W)[0])``) or an ``Identity`` of a shared initializer; a dense layer as
``MatMul(x, Transpose(W))``; tf2onnx's ``Mul``/``Add`` pairs. So a *constant*
here is not a list of node types but any tensor computed from constants by
deterministic ops; its value comes from onnx's reference evaluator run on the
constant subgraph behind it (:class:`ConstValues`). An initializer that is also
a graph input can be overridden at run time, so it is not a constant.

Every site is read as ``y = x * scale + shift`` per channel (:class:`Step`), and
the weights of the linear op it meets as channel axes (:class:`Layout`);
:class:`ModelIndex` holds the indexes of one model and these recognizers.
:mod:`bnfold.onnx.fold` applies the fold to what is recognized here.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import onnx
from google.protobuf.message import Message
from onnx import helper, numpy_helper

from bnfold.core.budgets import BudgetExceeded, Tally, product_flops
from bnfold.core.foldmath import bn_affine, fit_channels
from bnfold.onnx.io import known_dim

__all__ = ["ELEMENTWISE_OPS", "LINEAR_OPS", "ConstValues", "Layout", "ModelIndex", "Step", "leftover_sites"]

LINEAR_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
ELEMENTWISE_OPS = ("Mul", "Add", "Sub", "Div")
# Ops whose output is not a function of their inputs: never constants, whatever feeds them.
NONDETERMINISTIC_OPS = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli", "Dropout"}
# Constant subgraphs larger than this (elements of one value) are not evaluated: they are not weights anyone folds.
MAX_CONST_ELEMENTS = 1 << 28
# Ops whose output size comes from input values rather than input sizes: with a size shape inference cannot
# tell, bnfold does not evaluate them (bnfold.core.budgets).
SIZE_MAKING_OPS = {"ConstantOfShape", "Tile", "Range", "Resize", "Upsample", "OneHot"}
# Floating-point initializers from this many elements up go to shape inference as type and dims only (see _shape_skeleton).
SKELETON_MIN_ELEMENTS = 1024
FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}


def _has_subgraph(node: onnx.NodeProto) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)


def _subgraph_refs(graph: onnx.GraphProto) -> set[str]:
    """Names read inside If/Loop/Scan bodies: consumers the main-graph maps would not see."""
    refs: set[str] = set()
    for node in graph.node:
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                for inner in sub.node:
                    refs.update(inner.input)
                refs |= _subgraph_refs(sub)
    return refs


def _copy_fields(dst: Message, src: Message, skip: str) -> None:
    """Copy every set field of ``src`` but ``skip`` into ``dst`` (which is empty)."""
    for field, value in src.ListFields():
        if field.name == skip:
            continue
        if hasattr(value, "extend"):  # a repeated field
            getattr(dst, field.name).extend(value)
        elif field.message_type is not None:
            getattr(dst, field.name).CopyFrom(value)
        else:
            setattr(dst, field.name, value)


def _shape_skeleton(model: onnx.ModelProto, min_elements: int = SKELETON_MIN_ELEMENTS) -> onnx.ModelProto:
    """``model`` as shape inference needs it: large floating-point initializers keep name, type and dims, not data.

    ``onnx.shape_inference.infer_shapes`` serializes the model, parses it in C++
    and serializes the result back: on a 100 MB model that was 0.6 s of the
    ONNX fold's 0.7 s and three transient copies of the weights. Shape inference
    reads an initializer's *values* only where they are a shape parameter
    (Reshape's shape, Slice's starts, Resize's scales, Pad's pads...): integer
    tensors or a handful of floats, all kept here. A weight's dims and type are all
    it reads of one. Nothing is copied from the weights.
    """
    skeleton = onnx.ModelProto()
    _copy_fields(skeleton, model, skip="graph")
    _copy_fields(skeleton.graph, model.graph, skip="initializer")
    for tensor in model.graph.initializer:
        if tensor.data_type in FLOAT_TYPES and math.prod(tensor.dims) >= min_elements:
            stub = skeleton.graph.initializer.add()
            stub.name, stub.data_type = tensor.name, tensor.data_type
            stub.dims.extend(tensor.dims)
        else:
            skeleton.graph.initializer.append(tensor)
    return skeleton


class ConstValues:
    """Which tensors are constants, and their values, for one graph.

    One pass in graph order (ONNX requires topological order) marks a node's
    outputs constant when every input it reads is; ``Shape``/``Size`` of a
    tensor whose shape shape-inference fixes, and ``CastLike``'s type-only
    second input, count as constant too. Values are computed on demand by
    ``onnx.reference.ReferenceEvaluator`` on just the nodes behind the tensor,
    and cached; anything it cannot evaluate is treated as not constant.
    """

    def __init__(self, model: onnx.ModelProto, overridable: set[str], shapes: dict[str, list[int | None]], types: dict[str, int]) -> None:
        self.model = model
        graph = model.graph
        self.inits = {t.name: t for t in graph.initializer if t.name not in overridable}
        self.shapes = shapes
        self.types = types
        self.producer: dict[str, onnx.NodeProto] = {}
        self.const: set[str] = set(self.inits)
        self.cache: dict[str, np.ndarray | None] = {}
        self.notes: dict[str, str] = {}  # why a constant-looking tensor has no value: a budget (bnfold.core.budgets)
        for node in graph.node:
            for out in node.output:
                if out:
                    self.producer[out] = node
            if self._node_is_const(node):
                self.const.update(o for o in node.output if o)

    def _static_shape(self, name: str) -> list[int] | None:
        shape = self.shapes.get(name)
        if shape is None or any(d is None for d in shape):
            return None
        return [int(d) for d in shape]  # type: ignore[arg-type]

    def _node_is_const(self, node: onnx.NodeProto) -> bool:
        if node.domain not in ("", "ai.onnx") or node.op_type in NONDETERMINISTIC_OPS or _has_subgraph(node):
            return False
        if node.op_type in ("Shape", "Size") and node.input and self._static_shape(node.input[0]) is not None:
            return True
        if node.op_type == "CastLike" and len(node.input) == 2:
            return node.input[0] in self.const and (node.input[1] in self.const or node.input[1] in self.types)
        return all(not name or name in self.const for name in node.input)

    def is_const(self, name: str) -> bool:
        return name in self.const and self.value(name) is not None

    def value(self, name: str) -> np.ndarray | None:
        """The value of a constant tensor; None for anything computed at run time (or not evaluable)."""
        if name not in self.const:
            return None
        if name in self.cache:
            return self.cache[name]
        if name in self.inits:
            value: np.ndarray | None = numpy_helper.to_array(self.inits[name])
        else:
            value = self._evaluate(name)
        self.cache[name] = value
        return value

    def note(self, names: list[str]) -> str:
        """The budget that kept one of ``names`` from being evaluated, if one did."""
        return next((self.notes[n] for n in names if n in self.notes), "")

    @staticmethod
    def _check_budget(sub: onnx.ModelProto, name: str) -> None:
        """Every tensor of the constant subgraph from shape inference (a ``ConstantOfShape`` of an
        initializer has its full shape) within bnfold's budgets, before the reference evaluator
        allocates anything; an op that makes a tensor of a size shape inference cannot tell is not
        evaluated either."""
        try:
            inferred = onnx.shape_inference.infer_shapes(sub)  # not data_prop: onnx then computes the values it propagates (10 GB)
        except Exception:  # noqa: BLE001 - shape inference rejects some valid models; shapes are then unknown
            inferred = sub
        shapes: dict[str, list[int] | None] = {}
        for info in [*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input]:
            dims = info.type.tensor_type.shape.dim if info.type.tensor_type.HasField("shape") else None
            shapes[info.name] = None if dims is None or any(not d.HasField("dim_value") for d in dims) else [d.dim_value for d in dims]
        for init in sub.graph.initializer:
            shapes[init.name] = list(init.dims)
        tally = Tally(f"the constant {name}")
        for node in sub.graph.node:
            for out in node.output:
                if not out:
                    continue
                shape = shapes.get(out)
                if shape is None and node.op_type in SIZE_MAKING_OPS:
                    raise BudgetExceeded(f"the constant {name}: the size of {node.op_type} {out!r} is not known before it runs")
                if shape is not None:
                    tally.tensor(out, shape)
            out_shape = shapes.get(node.output[0]) if node.output else None
            tally.work(node.name or node.op_type, product_flops(node.op_type, [shapes.get(i) for i in node.input], out_shape))

    def _evaluate(self, name: str) -> np.ndarray | None:
        nodes: list[onnx.NodeProto] = []
        feeds: dict[str, np.ndarray] = {}
        seen: set[str] = set()
        stack = [name]
        while stack:  # the constant nodes behind `name`, stopping at initializers and values already known
            ref = stack.pop()
            if not ref or ref in seen:
                continue
            seen.add(ref)
            if ref in self.inits or (ref in self.cache and self.cache[ref] is not None):
                continue
            node = self.producer.get(ref)
            if node is None:
                return None
            if any(node is n for n in nodes):
                continue
            if node.op_type in ("Shape", "Size") and node.input[0] not in self.const:
                shape = self._static_shape(node.input[0])
                if shape is None:
                    return None
                feeds[node.input[0]] = np.zeros(shape, dtype=np.uint8) if int(np.prod(shape)) <= MAX_CONST_ELEMENTS else None  # type: ignore[assignment]
                if feeds[node.input[0]] is None:
                    return None
                nodes.append(node)
                continue
            if node.op_type == "CastLike" and node.input[1] not in self.const:
                np_type = helper.tensor_dtype_to_np_dtype(self.types[node.input[1]])
                feeds[node.input[1]] = np.zeros(0, dtype=np_type)
                nodes.append(node)
                stack.append(node.input[0])
                continue
            nodes.append(node)
            stack.extend(node.input)
        order = {id(n): i for i, n in enumerate(self.model.graph.node)}
        nodes.sort(key=lambda n: order[id(n)])
        known = {k: v for k, v in self.cache.items() if v is not None and k in seen}
        inits = [self.inits[r] for r in seen if r in self.inits]
        inputs = [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape) for k, v in {**feeds, **known}.items()]
        graph = helper.make_graph(nodes, "bnfold_const", inputs, [helper.make_empty_tensor_value_info(name)], inits)
        sub = helper.make_model(graph, opset_imports=list(self.model.opset_import), ir_version=self.model.ir_version)
        try:
            self._check_budget(sub, name)
        except BudgetExceeded as exc:
            self.notes[name] = str(exc)
            return None
        value = evaluate_constant(sub, name, {**feeds, **known})
        if value is None:
            return None
        return value if value.size <= MAX_CONST_ELEMENTS else None


def evaluate_constant(sub: onnx.ModelProto, name: str, feeds: dict[str, np.ndarray]) -> np.ndarray | None:
    """``name`` in ``sub`` by ``onnx.reference.ReferenceEvaluator``, in bnfold's confined worker
    (:mod:`bnfold.core.worker`): the model is a file's, and its nodes are run. Only the subgraph's bytes,
    the feeds and the value cross. None when it cannot be evaluated (a value that is simply not a constant)."""
    from bnfold.core import serve
    from bnfold.core import worker as isolation
    from bnfold.core.protocol import decode_arrays, encode_arrays
    from bnfold.onnx.runner import EVALUATE

    if serve.in_worker():
        from onnx.reference import ReferenceEvaluator

        try:
            (value,) = ReferenceEvaluator(sub).run([name], feeds)
        except Exception:  # noqa: BLE001 - the reference evaluator raises anything; such a value is simply not a constant
            return None
        return np.asarray(value)
    data = sub.SerializeToString()
    meta, arrays = encode_arrays(list(feeds.values()))
    header = {"op": EVALUATE, "model_bytes": len(data), "fetches": [name], "feeds": list(feeds), "arrays": meta}
    try:
        head, body = isolation.ask(header, data + arrays, tensorflow=False, engine="the ONNX reference evaluator")
    except (isolation.GraphRunError, isolation.WorkerDied):
        return None
    (value,) = decode_arrays(head["arrays"], body)
    return value


@dataclass
class Step:
    """One site as a per-channel affine on its data input: ``y = x * scale + shift``."""

    node: onnx.NodeProto
    data: str
    scale: np.ndarray | None  # float64 vector, or None for 1
    shift: np.ndarray | None  # float64 vector, or None for 0
    form: str


@dataclass
class Layout:
    """How a linear op's weights hold its channels: the view to fold in and where the channels are."""

    view: np.ndarray  # the weights, reshaped so the channel axes are plain axes
    out_axes: tuple[int, ...]
    in_axis: int | None  # None: a backward fold is not supported for this op
    channels: int  # output channels
    in_channels: int
    shape: tuple[int, ...]  # the weights' real shape


class ModelIndex:
    """The indexes of one model (producers, consumers, shapes, constants) and the recognizers of its sites."""

    def __init__(self, model: onnx.ModelProto, protected: set[str] | None = None) -> None:
        self.model = model
        self.graph = model.graph
        self.inits = {t.name: t for t in self.graph.initializer}
        # Before IR 4 initializers were also graph inputs, and a caller may feed them: not constants.
        self.overridable = {i.name for i in self.graph.input} & set(self.inits)
        self.producer: dict[str, onnx.NodeProto] = {o: n for n in self.graph.node for o in n.output if o}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in self.graph.node:
            for name in node.input:
                if name:
                    self.consumers[name].append(node)
        self.pinned = {o.name for o in self.graph.output} | _subgraph_refs(self.graph) | (protected or set())
        self.shapes, self.types = self._infer_shapes()
        self.consts = ConstValues(model, self.overridable, self.shapes, self.types)
        self._names = {n.name for n in self.graph.node} | set(self.producer) | set(self.inits) | {i.name for i in self.graph.input}

    # -- lookups ---------------------------------------------------------------
    def _infer_shapes(self) -> tuple[dict[str, list[int | None]], dict[str, int]]:
        """Tensor shapes (None: a symbolic dim) and element types from ONNX shape inference, where it can tell."""
        try:
            inferred = onnx.shape_inference.infer_shapes(_shape_skeleton(self.model))
        except Exception:  # noqa: BLE001 - shapes only refine what can be folded; without them fewer sites fold
            inferred = self.model
        shapes: dict[str, list[int | None]] = {}
        types: dict[str, int] = {}
        for info in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
            tensor = info.type.tensor_type
            if tensor.elem_type:
                types[info.name] = tensor.elem_type
            if tensor.HasField("shape"):
                shapes[info.name] = [known_dim(d) for d in tensor.shape.dim]
        for init in self.graph.initializer:
            types.setdefault(init.name, init.data_type)
            shapes.setdefault(init.name, list(init.dims))
        return shapes, types

    @property
    def ranks(self) -> dict[str, int]:
        return {k: len(v) for k, v in self.shapes.items()}

    def const(self, name: str) -> np.ndarray | None:
        """The value of a constant tensor (initializer, Constant, or computed from constants); None otherwise."""
        return self.consts.value(name) if name else None

    def uses(self, name: str) -> int:
        return len(self.consumers.get(name, [])) + (1 if name in self.pinned else 0)

    def unique(self, base: str) -> str:
        name, k = base, 1
        while name in self._names:
            name, k = f"{base}_{k}", k + 1
        self._names.add(name)
        return name

    def _dtype_of(self, name: str) -> np.dtype | None:
        elem = self.types.get(name)
        return np.dtype(helper.tensor_dtype_to_np_dtype(elem)) if elem else None

    # -- recognizers ---------------------------------------------------------------
    def _bn_step(self, node: onnx.NodeProto) -> Step | str:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("training_mode", 0):
            return "training_mode=1: normalizes with batch statistics"
        if attrs.get("spatial", 1) == 0:
            return "spatial=0 (per-element statistics) is not a per-channel affine"
        if any(out and self.uses(out) for out in node.output[1:]):
            return "an output other than Y (running mean/var) is read"
        values = [self.const(name) for name in node.input[1:5]]
        gamma, beta, mean, var = (values + [None] * 4)[:4]
        if gamma is None or beta is None or mean is None or var is None:
            note = self.consts.note([n for n in node.input[1:5]])
            return "scale, B, mean or var is not a constant" + (f" ({note})" if note else "")
        affine = bn_affine(gamma, beta, mean, var, float(attrs.get("epsilon", 1e-5)))  # type: ignore[arg-type]
        if isinstance(affine, str):
            return affine
        scale, shift = affine
        return Step(node, node.input[0], scale, shift, "BatchNormalization")

    def _elementwise_step(self, node: onnx.NodeProto) -> Step | None:
        """``x * c``, ``x + c``, ``x - c``, ``x / c`` with a constant ``c`` (raw, checked against channels later)."""
        if len(node.input) != 2:
            return None
        a, b = (self.const(n) for n in node.input)
        if (a is None) == (b is None):
            return None
        slot = 1 if b is not None else 0
        c = b if b is not None else a
        assert c is not None
        if node.op_type in ("Sub", "Div") and slot == 0:
            return None  # c - x, c / x are not affine in x with a positive sign / at all
        if c.dtype.kind != "f" or not np.all(np.isfinite(c.astype(np.float64))):
            return None
        c64 = np.asarray(c, dtype=np.float64)
        data = node.input[1 - slot]
        if node.op_type == "Mul":
            return Step(node, data, c64, None, "Mul")
        if node.op_type == "Div":
            return None if np.any(c64 == 0) else Step(node, data, 1.0 / c64, None, "Div")
        return Step(node, data, None, -c64 if node.op_type == "Sub" else c64, node.op_type)

    def _linear_unit(self, data: str) -> tuple[onnx.NodeProto, onnx.NodeProto | None] | None:
        """The linear op (and a MatMul's bias Add) that produces ``data``, if any."""
        node = self.producer.get(data)
        if node is None:
            return None
        if node.op_type in LINEAR_OPS and node.domain in ("", "ai.onnx") and node.output[0] == data:
            return node, None
        if node.op_type == "Add":
            for slot in (0, 1):
                inner = self.producer.get(node.input[slot])
                if inner is not None and inner.op_type == "MatMul" and self.const(node.input[1 - slot]) is not None:
                    return inner, node
        return None

    def _layout(self, linear: onnx.NodeProto, weights: np.ndarray, data_rank: int | None) -> Layout | str:
        """Where ``linear``'s weights hold output (and input) channels."""
        lname = linear.name or linear.output[0]
        attrs = {a.name: helper.get_attribute_value(a) for a in linear.attribute}
        op, shape = linear.op_type, tuple(weights.shape)
        if op in ("Conv", "ConvTranspose") and weights.ndim < 3:
            return f"{lname} has unexpected weights"
        if op == "Conv":
            group = int(attrs.get("group", 1))
            return Layout(weights, (0,), 1 if group == 1 else None, shape[0], shape[1] * group, shape)
        if op == "ConvTranspose":
            group = int(attrs.get("group", 1))
            if shape[0] % group:
                return f"{lname} has unexpected weights"
            view = weights.reshape(group, shape[0] // group, shape[1], *shape[2:])  # out channel g * M/g + m: axes (0, 2)
            return Layout(view, (0, 2), None, shape[1] * group, shape[0], shape)
        if weights.ndim != 2:
            return f"{lname} weights are not a matrix"
        if op == "Gemm":
            if attrs.get("transB", 0):
                return Layout(weights, (0,), 1, shape[0], shape[1], shape)
            return Layout(weights, (1,), 0, shape[1], shape[0], shape)
        if data_rank is None:
            return f"{lname} output rank is not known"
        return Layout(weights, (1,), 0 if data_rank == 2 else None, shape[1], shape[0], shape)

    def _float_weights(self, linear: onnx.NodeProto) -> np.ndarray | str:
        """The constant floating-point weights of ``linear`` (input 1), or why it has none."""
        lname = linear.name or linear.output[0]
        weights = self.const(linear.input[1]) if len(linear.input) > 1 else None
        if weights is None:
            return f"{lname} weights are not constants"
        if weights.dtype.kind != "f":
            return f"{lname} is not floating point"
        return weights

    def _bias_input(self, linear: onnx.NodeProto, attrs: dict[str, object], channels: int) -> np.ndarray | None | str:
        """The bias of a Conv/ConvTranspose/Gemm as a per-channel float64 vector (None: no bias), or why it cannot fold."""
        lname = linear.name or linear.output[0]
        if len(linear.input) <= 2 or not linear.input[2]:
            return None
        value = self.const(linear.input[2])
        if value is None:
            return f"{lname} bias is not a constant"
        bias = np.asarray(value, dtype=np.float64)
        if linear.op_type == "Gemm":
            bias = bias * float(attrs.get("beta", 1.0))  # type: ignore[arg-type]  # y = alpha*A*B + beta*C: carry beta into C
            if bias.ndim > 2 or (bias.ndim == 2 and bias.shape[0] != 1):
                return f"{lname} bias C is not one value per output channel"
        fitted = fit_channels(bias, channels)
        if fitted is None:
            return f"{lname} bias does not match its {channels} output channels"
        return fitted

    @staticmethod
    def _per_channel(value: np.ndarray | None, step: Step, channels: int, rank: int, axis: int) -> np.ndarray | None | bool:
        """``value`` as a (channels,) vector along the linear op's channel axis; False if it is not per-channel."""
        if value is None:
            return None
        if step.form == "BatchNormalization":
            fitted = fit_channels(value, channels)
            return False if fitted is None else fitted
        if value.ndim > max(rank, 1 if axis == -1 else rank) or (rank == 0 and value.ndim > 1):
            return False  # broadcasting would add dimensions to the output
        shape = (1,) * (max(rank, value.ndim) - value.ndim) + value.shape
        pos = axis % len(shape) if shape else 0
        if any(d != 1 for i, d in enumerate(shape) if i != pos):
            return False
        fitted = fit_channels(value, channels)
        return False if fitted is None else fitted


def leftover_sites(model: onnx.ModelProto) -> dict[str, int]:
    """What an unfolded file still carries: BN nodes, and per-channel Mul/Add right behind a linear op.

    Used by the tests and the benchmark to count what a runtime would still
    compute; a MatMul's single bias Add is not counted (MatMul has no bias input).
    """
    probe = ModelIndex(model)
    counts = {"BatchNormalization": 0, "Mul": 0, "Add": 0}
    for node in model.graph.node:
        if node.op_type == "BatchNormalization":
            counts["BatchNormalization"] += 1
            continue
        if node.op_type not in ELEMENTWISE_OPS or node.output[0] in probe.consts.const:
            continue
        step = probe._elementwise_step(node)
        unit = probe._linear_unit(step.data) if step is not None else None
        if step is None or unit is None:
            continue
        linear, bias_add = unit
        if step.scale is None and linear.op_type == "MatMul" and bias_add is None:
            continue
        weights = probe.const(linear.input[1]) if len(linear.input) > 1 else None
        if weights is None or weights.ndim < 2:
            continue
        rank = probe.ranks.get(step.data)
        layout = probe._layout(linear, weights, rank)
        if isinstance(layout, str):
            continue
        value = step.scale if step.scale is not None else step.shift
        axis = -1 if linear.op_type == "MatMul" else 1
        if ModelIndex._per_channel(value, step, layout.channels, rank or 0, axis) is not False:
            counts["Mul" if step.scale is not None else "Add"] += 1
    return counts
