"""Where a graph's BN layers are and what they normalize: the sites recalibration measures, in levels.

Every BN form bnfold folds (:mod:`bnfold.tf.recognize`), plus fused BN in
training mode and Keras 3's batch-moments chains, whose moving statistics are
variables the graph never reads. A site's level says which sites must be
repaired before it is measured (upstream first).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from tensorflow.core.framework import graph_pb2, types_pb2

from bnfold.core.findings import BnStats
from bnfold.tf.canonical import ConstEvaluator, input_dtype
from bnfold.tf.graph import GraphIndex, attr, parse_input
from bnfold.tf.recognize import FUSED_BN_OPS, GLOBAL_BN_OPS, Affine, recognize


@dataclass
class Site:
    """One BN to recalibrate: where its input comes from and where its statistics enter the graph."""

    name: str
    label: str
    form: str
    input_ref: str
    output_node: str
    channel_axis: int | None
    eps: float
    mean_at: tuple[str, int]
    var_at: tuple[str, int]
    dtype: int  # of the statistics (float32 for a fused BN on half tensors)
    shape: tuple[int, ...]  # of the statistics as the graph holds them
    old_mean: np.ndarray | None
    old_var: np.ndarray | None
    training: bool = False  # a fused BN in training mode: rewritten to inference mode
    level: int = 0
    # a BN on batch moments without gamma or beta: shape () until the first measurement gives the channels
    rank: int = 0
    keepdims: bool = False


def _shaped(value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    value = np.asarray(value, np.float64)
    return value.reshape(shape) if value.size == int(np.prod(shape)) else np.broadcast_to(value.reshape(-1)[:1], shape).copy()


# -- finding the BNs (the doctor's readers) ----------------------------------------------
def find_sites(graph_def: graph_pb2.GraphDef) -> tuple[list[Site], list[str]]:
    """Every BN whose statistics can be recalibrated, and a note for each that cannot."""
    from bnfold.doctor import statistics as doctor

    index = GraphIndex(graph_def)
    ev = ConstEvaluator(index)
    sites: list[Site] = []
    notes: list[str] = []
    for node in index:
        stat: BnStats | None = None
        training = False
        output = node.name
        form = node.op
        if node.op in FUSED_BN_OPS:
            training = attr(node, "is_training").b if "is_training" in node.attr else True
            stat = doctor.fused_stats(index, ev, node)
            if stat is None and training:
                stat = _training_fused(index, ev, node)
        elif node.op in GLOBAL_BN_OPS:
            stat = doctor.global_stats(index, ev, node)
        elif node.op == "Rsqrt" and not ev.is_const(node.name):
            mean = doctor.batch_mean_behind(index, ev, node.name)
            if mean is not None:
                moments_site = _batch_moments_site(index, ev, node, mean)
                if moments_site is None:
                    notes.append(
                        f"{node.name}: normalizes with moments computed from the batch itself (tf.nn.moments over axis 0) in a shape "
                        "bnfold does not rewrite; left as it is: export it with the moving averages, then recalibrate"
                    )
                else:
                    sites.append(moments_site)
            continue
        elif node.op in ("Add", "AddV2", "Sub", "Mul", "BiasAdd", "RealDiv"):
            site = recognize(index, ev, node)
            if isinstance(site, Affine) and site.form == "decomposed":
                stat = doctor.decomposed_stats(index, ev, site)
                output, form = site.output_node, "decomposed"
        if stat is None:
            if node.op in FUSED_BN_OPS or node.op in GLOBAL_BN_OPS:
                notes.append(f"{node.name}: its mean/variance are not constants of the graph; left as it is")
            continue
        if stat.mean_at is None or stat.var_at is None:
            notes.append(f"{stat.name}: bnfold did not find where its mean/variance enter the graph; left as it is")
            continue
        mean_node, mean_slot = stat.mean_at
        var_node, var_slot = stat.var_at
        dtype = input_dtype(index, index.node(var_node).input[var_slot]) or types_pb2.DT_FLOAT
        raw = ev.raw(index.node(var_node).input[var_slot])
        scale = ev.value(index.data_inputs(node)[1]) if node.op in FUSED_BN_OPS else None
        channels = stat.var.size or (scale.size if scale is not None else 0)
        if not channels:
            notes.append(f"{stat.name}: bnfold cannot tell its channel count; left as it is")
            continue
        shape = tuple(raw.shape) if raw is not None and raw.size == channels else (channels,)
        label = doctor.LayerStats(stat.name, stat.input_ref, stat.mean, stat.var, stat.eps, stat.channel_axis).label
        sites.append(
            Site(
                stat.name,
                label,
                form,
                stat.input_ref,
                output,
                stat.channel_axis,
                float(stat.eps),
                stat.mean_at,
                stat.var_at,
                dtype,
                shape,
                stat.mean if stat.mean.size else None,
                stat.var if stat.var.size else None,
                training,
            )  # fmt: skip
        )
    return sites, notes


_PASS_THROUGH = ("Squeeze", "Identity", "Neg", "Cast", "Reshape", "StopGradient")


def _batch_moment(index: GraphIndex, ev: ConstEvaluator, ref: str) -> Any:
    """The ``Mean`` over the batch axis that ``ref`` is (through squeezes, identities, a negation), or None."""
    node, _ = index.producer(ref)
    for _ in range(6):
        if node is None:
            return None
        if node.op == "Mean":
            from bnfold.doctor.statistics import reduces_batch_axis

            return node if reduces_batch_axis(index, ev, node) else None
        if node.op not in _PASS_THROUGH:
            return None
        node, _ = index.producer(index.data_inputs(node)[0])
    return None


def _batch_moments_site(index: GraphIndex, ev: ConstEvaluator, rsqrt: Any, batch_mean: str) -> Site | None:
    """A decomposed BN in training mode: ``tf.nn.batch_normalization`` on ``tf.nn.moments`` of its own input.

    ``inv = rsqrt(var + eps) [* gamma]``, ``y = x * inv + ([beta] - mean * inv)`` with
    ``mean``/``var`` computed from the batch (without beta, ``-mean * inv`` is
    ``Neg(mean) * inv``). Recalibration feeds constants where ``var`` enters the
    ``Add`` and ``mean`` enters its ``Mul`` (or its ``Neg``): the normalization then uses
    stored statistics, an inference-mode BN. The moments reduce over every axis
    but the channels: the last (NHWC, ``[0, 1, 2]``) or the second (NCHW,
    ``[0, 2, 3]``, with ``keepdims`` so they broadcast). With gamma or beta the
    channel count comes from them; without either (``scale=False, center=False``)
    it is read from the first measurement, and the statistics keep the moments' shape.
    """
    add, _ = index.producer(rsqrt.input[0])
    if add is None or add.op not in ("Add", "AddV2"):
        return None
    operands = index.data_inputs(add)
    constant = [ev.is_const(r) for r in operands]
    if constant.count(True) != 1:
        return None
    eps_value = ev.value(operands[constant.index(True)])
    var_slot = constant.index(False)
    if eps_value is None or eps_value.size != 1 or _batch_moment(index, ev, operands[var_slot]) is None:
        return None
    mean_node = index.node(batch_mean)
    axes = ev.value(index.data_inputs(mean_node)[1])
    if axes is None:
        return None
    reduced = sorted(int(a) for a in np.ravel(axes))
    rank = len(reduced) + 1
    if reduced == list(range(rank - 1)):
        channel_axis = -1  # NHWC: every axis but the last
    elif rank > 2 and reduced == [0, *range(2, rank)]:
        channel_axis = 1  # NCHW: every axis but the second
    else:
        return None
    keepdims = bool(attr(mean_node, "keep_dims").b) if "keep_dims" in mean_node.attr else False
    inv = rsqrt.name
    channels: int | None = None
    for reader in index.consumers(rsqrt.name):
        node = index.node(reader.node)
        other = [r for r in index.data_inputs(node) if parse_input(r)[0] != rsqrt.name]
        if node.op == "Mul" and len(other) == 1 and ev.is_const(other[0]):
            gamma = ev.value(other[0])
            channels, inv = (gamma.size if gamma is not None and gamma.size > 1 else None), node.name
    mean_at: tuple[str, int] | None = None
    x_ref = output = None
    for reader in index.consumers(inv):  # mean * inv feeds beta - (...) (or is -mean * inv); x * inv feeds the final Add
        node = index.node(reader.node)
        if node.op != "Mul" or reader.control:
            continue
        operand = index.data_inputs(node)[1 - reader.slot]
        if _batch_moment(index, ev, operand) is not None:
            negation, _ = index.producer(operand)
            mean_at = (negation.name, 0) if negation is not None and negation.op == "Neg" else (node.name, 1 - reader.slot)
            sub = [index.node(c.node) for c in index.consumers(node.name) if index.node(c.node).op == "Sub"]
            beta = ev.value(index.data_inputs(sub[0])[0]) if sub else None
            if channels is None and beta is not None and beta.size > 1:
                channels = beta.size
        else:
            x_ref = operand
            final = [index.node(c.node) for c in index.consumers(node.name) if index.node(c.node).op in ("Add", "AddV2")]
            output = final[0].name if final else None
    dtype = input_dtype(index, add.input[var_slot])
    if mean_at is None or x_ref is None or output is None or dtype is None:
        return None
    shape: tuple[int, ...] = ()  # unknown until measured (no gamma, no beta)
    if channels is not None:
        shape = _moment_shape(channels, channel_axis, rank, keepdims)
    label = output.split("/batchnorm/")[0] if "/batchnorm/" in output else output
    site = Site(output, label, "decomposed on batch moments", x_ref, output, channel_axis, float(np.ravel(eps_value)[0]), mean_at,
                (add.name, var_slot), dtype, shape, None, None, training=True)  # fmt: skip
    site.rank, site.keepdims = rank, keepdims
    return site


def _moment_shape(channels: int, channel_axis: int, rank: int, keepdims: bool) -> tuple[int, ...]:
    """The statistics' shape as ``tf.nn.moments`` gives them: ``(C,)``, or with ``keepdims`` C on the channel axis."""
    if not keepdims:
        return (channels,)
    return tuple(channels if i == channel_axis % rank else 1 for i in range(rank))


