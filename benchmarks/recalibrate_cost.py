"""What ``bnfold recalibrate`` costs against one training-mode pass over the same data (what PyTorch's ``update_bn`` costs).

    python benchmarks/recalibrate_cost.py                 # ResNet50, 256 samples, 224x224
    python benchmarks/recalibrate_cost.py --size 96       # a smaller image on a slow machine

The model is ``keras.applications.ResNet50(weights=None)`` (random weights: the
cost does not depend on them), frozen by bnfold as ``bnfold recalibrate model.keras``
would. The data is 256 random images. Timed, in this process, once each (a single
run; the figures are ratios on the same machine and load):

- ``training pass``: ``model(x, training=True)`` over the 256 samples in batches of 32, each BN on its
  batch's statistics: one forward pass, the cost of ``update_bn``;
- ``inference pass``: the frozen graph run once over the samples in bnfold's worker (fetching the output);
- ``recalibrate``: ``bnfold.recalibration.graph.recalibrate_graph`` on the frozen graph, everything included
  (worker start, one pass per BN depth level, the final measuring pass).

Writes ``recalibrate_cost.json`` beside this script; no figure here is a test.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--budget-mib", type=int, default=256)
    args = parser.parse_args()

    import keras
    import numpy as np
    import tensorflow as tf

    from bnfold.recalibration.graph import recalibrate_graph
    from bnfold.tf.freeze import freeze_keras
    from bnfold.tf.verify import open_graph_runner

    keras.utils.set_random_seed(0)
    model = keras.applications.ResNet50(weights=None, input_shape=(args.size, args.size, 3))
    x = np.random.default_rng(0).standard_normal((args.samples, args.size, args.size, 3)).astype(np.float32)
    loaded = freeze_keras(model)
    graph_def = loaded.graph_def
    (input_name,) = loaded.signature.inputs.values() if loaded.signature else ["input"]
    outputs = [t.split(":")[0] for t in loaded.signature.outputs.values()] if loaded.signature else []

    model(x[:32], training=True)  # trace once outside the timing
    start = time.perf_counter()
    for i in range(0, len(x), 32):
        model(tf.constant(x[i : i + 32]), training=True)
    training = time.perf_counter() - start

    runner = open_graph_runner(graph_def, "the graph")
    try:
        runner.run([f"{outputs[0]}:0"], {input_name: x[:1]})
        start = time.perf_counter()
        for i in range(0, len(x), 32):
            runner.run([f"{outputs[0]}:0"], {input_name: x[i : i + 32]})
        inference = time.perf_counter() - start
    finally:
        runner.close()

    start = time.perf_counter()
    result = recalibrate_graph(graph_def, [x], outputs=outputs, memory_budget=args.budget_mib * 2**20)
    recal = time.perf_counter() - start
    levels = len({r.level for r in result.layers})
    figures = {
        "model": f"ResNet50 (weights=None) {args.size}x{args.size}",
        "samples": args.samples,
        "bn_layers": len(result.layers),
        "depth_levels": levels,
        "passes": result.passes,
        "batch_sizes": sorted(set(result.batch_sizes)),
        "training_pass_s": round(training, 2),
        "inference_pass_s": round(inference, 2),
        "recalibrate_s": round(recal, 2),
        "ratio_to_training_pass": round(recal / training, 2),
        "ratio_to_inference_pass": round(recal / inference, 2),
        "load_average": os.getloadavg(),
    }
    print(json.dumps(figures, indent=2))
    path = HERE / "recalibrate_cost.json"  # one entry per image size, the latest run of each
    runs = json.loads(path.read_text()) if path.exists() else {}
    runs[str(args.size)] = figures
    path.write_text(json.dumps(runs, indent=2) + "\n")


if __name__ == "__main__":
    main()
