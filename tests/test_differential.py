"""Differential fuzzing: random valid conv/dense + BN graphs, folded without the check, compared in TF here.

The built-in check is not what makes a fold right, so these tests never lean on
it: each graph is folded with ``verify_outputs=False`` and both graphs run in
TensorFlow through ``conftest.run_graph``; every output must keep its name,
shape and dtype and agree within the dtype's tolerance. The same graph folded
with the check must not raise ``VerificationError``: on valid input that is a
fold bug the check happened to catch.

Drawn: linear op (conv, depthwise, dense, transposed conv), dtype (float32,
float16, bfloat16), mixed precision (float32 weights and input reaching the op
through ``Cast``; Keras 3's float32 BN between Casts), data format (NCHW runs on
the CPU through grappler's layout pass), BN form (fused, decomposed) before or
after the linear op, every bias form (``BiasAdd``, ``Add`` with ``(C,)`` and
full-rank constants, computed biases), and tensors inside the chain named as
outputs. A graph TensorFlow itself cannot run here is not valid input and is
rejected. CI runs ``--fuzz-examples`` examples (default 40); pass a larger
number for a long run.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import tensorflow as tf
from conftest import run_graph
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from tensorflow.core.framework import graph_pb2

import bnfold
from bnfold.core.errors import BnfoldError, VerificationError

BATCH = 2
SPATIAL = 6
# Relative to the output's magnitude: fp16/bf16 fold weights rounded once more than the original.
TOLERANCE = {"float32": 2e-4, "float16": 2e-2, "bfloat16": 8e-2}


@dataclass(frozen=True)
class Case:
    linear: str  # conv2d | depthwise | matmul | conv_transpose
    dtype: str  # float32 | float16 | bfloat16
    mixed: bool  # float32 weights/input reach the op through Cast
    data_format: str  # NHWC | NCHW
    bn: str  # fused | decomposed
    bn_widened: bool  # decomposed BN computed in float32 between Casts (Keras 3 mixed precision)
    bn_before: bool
    bias: str  # none | biasadd | add_vector | add_full | computed
    padding: str
    stride: int
    kernel: int
    cin: int
    cout: int
    multiplier: int
    named: int  # index into the chain's inner tensors to name as an extra output (-1: none)
    seed: int
    small_var: bool

    @property
    def rank(self) -> int:
        return 2 if self.linear == "matmul" else 4


@st.composite
def cases(draw: st.DrawFn) -> Case:
    linear = draw(st.sampled_from(["conv2d", "depthwise", "matmul", "conv_transpose"]))
    dtype = draw(st.sampled_from(["float32", "float16", "bfloat16"]))
    return Case(
        linear=linear,
        dtype=dtype,
        mixed=dtype != "float32" and draw(st.booleans()),
        data_format="NHWC" if linear == "matmul" else draw(st.sampled_from(["NHWC", "NCHW"])),
        bn=draw(st.sampled_from(["fused", "decomposed"])) if linear != "matmul" else "decomposed",
        bn_widened=dtype != "float32" and draw(st.booleans()),
        bn_before=draw(st.booleans()),
        bias=draw(st.sampled_from(["none", "biasadd", "add_vector", "add_full", "computed"])),
        padding=draw(st.sampled_from(["SAME", "VALID"])),
        stride=draw(st.integers(1, 2)),
        kernel=draw(st.integers(1, 3)),
        cin=draw(st.integers(1, 4)),
        cout=draw(st.integers(1, 4)),
        multiplier=draw(st.integers(1, 2)),
        named=draw(st.sampled_from([-1, -1, -1, 0, 1, 2, 3])),
        seed=draw(st.integers(0, 2**16)),
        small_var=draw(st.booleans()),
    )


class Builder:
    """Builds one case's graph with raw ops and records the chain's inner tensors."""

    def __init__(self, case: Case) -> None:
        self.case = case
        self.rng = np.random.default_rng(case.seed)
        self.dt = tf.as_dtype(case.dtype)
        self.inner: list[str] = []

    def const(self, values: np.ndarray, dtype: tf.DType | None = None) -> tf.Tensor:
        """A constant in ``dtype`` (default the case's); under mixed precision a float32 constant and a Cast."""
        dtype = dtype or self.dt
        if self.case.mixed and dtype != tf.float32:
            return tf.cast(tf.constant(values.astype(np.float32)), dtype)
        return tf.constant(values.astype(dtype.as_numpy_dtype))

    def channel_shape(self, channels: int, full: bool) -> list[int]:
        if self.case.rank == 2:
            return [1, channels] if full else [channels]
        if self.case.data_format == "NHWC":
            return [1, 1, 1, channels] if full else [channels]
        return [1, channels, 1, 1] if full else [channels, 1, 1]

    def bn(self, h: tf.Tensor, channels: int) -> tf.Tensor:
        case, rng = self.case, self.rng
        gamma = rng.uniform(0.5, 1.5, channels) * rng.choice([-1.0, 1.0], channels)
        beta = rng.normal(0, 0.5, channels)
        mean = rng.normal(0, 0.5, channels)
        var = rng.uniform(1e-3, 1e-2, channels) if case.small_var else rng.uniform(0.2, 2.0, channels)
        if case.bn == "fused":
            fmt = case.data_format
            f32 = [tf.constant(v.astype(np.float32)) for v in (gamma, beta, mean, var)]
            y = tf.raw_ops.FusedBatchNormV3(
                x=h, scale=f32[0], offset=f32[1], mean=f32[2], variance=f32[3], epsilon=1e-3, data_format=fmt, is_training=False
            )[0]
            return y
        widened = case.bn_widened
        if widened:
            h = tf.cast(h, tf.float32)
            self.inner.append(h.op.name)
        dtype = tf.float32 if widened else self.dt
        shape = self.channel_shape(channels, full=False)
        inv = tf.math.rsqrt(tf.constant(var.reshape(shape).astype(np.float32)) + 1e-3) * tf.constant(
            gamma.reshape(shape).astype(np.float32)
        )
        shift = tf.constant(beta.reshape(shape).astype(np.float32)) - tf.constant(mean.reshape(shape).astype(np.float32)) * inv
        if dtype != tf.float32:
            inv, shift = tf.cast(inv, dtype), tf.cast(shift, dtype)
        scaled = h * inv
        self.inner.append(scaled.op.name)
        y = scaled + shift
        if widened:
            y = tf.cast(y, self.dt)
        return y

    def bias(self, h: tf.Tensor, channels: int) -> tf.Tensor:
        case = self.case
        b = self.rng.normal(0, 0.3, channels)
        fmt = "NCHW" if case.data_format == "NCHW" and case.rank == 4 else "NHWC"
        if case.bias == "none":
            return h
        if case.bias == "biasadd":
            out = tf.nn.bias_add(h, self.const(b), data_format=fmt)
        elif case.bias == "computed":  # Keras 3: read through Identity/Reshape, or two constants summed
            vector = tf.reshape(tf.identity(self.const(b / 2)), [channels]) + self.const(b / 2)
            out = tf.nn.bias_add(h, vector, data_format=fmt)
        else:
            out = tf.add(h, self.const(b.reshape(self.channel_shape(channels, full=case.bias == "add_full"))))
        self.inner.append(out.op.name)
        return out

    def linear(self, h: tf.Tensor, cin: int) -> tuple[tf.Tensor, int]:
        case, rng = self.case, self.rng
        k, cout = case.kernel, case.cout
        strides = [1, case.stride, case.stride, 1] if case.data_format == "NHWC" else [1, 1, case.stride, case.stride]
        fmt = case.data_format
        if case.linear == "conv2d":
            w = self.const(rng.normal(0, 1 / np.sqrt(k * k * cin), (k, k, cin, cout)))
            return tf.raw_ops.Conv2D(input=h, filter=w, strides=strides, padding=case.padding, data_format=fmt), cout
        if case.linear == "depthwise":
            w = self.const(rng.normal(0, 1 / k, (k, k, cin, case.multiplier)))
            return tf.raw_ops.DepthwiseConv2dNative(
                input=h, filter=w, strides=strides, padding=case.padding, data_format=fmt
            ), cin * case.multiplier
        if case.linear == "matmul":
            w = self.const(rng.normal(0, 1 / np.sqrt(cin), (cin, cout)))
            return tf.raw_ops.MatMul(a=h, b=w), cout
        size = SPATIAL * case.stride if case.padding == "SAME" else (SPATIAL - 1) * case.stride + k
        sizes = [BATCH, size, size, cout] if fmt == "NHWC" else [BATCH, cout, size, size]
        w = self.const(rng.normal(0, 1 / k, (k, k, cout, cin)))
        y = tf.raw_ops.Conv2DBackpropInput(
            input_sizes=tf.constant(sizes, tf.int32), filter=w, out_backprop=h, strides=strides, padding=case.padding, data_format=fmt
        )
        return y, cout

    def build(self) -> tuple[graph_pb2.GraphDef, list[str]]:
        case = self.case
        graph = tf.Graph()
        with graph.as_default():
            if case.rank == 2:
                shape = [BATCH, case.cin]
            else:
                shape = [BATCH, SPATIAL, SPATIAL, case.cin] if case.data_format == "NHWC" else [BATCH, case.cin, SPATIAL, SPATIAL]
            if case.mixed:
                h = tf.cast(tf.compat.v1.placeholder(tf.float32, shape, name="x"), self.dt)
            else:
                h = tf.compat.v1.placeholder(self.dt, shape, name="x")
            if case.bn_before:
                h = self.bn(h, case.cin)
                h, channels = self.linear(h, case.cin)
                self.inner.insert(0, h.op.name)
                h = self.bias(h, channels)
            else:
                h, channels = self.linear(h, case.cin)
                self.inner.insert(0, h.op.name)
                h = self.bias(h, channels)
                h = self.bn(h, channels)
            out = tf.identity(tf.cast(h, tf.float32) if case.mixed else h, name="output")
            del out
        outputs = ["output"]
        if 0 <= case.named < len(self.inner):
            outputs.append(self.inner[case.named])
        return graph.as_graph_def(), outputs


def fuzz_settings(request: pytest.FixtureRequest) -> settings:
    return settings(
        max_examples=request.config.getoption("--fuzz-examples"),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much],
    )


