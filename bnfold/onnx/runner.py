"""Run an ONNX model in the confined worker: onnxruntime sessions and the reference evaluator, as worker requests.

The worker process is format-blind (:mod:`bnfold.core.serve`); ``ort_load``
opens an onnxruntime session (graph optimizations off) that the core ``run``
request then runs by names, and ``onnx_eval`` evaluates a constant's subgraph
with onnx's reference evaluator. Neither imports TensorFlow.
"""

from __future__ import annotations

from typing import IO, Any

import numpy as np

from bnfold.core import serve
from bnfold.core.protocol import decode_arrays, encode_arrays, first_line_of, send


class ModelRunError(ValueError):
    """onnxruntime, the ONNX reference evaluator or tf2onnx refused or failed on the model (their own exception types)."""


class OrtSession:
    """An onnxruntime session in the worker (graph optimizations off), run as the TF session is: by names."""

    def __init__(self, source: bytes | str) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        except MemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise ModelRunError(first_line_of(str(exc))) from None
        self.inputs = [i.name for i in self.session.get_inputs()]

    def run(self, fetches: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        try:
            return list(self.session.run(fetches, feeds))
        except MemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise ModelRunError(first_line_of(str(exc))) from None

    def close(self) -> None:
        del self.session


def evaluate(state: serve.State, head: dict[str, Any], payload: bytes, reply: IO[bytes]) -> None:
    """The worker's ``EVALUATE`` request: the ONNX reference evaluator on a constant's subgraph (:class:`bnfold.onnx.recognize.ConstValues`)."""
    import onnx
    from onnx.reference import ReferenceEvaluator

    size = int(head["model_bytes"])
    model = onnx.ModelProto.FromString(payload[:size])
    feeds = dict(zip(head["feeds"], decode_arrays(head["arrays"], payload[size:]), strict=True))
    try:
        values = [np.asarray(v) for v in ReferenceEvaluator(model).run(list(head["fetches"]), feeds)]
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - the reference evaluator raises anything
        raise ModelRunError(f"{type(exc).__name__}: {first_line_of(str(exc))}") from None
    meta, data = encode_arrays(values)
    send(reply, {"ok": True, "arrays": meta}, data)


def load(state: serve.State, head: dict[str, Any], payload: bytes, reply: IO[bytes]) -> None:
    """The worker's ``LOAD`` request: an onnxruntime session of the model (its bytes, or a path in the private directory)."""
    state.close()
    session = OrtSession(str(head["path"]) if head.get("path") else payload)
    del payload
    state.session = session
    send(reply, {"ok": True, "inputs": session.inputs})


LOAD = f"{__name__}:load"
EVALUATE = f"{__name__}:evaluate"
