"""The streaming ``.pb`` path (bnfold.tf.streaming): the same bytes as the in-memory fold, and stubs that never leak.

``bnfold in.pb out.pb --no-verify`` leaves large constants in the input file and
computes the new weights as it writes them. Its output must be byte for byte what
the in-memory fold writes; a stub (the one-byte placeholder of a constant's values)
must make TensorFlow and bnfold's own constant reader fail, never compute.
``streaming.LARGE`` is lowered in these tests so that small graphs have stubs too.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from conftest import realworld_files, run_graph
from hypothesis import given, settings
from hypothesis import strategies as st
from tensorflow.core.framework import graph_pb2, node_def_pb2
from test_cli import invoke
from test_properties import SETTINGS, specs
from test_robustness import _graph_with_functions

from bnfold import api
from bnfold.core.errors import EXIT_INPUT, InputError
from bnfold.tf import streaming
from bnfold.tf.canonical import ConstEvaluator
from bnfold.tf.graph import GraphIndex, const_array
from bnfold.tf.io import load_graph_def_streaming
from sample_models.make_samples import Spec, build


@contextmanager
def stubs_from(size: int) -> Iterator[None]:
    """Make constants of ``size`` bytes and more stubs (the default, 64 KiB, leaves small test graphs whole)."""
    saved = streaming.LARGE
    streaming.LARGE = size
    try:
        yield
    finally:
        streaming.LARGE = saved


def fold_both_ways(src: Path, dst_dir: Path, **options: object) -> tuple[bytes, bytes, int]:
    """The bytes written by the in-memory fold and by the streaming fold, and how many stubs the latter made."""
    whole = api.fold(src, verify_outputs=False, **options)  # type: ignore[arg-type]
    api.write_result(whole, dst_dir / "whole.pb")
    streamed = api.fold(src, verify_outputs=False, stream_constants=True, **options)  # type: ignore[arg-type]
    assert streamed.contents is not None
    stubs = len(streamed.contents._stubs)
    assert [s.to_json() for s in streamed.sites] == [s.to_json() for s in whole.sites]
    api.write_result(streamed, dst_dir / "streamed.pb")
    streamed.contents.close()
    return (dst_dir / "whole.pb").read_bytes(), (dst_dir / "streamed.pb").read_bytes(), stubs


@SETTINGS
@given(spec=specs(), size=st.sampled_from([1, 16, 200]))
def test_streamed_fold_writes_the_bytes_of_the_in_memory_fold(spec: Spec, size: int) -> None:
    """Every linear op, BN form, dtype, layout and fold direction of the property tests, weights as stubs."""
    with tempfile.TemporaryDirectory() as tmp, stubs_from(size):
        graph_def = build(spec)
        src = Path(tmp) / "in.pb"
        src.write_bytes(graph_def.SerializeToString(deterministic=True))
        whole, streamed, stubs = fold_both_ways(src, Path(tmp))
        assert streamed == whole
        large = [n for n in graph_def.node if n.op == "Const" and len(n.attr["value"].tensor.tensor_content) >= size]
        assert (stubs > 0) == bool(large)


def _bn_conv_bn(seed: int) -> graph_pb2.GraphDef:
    """BN -> VALID conv -> BN: both fold into the one conv, the second from the stub of the first's weights."""
    rng = np.random.default_rng(seed)
    graph = tf.Graph()
    c = lambda v: tf.constant(np.asarray(v, np.float32))  # noqa: E731
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, 9, 9, 5], name="x")
        stats = [c(rng.uniform(0.5, 1.5, 5)), c(rng.normal(0, 1, 5)), c(rng.normal(0, 1, 5)), c(rng.uniform(0.5, 2, 5))]
        y = tf.raw_ops.FusedBatchNormV3(x=x, scale=stats[0], offset=stats[1], mean=stats[2], variance=stats[3], is_training=False)[0]
        w = tf.identity(c(rng.standard_normal((3, 3, 5, 6))), name="read_weights")  # a Keras-style read of a variable
        y = tf.nn.conv2d(y, w, 1, "VALID")
        stats = [c(rng.uniform(0.5, 1.5, 6)), c(rng.normal(0, 1, 6)), c(rng.normal(0, 1, 6)), c(rng.uniform(0.5, 2, 6))]
        y = tf.raw_ops.FusedBatchNormV3(x=y, scale=stats[0], offset=stats[1], mean=stats[2], variance=stats[3], is_training=False)[0]
        tf.identity(y, name="output")
    return graph.as_graph_def()


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_weights_folded_twice_are_computed_from_the_stub_of_the_first_fold(seed: int) -> None:
    graph_def = _bn_conv_bn(seed)
    with tempfile.TemporaryDirectory() as tmp, stubs_from(16):
        src = Path(tmp) / "in.pb"
        src.write_bytes(graph_def.SerializeToString(deterministic=True))
        whole, streamed, stubs = fold_both_ways(src, Path(tmp))
        assert streamed == whole and stubs >= 2  # the input's weights and the once-folded ones
        folded = graph_pb2.GraphDef.FromString(streamed)
        assert sum(1 for n in folded.node if n.op == "Conv2D") == 1 and not [n for n in folded.node if "FusedBatchNorm" in n.op]
        x = np.random.default_rng(seed).standard_normal((2, 9, 9, 5)).astype(np.float32)
        (before,) = run_graph(graph_def, {"x": x}, ["output"])
        (after,) = run_graph(folded, {"x": x}, ["output"])
        np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-4 * float(np.abs(before).max()))


