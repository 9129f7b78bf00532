"""The Python API: ``fold`` for export pipelines, ``fold_file`` for files.

Runs the stages in one direction: load -> fold (canonical forms are read by the
constant evaluator) -> verify -> write. Verification is on by default because
the promise is that the written model computes what the input did.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tensorflow.core.framework import graph_pb2

from bnfold.core import sandbox
from bnfold.core import worker as isolation
from bnfold.core.comparison import CheckArgs, CheckOptions
from bnfold.core.errors import UsageError, VerificationError
from bnfold.core.files import check_output_path
from bnfold.core.formats import (  # noqa: F401  (OUTPUT_FORMATS re-exported)
    GRAPH,
    KERAS,
    ONNX,
    OUTPUT_FORMATS,
    check_output_format,
    input_format,
    is_saved_model_destination,
    output_format,
    route,
)
from bnfold.core.result import DEFAULT_SIGNATURE, FoldResult, Resolution, TrainingBnRewrite
from bnfold.core.trust import trusting
from bnfold.sources import load
from bnfold.tf import io
from bnfold.tf.fold import fold_graph_outcome
from bnfold.tf.freeze import Loaded
from bnfold.tf.graph import op_counts, parse_input
from bnfold.tf.io import write_result
from bnfold.tf.runsafety import check_runnable, refused_nodes
from bnfold.tf.switches import canonicalize, without_cond_plumbing
from bnfold.tf.verify import PendingCheck, failure_message, find_inputs, find_outputs

if TYPE_CHECKING:
    from typing_extensions import Unpack

# A GraphDef, a path (.pb, .pbtxt, SavedModel directory, .keras, .h5), a Keras model, or a tf.function.
GraphSource = Any




def _check_names(graph_def: graph_pb2.GraphDef, names: list[str] | None, option: str) -> None:
    known = {n.name for n in graph_def.node}
    for name in names or []:
        if parse_input(name)[0] not in known:
            raise UsageError(f"{option}: no node named {parse_input(name)[0]!r} in the graph")


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

    Untrusted models (README "Security"): Keras files whose config carries code
    and graphs whose check would reach outside the process (files, network,
    session resources) raise :class:`~bnfold.core.errors.UnsafeModelError` unless
    ``trust_model``; with ``verify_outputs=False`` nothing runs, and such nodes
    pass through untouched, listed in ``result.foreign_ops``.

    ``stream_constants`` (a binary ``.pb`` path, no check): large constants stay in the
    file and the fold's new weights are computed when written (:mod:`bnfold.tf.streaming`),
    so memory stays near the size of the graph without its weights. The result then
    holds stubs: pass it to :func:`write_result` (which fills them), not to other code.
    """
    options = CheckOptions.of(check)
    verify_outputs, feeds = options.verify, options.feeds
    if isinstance(source, str | os.PathLike) and (trust_model or not _is_graph_file(source)):
        # The worker loads SavedModel and Keras files (bnfold.tf.freeze.load_in_worker); a trusted graph may read its
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
    graph_def, name = loaded.graph_def, loaded.source
    _check_names(graph_def, inputs, "--inputs")
    _check_names(graph_def, outputs, "--outputs")
    in_names = inputs or [s.name for s in find_inputs(graph_def)]
    if outputs:
        out_names = outputs
    elif loaded.signature is not None:
        out_names = [parse_input(t)[0] for t in loaded.signature.outputs.values()]
    else:
        out_names = without_cond_plumbing(graph_def, find_outputs(graph_def))
    # Inputs, outputs and fed tensors must survive the fold under their names.
    protected = {parse_input(n)[0] for n in [*in_names, *out_names, *feeds]}
    canonical, resolutions, rewrites = canonicalize(graph_def, set_flags, training_bn, protected)
    flag_nodes = {n.name for n in graph_def.node if n.op in ("Placeholder", "PlaceholderWithDefault")}
    ops_before = op_counts(graph_def)
    # A graph bnfold loaded itself and will not verify against is folded in place:
    # no copy of the model is made (bnfold IN OUT --no-verify, the fastest path).
    owned = loaded.graph_def is not source or canonical is not graph_def
    reference = canonical if any(r.rewritten for r in rewrites) else graph_def
    fed = {parse_input(k)[0] for k in feeds}
    check_feeds = {**{r.flag: np.array(r.value) for r in resolutions if r.flag in flag_nodes and r.flag not in fed}, **feeds}
    pending = None
    if verify_outputs:  # the input graph's half of the check runs in the worker while this process folds
        gate = lambda: check_runnable(reference, out_names, f"{name}: the check")  # noqa: E731
        pending = PendingCheck(reference, inputs, out_names, dataclasses.replace(options, feeds=check_feeds), trust_model, gate)
    outcome = fold_graph_outcome(canonical, protected, in_place=owned and not verify_outputs, fed=fed, contents=contents)
    folded, sites = outcome.graph_def, outcome.sites
    result = FoldResult(
        graph_def=folded,
        sites=sites,
        inputs=in_names,
        outputs=out_names,
        ops_before=ops_before,
        ops_after=op_counts(folded),
        source=name,
        switches=resolutions,
        training_bn=rewrites,
        signature=loaded.signature,
        other_normalizations=outcome.others,
        foreign_ops=[r.to_json() for r in refused_nodes(graph_def)],
        contents=contents,
    )
    if _left_as_it_was(result, graph_def, resolutions, rewrites):
        # Nothing folded, nothing removed: the graph is written as it came, and a graph identical
        # to the input needs no proof (nor inputs bnfold cannot make up).
        result.graph_def, result.ops_after, result.unchanged = graph_def, dict(ops_before), True
        return result
    if pending is not None:
        result.verification = pending.finish(folded)
        if not result.verification.passed and not options.force:
            raise VerificationError(f"{name}: verification failed: {failure_message(result.verification)}", result)
    return result


