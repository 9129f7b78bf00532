"""``bnfold doctor``: find the BN misuse that makes inference differ from training.

The questions users ask (predictions change with batch size, moving statistics
stuck at 0/1, update ops never run, a ``tf.cond`` train switch left in the
exported graph) each leave a trace in the frozen graph. Each check below reads
one such trace and becomes a :class:`Finding` with a stable code, a severity, the
BN nodes concerned, one sentence of explanation and the fix.

The graph is checked as it runs at inference: training switches are reported on
the original graph, then resolved to their inference value (a flag whose name
says "training" is assumed false) so the other checks see the inference path.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from tensorflow.core.framework import graph_pb2

from bnfold.affine import FUSED_BN_OPS, GLOBAL_BN_OPS, Affine, recognize
from bnfold.canonical import ConstEvaluator
from bnfold.errors import UsageError, VerificationError, first_line
from bnfold.findings import (  # noqa: F401  (format-neutral, shared with onnx_doctor; re-exported)
    DRIFT_MEAN_Z,
    DRIFT_VAR_RATIO,
    SEVERITY_ORDER,
    BnStats,
    DoctorReport,
    Finding,
    Severity,
    channel_moments,
    drift_metrics,
    print_report,
    write_json,
)
from bnfold.folding import fold_graph
from bnfold.graph import GraphIndex, attr, parse_input
from bnfold.switches import (
    IF_OPS,
    KERAS_LEARNING_PHASE,
    CondSite,
    find_conds,
    find_moving_stats,
    looks_like_training_flag,
    resolve_switches,
    without_cond_plumbing,
)

# Ops whose presence marks a conditional's branch as normalization code.
_BN_MARKERS = FUSED_BN_OPS | GLOBAL_BN_OPS | {"Rsqrt", "Mean", "SquaredDifference"}


# -- statistics of each BN form ----------------------------------------------------
def _fused_stats(index: GraphIndex, ev: ConstEvaluator, node: object) -> BnStats | None:
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
    fmt = attr(node, "data_format").s.decode() if "data_format" in node.attr else "NHWC"  # type: ignore[attr-defined]
    eps = attr(node, "epsilon").f if "epsilon" in node.attr else 1e-4  # type: ignore[attr-defined]
    axis = -1 if fmt.endswith("C") else 1 - len(fmt)
    return BnStats(node.name, inputs[0], mean.reshape(-1), var.reshape(-1), eps, axis)  # type: ignore[attr-defined]


def _global_stats(index: GraphIndex, ev: ConstEvaluator, node: object) -> BnStats | None:
    inputs = index.data_inputs(node)  # type: ignore[arg-type]
    mean, var = ev.value(inputs[1]), ev.value(inputs[2])
    if mean is None or var is None:
        return None
    eps = attr(node, "variance_epsilon").f  # type: ignore[attr-defined]
    return BnStats(node.name, inputs[0], mean.reshape(-1), var.reshape(-1), eps, -1)  # type: ignore[attr-defined]


def _find_op(index: GraphIndex, ref: str, op: str) -> str | None:
    """The first ``op`` node in the constant subgraph behind ``ref`` (bounded walk)."""
    return next((node.name for node in index.walk(parse_input(ref)[0], limit=64) if node.op == op), None)


def _decomposed_stats(index: GraphIndex, ev: ConstEvaluator, site: Affine) -> BnStats | None:
    """Mean and variance of a decomposed BN (``tf.nn.batch_normalization``, Keras 3).

    The variance is the non-scalar operand of the ``Add`` under ``Rsqrt``; the mean
    is either subtracted from ``x`` directly or multiplied by the ``Rsqrt`` factor
    (``offset - mean * inv``).
    """
    var = eps = mean = None
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
                    x_ref = index.data_inputs(previous)[0]
            if var is None:
                add = index.producer(index.node(rsqrt).input[0])[0]
                if add is not None and add.op in ("Add", "AddV2"):
                    a, b = (ev.value(r) for r in index.data_inputs(add))
                    if a is not None and b is not None:
                        if a.size == b.size:
                            var, eps = (a, b) if float(np.max(a)) >= float(np.max(b)) else (b, a)
                        else:
                            var, eps = (a, b) if a.size > b.size else (b, a)
            if mean is None:
                mean = _mean_beside_rsqrt(index, ev, ref)
    if var is None or mean is None or x_ref is None:
        return None
    return BnStats(site.name, x_ref, np.asarray(mean).reshape(-1), np.asarray(var).reshape(-1), float(np.ravel(eps)[0]), site.channel_axis)


def _mean_beside_rsqrt(index: GraphIndex, ev: ConstEvaluator, ref: str) -> np.ndarray | None:
    """In ``offset - mean * inv``: the ``Mul`` operand that holds no ``Rsqrt``."""
    for node in index.walk(parse_input(ref)[0], limit=64):
        inputs = index.data_inputs(node)
        if node.op == "Mul" and len(inputs) == 2:
            with_rsqrt = [_find_op(index, r, "Rsqrt") is not None for r in inputs]
            if with_rsqrt.count(True) == 1:
                other = inputs[with_rsqrt.index(False)]
                # the gamma multiply (inv * gamma) sits under another Mul; the mean's Mul feeds a Sub/Neg
                readers = [index.node(c.node).op for c in index.consumers(node.name)]
                if any(op in ("Sub", "Neg") for op in readers):
                    return ev.value(other)
    return None


def _reduces_batch_axis(index: GraphIndex, ev: ConstEvaluator, node: object) -> bool:
    axes = ev.value(index.data_inputs(node)[1])  # type: ignore[arg-type]
    return axes is not None and 0 in {int(a) for a in np.ravel(axes)}


def _batch_mean_behind(index: GraphIndex, ev: ConstEvaluator, rsqrt: str) -> str | None:
    """A ``Mean`` over the batch axis among the (run-time) inputs of a normalization's ``Rsqrt``."""
    linear_or_input = ("Placeholder", "Conv2D", "MatMul", "Conv3D", "DepthwiseConv2dNative")
    for node in index.walk(rsqrt, limit=40, stop=lambda n: n.op in linear_or_input):
        if node.op == "Mean" and _reduces_batch_axis(index, ev, node):
            return node.name
    return None


