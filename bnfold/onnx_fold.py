"""Fold BN and per-channel scale/shift into the linear ops of an ONNX model.

tf2onnx writes its own patterns (a BN it could not fuse, the ``Mul``/``Add``
pair of a decomposed Keras 3 BN after its layout Transposes are pushed away),
and models exported elsewhere carry ``BatchNormalization`` nodes. This pass
works on the ONNX graph itself so the written file is folded, not merely
something an optimizing runtime might fold at load time.

Every site is read as ``y = x * scale + shift`` per output channel and folded
into ``Conv``/``ConvTranspose`` (grouped too)/``Gemm`` weights and bias, or
into a ``MatMul``'s weights and its one bias ``Add``. The safety rules are the
TensorFlow side's: constants only (an initializer that is also a graph input
can be overridden at run time, so it is not a constant), the linear op's output
read only by the site, ``training_mode`` refused, shared initializers copied
before they change, float64 arithmetic cast back to the weights' dtype.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from bnfold.folding import SiteRecord

LINEAR_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
ELEMENTWISE_OPS = ("Mul", "Add", "Sub", "Div")
FLOAT_ELEM_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}


@dataclass
class Step:
    """One site as a per-channel affine on its data input: ``y = x * scale + shift``."""

    node: onnx.NodeProto
    data: str
    scale: np.ndarray | None  # float64 vector, or None for 1
    shift: np.ndarray | None  # float64 vector, or None for 0
    form: str


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Node count per op type of the main graph: the before/after numbers of the report."""
    return dict(sorted(Counter(n.op_type for n in model.graph.node).items()))


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


