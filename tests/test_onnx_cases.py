"""Constructed ONNX models (onnx.helper) for each promise of issue #12, run in onnxruntime with optimizations off."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import ROOT
from onnx import TensorProto, helper, numpy_helper

from bnfold.onnx.pipeline import fold_onnx, fold_onnx_file


def ort_run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return list(session.run(None, feeds))


def init(name: str, value: object, dtype: type = np.float32) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)


def bn_inits(prefix: str, c: int, rng: np.random.Generator, dtype: type = np.float32) -> list[onnx.TensorProto]:
    return [
        init(f"{prefix}_g", rng.uniform(0.5, 1.5, c), dtype),
        init(f"{prefix}_b", rng.normal(0, 0.3, c), dtype),
        init(f"{prefix}_m", rng.normal(0, 0.3, c), dtype),
        init(f"{prefix}_v", rng.uniform(0.5, 2.0, c), dtype),
    ]


def bn(prefix: str, inp: str, out: str, **attrs: object) -> onnx.NodeProto:
    return helper.make_node("BatchNormalization", [inp, *(f"{prefix}_{k}" for k in "gbmv")], [out], name=prefix, **attrs)


def model(
    nodes: list[onnx.NodeProto],
    inits: list[onnx.TensorProto],
    x_shape: list[object],
    y_shape: list[object] | None = None,
    elem: int = TensorProto.FLOAT,
    opset: int = 17,
    ir: int = 8,
    extra_inputs: list[onnx.ValueInfoProto] | None = None,
) -> onnx.ModelProto:
    y_shape = y_shape or [f"d{i}" for i in range(len(x_shape))]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", elem, x_shape), *(extra_inputs or [])],
        [helper.make_tensor_value_info("y", elem, y_shape)],
        inits,
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = ir
    onnx.checker.check_model(m)
    return m


def assert_equal_outputs(original: onnx.ModelProto, folded: onnx.ModelProto, feeds: dict[str, np.ndarray], tol: float = 1e-5) -> None:
    for a, b in zip(ort_run(original, feeds), ort_run(folded, feeds), strict=True):
        assert np.all(np.isfinite(b)), "the fold created non-finite values"
        np.testing.assert_allclose(b, a, rtol=tol, atol=tol * max(1.0, float(np.max(np.abs(a)))))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(12)


# -- constants are whatever is computed from constants -----------------------------------------------------


def test_computed_constants_fold_weights_behind_transpose_reshape_bias_behind_identity_and_expand(rng: np.random.Generator) -> None:
    w = rng.standard_normal((4, 3, 3, 3))
    nodes = [
        helper.make_node("Transpose", ["w_t"], ["w_a"], perm=[1, 0, 2, 3]),  # weights behind Transpose
        helper.make_node("Reshape", ["w_a", "shape"], ["w"]),  # ... and Reshape
        helper.make_node("Identity", ["b_shared"], ["b1"]),  # legacy exporter: deduplicated bias behind Identity
        helper.make_node("Shape", ["w"], ["w_shape"], start=0, end=1),
        helper.make_node("Constant", [], ["zero"], value=init("zero_v", 0.0)),
        helper.make_node("CastLike", ["zero", "x"], ["zero_like"]),  # reads x only for its type
        helper.make_node("Expand", ["zero_like", "w_shape"], ["b2"]),  # torch dynamo optimize=False zero bias
        helper.make_node("Conv", ["x", "w", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        bn("bn1", "c1", "y1"),
        helper.make_node("Conv", ["y1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        bn("bn2", "c2", "c3"),
        helper.make_node("Identity", ["b_shared"], ["b3"]),
        helper.make_node("Conv", ["c3", "w3", "b3"], ["c4"], name="conv3"),
        helper.make_node("Relu", ["c4"], ["y"]),
    ]
    inits = [
        init("w_t", np.transpose(w, (1, 0, 2, 3))),
        init("shape", [4, 3, 3, 3], np.int64),
        init("b_shared", rng.standard_normal(4)),
        init("w2", rng.standard_normal((4, 4, 3, 3))),
        init("w3", rng.standard_normal((4, 4, 1, 1))),
        *bn_inits("bn1", 4, rng),
        *bn_inits("bn2", 4, rng),
    ]
    original = model(nodes, inits, [1, 3, 6, 6])
    folded, result = fold_onnx(original)
    assert [(s.name, s.action, s.folded_into) for s in result.sites] == [("bn1", "folded", "conv1"), ("bn2", "folded", "conv2")]
    assert result.verification is not None and result.verification.passed
    assert [n.op_type for n in folded.graph.node] == ["Conv", "Conv", "Identity", "Conv", "Relu"]  # the constant chains are gone
    assert_equal_outputs(original, folded, {"x": rng.standard_normal((1, 3, 6, 6)).astype(np.float32)})
    shared = {t.name: numpy_helper.to_array(t) for t in folded.graph.initializer}["b_shared"]
    np.testing.assert_array_equal(shared, numpy_helper.to_array(inits[2]))  # conv3's bias is untouched


def test_bias_computed_at_run_time_or_overridable_initializer_is_skipped_never_nan(rng: np.random.Generator) -> None:
    """A bias that depends on the input, and an initializer that is also a graph input: not constants, so not folded."""
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["mean_all"], keepdims=0),
        helper.make_node("Expand", ["mean_all", "four"], ["b_rt"]),  # computed from x: a run-time value
        helper.make_node("Conv", ["x", "w", "b_rt"], ["c1"], name="conv1"),
        bn("bn1", "c1", "c2"),
        helper.make_node("Conv", ["c2", "w_over"], ["c3"], name="conv2"),
        bn("bn2", "c3", "y"),
    ]
    inits = [init("w", rng.standard_normal((4, 2, 1, 1))), init("four", [4], np.int64), init("w_over", rng.standard_normal((4, 4, 1, 1)))]
    inits += bn_inits("bn1", 4, rng) + bn_inits("bn2", 4, rng)
    over = helper.make_tensor_value_info("w_over", TensorProto.FLOAT, [4, 4, 1, 1])  # IR 3 style: the caller may feed it
    original = model(nodes, inits, [1, 2, 3, 3], extra_inputs=[over])
    folded, result = fold_onnx(original, verify_outputs=False)
    reasons = {s.name: (s.action, s.reason or "") for s in result.sites}
    assert reasons["bn1"][0] == "standalone" and "conv1 bias is not a constant" in reasons["bn1"][1]
    assert reasons["bn2"][0] == "standalone" and "conv2 weights are not constants" in reasons["bn2"][1]
    assert_equal_outputs(original, folded, {"x": rng.standard_normal((1, 2, 3, 3)).astype(np.float32)})
    w_over = rng.standard_normal((4, 4, 1, 1)).astype(np.float32)
    assert_equal_outputs(original, folded, {"x": np.ones((1, 2, 3, 3), np.float32), "w_over": w_over})  # still overridable


def test_fp16_fold_that_would_overflow_is_skipped_with_the_reason(rng: np.random.Generator) -> None:
    """W * s past 65504 would write inf into an fp16 model: the site is not folded into the conv (foldmath.storable)."""
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), bn("bn", "c", "y")]
    inits = [init("w", np.full((2, 2, 1, 1), 3000.0), np.float16)]
    inits += [
        init("bn_g", [40.0, 40.0], np.float16),
        init("bn_b", [0.0, 0.0], np.float16),
        init("bn_m", [0.0, 0.0], np.float16),
        init("bn_v", [1.0, 1.0], np.float16),
    ]
    original = model(nodes, inits, [1, 2, 2, 2], elem=TensorProto.FLOAT16)
    folded, result = fold_onnx(original, verify_outputs=False)
    (site,) = result.sites
    assert site.action == "standalone" and "not finite in float16" in (site.reason or ""), site
    x = np.full((1, 2, 2, 2), 1e-3, np.float16)
    (a,), (b,) = ort_run(original, {"x": x}), ort_run(folded, {"x": x})
    assert np.all(np.isfinite(a)) and np.all(np.isfinite(b))
    np.testing.assert_allclose(b.astype(np.float64), a.astype(np.float64), rtol=1e-2)


# -- backward fold -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["Conv", "Gemm", "GemmT", "MatMul"])
def test_backward_fold_into_unpadded_conv_gemm_and_matmul(op: str, rng: np.random.Generator) -> None:
    if op == "Conv":
        linear = helper.make_node("Conv", ["pre", "w", "bias"], ["y"], name="lin")
        inits = [init("w", rng.standard_normal((5, 3, 3, 3))), init("bias", rng.standard_normal(5))]
        x_shape = [2, 3, 6, 6]
    elif op == "MatMul":
        linear = helper.make_node("MatMul", ["pre", "w"], ["y"], name="lin")
        inits = [init("w", rng.standard_normal((3, 5)))]
        x_shape = [2, 3]
    else:
        trans = op == "GemmT"
        linear = helper.make_node("Gemm", ["pre", "w", "bias"], ["y"], name="lin", transB=int(trans), beta=0.5)
        inits = [init("w", rng.standard_normal((5, 3) if trans else (3, 5))), init("bias", rng.standard_normal(5))]
        x_shape = [2, 3]
    original = model([bn("bn", "x", "pre"), linear], inits + bn_inits("bn", 3, rng), x_shape)
    folded, result = fold_onnx(original)
    (site,) = result.sites
    assert (site.action, site.folded_into, site.reason) == ("folded", "lin", "backward")
    assert "BatchNormalization" not in [n.op_type for n in folded.graph.node]
    assert result.verification is not None and result.verification.passed
    assert_equal_outputs(original, folded, {"x": rng.standard_normal(x_shape).astype(np.float32)})


def test_no_backward_fold_into_padded_or_grouped_conv(rng: np.random.Generator) -> None:
    nodes = [
        bn("bn1", "x", "p1"),
        helper.make_node("Conv", ["p1", "w1"], ["c1"], name="padded", pads=[1, 1, 1, 1]),
        bn("bn2", "c1", "p2"),
        helper.make_node("Relu", ["p2"], ["r"]),
        bn("bn3", "r", "p3"),
        helper.make_node("Conv", ["p3", "w2"], ["y"], name="grouped", group=2),
    ]
    inits = [init("w1", rng.standard_normal((4, 2, 3, 3))), init("w2", rng.standard_normal((4, 2, 1, 1)))]
    inits += bn_inits("bn1", 2, rng) + bn_inits("bn2", 4, rng) + bn_inits("bn3", 4, rng)
    original = model(nodes, inits, [1, 2, 5, 5])
    folded, result = fold_onnx(original)
    sites = {s.name: s for s in result.sites}
    assert sites["bn1"].action == "standalone" and "padded pads its input" in (sites["bn1"].reason or "")
    assert sites["bn2"].action == "folded" and sites["bn2"].folded_into == "padded"
    assert sites["bn3"].action == "standalone" and "grouped is grouped" in (sites["bn3"].reason or "")
    assert_equal_outputs(original, folded, {"x": rng.standard_normal((1, 2, 5, 5)).astype(np.float32)})


# -- opsets, dynamic axes, nothing to fold --------------------------------------------------------------------


@pytest.mark.parametrize(("opset", "ir"), [(20, 10), (21, 10)])
def test_opset_20_plus_folds_and_keeps_opset_and_ir_version(opset: int, ir: int, rng: np.random.Generator, tmp_path: Path) -> None:
    original = model(
        [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), bn("bn", "c", "y")],
        [init("w", rng.standard_normal((3, 2, 1, 1))), *bn_inits("bn", 3, rng)],
        ["N", 2, 4, 4],
        opset=opset,
        ir=ir,
    )
    src, dst = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(original, str(src))
    result = fold_onnx_file(src, dst)
    written = onnx.load(str(dst))
    assert written.ir_version == ir and [(o.domain, o.version) for o in written.opset_import] == [("", opset)]
    assert result.verification is not None and result.verification.passed
    assert result.verification.inputs["x"].startswith("random float32 [2, 2, 4, 4]")  # dynamic batch: the default batch


def test_dynamic_height_and_width_are_checked_at_the_default_size(rng: np.random.Generator) -> None:
    """The usual export, ``x: [N, 3, H, W]``: no --input-shape needed; the table says which shape was used."""
    original = model(
        [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), bn("bn", "c", "y")],
        [init("w", rng.standard_normal((3, 2, 1, 1))), *bn_inits("bn", 3, rng)],
        ["N", 2, "H", "W"],
    )
    _, result = fold_onnx(original)
    assert result.verification is not None and result.verification.passed
    assert "[2, 2, 64, 64]" in result.verification.inputs["x"] and "image-like NCHW" in result.verification.inputs["x"]


def test_dynamic_axes_input_shape_overrides(rng: np.random.Generator) -> None:
    original = model(
        [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), bn("bn", "c", "y")],
        [init("w", rng.standard_normal((3, 2, 1, 1))), *bn_inits("bn", 3, rng)],
        ["N", 2, "H", "W"],
    )
    _, result = fold_onnx(original, input_shapes={"x": [3, 2, 7, 5]})
    assert result.verification is not None and result.verification.passed
    assert "[3, 2, 7, 5]" in result.verification.inputs["x"] and "--input-shape" in result.verification.inputs["x"]


def test_nothing_to_fold_is_written_unchanged_without_a_check(tmp_path: Path) -> None:
    """No BN (here a string-input model whose inputs bnfold could not make up): written unchanged, exit 0, no check."""
    nodes = [helper.make_node("Identity", ["x"], ["y"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.STRING, ["N"])], [helper.make_tensor_value_info("y", TensorProto.STRING, ["N"])]
    )
    original = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    original.ir_version = 8
    src, dst, report = tmp_path / "in.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    onnx.save(original, str(src))
    proc = cli(src, dst, "--report", report)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(report.read_text())
    assert data["verification"] is None and data["onnx"]["unchanged"] is True and data["sites"] == []
    assert onnx.load(str(dst)) == original


# -- external data ---------------------------------------------------------------------------------------------


def _external_model(folder: Path, rng: np.random.Generator, location: str = "m.onnx.data") -> Path:
    original = model(
        [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), bn("bn", "c", "y")],
        [init("w", rng.standard_normal((16, 8, 3, 3))), *bn_inits("bn", 16, rng)],
        [1, 8, 5, 5],
    )
    path = folder / "m.onnx"
    onnx.save_model(original, str(path), save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    if location != "m.onnx.data":
        stored = onnx.load(str(path), load_external_data=False)
        for tensor in stored.graph.initializer:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = location
        path.write_bytes(stored.SerializeToString())
    return path


@pytest.mark.parametrize("where", ["parent", "absolute", "symlink"])
def test_external_data_outside_the_model_directory_is_refused_exit_3(where: str, rng: np.random.Generator, tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    _external_model(tmp_path, rng)  # the data really exists one level up: refusing it is the location check, not a missing file
    secret = tmp_path / "m.onnx.data"
    if where == "parent":
        location = "../m.onnx.data"
    elif where == "absolute":
        location = str(secret)
    else:
        (models / "link.data").symlink_to(secret)
        location = "link.data"
    path = _external_model(models, rng, location)
    out = tmp_path / "out.onnx"
    proc = cli(path, out)
    assert proc.returncode == 3, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "external data" in lines[0] and "refused" in lines[0], proc.stderr
    assert not out.exists() and not out.with_name("out.onnx.data").exists()


def test_external_data_model_folds_with_output_data_file_beside_out(rng: np.random.Generator, tmp_path: Path) -> None:
    src_dir, out_dir = tmp_path / "src", tmp_path / "out"
    src_dir.mkdir()
    out_dir.mkdir()
    path = _external_model(src_dir, rng)
    out = out_dir / "folded.onnx"
    result = fold_onnx_file(path, out)
    assert result.onnx is not None and result.onnx.external_data == str(out_dir / "folded.onnx.data")
    assert sorted(p.name for p in out_dir.iterdir()) == ["folded.onnx", "folded.onnx.data"]
    original, folded = onnx.load(str(path)), onnx.load(str(out))
    assert_equal_outputs(original, folded, {"x": rng.standard_normal((1, 8, 5, 5)).astype(np.float32)})


# -- inspect and doctor on .onnx --------------------------------------------------------------------------------


def test_inspect_and_doctor_accept_onnx_stats_at_init_and_drift(rng: np.random.Generator, tmp_path: Path) -> None:
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        bn("bn_init", "c", "c2"),
        helper.make_node("Conv", ["c2", "w2"], ["c3"], name="conv2"),
        bn("bn_drift", "c3", "y"),
    ]
    inits = [init("w", rng.standard_normal((3, 2, 1, 1))), init("w2", rng.standard_normal((3, 3, 1, 1)))]
    inits += [init("bn_init_g", np.ones(3)), init("bn_init_b", np.zeros(3)), init("bn_init_m", np.zeros(3)), init("bn_init_v", np.ones(3))]
    inits += [init("bn_drift_g", np.ones(3)), init("bn_drift_b", np.zeros(3)), init("bn_drift_m", [50.0, 50.0, 50.0])]
    inits += [init("bn_drift_v", [1e-3, 1e-3, 1e-3])]
    path = tmp_path / "m.onnx"
    onnx.save(model(nodes, inits, ["N", 2, 4, 4]), str(path))
    np.save(tmp_path / "data.npy", rng.standard_normal((8, 2, 4, 4)).astype(np.float32))
    report = tmp_path / "doctor.json"
    proc = cli("doctor", path, "--data", tmp_path / "data.npy", "--json", report)
    assert proc.returncode == 1, proc.stderr
    findings = {(f["code"], tuple(f["nodes"])) for f in json.loads(report.read_text())["findings"]}
    assert ("BN_STATS_AT_INIT", ("bn_init",)) in findings
    assert ("BN_STATS_DRIFT", ("bn_drift",)) in findings
    inspect_report = tmp_path / "inspect.json"
    proc = cli("inspect", path, "--report", inspect_report, "-q")
    assert proc.returncode == 0, proc.stderr
    sites = json.loads(inspect_report.read_text())["sites"]
    assert [(s["name"], s["action"]) for s in sites] == [("bn_init", "folded"), ("bn_drift", "folded")]


# -- no TensorFlow on ONNX-only paths ----------------------------------------------------------------------------

BLOCK_TF = """
import sys
class _NoTF:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tensorflow", "tf2onnx", "tf_keras"):
            raise ImportError("TensorFlow is not installed here (test hook)")
        return None
