"""The stored statistics of each TF BN form, read from a frozen graph.

A fused BN holds its moving mean and variance as inputs (or, in training mode,
as the variables its update ops write); ``tf.nn.batch_normalization`` and Keras 3
spread them over ``Sub``/``Mul``/``Rsqrt``. Each reader returns a :class:`BnStats`
with where the statistics enter the graph; :class:`LayerStats` adds gamma, beta
and the output recovered from the fold's affine record, which the drift in
training mode needs. The checks of :mod:`bnfold.doctor.graph` and
:mod:`bnfold.doctor.dynamic`, and :mod:`bnfold.recalibration`, read BNs here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bnfold.core.findings import BnStats
from bnfold.tf.canonical import ConstEvaluator
from bnfold.tf.graph import GraphIndex, attr, attr_text, parse_input
from bnfold.tf.recognize import DATA_FORMAT, Affine
from bnfold.tf.switches import find_moving_stats


@dataclass
class LayerStats(BnStats):
    """A BN's stored statistics, plus what training mode needs: ``y = (x - batch mean) / sqrt(batch var + eps) * gamma + beta``."""

    output_ref: str | None = None
    gamma: np.ndarray | None = None
    beta: np.ndarray | None = None

    @property
    def label(self) -> str:
        """The layer's name: the node name without the op names BN forms add under the layer's scope."""
        for marker in ("/batchnorm/", "/FusedBatchNorm", "/moments/"):
            if marker in self.name:
                return self.name.split(marker)[0]
        return self.name


def _with_affine(stat: BnStats | None, site: Affine | None) -> LayerStats | None:
    """Gamma, beta and the output tensor, recovered from the fold's affine record ``y = x * scale + shift``."""
    if stat is None:
        return None
    layer = LayerStats(stat.name, stat.input_ref, stat.mean, stat.var, stat.eps, stat.channel_axis, stat.mean_at, stat.var_at)
    channels = stat.var.size
    if site is None or site.scale.size not in (1, channels) or site.shift.size not in (1, channels):
        return layer
    scale = np.asarray(site.scale, np.float64).reshape(-1)
    layer.gamma = scale * np.sqrt(stat.var.astype(np.float64) + stat.eps)
    layer.beta = np.asarray(site.shift, np.float64).reshape(-1) + stat.mean.astype(np.float64) * scale
    layer.output_ref = f"{site.output_node}:0"
    return layer

# -- statistics of each BN form ----------------------------------------------------
def fused_stats(index: GraphIndex, ev: ConstEvaluator, node: object) -> BnStats | None:
    inputs = index.data_inputs(node)  # type: ignore[arg-type]
    training = attr(node, "is_training").b if "is_training" in node.attr else True  # type: ignore[attr-defined]
    if training:
        found = find_moving_stats(index, ev, node)  # type: ignore[arg-type]
        if found is None:
            return None
        mean, var = ev.value(found[0]), ev.value(found[1])
    else:
        mean, var = ev.value(inputs[3]), ev.value(inputs[4])
    if mean is None or var is None or mean.size == 0:
        return None
    fmt = attr_text(node, "data_format", "NHWC")
    if not DATA_FORMAT.fullmatch(fmt):
        return None  # not a format TensorFlow has (bytes of a hostile or corrupt file)
    eps = attr(node, "epsilon").f if "epsilon" in node.attr else 1e-4  # type: ignore[attr-defined]
    axis = -1 if fmt.endswith("C") else 1 - len(fmt)
    name = node.name  # type: ignore[attr-defined]
    return BnStats(name, inputs[0], mean.reshape(-1), var.reshape(-1), eps, axis, (name, 3), (name, 4))


def global_stats(index: GraphIndex, ev: ConstEvaluator, node: object) -> BnStats | None:
    inputs = index.data_inputs(node)  # type: ignore[arg-type]
    mean, var = ev.value(inputs[1]), ev.value(inputs[2])
    if mean is None or var is None:
        return None
    eps = attr(node, "variance_epsilon").f  # type: ignore[attr-defined]
    name = node.name  # type: ignore[attr-defined]
    return BnStats(name, inputs[0], mean.reshape(-1), var.reshape(-1), eps, -1, (name, 1), (name, 2))


def _find_op(index: GraphIndex, ref: str, op: str) -> str | None:
    """The first ``op`` node in the constant subgraph behind ``ref`` (bounded walk)."""
    return next((node.name for node in index.walk(parse_input(ref)[0], limit=64) if node.op == op), None)


