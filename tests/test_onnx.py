"""ONNX output and ONNX input: real tf2onnx, onnx.checker and onnxruntime (optimizations off), no mocks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import ROOT, assert_close, run_graph
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from test_keras import randomize_bn

import bnfold
from bnfold.api import to_onnx
from bnfold.onnx.export import DEFAULT_OPSET, convert
from bnfold.onnx.fold import fold_model
from bnfold.onnx.recognize import leftover_sites
from bnfold.tf.freeze import freeze_keras
from bnfold.tf.io import load_graph_def
from bnfold.tf.verify import find_inputs, find_outputs


def ort_run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def assert_fully_folded(model: onnx.ModelProto) -> None:
    left = leftover_sites(model)
    assert left == {"BatchNormalization": 0, "Mul": 0, "Add": 0}, left
    assert not [n for n in model.graph.node if n.op_type == "BatchNormalization"]


# -- TF -> ONNX on keras.applications ---------------------------------------------------------


@pytest.mark.parametrize(("name", "refold_plain"), [("MobileNetV2", True), ("EfficientNetB0", True), ("ResNet50", False)])
def test_keras_applications_export_fully_folded_and_equal_in_onnxruntime(name: str, refold_plain: bool) -> None:
    model = getattr(keras.applications, name)(weights=None, input_shape=(32, 32, 3))
    randomize_bn(model)
    graph_def = freeze_keras(model).graph_def
    onnx_model, result = to_onnx(graph_def)
    onnx.checker.check_model(onnx_model)
    assert_fully_folded(onnx_model)
    assert result.verification is not None and result.verification.passed, result.verification
    assert result.onnx is not None and result.onnx.opset == DEFAULT_OPSET
    # Independent check: the written model in onnxruntime (optimizations off) against the TF original.
    x = np.random.default_rng(3).standard_normal((2, 32, 32, 3)).astype(np.float32)
    (tf_in,) = [s.name for s in find_inputs(graph_def)]
    (tf_out,) = find_outputs(graph_def)
    (expected,) = run_graph(graph_def, {tf_in: x}, [tf_out])
    assert [i.name for i in onnx_model.graph.input] == [f"{tf_in}:0"]
    assert [o.name for o in onnx_model.graph.output] == [f"{tf_out}:0"]
    (actual,) = ort_run(onnx_model, {f"{tf_in}:0": x})
    assert_close(expected, actual)
    if not refold_plain:
        return  # ResNet50's second conversion would double the test's 25 s for no new pattern
    # What tf2onnx alone leaves behind is folded by bnfold's ONNX-in path too.
    plain = convert(graph_def, [tf_in], [tf_out])
    refolded, again = to_onnx(plain)
    assert_fully_folded(refolded)
    assert again.verification is not None and again.verification.passed
    assert len(refolded.graph.node) <= len(plain.graph.node)


# -- ONNX input ---------------------------------------------------------------------------------


def _init(name: str, value: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)


def _bn_inits(prefix: str, c: int, rng: np.random.Generator) -> list[onnx.TensorProto]:
    return [
        _init(f"{prefix}_g", rng.uniform(0.5, 1.5, c) * rng.choice([-1, 1], c)),
        _init(f"{prefix}_b", rng.normal(0, 0.3, c)),
        _init(f"{prefix}_m", rng.normal(0, 0.3, c)),
        _init(f"{prefix}_v", rng.uniform(0.5, 2.0, c)),
    ]


def _model(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], x_shape: list[object], y_rank: int = 4) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [f"d{i}" for i in range(y_rank)])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _bn(prefix: str, inp: str, out: str, **attrs: object) -> onnx.NodeProto:
    return helper.make_node(
        "BatchNormalization", [inp, f"{prefix}_g", f"{prefix}_b", f"{prefix}_m", f"{prefix}_v"], [out], name=prefix, epsilon=1e-3, **attrs
    )


def _check_equal(original: onnx.ModelProto, folded: onnx.ModelProto, x: np.ndarray) -> None:
    (a,) = ort_run(original, {"x": x})
    (b,) = ort_run(folded, {"x": x})
    assert_close(a, b)


def test_onnx_batchnorm_after_conv_grouped_convtranspose_gemm_and_standalone(rng: np.random.Generator) -> None:
    w_conv = rng.standard_normal((8, 3, 3, 3))
    w_ct = rng.standard_normal((8, 3, 2, 2))  # group 2: in 8, out 2*3 = 6
    w_gemm = rng.standard_normal((6, 5))
    nodes = [
        helper.make_node("Conv", ["x", "w_conv"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        _bn("bn1", "c", "c_bn"),
        helper.make_node("ConvTranspose", ["c_bn", "w_ct", "b_ct"], ["t"], name="convt", group=2, strides=[2, 2]),
        _bn("bn2", "t", "t_bn"),
        _bn("bn3", "t_bn", "t_bn2"),  # right after bn2, which leaves convt as its producer: folds into convt too
        helper.make_node("Relu", ["t_bn2"], ["r"]),
        _bn("bn4", "r", "r_bn"),  # after Relu: standalone Mul + Add
        helper.make_node("GlobalAveragePool", ["r_bn"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "w_gemm"], ["gm"], name="gemm", beta=0.5),
        _bn("bn5", "gm", "y"),
    ]
    inits = [_init("w_conv", w_conv), _init("w_ct", w_ct), _init("b_ct", rng.standard_normal(6)), _init("w_gemm", w_gemm)]
    for prefix, c in (("bn1", 8), ("bn2", 6), ("bn3", 6), ("bn4", 6), ("bn5", 5)):
        inits += _bn_inits(prefix, c, rng)
    original = _model(nodes, inits, ["N", 3, 6, 6], y_rank=2)
    folded, sites = fold_model(original)
    onnx.checker.check_model(folded)
    actions = {s.name: (s.action, s.folded_into) for s in sites}
    assert actions == {
        "bn1": ("folded", "conv"),
        "bn2": ("folded", "convt"),
        "bn3": ("folded", "convt"),
        "bn4": ("standalone", None),
        "bn5": ("folded", "gemm"),
    }, sites
    assert_fully_folded(folded)
    assert [o.name for o in folded.graph.output] == ["y"]
    _check_equal(original, folded, rng.standard_normal((2, 3, 6, 6)).astype(np.float32))


def test_onnx_mul_add_sub_div_after_matmul_and_conv(rng: np.random.Generator) -> None:
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        helper.make_node("Mul", ["s1", "c"], ["c1"], name="mul_before_const"),  # constant first operand
        helper.make_node("Sub", ["c1", "t1"], ["c2"], name="sub"),
        helper.make_node("Div", ["c2", "d1"], ["c3"], name="div"),
        helper.make_node("Flatten", ["c3"], ["f"]),
        helper.make_node("MatMul", ["f", "wm"], ["m"], name="matmul"),
        helper.make_node("Add", ["m", "bm"], ["m1"], name="bias"),
        helper.make_node("Mul", ["m1", "s2"], ["m2"], name="mul2"),
        helper.make_node("Add", ["m2", "t2"], ["y"], name="add2"),
    ]
    inits = [
        _init("w", rng.standard_normal((4, 2, 3, 3))),
        _init("s1", rng.standard_normal((1, 4, 1, 1))),
        _init("t1", rng.standard_normal((4, 1, 1))),
        _init("d1", rng.uniform(0.5, 2, (4, 1, 1))),
        _init("wm", rng.standard_normal((4 * 2 * 2, 3))),
        _init("bm", rng.standard_normal(3)),
        _init("s2", rng.standard_normal(3)),
        _init("t2", rng.standard_normal((1, 3))),
    ]
    original = _model(nodes, inits, ["N", 2, 4, 4], y_rank=2)
    folded, sites = fold_model(original)
    assert {s.name for s in sites if s.action == "folded"} == {"mul_before_const", "sub", "div", "mul2", "add2"}
    ops = [n.op_type for n in folded.graph.node]
    assert ops == ["Conv", "Flatten", "MatMul", "Add"], ops
    assert_fully_folded(folded)
    _check_equal(original, folded, rng.standard_normal((2, 2, 4, 4)).astype(np.float32))


def test_onnx_safety_training_mode_shared_output_shared_weights_not_per_channel(rng: np.random.Generator) -> None:
    w = rng.standard_normal((4, 2, 1, 1))
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        helper.make_node("Mul", ["c", "s"], ["c1"], name="mul_shared_out"),  # c also read by the Relu below
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Conv", ["x", "w"], ["c2"], name="conv2"),  # shares weight w with conv
        helper.make_node("Mul", ["c2", "s"], ["c3"], name="mul_shared_w"),
        helper.make_node("Mul", ["c3", "spatial"], ["c4"], name="mul_spatial"),  # (1,1,3,3): not per channel
        helper.make_node("Conv", ["c4", "w2"], ["c5"], name="conv3"),
        helper.make_node(
            "BatchNormalization", ["c5", "bn_g", "bn_b", "bn_m", "bn_v"], ["c6", "rm", "rv"], name="bn_train", training_mode=1
        ),
        helper.make_node("Add", ["c6", "c1"], ["y0"]),
        helper.make_node("Add", ["y0", "r"], ["y"]),
    ]
    inits = [
        _init("w", w),
        _init("s", rng.standard_normal((4, 1, 1))),
        _init("spatial", rng.standard_normal((1, 1, 3, 3))),
        _init("w2", rng.standard_normal((4, 4, 1, 1))),
        *_bn_inits("bn", 4, rng),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 3, 3])],
        inits,
    )
    original = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    original.ir_version = 8
    before = original.SerializeToString()
    folded, sites = fold_model(original)
    assert original.SerializeToString() == before  # the input model is never edited
    by_name = {s.name: s for s in sites}
    assert by_name["mul_shared_out"].action == "skipped" and "other ops" in by_name["mul_shared_out"].reason
    assert by_name["mul_shared_w"].action == "folded"
    assert "mul_spatial" not in by_name  # not a per-channel site at all
    assert by_name["bn_train"].action == "skipped" and "training_mode" in by_name["bn_train"].reason
    weights = {t.name: numpy_helper.to_array(t) for t in folded.graph.initializer}
    np.testing.assert_array_equal(weights["w"], w.astype(np.float32))  # the shared weight is untouched, conv2 got a copy
    conv2 = next(n for n in folded.graph.node if n.name == "conv2")
    assert conv2.input[1] != "w"
    x = rng.standard_normal((1, 2, 3, 3)).astype(np.float32)
    (a,) = ort_run(original, {"x": x})
    (b,) = ort_run(folded, {"x": x})
    assert_close(a, b)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    groups=st.integers(1, 3),
    per_group=st.integers(1, 4),
    in_per_group=st.integers(1, 3),
    transposed=st.booleans(),
    seed=st.integers(0, 2**16),
    var_scale=st.floats(1e-3, 1e3),
)
def test_property_onnx_bn_fold_matches_unfolded(
    groups: int, per_group: int, in_per_group: int, transposed: bool, seed: int, var_scale: float
) -> None:
    rng = np.random.default_rng(seed)
    cin, cout = groups * in_per_group, groups * per_group
    if transposed:
        w = rng.standard_normal((cin, per_group, 2, 2))
        conv = helper.make_node("ConvTranspose", ["x", "w"], ["c"], name="lin", group=groups)
    else:
        w = rng.standard_normal((cout, in_per_group, 2, 2))
        conv = helper.make_node("Conv", ["x", "w"], ["c"], name="lin", group=groups)
    inits = [_init("w", w), *_bn_inits("bn", cout, rng)]
    inits[-1] = _init("bn_v", rng.uniform(0.5, 2.0, cout) * var_scale)
    original = _model([conv, _bn("bn", "c", "y")], inits, [2, cin, 4, 4])
    folded, sites = fold_model(original)
    assert [(s.action, s.folded_into) for s in sites] == [("folded", "lin")]
    assert [n.op_type for n in folded.graph.node] == [conv.op_type]
    _check_equal(original, folded, rng.standard_normal((2, cin, 4, 4)).astype(np.float32))


# -- CLI and API ------------------------------------------------------------------------------


def _cli(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bnfold.cli", *map(str, args)], capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_cli_pb_to_onnx_and_onnx_to_onnx_with_report(tmp_path: Path) -> None:
    sample = ROOT / "sample_models" / "conv_keras3.pb"
    out = tmp_path / "folded.onnx"
    report = tmp_path / "r.json"
    proc = _cli(sample, out, "--report", report, "--opset", "15", "-q")
    assert proc.returncode == 0, proc.stderr
    model = onnx.load(str(out))
    onnx.checker.check_model(model)
    assert_fully_folded(model)
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == 15
    data = json.loads(report.read_text())
    assert data["verification"]["passed"] and data["onnx"]["opset"] == 15
    assert data["onnx"]["input_names"] == {"x": "x:0"}
    assert data["summary"]["folded"] >= 1

    # ONNX in: tf2onnx's conversion of the unfolded graph, folded by bnfold.
    graph_def = load_graph_def(sample)
    plain = convert(graph_def, ["x"], find_outputs(graph_def))
    src = tmp_path / "plain.onnx"
    onnx.save(plain, str(src))
    out2 = tmp_path / "refolded.onnx"
    proc = _cli(src, out2, "--report", report)
    assert proc.returncode == 0, proc.stderr
    assert "onnxruntime" not in proc.stderr
    assert_fully_folded(onnx.load(str(out2)))
    assert json.loads(report.read_text())["verification"]["passed"]


def test_cli_bad_onnx_inputs_exit_3_with_one_line(tmp_path: Path) -> None:
    cases = {"empty.onnx": b"", "garbage.onnx": b"\x00\xffnot a model at all\x13\x37" * 5}
    for name, data in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        proc = _cli(path, tmp_path / "out.onnx")
        assert proc.returncode == 3, (name, proc.stderr)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "bnfold: error:" in lines[0] and name in lines[0], proc.stderr
        assert not (tmp_path / "out.onnx").exists()
    proc = _cli(tmp_path / "garbage.onnx", tmp_path / "out.pb")
    assert proc.returncode == 2  # ONNX input is written as ONNX


def test_api_fold_file_onnx_refuses_to_write_when_verification_fails(tmp_path: Path) -> None:
    sample = ROOT / "sample_models" / "conv_fused_nhwc.pb"
    out = tmp_path / "x.onnx"
    result = bnfold.fold_file(sample, out)
    assert out.is_file() and result.onnx is not None and result.verification.passed
    json.dumps(result.to_json(), default=float)
    bad = tmp_path / "bad.onnx"
    with pytest.raises(bnfold.VerificationError):
        bnfold.fold_file(sample, bad, atol=0.0, rtol=0.0, samples=2)  # an impossible tolerance
    assert not bad.exists()