# -- checks ------------------------------------------------------------------------
def _branch_has_bn(graph_def: graph_pb2.GraphDef, index: GraphIndex, site: CondSite) -> bool:
    node = index.node(site.node)
    if node.op in IF_OPS:
        names = {attr(node, "then_branch").func.name, attr(node, "else_branch").func.name}
        return any(any(n.op in _BN_MARKERS for n in f.node_def) for f in graph_def.library.function if f.signature.name in names)
    return any(node.op in _BN_MARKERS for node in index.walk(site.node, limit=200, forward=True))


def check_switches(graph_def: graph_pb2.GraphDef, set_flags: dict[str, bool] | None) -> list[Finding]:
    """BN_TRAINING_SWITCH: a conditional on a training flag whose value is fed at run time."""
    index = GraphIndex(graph_def)
    by_flag: dict[str, list[CondSite]] = {}
    for site in find_conds(graph_def, set_flags):
        if site.flag.op == "Const" or site.how == "--set":
            continue
        if not (looks_like_training_flag(site.flag.node) or _branch_has_bn(graph_def, index, site)):
            continue
        by_flag.setdefault(site.flag.node, []).append(site)
    findings = []
    for flag, sites in sorted(by_flag.items()):
        kinds = sorted({s.kind for s in sites})
        if flag.rsplit("/", 1)[-1] == KERAS_LEARNING_PHASE:
            note = "Keras' learning-phase placeholder; feeding true (or setting the learning phase to 1) runs the training branch"
        elif sites[0].flag.op == "PlaceholderWithDefault":
            note = f"it defaults to {sites[0].value}, but any caller can feed true and get the training branch"
        else:
            note = "it has no default, so every caller must feed it, and feeding true runs the training branch"
        findings.append(
            Finding(
                "BN_TRAINING_SWITCH",
                "warning",
                sorted(s.node for s in sites),
                f"{len(sites)} conditional(s) ({', '.join(kinds)}) choose between training and inference code on '{flag}', "
                f"which is fed at run time: {note}.",
                f"feed {flag}=False at inference, or remove the switch: bnfold IN OUT --set {flag}=false "
                "(keeps only the inference branch, then folds it)",
                {"flag": flag, "flag_op": sites[0].flag.op},
            )
        )
    return findings


