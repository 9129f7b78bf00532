"""What the allowlist (bnfold.tf.allowlist) costs on ResNet50: the decision from the file's bytes, against loading the file.

    python benchmarks/allowlist_cost.py            # writes allowlist_cost.json beside this script

keras.applications ResNet50 (random weights) is saved as a ``.keras`` file, an
``.h5`` file, a SavedModel (``model.export``) and a frozen ``.pb``. For each,
the allowlist decision (reading the config or the protobuf and checking it,
what bnfold does before any loader) is timed against what comes after it
anyway: Keras' ``load_model``, ``tf.saved_model.load``, or parsing the ``.pb`` (the gate itself runs on the
parsed graph, before the check runs it).
Each figure is the median of 5 runs in this process; the ratio is
allowlist / load. No figure here is a test.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def median_seconds(fn: Callable[[], object], repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    import keras
    import tensorflow as tf
    from tensorflow.core.protobuf import saved_model_pb2

    from bnfold.keras.allowlist import keras_refusal
    from bnfold.keras.load import keras_config
    from bnfold.tf.allowlist import graph_refusals, saved_model_refusals
    from bnfold.tf.freeze import freeze_keras
    from bnfold.tf.io import load_graph_def

    model = keras.applications.ResNet50(weights=None)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model.save(work / "m.keras")
        model.save(work / "m.h5")
        model.export(str(work / "sm"), verbose=False)
        (work / "m.pb").write_bytes(freeze_keras(model).graph_def.SerializeToString())

        def sm_allowlist() -> object:
            proto = saved_model_pb2.SavedModel()
            proto.ParseFromString((work / "sm" / "saved_model.pb").read_bytes())
            return saved_model_refusals(proto)

        frozen = load_graph_def(work / "m.pb")  # the gate runs on the graph bnfold has parsed already
        cases: dict[str, tuple[Callable[[], object], Callable[[], object]]] = {
            ".keras": (lambda: keras_refusal(keras_config(work / "m.keras")), lambda: keras.saving.load_model(work / "m.keras", compile=False)),
            ".h5": (lambda: keras_refusal(keras_config(work / "m.h5")), lambda: keras.saving.load_model(work / "m.h5", compile=False)),
            "SavedModel": (sm_allowlist, lambda: tf.saved_model.load(str(work / "sm"))),
            ".pb (check gate)": (lambda: graph_refusals(frozen, None), lambda: load_graph_def(work / "m.pb")),
        }
        for name, (allow, load) in cases.items():
            allow()  # first call fills the registry caches: measured apart
            a, b = median_seconds(allow), median_seconds(load)
            assert not allow(), name  # ResNet50 passes the allowlist
            rows[name] = {"allowlist_s": round(a, 4), "load_s": round(b, 4), "ratio": round(a / b, 4)}
            print(f"{name:18s} allowlist {a * 1000:8.1f} ms   load {b * 1000:8.1f} ms   ratio {a / b:.3f}")
    out = {"model": "ResNet50 (keras.applications, weights=None)", "load_average": os.getloadavg(), "rows": rows}
    (HERE / "allowlist_cost.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
