"""Recognize every BN form as one canonical per-channel affine ``y = x * scale + shift``.

One small recognizer per form returns the same :class:`Affine` record, so the
fold is written once against it and never per BN form. A recognizer that finds a
BN it must not fold returns :class:`Unfoldable` with the reason users will read.

Elementwise steps with a constant side (``Mul``, ``Add``/``AddV2``/``BiasAdd``,
``Sub``, ``RealDiv``) are collected into a chain and composed, which covers the
decomposed ``tf.nn.batch_normalization``/Keras 3 form in any operand order and
absorbs a conv bias sitting between the linear op and a fused BN.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
from tensorflow.core.framework import node_def_pb2, types_pb2

from bnfold.core.foldmath import bn_affine
from bnfold.tf.canonical import FLOAT_TYPES, NORMALIZATION_EVIDENCE, ConstEvaluator, input_dtype, output_dtype
from bnfold.tf.graph import GraphIndex, attr, attr_text

FUSED_BN_OPS = {"FusedBatchNorm", "FusedBatchNormV2", "FusedBatchNormV3"}
GLOBAL_BN_OPS = {"BatchNormWithGlobalNormalization"}
STEP_OPS = {"Mul", "Add", "AddV2", "Sub", "BiasAdd", "RealDiv"}
# Ranks of outputs of ops whose rank is fixed, for locating a channel axis.
FIXED_RANK = {
    "Conv2D": 4,
    "DepthwiseConv2dNative": 4,
    "Conv2DBackpropInput": 4,
    "Conv3D": 5,
    "MatMul": 2,
    "FusedBatchNorm": 4,
    "FusedBatchNormV2": 4,
}


@dataclass
class Affine:
    """A BN site as ``y = x * scale + shift`` along ``channel_axis`` (negative, or None if uniform)."""

    name: str
    form: str
    scale: np.ndarray
    shift: np.ndarray
    channel_axis: int | None
    input_ref: str
    output_node: str
    dtype: int
    replaces: list[str] = field(default_factory=list)
    const_refs: list[str] = field(default_factory=list)  # the constants it was computed from (a --feed may override one)
    const_rank: int = 0  # highest rank of those constants: a broadcast may raise the input's rank
    out_dtype: int | None = None  # the dtype readers of output_node expect (differs from dtype after a widening Cast)

    @property
    def channels(self) -> int:
        return max(self.scale.size, self.shift.size)


@dataclass
class Unfoldable:
    """A BN site that must stay as it is, and why."""

    name: str
    form: str
    reason: str


@dataclass
class Step:
    """One elementwise op with a constant side, as per-channel ``x * scale + shift``."""

    node: str
    input_ref: str
    scale: np.ndarray
    shift: np.ndarray
    axis: int | None
    evidence: bool
    const_refs: tuple[str, ...] = ()
    const_rank: int = 0  # rank of the constant side (BiasAdd and fused BN never broadcast: 0)


def per_channel(value: np.ndarray, rank_hint: int | None = None) -> tuple[np.ndarray, int | None] | None:
    """A broadcast constant as (vector, negative channel axis); None if not per-channel."""
    if value.size == 1:
        return value.reshape(1), None
    wide = [i for i, d in enumerate(value.shape) if d != 1]
    if len(wide) != 1:
        return None
    return value.reshape(-1), wide[0] - value.ndim


DATA_FORMAT = re.compile(r"N(C[DHW]*|[DHW]*C)")


def data_format_axis(data_format: str, rank: int | None) -> int | None:
    """The channel axis, counted from the end, of a tensor in ``data_format``; None for a format TensorFlow has not."""
    if data_format and not DATA_FORMAT.fullmatch(data_format):
        return None
    if not data_format or data_format.endswith("C"):
        return -1
    if rank is None:
        rank = len(data_format) if len(data_format) > 3 else None
    return None if rank is None else 1 - rank


def rank_of(index: GraphIndex, ref: str) -> int | None:
    node, _ = index.producer(ref)
    if node is None:
        return None
    if node.op in FIXED_RANK:
        return FIXED_RANK[node.op]
    if node.op in STEP_OPS:
        return rank_of(index, node.input[0])
    if node.op == "FusedBatchNormV3" or node.op in GLOBAL_BN_OPS:
        fmt = attr_text(node, "data_format", "NHWC")
        return len(fmt) if node.op != "BatchNormWithGlobalNormalization" else 4
    shapes = attr(node, "_output_shapes").list.shape if "_output_shapes" in node.attr else []
    if shapes and not shapes[0].unknown_rank:
        return len(shapes[0].dim)
    return None


def as_step(index: GraphIndex, ev: ConstEvaluator, node: node_def_pb2.NodeDef) -> Step | None:
    """Read ``node`` as a per-channel affine step, if it is one.

    A widening float ``Cast`` (Keras 3 mixed precision casts an fp16 conv's output
    to float32 for its BN) is the identity step: it loses nothing, and the fold
    restores the dtype at the end.
    """
    if node.op == "Cast":
        src, dst = (attr(node, k).type for k in ("SrcT", "DstT"))
        if src in FLOAT_TYPES and dst in FLOAT_TYPES and _width(dst) >= _width(src) and len(index.data_inputs(node)) == 1:
            return Step(node.name, index.data_inputs(node)[0], np.ones(1), np.zeros(1), None, False)
        return None
    if node.op not in STEP_OPS or attr(node, "T").type not in FLOAT_TYPES:
        return None
    inputs = index.data_inputs(node)
    if len(inputs) != 2:
        return None
    a_const, b_const = ev.is_const(inputs[0]), ev.is_const(inputs[1])
    if a_const == b_const:
        return None
    x_ref, c_ref = (inputs[1], inputs[0]) if a_const else (inputs[0], inputs[1])
    c = ev.value(c_ref)
    if c is None:
        return None
    if node.op == "BiasAdd":
        if a_const:
            return None
        fmt = attr_text(node, "data_format", "NHWC")
        if c.ndim != 1:
            return None
        axis = data_format_axis(fmt, rank_of(index, x_ref))
        if axis is None:
            return None
        vec, shift = np.ones(1), c.reshape(-1)
        return Step(node.name, x_ref, vec, shift, axis if shift.size > 1 else None, False, (c_ref,))
    channel = per_channel(c)
    if channel is None:
        return None
    vec, axis = channel
    one, zero = np.ones(1), np.zeros(1)
    if node.op == "Mul":
        scale, shift = vec, zero
    elif node.op in ("Add", "AddV2"):
        scale, shift = one, vec
    elif node.op == "Sub":
        scale, shift = (-one, vec) if a_const else (one, -vec)
    elif node.op == "RealDiv" and not a_const:
        with np.errstate(all="ignore"):
            scale, shift = 1.0 / vec, zero
    else:
        return None
    return Step(node.name, x_ref, scale, shift, axis, ev.contains_op(c_ref, NORMALIZATION_EVIDENCE), (c_ref,), c.ndim)


def _width(dtype: int) -> int:
    """Mantissa bits of a float dtype: a Cast to at least as many loses nothing."""
    return {types_pb2.DT_BFLOAT16: 8, types_pb2.DT_HALF: 11, types_pb2.DT_FLOAT: 24, types_pb2.DT_DOUBLE: 53}.get(dtype, 0)


def _sole_reader(index: GraphIndex, name: str) -> str | None:
    """The only consumer of ``name``'s output 0, when it has exactly one edge of any kind."""
    readers = index.consumers(name)
    if len(readers) != 1 or index.control_consumers(name) or index.consumers(name, 0) != readers:
        return None
    return readers[0].node