def check_bn_nodes(graph_def: graph_pb2.GraphDef) -> tuple[list[Finding], list[BnStats], int]:
    """BN_TRAINING_MODE and BN_STATS_AT_INIT on the inference graph; the BNs' statistics for drift."""
    index = GraphIndex(graph_def)
    ev = ConstEvaluator(index)
    findings: list[Finding] = []
    stats: list[BnStats] = []
    count = 0
    for node in index:
        stat: BnStats | None = None
        if node.op in FUSED_BN_OPS:
            count += 1
            training = attr(node, "is_training").b if "is_training" in node.attr else True
            stat = _fused_stats(index, ev, node)
            if training:
                rewrite = (
                    "or fold it with bnfold --training-bn=moving-stats (the graph holds its moving statistics)"
                    if stat is not None
                    else "bnfold cannot rewrite it: the graph holds no constant moving statistics for it"
                )
                findings.append(
                    Finding(
                        "BN_TRAINING_MODE",
                        "error",
                        [node.name],
                        f"{node.op} has is_training=True, so it normalizes with the statistics of each batch at inference: "
                        "predictions change with batch size and batch contents.",
                        f"export with training=False (Keras: model(x, training=False); TF1: is_training=False), {rewrite}",
                        {"form": node.op},
                    )
                )
        elif node.op in GLOBAL_BN_OPS:
            count += 1
            stat = _global_stats(index, ev, node)
        elif node.op == "Rsqrt" and not ev.is_const(node.name):
            mean = _batch_mean_behind(index, ev, node.name)
            if mean is not None:
                count += 1
                findings.append(
                    Finding(
                        "BN_TRAINING_MODE",
                        "error",
                        [node.name, mean],
                        f"the normalization at {node.name} computes its mean/variance from the input ({mean} reduces over the batch axis), "
                        "so predictions change with batch size and batch contents.",
                        "normalize with the moving averages at inference (tf.nn.batch_normalization with the moving mean/variance, "
                        "or the layer called with training=False) and export again",
                        {"form": "decomposed"},
                    )
                )
        else:
            site = recognize(index, ev, node) if node.op in ("Add", "AddV2", "Sub", "Mul", "BiasAdd", "RealDiv") else None
            if isinstance(site, Affine) and site.form == "decomposed":
                count += 1
                stat = _decomposed_stats(index, ev, site)
        if stat is None:
            continue
        stats.append(stat)
        if stat.mean.size and np.all(stat.mean == 0) and np.all(stat.var == 1):
            findings.append(
                Finding(
                    "BN_STATS_AT_INIT",
                    "warning",
                    [stat.name],
                    f"moving mean is exactly 0 and moving variance exactly 1 on all {stat.mean.size} channels: the moving averages "
                    "were never updated, so inference normalizes with placeholder statistics.",
                    "run the BN update ops with the train op (TF1: tf.control_dependencies(tf.get_collection(UPDATE_OPS)) or "
                    "updates_collections=None; Keras: train with fit or apply layer updates), check that decay/momentum is below 1, "
                    "then retrain or recompute the statistics",
                    {"channels": int(stat.mean.size)},
                )
            )
    return findings, stats, count


def check_unfoldable(graph_def: graph_pb2.GraphDef, protected: set[str]) -> list[Finding]:
    """BN_UNFOLDABLE: what the folder would skip, and why (from the folder's own records)."""
    _, records = fold_graph(graph_def, protected)
    return [
        Finding(
            "BN_UNFOLDABLE",
            "info",
            [r.name],
            f"{r.form} BN cannot be folded and stays in the graph: {r.reason}.",
            "see the other findings for this node; otherwise nothing to do",
            {"form": r.form},
        )
        for r in records
        if r.action == "skipped"
    ]


