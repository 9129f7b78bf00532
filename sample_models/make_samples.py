"""Build the small frozen graphs in ``sample_models/`` (and the graphs the tests fold).

Rerun with ``python sample_models/make_samples.py``; output is deterministic.
Each graph is a placeholder ``x`` -> linear op -> optional bias -> BN -> ``Relu``
named ``output``, written with the exact TF ops a real model freezes into.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from tensorflow.core.framework import graph_pb2, node_def_pb2  # noqa: E402

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Spec:
    """One conv/dense + BN graph. ``bn`` is a BN form, ``linear`` a linear op."""

    linear: str = "conv2d"  # conv2d | depthwise | conv3d | matmul | conv_transpose | none
    bn: str = "fused_v3"  # fused | fused_v2 | fused_v3 | global | nn | keras3
    data_format: str = "NHWC"  # NHWC | NCHW (NDHWC/NCDHW for conv3d)
    cin: int = 3
    cout: int = 4
    kernel: int = 3
    stride: int = 1
    padding: str = "SAME"
    multiplier: int = 1
    bias: str | None = "biasadd"  # biasadd | add | reshape | None
    transpose_b: bool = False
    dtype: str = "float32"
    spatial: int = 8
    gamma: bool = True
    beta: bool = True
    is_training: bool = False
    shared_output: bool = False  # the linear op's output also feeds another op
    bn_before: bool = False  # BN before the linear op instead of after
    seed: int = 0
    stats: dict[str, np.ndarray] = field(default_factory=dict, compare=False, hash=False)
    epsilon: float = 1e-3

    @property
    def channels_last(self) -> bool:
        return self.data_format.endswith("C")

    @property
    def rank(self) -> int:
        return {"conv3d": 5, "matmul": 2}.get(self.linear, 4)


def random_stats(channels: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Trained-looking BN statistics: gamma of both signs, nonzero means."""
    return {
        "gamma": rng.uniform(0.5, 1.5, channels) * rng.choice([-1.0, 1.0], channels),
        "beta": rng.normal(0, 0.5, channels),
        "mean": rng.normal(0, 0.5, channels),
        "var": rng.uniform(0.2, 2.0, channels),
    }


def _channel_shape(spec: Spec, channels: int) -> list[int]:
    """Shape of a per-channel constant broadcast against the BN input."""
    if spec.channels_last or spec.rank == 2:
        return [channels]
    return [channels] + [1] * (spec.rank - 2)


def _strides(spec: Spec) -> list[int]:
    n = spec.rank - 2
    s = [spec.stride] * n
    return [1, *s, 1] if spec.channels_last else [1, 1, *s]


def input_shape(spec: Spec, channels: int) -> list[int | None]:
    if spec.rank == 2:
        return [None, channels]
    spatial = [spec.spatial] * (spec.rank - 2)
    return [None, *spatial, channels] if spec.channels_last else [None, channels, *spatial]


