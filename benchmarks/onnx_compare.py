"""bnfold's ONNX output against tf2onnx's own conversion of the unfolded graph.

Run: ``python benchmarks/onnx_compare.py [MobileNetV2 EfficientNetB0 ResNet50]``.
Each model is a keras.applications network at 224x224 (weights=None,
randomized BN statistics), frozen once. For each it reports node counts,
BatchNormalization nodes and per-channel Mul/Add left right behind a linear op
(``bnfold.onnx_fold.leftover_sites``), the time of tf2onnx alone and of
``bnfold in.pb out.onnx`` (TF fold + tf2onnx + ONNX fold + onnxruntime check),
and the onnxruntime error (optimizations off) of each file against TF.
Single runs on a shared machine: quote ratios, not absolute times.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from keras_apps import WORK, randomized  # noqa: E402

from bnfold.freeze import freeze_keras  # noqa: E402
from bnfold.io import load_graph_def  # noqa: E402
from bnfold.onnx_export import DEFAULT_OPSET, OrtRunner, convert  # noqa: E402
from bnfold.onnx_fold import leftover_sites  # noqa: E402
from bnfold.verification import GraphRunner, find_inputs, find_outputs  # noqa: E402

MODELS = ["MobileNetV2", "EfficientNetB0", "ResNet50"]


def frozen_path(name: str) -> Path:
    WORK.mkdir(exist_ok=True)
    path = WORK / f"{name}.pb"
    if not path.exists():
        path.write_bytes(freeze_keras(randomized(name)).graph_def.SerializeToString(deterministic=True))
    return path


def ort_error(graph_def: object, model: object, tf_in: str, tf_out: str) -> float:
    x = np.random.default_rng(0).standard_normal((2, 224, 224, 3)).astype(np.float32)
    runner = GraphRunner(graph_def)  # type: ignore[arg-type]
    (expected,) = runner.run([tf_out], {tf_in: x})
    runner.close()
    (actual,) = OrtRunner(model, {tf_in: f"{tf_in}:0", tf_out: f"{tf_out}:0"}).run([tf_out], {tf_in: x})  # type: ignore[arg-type]
    return float(np.max(np.abs(expected.astype(np.float64) - actual)))


def measure(name: str) -> dict[str, object]:
    import onnx

    path = frozen_path(name)
    graph_def = load_graph_def(path)
    (tf_in,) = [s.name for s in find_inputs(graph_def)]
    (tf_out,) = find_outputs(graph_def)
    start = time.perf_counter()
    plain = convert(graph_def, [tf_in], [tf_out], DEFAULT_OPSET)
    tf2onnx_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        out, report = Path(tmp) / "out.onnx", Path(tmp) / "r.json"
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "bnfold.cli", str(path), str(out), "--report", str(report), "-q"], capture_output=True, text=True
        )
        bnfold_cli_s = time.perf_counter() - start
        if proc.returncode:
            raise SystemExit(f"bnfold failed on {name}: {proc.stderr}")
        folded = onnx.load(str(out))
        data = json.loads(report.read_text())
    check = data["verification"]["outputs"][0]
    return {
        "model": name,
        "nodes_tf2onnx": len(plain.graph.node),
        "nodes_bnfold": len(folded.graph.node),
        "left_tf2onnx": leftover_sites(plain),
        "left_bnfold": leftover_sites(folded),
        "onnx_pass_sites_folded": data["onnx"]["summary"]["folded"],
        "tf_sites_folded": data["summary"]["folded"],
        "time_tf2onnx_s": round(tf2onnx_s, 2),
        "time_bnfold_cli_s": round(bnfold_cli_s, 2),
        "ort_err_tf2onnx": ort_error(graph_def, plain, tf_in, tf_out),
        "ort_err_bnfold": check["max_abs_error"],
        "ort_err_bnfold_rel": check["max_rel_error"],
    }


def main() -> None:
    rows = [measure(name) for name in (sys.argv[1:] or MODELS)]
    print(json.dumps(rows, indent=1))
    print()
    print(
        "| model | nodes tf2onnx | nodes bnfold | BN / Mul / Add left tf2onnx | BN / Mul / Add left bnfold | tf2onnx s | bnfold CLI s | ORT err tf2onnx | ORT err bnfold |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        lt, lb = r["left_tf2onnx"], r["left_bnfold"]
        print(
            f"| {r['model']} | {r['nodes_tf2onnx']} | {r['nodes_bnfold']} | {lt['BatchNormalization']} / {lt['Mul']} / {lt['Add']} | "  # type: ignore[index]
            f"{lb['BatchNormalization']} / {lb['Mul']} / {lb['Add']} | {r['time_tf2onnx_s']} | {r['time_bnfold_cli_s']} | "  # type: ignore[index]
            f"{r['ort_err_tf2onnx']:.2e} | {r['ort_err_bnfold']:.2e} |"
        )


if __name__ == "__main__":
    main()
