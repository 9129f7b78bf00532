"""Which graphs bnfold may run: only what :mod:`bnfold.tf.allowlist` shows to be pure computation.

bnfold runs a model's graph for the equivalence check, for ``doctor --data``,
for constant evaluation and (through tf2onnx's constant folding) for ONNX
conversion. A downloaded graph is untrusted input. This module is the gate in
front of those runs; the rule itself (docs/security.md) lives in
:mod:`bnfold.tf.allowlist`, which also decides what loading a SavedModel or a
Keras file may run:

- every node the run needs (the fetched tensors and everything they depend on,
  data and control edges) and every node of every library function, reached or
  not, must be on the allowlist: an op TensorFlow's registry marks stateless,
  with no resource, variant or reference inputs or outputs, no string input or
  attribute naming a place, plus the written exceptions of
  :data:`bnfold.tf.allowlist.PURE_EXCEPTIONS` (kernel RNGs, assertions, printing to
  the process's streams, calls and control flow whose bodies are checked);
- step-local containers (:func:`is_step_local`: TF1 ``TensorArray*`` and
  ``Stack*V2``, TF2 ``TensorList*``) live and die inside the run and are allowed;
- an op TensorFlow does not register is refused: bnfold cannot show what it does.
"""

from __future__ import annotations

from tensorflow.core.framework import graph_pb2, op_def_pb2
from tensorflow.core.protobuf import saved_model_pb2

from bnfold.core.errors import UnsafeModelError
from bnfold.core.trust import enforced, is_trusted, trusting
from bnfold.tf.allowlist import (
    DOCUMENTED_EFFECTS,
    LOAD,
    PURE_EXCEPTIONS,
    RUN,
    Refusal,
    graph_refusals,
    is_step_local,
    op_def_refusal,
    saved_model_refusals,
)
from bnfold.tf.allowlist import node_refusal as _node_refusal
from bnfold.tf.allowlist import op_refusal as _op_refusal

HARMLESS_STATEFUL = PURE_EXCEPTIONS  # the name tests and older callers know

__all__ = [
    "DOCUMENTED_EFFECTS",
    "HARMLESS_STATEFUL",
    "Refusal",
    "check_runnable",
    "is_step_local",
    "is_trusted",
    "node_refusal",
    "op_refusal",
    "refused_nodes",
    "registry_decisions",
    "saved_model_load_refusals",
    "trusting",
]


def op_refusal(op: str, resources: bool = False) -> str | None:
    """Why an op type is not on the allowlist, or None; ``resources``: in what loading a SavedModel runs."""
    return _op_refusal(op, LOAD if resources else RUN)


def node_refusal(node: object, resources: bool = False) -> str | None:
    """Why this node may not run: its op type, or a place held in one of its attributes."""
    return _node_refusal(node, LOAD if resources else RUN)  # type: ignore[arg-type]


def refused_nodes(
    graph_def: graph_pb2.GraphDef,
    fetches: list[str] | None = None,
    functions: object = None,
    resources: bool = False,
) -> list[Refusal]:
    """Every node that would run for ``fetches`` (all nodes when None), and every library function's nodes, not on the allowlist."""
    return graph_refusals(graph_def, fetches, LOAD if resources else RUN)


def check_runnable(
    graph_def: graph_pb2.GraphDef,
    fetches: list[str] | None,
    what: str,
    hint: str = "--no-verify folds without running anything, --trust-model runs it anyway",
) -> None:
    """Raise :class:`UnsafeModelError` naming the first node the allowlist refuses, before anything runs."""
    if not enforced():
        return
    refusals = refused_nodes(graph_def, fetches)
    if refusals:
        first = refusals[0]
        more = f" (and {len(refusals) - 1} more)" if len(refusals) > 1 else ""
        raise UnsafeModelError(
            f"{what} would run node {first.where!r} ({first.op}), which {first.reason}{more}; bnfold does not run such graphs: {hint}"
        )


def saved_model_load_refusals(saved_model: saved_model_pb2.SavedModel) -> list[Refusal]:
    """What ``tf.saved_model.load`` could run, refused by the allowlist (:func:`bnfold.tf.allowlist.saved_model_refusals`)."""
    return saved_model_refusals(saved_model)


def registry_decisions() -> dict[str, str | None]:
    """Every registered op -> why the allowlist refuses it in a run, or None (for tests and the note)."""
    from tensorflow.python.client import pywrap_tf_session

    ops = op_def_pb2.OpList()
    ops.ParseFromString(pywrap_tf_session.TF_GetBuffer(pywrap_tf_session.TF_GetAllOpList()))
    return {op.name: op_def_refusal(op) for op in ops.op}
