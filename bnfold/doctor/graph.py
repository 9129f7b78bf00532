"""``bnfold doctor``: find the BN misuse that makes inference differ from training.

The questions users ask (predictions change with batch size, moving statistics
stuck at 0/1, update ops never run, a ``tf.cond`` train switch left in the
exported graph) each leave a trace in the frozen graph. Each check below reads
one such trace and becomes a :class:`Finding` with a stable code, a severity, the
BN nodes concerned, one sentence of explanation and the fix.

The graph is checked as it runs at inference: training switches are reported on
the original graph, then resolved to their inference value (a flag whose name
says "training" is assumed false) so the other checks see the inference path.

This module holds the static checks (switches, training-mode BN, statistics at
their initial values, what the folder skips) and the entry point; the BN
statistics of each form are read in :mod:`bnfold.doctor.statistics`, the checks
that run the graph (probe, drift on ``--data``) are in :mod:`bnfold.doctor.dynamic`,
and a TF1 checkpoint is read by :mod:`bnfold.doctor.training`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tensorflow.core.framework import graph_pb2

from bnfold.core.errors import UsageError
from bnfold.core.files import atomic_write
from bnfold.core.findings import (
    DRIFT_MEAN_Z,
    MIN_DRIFT_VALUES,
    SEVERITY_ORDER,
    DoctorReport,
    Finding,
    add_recalibrate_line,
    at_init_finding,
    unfoldable_findings,
)
from bnfold.core.findings import print_report as print_findings
from bnfold.core.findings import write_json as write_json  # the CLI writes the report through this module
from bnfold.doctor.dynamic import LayerDrift, apply_probe, drift_findings, measure_drift
from bnfold.doctor.statistics import LayerStats, _with_affine, batch_mean_behind, decomposed_stats, fused_stats, global_stats
from bnfold.tf.canonical import ConstEvaluator
from bnfold.tf.fold import fold_graph
from bnfold.tf.graph import GraphIndex, attr, parse_input
from bnfold.tf.recognize import FUSED_BN_OPS, GLOBAL_BN_OPS, Affine, recognize
from bnfold.tf.runsafety import trusting
from bnfold.tf.switches import (
    IF_OPS,
    KERAS_LEARNING_PHASE,
    CondSite,
    find_conds,
    looks_like_training_flag,
    resolve_switches,
    without_cond_plumbing,
)

# Ops whose presence marks a conditional's branch as normalization code.
_BN_MARKERS = FUSED_BN_OPS | GLOBAL_BN_OPS | {"Rsqrt", "Mean", "SquaredDifference"}


@dataclass
class Report(DoctorReport):
    """The shared report, plus the per-layer drift (``--data``) and notes on what was not checked."""

    drift: list[LayerDrift] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return {**super().to_json(), "drift": [row.to_json() for row in self.drift], "notes": self.notes}


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
            stat = _with_affine(fused_stats(index, ev, node), fused_site if isinstance(fused_site, Affine) else None)
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
            stat = _with_affine(global_stats(index, ev, node), global_site if isinstance(global_site, Affine) else None)
        elif node.op == "Rsqrt" and not ev.is_const(node.name):
            mean = batch_mean_behind(index, ev, node.name)
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
                stat = _with_affine(decomposed_stats(index, ev, site), site)
        if stat is None:
            continue
        stats.append(stat)
        at_init = at_init_finding(stat)
        if at_init is not None:
            findings.append(at_init)
    return findings, stats, count


def check_unfoldable(graph_def: graph_pb2.GraphDef, protected: set[str]) -> list[Finding]:
    """BN_UNFOLDABLE: what the folder would skip, and why (from the folder's own records)."""
    _, records = fold_graph(graph_def, protected)
    return unfoldable_findings(records, "{form} BN", "graph")


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
    without running its graph (see :mod:`bnfold.doctor.training` and :mod:`bnfold.doctor.training_graph`); ``outputs``
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
    from bnfold.doctor.training import freeze_inference_path, open_artifacts
    from bnfold.doctor.training_graph import analyse, check_momentum, check_stats_at_init, check_updates

    artifacts = open_artifacts(path, Path(checkpoint) if checkpoint is not None else None)
    graph = analyse(artifacts.meta, train_op)
    findings = check_updates(graph) + check_momentum(graph)
    at_init, missing = check_stats_at_init(graph, artifacts.reader)
    findings += at_init
    notes = [artifacts.note] if artifacts.note else []
    if missing:
        notes.append(
            f"the checkpoint has no value for {len(missing)} moving-statistics variable(s) ({', '.join(missing[:3])}); not checked"
        )
    drift: list[LayerDrift] = []
    if outputs:
        frozen = freeze_inference_path(artifacts, outputs)
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
