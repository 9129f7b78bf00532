"""Fold keras.applications models and measure what bnfold does to them.

Run: ``python benchmarks/keras_apps.py [ResNet50 MobileNetV2 ...]``. Each model is
built with weights=None and randomized BN statistics, frozen once, folded in
process, and verified against the original in TF. Times are from a single run;
quote the ratios, not the absolute numbers.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from tensorflow.core.framework import graph_pb2  # noqa: E402

from bnfold.tf.fold import fold_graph  # noqa: E402
from bnfold.tf.freeze import freeze_keras  # noqa: E402
from bnfold.tf.verify import find_inputs, find_outputs, verify  # noqa: E402

WORK = Path(__file__).resolve().parent / "_work"
MODELS = ["ResNet50", "MobileNetV2", "DenseNet121"]


def randomized(name: str, size: int = 224) -> keras.Model:
    model = getattr(keras.applications, name)(weights=None, input_shape=(size, size, 3))
    rng = np.random.default_rng(0)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            values = []  # gamma and beta are optional (scale=False / center=False, e.g. InceptionV3)
            if layer.scale:
                values.append(rng.uniform(0.5, 1.5, layer.gamma.shape))
            if layer.center:
                values.append(rng.normal(0, 0.3, layer.beta.shape))
            values += [rng.normal(0, 0.3, layer.moving_mean.shape), rng.uniform(0.5, 2, layer.moving_variance.shape)]
            layer.set_weights(values)
    return model


def frozen_bytes(name: str) -> bytes:
    WORK.mkdir(exist_ok=True)
    path = WORK / f"{name}.pb"
    if not path.exists():
        path.write_bytes(freeze_keras(randomized(name)).graph_def.SerializeToString(deterministic=True))
    return path.read_bytes()


def measure(name: str) -> dict[str, object]:
    data = frozen_bytes(name)
    start = time.perf_counter()
    graph_def = graph_pb2.GraphDef()
    graph_def.ParseFromString(data)
    floor_copy = graph_def.SerializeToString(deterministic=True)
    floor = time.perf_counter() - start
    del floor_copy
    start = time.perf_counter()
    parsed = graph_pb2.GraphDef()
    parsed.ParseFromString(data)
    protected = {s.name for s in find_inputs(parsed)} | set(find_outputs(parsed))
    folded, sites = fold_graph(parsed, protected)
    folded.SerializeToString(deterministic=True)
    fold_time = time.perf_counter() - start
    check = verify(parsed, folded, samples=1)
    return {
        "model": name,
        "size_mb": round(len(data) / 1e6, 1),
        "bn_sites": len(sites),
        "folded": sum(s.action == "folded" for s in sites),
        "standalone": sum(s.action == "standalone" for s in sites),
        "skipped": sum(s.action == "skipped" for s in sites),
        "nodes_before": len(parsed.node),
        "nodes_after": len(folded.node),
        "fold_s": round(fold_time, 3),
        "floor_s": round(floor, 3),
        "fold_over_floor": round(fold_time / floor, 2),
        "max_abs_error": max(o.max_abs_error for o in check.outputs),
        "max_rel_error": max(o.max_rel_error for o in check.outputs),
        "verified": check.passed,
    }


if __name__ == "__main__":
    for model_name in sys.argv[1:] or MODELS:
        print(json.dumps(measure(model_name)), flush=True)
