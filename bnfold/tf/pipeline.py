"""The TensorFlow pipeline on a loaded graph: canonicalize -> recognize and fold -> prune -> verify, in one direction.

:func:`bnfold.api.fold` loads any source into a :class:`~bnfold.tf.freeze.Loaded`
(:mod:`bnfold.sources`) and hands it here; ``.onnx`` output continues from the
result in :mod:`bnfold.onnx.export`. The input graph's half of the check starts
in the worker before the fold, so both run at the same time.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from tensorflow.core.framework import graph_pb2

from bnfold.core.comparison import CheckOptions, failure_message, parse_input
from bnfold.core.errors import UsageError, VerificationError
from bnfold.core.result import FoldResult, Resolution, TrainingBnRewrite
from bnfold.tf.fold import fold_graph_outcome
from bnfold.tf.freeze import Loaded
from bnfold.tf.graph import op_counts
from bnfold.tf.runsafety import check_runnable, refused_nodes
from bnfold.tf.switches import canonicalize, without_cond_plumbing
from bnfold.tf.verify import PendingCheck, find_inputs, find_outputs


def fold_loaded(
    loaded: Loaded,
    inputs: list[str] | None,
    outputs: list[str] | None,
    options: CheckOptions,
    *,
    set_flags: dict[str, bool] | None = None,
    training_bn: str = "keep",
    trust_model: bool = False,
    owned: bool = False,
    contents: Any = None,
) -> FoldResult:
    """Fold every BN of ``loaded``'s graph; ``owned``: bnfold made the graph itself, so it may be edited in place
    when nothing will run it (no check). ``contents``: the large constants left in the file (streamed, no check)."""
    verify_outputs, feeds = options.verify, options.feeds
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
    owned = owned or canonical is not graph_def
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




def _check_names(graph_def: graph_pb2.GraphDef, names: list[str] | None, option: str) -> None:
    known = {n.name for n in graph_def.node}
    for name in names or []:
        if parse_input(name)[0] not in known:
            raise UsageError(f"{option}: no node named {parse_input(name)[0]!r} in the graph")


def _left_as_it_was(
    result: FoldResult, graph_def: graph_pb2.GraphDef, resolutions: list[Resolution], rewrites: list[TrainingBnRewrite]
) -> bool:
    if resolutions or any(r.rewritten for r in rewrites) or any(s.action in ("folded", "standalone") for s in result.sites):
        return False
    # No pass edited anything: each returns its input object when it has nothing to do. (Folded in
    # place, under --no-verify, the object is the input's even after edits: the counts must agree too.)
    return result.graph_def is graph_def and result.ops_after == result.ops_before
