"""``bnfold IN out.onnx``: fold, convert with tf2onnx, fold again on the ONNX side, check in onnxruntime.

The TF fold runs first (as for ``.pb`` output), tf2onnx converts the folded
graph, and :mod:`bnfold.onnx_fold` removes what tf2onnx's own patterns leave
behind. The result is checked with ``onnx.checker`` and run in onnxruntime with
graph optimizations *disabled* against the original TensorFlow graph, so the
check proves the file itself is folded and correct, not that a runtime happens
to fold it at load time. ONNX input (``bnfold in.onnx out.onnx``) skips the TF
stages and compares original and folded ONNX, both in onnxruntime.

Names: tf2onnx's default is kept, so TF tensor ``x:0`` (node ``x``) is ONNX
input/output ``x:0``. ``input_names``/``output_names`` in the report map each.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from google.protobuf import message
from tensorflow.core.framework import graph_pb2

from bnfold import io
from bnfold.errors import InputError, UsageError, VerificationError, first_line
from bnfold.folding import SiteRecord
from bnfold.freeze import load
from bnfold.graph import parse_input
from bnfold.onnx_fold import fold_model, op_counts
from bnfold.verification import (
    CheckOptions,
    InputSpec,
    compare_runners,
    failure_message,
    find_inputs,
    needed_inputs,
    open_graph_runner,
)

# tf2onnx 1.17 prefers opset 15 and converts up to 18; 17 is the newest that every
# onnxruntime >= 1.14 and most edge runtimes (TensorRT 8.6, OpenVINO, TFLite converters) load.
DEFAULT_OPSET = 17
MIN_OPSET, MAX_OPSET = 9, 18
ONNX_SUFFIX = ".onnx"

Source = graph_pb2.GraphDef | onnx.ModelProto | str | os.PathLike


@dataclass
class OnnxStage:
    """The ONNX half of a run: conversion, the ONNX-side fold, and name mapping."""

    opset: int
    converter: str
    sites: list[SiteRecord] = field(default_factory=list)
    ops_before: dict[str, int] = field(default_factory=dict)
    ops_after: dict[str, int] = field(default_factory=dict)
    input_names: dict[str, str] = field(default_factory=dict)
    output_names: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        return {
            "opset": self.opset,
            "converter": self.converter,
            "summary": {a: sum(1 for s in self.sites if s.action == a) for a in ("folded", "standalone", "skipped")},
            "sites": [s.to_json() for s in self.sites],
            "ops_before": self.ops_before,
            "ops_after": self.ops_after,
            "nodes_before": sum(self.ops_before.values()),
            "nodes_after": sum(self.ops_after.values()),
            "input_names": self.input_names,
            "output_names": self.output_names,
        }


def is_onnx_path(path: str | os.PathLike | None) -> bool:
    return path is not None and Path(path).suffix.lower() == ONNX_SUFFIX


def load_onnx(path: str | os.PathLike) -> onnx.ModelProto:
    """Parse and check an ONNX file; anything unusable is an :class:`InputError` (exit 3)."""
    path = Path(path)
    data = io.read_bytes(path)
    if not data:
        raise InputError(f"{path}: file is empty")
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (message.DecodeError, RuntimeWarning) as exc:
        raise InputError(f"{path}: not an ONNX model ({first_line(exc)}); pass a .onnx file written by an ONNX exporter") from None
    _check_input_model(model, str(path))
    return model


def _check_input_model(model: onnx.ModelProto, source: str) -> None:
    if not model.graph.node:
        raise InputError(f"{source}: the ONNX model has no nodes (empty, truncated or not ONNX)")
    try:
        onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, ValueError) as exc:
        raise InputError(f"{source}: invalid ONNX model: {first_line(exc)}") from None


@contextmanager
def _quiet_converter():  # type: ignore[no-untyped-def]
    """tf2onnx logs every pass at INFO and TF warns about its deprecated freeze API; keep bnfold's output readable."""
    loggers = [logging.getLogger(n) for n in ("tf2onnx", "tensorflow")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def convert(graph_def: graph_pb2.GraphDef, inputs: list[str], outputs: list[str], opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """tf2onnx's own converter on a frozen graph; ``inputs``/``outputs`` are TF node or tensor names."""
    import tf2onnx

    with _quiet_converter():
        try:
            model, _ = tf2onnx.convert.from_graph_def(
                graph_def, input_names=[tensor_name(n) for n in inputs], output_names=[tensor_name(n) for n in outputs], opset=opset
            )
        except Exception as exc:  # noqa: BLE001 - tf2onnx raises bare ValueError/RuntimeError/AssertionError for graphs it cannot convert
            raise InputError(f"tf2onnx cannot convert the graph at opset {opset}: {first_line(exc)}; try another --opset") from None
    return model


def tensor_name(ref: str) -> str:
    """``x`` -> ``x:0``: tf2onnx names ONNX inputs and outputs after TF tensors."""
    name, index, _ = parse_input(ref)
    return f"{name}:{index}"


def check_opset(opset: int) -> None:
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise UsageError(f"--opset {opset}: tf2onnx converts opsets {MIN_OPSET} to {MAX_OPSET} (default {DEFAULT_OPSET})")


# -- onnxruntime verification ----------------------------------------------------------


class OrtRunner:
    """One onnxruntime session with graph optimizations off, fed and fetched by caller-side names."""

    # onnxruntime's errors (InvalidArgument, Fail, ...) derive from Exception directly.
    errors: tuple[type[BaseException], ...] = (Exception,)

    def __init__(self, model: onnx.ModelProto, names: dict[str, str] | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise VerificationError(f"onnxruntime cannot load the model: {first_line(exc)}") from None
        self.names = names or {}
        self.inputs = {i.name for i in self.session.get_inputs()}

    def run(self, fetches: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        mapped = {self.names.get(k, k): v for k, v in feeds.items()}
        return self.session.run([self.names.get(f, f) for f in fetches], {k: v for k, v in mapped.items() if k in self.inputs})

    def close(self) -> None:
        del self.session


def onnx_input_specs(model: onnx.ModelProto) -> list[Any]:
    """Graph inputs that are not initializers, as :class:`~bnfold.comparison.InputSpec`."""
    inits = {t.name for t in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in inits:
            continue
        tensor = value.type.tensor_type
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type))
        shape = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim] if tensor.HasField("shape") else None
        specs.append(InputSpec(value.name, dtype, shape))
    return specs


def _check_feeds(feeds: dict[str, np.ndarray] | None, allowed: set[str]) -> None:
    for name in feeds or {}:
        if name not in allowed and parse_input(name)[0] not in allowed:
            raise UsageError(f"--feed: {name!r} is not an input of the model; ONNX output can only be fed at its inputs")


def to_onnx(
    source: Source,
    inputs: list[str] | None = None,
    outputs: list[str] | None = None,
    *,
    opset: int = DEFAULT_OPSET,
    verify_outputs: bool = True,
    feeds: dict[str, np.ndarray] | None = None,
    input_shapes: dict[str, list[int]] | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    samples: int = 1,
    seed: int = 0,
    force: bool = False,
    on_batch: Callable[[int, int], None] | None = None,
) -> tuple[onnx.ModelProto, Any]:
    """A folded, checked ``onnx.ModelProto`` and its :class:`~bnfold.api.FoldResult`.

    ``source`` is a frozen GraphDef (or ``.pb``/``.pbtxt`` path), or an ONNX model
    (or ``.onnx`` path). ``verify_outputs`` runs the result in onnxruntime with
    optimizations off against the original (TF graph in TF, or ONNX model in
    onnxruntime) and raises :class:`~bnfold.errors.VerificationError` when it
    differs, unless ``force``. ``result.onnx`` holds the ONNX stage's sites,
    op counts and name mapping.
    """
    check = CheckOptions(dict(feeds or {}), input_shapes or {}, rtol, atol, samples, seed, on_batch=on_batch)
    if isinstance(source, onnx.ModelProto) or (not isinstance(source, graph_pb2.GraphDef) and is_onnx_path(source)):
        return _onnx_to_onnx(source, inputs, outputs, verify_outputs, check, force)
    check_opset(opset)
    from bnfold import api

    loaded = load(source)
    graph_def, name = loaded.graph_def, loaded.source
    _check_feeds(feeds, {s.name for s in find_inputs(graph_def)} | set(inputs or []))
    # The TF stage is exactly the .pb fold (same canonicalization, same records); the
    # check that matters is the one below, of the ONNX file against the original graph.
    result = api.fold(graph_def, inputs, outputs, verify_outputs=False, feeds=feeds)
    result.source = name
    in_names, out_names = result.inputs, result.outputs
    if not out_names:
        raise InputError(f"{name}: the graph has no outputs; name them with --outputs")
    converted = convert(result.graph_def, in_names, out_names, opset)
    names = {n: tensor_name(n) for n in [*in_names, *out_names]}
    model, onnx_sites = fold_model(converted, set(names.values()))
    result.onnx = OnnxStage(
        opset=opset,
        converter=f"tf2onnx {_tf2onnx_version()}",
        sites=onnx_sites,
        ops_before=op_counts(converted),
        ops_after=op_counts(model),
        input_names={n: names[n] for n in in_names},
        output_names={n: names[n] for n in out_names},
    )
    _check_output_model(model, name, result)
    if verify_outputs:
        needed = needed_inputs(graph_def, out_names, set())
        specs = [s for s in find_inputs(graph_def) if s.name in in_names]
        specs = [s for s in specs if s.name in needed]
        result.verification = compare_runners(
            lambda: open_graph_runner(graph_def, "the input graph"),
            lambda: OrtRunner(model, names),
            {s.name: s for s in specs},
            out_names,
            check,
        )
        _raise_if_failed(result, name, force)
    return model, result


def _onnx_to_onnx(
    source: onnx.ModelProto | str | os.PathLike,
    inputs: list[str] | None,
    outputs: list[str] | None,
    verify_outputs: bool,
    check: CheckOptions,
    force: bool,
) -> tuple[onnx.ModelProto, Any]:
    from bnfold import api

    if isinstance(source, onnx.ModelProto):
        original, name = source, "<ModelProto>"
        _check_input_model(original, name)
    else:
        original, name = load_onnx(source), str(source)
    specs = onnx_input_specs(original)
    graph_outputs = [o.name for o in original.graph.output]
    for option, given, known in (("--inputs", inputs, [s.name for s in specs]), ("--outputs", outputs, graph_outputs)):
        for n in given or []:
            if n not in known:
                raise UsageError(f"{option}: {n!r} is not a graph {option[2:-1]} of the ONNX model (it has {', '.join(known)})")
    in_names = inputs or [s.name for s in specs]
    out_names = outputs or graph_outputs
    _check_feeds(check.feeds, {s.name for s in specs})
    model, sites = fold_model(original)
    opset = next((o.version for o in original.opset_import if o.domain in ("", "ai.onnx")), 0)
    stage = OnnxStage(
        opset=opset,
        converter="none (ONNX input)",
        sites=sites,
        ops_before=op_counts(original),
        ops_after=op_counts(model),
        input_names={n: n for n in in_names},
        output_names={n: n for n in out_names},
    )
    result = api.FoldResult(
        graph_def=None,  # type: ignore[arg-type]
        sites=sites,
        inputs=in_names,
        outputs=out_names,
        ops_before=stage.ops_before,
        ops_after=stage.ops_after,
        source=name,
    )
    result.onnx = stage
    _check_output_model(model, name, result)
    if verify_outputs:
        result.verification = compare_runners(
            lambda: OrtRunner(original),
            lambda: OrtRunner(model),
            {s.name: s for s in specs if s.name in in_names},
            out_names,
            check,
        )
        _raise_if_failed(result, name, force)
    return model, result


def _check_output_model(model: onnx.ModelProto, name: str, result: Any) -> None:
    try:
        onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, ValueError) as exc:
        raise VerificationError(f"{name}: the folded ONNX model fails onnx.checker: {first_line(exc)}", result) from None


def _raise_if_failed(result: Any, name: str, force: bool) -> None:

    if not result.verification.passed and not force:
        raise VerificationError(f"{name}: onnxruntime verification failed: {failure_message(result.verification)}", result)


def _tf2onnx_version() -> str:
    import tf2onnx

    return tf2onnx.__version__


def write_onnx(model: onnx.ModelProto, dst: str | os.PathLike) -> None:
    """Serialize deterministically and write atomically (temporary file, then rename)."""
    data = model.SerializeToString(deterministic=True)
    io.atomic_write(Path(dst), lambda tmp: tmp.write_bytes(data))


def fold_file_onnx(src: str | os.PathLike, dst: str | os.PathLike, *, in_place: bool = False, **options: Any) -> Any:
    """``bnfold.fold_file(src, "x.onnx")``: fold, convert, check, verify, then write atomically."""
    src_path, dst_path = Path(src), Path(dst)
    if not is_onnx_path(dst_path):
        raise UsageError(f"{dst}: ONNX input is written as ONNX; give an output path ending in .onnx")
    io.check_output_path(src_path, dst_path, in_place)
    model, result = to_onnx(src_path, **options)
    write_onnx(model, dst_path)
    return result


def print_stage(result: Any, console: Any) -> None:
    """The ONNX stage as the same tables as the TF stage (sites, op counts), when there is one."""
    stage = getattr(result, "onnx", None)
    if stage is None or result.graph_def is None:
        return  # ONNX input: the main tables already are the ONNX stage
    from bnfold import api, report

    view = api.FoldResult(
        graph_def=None,
        sites=stage.sites,
        inputs=list(stage.input_names.values()),
        outputs=list(stage.output_names.values()),
        ops_before=stage.ops_before,
        ops_after=stage.ops_after,
        source=f"ONNX from {stage.converter}, opset {stage.opset}",
    )
    if view.sites:
        console.print(report.sites_table(view))
    table = report.ops_table(view)
    table.title = "ONNX op counts (tf2onnx output -> written file)"
    console.print(table)
    names = ", ".join(f"{k} -> {v}" for k, v in {**stage.input_names, **stage.output_names}.items())
    console.print(f"ONNX names: {names}")