def test_library_versions_and_unknown_fields_are_kept(tmp_path: Path) -> None:
    graph_def = _graph_with_functions()
    data = graph_def.SerializeToString(deterministic=True) + b"\xa0\x06\x07"  # + unknown field 100 (varint 7)
    src = tmp_path / "in.pb"
    src.write_bytes(data)
    with stubs_from(16):
        loaded, contents = load_graph_def_streaming(src)
        assert contents is not None and contents._stubs
        assert loaded.library == graph_def.library and loaded.versions == graph_def.versions
        contents.close()
        whole, streamed, _ = fold_both_ways(src, tmp_path, outputs=["output"])
    assert streamed == whole


@pytest.mark.parametrize("path", realworld_files("tf", "*.pb"))
def test_published_graphs_stream_to_the_same_bytes(path: str, tmp_path: Path, realworld: Path) -> None:
    with stubs_from(256):
        whole, streamed, stubs = fold_both_ways(realworld / "tf" / path, tmp_path)
    assert streamed == whole
    assert stubs > 0 or "AMDMIGraphX" in path  # AMD's fixtures hold no constant of 256 bytes


def _stubbed(tmp_path: Path) -> tuple[graph_pb2.GraphDef, streaming.Contents, node_def_pb2.NodeDef]:
    src = tmp_path / "in.pb"
    src.write_bytes(build(Spec(cin=4, cout=8)).SerializeToString(deterministic=True))
    with stubs_from(16):
        graph_def, contents = load_graph_def_streaming(src)
    assert contents is not None
    stub = next(n for n in graph_def.node if contents.get(n) is not None)
    return graph_def, contents, stub


def test_a_stub_that_leaked_fails_loudly_and_never_computes(tmp_path: Path) -> None:
    graph_def, contents, stub = _stubbed(tmp_path)
    tensor = stub.attr["value"].tensor
    assert tensor.tensor_content == streaming.STUB and len(tensor.tensor_shape.dim) == 4
    with pytest.raises(ValueError):
        const_array(tensor)
    assert ConstEvaluator(GraphIndex(graph_def)).raw(stub.name) is None  # without its contents: not a constant
    assert ConstEvaluator(GraphIndex(graph_def, contents=contents)).raw(stub.name) is not None
    with pytest.raises((ValueError, tf.errors.InvalidArgumentError)):
        run_graph(graph_def, {"x": np.zeros((1, 7, 7, 4), np.float32)}, ["output"])
    # Materialized, it is the node as the file has it.
    original = next(n for n in graph_pb2.GraphDef.FromString((tmp_path / "in.pb").read_bytes()).node if n.name == stub.name)
    assert contents.materialized(stub) == original
    contents.close()


def test_a_stub_the_writer_cannot_fill_is_bnfolds_bug_not_a_written_model(tmp_path: Path) -> None:
    from bnfold.core.errors import BrokenOutputError
    from bnfold.tf.io import write_graph_def

    graph_def, contents, stub = _stubbed(tmp_path)
    stub.attr["value"].tensor.tensor_shape.dim[0].size += 1  # no longer the stub of the values kept for it
    with pytest.raises(BrokenOutputError, match="bug in bnfold"):
        write_graph_def(graph_def, tmp_path / "out.pb", contents)
    assert not (tmp_path / "out.pb").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out.pb")]
    contents.close()


def test_an_input_changed_while_folding_is_refused_and_nothing_written(tmp_path: Path) -> None:
    src = tmp_path / "in.pb"
    src.write_bytes(build(Spec(cin=4, cout=8)).SerializeToString(deterministic=True))
    with stubs_from(16):
        result = api.fold(src, verify_outputs=False, stream_constants=True)
    with open(src, "ab") as f:
        f.write(b"\x00")  # another program writes to the input meanwhile
    with pytest.raises(InputError, match="changed while bnfold read it"):
        api.write_result(result, tmp_path / "out.pb")
    assert not (tmp_path / "out.pb").exists()
    result.contents.close()


def test_an_input_cut_while_folding_is_one_error_and_nothing_written(tmp_path: Path) -> None:
    src = tmp_path / "in.pb"
    src.write_bytes(build(Spec(cin=4, cout=8)).SerializeToString(deterministic=True))
    with stubs_from(16):
        result = api.fold(src, verify_outputs=False, stream_constants=True)
    os.truncate(src, 100)  # the values the stubs stand for are gone
    with pytest.raises(InputError, match="shorter while bnfold read it|changed while bnfold read it"):
        api.write_result(result, tmp_path / "out.pb")
    assert [p.name for p in tmp_path.iterdir()] == ["in.pb"]
    result.contents.close()


