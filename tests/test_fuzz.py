"""Fuzzing: mutated and truncated GraphDefs never crash bnfold outside its documented errors.

Invariants, for every mutation of a valid graph:
- bnfold either writes a model or raises a BnfoldError (one line, documented exit code);
- a VerificationError is a refusal of the input only where the input itself cannot run (TF cannot
  load or run it, inputs bnfold cannot synthesize, batch statistics); where the original runs, the
  check rejecting the fold is a fold bug and fails the test; a broken output (exit 70) always does;
- every written model passed verification, and re-running both graphs agrees;
- nothing is left behind when nothing is written.
CI runs ``--fuzz-examples`` (default 40) per test; pass a larger number for a long run.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_close, run_graph
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tensorflow.core.framework import graph_pb2, types_pb2

import bnfold
from bnfold.core.errors import EXIT_INTERNAL, BnfoldError, VerificationError
from sample_models.make_samples import SAMPLES, build

NAMES = sorted(SAMPLES)
DTYPES = [types_pb2.DT_FLOAT, types_pb2.DT_HALF, types_pb2.DT_INT32, types_pb2.DT_BOOL, types_pb2.DT_STRING, types_pb2.DT_DOUBLE]


def fuzz_settings(request: pytest.FixtureRequest) -> settings:
    return settings(
        max_examples=request.config.getoption("--fuzz-examples"),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )


@st.composite
def mutations(draw: st.DrawFn) -> tuple[str, bytes]:
    """A sample graph, mutated one way, serialized."""
    name = draw(st.sampled_from(NAMES))
    graph_def = build(SAMPLES[name])
    kind = draw(st.sampled_from(["drop_input", "dtype", "tensor", "nan", "truncate", "rename_input", "duplicate", "attr"]))
    nodes = list(graph_def.node)
    node = nodes[draw(st.integers(0, len(nodes) - 1))]
    if kind == "drop_input" and node.input:
        del node.input[draw(st.integers(0, len(node.input) - 1))]
    elif kind == "dtype":
        key = next((k for k in ("T", "dtype", "U") if k in node.attr), None)
        if key:
            node.attr[key].type = draw(st.sampled_from(DTYPES))
    elif kind in ("tensor", "nan"):
        consts = [n for n in nodes if n.op == "Const"]
        if consts:
            target = consts[draw(st.integers(0, len(consts) - 1))].attr["value"].tensor
            if kind == "tensor":
                target.tensor_content = draw(st.binary(min_size=0, max_size=64))
            elif target.dtype == types_pb2.DT_FLOAT and target.tensor_content:
                values = np.frombuffer(target.tensor_content, np.float32).copy()
                values[draw(st.integers(0, values.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf, 1e38, 0.0]))
                target.tensor_content = values.tobytes()
    elif kind == "rename_input" and node.input:
        node.input[0] = draw(st.sampled_from(["missing", "^missing", node.name, "x:7"]))
    elif kind == "duplicate":
        graph_def.node.add().CopyFrom(node)
    elif kind == "attr":
        for key in list(node.attr)[:1]:
            del node.attr[key]
    data = graph_def.SerializeToString()
    if kind == "truncate":
        data = data[: draw(st.integers(0, len(data)))]
    return name, data


# VerificationError messages that are about the input, not the fold.
INPUT_REASONS = ("cannot load the input graph", "could not run the model", "depends on the batch", "unknown", "cannot make such data")


def _original_runs(data: bytes) -> bool:
    """Whether TF itself imports and runs the (mutated) input on the inputs the check would make."""
    from bnfold.tf.verify import find_outputs

    original = graph_pb2.GraphDef()
    try:
        original.ParseFromString(data)
    except Exception:  # noqa: BLE001 - not a graph at all
        return False
    placeholders = [n for n in original.node if n.op == "Placeholder"]
    if len(placeholders) != 1 or placeholders[0].attr["dtype"].type not in (types_pb2.DT_FLOAT, types_pb2.DT_HALF):
        return False  # cannot feed it here: no judgement
    dtype = np.float32 if placeholders[0].attr["dtype"].type == types_pb2.DT_FLOAT else np.float16
    shape = [2 if d.size < 0 else d.size for d in placeholders[0].attr["shape"].shape.dim]
    try:
        run_graph(original, {placeholders[0].name: np.random.default_rng(0).standard_normal(shape).astype(dtype)}, find_outputs(original))
    except Exception:  # noqa: BLE001 - any TF failure means the input is not valid
        return False
    return True


def _fold_or_refuse(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.pb", Path(tmp) / "out.pb"
        src.write_bytes(data)
        try:
            result = bnfold.fold_file(src, dst)
        except BnfoldError as exc:
            message = str(exc)
            assert message and "\n" not in message, message
            assert exc.exit_code != EXIT_INTERNAL, f"bnfold broke the graph: {message}"
            if isinstance(exc, VerificationError) and not any(reason in message for reason in INPUT_REASONS):
                assert not _original_runs(data), f"the check rejected the fold of a graph that runs: {message}"
            assert not dst.exists()
            assert sorted(p.name for p in Path(tmp).iterdir()) == ["in.pb"]
            return
        assert src.read_bytes() == data
        assert dst.exists()
        original = graph_pb2.GraphDef()
        original.ParseFromString(data)
        written = graph_pb2.GraphDef()
        written.ParseFromString(dst.read_bytes())
        if result.unchanged:  # nothing to fold: the graph written as it came (valid or not), no check run
            assert result.verification is None and not any(s.action in ("folded", "standalone") for s in result.sites)
            assert written == original
            return
        assert result.verification is not None and result.verification.passed
        placeholders = [n for n in original.node if n.op == "Placeholder"]
        if len(placeholders) == 1 and placeholders[0].name == "x" and placeholders[0].attr["dtype"].type == types_pb2.DT_FLOAT:
            shape = [2 if d.size < 0 else d.size for d in placeholders[0].attr["shape"].shape.dim]
            feeds = {"x": np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
            for a, b in zip(run_graph(original, feeds, result.outputs), run_graph(written, feeds, result.outputs), strict=True):
                if np.all(np.isfinite(a)):
                    assert_close(a, b)


def test_mutated_graphs_fold_or_are_refused(request: pytest.FixtureRequest) -> None:
    @fuzz_settings(request)
    @given(case=mutations())
    def run(case: tuple[str, bytes]) -> None:
        _fold_or_refuse(case[1])

    run()


def test_random_bytes_are_refused(request: pytest.FixtureRequest) -> None:
    @fuzz_settings(request)
    @given(data=st.binary(min_size=0, max_size=400))
    def run(data: bytes) -> None:
        _fold_or_refuse(data)

    run()


@pytest.mark.parametrize("name", [n for n in NAMES if n != "skip_training_bn"])
def test_unmutated_samples_are_written_and_agree(name: str, tmp_path: Path) -> None:
    src = tmp_path / "in.pb"
    src.write_bytes(build(SAMPLES[name]).SerializeToString())
    bnfold.fold_file(src, tmp_path / "out.pb")
    _fold_or_refuse(src.read_bytes())


def _mixed_precision_sample() -> bytes:
    """The fp16 sample with its filter stored as float32 and cast (tf_keras mixed_float16's frozen form)."""
    graph_def = build(SAMPLES["conv_fp16"])
    weights = next(n for n in graph_def.node if n.name == "weights")
    values = np.frombuffer(weights.attr["value"].tensor.tensor_content, np.float16).astype(np.float32)
    weights.name = "weights/f32"
    weights.attr["dtype"].type = types_pb2.DT_FLOAT
    weights.attr["value"].tensor.dtype = types_pb2.DT_FLOAT
    weights.attr["value"].tensor.tensor_content = values.tobytes()
    cast = graph_def.node.add(name="weights", op="Cast", input=["weights/f32"])
    cast.attr["SrcT"].type = types_pb2.DT_FLOAT
    cast.attr["DstT"].type = types_pb2.DT_HALF
    return graph_def.SerializeToString()


def test_invariant_rejects_a_fold_only_the_check_caught() -> None:
    """The old fold wrote float32 weights on this fp16 conv and the check refused them: the invariant must fail that."""
    data = _mixed_precision_sample()
    assert _original_runs(data)
    _fold_or_refuse(data)
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.pb", Path(tmp) / "out.pb"
        src.write_bytes(data)
        result = bnfold.fold_file(src, dst)
        assert [s.action for s in result.sites] == ["folded"]
