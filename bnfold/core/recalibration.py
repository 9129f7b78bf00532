"""What TF and ONNX recalibration share, without TensorFlow: the moments, the records, the report.

:mod:`bnfold.recalibration.graph` (TF graphs; Keras through :mod:`bnfold.recalibration.keras`) and :mod:`bnfold.recalibration.onnx`
(onnxruntime) measure the same thing and report it the same way, so a user reads
one table and one JSON whatever the format.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bnfold.core.errors import UsageError, VerificationError
from bnfold.core.findings import DRIFT_MEAN_Z, DRIFT_VAR_RATIO, BnStats, ModeDrift, drift_metrics


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

    from bnfold.core.files import atomic_write

    text = json.dumps(result.to_json(), indent=2, default=float)
    atomic_write(path, lambda tmp: tmp.write_text(text + "\n"))


# -- the data (one piece for TF graphs, Keras and ONNX) -----------------------------------
# Default bytes of one batch's inputs plus the BN inputs it produces (docs/recalibrate.md).
DEFAULT_MEMORY_BUDGET = 1024 * 2**20

# What the API takes as data: arrays per input (list in input order, or by name), an iterable of batches, a tf.data.Dataset.
Data = Any


def _is_arrays(data: Data) -> bool:
    if isinstance(data, np.ndarray):
        return True
    if isinstance(data, (list, tuple)) and data and all(isinstance(d, np.ndarray) for d in data):
        return True
    return isinstance(data, Mapping) and all(isinstance(v, np.ndarray) for v in data.values())


def _is_dataset(data: Data) -> bool:
    """A ``tf.data.Dataset``, told without importing TensorFlow (a caller holding one has imported it)."""
    tf = sys.modules.get("tensorflow")
    data_module = getattr(tf, "data", None) if tf is not None else None
    dataset = getattr(data_module, "Dataset", None)
    return dataset is not None and isinstance(data, dataset)


def _batches_of(data: Data, names: list[str]) -> Iterable[dict[str, np.ndarray]] | None:
    """An iterable of batches (re-iterable, or None when ``data`` is arrays to slice)."""
    if _is_arrays(data):
        return None
    if _is_dataset(data):
        return _Reiterable(lambda: (_batch_dict(b, names) for b in data.as_numpy_iterator()))
    if isinstance(data, (str, bytes)) or not isinstance(data, Iterable):
        raise UsageError(f"--data: {type(data).__name__} is not arrays, an iterable of batches or a tf.data.Dataset")
    if iter(data) is data:  # a generator: read once, kept in memory for the passes
        return [_batch_dict(b, names) for b in data]
    return _Reiterable(lambda: (_batch_dict(b, names) for b in data))


class _Reiterable:
    def __init__(self, make: Callable[[], Iterator[dict[str, np.ndarray]]]) -> None:
        self.make = make

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return iter(self.make())


def _batch_dict(batch: Any, names: list[str]) -> dict[str, np.ndarray]:
    if isinstance(batch, Mapping):
        return {str(k): np.asarray(v) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        arrays = [np.asarray(b) for b in batch]
        if len(arrays) > len(names):  # (x, y) pairs from a training pipeline: the inputs come first
            arrays = arrays[: len(names)]
        return dict(zip(names, arrays, strict=False))
    return {names[0]: np.asarray(batch)}


def _as_arrays(data: Data, names: list[str]) -> dict[str, np.ndarray]:
    if isinstance(data, np.ndarray):
        data = [data]
    if isinstance(data, Mapping):
        return {str(k): np.asarray(v) for k, v in data.items()}
    if len(data) > len(names):
        raise UsageError(f"--data: {len(data)} arrays for {len(names)} input(s); name them with --data NAME=x.npy")
    return dict(zip(names, data, strict=False))


class Feeder:
    """The calibration data as batches: arrays sliced to the memory budget, or the caller's own batches.

    ``specs``: the model's data inputs in order, ``(name, numpy dtype)``; ``key`` maps
    a name the caller used to an input's name (TensorFlow: ``x:0`` -> ``x``).
    """

    bytes_per_sample: int | None = None

    def __init__(self, specs: list[tuple[str, np.dtype]], data: Data, budget: int, key: Callable[[str], str] = lambda name: name) -> None:
        self.dtypes = dict(specs)
        self.key = key
        names = [name for name, _ in specs]
        self.budget = budget
        self.given = _batches_of(data, names)
        self.arrays = _as_arrays(data, names) if self.given is None else {}
        for name in self.arrays:
            if key(name) not in self.dtypes:
                raise UsageError(f"--data: the model has no input named {name!r}; its inputs are {', '.join(names) or 'none'}")
        sizes = {len(v) for v in self.arrays.values()}
        if len(sizes) > 1:
            raise UsageError(f"--data: the arrays hold different numbers of samples ({sorted(sizes)}); samples go along axis 0")
        self.samples = sizes.pop() if sizes else 0
        if self.given is None and self.samples == 0:
            raise UsageError("--data: no samples; give at least a few hundred along axis 0")
        # the same batches in the same order on every pass (what the kept tensors of a pass need)
        self.stable = self.given is None or isinstance(self.given, list)

    def total_samples(self) -> int:
        if self.given is None:
            return self.samples
        if isinstance(self.given, list):
            return sum(len(next(iter(b.values()))) for b in self.given if b)
        return 0

    def _cast(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {}
        for name, value in batch.items():
            want = self.dtypes.get(self.key(name))
            if want is not None and value.dtype != want and np.issubdtype(value.dtype, np.number) and np.issubdtype(want, np.number):
                value = value.astype(want)
            out[name] = value
        return out

    def size_batches(self, probe: Callable[[dict[str, np.ndarray]], list[np.ndarray]]) -> None:
        """Run one sample through ``probe`` (which fetches every BN input): its inputs and those activations size the batches.

        A batch of arrays then holds ``budget // bytes_per_sample`` samples, so one
        batch's inputs plus every BN input it produces stay within the budget (a
        proxy for what the runtime holds while it runs the batch). The caller's own
        batches are used as they come.
        """
        if self.given is not None:
            return
        one = self._cast({k: v[:1] for k, v in self.arrays.items()})
        values = probe(one)
        self.bytes_per_sample = max(1, sum(np.asarray(v).nbytes for v in values) + sum(v.nbytes for v in one.values()))

    @property
    def batch_size(self) -> int | None:
        """Samples per batch cut from arrays (None for the caller's own batches)."""
        return None if self.given is not None else max(1, self.budget // (self.bytes_per_sample or 1))

    def batches(self) -> Iterator[dict[str, np.ndarray]]:
        """The data in batches: the caller's own, or arrays cut to the memory budget."""
        if self.given is not None:
            for batch in self.given:
                yield self._cast(batch)
            return
        size = self.batch_size or 1
        for start in range(0, self.samples, size):
            yield self._cast({k: v[start : start + size] for k, v in self.arrays.items()})