def decomposed_stats(index: GraphIndex, ev: ConstEvaluator, site: Affine) -> BnStats | None:
    """Mean and variance of a decomposed BN (``tf.nn.batch_normalization``, Keras 3).

    The variance is the non-scalar operand of the ``Add`` under ``Rsqrt``; the mean
    is either subtracted from ``x`` directly or multiplied by the ``Rsqrt`` factor
    (``offset - mean * inv``).
    """
    var = eps = mean = None
    mean_at: tuple[str, int] | None = None
    var_at: tuple[str, int] | None = None
    x_ref: str | None = None
    for pos, name in enumerate(site.replaces):
        node = index.node(name)
        inputs = index.data_inputs(node)
        for ref in inputs:
            if not ev.is_const(ref):
                continue
            rsqrt = _find_op(index, ref, "Rsqrt")
            if rsqrt is None:
                continue
            if x_ref is None:
                previous = index.node(site.replaces[pos - 1]) if pos else None
                x_ref = next(r for r in inputs if not ev.is_const(r))
                prev_in = index.data_inputs(previous) if previous is not None else []
                if previous is not None and previous.op == "Sub" and ev.is_const(prev_in[1]) and not ev.is_const(prev_in[0]):
                    mean = ev.value(index.data_inputs(previous)[1])
                    mean_at = (previous.name, 1)
                    x_ref = index.data_inputs(previous)[0]
            if var is None:
                add = index.producer(index.node(rsqrt).input[0])[0]
                if add is not None and add.op in ("Add", "AddV2"):
                    a, b = (ev.value(r) for r in index.data_inputs(add))
                    if a is not None and b is not None:
                        if a.size == b.size:
                            first = float(np.max(a)) >= float(np.max(b))
                        else:
                            first = a.size > b.size
                        var, eps = (a, b) if first else (b, a)
                        var_at = (add.name, 0 if first else 1)
            if mean is None:
                beside = _mean_beside_rsqrt(index, ev, ref)
                if beside is not None:
                    mean, mean_at = beside
    if var is None or mean is None or x_ref is None:
        return None
    if eps is None:
        return None
    mean_value, var_value = np.asarray(mean).reshape(-1), np.asarray(var).reshape(-1)
    return BnStats(site.name, x_ref, mean_value, var_value, float(np.ravel(eps)[0]), site.channel_axis, mean_at, var_at)


def _mean_beside_rsqrt(index: GraphIndex, ev: ConstEvaluator, ref: str) -> tuple[np.ndarray | None, tuple[str, int]] | None:
    """In ``offset - mean * inv``: the ``Mul`` operand that holds no ``Rsqrt``, and where it enters."""
    for node in index.walk(parse_input(ref)[0], limit=64):
        inputs = index.data_inputs(node)
        if node.op == "Mul" and len(inputs) == 2:
            with_rsqrt = [_find_op(index, r, "Rsqrt") is not None for r in inputs]
            if with_rsqrt.count(True) == 1:
                other = inputs[with_rsqrt.index(False)]
                # the gamma multiply (inv * gamma) sits under another Mul; the mean's Mul feeds a Sub/Neg
                readers = [index.node(c.node).op for c in index.consumers(node.name)]
                if any(op in ("Sub", "Neg") for op in readers):
                    return ev.value(other), (node.name, with_rsqrt.index(False))
    return None


# -- training mode of decomposed normalizations ------------------------------------
def reduces_batch_axis(index: GraphIndex, ev: ConstEvaluator, node: object) -> bool:
    axes = ev.value(index.data_inputs(node)[1])  # type: ignore[arg-type]
    return axes is not None and 0 in {int(a) for a in np.ravel(axes)}


def batch_mean_behind(index: GraphIndex, ev: ConstEvaluator, rsqrt: str) -> str | None:
    """A ``Mean`` over the batch axis among the (run-time) inputs of a normalization's ``Rsqrt``."""
    linear_or_input = ("Placeholder", "Conv2D", "MatMul", "Conv3D", "DepthwiseConv2dNative")
    for node in index.walk(rsqrt, limit=40, stop=lambda n: n.op in linear_or_input):
        if node.op == "Mean" and reduces_batch_axis(index, ev, node):
            return node.name
    return None