def check_drift(graph_def: graph_pb2.GraphDef, stats: list[BnStats], feeds: dict[str, np.ndarray]) -> list[Finding]:
    """BN_STATS_DRIFT: each BN's input statistics on the user's data against its moving statistics."""
    from bnfold.verification import open_graph_runner

    if not stats:
        return []
    runner = open_graph_runner(graph_def, "the graph", hint="")
    try:
        values = runner.run([s.input_ref for s in stats], feeds)
    except runner.errors as exc:
        raise VerificationError(f"--data: could not run the graph on the data: {first_line(exc)}") from None
    finally:
        runner.close()
    findings = []
    for stat, value in zip(stats, values, strict=True):
        data_mean, data_var = channel_moments(value, stat.channel_axis)
        if stat.mean.size not in (1, data_mean.size):
            continue
        z, ratio = drift_metrics(stat, data_mean, data_var)
        low, high = DRIFT_VAR_RATIO
        bad = (z > DRIFT_MEAN_Z) | (ratio < low) | (ratio > high)
        if not np.any(bad):
            continue
        worst = int(np.argmax(np.where(bad, z + np.abs(np.log(np.maximum(ratio, 1e-12))), -np.inf)))
        findings.append(
            Finding(
                "BN_STATS_DRIFT",
                "warning",
                [stat.name],
                f"on your data {int(bad.sum())}/{bad.size} channels drift from the stored statistics "
                f"(worst channel {worst}: mean off by {z[worst]:.2f} std, variance ratio {ratio[worst]:.2f}; "
                f"limits {DRIFT_MEAN_Z} std and [{low}, {high}]): the data differs from the training data, or the statistics are stale.",
                "check the preprocessing matches training (scaling, channel order, mean subtraction); "
                "if the data is right, recompute the moving statistics on representative data",
                {
                    "channels_drifting": int(bad.sum()),
                    "channels": int(bad.size),
                    "max_mean_z": float(np.max(z)),
                    "min_var_ratio": float(np.min(ratio)),
                    "max_var_ratio": float(np.max(ratio)),
                },
            )
        )
    return findings


# -- entry point -------------------------------------------------------------------
def _data_feeds(graph_def: graph_pb2.GraphDef, data: dict[str, np.ndarray] | list[np.ndarray] | None) -> dict[str, np.ndarray]:
    from bnfold.verification import find_inputs

    if not data:
        return {}
    if isinstance(data, dict):
        return dict(data)
    inputs = [s for s in find_inputs(graph_def) if s.dtype != np.bool_]  # bool flags are not data
    if len(data) > len(inputs):
        raise UsageError(f"--data: {len(data)} arrays for {len(inputs)} input(s); name them with --data NAME=x.npy")
    return {spec.name: value for spec, value in zip(inputs, data, strict=False)}


def diagnose(
    source: Any,
    *,
    data: dict[str, np.ndarray] | list[np.ndarray] | None = None,
    set_flags: dict[str, bool] | None = None,
    outputs: list[str] | None = None,
) -> DoctorReport:
    """Check a model (any source ``bnfold.fold`` takes) for BN misuse; ``data`` (arrays per input) enables the drift check."""
    from bnfold.freeze import load
    from bnfold.verification import find_outputs

    loaded = load(source)  # a frozen graph, a SavedModel, a Keras file or model: the same as `bnfold fold`
    graph_def, name = loaded.graph_def, loaded.source
    out_names = outputs or without_cond_plumbing(graph_def, find_outputs(graph_def))
    protected = {parse_input(n)[0] for n in out_names}
    findings = check_switches(graph_def, set_flags)
    try:
        inference, _ = resolve_switches(graph_def, set_flags, protected, assume_inference=True)
    except UsageError as exc:
        if set_flags:
            raise
        findings.append(Finding("BN_TRAINING_SWITCH", "info", [], f"switches left unresolved for the other checks: {exc}.", "-"))
        inference = graph_def
    bn_findings, stats, count = check_bn_nodes(inference)
    findings += bn_findings
    findings += check_unfoldable(inference, protected)
    feeds = _data_feeds(graph_def, data)
    if feeds:
        findings += check_drift(inference, stats, feeds)
    findings.sort(key=lambda f: (SEVERITY_ORDER[f.severity], f.code, f.nodes))
    return DoctorReport(name, findings, count)
