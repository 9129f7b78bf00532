"""Doctor findings shared by the TensorFlow and ONNX doctors, without TensorFlow.

A finding is format-neutral (a code, a severity, node names, why and the fix),
and so are the report, its exit code, its table and its JSON: both
:mod:`bnfold.doctor.graph` (TF graphs) and :mod:`bnfold.doctor.onnx` use these, so a
user sees the same codes and the same exit codes whatever the model's format.
The drift arithmetic (moments per channel against stored statistics) is here
too, for the same reason.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from bnfold.core.errors import EXIT_FINDINGS, EXIT_OK
from bnfold.core.files import atomic_write

if TYPE_CHECKING:
    from collections.abc import Iterable

    from bnfold.core.foldmath import SiteRecord

Severity = Literal["error", "warning", "info"]
SEVERITY_ORDER = {"error": 0, "warning": 1, "info": 2}

# BN_STATS_DRIFT thresholds (docs/doctor.md). A channel drifts when its
# data mean is more than half a stored standard deviation from the moving mean,
# or its data variance is under half or over twice the moving variance.
DRIFT_MEAN_Z = 0.5
DRIFT_VAR_RATIO = (0.5, 2.0)

# Fewer values per channel than this and the data's mean/variance say nothing about drift: one sample of a
# dense layer's output has variance 0 by construction, and its mean lies about 1 std from the moving mean.
MIN_DRIFT_VALUES = 16


@dataclass
class ModeDrift:
    """How far one BN's input statistics on the data lie from its moving statistics, in one mode."""

    max_mean_z: float
    min_var_ratio: float
    max_var_ratio: float
    channels_drifting: int
    channels: int

    @property
    def score(self) -> float:
        """max over channels of max(|dmean| / std / DRIFT_MEAN_Z, |log2(var ratio)|): 1 is the threshold."""
        with np.errstate(all="ignore"):
            spread = max(abs(np.log2(max(self.min_var_ratio, 1e-12))), abs(np.log2(max(self.max_var_ratio, 1e-12))))
        return float(max(self.max_mean_z / DRIFT_MEAN_Z, spread))


@dataclass
class Finding:
    """One problem (or note): stable code, severity, the BN nodes, why it matters, and the fix."""

    code: str
    severity: Severity
    nodes: list[str]
    message: str
    fix: str
    details: dict[str, object] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        return asdict(self)


@dataclass
class DoctorReport:
    """All findings for one graph, sorted by severity."""

    source: str
    findings: list[Finding]
    bn_count: int = 0

    @property
    def exit_code(self) -> int:
        """1 (findings) when anything is at warning level or above, else 0."""
        return EXIT_FINDINGS if any(f.severity in ("error", "warning") for f in self.findings) else EXIT_OK

    def codes(self) -> list[str]:
        return [f.code for f in self.findings]

    def to_json(self) -> dict[str, object]:
        return {
            "source": self.source,
            "bn_count": self.bn_count,
            "exit_code": self.exit_code,
            "findings": [f.to_json() for f in self.findings],
        }


@dataclass
class BnStats:
    """A BN with stored statistics: what drift and at-init checks compare against."""

    name: str
    input_ref: str
    mean: np.ndarray
    var: np.ndarray
    eps: float
    channel_axis: int | None
    # where the stored mean/variance enter the graph, as (node, input slot): what recalibration rewrites
    mean_at: tuple[str, int] | None = None
    var_at: tuple[str, int] | None = None


def at_init_finding(stat: BnStats) -> Finding | None:
    """BN_STATS_AT_INIT when the stored statistics are still exactly the initial 0/1."""
    if not (stat.mean.size and np.all(stat.mean == 0) and np.all(stat.var == 1)):
        return None
    return Finding(
        "BN_STATS_AT_INIT",
        "warning",
        [stat.name],
        f"moving mean is exactly 0 and moving variance exactly 1 on all {stat.mean.size} channels: the moving averages "
        "were never updated, so inference normalizes with placeholder statistics.",
        "run the BN update ops with the train op (TF1: tf.control_dependencies(tf.get_collection(UPDATE_OPS)) or "
        "updates_collections=None; Keras: train with fit or apply layer updates; PyTorch: train in model.train() "
        "with momentum > 0), check that decay/momentum is below 1, then retrain or recompute the statistics",
        {"channels": int(stat.mean.size)},
    )


def unfoldable_findings(records: Iterable[SiteRecord], what: str, where: str) -> list[Finding]:
    """BN_UNFOLDABLE for each site the folder skipped: ``what`` names it (``{form}`` is the record's form), ``where`` it stays."""
    return [
        Finding(
            "BN_UNFOLDABLE",
            "info",
            [r.name],
            f"{what.format(form=r.form)} cannot be folded and stays in the {where}: {r.reason}.",
            "see the other findings for this node; otherwise nothing to do",
            {"form": r.form},
        )
        for r in records
        if r.action == "skipped"
    ]