def _feeds(graph_def: graph_pb2.GraphDef, seed: int) -> dict[str, np.ndarray]:
    x = next(n for n in graph_def.node if n.name == "x")
    dtype = tf.as_dtype(x.attr["dtype"].type).as_numpy_dtype
    shape = [d.size for d in x.attr["shape"].shape.dim]
    return {"x": np.random.default_rng(seed).standard_normal(shape).astype(dtype)}


def check_case(case: Case) -> None:
    graph_def, outputs = Builder(case).build()
    feeds = _feeds(graph_def, case.seed)
    try:
        expected = run_graph(graph_def, feeds, outputs)
    except (tf.errors.OpError, ValueError):
        # TensorFlow has no kernel here for this dtype/layout: not valid input, on every run (an intermittent
        # abort never gets here: run_graph follows bnfold's runner.ABORT_POLICY).
        assume(False)
        return
    result = bnfold.fold(graph_def, outputs=outputs, verify_outputs=False)
    kept = {n.name for n in result.graph_def.node}
    assert all(o in kept for o in outputs), (outputs, result.sites)
    actual = run_graph(result.graph_def, feeds, outputs)  # a graph TF cannot import or run fails here
    for name, a, b in zip(outputs, expected, actual, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype, (name, a.shape, b.shape, a.dtype, b.dtype, result.sites)
        a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert np.all(np.isfinite(b64) == np.isfinite(a64)), (name, result.sites)
        scale = float(np.max(np.abs(a64))) if a64.size else 0.0
        error = float(np.max(np.abs(a64 - b64))) if a64.size else 0.0
        assert error <= TOLERANCE[case.dtype] * max(scale, 1.0), (name, error, scale, result.sites)
    try:
        bnfold.fold(graph_def, outputs=outputs)
    except VerificationError as exc:  # valid input: a fold bug that only the check caught
        pytest.fail(f"the check rejected the fold of a valid graph: {exc}")
    except BnfoldError as exc:
        pytest.fail(f"bnfold refused a valid graph: {exc}")


def test_random_valid_graphs_fold_right_without_the_check(request: pytest.FixtureRequest) -> None:
    @fuzz_settings(request)
    @given(case=cases())
    def run(case: Case) -> None:
        check_case(case)

    run()


@pytest.mark.parametrize(
    "case",
    [
        Case("conv2d", "float16", True, "NHWC", "fused", False, False, "biasadd", "SAME", 1, 3, 3, 4, 1, -1, 0, False),
        Case("conv2d", "bfloat16", True, "NHWC", "decomposed", True, False, "computed", "SAME", 1, 3, 3, 4, 1, 1, 1, False),
        Case("matmul", "float32", False, "NHWC", "decomposed", False, False, "add_full", "SAME", 1, 1, 3, 4, 1, 0, 2, False),
        Case("conv2d", "float32", False, "NCHW", "fused", False, True, "add_full", "VALID", 1, 3, 3, 4, 1, 1, 3, False),
        Case("depthwise", "float16", False, "NHWC", "decomposed", False, False, "add_vector", "SAME", 2, 3, 2, 4, 2, 2, 4, True),
        Case("conv_transpose", "float32", False, "NHWC", "fused", False, False, "biasadd", "SAME", 2, 3, 2, 3, 1, 0, 5, False),
    ],
    ids=["fp16_mixed_fused", "bf16_keras3_mixed", "dense_named_add", "nchw_bn_before", "depthwise_fp16", "transposed_named"],
)
def test_known_cases(case: Case) -> None:
    """Fixed cases that found bugs (mixed-precision dtypes, names inside chains): they run in every CI."""
    check_case(case)
