"""Hypothesis: random conv/dense + BN graphs fold and still compute the same outputs in TF."""

from __future__ import annotations

import numpy as np
import tensorflow as tf
from conftest import assert_close, bn_ops, run_graph
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from bnfold import fold
from sample_models.make_samples import Spec, build, input_shape

SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]
)


@st.composite
def statistics(draw: st.DrawFn, channels: int, wide: bool = True) -> dict[str, np.ndarray]:
    """BN statistics including tiny variances, large means and negative gamma (``wide``: float32's range)."""
    floats = st.floats
    gamma = draw(st.lists(st.one_of(floats(0.01, 3), floats(-3, -0.01)), min_size=channels, max_size=channels))
    beta = draw(st.lists(floats(-5, 5), min_size=channels, max_size=channels))
    big_mean, small_var = (floats(-300, 300), floats(1e-6, 1e-3)) if wide else (floats(-4, 4), floats(1e-2, 0.1))
    mean = draw(st.lists(st.one_of(floats(-2, 2), big_mean), min_size=channels, max_size=channels))
    var = draw(st.lists(st.one_of(small_var, floats(0.01, 50)), min_size=channels, max_size=channels))
    return {k: np.array(v) for k, v in dict(gamma=gamma, beta=beta, mean=mean, var=var).items()}


@st.composite
def specs(draw: st.DrawFn) -> Spec:
    linear = draw(st.sampled_from(["conv2d", "depthwise", "conv3d", "matmul", "conv_transpose"]))
    if linear == "matmul":
        bn = draw(st.sampled_from(["nn", "keras3"]))
        data_format = "NHWC"
    else:
        bn = draw(st.sampled_from(["fused", "fused_v2", "fused_v3", "nn", "keras3", "global"]))
        channels_last = draw(st.booleans())
        if linear == "conv3d":
            data_format = "NDHWC" if channels_last else "NCDHW"
            bn = "fused_v3" if bn in ("fused", "fused_v2", "global") else bn
        else:
            data_format = "NHWC" if channels_last else "NCHW"
            bn = "fused_v3" if bn == "global" and not channels_last else bn
    dtype = draw(st.sampled_from(["float32", "float16", "bfloat16"]))
    bn_before = draw(st.booleans())
    if dtype != "float32":  # the sample builder makes BatchNormWithGlobalNormalization and FusedBatchNorm v1 in float32 only
        bn = {"global": "fused_v3", "fused": "fused_v3"}.get(bn, bn)
    cin = draw(st.integers(1, 6))
    cout = draw(st.integers(1, 6))
    multiplier = draw(st.integers(1, 3))
    out_channels = cin if bn_before else cin * multiplier if linear == "depthwise" else cout
    spec = Spec(
        linear=linear,
        bn=bn,
        data_format=data_format,
        cin=cin,
        cout=cout,
        kernel=draw(st.integers(1, 3)),
        stride=draw(st.integers(1, 2)),
        padding=draw(st.sampled_from(["SAME", "VALID"])),
        multiplier=multiplier,
        bias=draw(st.sampled_from(["biasadd", "add", "reshape", None])),
        transpose_b=draw(st.booleans()),
        spatial=5 if linear == "conv3d" else 7,
        epsilon=draw(st.sampled_from([1e-3, 1e-5, 0.0])) if bn not in ("fused", "fused_v2", "fused_v3") else 1e-3,
        seed=draw(st.integers(0, 1000)),
        dtype=dtype,
        bn_before=bn_before,
    )
    stats = draw(statistics(out_channels, wide=dtype == "float32"))
    return Spec(**{**spec.__dict__, "stats": stats})


@SETTINGS
@given(spec=specs(), batch=st.integers(1, 3))
def test_random_graph_folds_to_the_same_outputs(spec: Spec, batch: int) -> None:
    graph_def = build(spec)
    result = fold(graph_def, verify_outputs=False)
    site = result.sites[0]
    if spec.bn_before and (spec.linear == "conv_transpose" or (spec.linear != "matmul" and spec.padding == "SAME")):
        # Before a conv the shift is exact only without zero padding (or with no shift); never into a transposed conv.
        assert len(result.sites) == 1 and site.action in ("folded", "standalone"), result.sites
        assert site.action == "folded" or "pads with zeros" in (site.reason or "") or "transposed conv" in (site.reason or "")
    else:
        assert [s.action for s in result.sites] == ["folded"], result.sites
    assert bn_ops(result.graph_def) == []
    shape = [batch if d is None else d for d in input_shape(spec, spec.cin)]
    dtype = tf.as_dtype(spec.dtype).as_numpy_dtype
    feeds = {"x": np.random.default_rng(spec.seed).standard_normal(shape).astype(dtype)}
    fetches = ["output"] if spec.bn_before else ["output", site.name]  # a BN folded backward is gone; after, it keeps its name
    try:
        before = run_graph(graph_def, feeds, fetches)
    except tf.errors.OpError:  # no CPU kernel here for this dtype/layout (oneDNN bf16 reorders): not valid input
        assume(False)
    after = run_graph(result.graph_def, feeds, fetches)
    # large means cancel, so compare relative to the output's magnitude; fp16/bf16 round the folded weights once more
    rtol, atol = {"float32": (2e-4, 1e-4), "float16": (2e-2, 1e-2), "bfloat16": (6e-2, 5e-2)}[spec.dtype]
    for a, b in zip(before, after, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert_close(a, b, rtol=rtol, atol=atol)


@SETTINGS
@given(spec=specs())
def test_folding_twice_changes_nothing(spec: Spec) -> None:
    once = fold(build(spec), verify_outputs=False).graph_def
    twice = fold(once, verify_outputs=False)
    assert twice.sites == []
    assert twice.graph_def.SerializeToString(deterministic=True) == once.SerializeToString(deterministic=True)


@SETTINGS
@given(spec=specs())
def test_in_place_fold_writes_the_same_bytes(spec: Spec) -> None:
    """fold_graph(in_place=True) edits the parsed graph into exactly what the copying fold builds."""
    from tensorflow.core.framework import graph_pb2

    from bnfold.tf.fold import fold_graph

    data = build(spec).SerializeToString(deterministic=True)
    original = graph_pb2.GraphDef.FromString(data)
    copied, copied_sites = fold_graph(original, {"x", "output"})
    assert original.SerializeToString(deterministic=True) == data  # the copying fold leaves its input alone
    owned = graph_pb2.GraphDef.FromString(data)
    edited, edited_sites = fold_graph(owned, {"x", "output"}, in_place=True)
    assert edited is owned
    assert edited_sites == copied_sites
    assert edited.SerializeToString(deterministic=True) == copied.SerializeToString(deterministic=True)


@SETTINGS
@given(spec=specs())
def test_streamed_graph_def_is_the_serialized_graph_def(spec: Spec) -> None:
    import io as stdio

    from bnfold.tf.io import stream_graph_def

    graph_def = fold(build(spec), verify_outputs=False).graph_def
    buffer = stdio.BytesIO()
    stream_graph_def(graph_def, buffer)
    assert buffer.getvalue() == graph_def.SerializeToString(deterministic=True)