def channel_moments(value: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and variance over every axis but ``axis`` (all axes when None)."""
    x = np.asarray(value, dtype=np.float64)
    if axis is None:
        return np.array([x.mean()]), np.array([x.var()])
    moved = np.moveaxis(x, axis, -1).reshape(-1, x.shape[axis])
    return moved.mean(axis=0), moved.var(axis=0)


def drift_metrics(stat: BnStats, data_mean: np.ndarray, data_var: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per channel: |data mean - moving mean| / sqrt(moving var + eps), and data var / moving var."""
    mean = np.broadcast_to(stat.mean, data_mean.shape)
    var = np.broadcast_to(stat.var, data_var.shape)
    with np.errstate(all="ignore"):
        z = np.abs(data_mean - mean) / np.sqrt(var + stat.eps)
        ratio = data_var / np.maximum(var, 1e-12)
    return z, ratio


def drifting_channels(stat: BnStats, value: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Per channel of a BN's input ``value`` on the user's data: the mean's z, the variance ratio, and whether either
    is beyond the limits (DRIFT_MEAN_Z, DRIFT_VAR_RATIO); None when its channels do not match the stored statistics."""
    data_mean, data_var = channel_moments(value, stat.channel_axis)
    if stat.mean.size not in (1, data_mean.size):
        return None
    z, ratio = drift_metrics(stat, data_mean, data_var)
    low, high = DRIFT_VAR_RATIO
    return z, ratio, (z > DRIFT_MEAN_Z) | (ratio < low) | (ratio > high)


def drift_finding(stat: BnStats, value: np.ndarray) -> Finding | None:
    """BN_STATS_DRIFT for one BN, from its input ``value`` on the user's data (None when it does not drift)."""
    measured = drifting_channels(stat, value)
    if measured is None or not np.any(measured[2]):
        return None
    z, ratio, bad = measured
    low, high = DRIFT_VAR_RATIO
    worst = int(np.argmax(np.where(bad, z + np.abs(np.log(np.maximum(ratio, 1e-12))), -np.inf)))
    return Finding(
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


# Findings whose cause is wrong stored statistics: ``bnfold recalibrate`` repairs them without retraining.
RECALIBRATE_CODES = {"BN_STATS_AT_INIT", "BN_UPDATES_NOT_RUN", "BN_MOMENTUM_DEGENERATE", "BN_STATS_DRIFT", "BN_TRAINING_MODE"}


def add_recalibrate_line(findings: list[Finding], line: str) -> None:
    """Append the ready-to-run recalibrate command to the fix of each finding that wrong statistics cause."""
    for finding in findings:
        if finding.code in RECALIBRATE_CODES and finding.severity != "info" and "bnfold recalibrate" not in finding.fix:
            finding.fix += (
                f"; or, without retraining, recompute the statistics from a few hundred training samples (x.npy, samples on axis 0): {line}"
            )


def sort_findings(findings: list[Finding]) -> list[Finding]:
    return sorted(findings, key=lambda f: (SEVERITY_ORDER[f.severity], f.code, f.nodes))


def print_report(report: DoctorReport, console: object) -> None:
    """A rich table sorted by severity; a healthy model gets one line saying so."""
    from rich.table import Table

    if not report.findings:
        console.print(f"[green]no BN problems found[/] in {report.source} ({report.bn_count} BN layer(s) checked)")  # type: ignore[attr-defined]
        return
    style = {"error": "red", "warning": "yellow", "info": "cyan"}
    table = Table(title=f"bnfold doctor: {report.source}", show_lines=True)
    for column in ("severity", "code", "nodes", "explanation", "fix"):
        table.add_column(column, overflow="fold")
    for f in report.findings:
        nodes = ", ".join(f.nodes[:4]) + (f" (+{len(f.nodes) - 4})" if len(f.nodes) > 4 else "")
        table.add_row(f"[{style[f.severity]}]{f.severity}[/]", f.code, nodes, f.message, f.fix)
    console.print(table)  # type: ignore[attr-defined]
    counts = {s: sum(1 for f in report.findings if f.severity == s) for s in SEVERITY_ORDER}
    console.print(f"{counts['error']} error(s), {counts['warning']} warning(s), {counts['info']} note(s)")  # type: ignore[attr-defined]


def write_json(report: DoctorReport, path: Path) -> None:
    text = json.dumps(report.to_json(), indent=2, default=float)
    atomic_write(path, lambda tmp: tmp.write_text(text + "\n"))
