"""The TF doctor's checks that run the graph: the batch-dependence probe and the drift on ``--data``.

The static checks of :mod:`bnfold.doctor.graph` read the graph; these run it
(through :func:`bnfold.tf.verify.open_graph_runner`, behind bnfold's run-safety
gate): the probe decides whether a training-mode fused BN is layer/instance
normalization, the drift compares each BN's input on the user's data with its
moving statistics, at inference and in training mode.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from tensorflow.core.framework import graph_pb2

from bnfold.core.budgets import BudgetExceeded, Tally
from bnfold.core.errors import BnfoldError, VerificationError, first_line
from bnfold.core.findings import DRIFT_MEAN_Z, DRIFT_VAR_RATIO, MIN_DRIFT_VALUES, Finding, ModeDrift, drifting_channels
from bnfold.doctor.statistics import LayerStats
from bnfold.tf.graph import GraphIndex
from bnfold.tf.recognize import FUSED_BN_OPS
from bnfold.tf.runsafety import check_runnable, is_trusted


# -- drift on the user's data ----------------------------------------------------
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
    measured = drifting_channels(stat, value)
    if measured is None:
        return None
    z, ratio, bad = measured
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
