"""Fold BN and per-channel scale/shift into the linear ops of an ONNX model.

Every site :mod:`bnfold.onnx.recognize` finds (``y = x * scale + shift`` per
channel) is folded with the one fold math of :mod:`bnfold.core.foldmath` (the
TF side's): forward into ``Conv``/``ConvTranspose`` (grouped too)/``Gemm``
weights and bias, or into a ``MatMul``'s weights and its one bias ``Add``;
backward (a BN *before* the op) into a ``Conv`` without padding, a ``Gemm`` or a
2-D ``MatMul``, where it is exact. The safety rules are the TF side's too: the
linear op's output read only by the site, ``training_mode`` refused, shared
weights copied before they change, and no fold that would create a NaN/inf (or
overflow fp16) from finite values: such a site is skipped with a reason.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from bnfold.core.foldmath import Action, Folded, SiteRecord, fit_channels, fold_after, fold_before, storable
from bnfold.onnx.recognize import ELEMENTWISE_OPS, ModelIndex, Step

__all__ = ["OnnxFolder", "fold_model"]


class OnnxFolder(ModelIndex):
    """One pass over one model (edited in place): the indexes and recognizers of :class:`ModelIndex`, and the records."""

    def __init__(self, model: onnx.ModelProto, protected: set[str] | None = None) -> None:
        super().__init__(model, protected)
        self.records: list[SiteRecord] = []

    # -- driver ------------------------------------------------------------------
    def run(self) -> list[SiteRecord]:
        for node in list(self.graph.node):
            if node.op_type in ELEMENTWISE_OPS or node.op_type == "BatchNormalization":
                if node.domain in ("", "ai.onnx") and any(node is n for n in self.graph.node):
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
            if node.output[0] in self.consts.const:
                return  # constant arithmetic, not a site
            elementwise = self._elementwise_step(node)
            if elementwise is None:
                return
            step = elementwise
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
            return
        if node.op_type != "BatchNormalization":
            if why:
                self.records.append(SiteRecord(label, step.form, "skipped", reason=why))
            return
        into = self._backward(step)
        if isinstance(into, onnx.NodeProto):
            self.records.append(SiteRecord(label, step.form, "folded", folded_into=into.name or into.output[0], reason="backward"))
            return
        if into:
            why = f"{why}; {into}"
        # The written file must not carry BN: with nothing to fold into it becomes Mul + Add.
        failed = self._standalone(step)
        action: Action = "standalone" if failed is None else "skipped"
        self.records.append(SiteRecord(label, step.form, action, reason=(why or "") + (f"; {failed}" if failed else "")))

    # -- the forward fold --------------------------------------------------------------
    def _fold(self, step: Step, linear: onnx.NodeProto, bias_add: onnx.NodeProto | None) -> str | None:
        """Fold ``step`` into ``linear`` (the op before it); the reason it cannot ('' for not a site at all), else None."""
        lname = linear.name or linear.output[0]
        if bias_add is not None and (self.uses(linear.output[0]) != 1 or self.uses(bias_add.output[0]) != 1):
            return f"{lname} output also feeds other ops"
        if self.uses(step.data) != 1:
            return f"{lname} output also feeds other ops"
        if linear.op_type == "MatMul" and self.const(linear.input[0]) is not None:
            return f"{lname} multiplies a constant by the data (weights first), not supported"
        weights = self._float_weights(linear)
        if isinstance(weights, str):
            return weights
        attrs = {a.name: helper.get_attribute_value(a) for a in linear.attribute}
        rank = self.ranks.get(step.data)
        if linear.op_type == "MatMul" and step.form == "BatchNormalization" and rank != 2:
            return f"{lname} output rank is not known to be 2 (BN channels are axis 1)"
        layout = self._layout(linear, weights, rank)
        if isinstance(layout, str):
            return layout
        channels = layout.channels
        axis = -1 if linear.op_type == "MatMul" else 1
        scale = self._per_channel(step.scale, step, channels, rank or 0, axis)
        shift = self._per_channel(step.shift, step, channels, rank or 0, axis)
        if scale is False or shift is False:
            return "" if step.form != "BatchNormalization" else f"BN channels do not match {lname}'s {channels} output channels"
        assert not isinstance(scale, bool) and not isinstance(shift, bool)
        s = np.ones(channels) if scale is None else scale
        t = np.zeros(channels) if shift is None else shift
        if linear.op_type in ("Conv", "ConvTranspose", "Gemm"):
            bias = self._bias_input(linear, attrs, channels)
            if isinstance(bias, str):
                return bias
            folded = fold_after(layout.view, s, t, layout.out_axes, bias)
            why = storable(folded, weights.dtype, lname)
            if why:
                return why
            if scale is not None:
                self._set_const(linear, 1, folded.weights.reshape(layout.shape), "weights")
            if linear.op_type == "Gemm":
                self._drop_attr(linear, "beta")
            while len(linear.input) <= 2:
                linear.input.append("")
            self._set_const(linear, 2, folded.bias.astype(weights.dtype), "bias")
        elif bias_add is not None:
            slot = 1 if self.producer.get(bias_add.input[0]) is linear else 0
            old = self.const(bias_add.input[slot])
            assert old is not None
            fitted = self._per_channel(np.asarray(old, dtype=np.float64), Step(bias_add, "", None, None, "Add"), channels, rank or 0, -1)
            if fitted is False or fitted is None or old.dtype.kind != "f":
                return f"{lname}'s bias Add is not per channel"
            assert not isinstance(fitted, bool)
            folded = fold_after(layout.view, s, t, layout.out_axes, fitted)
            why = storable(folded, old.dtype, lname) or storable(folded, weights.dtype, lname)
            if why:
                return why
            if scale is not None:
                self._set_const(linear, 1, folded.weights, "weights")
            self._set_const(bias_add, slot, folded.bias.astype(old.dtype), "bias")
        else:
            folded = fold_after(layout.view, s, t, layout.out_axes)
            if shift is None:
                folded = Folded(folded.weights, np.zeros(0))
            why = storable(folded, weights.dtype, lname)
            if why:
                return why
            self._set_const(linear, 1, folded.weights, "weights")
            if shift is not None:
                self._matmul_bias(step, linear, folded.bias.astype(weights.dtype))
                return None
        self._bypass(step.node, bias_add or linear)
        return None

    # -- the backward fold -------------------------------------------------------------
    def _backward(self, step: Step) -> onnx.NodeProto | str:
        """Fold a BN into the one linear op that reads it (``W' = W * s`` per input channel, ``b' = b + sum(W * t)``).

        Exact only where nothing is added to the normalized input before the
        weights see it: no zero padding (a padded border would be ``t`` instead
        of 0), no transposed A in Gemm. Returns the op folded into, or why not.
        """
        out = step.node.output[0]
        readers = self.consumers.get(out, [])
        if self.uses(out) != 1 or len(readers) != 1:
            return "its output feeds several ops (no backward fold)"
        linear = readers[0]
        lname = linear.name or linear.output[0]
        if linear.op_type not in ("Conv", "Gemm", "MatMul") or linear.domain not in ("", "ai.onnx"):
            return f"not before a Conv/Gemm/MatMul either ({linear.op_type} reads it)"
        if list(linear.input).count(out) != 1 or linear.input[0] != out:
            return f"{lname} reads it as weights, not data"
        attrs = {a.name: helper.get_attribute_value(a) for a in linear.attribute}
        if linear.op_type == "Conv":
            auto_pad = attrs.get("auto_pad", b"NOTSET")
            auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
            if auto_pad not in ("NOTSET", "VALID") or any(int(p) != 0 for p in attrs.get("pads", []) or []):  # type: ignore[union-attr]
                return f"{lname} pads its input: the padded border would not be normalized (backward fold not exact)"
        if linear.op_type == "Gemm" and (attrs.get("transA", 0) or float(attrs.get("alpha", 1.0)) != 1.0):  # type: ignore[arg-type]
            return f"{lname} has transA or alpha != 1 (backward fold not supported)"
        weights = self._float_weights(linear)
        if isinstance(weights, str):
            return weights
        rank = self.ranks.get(step.data)
        if linear.op_type in ("Gemm", "MatMul") and rank != 2:
            return f"{lname} input rank is not known to be 2 (BN channels are axis 1)"
        layout = self._layout(linear, weights, rank)
        if isinstance(layout, str):
            return layout
        if layout.in_axis is None:
            return f"{lname} is grouped (backward fold not supported)"
        s, t = fit_channels(step.scale, layout.in_channels), fit_channels(step.shift, layout.in_channels)  # type: ignore[arg-type]
        if s is None or t is None:
            return f"BN channels do not match {lname}'s {layout.in_channels} input channels"
        bias = self._bias_input(linear, attrs, layout.channels) if linear.op_type != "MatMul" else None
        if isinstance(bias, str):
            return bias
        folded = fold_before(layout.view, s, t, layout.in_axis, layout.out_axes, bias)
        why = storable(folded, weights.dtype, lname)
        if why:
            return why
        self._set_const(linear, 1, folded.weights, "weights")
        for name in step.node.input:
            if name:
                self._drop_use(name, step.node)
        linear.input[0] = step.data
        self.consumers[step.data].append(linear)
        self.graph.node.remove(step.node)
        if linear.op_type == "MatMul":
            mid = self.unique(f"{lname}/bnfold_matmul")
            bias_name = self.unique(f"{lname}/bnfold_bias")
            self.graph.initializer.append(numpy_helper.from_array(folded.bias.astype(weights.dtype), bias_name))
            self.inits[bias_name] = self.graph.initializer[-1]
            final = linear.output[0]
            linear.output[0] = mid
            add = helper.make_node("Add", [mid, bias_name], [final], name=self.unique(f"{lname}/bnfold_bias_add"))
            self.graph.node.insert(list(self.graph.node).index(linear) + 1, add)
            self.producer[mid], self.producer[final] = linear, add
            self.consumers[mid].append(add)
            self.consumers[bias_name].append(add)
            return linear
        if linear.op_type == "Gemm":
            self._drop_attr(linear, "beta")
        while len(linear.input) <= 2:
            linear.input.append("")
        self._set_const(linear, 2, folded.bias.astype(weights.dtype), "bias")
        return linear

    # -- graph edits ---------------------------------------------------------------------
    @staticmethod
    def _drop_attr(node: onnx.NodeProto, name: str) -> None:
        for attr in list(node.attribute):
            if attr.name == name:
                node.attribute.remove(attr)

    def _matmul_bias(self, step: Step, linear: onnx.NodeProto, bias: np.ndarray) -> None:
        """A MatMul has no bias input: the site becomes its one bias ``Add`` (keeping the site's output name)."""
        name = self.unique(f"{linear.name or linear.output[0]}/bnfold_bias")
        self.graph.initializer.append(numpy_helper.from_array(bias, name))
        self.inits[name] = self.graph.initializer[-1]
        node = step.node
        for old in node.input:
            if old:
                self._drop_use(old, node)
        del node.input[:]
        node.input.extend([linear.output[0], name])
        del node.attribute[:]
        del node.output[1:]
        node.op_type, node.domain = "Add", ""
        self.consumers[linear.output[0]].append(node)
        self.consumers[name].append(node)

    def _drop_use(self, name: str, node: onnx.NodeProto) -> None:
        """Forget one read of ``name`` by ``node``."""
        readers = self.consumers.get(name, [])
        for i, reader in enumerate(readers):
            if reader is node:
                del readers[i]
                return

    def _set_const(self, node: onnx.NodeProto, slot: int, value: np.ndarray, what: str) -> None:
        """Point ``node.input[slot]`` at ``value``: edit a private initializer, copy a shared (or computed) one."""
        old = node.input[slot]
        private = old in self.inits and old not in self.overridable and self.uses(old) == 1 and list(node.input).count(old) == 1
        if private:
            self.inits[old].CopyFrom(numpy_helper.from_array(value, old))
            self.consts.cache[old] = value
            return
        name = self.unique(f"{node.name or node.output[0]}/bnfold_{what}")
        self.graph.initializer.append(numpy_helper.from_array(value, name))
        self.inits[name] = self.graph.initializer[-1]
        self.consts.inits[name] = self.inits[name]
        self.consts.const.add(name)
        self.consts.cache[name] = value
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
        dtype = self._dtype_of(step.data)
        if rank is None or rank < 2 or dtype is None:
            return "input rank unknown, left as BatchNormalization"
        if dtype.kind != "f":
            return "input is not floating point, left as BatchNormalization"
        assert step.scale is not None and step.shift is not None
        with np.errstate(over="ignore", invalid="ignore"):
            why = storable(Folded(step.scale.astype(dtype), step.shift), dtype, "its scale and shift")
        if why:
            return f"{why}, left as BatchNormalization"
        node = step.node
        shape = (-1,) + (1,) * (rank - 2)
        base = node.name or node.output[0]
        scale_name, shift_name, mid = (
            self.unique(f"{base}/bnfold_scale"),
            self.unique(f"{base}/bnfold_shift"),
            self.unique(f"{base}/bnfold_scaled"),
        )
        for name, value in ((scale_name, step.scale), (shift_name, step.shift)):
            self.graph.initializer.append(numpy_helper.from_array(value.reshape(shape).astype(dtype), name))
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
        """Drop initializers, and constant nodes (Constant, Transpose of weights...), that no longer feed anything."""
        inputs = {i.name for i in self.graph.input}
        while True:
            used = {name for n in self.graph.node for name in n.input} | self.pinned | inputs
            dead = [n for n in self.graph.node if n.output and all(o not in used for o in n.output) and all(not o or o in self.consts.const for o in n.output)]
            if not dead:
                break
            for node in dead:
                self.graph.node.remove(node)
        keep = [t for t in self.graph.initializer if t.name in used]
        if len(keep) != len(self.graph.initializer):
            del self.graph.initializer[:]
            self.graph.initializer.extend(keep)


def fold_model(
    model: onnx.ModelProto, protected: set[str] | None = None, *, in_place: bool = False
) -> tuple[onnx.ModelProto, list[SiteRecord]]:
    """Fold every BN and per-channel Mul/Add/Sub/Div at a linear op; ``model`` is not modified unless ``in_place``.

    ``in_place`` is for a caller that owns the model (tf2onnx's output in
    :func:`bnfold.onnx.export.to_onnx`): it saves a copy of every weight.
    """
    if in_place:
        folded = model
    else:
        folded = onnx.ModelProto()
        folded.CopyFrom(model)
    folder = OnnxFolder(folded, protected)
    records = folder.run()
    return folded, records