sys.meta_path.insert(0, _NoTF())
"""


def cli(*args: object, block_tf: bool = False, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    prelude = BLOCK_TF if block_tf else ""
    code = prelude + "import sys\nfrom bnfold.cli import main\nsys.argv = ['bnfold', *sys.argv[1:]]\nmain()\n"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=300, env=env)


def test_onnx_fold_inspect_doctor_and_api_work_where_tensorflow_cannot_be_imported(tmp_path: Path) -> None:
    """Models built here (no published file needed): three Conv1d+BN as torch exports them, and two BN in training mode."""
    rng = np.random.default_rng(5)
    nodes, inits, h = [], [], "x"
    for i in range(3):
        nodes += [helper.make_node("Conv", [h, f"w{i}", f"b{i}"], [f"c{i}"], name=f"conv{i}", pads=[1, 1]), bn(f"bn{i}", f"c{i}", f"h{i}")]
        inits += [init(f"w{i}", rng.standard_normal((4, 2 if i == 0 else 4, 3))), init(f"b{i}", rng.standard_normal(4)), *bn_inits(f"bn{i}", 4, rng)]
        h = f"h{i}"
    nodes.append(helper.make_node("Relu", [h], ["y"]))
    src = tmp_path / "conv1d_bn.onnx"
    onnx.save(model(nodes, inits, ["N", 2, 16]), str(src))
    train_nodes = [bn("t0", "x", "t", training_mode=1), bn("t1", "t", "y", training_mode=1)]
    train = tmp_path / "train_mode_bn.onnx"
    onnx.save(model(train_nodes, bn_inits("t0", 2, rng) + bn_inits("t1", 2, rng), ["N", 2, 16], opset=17), str(train))
    out = tmp_path / "out.onnx"
    proc = cli(src, out, "-q", block_tf=True)
    assert proc.returncode == 0, proc.stderr
    assert out.is_file()
    proc = cli("inspect", src, "-q", block_tf=True)
    assert proc.returncode == 0, proc.stderr
    findings = tmp_path / "f.json"
    proc = cli("doctor", train, "--json", findings, block_tf=True)
    assert proc.returncode == 1, proc.stderr
    assert [f["code"] for f in json.loads(findings.read_text())["findings"]].count("BN_TRAINING_MODE") == 2
    api = BLOCK_TF + (
        "import bnfold, sys\n"
        f"model, result = bnfold.fold_onnx({str(src)!r})\n"
        "assert result.verification.passed and result.count('folded') == 3\n"
        f"bnfold.fold_onnx_file({str(src)!r}, {str(tmp_path / 'api.onnx')!r})\n"
        "model2, _ = bnfold.to_onnx(model)\n"
        "assert 'tensorflow' not in sys.modules\n"
    )
    proc = subprocess.run([sys.executable, "-c", api], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run([sys.executable, "-c", BLOCK_TF + "import tensorflow"], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0  # the hook really blocks TensorFlow
