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
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from bnfold.comparison import CheckOptions, compare_runners, parse_input
from bnfold.errors import InputError, UsageError, first_line
from bnfold.files import check_output_path
from bnfold.onnx_api import check_feeds as _check_feeds
from bnfold.onnx_api import check_output_model as _check_output_model
from bnfold.onnx_api import fold_onnx, fold_onnx_file, plan_output, raise_if_failed
from bnfold.onnx_fold import fold_model, op_counts
from bnfold.onnx_io import (  # noqa: F401  (re-exported: this module was their home before the TF-free split)
    ONNX_SUFFIX,
    OnnxStage,
    OrtRunner,
    is_onnx_path,
    write_onnx,
)
from bnfold.onnx_io import input_specs as onnx_input_specs  # noqa: F401

if TYPE_CHECKING:
    from tensorflow.core.framework import graph_pb2

# tf2onnx 1.17 prefers opset 15 and converts up to 18; 17 is the newest that every
# onnxruntime >= 1.14 and most edge runtimes (TensorRT 8.6, OpenVINO, TFLite converters) load.
DEFAULT_OPSET = 17
MIN_OPSET, MAX_OPSET = 9, 18

Source = Any  # a tensorflow GraphDef, an onnx.ModelProto, or a path


def load_onnx(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Parse and check an ONNX file (external data read beside it); see :func:`bnfold.onnx_io.load_onnx`."""
    from bnfold.onnx_io import load_onnx as load

    return load(path)[0]


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
    trust_model: bool = False,
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
    if isinstance(source, onnx.ModelProto) or (isinstance(source, (str, os.PathLike)) and is_onnx_path(source)):
        # ONNX in, ONNX out: no TensorFlow on this path (bnfold.onnx_api).
        return fold_onnx(
            source,
            inputs,
            outputs,
            verify_outputs=verify_outputs,
            feeds=feeds,
            input_shapes=input_shapes,
            rtol=rtol,
            atol=atol,
            samples=samples,
            seed=seed,
            force=force,
            on_batch=on_batch,
        )
    check_opset(opset)
    from bnfold import api
    from bnfold.freeze import load
    from bnfold.runsafety import check_runnable, trusting
    from bnfold.verification import find_inputs, needed_inputs, open_graph_runner

    if verify_outputs:  # the check's worker imports TensorFlow while tf2onnx converts
        from bnfold import isolation

        isolation.prestart()
    loaded = load(source, trust_model=trust_model)
    graph_def, name = loaded.graph_def, loaded.source
    _check_feeds(feeds, {s.name for s in find_inputs(graph_def)} | set(inputs or []))
    # The TF stage is exactly the .pb fold (same canonicalization, same records); the
    # check that matters is the one below, of the ONNX file against the original graph.
    result = api.fold(graph_def, inputs, outputs, verify_outputs=False, feeds=feeds)
    result.source, result.unchanged = name, False  # converted to ONNX: checked below, whatever the TF stage did
    in_names, out_names = result.inputs, result.outputs
    if not out_names:
        raise InputError(f"{name}: the graph has no outputs; name them with --outputs")
    if not trust_model:  # tf2onnx runs grappler's constant folding, which evaluates ops (ReadFile of a constant path...)
        check_runnable(
            result.graph_def,
            out_names,
            f"{name}: converting to ONNX",
            hint="tf2onnx evaluates constant subgraphs with TensorFlow; --trust-model converts it anyway",
        )
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
        with trusting(trust_model):
            result.verification = compare_runners(
                lambda: open_graph_runner(graph_def, "the input graph"),
                lambda: OrtRunner(model, names),
                {s.name: s for s in specs},
                out_names,
                check,
            )
        raise_if_failed(result, name, force)
    return model, result


def _tf2onnx_version() -> str:
    import tf2onnx

    return tf2onnx.__version__


def fold_file_onnx(src: str | os.PathLike, dst: str | os.PathLike, *, in_place: bool = False, **options: Any) -> Any:
    """``bnfold.fold_file(src, "x.onnx")``: fold, convert, check, verify, then write atomically."""
    src_path, dst_path = Path(src), Path(dst)
    if is_onnx_path(src_path):
        return fold_onnx_file(src_path, dst_path, in_place=in_place, **options)
    if not is_onnx_path(dst_path):
        raise UsageError(f"{dst}: give an output path ending in .onnx")
    check_output_path(src_path, dst_path, in_place)
    model, result = to_onnx(src_path, **options)
    write_onnx(model, dst_path, plan_output(result, model, dst_path))
    return result


def print_stage(result: Any, console: Any) -> None:
    """The ONNX stage as the same tables as the TF stage (sites, op counts), when there is one."""
    stage = getattr(result, "onnx", None)
    if stage is None or result.graph_def is None:
        return  # ONNX input: the main tables already are the ONNX stage
    from bnfold import report
    from bnfold.result import FoldResult

    view = FoldResult(
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