def _linear(spec: Spec, x: tf.Tensor, rng: np.random.Generator) -> tuple[tf.Tensor, int]:
    """The linear op and its number of output channels."""
    dtype = tf.as_dtype(spec.dtype)
    k, cin, cout = spec.kernel, spec.cin, spec.cout

    def weights(shape: list[int]) -> tf.Tensor:
        fan_in = int(np.prod(shape)) // shape[-1]
        w = rng.normal(0, 1.0 / np.sqrt(max(fan_in, 1)), shape)
        return tf.constant(w.astype(dtype.as_numpy_dtype), name="weights")

    fmt = spec.data_format
    if spec.linear == "conv2d":
        return tf.raw_ops.Conv2D(
            input=x, filter=weights([k, k, cin, cout]), strides=_strides(spec), padding=spec.padding, data_format=fmt, name="conv"
        ), cout
    if spec.linear == "depthwise":
        y = tf.raw_ops.DepthwiseConv2dNative(
            input=x,
            filter=weights([k, k, cin, spec.multiplier]),
            strides=_strides(spec),
            padding=spec.padding,
            data_format=fmt,
            name="conv",
        )
        return y, cin * spec.multiplier
    if spec.linear == "conv3d":
        return tf.raw_ops.Conv3D(
            input=x, filter=weights([k, k, k, cin, cout]), strides=_strides(spec), padding=spec.padding, data_format=fmt, name="conv"
        ), cout
    if spec.linear == "matmul":
        w = weights([cout, cin] if spec.transpose_b else [cin, cout])
        return tf.raw_ops.MatMul(a=x, b=w, transpose_b=spec.transpose_b, name="dense"), cout
    if spec.linear == "conv_transpose":
        size = spec.spatial * spec.stride if spec.padding == "SAME" else (spec.spatial - 1) * spec.stride + k
        spatial = [size, size, cout] if spec.channels_last else [cout, size, size]
        batch = tf.shape(tf.compat.v1.get_default_graph().get_tensor_by_name("x:0"))[:1]
        sizes = tf.concat([batch, tf.constant(spatial, tf.int32)], axis=0)
        return tf.raw_ops.Conv2DBackpropInput(
            input_sizes=sizes,
            filter=weights([k, k, cout, cin]),
            out_backprop=x,
            strides=_strides(spec),
            padding=spec.padding,
            data_format=fmt,
            name="conv",
        ), cout
    raise ValueError(f"unknown linear op {spec.linear}")


def _bias(spec: Spec, y: tf.Tensor, channels: int, rng: np.random.Generator) -> tf.Tensor:
    if spec.bias is None:
        return y
    b = rng.normal(0, 0.3, channels).astype(tf.as_dtype(spec.dtype).as_numpy_dtype)
    fmt = "NHWC" if spec.channels_last or spec.rank == 2 else "NCHW"
    if spec.bias == "biasadd":
        return tf.nn.bias_add(y, tf.constant(b, name="bias"), data_format=fmt, name="bias_add")
    if spec.bias == "add":
        return tf.add(y, tf.constant(b.reshape(_channel_shape(spec, channels)), name="bias"), name="bias_add")
    if spec.bias == "reshape":  # Keras 3: bias read through Identity, Reshape and Squeeze
        full = [1] * spec.rank
        channel_dim = spec.rank - 1 if spec.channels_last or spec.rank == 2 else 1
        full[channel_dim] = channels
        shaped = tf.reshape(tf.identity(tf.constant(b, name="bias")), full)
        squeezed = tf.squeeze(shaped, axis=[d for d in range(spec.rank) if d != channel_dim])
        return tf.raw_ops.BiasAdd(value=y, bias=squeezed, data_format=fmt, name="bias_add")
    raise ValueError(spec.bias)


def _bn(spec: Spec, y: tf.Tensor, channels: int, stats: dict[str, np.ndarray]) -> tf.Tensor:
    """The BN in the form ``spec.bn`` freezes into."""
    f32 = {k: tf.constant(v.astype(np.float32), name=k) for k, v in stats.items()}
    if spec.bn in ("fused", "fused_v2", "fused_v3", "global"):
        op = {"fused": tf.raw_ops.FusedBatchNorm, "fused_v2": tf.raw_ops.FusedBatchNormV2}.get(spec.bn, tf.raw_ops.FusedBatchNormV3)
        fmt = spec.data_format if spec.rank != 5 else ("NDHWC" if spec.channels_last else "NCDHW")
        x = y if spec.dtype == "float32" or spec.bn != "fused" else tf.cast(y, tf.float32)
        return op(
            x=x,
            scale=f32["gamma"],
            offset=f32["beta"],
            mean=f32["mean"],
            variance=f32["var"],
            epsilon=spec.epsilon,
            data_format=fmt,
            is_training=spec.is_training,
            name="bn",
        )[0]
    dtype = tf.as_dtype(spec.dtype)
    shape = _channel_shape(spec, channels)

    def param(key: str) -> tf.Tensor:
        return tf.cast(tf.reshape(tf.identity(f32[key], name=f"{key}/read"), shape), dtype)

    gamma = param("gamma") if spec.gamma else None
    beta = param("beta") if spec.beta else None
    if spec.bn == "nn":
        with tf.name_scope("bn"):
            return tf.nn.batch_normalization(y, param("mean"), param("var"), beta, gamma, spec.epsilon)
    if spec.bn == "keras3":
        with tf.name_scope("bn"):
            inv = tf.math.rsqrt(param("var") + spec.epsilon)
            if gamma is not None:
                inv = inv * gamma
            shift = -param("mean") * inv if beta is None else beta - param("mean") * inv
            return tf.add(y * inv, shift, name="add_1")
    raise ValueError(f"unknown BN form {spec.bn}")