def test_cli_no_verify_writes_what_the_checked_fold_writes(tmp_path: Path) -> None:
    src = tmp_path / "in.pb"
    src.write_bytes(build(Spec(cin=3, cout=300)).SerializeToString(deterministic=True))  # 3x3x3x300 float32 > 64 KiB
    checked, streamed = tmp_path / "checked.pb", tmp_path / "streamed.pb"
    assert invoke("fold", src, checked, "-q").exit_code == 0
    assert invoke("fold", src, streamed, "-q", "--no-verify").exit_code == 0
    assert streamed.read_bytes() == checked.read_bytes()
    # --in-place: the values are read from the input while the output replaces it.
    before = src.read_bytes()
    assert invoke("fold", src, src, "-q", "--no-verify", "--in-place").exit_code == 0
    assert src.read_bytes() == checked.read_bytes() != before


@pytest.mark.parametrize("cut", [1, 100, -3])
def test_a_cut_file_is_the_same_one_line_error(tmp_path: Path, cut: int) -> None:
    data = build(Spec(cin=3, cout=300)).SerializeToString(deterministic=True)
    src = tmp_path / "in.pb"
    src.write_bytes(data[:cut])
    result = invoke("fold", src, tmp_path / "out.pb", "--no-verify")
    assert result.exit_code == EXIT_INPUT and len(result.stderr.strip().splitlines()) == 1
    assert str(src) in result.stderr and not (tmp_path / "out.pb").exists()


@settings(max_examples=40, deadline=None)
@given(
    shape=st.lists(st.integers(1, 9), min_size=1, max_size=4),
    dtype=st.sampled_from(["float32", "float16", "bfloat16", "float64", "int8"]),
    extra=st.dictionaries(st.sampled_from(["_class", "_output_shapes", "a", "zz", "value2"]), st.binary(max_size=300), max_size=3),
    device=st.sampled_from(["", "/device:CPU:0"]),
)
def test_splicing_values_into_a_serialized_node_is_serializing_the_node(shape: list[int], dtype: str, extra: dict, device: str) -> None:  # type: ignore[type-arg]
    """``head + values + tail`` equals ``SerializeToString(deterministic=True)`` of the full node, whatever its other attrs."""
    values = np.random.default_rng(len(shape)).standard_normal(shape).astype(tf.as_dtype(dtype).as_numpy_dtype)
    node = node_def_pb2.NodeDef(name="w", op="Const", device=device)
    node.attr["dtype"].type = tf.as_dtype(dtype).as_datatype_enum
    node.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(values))
    node.attr["value"].tensor.tensor_content = values.tobytes()
    for key, blob in extra.items():
        node.attr[key].s = blob
    full = node.SerializeToString(deterministic=True)
    stub = node_def_pb2.NodeDef()
    stub.CopyFrom(node)
    stub.attr["value"].tensor.tensor_content = streaming.STUB
    record = memoryview(stub.SerializeToString(deterministic=True))
    head, tail = streaming.splice(record, 0, len(record), streaming.content_path(record, 0, len(record)), values.nbytes)
    assert head + values.tobytes() + tail == full


def test_no_stub_where_the_value_is_not_a_plain_tensor_content(tmp_path: Path) -> None:
    """A large constant kept in typed fields (float_val) or a string tensor is parsed whole, as before."""
    graph = tf.Graph()
    with graph.as_default():
        tf.constant(np.arange(40_000, dtype=np.float32) % 7, name="ramp")  # many distinct values: tensor_content
        tf.constant([b"x" * 70_000], name="text")  # a string tensor: string_val
    graph_def = graph.as_graph_def()
    typed = graph_def.node.add()  # 30 000 values written one by one in float_val (as some exporters do)
    typed.name, typed.op = "typed", "Const"
    typed.attr["dtype"].type = tf.float32.as_datatype_enum
    typed.attr["value"].tensor.dtype = tf.float32.as_datatype_enum
    typed.attr["value"].tensor.tensor_shape.dim.add().size = 30_000
    typed.attr["value"].tensor.float_val.extend(np.arange(30_000) % 5)
    src = tmp_path / "in.pb"
    src.write_bytes(graph_def.SerializeToString(deterministic=True))
    with stubs_from(1024):
        graph_def, contents = load_graph_def_streaming(src)
    assert contents is not None
    assert {n.name for n in graph_def.node if contents.get(n) is not None} == {"ramp"}
    assert os.path.getsize(src) > 200_000
    kept = {n.name: n for n in graph_def.node}
    assert list(kept["typed"].attr["value"].tensor.float_val) == list(np.arange(30_000) % 5)
    assert kept["text"].attr["value"].tensor.string_val == [b"x" * 70_000]
    contents.close()