def upstream_steps(index: GraphIndex, ev: ConstEvaluator, ref: str, reader: str) -> list[Step]:
    """Steps feeding ``ref`` that only ``reader`` (the chain) consumes, nearest last."""
    steps: list[Step] = []
    while True:
        node, out = index.producer(ref)
        if node is None or out != 0 or _sole_reader(index, node.name) != reader:
            return steps[::-1]
        step = as_step(index, ev, node)
        if step is None:
            return steps[::-1]
        steps.append(step)
        ref, reader = step.input_ref, node.name


def compose(steps: list[Step]) -> tuple[np.ndarray, np.ndarray, int | None, int] | None:
    """Compose steps first to last; returns scale, shift, axis and how many leading steps were dropped.

    A step whose axis or channel count disagrees with the ones after it ends the
    chain there: those earlier steps stay in the graph.
    """
    start = len(steps) - 1
    axis: int | None = None
    channels = 1
    while start >= 0:
        step = steps[start]
        size = max(step.scale.size, step.shift.size)
        if step.axis is not None and axis is not None and step.axis != axis:
            break
        if size > 1 and channels > 1 and size != channels:
            break
        axis = step.axis if step.axis is not None else axis
        channels = max(channels, size)
        start -= 1
    kept = steps[start + 1 :]
    if not kept:
        return None
    scale, shift = np.ones(1), np.zeros(1)
    for step in kept:
        scale, shift = scale * step.scale, shift * step.scale + step.shift
    return scale, shift, axis, start + 1


