"""The Python API: ``fold`` for export pipelines, ``fold_file`` for files, ``to_onnx`` for ONNX output.

On top of the adapters: each function picks the pipeline for its source and
destination (:func:`bnfold.core.formats.route`) and imports that adapter only
then, so ONNX in and ONNX out never imports TensorFlow. Each runs the stages in
one direction: load -> canonicalize -> recognize -> fold -> prune -> verify ->
write. Verification is on by default because the promise is that the written
model computes what the input did.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bnfold.core import sandbox
from bnfold.core import worker as isolation
from bnfold.core.comparison import CheckArgs, CheckOptions
from bnfold.core.errors import UsageError
from bnfold.core.files import check_output_path
from bnfold.core.formats import (  # noqa: F401  (OUTPUT_FORMATS re-exported)
    GRAPH,
    KERAS,
    ONNX,
    OUTPUT_FORMATS,
    check_output_format,
    input_format,
    is_saved_model_destination,
    route,
)
from bnfold.core.result import DEFAULT_SIGNATURE, FoldResult
from bnfold.core.trust import trusting

if TYPE_CHECKING:
    from typing_extensions import Unpack

# A GraphDef, a path (.pb, .pbtxt, SavedModel directory, .keras, .h5), a Keras model, or a tf.function.
GraphSource = Any




def fold(
    source: GraphSource,
    inputs: list[str] | None = None,
    outputs: list[str] | None = None,
    *,
    set_flags: dict[str, bool] | None = None,
    training_bn: str = "keep",
    signature: str = DEFAULT_SIGNATURE,
    trust_model: bool = False,
    stream_constants: bool = False,
    **check: Unpack[CheckArgs],
) -> FoldResult:
    """Fold every BN of a frozen graph into the conv/dense ops around it.

    ``source`` is a ``GraphDef``, a path (``.pb``/``.pbtxt``, a SavedModel
    directory with ``signature``, ``.keras``, ``.h5``), a Keras model or a
    ``tf.function``/``ConcreteFunction``; models are frozen in inference mode
    first. The source is never modified. With ``verify_outputs`` (default) both graphs run on the same
    inputs and a :class:`~bnfold.core.errors.VerificationError` is raised if any
    output differs beyond tolerance, unless ``force`` is given; ``check`` takes the
    check's options (:class:`~bnfold.core.comparison.CheckArgs`).

    Training switches are resolved first (:mod:`bnfold.tf.switches`): conditionals on
    a constant, a ``PlaceholderWithDefault``, ``keras_learning_phase`` or a flag in
    ``set_flags`` (``{"is_training": False}``) keep only the taken branch; the
    original is verified with those flags fed. ``training_bn="moving-stats"``
    rewrites ``is_training=True`` fused BN to use the moving statistics; that
    changes the result on purpose, so verification then compares against the
    rewritten graph.

    Untrusted models (docs/security.md): Keras files whose config carries code
    and graphs whose check would reach outside the process (files, network,
    session resources) raise :class:`~bnfold.core.errors.UnsafeModelError` unless
    ``trust_model``; with ``verify_outputs=False`` nothing runs, and such nodes
    pass through untouched, listed in ``result.foreign_ops``.

    ``stream_constants`` (a binary ``.pb`` path, no check): large constants stay in the
    file and the fold's new weights are computed when written (:mod:`bnfold.tf.streaming`),
    so memory stays near the size of the graph without its weights. The result then
    holds stubs: pass it to :func:`write_result` (which fills them), not to other code.
    """
    from bnfold.sources import load
    from bnfold.tf import io
    from bnfold.tf.freeze import Loaded
    from bnfold.tf.pipeline import fold_loaded

    options = CheckOptions.of(check)
    verify_outputs = options.verify
    if isinstance(source, str | os.PathLike) and (trust_model or not _is_graph_file(source)):
        # The worker loads SavedModel and Keras files (bnfold.sources.load_in_worker); a trusted graph may read its
        # own assets in the check. Allowed before the worker starts: Landlock rules are fixed when it confines itself.
        sandbox.allow_read(source)
    if verify_outputs:  # the check's worker imports TensorFlow while the model is read and folded
        isolation.prestart()
    contents = None
    if stream_constants and not verify_outputs and _is_graph_file(source):
        graph, contents = io.load_graph_def_streaming(source)
        loaded = Loaded(graph, str(source))
    else:
        loaded = load(source, signature, trust_model=trust_model)
    return fold_loaded(
        loaded,
        inputs,
        outputs,
        options,
        set_flags=set_flags,
        training_bn=training_bn,
        trust_model=trust_model,
        owned=loaded.graph_def is not source,
        contents=contents,
    )


def _is_graph_file(source: GraphSource) -> bool:
    """A path :func:`bnfold.sources.load` reads as a GraphDef file (not a SavedModel directory or a Keras file)."""
    return isinstance(source, str | os.PathLike) and Path(source).is_file() and input_format(source) == GRAPH


def fold_file(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    in_place: bool = False,
    **options: object,
) -> FoldResult:
    """Fold ``src`` and write ``dst`` atomically; its suffix picks the format (.pb, .pbtxt, .onnx, else a SavedModel directory).

    Nothing is written when verification fails (unless ``force=True``) and ``dst``
    may not be ``src`` unless ``in_place=True``. An ``.onnx`` source or destination
    goes through :func:`bnfold.onnx.export.to_onnx` (options such as ``opset`` too).
    """
    check_output_format(dst)
    src_path, dst_path = Path(src), Path(dst)
    pipeline = route(src_path, dst_path)
    if pipeline == KERAS:
        from bnfold.keras.file import fold_keras_file  # the layer-level fold: Keras in, Keras out

        return fold_keras_file(src_path, dst_path, in_place=in_place, **options)[1]  # type: ignore[arg-type]
    if pipeline == ONNX:
        return fold_file_onnx(src_path, dst_path, in_place=in_place, **options)
    check_output_path(src_path, dst_path, in_place, directory=is_saved_model_destination(dst))
    result = fold(src_path, **options)  # type: ignore[arg-type]
    write_result(result, dst)
    return result


def write_result(result: FoldResult, dst: str | os.PathLike[str]) -> None:
    """Write a folded TF graph as .pb/.pbtxt, or as a SavedModel directory with the source's signature
    (:func:`bnfold.tf.io.write_result`); a streamed result's values are spliced in as it is written."""
    from bnfold.tf.io import write_result as write

    write(result, dst)


