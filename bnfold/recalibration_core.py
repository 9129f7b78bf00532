"""What TF and ONNX recalibration share, without TensorFlow: the moments, the records, the report.

:mod:`bnfold.recalibration` (TF graphs, Keras) and :mod:`bnfold.onnx_recalibration`
(onnxruntime) measure the same thing and report it the same way, so a user reads
one table and one JSON whatever the format.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bnfold.errors import VerificationError
from bnfold.findings import DRIFT_MEAN_Z, DRIFT_VAR_RATIO, BnStats, ModeDrift, drift_metrics


@dataclass
class Moments:
    """Per-channel count, mean and sum of squared deviations in float64, merged batch by batch (Chan et al.)."""

    count: int = 0
    mean: np.ndarray | None = None
    m2: np.ndarray | None = None

    def add(self, value: np.ndarray, axis: int | None) -> None:
        x = np.asarray(value, np.float64)
        if axis is None:
            flat = x.reshape(-1, 1)
        else:
            flat = np.moveaxis(x, axis, -1).reshape(-1, x.shape[axis])
        if flat.shape[0]:
            mean = flat.mean(axis=0)
            self.merge(flat.shape[0], mean, ((flat - mean) ** 2).sum(axis=0))

    def merge(self, n: int, mean: np.ndarray, m2: np.ndarray) -> None:
        """Add a batch's count, mean and sum of squared deviations (computed in the graph, or by :meth:`add`)."""
        mean, m2 = np.asarray(mean, np.float64).reshape(-1), np.asarray(m2, np.float64).reshape(-1)
        if n == 0:
            return
        if self.mean is None or self.m2 is None:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        if mean.shape != self.mean.shape:
            raise VerificationError(f"--data: a batch gives {mean.size} channel(s) where the one before gave {self.mean.size}")
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta**2 * (self.count * n / total)
        self.count = total

    @property
    def var(self) -> np.ndarray:
        """The biased (population) variance: see the module docstring for why."""
        assert self.m2 is not None
        return self.m2 / max(self.count, 1)


def _summary(values: np.ndarray | None) -> dict[str, float] | None:
    if values is None or not np.size(values):
        return None
    v = np.asarray(values, np.float64)
    return {"min": float(v.min()), "mean": float(v.mean()), "max": float(v.max())}


def drift_score(mean: np.ndarray | None, var: np.ndarray | None, data_mean: np.ndarray, data_var: np.ndarray, eps: float) -> float | None:
    """The doctor's drift score (1 = its threshold) of stored statistics against the data's moments."""
    if mean is None or var is None or mean.size not in (1, data_mean.size) or var.size not in (1, data_var.size):
        return None
    stat = BnStats("", "", np.asarray(mean, np.float64).reshape(-1), np.asarray(var, np.float64).reshape(-1), eps, -1)
    z, ratio = drift_metrics(stat, data_mean, data_var)
    low, high = DRIFT_VAR_RATIO
    bad = (z > DRIFT_MEAN_Z) | (ratio < low) | (ratio > high)
    return ModeDrift(float(np.max(z)), float(np.min(ratio)), float(np.max(ratio)), int(bad.sum()), int(bad.size)).score


@dataclass
class LayerRecord:
    """One BN in the report: what it had, what it got, and the evidence."""

    name: str
    node: str
    form: str
    level: int
    action: str  # "recalibrated" or "kept"
    values_per_channel: int
    old_mean: dict[str, float] | None
    old_var: dict[str, float] | None
    new_mean: dict[str, float] | None
    new_var: dict[str, float] | None
    drift_before: float | None
    drift_after: float | None
    reason: str = ""

    def to_json(self) -> dict[str, object]:
        return dict(self.__dict__)


@dataclass
class RecalibrationResult:
    """The recalibrated graph and one record per BN, in model order."""

    graph_def: Any  # the recalibrated tensorflow GraphDef; None for ONNX (see onnx_model)
    layers: list[LayerRecord]
    inputs: list[str]
    outputs: list[str]
    source: str
    samples: int
    passes: int
    batch_sizes: list[int] = field(default_factory=list)
    signature: Any = None
    notes: list[str] = field(default_factory=list)
    # the new statistics by BN node, shaped as the graph holds them
    values: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False)
    onnx_model: Any = field(default=None, repr=False)  # the recalibrated onnx.ModelProto, for ONNX input
    # resolved training flags that stay inputs of the graph (the signature keeps them), with the value they were resolved to
    flag_feeds: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def recalibrated(self) -> int:
        return sum(1 for r in self.layers if r.action == "recalibrated")

    def to_json(self) -> dict[str, object]:
        return {
            "source": self.source,
            "samples": self.samples,
            "passes": self.passes,
            "bn_count": len(self.layers),
            "recalibrated": self.recalibrated,
            "variance": "biased (population): sum((x - mean)^2) / n over all calibration values per channel",
            "layers": [r.to_json() for r in self.layers],
            "notes": self.notes,
        }


def print_report(result: RecalibrationResult, console: Any) -> None:
    """One row per BN: old -> new statistics (mean of channels), drift score before/after, values per channel."""
    from rich.table import Table

    def fmt(s: dict[str, float] | None) -> str:
        return "-" if s is None else f"{s['mean']:.3g} [{s['min']:.3g}, {s['max']:.3g}]"

    def score(v: float | None) -> str:
        return "-" if v is None else (f"[yellow]{v:.2f}[/]" if v > 1 else f"{v:.2f}")

    table = Table(title=f"bnfold recalibrate: {result.source} ({result.samples} samples, {result.passes} passes)")
    for column in (
        "BN layer",
        "form",
        "action",
        "mean: old -> new",
        "variance: old -> new",
        "drift before",
        "drift after",
        "values/channel",
    ):
        table.add_column(column, overflow="fold")
    for r in result.layers:
        action = r.action if not r.reason else f"{r.action}: {r.reason}"
        table.add_row(
            r.name, r.form, action, f"{fmt(r.old_mean)} -> {fmt(r.new_mean)}", f"{fmt(r.old_var)} -> {fmt(r.new_var)}",
            score(r.drift_before), score(r.drift_after), str(r.values_per_channel),
        )  # fmt: skip
    console.print(table)
    console.print(f"{result.recalibrated} of {len(result.layers)} BN layer(s) recalibrated (drift score: 1 = the doctor's threshold)")
    for note in result.notes:
        console.print(f"note: {note}")


def write_json(result: RecalibrationResult, path: Path) -> None:
    import json

    from bnfold.files import atomic_write

    text = json.dumps(result.to_json(), indent=2, default=float)
    atomic_write(path, lambda tmp: tmp.write_text(text + "\n"))
