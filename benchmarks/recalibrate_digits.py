"""Accuracy before and after ``bnfold recalibrate``, per BN mistake, on scikit-learn's digits.

    python benchmarks/recalibrate_digits.py            # trains the models (seconds), prints the table

The models are the ones the tests use (``tests/digits_training.py``: a small CNN,
conv-BN-ReLU twice, trained 400 steps; the Keras one 10 epochs), each carrying one
mistake. Per model, test accuracy (360 held-out images):

- training mode: BN on batch statistics, test images in batches of 128 (the accuracy the user saw in training);
- inference before: the model as shipped (the training-mode export one image at a time, as a server runs it);
- after: ``bnfold recalibrate`` with the first 256 training images, then inference.

Writes ``recalibrate_digits.json`` beside this script and prints the README table. A single run; no figure here is a test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

MISTAKES = {
    "not_wired": "TF1: update ops not wired to the train op",
    "decay1": "TF1: decay (momentum) = 1",
    "valid_copy": "TF1: validation network without reuse (moving statistics as tf.Variable)",
    "ema_cond": "TF1: hand-written EMA BN under tf.cond, apply never run",
    "frozen_training": "TF1: frozen with is_training=True",
    "keras_momentum1": "Keras: BatchNormalization(momentum=1.0)",
    "onnx": "ONNX: the update-ops model exported (tf2onnx, BatchNormalization kept)",
}
CALIBRATION = 256
BATCH = 128


def main() -> None:
    import numpy as np

    import bnfold
    from bnfold.tf.io import load_graph_def
    from bnfold.tf.verify import open_graph_runner

    work = Path(tempfile.mkdtemp(prefix="bnfold-digits-"))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for args in ([], ["--keras"]):
        subprocess.run([sys.executable, str(ROOT / "tests" / "digits_training.py"), str(work), *args], env=env, check=True, capture_output=True)
    with np.load(work / "digits.npz") as data:
        x_train, x_test, y_test = data["x_train"], data["x_test"], data["y_test"]
    calibration = x_train[:CALIBRATION]

    def graph_logits(graph_def, x, training=False, batch=BATCH):  # type: ignore[no-untyped-def]
        feeds = {"is_training:0": np.array(training)} if any(n.name == "is_training" and n.op == "Placeholder" for n in graph_def.node) else {}
        runner = open_graph_runner(graph_def, "the graph")
        try:
            return np.concatenate([runner.run(["logits:0"], {"x:0": x[i : i + batch], **feeds})[0] for i in range(0, len(x), batch)])
        finally:
            runner.close()

    def accuracy(logits) -> float:  # type: ignore[no-untyped-def]
        return round(100 * float((logits.argmax(1) == y_test).mean()), 1)

    rows = []
    for case, mistake in MISTAKES.items():
        if case == "onnx":
            import onnx
            import onnxruntime as ort
            import tensorflow as tf
            from tf2onnx import tfonnx

            from bnfold.recalibration.onnx import recalibrate_onnx_file
            from bnfold.tf.switches import resolve_switches

            inference, _ = resolve_switches(load_graph_def(work / "not_wired.pb"), {"is_training": False}, {"x", "logits"})
            graph = tf.Graph()
            with graph.as_default():
                tf.compat.v1.import_graph_def(inference, name="")
            onnx.save(tfonnx.process_tf_graph(graph, input_names=["x:0"], output_names=["logits:0"], opset=17).make_model("digits"), work / "m.onnx")
            recalibrate_onnx_file(work / "m.onnx", work / "fixed.onnx", [calibration])

            def onnx_logits(path: Path):  # type: ignore[no-untyped-def]
                session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
                return session.run(None, {session.get_inputs()[0].name: x_test})[0]

            training = accuracy(graph_logits(load_graph_def(work / "not_wired_train.pb"), x_test, True))
            before, after = accuracy(onnx_logits(work / "m.onnx")), accuracy(onnx_logits(work / "fixed.onnx"))
        elif case == "keras_momentum1":
            import keras

            path = work / f"{case}.keras"
            model = keras.saving.load_model(path)
            training = accuracy(np.concatenate([np.asarray(model(x_test[i : i + BATCH], training=True)) for i in range(0, len(x_test), BATCH)]))
            before = accuracy(np.asarray(model(x_test, training=False)))
            fixed_path = work / "fixed.keras"
            bnfold.recalibrate_file(path, fixed_path, [calibration])
            after = accuracy(np.asarray(keras.saving.load_model(fixed_path)(x_test, training=False)))
        else:
            shipped, train_graph = load_graph_def(work / f"{case}.pb"), load_graph_def(work / f"{case}_train.pb")
            training = accuracy(graph_logits(train_graph, x_test, True))
            before = accuracy(graph_logits(shipped, x_test, batch=1 if case == "frozen_training" else BATCH))
            after = accuracy(graph_logits(bnfold.recalibrate(shipped, [calibration], outputs=["logits"]).graph_def, x_test))
        rows.append({"case": case, "mistake": mistake, "training_mode": training, "inference_before": before, "after_recalibrate": after})
        print(rows[-1], flush=True)
    (HERE / "recalibrate_digits.json").write_text(json.dumps(rows, indent=2) + "\n")
    print("\n| mistake | training mode | inference before | after `bnfold recalibrate` (256 images) |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['mistake']} | {r['training_mode']}% | {r['inference_before']}% | {r['after_recalibrate']}% |")


if __name__ == "__main__":
    main()