class OnnxFolder:
    """One pass over one model (edited in place): holds the indexes and the records."""

    def __init__(self, model: onnx.ModelProto, protected: set[str] | None = None) -> None:
        self.model = model
        self.graph = model.graph
        self.inits = {t.name: t for t in self.graph.initializer}
        # Before IR 4 initializers were also graph inputs, and a caller may feed them: not constants.
        self.overridable = {i.name for i in self.graph.input} & set(self.inits)
        self.const_nodes = {n.output[0]: n for n in self.graph.node if n.op_type == "Constant" and len(n.output) == 1}
        self.producer: dict[str, onnx.NodeProto] = {o: n for n in self.graph.node for o in n.output if o}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in self.graph.node:
            for name in node.input:
                if name:
                    self.consumers[name].append(node)
        self.pinned = {o.name for o in self.graph.output} | _subgraph_refs(self.graph) | (protected or set())
        self.ranks = self._infer_ranks()
        self.records: list[SiteRecord] = []
        self._names = {n.name for n in self.graph.node} | set(self.producer) | set(self.inits) | {i.name for i in self.graph.input}

    # -- lookups ---------------------------------------------------------------
    def _infer_ranks(self) -> dict[str, int]:
        """Tensor ranks from ONNX shape inference, where it can tell."""
        try:
            inferred = onnx.shape_inference.infer_shapes(self.model)
        except Exception:  # noqa: BLE001 - ranks only refine what can be folded; without them fewer sites fold
            return {}
        ranks = {}
        for info in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
            tensor = info.type.tensor_type
            if tensor.HasField("shape"):
                ranks[info.name] = len(tensor.shape.dim)
        return ranks

    def const(self, name: str) -> np.ndarray | None:
        """The value of an initializer or Constant node; None for anything computed or overridable."""
        if name in self.inits and name not in self.overridable:
            return numpy_helper.to_array(self.inits[name])
        node = self.const_nodes.get(name)
        if node is not None and name in self.producer and self.producer[name] is node:
            for attr in node.attribute:
                if attr.name == "value":
                    return numpy_helper.to_array(attr.t)
                if attr.name == "value_float":
                    return np.array(attr.f, dtype=np.float32)
                if attr.name == "value_floats":
                    return np.array(list(attr.floats), dtype=np.float32)
        return None

    def uses(self, name: str) -> int:
        return len(self.consumers.get(name, [])) + (1 if name in self.pinned else 0)

    def unique(self, base: str) -> str:
        name, k = base, 1
        while name in self._names:
            name, k = f"{base}_{k}", k + 1
        self._names.add(name)
        return name

    # -- driver ------------------------------------------------------------------
    def run(self) -> list[SiteRecord]:
        for node in list(self.graph.node):
            if node.op_type in ELEMENTWISE_OPS or node.op_type == "BatchNormalization":
                if any(node is n for n in self.graph.node):
                    self._visit(node)
        self._prune()
        return self.records

    def _visit(self, node: onnx.NodeProto) -> None:
        label = node.name or node.output[0]
        if node.op_type == "BatchNormalization":
            step = self._bn_step(node)
            if isinstance(step, str):
                self.records.append(SiteRecord(label, "BatchNormalization", "skipped", reason=step))
                return
        else:
            step = self._elementwise_step(node)
            if step is None:
                return
        unit = self._linear_unit(step.data)
        why: str | None = "not after a Conv/ConvTranspose/Gemm/MatMul"
        linear: onnx.NodeProto | None = None
        if unit is not None:
            linear, bias_add = unit
            if step.shift is not None and step.scale is None and linear.op_type == "MatMul" and bias_add is None:
                return  # an Add right after a MatMul is its bias: MatMul has no bias input to take it
            why = self._fold(step, linear, bias_add)
        if why is None and linear is not None:
            self.records.append(SiteRecord(label, step.form, "folded", folded_into=linear.name or linear.output[0]))
        elif node.op_type == "BatchNormalization":
            # The written file must not carry BN: with nothing to fold into it becomes Mul + Add.
            failed = self._standalone(step)
            action = "standalone" if failed is None else "skipped"
            self.records.append(SiteRecord(label, step.form, action, reason=why + (f"; {failed}" if failed else "")))
        elif why:
            self.records.append(SiteRecord(label, step.form, "skipped", reason=why))

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
        if len(values) < 4 or any(v is None for v in values):
            return "scale, B, mean or var is not a constant"
        gamma, beta, mean, var = (np.asarray(v, dtype=np.float64) for v in values)  # type: ignore[arg-type]
        var_eps = var + float(attrs.get("epsilon", 1e-5))
        if not all(np.all(np.isfinite(v)) for v in (gamma, beta, mean, var_eps)) or np.any(var_eps <= 0):
            return "non-finite values or var + epsilon <= 0"
        scale = gamma / np.sqrt(var_eps)
        return Step(node, node.input[0], scale.reshape(-1), (beta - mean * scale).reshape(-1), "BatchNormalization")

    def _elementwise_step(self, node: onnx.NodeProto) -> Step | None:
        """``x * c``, ``x + c``, ``x - c``, ``x / c`` with a constant ``c`` (raw, checked against channels later)."""
        if len(node.input) != 2:
            return None
        a, b = (self.const(n) for n in node.input)
        if (a is None) == (b is None):
            return None
        slot = 1 if b is not None else 0
        c = b if b is not None else a
        if node.op_type in ("Sub", "Div") and slot == 0:
            return None  # c - x, c / x are not affine in x with a positive sign / at all
        if c.dtype.kind != "f" or not np.all(np.isfinite(c.astype(np.float64))):  # type: ignore[union-attr]
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
        if node.op_type in LINEAR_OPS and node.output[0] == data:
            return node, None
        if node.op_type == "Add":
            for slot in (0, 1):
                inner = self.producer.get(node.input[slot])
                if inner is not None and inner.op_type == "MatMul" and self.const(node.input[1 - slot]) is not None:
                    return inner, node
        return None

    # -- the fold ------------------------------------------------------------------------
    def _fold(self, step: Step, linear: onnx.NodeProto, bias_add: onnx.NodeProto | None) -> str | None:
        """Fold ``step`` into ``linear``; the reason it cannot ('' for not a site at all), else None."""
        lname = linear.name or linear.output[0]
        if bias_add is not None and (self.uses(linear.output[0]) != 1 or self.uses(bias_add.output[0]) != 1):
            return f"{lname} output also feeds other ops"
        if self.uses(step.data) != 1:
            return f"{lname} output also feeds other ops"
        weights = self.const(linear.input[1]) if len(linear.input) > 1 else None
        if weights is None:
            return f"{lname} weights are not constants"
        if weights.dtype.kind != "f":
            return f"{lname} is not floating point"
        attrs = {a.name: helper.get_attribute_value(a) for a in linear.attribute}
        op = linear.op_type
        if op == "Conv":
            channels, rank, axis = weights.shape[0], weights.ndim, 1
        elif op == "ConvTranspose":
            channels, rank, axis = weights.shape[1] * int(attrs.get("group", 1)), weights.ndim, 1
        elif op == "Gemm":
            if weights.ndim != 2 or attrs.get("transA", 0) not in (0, 1):
                return f"{lname} has unexpected weights"
            channels, rank, axis = weights.shape[0 if attrs.get("transB", 0) else 1], 2, 1
        else:
            if weights.ndim != 2:
                return f"{lname} weights are not a matrix"
            channels, rank, axis = weights.shape[1], self.ranks.get(step.data, 0), -1
            if step.form == "BatchNormalization" and rank != 2:
                return f"{lname} output rank is not known to be 2 (BN channels are axis 1)"
        scale = self._per_channel(step.scale, step, channels, rank, axis)
        shift = self._per_channel(step.shift, step, channels, rank, axis)
        if scale is False or shift is False:
            return "" if step.form != "BatchNormalization" else f"BN channels do not match {lname}'s {channels} output channels"
        bias_slot = {"Conv": 2, "ConvTranspose": 2, "Gemm": 2}.get(op)
        w64 = weights.astype(np.float64)
        if scale is not None:
            if op == "ConvTranspose":
                group = int(attrs.get("group", 1))
                grouped = w64.reshape(group, weights.shape[0] // group, weights.shape[1], *weights.shape[2:])
                factor = scale.reshape(group, 1, weights.shape[1], *([1] * (weights.ndim - 2)))
                w64 = (grouped * factor).reshape(weights.shape)
            elif op == "Gemm" and attrs.get("transB", 0):
                w64 = w64 * scale.reshape(-1, 1)
            elif op in ("Gemm", "MatMul"):
                w64 = w64 * scale.reshape(1, -1)
            else:
                w64 = w64 * scale.reshape(-1, *([1] * (weights.ndim - 1)))
            self._set_const(linear, 1, w64.astype(weights.dtype), "weights")
        if bias_slot is not None:
            self._fold_bias_slot(linear, bias_slot, attrs, scale, shift, channels, weights.dtype)
        elif bias_add is not None:
            slot = 1 if self.producer.get(bias_add.input[0]) is linear else 0
            old = self.const(bias_add.input[slot])
            b64 = np.asarray(old, dtype=np.float64) * (1.0 if scale is None else scale) + (0.0 if shift is None else shift)
            self._set_const(bias_add, slot, b64.astype(old.dtype), "bias")  # type: ignore[union-attr]
        elif shift is not None:
            self._matmul_bias(step, linear, shift.astype(weights.dtype))
            return None
        self._bypass(step.node, bias_add or linear)
        return None

    @staticmethod
    def _per_channel(value: np.ndarray | None, step: Step, channels: int, rank: int, axis: int) -> np.ndarray | None | bool:
        """``value`` as a (channels,) vector along the linear op's channel axis; False if it is not per-channel."""
        if value is None:
            return None
        if step.form == "BatchNormalization":
            return value if value.size == channels else (np.full(channels, value.item()) if value.size == 1 else False)
        if value.ndim > max(rank, 1 if axis == -1 else rank) or (rank == 0 and value.ndim > 1):
            return False  # broadcasting would add dimensions to the output
        shape = (1,) * (max(rank, value.ndim) - value.ndim) + value.shape
        pos = axis % len(shape) if shape else 0
        if any(d != 1 for i, d in enumerate(shape) if i != pos):
            return False
        flat = value.reshape(-1)
        if flat.size == channels:
            return flat
        return np.full(channels, flat.item()) if flat.size == 1 else False

    def _fold_bias_slot(
        self,
        linear: onnx.NodeProto,
        slot: int,
        attrs: dict[str, object],
        scale: np.ndarray | None,
        shift: np.ndarray | None,
        channels: int,
        dtype: np.dtype,
    ) -> None:
        has_bias = len(linear.input) > slot and bool(linear.input[slot])
        bias = np.asarray(self.const(linear.input[slot]), dtype=np.float64) if has_bias else np.zeros(channels)
        beta = float(attrs.get("beta", 1.0)) if linear.op_type == "Gemm" else 1.0  # type: ignore[arg-type]
        if linear.op_type == "Gemm" and has_bias and beta != 1.0:
            bias, beta = bias * beta, 1.0  # y = alpha*A*B + beta*C: carry beta into C, then drop it
            for attr in list(linear.attribute):
                if attr.name == "beta":
                    linear.attribute.remove(attr)
        elif linear.op_type == "Gemm" and not has_bias:
            for attr in list(linear.attribute):
                if attr.name == "beta":
                    linear.attribute.remove(attr)
        if scale is not None:
            bias = bias * scale
        if shift is not None:
            bias = bias + shift
        while len(linear.input) <= slot:
            linear.input.append("")
        self._set_const(linear, slot, bias.astype(dtype), "bias")

    def _matmul_bias(self, step: Step, linear: onnx.NodeProto, bias: np.ndarray) -> None:
        """A MatMul has no bias input: the site becomes its one bias ``Add`` (keeping the site's output name)."""
        name = self.unique(f"{linear.name or linear.output[0]}/bnfold_bias")
        self.graph.initializer.append(numpy_helper.from_array(bias, name))
        self.inits[name] = self.graph.initializer[-1]
        node = step.node
        for old in node.input[1:]:
            self._drop_use(old, node)
        del node.input[:]
        node.input.extend([linear.output[0], name])
        del node.attribute[:]
        del node.output[1:]
        node.op_type, node.domain = "Add", ""
        self.consumers[name].append(node)

    def _drop_use(self, name: str, node: onnx.NodeProto) -> None:
        """Forget one read of ``name`` by ``node``."""
        readers = self.consumers.get(name, [])
        for i, reader in enumerate(readers):
            if reader is node:
                del readers[i]
                return

    def _set_const(self, node: onnx.NodeProto, slot: int, value: np.ndarray, what: str) -> None:
        """Point ``node.input[slot]`` at ``value``: edit a private initializer, copy a shared one."""
        old = node.input[slot]
        private = old in self.inits and old not in self.overridable and self.uses(old) == 1 and list(node.input).count(old) == 1
        if private:
            self.inits[old].CopyFrom(numpy_helper.from_array(value, old))
            return
        name = self.unique(f"{node.name or node.output[0]}/bnfold_{what}")
        self.graph.initializer.append(numpy_helper.from_array(value, name))
        self.inits[name] = self.graph.initializer[-1]
        if old:
            self._drop_use(old, node)
        node.input[slot] = name
        self.consumers[name].append(node)

    def _bypass(self, site: onnx.NodeProto, last: onnx.NodeProto) -> None:
        """Remove ``site``; ``last`` (linear op or its bias Add) takes over its output name."""
        out = site.output[0]
        for name in site.input:
            if name:
                self._drop_use(name, site)
        old = last.output[0]
        last.output[0] = out
        self.producer.pop(old, None)
        self.producer[out] = last
        self.graph.node.remove(site)

    def _standalone(self, step: Step) -> str | None:
        """A BN with nothing to fold into becomes one ``Mul`` and one ``Add`` with broadcastable constants."""
        rank = self.ranks.get(step.data)
        if rank is None or rank < 2:
            return "input rank unknown, left as BatchNormalization"
        node = step.node
        dtype = self.const(node.input[1]).dtype  # type: ignore[union-attr]
        shape = (-1,) + (1,) * (rank - 2)
        base = node.name or node.output[0]
        scale_name, shift_name, mid = (
            self.unique(f"{base}/bnfold_scale"),
            self.unique(f"{base}/bnfold_shift"),
            self.unique(f"{base}/bnfold_scaled"),
        )
        for name, value in ((scale_name, step.scale), (shift_name, step.shift)):
            self.graph.initializer.append(numpy_helper.from_array(value.reshape(shape).astype(dtype), name))  # type: ignore[union-attr]
            self.inits[name] = self.graph.initializer[-1]
        index = list(self.graph.node).index(node)
        mul = helper.make_node("Mul", [step.data, scale_name], [mid], name=self.unique(f"{base}/bnfold_mul"))
        add = helper.make_node("Add", [mid, shift_name], [node.output[0]], name=base)
        for name in node.input:
            if name:
                self._drop_use(name, node)
        self.consumers[step.data].append(mul)
        self.consumers[scale_name].append(mul)
        self.consumers[mid].append(add)
        self.consumers[shift_name].append(add)
        self.graph.node.remove(node)
        self.graph.node.insert(index, add)
        self.graph.node.insert(index, mul)
        self.producer[mid], self.producer[node.output[0]] = mul, add
        return None

    def _prune(self) -> None:
        """Drop initializers and Constant nodes that no longer feed anything."""
        used = {name for n in self.graph.node for name in n.input} | self.pinned | {i.name for i in self.graph.input}
        changed = True
        while changed:
            changed = False
            for node in list(self.graph.node):
                if node.op_type == "Constant" and node.output[0] not in used:
                    self.graph.node.remove(node)
                    changed = True
            used = {name for n in self.graph.node for name in n.input} | self.pinned | {i.name for i in self.graph.input}
        keep = [t for t in self.graph.initializer if t.name in used]
        if len(keep) != len(self.graph.initializer):
            del self.graph.initializer[:]
            self.graph.initializer.extend(keep)


def fold_model(model: onnx.ModelProto, protected: set[str] | None = None) -> tuple[onnx.ModelProto, list[SiteRecord]]:
    """Fold every BN and per-channel Mul/Add/Sub/Div after a linear op; ``model`` is not modified."""
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    folder = OnnxFolder(folded, protected)
    records = folder.run()
    return folded, records


def leftover_sites(model: onnx.ModelProto) -> dict[str, int]:
    """What an unfolded file still carries: BN nodes, and per-channel Mul/Add right behind a linear op.

    Used by the tests and the benchmark to count what a runtime would still
    compute; a MatMul's single bias Add is not counted (MatMul has no bias input).
    """
    probe = OnnxFolder(model)
    counts = {"BatchNormalization": 0, "Mul": 0, "Add": 0}
    for node in model.graph.node:
        if node.op_type == "BatchNormalization":
            counts["BatchNormalization"] += 1
            continue
        if node.op_type not in ELEMENTWISE_OPS:
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
        attrs = {a.name: helper.get_attribute_value(a) for a in linear.attribute}
        if linear.op_type == "Conv":
            channels, rank, axis = weights.shape[0], weights.ndim, 1
        elif linear.op_type == "ConvTranspose":
            channels, rank, axis = weights.shape[1] * int(attrs.get("group", 1)), weights.ndim, 1
        elif linear.op_type == "Gemm":
            channels, rank, axis = weights.shape[0 if attrs.get("transB", 0) else 1], 2, 1
        else:
            channels, rank, axis = weights.shape[1], probe.ranks.get(step.data, 0), -1
        value = step.scale if step.scale is not None else step.shift
        if OnnxFolder._per_channel(value, step, channels, rank, axis) is not False:
            counts["Mul" if step.scale is not None else "Add"] += 1
    return counts
