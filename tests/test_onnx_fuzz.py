"""Differential ONNX fuzzing: random linear-op + BN graphs, folded with no check, compared in onnxruntime here.

Each case is one linear op (Conv 1-3d, ConvTranspose, Gemm, MatMul) with a BN
after it and/or before it, a bias in one of the forms exporters write
(initializer, computed ``Expand(CastLike(0, x), Shape(W)[0:1])``, behind
``Identity``, a ``Constant`` node, a per-channel ``Add``), float32 or float16,
sometimes with an intermediate tensor named as a graph output. bnfold folds it
with no check; the test runs both models in onnxruntime (optimizations off)
and requires equal outputs, no new non-finite value, and no VerificationError
when bnfold's own check runs on the same valid input.

CI runs a small share (``ONNX_FUZZ_EXAMPLES``, default 40); a long run sets it higher.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from bnfold.onnx.pipeline import fold_onnx

EXAMPLES = int(os.environ.get("ONNX_FUZZ_EXAMPLES", "40"))


def ort_outputs(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return list(session.run(None, feeds))


@dataclass
class Case:
    model: onnx.ModelProto
    x: np.ndarray
    description: str


def _t(name: str, value: np.ndarray, dtype: np.dtype) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value).astype(dtype), name)


def build_case(
    rng: np.random.Generator,
    op: str,
    bn_after: bool,
    bn_before: bool,
    bias_form: str,
    fp16: bool,
    named_inside: bool,
    extreme: bool = False,
    opset: int = 17,
) -> Case:
    """One graph: [BN] -> linear op (+ bias in ``bias_form``) -> [BN] -> output, as exporters write it."""
    dtype = np.dtype(np.float16 if fp16 else np.float32)
    elem = TensorProto.FLOAT16 if fp16 else TensorProto.FLOAT
    cin, cout = int(rng.integers(1, 5)), int(rng.integers(1, 5))
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    outputs = ["y"]
    spatial = {"Conv1d": 1, "Conv": 2, "Conv3d": 3, "ConvTranspose": 2}.get(op, 0)
    x_shape = [2, cin, *([5] * spatial)]
    if op == "MatMul" and rng.random() < 0.3:
        x_shape = [2, 3, cin]  # 3-D MatMul: BN channels (axis 1) are not the matmul's channels
    cur = "x"

    def bn(prefix: str, inp: str, out: str, c: int) -> None:
        gamma = rng.uniform(0.5, 1.5, c) * rng.choice([-1, 1], c)
        var = rng.uniform(0.5, 2.0, c)
        if extreme:
            gamma = gamma * 10.0 ** rng.integers(-3, 6, c)
            var = var * 10.0 ** rng.integers(-8, 3, c)
        values = {"g": gamma, "b": rng.normal(0, 0.3, c), "m": rng.normal(0, 0.3, c), "v": var}
        for k, v in values.items():
            inits.append(_t(f"{prefix}_{k}", v, dtype))
        nodes.append(
            helper.make_node("BatchNormalization", [inp, *(f"{prefix}_{k}" for k in "gbmv")], [out], name=prefix, epsilon=1e-5)
        )

    if bn_before:
        bn("bn_pre", cur, "pre", x_shape[1])
        cur = "pre"
    w_name = "w"
    bias_slot_ops = ("Conv1d", "Conv", "Conv3d", "ConvTranspose", "Gemm")
    if op in ("Conv1d", "Conv", "Conv3d"):
        k = int(rng.integers(1, 4))
        pads = [int(rng.integers(0, 2))] * (2 * spatial)
        inits.append(_t("w", rng.standard_normal((cout, cin, *([k] * spatial))), dtype))
        linear = helper.make_node("Conv", [cur, "w"], ["lin"], name="lin", pads=pads)
    elif op == "ConvTranspose":
        group = int(rng.integers(1, 3))
        cin_g, cout_g = cin * group, cout
        if bn_before:
            nodes.clear()
            inits.clear()
        x_shape = [2, cin_g, 4, 4]
        if bn_before:
            bn("bn_pre", "x", "pre", cin_g)
        inits.append(_t("w", rng.standard_normal((cin_g, cout_g, 2, 2)), dtype))
        linear = helper.make_node("ConvTranspose", [cur, "w"], ["lin"], name="lin", group=group, strides=[2, 2])
        cout = cout_g * group
    elif op == "Gemm":
        trans_b = int(rng.integers(0, 2))
        w = rng.standard_normal((cout, cin) if trans_b else (cin, cout))
        inits.append(_t("w", w, dtype))
        linear = helper.make_node("Gemm", [cur, "w"], ["lin"], name="lin", transB=trans_b, beta=float(rng.choice([1.0, 0.5])))
    else:
        w = rng.standard_normal((cin, cout))
        if rng.random() < 0.5:  # the legacy exporter's Linear(bias=False): MatMul(x, Transpose(W))
            inits.append(_t("w_t", w.T, dtype))
            nodes.append(helper.make_node("Transpose", ["w_t"], ["w"], perm=[1, 0]))
        else:
            inits.append(_t("w", w, dtype))
        linear = helper.make_node("MatMul", [cur, w_name], ["lin"], name="lin")
    nodes.append(linear)
    lin_out = "lin"
    bias = rng.normal(0, 0.5, cout)
    if bias_form != "none":
        if op in bias_slot_ops and bias_form != "add":
            if bias_form == "init":
                inits.append(_t("bias", bias, dtype))
            elif bias_form == "identity":
                inits.append(_t("bias_src", bias, dtype))
                nodes.insert(0, helper.make_node("Identity", ["bias_src"], ["bias"]))
            elif bias_form == "constant":
                nodes.insert(0, helper.make_node("Constant", [], ["bias"], value=_t("bias_value", bias, dtype)))
            elif bias_form == "computed":  # torch dynamo optimize=False: zero bias as Expand(CastLike(0, x), Shape(W)[a:a+1])
                attrs = {a.name: helper.get_attribute_value(a) for a in linear.attribute}
                axis_w = 1 if op == "ConvTranspose" or (op == "Gemm" and not attrs.get("transB", 0)) else 0
                if op == "ConvTranspose" and attrs.get("group", 1) != 1:
                    inits.append(_t("bias", bias, dtype))  # grouped ConvTranspose: Shape(W) is not the channel count
                else:
                    nodes[0:0] = [
                        helper.make_node("Shape", ["w"], ["w_shape"], start=axis_w, end=axis_w + 1),
                        helper.make_node("Constant", [], ["zero"], value=_t("zero_value", np.array(0.0), np.dtype(np.float32))),
                        helper.make_node("CastLike", ["zero", "x"], ["zero_like"]),
                        helper.make_node("Expand", ["zero_like", "w_shape"], ["bias"]),
                    ]
            linear.input.append("bias")
        else:  # a per-channel Add after the op (MatMul's bias, or ConvTranspose + Add as torch writes it)
            shape = (cout,) if op in ("Gemm", "MatMul") else (cout, *([1] * max(spatial, 1)))
            inits.append(_t("bias_add", bias.reshape(shape), dtype))
            nodes.append(helper.make_node("Add", [lin_out, "bias_add"], ["lin_b"], name="bias_add"))
            lin_out = "lin_b"
    if named_inside:
        outputs.append(lin_out)
    if bn_after:
        bn("bn_post", lin_out, "y", x_shape[1] if len(x_shape) == 3 and op == "MatMul" else cout)
    else:
        nodes.append(helper.make_node("Relu", [lin_out], ["y"]))
    # Topological order: Transpose/Shape/CastLike chains feeding the linear op must come first.
    order = _toposort(nodes, {i.name for i in inits} | {"x"})
    graph = helper.make_graph(
        order,
        "fuzz",
        [helper.make_tensor_value_info("x", elem, x_shape)],
        [helper.make_tensor_value_info(o, elem, [f"d{i}" for i in range(len(x_shape))]) for o in outputs],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8 if opset <= 17 else 10
    onnx.checker.check_model(model)
    x = rng.standard_normal(x_shape).astype(dtype)
    what = f"{op} bn_before={bn_before} bn_after={bn_after} bias={bias_form} fp16={fp16} named={named_inside} x={x_shape}"
    return Case(model, x, what)


def _toposort(nodes: list[onnx.NodeProto], available: set[str]) -> list[onnx.NodeProto]:
    done, order, pending = set(available), [], list(nodes)
    while pending:
        for node in pending:
            if all(not i or i in done for i in node.input):
                order.append(node)
                done.update(node.output)
                pending.remove(node)
                break
        else:
            raise AssertionError("cycle in generated graph")
    return order


def assert_same(case: Case, folded: onnx.ModelProto) -> None:
    expected = ort_outputs(case.model, {"x": case.x})
    actual = ort_outputs(folded, {"x": case.x})
    assert len(expected) == len(actual)
    for a, b in zip(expected, actual, strict=True):
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        finite = np.isfinite(a64)
        assert np.all(np.isfinite(b64[finite])), f"fold created non-finite values: {case.description}"
        scale = float(np.max(np.abs(a64[finite]))) if finite.any() else 0.0
        rtol, atol = (1e-2, 1e-2) if a.dtype == np.float16 else (1e-4, 1e-5)
        err = float(np.max(np.abs(a64[finite] - b64[finite]))) if finite.any() else 0.0
        assert err <= atol + rtol * scale, f"{case.description}: max abs error {err:.3g} (max |y| {scale:.3g})"


CASE = st.fixed_dictionaries(
    {
        "op": st.sampled_from(["Conv1d", "Conv", "Conv3d", "ConvTranspose", "Gemm", "MatMul"]),
        "bn_after": st.booleans(),
        "bn_before": st.booleans(),
        "bias_form": st.sampled_from(["none", "init", "identity", "constant", "computed", "add"]),
        "fp16": st.booleans(),
        "named_inside": st.booleans(),
        "seed": st.integers(0, 2**20),
    }
)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(CASE)
def test_differential_onnx_fold_equals_original_in_onnxruntime(params: dict[str, object]) -> None:
    seed = int(params.pop("seed"))  # type: ignore[call-overload]
    case = build_case(np.random.default_rng(seed), **params)  # type: ignore[arg-type]
    folded, result = fold_onnx(case.model, verify_outputs=False)
    onnx.checker.check_model(folded)
    assert_same(case, folded)
    # bnfold's own check on the same valid input must agree (a VerificationError here is a bug).
    _, checked = fold_onnx(case.model, verify_outputs=True, rtol=1e-2 if params["fp16"] else None, atol=1e-2 if params["fp16"] else None)
    assert checked.verification is None or checked.verification.passed, case.description
    if params["bn_after"] and not params["named_inside"] and params["op"] != "MatMul" and not params["fp16"]:
        assert not [n for n in folded.graph.node if n.op_type == "BatchNormalization"], (case.description, result.sites)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(params=CASE)
def test_property_no_verify_never_writes_non_finite_outputs(tmp_path_factory: object, params: dict[str, object]) -> None:
    """With --no-verify and extreme statistics (huge gamma, tiny variance, fp16), a written model never outputs
    NaN/inf where the original does not: such sites are skipped, not folded."""
    from bnfold.onnx.pipeline import fold_onnx_file

    seed = int(params.pop("seed"))  # type: ignore[call-overload]
    case = build_case(np.random.default_rng(seed), extreme=True, **params)  # type: ignore[arg-type]
    tmp = tmp_path_factory.mktemp("prop")  # type: ignore[attr-defined]
    src, dst = tmp / "in.onnx", tmp / "out.onnx"
    onnx.save(case.model, str(src))
    fold_onnx_file(src, dst, verify_outputs=False)
    expected = ort_outputs(case.model, {"x": case.x})
    actual = ort_outputs(onnx.load(str(dst)), {"x": case.x})
    for a, b in zip(expected, actual, strict=True):
        # onnxruntime's fp16 kernels saturate at the dtype's max (65504) where they overflow: such a value already is an overflow.
        finite = np.isfinite(a.astype(np.float64)) & (np.abs(a.astype(np.float64)) < np.finfo(a.dtype).max)
        assert np.all(np.isfinite(b.astype(np.float64))[finite]), case.description
