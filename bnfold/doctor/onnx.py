"""``bnfold doctor model.onnx``: the BN misuse an exported ONNX file still shows, without TensorFlow.

An ONNX export keeps the traces that matter: ``training_mode=1`` (the model was
exported in train mode, so it normalizes with each batch's statistics),
statistics still at their initial 0/1 (the running averages were never
updated), and, on the user's data (``--data``), inputs whose statistics drift
from the stored ones. Codes, severities, exit codes, table and JSON are the
TensorFlow doctor's (:mod:`bnfold.core.findings`), so scripts read both alike.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper

from bnfold.core.errors import UsageError, VerificationError, first_line
from bnfold.core.findings import (  # noqa: F401  (print_report/write_json re-exported for the CLI)
    BnStats,
    DoctorReport,
    Finding,
    add_recalibrate_line,
    at_init_finding,
    drift_finding,
    print_report,
    sort_findings,
    unfoldable_findings,
    write_json,
)
from bnfold.onnx.fold import fold_model
from bnfold.onnx.io import OrtRunner, check_allowlist, input_specs, load_onnx
from bnfold.onnx.recognize import ModelIndex


@dataclass
class Report(DoctorReport):
    """The shared report; ``drift`` and ``notes`` keep the TF doctor's JSON keys."""

    drift: list[Any] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return {**super().to_json(), "drift": list(self.drift), "notes": self.notes}


def check_bn_nodes(model: onnx.ModelProto) -> tuple[list[Finding], list[BnStats], int]:
    """BN_TRAINING_MODE and BN_STATS_AT_INIT; the statistics of each inference-mode BN for the drift check."""
    probe = ModelIndex(model)
    findings: list[Finding] = []
    stats: list[BnStats] = []
    count = 0
    for node in model.graph.node:
        if node.op_type != "BatchNormalization":
            continue
        count += 1
        name = node.name or node.output[0]
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("training_mode", 0):
            findings.append(
                Finding(
                    "BN_TRAINING_MODE",
                    "error",
                    [name],
                    "BatchNormalization has training_mode=1, so it normalizes with the statistics of each batch at inference: "
                    "predictions change with batch size and batch contents.",
                    "export in eval mode (PyTorch: model.eval() before torch.onnx.export, and not training=TrainingMode.TRAINING)",
                    {"form": "BatchNormalization"},
                )
            )
        mean = probe.const(node.input[3]) if len(node.input) > 4 else None
        var = probe.const(node.input[4]) if len(node.input) > 4 else None
        if mean is None or var is None:
            continue
        eps = float(attrs.get("epsilon", 1e-5))  # type: ignore[arg-type]
        stat = BnStats(name, node.input[0], np.asarray(mean, np.float64).reshape(-1), np.asarray(var, np.float64).reshape(-1), eps, 1)
        finding = at_init_finding(stat)
        if finding is not None:
            findings.append(finding)
        if not attrs.get("training_mode", 0):
            stats.append(stat)
    return findings, stats, count


def check_unfoldable(model: onnx.ModelProto) -> list[Finding]:
    """BN_UNFOLDABLE: what the folder would skip, and why (from the folder's own records)."""
    _, records = fold_model(model)
    return unfoldable_findings(records, "{form}", "model")


def check_drift(model: onnx.ModelProto, stats: list[BnStats], feeds: dict[str, np.ndarray]) -> list[Finding]:
    """BN_STATS_DRIFT: each BN's input on the user's data (run in onnxruntime) against its stored statistics."""
    if not stats:
        return []
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    types = ModelIndex(model).types
    have = {o.name for o in probe.graph.output}
    for stat in stats:
        if stat.input_ref not in have:
            probe.graph.output.append(helper.make_tensor_value_info(stat.input_ref, types.get(stat.input_ref, onnx.TensorProto.FLOAT), None))
            have.add(stat.input_ref)
    runner = OrtRunner(probe)
    try:
        values = runner.run([s.input_ref for s in stats], feeds)
    except runner.errors as exc:
        raise VerificationError(f"--data: could not run the model on the data: {first_line(exc)}") from None
    finally:
        runner.close()
    return [f for stat, value in zip(stats, values, strict=True) if (f := drift_finding(stat, np.asarray(value))) is not None]


def _data_feeds(model: onnx.ModelProto, data: dict[str, np.ndarray] | list[np.ndarray] | None) -> dict[str, np.ndarray]:
    if not data:
        return {}
    specs = input_specs(model)
    if isinstance(data, dict):
        for name in data:
            if name not in {s.name for s in specs}:
                raise UsageError(f"--data: {name!r} is not an input of the model (it has {', '.join(s.name for s in specs)})")
        return dict(data)
    if len(data) > len(specs):
        raise UsageError(f"--data: {len(data)} arrays for {len(specs)} input(s); name them with --data NAME=x.npy")
    return {spec.name: np.asarray(value, dtype=spec.dtype) for spec, value in zip(specs, data, strict=False)}


def diagnose(
    source: str | os.PathLike[str] | onnx.ModelProto,
    *,
    data: dict[str, np.ndarray] | list[np.ndarray] | None = None,
    set_flags: dict[str, bool] | None = None,
    outputs: list[str] | None = None,
    **_tf_only: object,
) -> Report:
    """Check an ONNX model for BN misuse; ``data`` (arrays per input) enables the drift check.

    ``set_flags``, ``--checkpoint`` and ``--train-op`` are TensorFlow notions (an
    ONNX graph has no training switch); ``set_flags`` is refused rather than ignored.
    """
    if set_flags:
        raise UsageError("--set: an ONNX model has no training switches; the flag applies to TensorFlow graphs")
    for option, value in _tf_only.items():
        if value not in (None, False, [], ()):
            if option != "trust_model":
                raise UsageError(f"--{option.replace('_', '-')}: applies to TensorFlow checkpoints, not to ONNX files")
    from bnfold.core.trust import trusting

    with trusting(bool(_tf_only.get("trust_model"))):
        if isinstance(source, onnx.ModelProto):
            model, name = source, "<ModelProto>"
            check_allowlist(model, name)
        else:
            model, name = load_onnx(source)[0], str(source)
    if outputs:
        known = [o.name for o in model.graph.output]
        for n in outputs:
            if n not in known:
                raise UsageError(f"--outputs: {n!r} is not a graph output of the ONNX model (it has {', '.join(known)})")
    findings, stats, count = check_bn_nodes(model)
    findings += check_unfoldable(model)
    feeds = _data_feeds(model, data)
    if feeds:
        findings += check_drift(model, stats, feeds)
    import shlex

    model_arg = shlex.quote(name) if not isinstance(source, onnx.ModelProto) else "MODEL.onnx"
    add_recalibrate_line(findings, f"bnfold recalibrate {model_arg} recalibrated.onnx --data x.npy")
    return Report(name, sort_findings(findings), count)


def write_plot(drift: object, path: Path) -> None:
    raise UsageError(f"--plot {path}: the drift plot is drawn for TensorFlow models only; use --json for ONNX files")