def build(spec: Spec) -> graph_pb2.GraphDef:
    """A frozen GraphDef for ``spec``; deterministic for the same spec."""
    rng = np.random.default_rng(spec.seed)
    graph = tf.Graph()
    with graph.as_default():
        dtype = tf.as_dtype(spec.dtype)
        first_channels = spec.cin
        x = tf.compat.v1.placeholder(dtype, input_shape(spec, first_channels), name="x")
        if spec.bn_before:
            stats = spec.stats or random_stats(first_channels, rng)
            h = _bn(spec, x, first_channels, stats)
            h, channels = _linear(spec, h, rng)
            h = _bias(spec, h, channels, rng)
            out = tf.nn.relu(h, name="output")
        else:
            h, channels = _linear(spec, x, rng)
            if spec.shared_output:
                tf.identity(h, name="pre_bn_output")
            h = _bias(spec, h, channels, rng)
            stats = spec.stats or random_stats(channels, rng)
            bn = _bn(spec, h, channels, stats)
            out = tf.nn.relu(bn, name="output")
        del out
    graph_def = graph.as_graph_def()
    if spec.bn == "global":
        graph_def = _to_global_normalization(graph_def)
    return graph_def


def _to_global_normalization(graph_def: graph_pb2.GraphDef) -> graph_pb2.GraphDef:
    """Rewrite the fused BN as the pre-2016 ``BatchNormWithGlobalNormalization`` op (GraphDef v8)."""
    out = graph_pb2.GraphDef()
    out.CopyFrom(graph_def)
    for node in out.node:
        if node.name == "bn":
            x, gamma, beta, mean, var = node.input[:5]
            new = node_def_pb2.NodeDef(name="bn", op="BatchNormWithGlobalNormalization", input=[x, mean, var, beta, gamma])
            new.attr["T"].CopyFrom(node.attr["T"])
            new.attr["variance_epsilon"].f = node.attr["epsilon"].f
            new.attr["scale_after_normalization"].b = True
            node.CopyFrom(new)
    out.versions.producer = 8
    return out


# The bundled samples: every BN form and linear op, NCHW, fp16, and sites that must be skipped.
SAMPLES: dict[str, Spec] = {
    "conv_fused_nhwc": Spec(),
    "conv_fused_nchw": Spec(data_format="NCHW", bn="fused_v3"),
    "conv_fusedv1_nobias": Spec(bn="fused", bias=None),
    "conv_fp16": Spec(dtype="float16", bn="fused_v3"),
    "depthwise_mult2": Spec(linear="depthwise", multiplier=2, bn="fused_v2", bias=None),
    "conv3d_fused": Spec(linear="conv3d", data_format="NDHWC", spatial=6),
    "conv_transpose_fused": Spec(linear="conv_transpose", stride=2, bias="biasadd"),
    "dense_nn_transpose_b": Spec(linear="matmul", bn="nn", transpose_b=True, cin=16, cout=8, bias="add"),
    "conv_keras3": Spec(bn="keras3", bias="reshape"),
    "conv_global_norm": Spec(bn="global"),
    "bn_before_dense": Spec(linear="matmul", bn="nn", bn_before=True, cin=8, cout=5),
    "skip_training_bn": Spec(is_training=True),
    "skip_shared_conv": Spec(shared_output=True),
}


def main(target: Path = HERE) -> None:
    for name, spec in SAMPLES.items():
        data = build(spec).SerializeToString(deterministic=True)
        (target / f"{name}.pb").write_bytes(data)
        print(f"{name}.pb  {len(data)} bytes")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
