"""What an ONNX model may make bnfold run: standard domains only, model-local functions included.

Decided from the ModelProto before onnxruntime or the reference evaluator sees
it (docs/security.md); ``--trust-model`` lifts it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import onnx

ONNX_DOMAINS = ("", "ai.onnx", "ai.onnx.ml")


def onnx_refusal(model: onnx.ModelProto) -> tuple[str, str] | None:
    """(node, why) for the first node of the graph, its subgraphs or a model-local function outside the standard domains, else None.

    A standard op is pure in onnxruntime (its kernels read no files and run no
    code); a node of another domain runs whatever the runtime registered under
    it (custom-op libraries). Calls of model-local functions are allowed and
    their bodies are checked by the same rule.
    """
    local = {(f.domain, f.name) for f in model.functions}
    graphs: list[tuple[str, Sequence[Any]]] = [("", list(model.graph.node))]
    graphs += [(f"{f.name}/", list(f.node)) for f in model.functions]
    while graphs:
        prefix, nodes = graphs.pop()
        for node in nodes:
            label = f"{prefix}{node.name or node.op_type}"
            if node.domain not in ONNX_DOMAINS and (node.domain, node.op_type) not in local:
                return label, f"is op {node.op_type} of domain {node.domain!r}, outside ONNX's standard domains (a custom op runs code bnfold cannot see)"
            for attr in node.attribute:
                subgraphs = [attr.g] if attr.HasField("g") else list(attr.graphs)
                graphs += [(f"{label}/", list(g.node)) for g in subgraphs]
    return None
