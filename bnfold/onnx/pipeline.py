"""``bnfold in.onnx out.onnx``, ``inspect`` and the Python API on ONNX input, without TensorFlow.

A PyTorch user folding an exported file has no use for TensorFlow, so nothing
here imports it: the file is loaded (external data beside the model), folded by
:mod:`bnfold.onnx.fold`, checked with ``onnx.checker`` and compared with the
original in onnxruntime with optimizations off, through the same
:func:`~bnfold.core.comparison.compare_runners` as every other format. A model with
nothing to fold is returned as it was and needs no check.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from bnfold.core.comparison import CheckArgs, CheckOptions, compare_runners, failure_message, parse_input
from bnfold.core.errors import UsageError, VerificationError, first_line
from bnfold.core.files import check_output_path
from bnfold.core.formats import is_onnx_path
from bnfold.core.result import FoldResult, OnnxStage
from bnfold.onnx.fold import fold_model
from bnfold.onnx.io import (
    OrtRunner,
    check_allowlist,
    check_input_model,
    data_file_for,
    input_specs,
    load_onnx,
    needs_external,
    op_counts,
    opset_of,
    serialize_within_limit,
    write_onnx,
)

if TYPE_CHECKING:
    from typing_extensions import Unpack


def check_feeds(feeds: dict[str, np.ndarray] | None, allowed: set[str]) -> None:
    for name in feeds or {}:
        if name not in allowed and parse_input(name)[0] not in allowed:
            raise UsageError(f"--feed: {name!r} is not an input of the model; ONNX output can only be fed at its inputs")


def fold_onnx(
    source: onnx.ModelProto | str | os.PathLike[str],
    inputs: list[str] | None = None,
    outputs: list[str] | None = None,
    **check: Unpack[CheckArgs],
) -> tuple[onnx.ModelProto, FoldResult]:
    """Fold an ONNX model (or ``.onnx`` path); the folded model and its :class:`~bnfold.core.result.FoldResult`.

    ``verify_outputs`` compares the result with the original in onnxruntime
    (optimizations off) and raises :class:`~bnfold.core.errors.VerificationError`
    when they differ, unless ``force``. Dynamic axes get the default-shape rule
    of :func:`bnfold.core.comparison._synthesize`; ``input_shapes`` overrides it.
    """
    return _fold(source, inputs, outputs, CheckOptions.of(check))


def _fold(
    source: onnx.ModelProto | str | os.PathLike[str], inputs: list[str] | None, outputs: list[str] | None, check: CheckOptions
) -> tuple[onnx.ModelProto, FoldResult]:
    external = False
    if isinstance(source, onnx.ModelProto):
        original, name = source, "<ModelProto>"
        check_allowlist(original, name)
        check_input_model(original, name)
    else:
        original, external = load_onnx(source)
        name = str(source)
    specs = input_specs(original)
    graph_outputs = [o.name for o in original.graph.output]
    for option, given, known in (("--inputs", inputs, [s.name for s in specs]), ("--outputs", outputs, graph_outputs)):
        for n in given or []:
            if n not in known:
                raise UsageError(f"{option}: {n!r} is not a graph {option[2:-1]} of the ONNX model (it has {', '.join(known)})")
    in_names = inputs or [s.name for s in specs]
    out_names = outputs or graph_outputs
    check_feeds(check.feeds, {s.name for s in specs})
    model, sites = fold_model(original)
    unchanged = not any(s.action in ("folded", "standalone") for s in sites)
    if unchanged:
        model = original  # nothing to fold: the input as it was, byte for byte in the graph
    stage = OnnxStage(
        opset=opset_of(original),
        converter="none (ONNX input)",
        sites=sites,
        ops_before=op_counts(original),
        ops_after=op_counts(model),
        input_names={n: n for n in in_names},
        output_names={n: n for n in out_names},
        ir_version=original.ir_version,
        external_input=external,
        unchanged=unchanged,
    )
    result = FoldResult(
        graph_def=None,
        sites=sites,
        inputs=in_names,
        outputs=out_names,
        ops_before=stage.ops_before,
        ops_after=stage.ops_after,
        source=name,
    )
    result.onnx = stage
    if unchanged:
        return model, result  # nothing changed, nothing to prove
    check_output_model(model, name, result)
    if check.verify:
        result.verification = compare_runners(
            lambda: OrtRunner(original),
            lambda: OrtRunner(model),
            {s.name: s for s in specs if s.name in in_names},
            out_names,
            check,
        )
        raise_if_failed(result, name, check.force)
    return model, result


def check_output_model(model: onnx.ModelProto, name: str, result: Any) -> None:
    """The folded model must pass onnx.checker and keep the input's opset and IR version.

    The model is serialized once, for the checker, and its size kept in
    ``result.onnx.checked_bytes`` for :func:`plan_output` (upb's ``ByteSize()``
    costs a serialization). Past 2 GB onnx.checker cannot take it in memory, and it
    is not checked, as before.
    """
    data = serialize_within_limit(model)
    stage = getattr(result, "onnx", None)
    if stage is not None:
        stage.checked_bytes = None if data is None else len(data)
    if data is None:
        return
    try:
        onnx.checker.check_model(data)
    except (onnx.checker.ValidationError, ValueError) as exc:
        raise VerificationError(f"{name}: the folded ONNX model fails onnx.checker: {first_line(exc)}", result) from None


def raise_if_failed(result: Any, name: str, force: bool) -> None:
    if not result.verification.passed and not force:
        raise VerificationError(f"{name}: onnxruntime verification failed: {failure_message(result.verification)}", result)


def plan_output(result: FoldResult, model: onnx.ModelProto, dst: Path) -> bool:
    """Decide whether OUT keeps its tensors external; name the data file in the report. Returns that decision."""
    stage = result.onnx
    external = needs_external(model, bool(stage and stage.external_input), stage.checked_bytes if stage is not None else None)
    if stage is not None:
        stage.external_data = str(data_file_for(dst)) if external else None
    return external


def fold_onnx_file(src: str | os.PathLike[str], dst: str | os.PathLike[str], *, in_place: bool = False, **check: Unpack[CheckArgs]) -> FoldResult:
    """Fold ``src`` (.onnx) and write ``dst`` (.onnx, plus ``dst.data`` when tensors stay external) atomically."""
    src_path, dst_path = Path(src), Path(dst)
    if not is_onnx_path(dst_path):
        raise UsageError(f"{dst}: ONNX input is written as ONNX; give an output path ending in .onnx")
    check_output_path(src_path, dst_path, in_place)
    model, result = fold_onnx(src_path, **check)
    write_onnx(model, dst_path, plan_output(result, model, dst_path))
    return result


def print_unchanged(result: FoldResult, console: Any) -> None:
    stage = result.onnx
    if stage is not None and stage.unchanged:
        console.print("nothing to fold: the model is written unchanged (no check needed)")