def _finish(index: GraphIndex, ev: ConstEvaluator, name: str, form: str, own: list[Step]) -> Affine | Unfoldable:
    """Absorb the elementwise steps feeding a site (a conv bias), compose, and check the numbers."""
    steps = upstream_steps(index, ev, own[0].input_ref, own[0].node) + own
    composed = compose(steps)
    if composed is None:
        return Unfoldable(name, form, "per-channel constants disagree on the channel axis")
    scale, shift, axis, dropped = composed
    kept = steps[dropped:]
    if not (np.all(np.isfinite(scale)) and np.all(np.isfinite(shift))):
        return Unfoldable(name, form, "non-finite scale or shift (NaN/inf statistics, or var + eps <= 0)")
    const_rank = max(s.const_rank for s in kept)
    in_rank = rank_of(index, kept[0].input_ref)
    if in_rank is not None and const_rank > in_rank:
        return Unfoldable(
            name,
            form,
            f"a rank-{const_rank} constant broadcasts the rank-{in_rank} {kept[0].input_ref} to rank {const_rank}: "
            "the shape changes, so it is not a per-channel affine",
        )
    end = own[-1].node
    dtype = input_dtype(index, kept[0].input_ref) or attr(index.node(end), "T").type
    if dtype not in FLOAT_TYPES:
        return Unfoldable(name, form, "input is not floating point")
    return Affine(
        name=name,
        form=form,
        scale=scale,
        shift=shift,
        channel_axis=axis,
        input_ref=kept[0].input_ref,
        output_node=end,
        dtype=dtype,
        replaces=[s.node for s in kept],
        const_refs=[r for s in kept for r in s.const_refs],
        const_rank=const_rank,
        out_dtype=output_dtype(index.node(end)),
    )


def _statistic_inputs(
    index: GraphIndex, ev: ConstEvaluator, node: node_def_pb2.NodeDef, names: str
) -> tuple[str, list[str], list[np.ndarray]] | Unfoldable:
    """A fused or global BN's data input, and the refs and constant values of its four parameters (``names``, in input order)."""
    if len(index.data_inputs(node)) < 5:
        return Unfoldable(node.name, node.op, "malformed node: fewer than 5 inputs")
    x_ref, *param_refs = index.data_inputs(node)
    params = [p for p in (ev.value(r) for r in param_refs[:4]) if p is not None]
    if len(params) != 4:
        note = ev.note(param_refs[:4])
        return Unfoldable(node.name, node.op, f"{names} are not constants" + (f" ({note})" if note else ""))
    return x_ref, param_refs[:4], params


def recognize_fused(index: GraphIndex, ev: ConstEvaluator, node: node_def_pb2.NodeDef) -> Affine | Unfoldable:
    form = node.op
    is_training = attr(node, "is_training").b if "is_training" in node.attr else True
    if is_training:
        return Unfoldable(node.name, form, "is_training=True: uses batch statistics at inference")
    extra_outputs = [c for c in index.consumers(node.name) if c.index != 0]
    if extra_outputs:
        return Unfoldable(node.name, form, f"output {extra_outputs[0].index} (batch statistics) is read by {extra_outputs[0].node}")
    read = _statistic_inputs(index, ev, node, "scale/offset/mean/variance")
    if isinstance(read, Unfoldable):
        return read
    x_ref, param_refs, (gamma, beta, mean, var) = read
    eps = attr(node, "epsilon").f if "epsilon" in node.attr else 1e-4
    return _from_statistics(index, ev, node, form, x_ref, (gamma, beta, mean, var), eps, param_refs)


