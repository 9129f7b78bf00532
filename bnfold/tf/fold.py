"""Fold canonical :class:`~bnfold.tf.recognize.Affine` sites into the linear ops around them.

Written once against ``Affine``: the BN form never matters here. A declarative
table says where each linear op keeps its output and input channels in the
weights; the data channel axis comes from ``data_format``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from tensorflow.core.framework import attr_value_pb2, graph_pb2, node_def_pb2
from tensorflow.python.framework import dtypes

from bnfold.core.foldmath import Action, Folded, SiteRecord, fit_channels, fold_after, fold_before, storable
from bnfold.tf.canonical import FLOAT_TYPES, ConstEvaluator, consumer_dtype, output_dtype
from bnfold.tf.graph import GraphIndex, attr, attr_text, collection_paused, make_node, parse_input
from bnfold.tf.recognize import Affine, OtherNormalization, Unfoldable, as_step, data_format_axis, recognize
from bnfold.tf.tensors import ContentBuffer, Scratch

if TYPE_CHECKING:
    from bnfold.tf.streaming import Contents

__all__ = ["LINEAR_OPS", "Action", "Folder", "LinearSpec", "SiteRecord", "fold_graph"]


@dataclass(frozen=True)
class LinearSpec:
    """Where a linear op keeps channels: weight input slot, data input slot, weight axes, data rank."""

    weight_slot: int
    data_slot: int
    out_axis: int
    in_axis: int
    rank: int

    @property
    def weight_rank(self) -> int:
        return 2 if self.rank == 2 else self.rank


LINEAR_OPS: dict[str, LinearSpec] = {
    "Conv2D": LinearSpec(weight_slot=1, data_slot=0, out_axis=3, in_axis=2, rank=4),
    "DepthwiseConv2dNative": LinearSpec(weight_slot=1, data_slot=0, out_axis=3, in_axis=2, rank=4),
    "Conv3D": LinearSpec(weight_slot=1, data_slot=0, out_axis=4, in_axis=3, rank=5),
    "Conv2DBackpropInput": LinearSpec(weight_slot=1, data_slot=2, out_axis=2, in_axis=3, rank=4),
    "MatMul": LinearSpec(weight_slot=1, data_slot=0, out_axis=1, in_axis=0, rank=2),
}


def _weight_axes(node: node_def_pb2.NodeDef, spec: LinearSpec) -> tuple[int, int]:
    """Out/in axes of the weights; MatMul's depend on ``transpose_b``."""
    if node.op == "MatMul" and attr(node, "transpose_b").b:
        return 0, 1
    return spec.out_axis, spec.in_axis


def _data_axis(node: node_def_pb2.NodeDef, spec: LinearSpec) -> int | None:
    fmt = attr_text(node, "data_format", "")
    return data_format_axis(fmt, spec.rank)


def _overflow(linear: node_def_pb2.NodeDef, folded: Folded) -> str | None:
    """Why folded values cannot be stored in the op's dtype (fp16 overflow after scaling), else None."""
    return storable(folded, dtypes.as_dtype(attr(linear, "T").type).as_numpy_dtype, linear.name)


def _out_axes(linear: node_def_pb2.NodeDef, weights: np.ndarray, out_axis: int) -> tuple[int, ...]:
    """A depthwise kernel (H, W, I, M) numbers its I*M output channels over two axes."""
    return (2, 3) if linear.op == "DepthwiseConv2dNative" else (out_axis,)


