"""``bnfold recalibrate``, for any model bnfold reads: the format decides which recalibration runs.

The measurement itself is per format: :mod:`bnfold.recalibration.graph` (a
frozen TensorFlow graph, which is what a SavedModel, a Keras model and a TF1
checkpoint become), :mod:`bnfold.recalibration.onnx` (onnxruntime, no
TensorFlow) and :mod:`bnfold.recalibration.keras` (a Keras file written back as
Keras, measured on its graph). The functions here only pick one, so
``bnfold.recalibrate`` and ``bnfold.recalibrate_file`` have one entry point;
every import is inside them, so reading an ONNX model does not load TensorFlow.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from bnfold.core.errors import UsageError
from bnfold.core.formats import is_keras_path
from bnfold.core.recalibration import DEFAULT_MEMORY_BUDGET, Data, RecalibrationResult


def recalibrate(
    source: Any,
    data: Data,
    *,
    outputs: list[str] | None = None,
    set_flags: dict[str, bool] | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    trust_model: bool = False,
) -> RecalibrationResult:
    """Recompute the moving statistics of every BN in ``source`` from ``data``; the source is never modified.

    ``source`` is anything ``bnfold.fold`` takes (a GraphDef, a ``.pb``/``.pbtxt``,
    a SavedModel, a ``.keras``/``.h5`` file or a Keras model), an ONNX model or
    ``.onnx`` path (``result.onnx_model``), or a TF1 checkpoint
    (``model.ckpt-N`` with its ``.meta``, or a ``.meta`` and ``checkpoint``) whose
    inference path ``outputs`` names. ``data`` is one array per input (a list in
    input order, or a dict by input name), an iterable of batches (arrays, tuples
    or dicts; ``(x, y)`` pairs use ``x``), or a ``tf.data.Dataset``; samples go along
    axis 0. Arrays are cut into batches whose inputs and fetched BN inputs fit
    ``memory_budget`` bytes. The model runs in bnfold's isolated worker under the
    same rules as ``doctor --data`` (docs/security.md).
    """
    from bnfold.recalibration.graph import recalibrate_graph
    from bnfold.sources import load
    from bnfold.tf.graph import parse_input
    from bnfold.tf.runsafety import trusting

    if type(source).__name__ == "ModelProto" or (isinstance(source, (str, os.PathLike)) and str(source).lower().endswith(".onnx")):
        from bnfold.recalibration.onnx import recalibrate_onnx

        if outputs or set_flags or checkpoint:
            raise UsageError("--outputs/--set/--checkpoint apply to TensorFlow models, not to ONNX files")
        model, onnx_result = recalibrate_onnx(source, data, memory_budget=memory_budget, trust_model=trust_model)
        onnx_result.onnx_model = model
        return onnx_result
    if isinstance(source, (str, os.PathLike)) and (checkpoint is not None or _is_checkpoint(Path(source))):
        from bnfold.doctor import training as tg

        if not outputs:
            raise UsageError(f"{source}: a TF1 checkpoint needs --outputs naming its inference outputs")
        artifacts = tg.open_artifacts(Path(source), Path(checkpoint) if checkpoint is not None else None)
        graph_def, name, signature = tg.freeze_inference_path(artifacts, outputs), artifacts.source, None
    else:
        loaded = load(source, trust_model=trust_model)
        graph_def, name, signature = loaded.graph_def, loaded.source, loaded.signature
        if outputs is None and signature is not None:
            outputs = [parse_input(t)[0] for t in signature.outputs.values()]
    with trusting(trust_model):
        result = recalibrate_graph(graph_def, data, set_flags=set_flags, outputs=outputs, memory_budget=memory_budget, source=name)
    result.signature = signature
    return result


def _is_checkpoint(path: Path) -> bool:
    from bnfold.doctor.training import is_checkpoint

    return is_checkpoint(path)


def write(result: RecalibrationResult, dst: str | os.PathLike[str], opset: int | None = None) -> None:
    """Write the recalibrated graph in any format bnfold writes (.pb, .pbtxt, .onnx, SavedModel directory); atomically."""
    from bnfold.core.formats import check_output_format, is_onnx_path
    from bnfold.core.result import FoldResult
    from bnfold.tf.graph import op_counts
    from bnfold.tf.io import write_result

    check_output_format(dst)
    if is_onnx_path(dst):
        from bnfold.onnx import export as onnx_export
        from bnfold.onnx.io import write_onnx

        model = onnx_export.convert(result.graph_def, result.inputs, result.outputs, opset or onnx_export.DEFAULT_OPSET)
        write_onnx(model, dst)
        return
    counts = op_counts(result.graph_def)
    write_result(
        FoldResult(result.graph_def, [], result.inputs, result.outputs, counts, counts, source=result.source, signature=result.signature),
        dst,
    )


def recalibrate_file(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    data: Data,
    *,
    opset: int | None = None,
    in_place: bool = False,
    **options: Any,
) -> RecalibrationResult:
    """Recalibrate ``src`` and write ``dst`` atomically; ``dst``'s suffix picks the format, as for ``bnfold.fold_file``.

    Nothing is written when recalibration fails, and ``dst`` may not be ``src`` unless ``in_place``.
    """
    from bnfold.core.files import check_output_path
    from bnfold.core.formats import check_output_format, is_onnx_path, is_saved_model_destination

    check_output_format(dst)
    check_output_path(Path(src), Path(dst), in_place, directory=is_saved_model_destination(dst))
    if is_onnx_path(src):
        from bnfold.recalibration.onnx import recalibrate_onnx_file

        return recalibrate_onnx_file(Path(src), Path(dst), data, **options)
    if is_keras_path(dst):
        if not is_keras_path(src):
            raise UsageError(f"{dst}: Keras output needs a Keras model (.keras/.h5) as input; write .pb, .pbtxt, .onnx or a SavedModel")
        from bnfold.recalibration.keras import recalibrate_keras_file

        return recalibrate_keras_file(Path(src), Path(dst), data, **options)
    result = recalibrate(src, data, **options)
    write(result, dst, opset)
    return result