def recognize_global(index: GraphIndex, ev: ConstEvaluator, node: node_def_pb2.NodeDef) -> Affine | Unfoldable:
    form = node.op
    read = _statistic_inputs(index, ev, node, "mean/variance/beta/gamma")
    if isinstance(read, Unfoldable):
        return read
    x_ref, param_refs, (mean, var, beta, gamma) = read
    if not attr(node, "scale_after_normalization").b:
        gamma = np.ones_like(var)
    eps = attr(node, "variance_epsilon").f
    return _from_statistics(index, ev, node, form, x_ref, (gamma, beta, mean, var), eps, param_refs)


def _from_statistics(
    index: GraphIndex,
    ev: ConstEvaluator,
    node: node_def_pb2.NodeDef,
    form: str,
    x_ref: str,
    stats: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    eps: float,
    refs: list[str],
) -> Affine | Unfoldable:
    """A fused BN's statistics as a step, through the fold math every format shares."""
    affine = bn_affine(*stats, eps)
    if isinstance(affine, str):
        return Unfoldable(node.name, form, affine)
    scale, shift = affine
    fmt = attr_text(node, "data_format", "NHWC")
    if not DATA_FORMAT.fullmatch(fmt):
        return Unfoldable(node.name, form, f"data_format {fmt!r} is not one TensorFlow has")
    axis = data_format_axis(fmt, rank_of(index, node.name))
    own = Step(node.name, x_ref, scale, shift, axis, True, tuple(refs))
    return _finish(index, ev, node.name, form, [own])


def is_chain_end(index: GraphIndex, ev: ConstEvaluator, step: Step) -> bool:
    reader = _sole_reader(index, step.node)
    if reader is None:
        return True
    if index.node(reader).op not in STEP_OPS:
        return True  # a Cast after the chain ends it (a chain never ends at a Cast)
    nxt = as_step(index, ev, index.node(reader))
    return nxt is None or nxt.input_ref.split(":")[0] != step.node


def recognize_decomposed(index: GraphIndex, ev: ConstEvaluator, node: node_def_pb2.NodeDef) -> Affine | Unfoldable | None:
    """The ``Rsqrt``/``Mul``/``Sub``/``Add`` chain of ``tf.nn.batch_normalization`` and Keras 3 BN."""
    last = as_step(index, ev, node)
    if last is None or not is_chain_end(index, ev, last):
        return None
    chain = upstream_steps(index, ev, last.input_ref, node.name) + [last]
    if not any(s.evidence for s in chain):
        return None
    return _finish(index, ev, node.name, "decomposed", chain)


@dataclass
class OtherNormalization:
    """A layer or instance norm: statistics computed per sample at run time. Not a BN, so not a BN site."""

    name: str
    reason: str


def _reduces_over_batch(index: GraphIndex, ev: ConstEvaluator, rsqrt: str) -> bool:
    """Whether a ``Mean`` feeding the run-time ``Rsqrt`` averages over axis 0: batch statistics (training-mode BN).

    Layer norm averages over features and instance norm over space, per sample.
    """
    for node in index.walk(rsqrt, limit=64):
        if node.op != "Mean" or len(node.input) < 2:
            continue
        axes = ev.value(node.input[1])
        if axes is not None and 0 in {int(a) for a in np.ravel(axes)}:
            return True
    return False


def recognize_runtime_statistics(
    index: GraphIndex, ev: ConstEvaluator, node: node_def_pb2.NodeDef
) -> Unfoldable | OtherNormalization | None:
    """An ``Rsqrt`` of statistics computed at run time: a normalization that cannot be folded."""
    if node.op != "Rsqrt" or ev.is_const(node.name):
        return None
    if not _reduces_over_batch(index, ev, node.name):
        return OtherNormalization(node.name, "per-sample statistics computed at run time (layer or instance norm); nothing to fold")
    return Unfoldable(
        node.name,
        "decomposed",
        "mean/variance are computed at run time over the batch (training-mode BN), not constants",
    )


def recognize(
    index: GraphIndex, ev: ConstEvaluator, node: node_def_pb2.NodeDef
) -> Affine | Unfoldable | OtherNormalization | None:
    """The BN site that ends at ``node``, if any."""
    if node.op in FUSED_BN_OPS:
        return recognize_fused(index, ev, node)
    if node.op in GLOBAL_BN_OPS:
        return recognize_global(index, ev, node)
    if node.op in STEP_OPS:
        return recognize_decomposed(index, ev, node)
    if node.op == "Rsqrt":
        return recognize_runtime_statistics(index, ev, node)
    return None