class Folder:
    """One fold of one graph: holds the index, the evaluator and the records."""

    def __init__(
        self,
        graph_def: graph_pb2.GraphDef,
        protected: set[str],
        in_place: bool = False,
        fed: set[str] | None = None,
        contents: Contents | None = None,
    ) -> None:
        self.index = GraphIndex(graph_def, in_place=in_place, contents=contents)
        self.ev = ConstEvaluator(self.index)
        self.protected = protected
        self.fed = fed or set()
        self.records: list[SiteRecord] = []
        self.others: list[SiteRecord] = []  # layer/instance norms: reported apart, never as BN sites
        self.scratch = Scratch()  # new weights are computed here, one kernel after the other
        self._last_linear: str | None = None

    # -- driver --------------------------------------------------------------
    def run(self) -> list[SiteRecord]:
        limit = sys.getrecursionlimit()
        sys.setrecursionlimit(max(limit, 20000))
        try:
            for name in self.index.topological_order():
                if name not in self.index:
                    continue
                site = recognize(self.index, self.ev, self.index.node(name))
                if isinstance(site, OtherNormalization):
                    self.others.append(SiteRecord(site.name, "normalization", "skipped", reason=site.reason))
                elif isinstance(site, Unfoldable):
                    self.records.append(SiteRecord(site.name, site.form, "skipped", reason=site.reason))
                elif site is not None:
                    why = self._guard(site)
                    if why:
                        self.records.append(SiteRecord(site.name, site.form, "skipped", reason=why))
                    else:
                        self.records.append(self.fold_site(site))
        finally:
            sys.setrecursionlimit(limit)
        return self.records

    def _guard(self, site: Affine) -> str | None:
        """Why folding ``site`` would lose a tensor the user named, or use a constant the user overrides."""
        named = [n for n in site.replaces if n != site.output_node and n in self.protected]
        if named:
            return f"{named[0]} is a requested input/output/fed tensor, and folding would remove it"
        fed = self._fed_in(site.const_refs)
        if fed:
            return f"{fed} is fed (--feed), so the BN parameters computed from it are not constants"
        return None

    def _fed_in(self, refs: list[str]) -> str | None:
        """A fed node that the constant subgraphs behind ``refs`` read, if any."""
        if not self.fed:
            return None
        for ref in refs:
            for node in self.index.walk(parse_input(ref)[0]):
                if node.name in self.fed:
                    return node.name
        return None

    def fold_site(self, site: Affine) -> SiteRecord:
        forward = self.fold_forward(site)
        if forward is None:
            return SiteRecord(site.name, site.form, "folded", folded_into=self._last_linear)
        backward = self.fold_backward(site)
        if backward is None:
            return SiteRecord(site.name, site.form, "folded", folded_into=self._last_linear)
        overflow = self.make_standalone(site)
        if overflow:
            return SiteRecord(site.name, site.form, "skipped", reason=f"{forward}; {backward}; {overflow}")
        return SiteRecord(site.name, site.form, "standalone", reason=f"{forward}; {backward}")

    # -- forward: linear op, then BN -----------------------------------------
    def fold_forward(self, site: Affine) -> str | None:
        """Fold into the linear op before the site; the reason it cannot, else None."""
        linear, port = self.index.producer(site.input_ref)
        if linear is None or linear.op not in LINEAR_OPS or port != 0:
            return f"not after a conv/dense op (input is {linear.op if linear else 'missing'})"
        spec = LINEAR_OPS[linear.op]
        readers = self.index.consumers(linear.name)
        if linear.name in self.protected:
            return f"{linear.name} is a requested output/fed tensor, and folding would change its value"
        if len(readers) != 1 or self.index.control_consumers(linear.name):
            return f"{linear.name} output also feeds other ops"
        if site.const_rank > spec.rank:
            return f"a rank-{site.const_rank} constant would broadcast {linear.name}'s rank-{spec.rank} output to a higher rank"
        weights = self._usable_weights(site, linear, spec)
        if isinstance(weights, str):
            return weights
        out_axis, _ = _weight_axes(linear, spec)
        out_axes = _out_axes(linear, weights, out_axis)
        out_channels = int(np.prod([weights.shape[a] for a in out_axes]))
        scale, shift = self._expand(site, out_channels)
        if scale is None or shift is None:
            return f"BN has {site.channels} channels, {linear.name} has {out_channels}"
        buffer = self._weight_buffer(linear, spec, weights)
        folded = fold_after(weights, scale, shift, out_axes, out=buffer.array)
        overflow = _overflow(linear, folded)
        if overflow:
            return overflow
        self._set_weights(linear, spec, buffer, folded)
        self._end_with_bias(site, linear.name, folded.bias, _data_axis(linear, spec), spec.rank)
        self._last_linear = linear.name
        return None

    # -- backward: BN, then linear op ----------------------------------------
    def fold_backward(self, site: Affine) -> str | None:
        """Fold into the linear op after the site where exact; the reason it cannot, else None."""
        readers = self.index.consumers(site.output_node)
        if site.output_node in self.protected:
            return f"{site.output_node} is a requested output/fed tensor"
        if site.out_dtype is not None and site.out_dtype != site.dtype:
            return "a Cast inside the BN changes the dtype the next op reads"
        if len(readers) != 1 or self.index.control_consumers(site.output_node):
            return "not read by a single conv/dense op"
        linear = self.index.node(readers[0].node)
        spec = LINEAR_OPS.get(linear.op)
        if spec is None or readers[0].slot != spec.data_slot or readers[0].index != 0:
            return f"not read by a conv/dense op (read by {linear.op})"
        if linear.op == "Conv2DBackpropInput":
            return "before a transposed conv: overlapping windows make the shift non-uniform"
        if site.const_rank > spec.rank:
            return f"a rank-{site.const_rank} constant changes the rank of {linear.name}'s input"
        if linear.op == "MatMul" and attr(linear, "transpose_a").b:
            return f"{linear.name} transposes its input"
        has_shift = bool(np.any(site.shift != 0))
        padding = attr_text(linear, "padding", "VALID")
        if linear.op != "MatMul" and has_shift and padding != "VALID":
            return f"{linear.name} pads with zeros ({padding}), which would meet the BN shift"
        weights = self._usable_weights(site, linear, spec)
        if isinstance(weights, str):
            return weights
        out_axis, in_axis = _weight_axes(linear, spec)
        scale, shift = self._expand(site, weights.shape[in_axis])
        if scale is None or shift is None:
            return f"BN has {site.channels} channels, {linear.name} reads {weights.shape[in_axis]}"
        buffer = self._weight_buffer(linear, spec, weights)
        folded = fold_before(weights, scale, shift, in_axis, _out_axes(linear, weights, out_axis), out=buffer.array)
        overflow = _overflow(linear, folded)
        if overflow:
            return overflow
        self.index.set_input(linear.name, spec.data_slot, site.input_ref)
        self._set_weights(self.index.node(linear.name), spec, buffer, folded)
        self._remove_site(site, keep=None)
        if has_shift:
            self._add_bias_after(linear.name, folded.bias, _data_axis(linear, spec), spec.rank)
        self._last_linear = linear.name
        return None

    # -- standalone ----------------------------------------------------------
    def make_standalone(self, site: Affine) -> str | None:
        """One multiply and one add with precomputed constants, under the site's name; or why not."""
        end = self.index.node(site.output_node)
        np_dtype = dtypes.as_dtype(site.dtype).as_numpy_dtype
        with np.errstate(over="ignore"):
            if not (np.all(np.isfinite(site.scale.astype(np_dtype))) and np.all(np.isfinite(site.shift.astype(np_dtype)))):
                return f"scale or shift overflows {np.dtype(np_dtype).name}"
        k = -site.channel_axis if site.channel_axis is not None else 1
        # Keep the rank of the constants replaced: a (1, 1, C) Add broadcasts its input to rank 3.
        shape = (1,) * max(0, site.const_rank - k) + (-1,) + (1,) * (k - 1)

        def constant(values: np.ndarray) -> np.ndarray:
            # One value for every channel is written as a broadcast scalar of the same rank, as the
            # chain had it: converters fuse a scalar multiply through a zero Pad into the next conv,
            # not a per-channel one (TFLite: EfficientNetB0's input Rescaling gained a MUL, #11).
            uniform = values.size > 0 and bool(np.all(values == values.flat[0]))
            return (values.flat[:1].reshape((1,) * len(shape)) if uniform else values.reshape(shape)).astype(np_dtype)

        scale_c = self.index.add_const(f"{site.name}/bnfold_scale/value", constant(site.scale), site.dtype)
        shift_c = self.index.add_const(f"{site.name}/bnfold_shift/value", constant(site.shift), site.dtype)
        mul = make_node(
            self.index.unique_name(f"{site.name}/bnfold_scale"), "Mul", [site.input_ref, scale_c], {"T": _type_attr(site.dtype)}, end.device
        )
        add = make_node(site.output_node, "AddV2", [mul.name, shift_c], {"T": _type_attr(site.dtype)}, end.device)
        self.index.add(mul)
        self._replace_end(site, add)
        return None

    # -- shared pieces -------------------------------------------------------
    def _usable_weights(self, site: Affine, linear: node_def_pb2.NodeDef, spec: LinearSpec) -> np.ndarray | str:
        """The linear op's constant weights when the site can fold into them, else why not."""
        why = self._check_linear(site, linear, spec, _data_axis(linear, spec))
        if why:
            return why
        if len(linear.input) <= spec.weight_slot:
            return f"{linear.name} has no weights input"
        fed = self._fed_in([linear.input[spec.weight_slot]])
        if fed:
            return f"{linear.name} weights depend on {fed}, which is fed (--feed)"
        weights = self.ev.raw(linear.input[spec.weight_slot])
        if weights is None:
            return f"{linear.name} weights are not constants"
        if weights.ndim != spec.weight_rank or weights.dtype.kind not in "fV":
            return (
                f"{linear.name} weights have shape {list(weights.shape)} and dtype {weights.dtype}, not a {spec.weight_rank}-D float kernel"
            )
        return weights

    def _check_linear(self, site: Affine, linear: node_def_pb2.NodeDef, spec: LinearSpec, data_axis: int | None) -> str | None:
        if attr(linear, "T").type not in FLOAT_TYPES:
            return f"{linear.name} is not floating point"
        if site.channel_axis is not None and site.channel_axis != data_axis:
            return f"BN channel axis {site.channel_axis} is not {linear.name}'s channel axis {data_axis}"
        return None

    @staticmethod
    def _expand(site: Affine, channels: int) -> tuple[np.ndarray | None, np.ndarray | None]:
        return fit_channels(site.scale, channels), fit_channels(site.shift, channels)

    def _weight_buffer(self, linear: node_def_pb2.NodeDef, spec: LinearSpec, weights: np.ndarray) -> ContentBuffer:
        """Where the new weights are computed: in the dtype the op reads them in, laid out as the graph stores them."""
        dtype = consumer_dtype(linear, spec.weight_slot)
        return ContentBuffer(weights.shape, dtypes.as_dtype(dtype).as_numpy_dtype if dtype else weights.dtype, self.scratch)

    def _set_weights(self, linear: node_def_pb2.NodeDef, spec: LinearSpec, value: ContentBuffer, folded: Folded) -> None:
        """Point the linear op at new weights; the old constant is never edited (others may read it).

        Where the old weights were left in the model file (bnfold.tf.streaming), the new ones are
        kept as how to compute them from those, and computed again when the graph is written.
        """
        old = linear.input[spec.weight_slot]
        dtype = consumer_dtype(linear, spec.weight_slot) or dtypes.as_dtype(value.array.dtype).as_datatype_enum
        lazy = self.index.lazy_value(old)
        if lazy is not None and folded.factor is not None:
            from bnfold.tf.streaming import ScaledTensor

            const = self.index.add_stub(f"{linear.name}/bnfold_weights", ScaledTensor(lazy, folded.factor, value.array.dtype), dtype)
        else:
            const = self.index.add_const(f"{linear.name}/bnfold_weights", value, dtype)
        self.index.set_input(linear.name, spec.weight_slot, const)
        self.prune([parse_input(old)[0]])

    def _end_with_bias(self, site: Affine, linear: str, bias: np.ndarray, data_axis: int | None, rank: int) -> None:
        end = self.index.node(site.output_node)
        dtype = attr(self.index.node(linear), "T").type
        node = self._bias_node(site.output_node, linear, bias, dtype, data_axis, rank, end.device)
        self._replace_end(site, node)

    def _bias_node(
        self, name: str, source: str, bias: np.ndarray, dtype: int, data_axis: int | None, rank: int, device: str
    ) -> node_def_pb2.NodeDef:
        """A BiasAdd (grappler fuses it into the conv); NCHW means channels at dim 1 for any rank."""
        np_dtype = dtypes.as_dtype(dtype).as_numpy_dtype
        const = self.index.add_const(f"{name}/bnfold_bias", bias.astype(np_dtype), dtype)
        fmt = b"NHWC" if data_axis in (-1, None) else b"NCHW"
        attrs = {"T": _type_attr(dtype), "data_format": attr_value_pb2.AttrValue(s=fmt)}
        return make_node(name, "BiasAdd", [source, const], attrs, device)

    def _add_bias_after(self, linear: str, bias: np.ndarray, data_axis: int | None, rank: int) -> None:
        """Add ``bias`` after ``linear``: into its own bias op when it has one, else a new BiasAdd."""
        readers = self.index.consumers(linear)
        if len(readers) == 1 and not self.index.control_consumers(linear) and linear not in self.protected:
            step = as_step(self.index, self.ev, self.index.node(readers[0].node))
            if (
                step is not None
                and self.index.node(step.node).op != "Cast"  # the identity step: no bias to merge into
                and step.input_ref == linear
                and np.all(step.scale == 1)
                and step.axis in (data_axis, None)
                and step.const_rank <= rank
                and not self._fed_in(list(step.const_refs))
            ):
                old = self.index.node(step.node)
                total = step.shift + bias
                self._replace_node_keep_name(
                    old, self._bias_node(old.name, linear, total, attr(old, "T").type, data_axis, rank, old.device)
                )
                return
        node = self.index.node(linear)
        renamed = node_def_pb2.NodeDef()
        renamed.CopyFrom(node)
        renamed.name = self.index.unique_name(f"{linear}/bnfold_linear")
        self.index.add(renamed)
        self._replace_node_keep_name(node, self._bias_node(linear, renamed.name, bias, attr(node, "T").type, data_axis, rank, node.device))

    def _replace_node_keep_name(self, old: node_def_pb2.NodeDef, new: node_def_pb2.NodeDef) -> None:
        inputs = [parse_input(r)[0] for r in old.input]
        self.index.replace(new)
        self.ev.forget(old.name)
        self.prune(inputs)

    def _replace_end(self, site: Affine, new_end: node_def_pb2.NodeDef) -> None:
        """``new_end`` takes the site's place; a Cast back restores the dtype readers expect (mixed precision)."""
        made = output_dtype(new_end)
        if site.out_dtype is not None and made is not None and made != site.out_dtype:
            new_end.name = self.index.unique_name(f"{site.output_node}/bnfold_{new_end.op.lower()}")
            self.index.add(new_end)
            attrs = {"SrcT": _type_attr(made), "DstT": _type_attr(site.out_dtype)}
            new_end = make_node(site.output_node, "Cast", [new_end.name], attrs, new_end.device)
        self._remove_site(site, keep=new_end)

    def _remove_site(self, site: Affine, keep: node_def_pb2.NodeDef | None) -> None:
        """Drop the site's nodes; ``keep`` takes the output node's name so readers still resolve."""
        seeds: list[str] = []
        for name in reversed(site.replaces):
            node = self.index.node(name)
            seeds.extend(parse_input(r)[0] for r in node.input)
            if name == site.output_node and keep is not None:
                self.index.replace(keep)
            elif name == site.output_node:
                self._rewire(name, site.input_ref)
                self.index.remove(name)
            else:
                self.index.remove(name)
            self.ev.forget(name)
        self.prune(seeds)

    def _rewire(self, name: str, ref: str) -> None:
        for reader in self.index.consumers(name, 0):
            self.index.set_input(reader.node, reader.slot, ref)

    def prune(self, seeds: list[str]) -> None:
        """Remove nodes an edit left unread; constants read only by control edges go too."""
        stack = list(seeds)
        while stack:
            name = stack.pop()
            if name not in self.index or name in self.protected:
                continue
            node = self.index.node(name)
            if node.op in ("Placeholder", "PlaceholderWithDefault") or self.index.consumers(name):
                continue
            controls = self.index.control_consumers(name)
            if controls:
                if not self._is_constant_read(node):
                    continue
                self.index.drop_control_readers(name)
            stack.extend(parse_input(r)[0] for r in node.input)
            self.index.remove(name)
            self.ev.forget(name)

    def _is_constant_read(self, node: node_def_pb2.NodeDef) -> bool:
        """A control edge on a constant (or an Identity of one) orders nothing and can go."""
        return node.op == "Const" or (node.op == "Identity" and self.ev.is_const(node.name))


