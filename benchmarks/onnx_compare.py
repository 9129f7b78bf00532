"""bnfold on ONNX files against the other ONNX folders, and bnfold's ONNX output against tf2onnx.

Run: ``python benchmarks/onnx_compare.py`` (the tool comparison, results in
benchmarks/ONNX.md) or ``python benchmarks/onnx_compare.py --tf [MobileNetV2 ...]``
(the TF -> ONNX route below).

Tool comparison: bnfold, onnxoptimizer (``fuse_bn_into_conv``), onnxsim,
onnxslim and onnxruntime's offline optimizer (basic level,
``optimized_model_filepath``) on every file of ../shared/realworld/onnx/, on
tf2onnx's plain conversion of keras.applications MobileNetV2 (unfolded graph,
96x96), and on generated models (BN after ConvTranspose, Gemm, MatMul, Conv1d,
Conv3d, and BN before an unpadded conv). Per tool: BN left, BN-like Mul/Add
left behind a linear op (``leftover_sites``), the output error against the
original in onnxruntime with optimizations off, and wall time (in-process, one
run; bnfold's includes its own onnxruntime check).

TF route: each model is a keras.applications network at 224x224 (weights=None,
randomized BN statistics), frozen once. For each it reports node counts,
BatchNormalization nodes and per-channel Mul/Add left right behind a linear op
(``bnfold.onnx.recognize.leftover_sites``), the time of tf2onnx alone and of
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

from bnfold.onnx.export import DEFAULT_OPSET, OrtRunner  # noqa: E402
from bnfold.onnx.recognize import leftover_sites  # noqa: E402
from bnfold.tf.freeze import freeze_keras  # noqa: E402
from bnfold.tf.io import load_graph_def  # noqa: E402
from bnfold.tf.verify import GraphRunner, find_inputs, find_outputs  # noqa: E402

MODELS = ["MobileNetV2", "EfficientNetB0", "ResNet50"]


def frozen_path(name: str) -> Path:
    WORK.mkdir(exist_ok=True)
    path = WORK / f"{name}.pb"
    if not path.exists():
        path.write_bytes(freeze_keras(randomized(name)).graph_def.SerializeToString(deterministic=True))
    return path


def stock_tf2onnx(graph_def: object, tf_in: str, tf_out: str) -> object:
    """tf2onnx as its users call it (bnfold's own ``convert`` runs tf2onnx's stages leaner)."""
    import tf2onnx

    model, _ = tf2onnx.convert.from_graph_def(graph_def, input_names=[f"{tf_in}:0"], output_names=[f"{tf_out}:0"], opset=DEFAULT_OPSET)
    return model


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
    plain = stock_tf2onnx(graph_def, tf_in, tf_out)
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


def main_tf(names: list[str]) -> None:
    rows = [measure(name) for name in (names or MODELS)]
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


# -- tool comparison on ONNX input ------------------------------------------------------------------------------
REALWORLD = Path(__file__).resolve().parents[2] / "shared" / "realworld" / "onnx"
TOOLS = ["bnfold", "onnxoptimizer", "onnxsim", "onnxslim", "ort-basic"]


def _bn(prefix: str, inp: str, out: str, c: int, rng: np.random.Generator) -> tuple[object, list[object]]:
    from onnx import helper, numpy_helper

    values = {"g": rng.uniform(0.5, 1.5, c), "b": rng.normal(0, 0.3, c), "m": rng.normal(0, 0.3, c), "v": rng.uniform(0.5, 2, c)}
    inits = [numpy_helper.from_array(v.astype(np.float32), f"{prefix}_{k}") for k, v in values.items()]
    node = helper.make_node("BatchNormalization", [inp, *(f"{prefix}_{k}" for k in "gbmv")], [out], name=prefix)
    return node, inits


def generated_models() -> dict[str, object]:
    """Small models with one BN pattern each, as exporters write them (static shapes, opset 17)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    specs = {
        "gen_convtranspose_bn": ("ConvTranspose", (8, 6, 2, 2), [1, 8, 8, 8], {"strides": [2, 2]}, "after"),
        "gen_convtranspose_bias_add_bn": ("ConvTranspose", (8, 6, 2, 2), [1, 8, 8, 8], {"strides": [2, 2]}, "add"),
        "gen_gemm_bn": ("Gemm", (16, 32), [4, 32], {"transB": 1}, "after"),
        "gen_matmul_bn": ("MatMul", (32, 16), [4, 32], {}, "after"),
        "gen_matmul_transpose_bn": ("MatMul", (32, 16), [4, 32], {}, "transpose"),
        "gen_conv1d_bn": ("Conv", (16, 8, 3), [1, 8, 32], {"pads": [1, 1]}, "after"),
        "gen_conv3d_bn": ("Conv", (8, 4, 3, 3, 3), [1, 4, 8, 8, 8], {"pads": [1] * 6}, "after"),
        "gen_bn_before_conv": ("Conv", (16, 8, 3, 3), [1, 8, 16, 16], {}, "before"),
        "gen_bn_before_gemm": ("Gemm", (16, 32), [4, 32], {"transB": 1}, "before"),
    }
    models = {}
    for name, (op, w_shape, x_shape, attrs, where) in specs.items():
        w = rng.standard_normal(w_shape).astype(np.float32)
        inits = [numpy_helper.from_array(w if where != "transpose" else w.T.copy(), "w")]
        nodes = []
        data = "x"
        if where == "before":
            node, more = _bn("bn", "x", "pre", x_shape[1], rng)
            nodes.append(node)
            inits += more
            data = "pre"
        weights = "w"
        if where == "transpose":
            nodes.append(helper.make_node("Transpose", ["w"], ["w_t"], perm=[1, 0]))
            weights = "w_t"
        nodes.append(helper.make_node(op, [data, weights], ["lin"], name="lin", **attrs))
        channels = w_shape[1] if op in ("ConvTranspose", "MatMul") else w_shape[0]
        lin = "lin"
        if where == "add":
            inits.append(numpy_helper.from_array(rng.standard_normal((channels, 1, 1)).astype(np.float32), "bias"))
            nodes.append(helper.make_node("Add", ["lin", "bias"], ["lin_b"]))
            lin = "lin_b"
        if where == "before":
            nodes.append(helper.make_node("Relu", [lin], ["y"]))
        else:
            node, more = _bn("bn", lin, "y", channels, rng)
            nodes.append(node)
            inits += more
        graph = helper.make_graph(
            nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        models[name] = onnx_infer(model)
    return models


def onnx_infer(model: object) -> object:
    import onnx

    return onnx.shape_inference.infer_shapes(model)  # type: ignore[arg-type]


def mobilenet_export(work: Path) -> Path:
    """tf2onnx's own conversion of an unfolded keras.applications MobileNetV2 (96x96): what a TF user exports."""
    import onnx

    path = work / "mobilenetv2_tf2onnx.onnx"
    if not path.exists():
        model = randomized("MobileNetV2", 96)
        graph_def = freeze_keras(model).graph_def
        (tf_in,) = [s.name for s in find_inputs(graph_def)]
        (tf_out,) = find_outputs(graph_def)
        onnx.save(stock_tf2onnx(graph_def, tf_in, tf_out), str(path))
    return path


def run_tool(tool: str, src: Path, dst: Path) -> str | None:
    """Run one tool from ``src`` to ``dst``; an error message if it fails."""
    import onnx

    try:
        if tool == "bnfold":
            from bnfold.onnx.pipeline import fold_onnx_file

            fold_onnx_file(src, dst)
        elif tool == "onnxoptimizer":
            import onnxoptimizer

            onnx.save(onnxoptimizer.optimize(onnx.load(str(src)), ["fuse_bn_into_conv"]), str(dst))
        elif tool == "onnxsim":
            import onnxsim

            model, ok = onnxsim.simplify(onnx.load(str(src)))
            if not ok:
                return "onnxsim: check failed"
            onnx.save(model, str(dst))
        elif tool == "onnxslim":
            import onnxslim

            onnx.save(onnxslim.slim(onnx.load(str(src))), str(dst))
        else:
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
            options.optimized_model_filepath = str(dst)
            ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - a benchmark records every tool's failure and goes on
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
    return None


def ort_outputs(path: Path, x: np.ndarray) -> list[np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return list(session.run(None, {session.get_inputs()[0].name: x}))


def compare_tools(work: Path) -> list[dict[str, object]]:
    import onnx

    cases: dict[str, tuple[Path, np.ndarray]] = {}
    for path in sorted(REALWORLD.glob("*.onnx")):
        cases[path.name.removesuffix(".onnx")] = (path, np.load(REALWORLD / f"{path.name.split('.')[0]}.input.npy"))
    rng = np.random.default_rng(1)
    for name, model in generated_models().items():
        path = work / f"{name}.onnx"
        onnx.save(model, str(path))  # type: ignore[arg-type]
        shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]  # type: ignore[attr-defined]
        cases[name] = (path, rng.standard_normal(shape).astype(np.float32))
    mobilenet = mobilenet_export(work)
    cases["mobilenetv2_tf2onnx"] = (mobilenet, rng.standard_normal((2, 96, 96, 3)).astype(np.float32))
    rows = []
    for name, (src, x) in cases.items():
        expected = ort_outputs(src, x)
        before = leftover_sites(onnx.load(str(src)))
        row: dict[str, object] = {"model": name, "before": before}
        for tool in TOOLS:
            dst = work / f"{name}.{tool}.onnx"
            for stale in (dst, dst.with_name(dst.name + ".data")):
                stale.unlink(missing_ok=True)
            start = time.perf_counter()
            failure = run_tool(tool, src, dst)
            elapsed = time.perf_counter() - start
            entry: dict[str, object] = {"time_s": round(elapsed, 3)}
            if failure is None:
                try:
                    actual = ort_outputs(dst, x)
                    scale = max(float(np.max(np.abs(a))) for a in expected)
                    err = max(float(np.max(np.abs(a.astype(np.float64) - b))) for a, b in zip(expected, actual, strict=True))
                    entry.update(left=leftover_sites(onnx.load(str(dst))), rel_err=err / scale if scale else err)
                except Exception as exc:  # noqa: BLE001
                    failure = f"ORT (opts off) cannot run the output: {str(exc).splitlines()[0][:120]}"
            if failure is not None:
                entry["error"] = failure
            row[tool] = entry
        rows.append(row)
    return rows


def print_tools(rows: list[dict[str, object]]) -> None:
    print("| model | BN / Mul / Add before | " + " | ".join(TOOLS) + " |")
    print("|---|---|" + "---|" * len(TOOLS))
    for row in rows:
        b = row["before"]
        cells = [f"{row['model']}", f"{b['BatchNormalization']} / {b['Mul']} / {b['Add']}"]  # type: ignore[index]
        for tool in TOOLS:
            e = row[tool]
            if "error" in e:  # type: ignore[operator]
                cells.append(f"error ({e['error']})")  # type: ignore[index]
            else:
                left = e["left"]  # type: ignore[index]
                cells.append(f"{left['BatchNormalization']} / {left['Mul']} / {left['Add']}; err {e['rel_err']:.1e}; {e['time_s']:.2f} s")
        print("| " + " | ".join(cells) + " |")
    totals = {t: sum(r[t]["left"]["BatchNormalization"] for r in rows if "left" in r[t]) for t in TOOLS}  # type: ignore[index]
    print()
    print("BN left in total: " + ", ".join(f"{t} {n}" for t, n in totals.items()))


def main() -> None:
    if sys.argv[1:2] == ["--tf"]:
        main_tf(sys.argv[2:])
        return
    WORK.mkdir(exist_ok=True)
    work = WORK / "onnx_compare"
    work.mkdir(exist_ok=True)
    rows = compare_tools(work)
    (Path(__file__).resolve().parent / "onnx_tools.json").write_text(json.dumps(rows, indent=1) + "\n")
    print_tools(rows)


if __name__ == "__main__":
    main()
