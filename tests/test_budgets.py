"""Budgets checked from shapes before allocation, and inputs/outputs a hostile user or model could abuse.

Every case is a model crafted as an attacker would, run through bnfold's real
entry points; what it may cost is bounded by the budgets (bnfold.core.budgets), and
what bnfold says is one line with the documented exit code.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from bnfold import api
from bnfold.cli import app, one_line
from bnfold.core import budgets
from bnfold.core.errors import VerificationError
from bnfold.onnx.pipeline import fold_onnx

runner = CliRunner()


def bn_model(scale_fn, placeholder_shape=(None, 4, 4, 3)) -> tf.Graph:  # type: ignore[no-untyped-def]
    """conv -> fused BN whose scale is ``scale_fn()`` (the attack) -> out."""
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, list(placeholder_shape), name="x")
        y = tf.nn.conv2d(x, tf.constant(np.ones((1, 1, 3, 2), np.float32)), 1, "SAME")
        y = tf.compat.v1.nn.fused_batch_norm(y, scale_fn(), tf.zeros([2]), tf.zeros([2]), tf.ones([2]), is_training=False, name="bn")[0]
        tf.identity(y, name="out")
    return graph


def first_two(t: tf.Tensor) -> tf.Tensor:
    return tf.slice(tf.reshape(t, [-1]), [0], [2])


def only_site(graph_def: tf.compat.v1.GraphDef) -> str:
    result = api.fold(graph_def, verify_outputs=False)
    (site,) = result.sites
    assert site.action == "skipped"
    return str(site.reason)


# -- constant evaluation ----------------------------------------------------------------------


def test_bn_scale_from_a_fill_of_2e9_elements_is_skipped_with_the_budget() -> None:
    graph = bn_model(lambda: first_two(tf.fill(tf.constant([1100000000, 2]), 1.0)))
    reason = only_site(graph.as_graph_def())
    assert "2.2e+09 elements" in reason and "2^28" in reason


def test_bn_scale_through_40_chained_8000x8000_matmuls_is_skipped_by_the_compute_budget() -> None:
    def chain() -> tf.Tensor:
        m = tf.fill(tf.constant([8000, 8000]), 1e-4)
        for _ in range(40):
            m = tf.matmul(m, m)
        return first_two(m)

    reason = only_site(bn_model(chain).as_graph_def())
    assert "FLOPs" in reason and "2^36" in reason


def test_const_declaring_1e10_elements_holding_one_float_is_skipped() -> None:
    graph_def = bn_model(lambda: first_two(tf.constant(1.0, shape=[2], name="huge"))).as_graph_def()
    (node,) = [n for n in graph_def.node if n.name == "huge"]
    tensor = node.attr["value"].tensor
    tensor.ClearField("tensor_content")
    del tensor.float_val[:]
    tensor.float_val.append(1.0)
    tensor.tensor_shape.dim[0].size = 10**10
    reason = only_site(graph_def)
    assert "1e+10 elements" in reason


def test_a_broadcast_const_past_the_budget_is_no_constant_in_this_process() -> None:
    """Read directly (a BN parameter that is the Const itself): refused from the shape, no 40 GB array."""
    graph_def = bn_model(lambda: tf.constant(1.0, shape=[2], name="huge")).as_graph_def()
    (node,) = [n for n in graph_def.node if n.name == "huge"]
    tensor = node.attr["value"].tensor
    tensor.ClearField("tensor_content")
    del tensor.float_val[:]
    tensor.float_val.append(1.0)
    tensor.tensor_shape.dim[0].size = 10**10
    reason = only_site(graph_def)
    assert "not constants" in reason and "2^28" in reason


def test_a_small_computed_scale_still_folds() -> None:
    """The budgets let ordinary constant subgraphs through: a Fill of 2 elements is a BN scale that folds."""
    graph = bn_model(lambda: first_two(tf.fill(tf.constant([1, 2]), 2.0)))
    result = api.fold(graph.as_graph_def(), verify_outputs=True)
    assert [s.action for s in result.sites] == ["folded"]
    assert result.verification is not None and result.verification.passed


def onnx_bn(scale_nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], path: Path) -> Path:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 4, 4])
    base = [numpy_helper.from_array(np.ones((2, 2, 1, 1), np.float32), "w")]
    base += [numpy_helper.from_array(v.astype(np.float32), n) for n, v in (("b", np.zeros(2)), ("m", np.zeros(2)), ("v", np.ones(2)))]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), *scale_nodes, helper.make_node("BatchNormalization", ["c", "scale", "b", "m", "v"], ["y"], name="bn")]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], base + inits), opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def slice_two(source: str) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    nodes = [helper.make_node("Reshape", [source, "flat"], ["flat_out"]), helper.make_node("Slice", ["flat_out", "st", "en"], ["scale"])]
    inits = [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in (("flat", [-1]), ("st", [0]), ("en", [2]))]
    return nodes, inits


def test_onnx_constant_of_shape_of_10_gb_is_skipped(tmp_path: Path) -> None:
    tail, inits = slice_two("big")
    make = helper.make_node("ConstantOfShape", ["shape"], ["big"], value=numpy_helper.from_array(np.ones(1, np.float32)))
    path = onnx_bn([make, *tail], [numpy_helper.from_array(np.array([2_500_000_000], np.int64), "shape"), *inits], tmp_path / "cos.onnx")
    (site,) = fold_onnx(path, verify_outputs=False)[1].sites
    assert site.action == "skipped" and "2.5e+09 elements" in str(site.reason)


def test_onnx_conv_transpose_on_2048_squared_constants_is_skipped(tmp_path: Path) -> None:
    tail, inits = slice_two("ct")
    big = numpy_helper.from_array(np.ones((1, 1, 2048, 2048), np.float32), "plane")
    path = onnx_bn([helper.make_node("ConvTranspose", ["plane", "plane"], ["ct"]), *tail], [big, *inits], tmp_path / "ct.onnx")
    (site,) = fold_onnx(path, verify_outputs=False)[1].sites
    assert site.action == "skipped" and "FLOPs" in str(site.reason)


# -- synthesized inputs -----------------------------------------------------------------------


def test_placeholder_of_1e10_elements_refuses_the_check() -> None:
    graph = bn_model(lambda: tf.ones([2]), placeholder_shape=(100000, 100000, 1, 3))
    with pytest.raises(VerificationError, match="2\\^28") as caught:
        api.fold(graph.as_graph_def(), verify_outputs=True)
    assert caught.value.exit_code == 4


def test_placeholder_past_the_budget_through_the_cli(tmp_path: Path) -> None:
    src = tmp_path / "m.pb"
    src.write_bytes(bn_model(lambda: tf.ones([2]), placeholder_shape=(100000, 100000, 1, 3)).as_graph_def().SerializeToString())
    result = runner.invoke(app, ["fold", str(src), str(tmp_path / "o.pb")])
    assert result.exit_code == 4 and "--input-shape" in result.output and not (tmp_path / "o.pb").exists()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 1 << 20), min_size=0, max_size=5))
def test_check_tensor_refuses_exactly_past_the_budget(shape: list[int]) -> None:
    count = int(np.prod(shape, dtype=object)) if shape else 1
    if count > budgets.TENSOR_ELEMENTS:
        with pytest.raises(budgets.BudgetExceeded):
            budgets.check_tensor("t", shape)
    else:
        assert budgets.check_tensor("t", shape) == count


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4096), st.integers(1, 4096), st.integers(1, 4096))
def test_matmul_flops_are_twice_the_multiply_adds(m: int, k: int, n: int) -> None:
    assert budgets.product_flops("MatMul", [[m, k], [k, n]], [m, n]) == 2 * m * n * k


# -- inputs and outputs -----------------------------------------------------------------------


def small_model(path: Path) -> bytes:
    data = bn_model(lambda: tf.ones([2])).as_graph_def().SerializeToString()
    path.write_bytes(data)
    return data


def test_a_device_is_refused_at_once() -> None:
    result = runner.invoke(app, ["fold", "/dev/zero", "out.pb"])
    assert result.exit_code == 3 and "is a device" in result.output


def test_a_fifo_is_refused_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "model.pb"
    os.mkfifo(fifo)
    for args in (["fold", str(fifo), str(tmp_path / "o.pb")], ["inspect", str(fifo)], ["doctor", str(fifo)]):
        result = runner.invoke(app, args)
        assert result.exit_code == 3 and "is a FIFO" in result.output


@pytest.mark.parametrize(
    "args",
    [
        ["fold", "{m}", "{d}/o.pb", "--report", "{m}"],
        ["fold", "{m}", "{d}/o.pb", "--report", "{d}/link.pb"],
        ["inspect", "{m}", "--report", "{m}"],
        ["doctor", "{m}", "--json", "{m}"],
        ["doctor", "{m}", "--json", "{d}/link.pb"],
    ],
)
def test_no_output_may_be_the_input(tmp_path: Path, args: list[str]) -> None:
    model = tmp_path / "m.pb"
    data = small_model(model)
    (tmp_path / "link.pb").symlink_to(model)
    result = runner.invoke(app, [a.format(m=model, d=tmp_path) for a in args])
    assert result.exit_code == 5, result.output
    assert "is the input" in result.output
    assert model.read_bytes() == data


def test_no_output_may_be_inside_an_input_saved_model(tmp_path: Path) -> None:
    module = tf.Module()
    module.f = tf.function(lambda x: x * 2.0, input_signature=[tf.TensorSpec([None, 3], tf.float32)])
    export = tmp_path / "sm"
    tf.saved_model.save(module, str(export), signatures={"serving_default": module.f})
    before = {p: p.read_bytes() for p in export.rglob("*") if p.is_file()}
    for args in (["inspect", str(export), "--report", str(export / "r.json")], ["fold", str(export), str(export / "variables" / "o.pb")]):
        result = runner.invoke(app, args)
        assert result.exit_code == 5 and "inside the input" in result.output, result.output
    assert {p: p.read_bytes() for p in export.rglob("*") if p.is_file()} == before


def test_negative_input_shape_is_a_usage_error(tmp_path: Path) -> None:
    model = tmp_path / "m.pb"
    small_model(model)
    result = runner.invoke(app, ["fold", str(model), str(tmp_path / "o.pb"), "--input-shape", "x=-1,8,8,3"])
    assert result.exit_code == 2 and "--input-shape" in result.output


def test_a_newline_in_a_path_stays_one_line(tmp_path: Path) -> None:
    result = runner.invoke(app, ["fold", str(tmp_path / "no\nsuch.pb"), str(tmp_path / "o.pb")])
    assert result.exit_code == 3
    assert result.output.strip().count("\n") == 0 and "no\\nsuch.pb" in result.output


@given(st.text())
def test_one_line_never_keeps_a_control_character(text: str) -> None:
    line = one_line(text)
    assert all(c.isprintable() or c == " " for c in line)


def test_deeply_nested_pbtxt_is_an_input_error(tmp_path: Path) -> None:
    depth = 3000
    text = 'node { name: "c" op: "Const" attr { key: "value" value { list { '
    text += 'func { name: "f" attr { key: "a" value { ' * depth + "} } } " * depth + "} } } }"
    path = tmp_path / "deep.pbtxt"
    path.write_text(text)
    result = runner.invoke(app, ["inspect", str(path)])
    assert result.exit_code == 3 and "nested too deeply" in result.output


@pytest.mark.parametrize("op", ["Identity", "AddV2"])
def test_bn_parameter_through_10000_chained_ops_folds(op: str) -> None:
    """A valid graph: the constant evaluator walks the chain with a stack of its own, not Python's recursion."""

    def chained() -> tf.Tensor:
        value = tf.constant(np.array([1.5, 0.5], np.float32))
        for i in range(10000):
            value = tf.identity(value, name=f"c{i}") if op == "Identity" else tf.add(value, 0.0, name=f"c{i}")
        return value

    result = api.fold(bn_model(chained).as_graph_def(), verify_outputs=False)
    assert [s.action for s in result.sites] == ["folded"]


def test_invalid_utf8_in_an_attribute_skips_the_site() -> None:
    graph_def = bn_model(lambda: tf.ones([2])).as_graph_def()
    (bn,) = [n for n in graph_def.node if n.name == "bn"]
    bn.attr["data_format"].s = b"NH\xff\xfe"
    (site,) = api.fold(graph_def, verify_outputs=False).sites
    assert site.action == "skipped" and "data_format" in str(site.reason)