def _type_attr(dtype: int) -> attr_value_pb2.AttrValue:
    return attr_value_pb2.AttrValue(type=dtype)


@dataclass
class FoldOutcome:
    """A fold's graph, its BN sites, and the other normalizations (layer/instance norm) seen but not BN."""

    graph_def: graph_pb2.GraphDef
    sites: list[SiteRecord]
    others: list[SiteRecord]


def fold_graph_outcome(
    graph_def: graph_pb2.GraphDef,
    protected: set[str] | None = None,
    *,
    in_place: bool = False,
    fed: set[str] | None = None,
    contents: Contents | None = None,
) -> FoldOutcome:
    """:func:`fold_graph`, also returning the other normalizations; ``fed`` names nodes a feed overrides;
    ``contents`` holds the values of the graph's stubs (bnfold.tf.streaming), and of the new ones."""
    with collection_paused():
        folder = Folder(graph_def, protected or set(), in_place=in_place, fed=fed, contents=contents)
        records = folder.run()
        if not any(r.action != "skipped" for r in records):
            return FoldOutcome(graph_def, records, folder.others)
        return FoldOutcome(folder.index.to_graph_def(), records, folder.others)


def fold_graph(
    graph_def: graph_pb2.GraphDef, protected: set[str] | None = None, *, in_place: bool = False, fed: set[str] | None = None
) -> tuple[graph_pb2.GraphDef, list[SiteRecord]]:
    """Fold every BN site of ``graph_def``; ``protected`` names nodes that must survive (inputs/outputs/feeds).

    ``graph_def`` is not modified, unless ``in_place``: then it is edited into the
    result (and returned), so unchanged nodes and new weights are never copied.
    Use that only for a graph nothing else will read, such as one just parsed.
    """
    outcome = fold_graph_outcome(graph_def, protected, in_place=in_place, fed=fed)
    return outcome.graph_def, outcome.sites
