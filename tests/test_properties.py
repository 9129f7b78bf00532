"""Hypothesis: random conv/dense + BN graphs fold and still compute the same outputs in TF."""

from __future__ import annotations

import numpy as np
from conftest import assert_close, bn_ops, run_graph
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bnfold import fold
from sample_models.make_samples import Spec, build, input_shape

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


@st.composite
def statistics(draw: st.DrawFn, channels: int) -> dict[str, np.ndarray]:
    """BN statistics including tiny variances, large means and negative gamma."""
    floats = st.floats
    gamma = draw(st.lists(st.one_of(floats(0.01, 3), floats(-3, -0.01)), min_size=channels, max_size=channels))
    beta = draw(st.lists(floats(-5, 5), min_size=channels, max_size=channels))
    mean = draw(st.lists(st.one_of(floats(-2, 2), floats(-300, 300)), min_size=channels, max_size=channels))
    var = draw(st.lists(st.one_of(floats(1e-6, 1e-3), floats(0.01, 50)), min_size=channels, max_size=channels))
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
    cin = draw(st.integers(1, 6))
    cout = draw(st.integers(1, 6))
    multiplier = draw(st.integers(1, 3))
    out_channels = cin * multiplier if linear == "depthwise" else cout
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
    )
    stats = draw(statistics(out_channels))
    return Spec(**{**spec.__dict__, "stats": stats})


@SETTINGS
@given(spec=specs(), batch=st.integers(1, 3))
def test_random_graph_folds_to_the_same_outputs(spec: Spec, batch: int) -> None:
    graph_def = build(spec)
    result = fold(graph_def, verify_outputs=False)
    assert [s.action for s in result.sites] == ["folded"], result.sites
    assert bn_ops(result.graph_def) == []
    shape = [batch if d is None else d for d in input_shape(spec, spec.cin)]
    feeds = {"x": np.random.default_rng(spec.seed).standard_normal(shape).astype(np.float32)}
    fetches = ["output", result.sites[0].name]
    before = run_graph(graph_def, feeds, fetches)
    after = run_graph(result.graph_def, feeds, fetches)
    for a, b in zip(before, after, strict=True):
        # float32 throughout; large means cancel, so compare relative to the output's magnitude
        assert_close(a, b, rtol=2e-4, atol=1e-4)


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

    from bnfold.folding import fold_graph

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

    from bnfold.io import stream_graph_def

    graph_def = fold(build(spec), verify_outputs=False).graph_def
    buffer = stdio.BytesIO()
    stream_graph_def(graph_def, buffer)
    assert buffer.getvalue() == graph_def.SerializeToString(deterministic=True)
