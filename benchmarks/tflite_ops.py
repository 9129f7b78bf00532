"""Does bnfold's output make TFLite's converter produce more ops than the original graph does?

Run: ``python benchmarks/tflite_ops.py [MobileNetV2 EfficientNetB0 ResNet50 DenseNet121]``.
Each keras.applications model (weights=None, randomized BN statistics, 224x224) is
frozen once, folded by bnfold (``bnfold.fold``, with the check), and both graphs go
through ``tf.compat.v1.lite.TFLiteConverter.from_frozen_graph`` with default
options (float32). The op types of the two .tflite files are counted from the
interpreter's op list. Writes ``benchmarks/tflite_ops.json`` and prints a table;
the issue's rule (#11) is that no op type may count higher after the fold.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tensorflow as tf  # noqa: E402
from tensorflow.core.framework import graph_pb2  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from keras_apps import frozen_bytes  # noqa: E402

import bnfold  # noqa: E402
from bnfold.tf.verify import find_inputs, find_outputs  # noqa: E402

MODELS = ["MobileNetV2", "EfficientNetB0", "ResNet50", "DenseNet121"]
OUT = Path(__file__).resolve().parent / "tflite_ops.json"


def tflite_ops(graph_def: graph_pb2.GraphDef) -> Counter[str]:
    inputs = [s.name for s in find_inputs(graph_def)]
    outputs = find_outputs(graph_def)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "g.pb"
        path.write_bytes(graph_def.SerializeToString())
        shapes = {s.name: [1, *[int(d) for d in (s.shape or [])[1:]]] for s in find_inputs(graph_def)}
        converter = tf.compat.v1.lite.TFLiteConverter.from_frozen_graph(str(path), inputs, outputs, input_shapes=shapes)
        flat = converter.convert()
    interpreter = tf.lite.Interpreter(model_content=flat)
    return Counter(op["op_name"] for op in interpreter._get_ops_details())  # noqa: SLF001 - the only op list TF exposes


def measure(name: str) -> dict[str, object]:
    original = graph_pb2.GraphDef.FromString(frozen_bytes(name))
    result = bnfold.fold(original)
    before, after = tflite_ops(original), tflite_ops(result.graph_def)
    worse = {op: (before[op], after[op]) for op in sorted(set(before) | set(after)) if after[op] > before[op]}
    return {
        "model": name,
        "folded_sites": result.count("folded"),
        "verification_passed": bool(result.verification and result.verification.passed),
        "tflite_ops_before": dict(sorted(before.items())),
        "tflite_ops_after": dict(sorted(after.items())),
        "total_before": sum(before.values()),
        "total_after": sum(after.values()),
        "worse": worse,
    }


def main() -> None:
    names = sys.argv[1:] or MODELS
    rows = []
    for name in names:
        row = measure(name)
        rows.append(row)
        print(
            f"{name}: {row['total_before']} -> {row['total_after']} TFLite ops; "
            f"worse: {row['worse'] or 'none'}; before {row['tflite_ops_before']}; after {row['tflite_ops_after']}",
            flush=True,
        )
    OUT.write_text(json.dumps({"tensorflow": tf.__version__, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