def to_onnx(
    source: Any,
    inputs: list[str] | None = None,
    outputs: list[str] | None = None,
    *,
    opset: int | None = None,
    trust_model: bool = False,
    set_flags: dict[str, bool] | None = None,
    training_bn: str = "keep",
    **check: Unpack[CheckArgs],
) -> tuple[Any, FoldResult]:
    """A folded, checked ``onnx.ModelProto`` and its :class:`~bnfold.core.result.FoldResult`.

    ``source`` is anything :func:`fold` takes, or an ONNX model (or ``.onnx``
    path), which is folded without TensorFlow (:func:`bnfold.onnx.pipeline.fold_onnx`).
    A TF source is folded as for ``.pb`` output, converted by tf2onnx at ``opset``
    (default 17), folded again on the ONNX side (:func:`bnfold.onnx.export.export_folded`),
    and the ONNX file is run in onnxruntime with optimizations off against the
    original TF graph (:func:`bnfold.onnx.export.check_against_graph`).
    ``result.onnx`` holds the ONNX stage's sites, op counts and name mapping.

    ``set_flags`` and ``training_bn`` are resolved on the TensorFlow side, before
    tf2onnx sees the graph: a switch on a training flag becomes its taken branch,
    never an ONNX ``If``.
    """
    from bnfold.onnx.pipeline import fold_onnx

    options = CheckOptions.of(check)
    if type(source).__module__.startswith("onnx") or (isinstance(source, str | os.PathLike) and input_format(source) == ONNX):
        if set_flags or training_bn != "keep":
            raise UsageError("--set/--training-bn: an ONNX model has no TensorFlow training switch or training-mode BN to resolve")
        with trusting(trust_model):  # ONNX in, ONNX out: no TensorFlow on this path
            return fold_onnx(source, inputs, outputs, **check)
    from tensorflow.core.framework import graph_pb2

    from bnfold.onnx import export
    from bnfold.onnx.pipeline import check_feeds
    from bnfold.sources import load
    from bnfold.tf.verify import find_inputs

    opset = export.DEFAULT_OPSET if opset is None else opset
    export.check_opset(opset)
    switches: dict[str, Any] = {"set_flags": set_flags, "training_bn": training_bn}
    graph_def: graph_pb2.GraphDef | None = None
    if options.verify:  # the check's worker imports TensorFlow while tf2onnx converts
        isolation.prestart()
        loaded = load(source, trust_model=trust_model)
        graph_def, name, signature = loaded.graph_def, loaded.source, loaded.signature
        del loaded
        check_feeds(options.feeds, {s.name for s in find_inputs(graph_def)} | set(inputs or []))
        # The TF stage is exactly the .pb fold (same canonicalization, same records); the
        # check that matters is the one of the ONNX file against the original graph.
        result = fold(graph_def, inputs, outputs, verify_outputs=False, feeds=options.feeds, **switches)
        result.signature = signature  # the source's (a SavedModel's or Keras model's), as .pb output reports it
    else:
        # Nothing will run the original: fold loads it and folds that copy in place, so
        # one GraphDef, not two, is alive while tf2onnx converts (a GraphDef passed in is copied).
        result = fold(source, inputs, outputs, verify_outputs=False, feeds=options.feeds, trust_model=trust_model, **switches)
        name = result.source
        assert result.graph_def is not None
        check_feeds(options.feeds, set(result.inputs) | {s.name for s in find_inputs(result.graph_def)} | set(inputs or []))
    result.source, result.unchanged = name, False  # converted to ONNX: checked below, whatever the TF stage did
    model, names = export.export_folded(result, opset, trust_model)
    if graph_def is not None:
        export.check_against_graph(model, names, graph_def, result, options, trust_model)
    return model, result


def fold_file_onnx(src: str | os.PathLike[str], dst: str | os.PathLike[str], *, in_place: bool = False, **options: Any) -> FoldResult:
    """``bnfold.fold_file`` on the ONNX route (ONNX in, or ``.onnx`` out): fold, convert, check, then write atomically."""
    from bnfold.onnx.io import write_onnx
    from bnfold.onnx.pipeline import fold_onnx_file, plan_output

    src_path, dst_path = Path(src), Path(dst)
    if input_format(src_path) == ONNX:
        return fold_onnx_file(src_path, dst_path, in_place=in_place, **options)
    check_output_path(src_path, dst_path, in_place)
    model, result = to_onnx(src_path, **options)
    write_onnx(model, dst_path, plan_output(result, model, dst_path))
    return result
