"""The result of a fold, in every format: what each stage did, for the report and the API.

Imports no framework at run time, so an ONNX-only or Keras-only run builds it
without TensorFlow.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bnfold.core.comparison import Verification
from bnfold.core.foldmath import SiteRecord


@dataclass
class FoldResult:
    """The folded graph, one record per BN site, op counts, and the verification."""

    graph_def: Any | None  # a tensorflow GraphDef  # None when the input was ONNX (bnfold in.onnx out.onnx)
    sites: list[SiteRecord]
    inputs: list[str]
    outputs: list[str]
    ops_before: dict[str, int] = field(default_factory=dict)
    ops_after: dict[str, int] = field(default_factory=dict)
    verification: Verification | None = None
    source: str = "<GraphDef>"
    onnx: OnnxStage | None = None  # ONNX output: tf2onnx conversion, ONNX-side fold, name mapping
    switches: list[Resolution] = field(default_factory=list)  # training switches resolved before the fold
    training_bn: list[TrainingBnRewrite] = field(default_factory=list)  # --training-bn=moving-stats rewrites
    signature: Signature | None = None  # the source's serving signature (SavedModel/Keras/tf.function input)
    other_normalizations: list[SiteRecord] = field(default_factory=list)  # layer/instance norms: not BN, not counted
    foreign_ops: list[dict[str, str]] = field(default_factory=list)  # nodes bnfold would not run (runsafety): passed through untouched
    unchanged: bool = False  # nothing folded or removed: the input graph is the result, and no check ran
    # Values of large constants left in the model file (bnfold.tf.streaming); graph_def then holds their
    # stubs, and api.write_result splices them in.
    contents: Any = field(default=None, repr=False, compare=False)

    def count(self, action: str) -> int:
        return sum(1 for s in self.sites if s.action == action)

    def to_json(self) -> dict[str, object]:
        return {
            "source": self.source,
            "inputs": self.inputs,
            "outputs": self.outputs,
            "summary": {a: self.count(a) for a in ("folded", "standalone", "skipped")},
            "sites": [s.to_json() for s in self.sites],
            "ops_before": self.ops_before,
            "ops_after": self.ops_after,
            "nodes_before": sum(self.ops_before.values()),
            "nodes_after": sum(self.ops_after.values()),
            "verification": self.verification.to_json() if self.verification else None,
            "onnx": self.onnx.to_json() if self.onnx else None,
            "switches": [r.to_json() for r in self.switches],
            "training_bn": [vars(r) for r in self.training_bn],
            "other_normalizations": [s.to_json() for s in self.other_normalizations],
            "foreign_ops": self.foreign_ops,
            "unchanged": self.unchanged or bool(self.onnx and self.onnx.unchanged),
        }


def result_from_json(data: dict[str, Any]) -> FoldResult:
    """A :class:`FoldResult` of a layer-level (Keras) fold again, from :meth:`FoldResult.to_json` as the worker sent it:
    sites, inputs, outputs, layer counts and the verification; a Keras fold has no graph, ONNX stage or switches."""
    from bnfold.core.comparison import OutputCheck

    fields = {f for f in SiteRecord.__dataclass_fields__}
    checks = {f for f in OutputCheck.__dataclass_fields__}
    verification = None
    found = data.get("verification")
    if isinstance(found, dict):
        verification = Verification(
            outputs=[OutputCheck(**{k: v for k, v in o.items() if k in checks}) for o in found.get("outputs", [])],
            inputs=dict(found.get("inputs", {})),
            samples=int(found.get("samples", 1)),
            batch_independent=found.get("batch_independent"),
            batch_error=found.get("batch_error"),
            notes=list(found.get("notes", [])),
        )
    return FoldResult(
        graph_def=None,
        sites=[SiteRecord(**{k: v for k, v in s.items() if k in fields}) for s in data.get("sites", [])],
        inputs=list(data.get("inputs", [])),
        outputs=list(data.get("outputs", [])),
        ops_before=dict(data.get("ops_before", {})),
        ops_after=dict(data.get("ops_after", {})),
        verification=verification,
        source=str(data.get("source", "")),
        other_normalizations=[SiteRecord(**{k: v for k, v in s.items() if k in fields}) for s in data.get("other_normalizations", [])],
        unchanged=bool(data.get("unchanged", False)),
    )


DEFAULT_SIGNATURE = "serving_default"


@dataclass
class Signature:
    """A serving signature: its name, and key -> tensor name in the frozen graph for inputs and outputs."""

    name: str = DEFAULT_SIGNATURE
    inputs: dict[str, str] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)


@dataclass
class OnnxStage:
    """The ONNX half of a run: conversion, the ONNX-side fold, name mapping and external data."""

    opset: int
    converter: str
    sites: list[SiteRecord] = field(default_factory=list)
    ops_before: dict[str, int] = field(default_factory=dict)
    ops_after: dict[str, int] = field(default_factory=dict)
    input_names: dict[str, str] = field(default_factory=dict)
    output_names: dict[str, str] = field(default_factory=dict)
    ir_version: int = 0
    external_input: bool = False  # the input model kept tensors in external data files
    external_data: str | None = None  # the data file written beside OUT, when tensors are written external
    unchanged: bool = False  # nothing to fold: the output is the input model as it was
    # Serialized size of the folded model when onnx.checker saw it (None: not measured, or past 2 GB):
    # plan_output decides internal vs external data from it instead of serializing the model again.
    checked_bytes: int | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, object]:
        return {
            "opset": self.opset,
            "ir_version": self.ir_version,
            "converter": self.converter,
            "summary": {a: sum(1 for s in self.sites if s.action == a) for a in ("folded", "standalone", "skipped")},
            "sites": [s.to_json() for s in self.sites],
            "ops_before": self.ops_before,
            "ops_after": self.ops_after,
            "nodes_before": sum(self.ops_before.values()),
            "nodes_after": sum(self.ops_after.values()),
            "input_names": self.input_names,
            "output_names": self.output_names,
            "external_input": self.external_input,
            "external_data": self.external_data,
            "unchanged": self.unchanged,
        }


@dataclass
class Resolution:
    """A flag that was resolved, to which value, and which conditionals it removed."""

    flag: str
    value: bool
    how: str
    nodes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return {"flag": self.flag, "value": self.value, "how": self.how, "nodes": self.nodes}


@dataclass
class TrainingBnRewrite:
    """One training-mode BN and whether it was switched to its moving statistics."""

    node: str
    rewritten: bool
    detail: str