def _training_fused(index: GraphIndex, ev: ConstEvaluator, node: Any) -> BnStats | None:
    """A training-mode fused BN without moving statistics in the graph: recalibration gives it some (old ones: none)."""
    inputs = index.data_inputs(node)
    if len(inputs) < 5 or ev.value(inputs[1]) is None:
        return None
    fmt = attr(node, "data_format").s.decode() if "data_format" in node.attr else "NHWC"
    eps = attr(node, "epsilon").f if "epsilon" in node.attr else 1e-4
    axis = -1 if fmt.endswith("C") else 1 - len(fmt)
    empty = np.zeros(0)
    return BnStats(node.name, inputs[0], empty, empty, eps, axis, (node.name, 3), (node.name, 4))


def assign_levels(graph_def: graph_pb2.GraphDef, sites: list[Site]) -> None:
    """Depth of each BN: 1 + the deepest BN whose output reaches its input (0 when none does)."""
    index = GraphIndex(graph_def)
    by_output = {s.output_node: s for s in sites}
    height: dict[str, int] = {}
    for name in index.topological_order():
        node = index.node(name)
        h = max((height.get(parse_input(r)[0], 0) for r in index.data_inputs(node)), default=0)
        site = by_output.get(name)
        if site is not None:
            producer = parse_input(site.input_ref)[0]
            site.level = height.get(producer, 0)
            h = max(h, site.level + 1)
        height[name] = h
