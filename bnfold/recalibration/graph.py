"""``bnfold recalibrate``: recompute the BN moving statistics of a model from calibration data.

The users bnfold exists for trained a model whose stored statistics are wrong
(update ops never run, ``decay=1``, a validation copy never trained, a BN frozen
in training mode, drifted data). Retraining takes days; the statistics take
seconds. Each BN's new moving mean and variance are the per-channel moments of
its input over the calibration samples, measured in inference mode with every
BN upstream already recalibrated: exactly what the deployed model will see.

How (README "Fix it: bnfold recalibrate"):

- The BNs are found by the doctor's readers of each form (fused in either mode,
  ``BatchNormWithGlobalNormalization``, decomposed), on the graph with its
  training switches resolved false, as ``doctor`` and ``--set`` do. A training-mode
  fused BN becomes an inference-mode one. Nothing here recognizes BN a second way.
- The graph is loaded once into the isolated worker with every BN's mean and
  variance turned into placeholders; the current statistics are fed with each
  batch. BNs are grouped by depth (how many BNs lie on the longest path above
  them): one pass over the data per depth level measures that level's BNs, whose
  upstream BNs are all final by then. Each pass also keeps the tensors at the cut
  between its level and the next (:func:`_boundaries`), and the next pass feeds
  them back, so TensorFlow runs only the layers between two levels. They stay in
  the worker (:meth:`bnfold.core.worker.IsolatedGraph.run_kept`): only their shapes
  cross the pipe.
- Each BN's per-channel batch mean and sum of squared deviations are computed in
  the graph in float64 (:func:`_add_moment_ops`) and merged batch by batch (Chan
  et al.), so memory does not grow with the data. The stored variance is the biased
  (population) one: inference divides by the spread of the population it
  normalizes, and training-mode BN normalizes with the biased batch variance too,
  so this is the variance that makes inference agree with training mode.
- A BN whose input gives fewer than the doctor's minimum values per channel
  keeps its statistics, and the report says why.
- A last pass over the data on the recalibrated model measures every BN's input
  again against its new statistics: the "after" drift score, which is ~0 only
  when the upstream-first order held.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
from tensorflow.core.framework import attr_value_pb2, graph_pb2, tensor_shape_pb2, types_pb2

from bnfold.core import protocol, serve
from bnfold.core.errors import BnfoldError, UsageError, VerificationError, first_line
from bnfold.core.findings import BnStats
from bnfold.core.formats import is_keras_path
from bnfold.core.protocol import decode_arrays, encode_arrays, first_line_of, send
from bnfold.core.recalibration import (  # noqa: F401  (re-exported: the API's records, report and data)
    DEFAULT_MEMORY_BUDGET,
    Data,
    Feeder,
    LayerRecord,
    Moments,
    RecalibrationResult,
    _summary,
    drift_score,
    print_report,
    write_json,
)
from bnfold.tf.canonical import ConstEvaluator, input_dtype
from bnfold.tf.graph import GraphIndex, attr, make_node, parse_input
from bnfold.tf.recognize import FUSED_BN_OPS, GLOBAL_BN_OPS, Affine, recognize

# Bytes of activations kept (in the worker) from one pass to the next, for all samples (README: "Fix it: bnfold
# recalibrate"): beyond it a pass recomputes the graph up to its level instead.
DEFAULT_CACHE_BUDGET = 2 * 2**30


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
    from bnfold.doctor import graph as doctor

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
            stat = doctor._fused_stats(index, ev, node)  # noqa: SLF001 - the doctor's reader of this form
            if stat is None and training:
                stat = _training_fused(index, ev, node)
        elif node.op in GLOBAL_BN_OPS:
            stat = doctor._global_stats(index, ev, node)  # noqa: SLF001
        elif node.op == "Rsqrt" and not ev.is_const(node.name):
            mean = doctor._batch_mean_behind(index, ev, node.name)  # noqa: SLF001
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
                stat = doctor._decomposed_stats(index, ev, site)  # noqa: SLF001
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
            from bnfold.doctor.graph import _reduces_batch_axis

            return node if _reduces_batch_axis(index, ev, node) else None
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


# -- the graphs ------------------------------------------------------------------------
def _shape_attr(shape: tuple[int, ...]) -> attr_value_pb2.AttrValue:
    proto = tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in shape])
    return attr_value_pb2.AttrValue(shape=proto)


def _rewire(
    graph_def: graph_pb2.GraphDef, sites: list[Site], values: dict[str, tuple[np.ndarray, np.ndarray]] | None
) -> graph_pb2.GraphDef:
    """Each site's mean/variance from a placeholder (``values`` None) or from a constant of the new value.

    A training-mode fused BN is switched to inference mode. With values, what fed the
    old statistics (constants, or the batch moments) is removed once nothing reads it.
    """
    from bnfold.tf.switches import _prune

    index = GraphIndex(graph_def)
    keep = {n.name for n in graph_def.node if n.op in ("Placeholder", "PlaceholderWithDefault")}
    for site in sites:
        for which, (node_name, slot) in (("mean", site.mean_at), ("variance", site.var_at)):
            base = f"{site.name}/bnfold_recalibrated_{which}"
            if values is None:
                name = index.unique_name(base)
                attrs = {"dtype": attr_value_pb2.AttrValue(type=site.dtype), "shape": _shape_attr(site.shape)}
                if not site.shape and site.channel_axis is not None:  # channels unknown until measured: any shape
                    attrs["shape"] = attr_value_pb2.AttrValue(shape=tensor_shape_pb2.TensorShapeProto(unknown_rank=True))
                index.add(make_node(name, "Placeholder", [], attrs))
            elif site.name in values:
                value = values[site.name][0 if which == "mean" else 1]
                name = index.add_const(base, np.asarray(value).reshape(site.shape), site.dtype)
            else:
                continue
            old_ref = index.node(node_name).input[slot]
            index.set_input(node_name, slot, name)
            if values is not None:  # the batch moments that fed it are read by nothing now
                _prune(index, [parse_input(old_ref)[0]], keep)
        if site.training and site.name in index and index.node(site.name).op in FUSED_BN_OPS and (values is None or site.name in values):
            node = index.node(site.name)
            new = type(node)()
            new.CopyFrom(node)
            new.attr["is_training"].b = False
            if "exponential_avg_factor" in new.attr:
                new.attr["exponential_avg_factor"].f = 1.0
            index.replace(new)
    return index.to_graph_def()


def _add_moment_ops(graph_def: graph_pb2.GraphDef, sites: list[Site]) -> tuple[graph_pb2.GraphDef, dict[str, list[str]]]:
    """Per-channel batch moments computed in the graph, in float64: the worker sends back 2C numbers, not the activations.

    For channels last (and per-tensor statistics): ``x`` is cast to float64 and
    reshaped to ``[-1, C]``; its column means and sums of squared deviations and
    the reshaped shape (the count) are fetched. Other layouts fetch the input.
    """
    from bnfold.tf.graph import tensor_proto

    index = GraphIndex(graph_def)
    refs: dict[str, list[str]] = {}

    def add(name: str, op: str, inputs: list[str], **attrs: attr_value_pb2.AttrValue) -> str:
        unique = index.unique_name(name)
        index.add(make_node(unique, op, inputs, attrs))
        return unique

    def const(name: str, value: np.ndarray, dtype: int) -> str:
        return add(
            name, "Const", [], dtype=attr_value_pb2.AttrValue(type=dtype), value=attr_value_pb2.AttrValue(tensor=tensor_proto(value, dtype))
        )

    for site in sites:
        if site.channel_axis not in (-1, None) or (site.channel_axis is not None and not site.shape):
            continue  # other layouts, and channels not known yet: the input is fetched
        base = f"{site.name}/bnfold_moments"
        source_dtype = input_dtype(index, site.input_ref)
        if source_dtype is None:
            continue
        double = attr_value_pb2.AttrValue(type=types_pb2.DT_DOUBLE)
        cast = add(f"{base}/cast", "Cast", [site.input_ref], SrcT=attr_value_pb2.AttrValue(type=source_dtype), DstT=double)
        channels = int(np.prod(site.shape)) if site.channel_axis is not None else 1
        shape = const(f"{base}/shape", np.array([-1, channels], np.int32), types_pb2.DT_INT32)
        int32 = attr_value_pb2.AttrValue(type=types_pb2.DT_INT32)
        flat = add(f"{base}/flat", "Reshape", [cast, shape], T=double, Tshape=int32)
        axis = const(f"{base}/axis", np.array([0], np.int32), types_pb2.DT_INT32)
        keep = attr_value_pb2.AttrValue(b=True)
        mean = add(f"{base}/mean", "Mean", [flat, axis], T=double, Tidx=int32, keep_dims=keep)
        centered = add(f"{base}/centered", "Sub", [flat, mean], T=double)
        square = add(f"{base}/square", "Square", [centered], T=double)
        m2 = add(f"{base}/m2", "Sum", [square, axis], T=double, Tidx=int32, keep_dims=attr_value_pb2.AttrValue(b=False))
        count = add(f"{base}/count", "Shape", [flat], T=double, out_type=int32)
        refs[site.name] = [f"{mean}:0", f"{m2}:0", f"{count}:0"]
    return index.to_graph_def(), refs


def _placeholder_names(calibration: graph_pb2.GraphDef, sites: list[Site]) -> dict[str, tuple[str, str]]:
    """The placeholders :func:`_rewire` made, by site: what now feeds each site's mean and variance slots.

    Read back from the graph, not rebuilt from the name pattern: a model recalibrated
    before holds constants of those names, and the new placeholders got others.
    """
    nodes = {n.name: n for n in calibration.node}
    return {
        s.name: (parse_input(nodes[s.mean_at[0]].input[s.mean_at[1]])[0], parse_input(nodes[s.var_at[0]].input[s.var_at[1]])[0])
        for s in sites
    }


# -- the passes ------------------------------------------------------------------------
@dataclass
class Kept:
    """Tensors a pass left in the worker for the next one: tensor -> the key the worker keeps all its samples under."""

    keys: dict[str, str]
    generation: int  # the runner's, when kept: a graph moved to another worker since has lost them


@dataclass
class Pass:
    """What one pass over the data gave: moments per site, the samples and batch sizes, and the tensors kept for the next pass."""

    moments: dict[str, Moments]
    samples: int
    sizes: list[int]
    kept: Kept | None


def _measure(
    runner: Any,
    feeder: Feeder,
    fetch_sites: list[Site],
    stat_feeds: dict[str, np.ndarray],
    cached: Kept | None = None,
    keep: list[str] | None = None,
    cache_budget: int = 0,
    in_graph: dict[str, list[str]] | None = None,
    tag: str = "",
) -> Pass:
    """One pass over the data: moments of each fetched site's input.

    ``cached`` (tensors whose values for all samples, samples on axis 0, the worker
    keeps) is fed with each batch, so TensorFlow does not compute what lies behind
    those tensors again. ``keep`` names tensors to keep in the worker (under keys
    starting with ``tag``) for the next pass: they never cross the pipe. They are
    given up (``Pass.kept`` None, the worker's copy dropped) when they would take
    more than ``cache_budget`` bytes, have no batch axis first, or the batches may
    not come in the same order next time.
    """
    moments = {s.name: Moments() for s in fetch_sites}
    in_graph = in_graph or {}
    site_refs = [ref for s in fetch_sites for ref in in_graph.get(s.name, [s.input_ref])]
    keep = [r for r in keep or [] if r not in site_refs] if feeder.stable else []
    stash = {ref: f"{tag}{ref}" for ref in keep}
    if cached is not None and cached.generation != runner.generation:
        cached = None  # lost with the worker: the graph computes those tensors from the inputs
    samples, sizes = 0, []
    for batch in feeder.batches():
        n = len(next(iter(batch.values()))) if batch else 0
        feeds = {**batch, **stat_feeds}
        stored = [(ref, key, samples, samples + n) for ref, key in cached.keys.items()] if cached else []
        values, shapes = _run_kept(runner, site_refs, feeds, stored, stash)
        position = 0
        for site in fetch_sites:
            if site.name in in_graph:
                mean, m2, count = values[position : position + 3]
                moments[site.name].merge(int(count[0]), mean, m2)
                position += 3
            else:
                moments[site.name].add(values[position], site.channel_axis)
                position += 1
        if stash:
            total = feeder.total_samples()
            if (
                shapes is None
                or len(shapes) != len(stash)
                or any(not s["shape"] or s["shape"][0] != n for s in shapes)
                or (n and sum(int(s["nbytes"]) for s in shapes) // n * total > cache_budget)
            ):
                runner.drop(list(stash.values()))
                stash = {}
        samples += n
        sizes.append(n)
    kept = Kept(stash, runner.generation) if stash and samples else None
    return Pass(moments, samples, sizes, kept)


def _run_kept(
    runner: Any, fetches: list[str], feeds: dict[str, np.ndarray], stored: list[tuple[str, str, int, int]], stash: dict[str, str]
) -> tuple[list[np.ndarray], list[dict[str, Any]] | None]:
    try:
        return runner.run_kept(fetches, feeds, stored, stash)  # type: ignore[no-any-return]
    except runner.errors as exc:
        raise VerificationError(f"--data: could not run the graph on the data: {_why(exc)}") from None


def _boundaries(calibration: graph_pb2.GraphDef, sites: list[Site], levels: list[int]) -> dict[int, list[str]]:
    """Per level: the tensors to feed from the pass before, so that pass runs only what the last level changed.

    Level k's inputs need the nodes behind them; of those, the ones the statistics
    of level k-1 do not reach were already right in the pass for level k-1. The
    tensors where such a node feeds one that level k-1 reaches are fetched in that
    pass and fed in this one: TensorFlow then runs only the part of the graph
    between the two levels (plus side branches that start there).
    """
    index = GraphIndex(calibration)
    ev = ConstEvaluator(index)
    placeholders = _placeholder_names(calibration, sites)

    def ancestors(names: list[str]) -> set[str]:
        seen, stack = set(names), list(names)
        while stack:
            for ref in index.data_inputs(index.node(stack.pop())):
                name = parse_input(ref)[0]
                if name not in seen and name in index:
                    seen.add(name)
                    stack.append(name)
        return seen

    def descendants(names: list[str]) -> set[str]:
        seen, stack = set(names), list(names)
        while stack:
            for consumer in index.consumers(stack.pop()):
                if not consumer.control and consumer.node not in seen:
                    seen.add(consumer.node)
                    stack.append(consumer.node)
        return seen

    result: dict[int, list[str]] = {}
    for previous, level in zip(levels, levels[1:], strict=False):
        needed = ancestors([parse_input(s.input_ref)[0] for s in sites if s.level == level])
        reached = descendants([p for s in sites if s.level == previous for p in placeholders[s.name]])
        refs: set[str] = set()
        for name in needed & reached:
            for ref in index.data_inputs(index.node(name)):
                producer, port, _ = parse_input(ref)
                if producer in needed and producer not in reached and index.node(producer).op != "Placeholder" and not ev.is_const(ref):
                    refs.add(f"{producer}:{port}")
        result[level] = sorted(refs)
    return result


def recalibrate_graph(
    graph_def: graph_pb2.GraphDef,
    data: Data,
    *,
    set_flags: dict[str, bool] | None = None,
    outputs: list[str] | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    cache_budget: int = DEFAULT_CACHE_BUDGET,
    source: str = "<GraphDef>",
    adopt: Callable[[list[Site]], None] | None = None,
) -> RecalibrationResult:
    """Recompute every BN's moving statistics of a frozen graph from ``data`` (see the module docstring)."""
    from bnfold.doctor.graph import MIN_DRIFT_VALUES
    from bnfold.tf.runsafety import check_runnable, is_trusted
    from bnfold.tf.switches import resolve_switches, without_cond_plumbing
    from bnfold.tf.verify import find_inputs, find_outputs, open_graph_runner

    out_names = outputs or without_cond_plumbing(graph_def, find_outputs(graph_def))
    in_names = [s.name for s in find_inputs(graph_def)]
    protected = {parse_input(n)[0] for n in [*out_names, *in_names]}
    inference, resolutions = resolve_switches(graph_def, set_flags, protected, assume_inference=True)
    in_names = [s.name for s in find_inputs(inference)]
    sites, notes = find_sites(inference)
    notes += [f"training switch {r.flag} resolved to {r.value} ({r.how})" for r in resolutions]
    if not sites:
        raise UsageError(f"{source}: no BN with statistics to recalibrate" + (f" ({notes[0]})" if notes else ""))
    if adopt is not None:  # the caller's own reading of the sites (Keras: which layer each one is)
        adopt(sites)
    assign_levels(inference, sites)
    order = {name: i for i, name in enumerate(GraphIndex(inference).topological_order())}
    sites.sort(key=lambda s: (s.level, order.get(s.output_node, 0)))
    calibration = _rewire(inference, sites, None)
    placeholders = _placeholder_names(calibration, sites)
    if not is_trusted():
        hint = "recalibration runs the model on the data; --trust-model runs it anyway"
        check_runnable(calibration, [s.input_ref for s in sites], "recalibrate", hint=hint)
    specs = [(s.name, s.dtype) for s in find_inputs(inference) if s.dtype != np.bool_]  # training flags are not data
    feeder = Feeder(specs, data, memory_budget, key=lambda name: parse_input(name)[0])
    current: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for site in sites:  # a training-mode BN without moving statistics starts from 0/1 until its level is measured
        mean = site.old_mean if site.old_mean is not None else np.zeros(site.shape)
        var = site.old_var if site.old_var is not None else np.ones(site.shape)
        current[site.name] = (_shaped(mean, site.shape), _shaped(var, site.shape))

    def stat_feeds() -> dict[str, np.ndarray]:
        feeds = {}
        dtype_of = {s.name: s for s in sites}
        for name, (mean, var) in current.items():
            site = dtype_of[name]
            np_dtype = _np_dtype(site.dtype)
            m_name, v_name = placeholders[name]
            feeds[f"{m_name}:0"] = mean.astype(np_dtype)
            feeds[f"{v_name}:0"] = var.astype(np_dtype)
        return feeds

    levels = sorted({s.level for s in sites})
    feed_next = _boundaries(calibration, sites, levels)
    calibration, in_graph = _add_moment_ops(calibration, sites)
    runner = open_graph_runner(calibration, "the graph", hint="")
    measured: dict[str, Moments] = {}
    kept: dict[str, str] = {}
    passes, samples, sizes = 0, 0, list[int]()
    cached: Kept | None = None
    try:
        feeder.size_batches(lambda one: _run(runner, [s.input_ref for s in sites], {**one, **stat_feeds()}))
        for position, level in enumerate(levels):
            group = [s for s in sites if s.level == level]
            keep = feed_next.get(levels[position + 1]) if position + 1 < len(levels) else None
            done = _measure(runner, feeder, group, stat_feeds(), cached, keep, cache_budget, in_graph, tag=f"level {level}/")
            if cached is not None and cached.generation == runner.generation:
                runner.drop(list(cached.keys.values()))  # fed to this pass; the next one feeds what this one kept
            cached, samples, sizes = done.kept, done.samples, done.sizes
            passes += 1
            for site in group:
                m = done.moments[site.name]
                measured[site.name] = m
                if m.mean is None or m.count < MIN_DRIFT_VALUES:
                    kept[site.name] = (
                        f"the data gives {m.count} value(s) per channel, fewer than the doctor's minimum of {MIN_DRIFT_VALUES}"
                    )
                    continue
                if not site.shape and site.channel_axis is not None:  # the channels, now known
                    site.shape = _moment_shape(m.mean.size, site.channel_axis, site.rank, site.keepdims)
                if m.mean.size not in (1, int(np.prod(site.shape))):
                    kept[site.name] = f"its input has {m.mean.size} channel(s), its statistics {int(np.prod(site.shape))}"
                    continue
                if not (np.all(np.isfinite(m.mean)) and np.all(np.isfinite(m.var))):
                    kept[site.name] = "its input is not finite on the data"
                    continue
                current[site.name] = (_shaped(m.mean, site.shape), _shaped(m.var, site.shape))
        after = _measure(runner, feeder, sites, stat_feeds(), in_graph=in_graph).moments
        passes += 1
    finally:
        runner.close()
    changed = {s.name: current[s.name] for s in sites if s.name not in kept}
    result_graph = _rewire(inference, [s for s in sites if s.name in changed], changed)
    layers = []
    for site in sorted(sites, key=lambda s: order.get(s.output_node, 0)):
        m, a = measured[site.name], after[site.name]
        new = changed.get(site.name)
        data_mean = m.mean if m.mean is not None else np.zeros(0)
        before = drift_score(site.old_mean, site.old_var, data_mean, m.var, site.eps) if m.mean is not None else None
        after_score = None
        if a.mean is not None:
            stored = new if new is not None else (site.old_mean, site.old_var)
            after_score = drift_score(
                None if stored[0] is None else np.ravel(stored[0]),
                None if stored[1] is None else np.ravel(stored[1]),
                a.mean,
                a.var,
                site.eps,
            )
        layers.append(
            LayerRecord(
                site.label,
                site.name,
                site.form + (" (training mode -> inference)" if site.training and new is not None else ""),
                site.level,
                "recalibrated" if new is not None else "kept",
                m.count,
                _summary(site.old_mean),
                _summary(site.old_var),
                _summary(new[0]) if new is not None else None,
                _summary(new[1]) if new is not None else None,
                before,
                after_score,
                kept.get(site.name, ""),
            )  # fmt: skip
        )
    flags = {r.flag: np.array(r.value) for r in resolutions if r.flag in set(in_names)}
    return RecalibrationResult(
        result_graph, layers, in_names, out_names, source, samples, passes, sizes, notes=notes, flag_feeds=flags, values=changed
    )


def _run(runner: Any, fetches: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    try:
        return list(runner.run(fetches, feeds))
    except runner.errors as exc:
        raise VerificationError(f"--data: could not run the graph on the data: {_why(exc)}") from None


def _why(exc: BaseException) -> str:
    """The first line of TensorFlow's error, and the line after when the first only says "Graph execution error:"."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):
        return f"{lines[0]} {lines[1]}"
    return first_line(exc)


def _np_dtype(dtype: int) -> np.dtype:
    from bnfold.tf.verify import numpy_dtype

    return numpy_dtype(dtype)


# -- the API ---------------------------------------------------------------------------
def recalibrate(
    source: Any,
    data: Data,
    *,
    outputs: list[str] | None = None,
    set_flags: dict[str, bool] | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    trust_model: bool = False,
) -> RecalibrationResult:
    """Recompute the moving statistics of every BN in ``source`` from ``data``; the source is never modified.

    ``source`` is anything ``bnfold.fold`` takes (a GraphDef, a ``.pb``/``.pbtxt``,
    a SavedModel, a ``.keras``/``.h5`` file or a Keras model), an ONNX model or
    ``.onnx`` path (``result.onnx_model``), or a TF1 checkpoint
    (``model.ckpt-N`` with its ``.meta``, or a ``.meta`` and ``checkpoint``) whose
    inference path ``outputs`` names. ``data`` is one array per input (a list in
    input order, or a dict by input name), an iterable of batches (arrays, tuples
    or dicts; ``(x, y)`` pairs use ``x``), or a ``tf.data.Dataset``; samples go along
    axis 0. Arrays are cut into batches whose inputs and fetched BN inputs fit
    ``memory_budget`` bytes. The model runs in bnfold's isolated worker under the
    same rules as ``doctor --data`` (README "Security").
    """
    from bnfold.sources import load
    from bnfold.tf.runsafety import trusting

    if type(source).__name__ == "ModelProto" or (isinstance(source, (str, os.PathLike)) and str(source).lower().endswith(".onnx")):
        from bnfold.recalibration.onnx import recalibrate_onnx

        if outputs or set_flags or checkpoint:
            raise UsageError("--outputs/--set/--checkpoint apply to TensorFlow models, not to ONNX files")
        model, onnx_result = recalibrate_onnx(source, data, memory_budget=memory_budget, trust_model=trust_model)
        onnx_result.onnx_model = model
        return onnx_result
    if isinstance(source, (str, os.PathLike)) and (checkpoint is not None or _is_checkpoint(Path(source))):
        from bnfold.doctor import training as tg

        if not outputs:
            raise UsageError(f"{source}: a TF1 checkpoint needs --outputs naming its inference outputs")
        artifacts = tg.open_artifacts(Path(source), Path(checkpoint) if checkpoint is not None else None)
        graph_def, name, signature = tg.freeze_inference_path(artifacts, outputs), artifacts.source, None
    else:
        loaded = load(source, trust_model=trust_model)
        graph_def, name, signature = loaded.graph_def, loaded.source, loaded.signature
        if outputs is None and signature is not None:
            outputs = [parse_input(t)[0] for t in signature.outputs.values()]
    with trusting(trust_model):
        result = recalibrate_graph(graph_def, data, set_flags=set_flags, outputs=outputs, memory_budget=memory_budget, source=name)
    result.signature = signature
    return result


def _is_checkpoint(path: Path) -> bool:
    from bnfold.doctor.training import is_checkpoint

    return is_checkpoint(path)


def write(result: RecalibrationResult, dst: str | os.PathLike[str], opset: int | None = None) -> None:
    """Write the recalibrated graph in any format bnfold writes (.pb, .pbtxt, .onnx, SavedModel directory); atomically."""
    from bnfold.core.formats import check_output_format, is_onnx_path
    from bnfold.core.result import FoldResult
    from bnfold.tf.graph import op_counts
    from bnfold.tf.io import write_result

    check_output_format(dst)
    if is_onnx_path(dst):
        from bnfold.onnx import export as onnx_export
        from bnfold.onnx.io import write_onnx

        model = onnx_export.convert(result.graph_def, result.inputs, result.outputs, opset or onnx_export.DEFAULT_OPSET)
        write_onnx(model, dst)
        return
    counts = op_counts(result.graph_def)
    write_result(
        FoldResult(result.graph_def, [], result.inputs, result.outputs, counts, counts, source=result.source, signature=result.signature),
        dst,
    )


def recalibrate_file(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    data: Data,
    *,
    opset: int | None = None,
    in_place: bool = False,
    **options: Any,
) -> RecalibrationResult:
    """Recalibrate ``src`` and write ``dst`` atomically; ``dst``'s suffix picks the format, as for ``bnfold.fold_file``.

    Nothing is written when recalibration fails, and ``dst`` may not be ``src`` unless ``in_place``.
    """
    from bnfold.core.files import check_output_path
    from bnfold.core.formats import check_output_format, is_onnx_path, is_saved_model_destination

    check_output_format(dst)
    check_output_path(Path(src), Path(dst), in_place, directory=is_saved_model_destination(dst))
    if is_onnx_path(src):
        from bnfold.recalibration.onnx import recalibrate_onnx_file

        return recalibrate_onnx_file(Path(src), Path(dst), data, **options)
    if is_keras_path(dst):
        if not is_keras_path(src):
            raise UsageError(f"{dst}: Keras output needs a Keras model (.keras/.h5) as input; write .pb, .pbtxt, .onnx or a SavedModel")
        return recalibrate_keras_file(Path(src), Path(dst), data, **options)
    result = recalibrate(src, data, **options)
    write(result, dst, opset)
    return result




def _keras_bns(model: Any) -> list[Any]:
    from bnfold.keras.fold import _sublayers

    return [layer for layer in _sublayers(model) if type(layer).__name__.endswith("BatchNormalization") and hasattr(layer, "moving_mean")]


def recalibrate_keras_file(
    src: Path,
    dst: Path,
    data: Data,
    *,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    trust_model: bool = False,
    outputs: list[str] | None = None,
    set_flags: dict[str, bool] | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
) -> RecalibrationResult:
    """A Keras model in, the same Keras model out with new ``moving_mean``/``moving_variance`` in each BN layer.

    The statistics are measured on the frozen graph like any other model's. To
    know which graph BN is which layer, the model is frozen once with each layer's
    moving mean set to a tag (layer number + 0.5); the real values are put back
    before anything runs, and the graph's BNs start from them.

    The model file is loaded only in bnfold's confined worker (:mod:`bnfold.core.worker`),
    twice: once to freeze the tagged graph (:func:`keras_tagged_here`; the GraphDef's
    bytes, the layer names and their statistics come back), once to set the new
    statistics and save the model in the worker's private directory
    (:func:`keras_write_here`; the file's bytes come back). This process measures
    (the runs happen in a worker too) and writes ``dst`` atomically.
    """
    from bnfold.keras import fold as keras_fold
    from bnfold.tf.runsafety import trusting

    if outputs or set_flags or checkpoint:
        raise UsageError("--outputs/--set/--checkpoint apply to graphs and checkpoints; a Keras model takes none of them")
    if serve.in_worker():
        loaded, names, real = keras_tagged_here(str(src), trust_model)
    else:
        loaded, names, real = _keras_tagged_in_worker(src, trust_model)
    layer_of: dict[str, int] = {}

    def adopt(sites: list[Site]) -> None:
        for site in sites:
            if site.old_mean is None or not site.old_mean.size:
                continue
            number = float(np.ravel(site.old_mean)[0]) - 0.5
            if number.is_integer() and 0 <= number < len(names) and np.all(site.old_mean == number + 0.5):
                layer_of[site.name] = int(number)
                site.old_mean, site.old_var = real[int(number)][0].reshape(-1), real[int(number)][1].reshape(-1)
                site.label = names[int(number)]

    outputs = [parse_input(t)[0] for t in loaded.signature.outputs.values()] if loaded.signature else None
    with trusting(trust_model):
        result = recalibrate_graph(loaded.graph_def, data, outputs=outputs, memory_budget=memory_budget, source=str(src), adopt=adopt)
    missing = [names[i] for i in range(len(names)) if i not in layer_of.values()]
    if missing:
        result.notes.append(f"Keras BN layer(s) {', '.join(missing)} not found in the traced graph: their statistics are kept")
    values = {layer_of[name]: stats for name, stats in result.values.items() if name in layer_of}
    if serve.in_worker():
        saved = keras_write_here(str(src), str(dst), trust_model, values)
    else:
        saved = _keras_write_in_worker(src, dst, trust_model, values)
    keras_fold.write_bytes(dst, saved)
    result.signature = loaded.signature
    return result


def keras_tagged_here(src: str, trust_model: bool) -> tuple[Any, list[str], list[tuple[np.ndarray, np.ndarray]]]:
    """The worker's first step of :func:`recalibrate_keras_file`: the model frozen with each BN layer's moving mean
    set to its tag (layer number + 0.5), the layers' names, and their real moving means and variances."""
    from bnfold.keras import fold as keras_fold
    from bnfold.tf.freeze import freeze_keras

    model = keras_fold.load_model(Path(src), trust_model)
    bns = _keras_bns(model)
    real = [(np.array(layer.moving_mean.numpy()), np.array(layer.moving_variance.numpy())) for layer in bns]
    try:
        for number, layer in enumerate(bns):
            layer.moving_mean.assign(np.full(real[number][0].shape, number + 0.5, real[number][0].dtype))
        loaded = freeze_keras(model)
    finally:
        for layer, (mean, _) in zip(bns, real, strict=True):
            layer.moving_mean.assign(mean)
    loaded.source = src
    return loaded, [layer.name for layer in bns], real


def keras_write_here(src: str, dst: str, trust_model: bool, values: dict[int, tuple[np.ndarray, np.ndarray]]) -> bytes:
    """The worker's second step of :func:`recalibrate_keras_file`: the model loaded again, ``values`` (by BN layer
    number, as :func:`keras_tagged_here` numbered them) set as the layers' moving statistics, in their shapes
    and dtypes, and the file saved for ``dst`` (and proven to load and predict the same) as bytes."""
    from bnfold.keras import fold as keras_fold

    model = keras_fold.load_model(Path(src), trust_model)
    bns = _keras_bns(model)
    for number, (mean, var) in values.items():
        if not 0 <= number < len(bns):
            raise UsageError(f"{src}: no BN layer number {number} in the model")
        layer = bns[number]
        for variable, value in ((layer.moving_mean, mean), (layer.moving_variance, var)):
            now = np.asarray(variable.numpy())
            variable.assign(np.asarray(value).reshape(now.shape).astype(now.dtype))
    return keras_fold.saved_bytes(model, Path(dst))


def _keras_request(src: Path, header: dict[str, Any], payload: bytes = b"") -> tuple[dict[str, Any], bytes]:
    """One ``keras_recalibrate`` step in a confined worker; its errors keep their exit codes."""
    from bnfold.core import worker as isolation
    from bnfold.core.errors import InputError

    try:
        return isolation.ask({"op": KERAS, "src": str(src), **header}, payload, engine="Keras")
    except isolation.GraphRunError as exc:
        raise isolation.as_bnfold_error(exc, lambda text: InputError(f"{src}: cannot recalibrate the model ({text})")) from None
    except isolation.WorkerDied as exc:
        raise InputError(f"{src}: recalibrating the model ended bnfold's worker: {exc.describe()}") from None


def _keras_tagged_in_worker(src: Path, trust_model: bool) -> tuple[Any, list[str], list[tuple[np.ndarray, np.ndarray]]]:
    """:func:`keras_tagged_here` in the worker: the file's checks here (nothing of it loaded), then GraphDef bytes,
    the signature and layer names as JSON and the statistics as arrays come back."""
    from bnfold.core import sandbox
    from bnfold.core.errors import InputError
    from bnfold.core.result import Signature
    from bnfold.keras.load import check_keras_input
    from bnfold.tf.freeze import Loaded

    check_keras_input(src, trust_model)  # refused here, before any Keras reads the file
    sandbox.allow_read(src)
    head, body = _keras_request(src, {"step": "freeze", "trust_model": trust_model})
    size = int(head["graph_bytes"])
    graph_def = graph_pb2.GraphDef.FromString(body[:size])
    arrays = protocol.decode_arrays(head["arrays"], body[size:])
    names = [str(n) for n in head["names"]]
    if len(arrays) != 2 * len(names):
        raise InputError(f"{src}: bnfold's worker answered {len(arrays)} statistics for {len(names)} BN layers")
    sig = head.get("signature")
    signature = Signature(str(sig["name"]), dict(sig["inputs"]), dict(sig["outputs"])) if isinstance(sig, dict) else None
    real = [(arrays[2 * i], arrays[2 * i + 1]) for i in range(len(names))]
    return Loaded(graph_def, str(src), signature), names, real


def _keras_write_in_worker(src: Path, dst: Path, trust_model: bool, values: dict[int, tuple[np.ndarray, np.ndarray]]) -> bytes:
    """:func:`keras_write_here` in the worker: layer numbers and the new statistics go in, the saved file's bytes come back."""

    numbers = sorted(values)
    meta, payload = protocol.encode_arrays([np.asarray(a, np.float64) for n in numbers for a in values[n]])
    header = {"step": "write", "dst": str(dst), "trust_model": trust_model, "layers": numbers, "arrays": meta}
    _, body = _keras_request(src, header, payload)
    return body


def serve_keras(state: serve.State, head: dict[str, Any], payload: bytes, reply: IO[bytes]) -> None:
    """``bnfold recalibrate a.keras b.keras`` in the worker (:func:`bnfold.recalibration.graph.recalibrate_keras_file`), in two steps.

    ``freeze``: load the file, freeze it with each BN layer's moving mean tagged; answered with the GraphDef's bytes
    followed by the layers' real statistics as arrays, their names and the signature as JSON. ``write``: load the
    file again, set the new statistics sent as arrays (by layer number), save it in the private directory and
    check the saved file; answered with its bytes.
    """
    from bnfold.core.errors import InputError

    src, trust_model = str(head["src"]), bool(head["trust_model"])
    try:
        if head["step"] == "freeze":
            loaded, names, real = keras_tagged_here(src, trust_model)
            sig = loaded.signature
            signature = {"name": sig.name, "inputs": sig.inputs, "outputs": sig.outputs} if sig is not None else None
            graph = loaded.graph_def.SerializeToString()
            del loaded
            meta, data = encode_arrays([a for pair in real for a in pair])
            send(reply, {"ok": True, "graph_bytes": len(graph), "names": names, "arrays": meta, "signature": signature}, graph + data)
            return
        if head["step"] != "write":
            raise ValueError(f"unknown keras_recalibrate step {head['step']!r}")
        arrays = decode_arrays(head["arrays"], payload)
        numbers = [int(n) for n in head["layers"]]
        if len(arrays) != 2 * len(numbers):
            raise ValueError("keras_recalibrate: two arrays per layer")
        values = {n: (arrays[2 * i], arrays[2 * i + 1]) for i, n in enumerate(numbers)}
        data = keras_write_here(src, str(head["dst"]), trust_model, values)
    except (BnfoldError, MemoryError, ValueError):
        raise
    except Exception as exc:  # noqa: BLE001 - a layer's own code (a trusted Lambda) failing in the confined worker
        raise InputError(f"{src}: the model failed in bnfold's worker ({type(exc).__name__}: {first_line_of(str(exc))})") from None
    send(reply, {"ok": True}, data)


KERAS = f"{__name__}:serve_keras"
