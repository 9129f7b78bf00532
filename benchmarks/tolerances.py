"""Measure fold error per dtype, to choose the default verification tolerances.

Run: ``python benchmarks/tolerances.py [N]``. Folds N random conv/dense + BN graphs
per dtype (random layouts, channel counts, BN statistics including tiny variances
and large means) and prints the distribution of ``max|a - b| / max|a|``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for sample_models
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from bnfold.tf.fold import fold_graph  # noqa: E402
from bnfold.tf.verify import compare, find_outputs  # noqa: E402
from sample_models.make_samples import Spec, build, input_shape  # noqa: E402


def random_spec(rng: np.random.Generator, dtype: str) -> Spec:
    linear = str(rng.choice(["conv2d", "depthwise", "matmul"]))
    cin, cout = int(rng.integers(1, 17)), int(rng.integers(1, 17))
    mult = int(rng.integers(1, 3))
    channels = cin * mult if linear == "depthwise" else cout
    stats = {
        "gamma": rng.uniform(0.1, 3, channels) * rng.choice([-1, 1], channels),
        "beta": rng.normal(0, 2, channels),
        "mean": rng.normal(0, 1, channels) * rng.choice([1, 100], channels),
        "var": np.exp(rng.uniform(np.log(1e-5), np.log(50), channels)),
    }
    bn = "fused_v3" if linear != "matmul" and dtype != "float32" else str(rng.choice(["fused_v3", "keras3"]) if linear != "matmul" else "keras3")
    return Spec(linear=linear, bn=bn, cin=cin, cout=cout, multiplier=mult, dtype=dtype, stats=stats, seed=int(rng.integers(1 << 30)), kernel=int(rng.integers(1, 4)))


def main(n: int) -> None:
    rng = np.random.default_rng(0)
    for dtype in ("float32", "float16", "bfloat16"):
        errors = []
        for _ in range(n):
            spec = random_spec(rng, dtype)
            try:
                graph_def = build(spec)
            except (ValueError, TypeError):
                continue
            folded, _ = fold_graph(graph_def, {"x", *find_outputs(graph_def)})
            shape = [4 if d is None else d for d in input_shape(spec, spec.cin)]
            x = rng.standard_normal(shape).astype(tf.as_dtype(dtype).as_numpy_dtype)
            results = []
            for gd in (graph_def, folded):
                graph = tf.Graph()
                with graph.as_default():
                    tf.graph_util.import_graph_def(gd, name="")
                with tf.compat.v1.Session(graph=graph) as session:
                    try:
                        results.append(session.run("output:0", {"x:0": x}))
                    except tf.errors.OpError:
                        break
            if len(results) == 2:
                check = compare("output", results[0], results[1], 0, 0)
                errors.append(check.max_rel_error)
        if errors:
            e = np.array(errors)
            print(f"{dtype}: {len(e)} graphs; max|a-b|/max|a|: median {np.median(e):.2e}, p99 {np.quantile(e, 0.99):.2e}, max {e.max():.2e}")
        else:
            print(f"{dtype}: no graph could run on this machine")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 200)