def _is_graph_file(source: GraphSource) -> bool:
    """A path :func:`bnfold.tf.freeze.load` reads as a GraphDef file (not a SavedModel directory or a Keras file)."""
    return isinstance(source, str | os.PathLike) and Path(source).is_file() and input_format(source) == GRAPH


def _left_as_it_was(
    result: FoldResult, graph_def: graph_pb2.GraphDef, resolutions: list[Resolution], rewrites: list[TrainingBnRewrite]
) -> bool:
    if resolutions or any(r.rewritten for r in rewrites) or any(s.action in ("folded", "standalone") for s in result.sites):
        return False
    # No pass edited anything: each returns its input object when it has nothing to do. (Folded in
    # place, under --no-verify, the object is the input's even after edits: the counts must agree too.)
    return result.graph_def is graph_def and result.ops_after == result.ops_before


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
    io.check_output_path(src_path, dst_path, in_place, directory=is_saved_model_destination(dst))
    result = fold(src_path, **options)  # type: ignore[arg-type]
    write_result(result, dst)
    return result


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
    from bnfold.onnx import export
    from bnfold.onnx.pipeline import check_feeds, fold_onnx

    options = CheckOptions.of(check)
    if not isinstance(source, str | os.PathLike | graph_pb2.GraphDef) and type(source).__name__ == "ModelProto" or (
        isinstance(source, str | os.PathLike) and input_format(source) == ONNX
    ):
        if set_flags or training_bn != "keep":
            raise UsageError("--set/--training-bn: an ONNX model has no TensorFlow training switch or training-mode BN to resolve")
        with trusting(trust_model):  # ONNX in, ONNX out: no TensorFlow on this path
            return fold_onnx(source, inputs, outputs, **check)
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
    """``bnfold.fold_file(src, "x.onnx")``: fold, convert, check, verify, then write atomically."""
    from bnfold.onnx.io import write_onnx
    from bnfold.onnx.pipeline import fold_onnx_file, plan_output

    src_path, dst_path = Path(src), Path(dst)
    if input_format(src_path) == ONNX:
        return fold_onnx_file(src_path, dst_path, in_place=in_place, **options)
    if output_format(dst_path) != ONNX:
        raise UsageError(f"{dst}: give an output path ending in .onnx")
    check_output_path(src_path, dst_path, in_place)
    model, result = to_onnx(src_path, **options)
    write_onnx(model, dst_path, plan_output(result, model, dst_path))
    return result
