"""``bnfold recalibrate``: recompute the BN moving statistics of a model from calibration data.

The users bnfold exists for trained a model whose stored statistics are wrong
(update ops never run, ``decay=1``, a validation copy never trained, a BN frozen
in training mode, drifted data). Retraining takes days; the statistics take
seconds. Each BN's new moving mean and variance are the per-channel moments of
its input over the calibration samples, measured in inference mode with every
BN upstream already recalibrated: exactly what the deployed model will see.

How (docs/recalibrate.md):

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

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from tensorflow.core.framework import attr_value_pb2, graph_pb2, tensor_shape_pb2, types_pb2

from bnfold.core.errors import UsageError, VerificationError, first_line
from bnfold.core.recalibration import DEFAULT_MEMORY_BUDGET, Data, Feeder, LayerRecord, Moments, RecalibrationResult, _summary, drift_score
from bnfold.recalibration.sites import Site, _moment_shape, _shaped, assign_levels, find_sites
from bnfold.tf.canonical import ConstEvaluator, input_dtype
from bnfold.tf.graph import GraphIndex, make_node, parse_input
from bnfold.tf.recognize import FUSED_BN_OPS

# Bytes of activations kept (in the worker) from one pass to the next, for all samples (docs/recalibrate.md):
# beyond it a pass recomputes the graph up to its level instead.
DEFAULT_CACHE_BUDGET = 2 * 2**30


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
    from bnfold.core.findings import MIN_DRIFT_VALUES
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
