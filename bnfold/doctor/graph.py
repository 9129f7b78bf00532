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

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tensorflow.core.framework import graph_pb2

from bnfold.core.budgets import BudgetExceeded, Tally
from bnfold.core.errors import BnfoldError, UsageError, VerificationError, first_line
from bnfold.core.files import atomic_write
from bnfold.core.findings import (  # noqa: F401  (format-neutral, shared with onnx_doctor; re-exported)
    DRIFT_MEAN_Z,
    DRIFT_VAR_RATIO,
    MIN_DRIFT_VALUES,
    RECALIBRATE_CODES,
    SEVERITY_ORDER,
    BnStats,
    DoctorReport,
    Finding,
    ModeDrift,
    Severity,
    add_recalibrate_line,
    channel_moments,
    drift_metrics,
    write_json,
)
from bnfold.core.findings import print_report as print_findings
from bnfold.tf.canonical import ConstEvaluator
from bnfold.tf.fold import fold_graph
from bnfold.tf.graph import GraphIndex, attr, attr_text, parse_input
from bnfold.tf.recognize import DATA_FORMAT, FUSED_BN_OPS, GLOBAL_BN_OPS, Affine, recognize
from bnfold.tf.runsafety import check_runnable, is_trusted, trusting
from bnfold.tf.switches import (
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


@dataclass
class Report(DoctorReport):
    """The shared report, plus the per-layer drift (``--data``) and notes on what was not checked."""

    drift: list[LayerDrift] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return {**super().to_json(), "drift": [row.to_json() for row in self.drift], "notes": self.notes}


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
    fmt = attr_text(node, "data_format", "NHWC")
    if not DATA_FORMAT.fullmatch(fmt):
        return None  # not a format TensorFlow has (bytes of a hostile or corrupt file)
    eps = attr(node, "epsilon").f if "epsilon" in node.attr else 1e-4  # type: ignore[attr-defined]
    axis = -1 if fmt.endswith("C") else 1 - len(fmt)
    name = node.name  # type: ignore[attr-defined]
    return BnStats(name, inputs[0], mean.reshape(-1), var.reshape(-1), eps, axis, (name, 3), (name, 4))


def _global_stats(index: GraphIndex, ev: ConstEvaluator, node: object) -> BnStats | None:
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


def _decomposed_stats(index: GraphIndex, ev: ConstEvaluator, site: Affine) -> BnStats | None:
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


def check_bn_nodes(graph_def: graph_pb2.GraphDef) -> tuple[list[Finding], list[LayerStats], int]:
    """BN_TRAINING_MODE and BN_STATS_AT_INIT on the inference graph; the BNs' statistics for drift."""
    index = GraphIndex(graph_def)
    ev = ConstEvaluator(index)
    findings: list[Finding] = []
    stats: list[LayerStats] = []
    count = 0
    for node in index:
        stat: LayerStats | None = None
        if node.op in FUSED_BN_OPS:
            count += 1
            training = attr(node, "is_training").b if "is_training" in node.attr else True
            fused_site = None if training else recognize(index, ev, node)
            stat = _with_affine(_fused_stats(index, ev, node), fused_site if isinstance(fused_site, Affine) else None)
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
            global_site = recognize(index, ev, node)
            stat = _with_affine(_global_stats(index, ev, node), global_site if isinstance(global_site, Affine) else None)
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
                stat = _with_affine(_decomposed_stats(index, ev, site), site)
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


@dataclass
class LayerDrift:
    """One BN layer on the user's data: at inference (upstream BNs on moving statistics) and in training mode (on batch statistics)."""

    name: str
    node: str
    inference: ModeDrift
    training: ModeDrift | None

    def to_json(self) -> dict[str, object]:
        return {
            "layer": self.name,
            "node": self.node,
            "inference": {**asdict(self.inference), "score": self.inference.score},
            "training": None if self.training is None else {**asdict(self.training), "score": self.training.score},
        }




def _values_per_channel(stat: LayerStats, value: np.ndarray) -> int:
    channels = value.shape[stat.channel_axis] if stat.channel_axis is not None and value.ndim else 1
    return int(value.size // max(int(channels), 1))


def _mode_drift(stat: LayerStats, value: np.ndarray) -> tuple[ModeDrift, np.ndarray] | None:
    if _values_per_channel(stat, value) < MIN_DRIFT_VALUES:
        return None
    data_mean, data_var = channel_moments(value, stat.channel_axis)
    if stat.mean.size not in (1, data_mean.size):
        return None
    z, ratio = drift_metrics(stat, data_mean, data_var)
    low, high = DRIFT_VAR_RATIO
    bad = (z > DRIFT_MEAN_Z) | (ratio < low) | (ratio > high)
    drift = ModeDrift(float(np.max(z)), float(np.min(ratio)), float(np.max(ratio)), int(bad.sum()), int(bad.size))
    return drift, bad


def _training_output(stat: LayerStats, value: np.ndarray) -> np.ndarray:
    """The BN's output in training mode: its input normalized with the batch's own statistics."""
    x = np.asarray(value, np.float64)
    axis = stat.channel_axis if stat.channel_axis is not None else -1
    reduce = tuple(a for a in range(x.ndim) if a != axis % x.ndim) if stat.channel_axis is not None else None
    mean, var = x.mean(axis=reduce, keepdims=True), x.var(axis=reduce, keepdims=True)
    shape = [1] * x.ndim
    if stat.channel_axis is not None:
        shape[axis] = -1
    gamma = np.asarray(stat.gamma, np.float64).reshape(shape) if stat.gamma is not None and stat.gamma.size > 1 else stat.gamma
    beta = np.asarray(stat.beta, np.float64).reshape(shape) if stat.beta is not None and stat.beta.size > 1 else stat.beta
    y = (x - mean) / np.sqrt(var + stat.eps) * gamma + beta
    return y.astype(np.asarray(value).dtype)


def measure_drift(graph_def: graph_pb2.GraphDef, stats: list[LayerStats], feeds: dict[str, np.ndarray]) -> list[LayerDrift]:
    """Each BN's input statistics on the data against its moving statistics, in both modes, in model order.

    Inference mode is one run of the graph. Training mode (what ``fit`` sees) is
    one run per BN: every BN before it is fed its output normalized with the
    batch's own statistics, computed here from the fetched input; the rest of
    the graph runs as at inference. Both go through the shared graph runner.
    """
    from bnfold.tf.verify import open_graph_runner

    if not stats:
        return []
    order = {name: i for i, name in enumerate(GraphIndex(graph_def).topological_order())}
    stats = sorted(stats, key=lambda s: order.get(s.name, len(order)))
    if not is_trusted():
        hint = "without --data doctor runs nothing; --trust-model runs it anyway"
        check_runnable(graph_def, [s.input_ref for s in stats], "--data", hint=hint)
    runner = open_graph_runner(graph_def, "the graph", hint="")
    try:
        values = runner.run([s.input_ref for s in stats], feeds)
        trained: list[np.ndarray | None] = []
        fed = dict(feeds)
        for stat in stats:
            (value,) = runner.run([stat.input_ref], fed)
            trained.append(value)
            if stat.output_ref is not None and stat.gamma is not None and stat.beta is not None:
                fed[stat.output_ref] = _training_output(stat, value)
    except runner.errors as exc:
        raise VerificationError(f"--data: could not run the graph on the data: {first_line(exc)}") from None
    finally:
        runner.close()
    rows = []
    for stat, value, train_value in zip(stats, values, trained, strict=True):
        inference = _mode_drift(stat, value)
        if inference is None:
            continue
        training = _mode_drift(stat, train_value) if train_value is not None else None
        rows.append(LayerDrift(stat.label, stat.name, inference[0], training[0] if training is not None else None))
    return rows


def drift_findings(rows: list[LayerDrift]) -> list[Finding]:
    """BN_STATS_DRIFT for each layer whose input drifts at inference."""
    low, high = DRIFT_VAR_RATIO
    findings = []
    for row in rows:
        inf = row.inference
        if not inf.channels_drifting:
            continue
        training = (
            f" In training mode (upstream BNs on batch statistics) its score is {row.training.score:.2f}"
            f"{' - the gap starts upstream' if row.training.score < 1 else ''}."
            if row.training is not None
            else ""
        )
        findings.append(
            Finding(
                "BN_STATS_DRIFT",
                "warning",
                [row.node],
                f"on your data {inf.channels_drifting}/{inf.channels} channels drift from the stored statistics "
                f"(mean off by up to {inf.max_mean_z:.2f} std, variance ratio {inf.min_var_ratio:.2f}-{inf.max_var_ratio:.2f}; "
                f"limits {DRIFT_MEAN_Z} std and [{low}, {high}]): the data differs from the training data, or the statistics are stale."
                f"{training}",
                "check the preprocessing matches training (scaling, channel order, mean subtraction); "
                "if the data is right, recompute the moving statistics on representative data",
                {
                    **asdict(inf),
                    "score": inf.score,
                    "layer": row.name,
                    "training": None if row.training is None else {**asdict(row.training), "score": row.training.score},
                },
            )
        )
    return findings


def check_drift(graph_def: graph_pb2.GraphDef, stats: list[LayerStats], feeds: dict[str, np.ndarray]) -> list[Finding]:
    """BN_STATS_DRIFT: each BN's input statistics on the user's data against its moving statistics."""
    return drift_findings(measure_drift(graph_def, stats, feeds))


# -- layer/instance norm lowered to FusedBatchNorm: decided by probing ---------------
PROBE_BATCH = 3


def probe_batch_dependence(graph_def: graph_pb2.GraphDef, nodes: list[str], seed: int = 0) -> dict[str, tuple[bool | None, str]]:
    """Per training-mode BN node: does its output for sample 0 change when other samples join the batch?

    Keras lowers layer normalization to ``FusedBatchNormV3`` with ``is_training=True``
    on a reshaped tensor whose "channels" are the samples: the statistics are per
    sample, and so is the output. Structure cannot tell that apart from BN left in
    training mode; running sample 0 alone and inside a batch of random samples can.
    Outputs are compared flat: the first ``1/PROBE_BATCH`` of the batch's output is
    sample 0 when the batch is the outermost axis, also after such a reshape.
    """
    from bnfold.tf.verify import find_inputs, needed_inputs, open_graph_runner

    needed = needed_inputs(graph_def, nodes, set())
    specs = [s for s in find_inputs(graph_def) if s.name in needed]
    rng = np.random.default_rng(seed)
    feeds = {}
    tally = Tally("the doctor's probe inputs")
    for spec in specs:
        import tensorflow as tf

        dtype = tf.dtypes.as_dtype(spec.dtype)
        if not dtype.is_floating or spec.shape is None or not spec.shape or spec.shape[0] is not None or None in spec.shape[1:]:
            reason = f"input {spec.name} is not a float tensor with a free batch dimension and known other dimensions"
            return dict.fromkeys(nodes, (None, reason))
        dims = [int(d) for d in spec.shape[1:] if d is not None]
        try:  # from the shape, before numpy allocates anything
            tally.tensor(f"input {spec.name!r}", [PROBE_BATCH, *dims])
        except BudgetExceeded as exc:
            return dict.fromkeys(nodes, (None, str(exc)))
        feeds[spec.name] = rng.standard_normal([PROBE_BATCH, *dims]).astype(dtype.as_numpy_dtype)
    try:
        runner = open_graph_runner(graph_def, "the graph", hint="")
    except BnfoldError as exc:
        return dict.fromkeys(nodes, (None, first_line(exc)))
    try:
        together = runner.run([f"{n}:0" for n in nodes], feeds)
        alone = runner.run([f"{n}:0" for n in nodes], {k: v[:1] for k, v in feeds.items()})
    except (*runner.errors, BnfoldError) as exc:  # type: ignore[misc]  # a tuple built at run time
        return dict.fromkeys(nodes, (None, first_line(exc)))
    finally:
        runner.close()
    result: dict[str, tuple[bool | None, str]] = {}
    for name, a, b in zip(nodes, alone, together, strict=True):
        a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
        if b.size != PROBE_BATCH * a.size:
            result[name] = (None, f"its output does not scale with the batch ({a.size} values alone, {b.size} in a batch of {PROBE_BATCH})")
            continue
        diff = float(np.max(np.abs(a - b[: a.size]))) if a.size else 0.0
        scale = float(np.max(np.abs(b))) if b.size else 0.0
        dependent = diff > 1e-4 * scale + 1e-5
        result[name] = (dependent, f"sample 0 alone vs in a batch of {PROBE_BATCH} random samples differ by {diff:.3g}")
    return result


def apply_probe(graph_def: graph_pb2.GraphDef, findings: list[Finding]) -> list[Finding]:
    """Turn BN_TRAINING_MODE on fused BNs whose output does not depend on the batch into BN_PER_SAMPLE_NORM (info)."""
    fused = [f for f in findings if f.code == "BN_TRAINING_MODE" and f.details.get("form") in FUSED_BN_OPS]
    if not fused:
        return findings
    probed = probe_batch_dependence(graph_def, [f.nodes[0] for f in fused])
    out = []
    for finding in findings:
        if finding not in fused:
            out.append(finding)
            continue
        dependent, evidence = probed[finding.nodes[0]]
        finding.details["probe"] = evidence
        if dependent is False:
            out.append(
                Finding(
                    "BN_PER_SAMPLE_NORM",
                    "info",
                    finding.nodes,
                    f"normalization with per-sample statistics: {finding.details['form']} has is_training=True, but its output does not "
                    f"depend on the batch ({evidence}): layer or instance normalization lowered to a fused BN, not BN misuse.",
                    "nothing to do",
                    finding.details,
                )
            )
        else:
            if dependent is None:
                finding.message += f" (not probed: {evidence})"
            out.append(finding)
    return out


# -- entry point -------------------------------------------------------------------
def _data_feeds(graph_def: graph_pb2.GraphDef, data: dict[str, np.ndarray] | list[np.ndarray] | None) -> dict[str, np.ndarray]:
    from bnfold.tf.verify import find_inputs

    if not data:
        return {}
    if isinstance(data, dict):
        return dict(data)
    inputs = [s for s in find_inputs(graph_def) if s.dtype != 10]  # DT_BOOL flags are not data
    if len(data) > len(inputs):
        raise UsageError(f"--data: {len(data)} arrays for {len(inputs)} input(s); name them with --data NAME=x.npy")
    return {spec.name: value for spec, value in zip(inputs, data, strict=False)}


@dataclass
class GraphCheck:
    """What the frozen-graph checks found: findings, BN count, and the per-layer drift when data was given."""

    findings: list[Finding]
    count: int
    drift: list[LayerDrift]
    notes: list[str] = field(default_factory=list)


def check_frozen(
    graph_def: graph_pb2.GraphDef,
    *,
    data: dict[str, np.ndarray] | list[np.ndarray] | None = None,
    set_flags: dict[str, bool] | None = None,
    outputs: list[str] | None = None,
) -> GraphCheck:
    """Every frozen-graph check: switches on the graph as given, the rest on its inference path."""
    from bnfold.tf.verify import find_outputs

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
    findings += apply_probe(inference, bn_findings)
    # a layer/instance norm the probe found is not a BN the folder left behind: its own info says what it is
    per_sample = {n for f in findings if f.code == "BN_PER_SAMPLE_NORM" for n in f.nodes}
    findings += [f for f in check_unfoldable(inference, protected) if not set(f.nodes) & per_sample]
    feeds = _data_feeds(graph_def, data)
    drift = measure_drift(inference, stats, feeds) if feeds else []
    findings += drift_findings(drift)
    notes = []
    if feeds and len(drift) < len(stats):
        measured = {row.node for row in drift}
        unmeasured = [s.label for s in stats if s.name not in measured]
        notes.append(
            f"drift not measured for {len(unmeasured)} BN layer(s) ({', '.join(unmeasured[:4])}{', ...' if len(unmeasured) > 4 else ''}): "
            f"the data gives them fewer than {MIN_DRIFT_VALUES} values per channel (or a channel count their statistics do not have); "
            "give more samples"
        )
    return GraphCheck(findings, count, drift, notes)


def diagnose(
    source: Any,
    *,
    data: dict[str, np.ndarray] | list[np.ndarray] | None = None,
    set_flags: dict[str, bool] | None = None,
    outputs: list[str] | None = None,
    checkpoint: str | Path | None = None,
    train_op: list[str] | None = None,
    trust_model: bool = False,
) -> Report:
    """Check a model (any source ``bnfold.fold`` takes, or a TF1 checkpoint with its ``.meta``) for BN misuse.

    ``data`` (arrays per input) enables the drift check. A checkpoint is read
    without running its graph (see :mod:`bnfold.doctor.training`); ``outputs``
    names its inference path, ``train_op`` its train op when the graph does not say.
    """
    from bnfold.sources import load

    if isinstance(source, str | Path) and (checkpoint is not None or _is_checkpoint(Path(source))):
        with trusting(trust_model):  # graph runs (--data, the probe) pass bnfold.tf.runsafety's gate only when trusted
            report = _diagnose_checkpoint(Path(source), checkpoint, data, set_flags, outputs, train_op)
    else:
        if train_op:
            raise UsageError("--train-op: applies to a TF1 checkpoint (a .meta training graph), not to a frozen or Keras model")
        loaded = load(source, trust_model=trust_model)  # a frozen graph, a SavedModel, a Keras file or model: the same as `bnfold fold`
        with trusting(trust_model):
            checked = check_frozen(loaded.graph_def, data=data, set_flags=set_flags, outputs=outputs)
        report = Report(loaded.source, checked.findings, checked.count, checked.drift, checked.notes)
    report.findings.sort(key=lambda f: (SEVERITY_ORDER[f.severity], f.code, f.nodes))
    add_recalibrate_line(report.findings, recalibrate_line(source, outputs, checkpoint))
    return report


def recalibrate_line(source: Any, outputs: list[str] | None = None, checkpoint: str | Path | None = None) -> str:
    """The ready-to-run ``bnfold recalibrate`` command for this model (docs/recalibrate.md)."""
    import shlex

    model = shlex.quote(str(source)) if isinstance(source, str | Path) else "MODEL"
    extra = f" --checkpoint {shlex.quote(str(checkpoint))}" if checkpoint is not None else ""
    if checkpoint is not None or (isinstance(source, str | Path) and _is_checkpoint(Path(source))):
        extra += f" --outputs {shlex.quote(','.join(outputs)) if outputs else 'OUTPUT'}"
    return f"bnfold recalibrate {model} recalibrated.pb --data x.npy{extra}"


def _is_checkpoint(path: Path) -> bool:
    from bnfold.doctor.training import is_checkpoint

    return is_checkpoint(path)


def _diagnose_checkpoint(
    path: Path,
    checkpoint: str | Path | None,
    data: dict[str, np.ndarray] | list[np.ndarray] | None,
    set_flags: dict[str, bool] | None,
    outputs: list[str] | None,
    train_op: list[str] | None,
) -> Report:
    from bnfold.doctor import training as tg

    artifacts = tg.open_artifacts(path, Path(checkpoint) if checkpoint is not None else None)
    graph = tg.analyse(artifacts.meta, train_op)
    findings = tg.check_updates(graph) + tg.check_momentum(graph)
    at_init, missing = tg.check_stats_at_init(graph, artifacts.reader)
    findings += at_init
    notes = [artifacts.note] if artifacts.note else []
    if missing:
        notes.append(
            f"the checkpoint has no value for {len(missing)} moving-statistics variable(s) ({', '.join(missing[:3])}); not checked"
        )
    drift: list[LayerDrift] = []
    if outputs:
        frozen = tg.freeze_inference_path(artifacts, outputs)
        checked = check_frozen(frozen, data=data, set_flags=set_flags, outputs=outputs)
        # the checkpoint's values already gave BN_STATS_AT_INIT for every layer, with more evidence
        findings += [f for f in checked.findings if f.code != "BN_STATS_AT_INIT"]
        drift = checked.drift
        notes += checked.notes
    else:
        if data:
            raise UsageError("--data: with a checkpoint, name the inference outputs to run with --outputs")
        notes.append("inference path not checked (BN_TRAINING_MODE, BN_TRAINING_SWITCH): name its outputs with --outputs")
    return Report(artifacts.source, findings, len(graph.layers), drift, notes)


def print_report(report: DoctorReport, console: object) -> None:
    """The shared findings table, then the drift per layer when measured, then what was not checked."""
    from rich.table import Table

    print_findings(report, console)
    drift = report.drift if isinstance(report, Report) else []
    if drift:
        table = Table(title="drift per BN layer (score: 1 = threshold)")
        for column in ("layer", "inference score", "mean z", "var ratio", "training-mode score"):
            table.add_column(column, overflow="fold")
        for row in drift:
            inf = row.inference
            mark = "[yellow]" if inf.score > 1 else ""
            table.add_row(
                row.name,
                f"{mark}{inf.score:.2f}",
                f"{inf.max_mean_z:.2f}",
                f"{inf.min_var_ratio:.2f}-{inf.max_var_ratio:.2f}",
                "-" if row.training is None else f"{row.training.score:.2f}",
            )
        console.print(table)  # type: ignore[attr-defined]
    for note in report.notes if isinstance(report, Report) else []:
        console.print(f"note: {note}")  # type: ignore[attr-defined]


# -- the drift plot ---------------------------------------------------------------------
def drift_figure(rows: list[LayerDrift]) -> Any:
    """One bar per BN layer in model order (inference-mode score), training-mode scores as dots, the threshold at 1."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install 'bnfold[plot]' (or pip install matplotlib)") from None
    if not rows:
        raise UsageError("--plot: no BN layer was measured; give --data with inputs for the model")
    figure = Figure(figsize=(max(6.0, 0.5 * len(rows) + 2), 4.5), layout="constrained")
    axes = figure.add_subplot()
    positions = np.arange(len(rows))
    scores = [row.inference.score for row in rows]
    colors = ["tab:red" if s > 1 else "tab:blue" for s in scores]
    axes.bar(positions, scores, color=colors, label="inference (moving statistics upstream)")
    trained = [(i, row.training.score) for i, row in enumerate(rows) if row.training is not None]
    if trained:
        axes.plot([i for i, _ in trained], [s for _, s in trained], "o", color="black", label="training mode (batch statistics upstream)")
    axes.axhline(1.0, color="tab:orange", linestyle="--", label="threshold")
    axes.set_xticks(positions, [row.name for row in rows], rotation=60, ha="right", fontsize=8)
    axes.set_ylabel(f"drift score (max of |dmean|/std / {DRIFT_MEAN_Z}, |log2 var ratio|)")
    axes.set_title("BN input statistics on the data vs moving statistics, per layer")
    axes.legend(fontsize=8)
    return figure


def write_plot(rows: list[LayerDrift], path: Path) -> None:
    """Write the drift plot as PNG (atomically, like every bnfold output)."""
    figure = drift_figure(rows)
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=110))
