"""Keras in, Keras out (issue #17): fold four keras.applications models with ``bnfold.fold_keras``.

Run: ``python benchmarks/keras_fold.py [--size 224] [--repeats 5] [MobileNetV2 ...]``.
Each model is built with weights=None, logits out (classifier_activation=None:
an untrained model's softmax is near uniform and would hide errors) and
randomized BN statistics, folded at the layer level, verified by bnfold,
compared once more here (max abs logit error on a batch of 8, and relative to
the largest logit), timed with ``model.predict`` (median of the repeats, batch 1 and
batch 32, original and folded in alternation (which goes first alternating too), one warm-up each), and saved as
``.keras`` to a temporary directory for the file sizes (deleted afterwards).
Results go to ``benchmarks/keras_fold.json`` and, as a Markdown table, to stdout
and ``benchmarks/KERAS.md`` (``--render`` rewrites the table from the JSON alone).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from bnfold import fold_keras  # noqa: E402
from bnfold.keras.layer_graph import _model_kind, _walk_refs  # noqa: E402
from bnfold.keras.plan import LINEAR  # noqa: E402

MODELS = ["MobileNetV2", "ResNet50", "EfficientNetB0", "DenseNet121"]
OUT = Path(__file__).resolve().parent / "keras_fold.json"
TABLE = Path(__file__).resolve().parent / "KERAS.md"


def randomize_bn(model: keras.Model, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for layer in model._flatten_layers():
        if isinstance(layer, keras.layers.BatchNormalization):
            c = layer.moving_mean.shape[0]
            if layer.gamma is not None:
                layer.gamma.assign(rng.uniform(0.5, 1.5, c).astype("float32"))
            if layer.beta is not None:
                layer.beta.assign(rng.normal(0, 0.1, c).astype("float32"))
            layer.moving_mean.assign(rng.normal(0, 0.1, c).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, c).astype("float32"))


def bn_layers(model: keras.Model) -> int:
    return sum(isinstance(layer, keras.layers.BatchNormalization) for layer in model._flatten_layers())


def bn_after_linear(model: keras.Model) -> int:
    count = 0
    config = model.get_config()
    kinds = {e["config"]["name"]: e["class_name"] for e in config["layers"]}
    for entry in config["layers"]:
        if entry["class_name"] == "BatchNormalization":
            sources = {r[0] for node in entry["inbound_nodes"] for _, r in _walk_refs(node, True)}
            count += any(kinds.get(s) in LINEAR for s in sources)
    count += sum(bn_after_linear(layer) for layer in model.layers if _model_kind(layer))
    return count


def predict_time(model: keras.Model, x: np.ndarray) -> float:
    start = time.perf_counter()
    model.predict(x, batch_size=len(x), verbose=0)
    return time.perf_counter() - start


def measure(name: str, size: int, repeats: int, tmp: Path) -> dict[str, object]:
    keras.utils.set_random_seed(0)
    model = getattr(keras.applications, name)(weights=None, input_shape=(size, size, 3), classifier_activation=None)
    randomize_bn(model)
    start = time.perf_counter()
    folded, result = fold_keras(model)
    fold_s = time.perf_counter() - start
    rng = np.random.default_rng(1)
    x8 = rng.uniform(0, 255 if name.startswith("Efficient") else 1, (8, size, size, 3)).astype("float32")
    a = np.asarray(model.predict(x8, verbose=0), dtype=np.float64)
    b = np.asarray(folded.predict(x8, verbose=0), dtype=np.float64)
    row: dict[str, object] = {
        "model": name,
        "input": f"{size}x{size}",
        "bn_before": bn_layers(model),
        "bn_after": bn_layers(folded),
        "bn_after_linear_before": bn_after_linear(model),
        "bn_after_linear_after": bn_after_linear(folded),
        "folded_sites": result.count("folded"),
        "verification_passed": bool(result.verification and result.verification.passed),
        "max_abs_error": float(np.max(np.abs(a - b))),
        "max_abs_output": float(np.max(np.abs(a))),
        "max_rel_error": float(np.max(np.abs(a - b)) / np.max(np.abs(a))),
        "fold_s": round(fold_s, 2),
    }
    for batch in (1, 32):
        x = rng.uniform(0, 1, (batch, size, size, 3)).astype("float32")
        predict_time(model, x), predict_time(folded, x)  # warm-up: trace and compile both
        times: dict[str, list[float]] = {"before": [], "after": []}
        for i in range(repeats):  # which model goes first alternates too: a load spike does not always hit the same one
            for label, m in (("before", model), ("after", folded))[:: 1 if i % 2 == 0 else -1]:
                times[label].append(predict_time(m, x))
        before, after = statistics.median(times["before"]), statistics.median(times["after"])
        row[f"predict_b{batch}_before_ms"] = round(before * 1e3, 1)
        row[f"predict_b{batch}_after_ms"] = round(after * 1e3, 1)
        row[f"predict_b{batch}_ratio"] = round(after / before, 3)
    for label, m in (("before", model), ("after", folded)):
        path = tmp / f"{name}_{label}.keras"
        m.save(path)
        row[f"file_{label}_mb"] = round(path.stat().st_size / 1e6, 2)
        path.unlink()
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("models", nargs="*", default=MODELS)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--render", action="store_true", help="only write KERAS.md again from keras_fold.json")
    args = parser.parse_args()
    if args.render:
        data = json.loads(OUT.read_text())
        TABLE.write_text(render(data["meta"], data["rows"]))
        return
    rows = []
    load_before = [round(v, 2) for v in os.getloadavg()]
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            rows.append(measure(name, args.size, args.repeats, Path(tmp)))
            print(json.dumps(rows[-1]), flush=True)
    meta = {
        "keras": keras.__version__,
        "backend": keras.backend.backend(),
        "cpu_count": os.cpu_count(),
        "repeats": args.repeats,
        "outputs": "logits (classifier_activation=None)",
        "load_average_before": load_before,
        "load_average_after": [round(v, 2) for v in os.getloadavg()],
    }
    OUT.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    print(render(meta, rows))
    TABLE.write_text(render(meta, rows))


def render(meta: dict[str, object], rows: list[dict[str, object]]) -> str:
    """benchmarks/KERAS.md: the table of the run in keras_fold.json (``--render`` writes it again without running)."""
    lines = [
        "# Keras in, Keras out: four keras.applications models (issue #17)",
        "",
        f"`python benchmarks/keras_fold.py --repeats {meta['repeats']}` (results in `keras_fold.json`): Keras {meta['keras']}, "
        f"{meta['backend']} backend, {meta['cpu_count']} CPU cores, {rows[0]['input'] if rows else ''} input, weights=None, "
        "BN statistics randomized, logits compared (classifier_activation=None). Each model is folded with "
        "`bnfold.fold_keras` (its check included in *fold s*) and compared once more on a batch of 8. "
        f"`model.predict` times are the median of {meta['repeats']} calls from one run, original and folded in alternation "
        f"(which goes first alternating too) after one warm-up each; load average {meta.get('load_average_before')} before, {meta.get('load_average_after')} after. "
        "File sizes are `model.save(...keras)`.",
        "",
        "| model | BN layers before | BN layers after | BN right after conv/dense: before / after | folded | max abs error | max rel error | fold s |"
        " predict b1 ms: before / after (ratio) | predict b32 ms: before / after (ratio) | .keras MB: before / after |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['bn_before']} | {r['bn_after']} | {r['bn_after_linear_before']} / {r['bn_after_linear_after']} |"
            f" {r['folded_sites']} | {r['max_abs_error']:.1e} | {r.get('max_rel_error', float('nan')):.1e} | {r['fold_s']} |"
            f" {r['predict_b1_before_ms']} / {r['predict_b1_after_ms']} ({r['predict_b1_ratio']:.2f}) |"
            f" {r['predict_b32_before_ms']} / {r['predict_b32_after_ms']} ({r['predict_b32_ratio']:.2f}) |"
            f" {r['file_before_mb']} / {r['file_after_mb']} |"
        )
    lines += [
        "",
        "- *BN layers after*: DenseNet121's 62 are its pre-activation BNs (after a concatenation or pooling, before a ReLU):",
        "  nothing linear to fold into, so they stay (`--standalone-affine` would make them `ChannelAffine` layers).",
        "  No model keeps a BN directly after a conv or dense layer.",
        "- *predict times*: `model.predict` on a shared 2-core machine; with other jobs running (see the load average) the",
        "  ratios move by tens of percent from one run to the next, so only a ratio that repeats across runs means something.",
        "  Folding removes per-channel elementwise work; TensorFlow's grappler already fuses much of it into the conv at run time.",
        "- *max error*: logits of the original and the folded model, float32, same batch of 8.",
        "- *File size*: the folded file is smaller by the BN layers' four vectors each, less the bias each folded layer gains.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
