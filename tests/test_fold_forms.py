"""Every BN form and linear op folds, keeps its names, and computes what it did (run in TF)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_close, bn_ops, run_graph

from bnfold import fold
from sample_models.make_samples import SAMPLES, Spec, build, input_shape

FOLDABLE = {name: spec for name, spec in SAMPLES.items() if not name.startswith("skip_")}
LINEAR_NAMES = {"conv2d": "conv", "depthwise": "conv", "conv3d": "conv", "conv_transpose": "conv", "matmul": "dense"}


def feed_for(spec: Spec, batch: int = 3, seed: int = 0) -> dict[str, np.ndarray]:
    shape = [batch if d is None else d for d in input_shape(spec, spec.cin)]
    return {"x": np.random.default_rng(seed).standard_normal(shape).astype(spec.dtype)}


def fold_and_compare(spec: Spec) -> tuple[object, list[np.ndarray], list[np.ndarray]]:
    graph_def = build(spec)
    result = fold(graph_def, verify_outputs=False)
    kept = {n.name for n in result.graph_def.node}
    fetches = ["output"] + [s.name for s in result.sites if s.name in kept]  # a backward fold removes the BN
    feeds = feed_for(spec)
    return result, run_graph(graph_def, feeds, fetches), run_graph(result.graph_def, feeds, fetches)


@pytest.mark.parametrize("name", sorted(FOLDABLE))
def test_sample_folds_completely(name: str) -> None:
    spec = FOLDABLE[name]
    result, before, after = fold_and_compare(spec)
    assert [s.action for s in result.sites] == ["folded"], result.sites
    assert result.sites[0].folded_into.startswith(LINEAR_NAMES[spec.linear])
    assert bn_ops(result.graph_def) == []
    rtol, atol = (1e-2, 1e-2) if spec.dtype == "float16" else (1e-4, 1e-5)
    for a, b in zip(before, after, strict=True):
        assert_close(a, b, rtol, atol)


@pytest.mark.parametrize("bn", ["fused", "fused_v2", "fused_v3", "global", "nn", "keras3"])
@pytest.mark.parametrize("data_format", ["NHWC", "NCHW"])
def test_every_bn_form_after_conv(bn: str, data_format: str) -> None:
    if bn == "global" and data_format == "NCHW":
        pytest.skip("BatchNormWithGlobalNormalization is NHWC only")
    result, before, after = fold_and_compare(Spec(bn=bn, data_format=data_format, cout=5))
    assert result.sites[0].action == "folded"
    assert bn_ops(result.graph_def) == []
    for a, b in zip(before, after, strict=True):
        assert_close(a, b)


@pytest.mark.parametrize("transpose_b", [False, True])
@pytest.mark.parametrize("bn", ["nn", "keras3"])
def test_dense_both_weight_layouts(transpose_b: bool, bn: str) -> None:
    result, before, after = fold_and_compare(Spec(linear="matmul", bn=bn, transpose_b=transpose_b, cin=6, cout=7))
    assert result.sites[0].action == "folded" and result.sites[0].folded_into == "dense"
    for a, b in zip(before, after, strict=True):
        assert_close(a, b)


@pytest.mark.parametrize("multiplier", [1, 3])
@pytest.mark.parametrize("data_format", ["NHWC", "NCHW"])
def test_depthwise_channel_multiplier(multiplier: int, data_format: str) -> None:
    spec = Spec(linear="depthwise", multiplier=multiplier, data_format=data_format, cin=4, bias="add")
    result, before, after = fold_and_compare(spec)
    assert result.sites[0].action == "folded"
    for a, b in zip(before, after, strict=True):
        assert_close(a, b)


@pytest.mark.parametrize("data_format", ["NDHWC", "NCDHW"])
def test_conv3d_both_layouts(data_format: str) -> None:
    result, before, after = fold_and_compare(Spec(linear="conv3d", data_format=data_format, spatial=5))
    assert result.sites[0].action == "folded"
    for a, b in zip(before, after, strict=True):
        assert_close(a, b)


def test_bn_keeps_its_name_for_downstream_readers() -> None:
    result, _, _ = fold_and_compare(Spec())
    nodes = {n.name: n for n in result.graph_def.node}
    assert nodes["bn"].op == "BiasAdd"
    assert nodes["output"].input[0] == "bn"


def test_gamma_and_beta_may_be_absent() -> None:
    for gamma, beta in [(False, True), (True, False), (False, False)]:
        result, before, after = fold_and_compare(Spec(bn="keras3", gamma=gamma, beta=beta))
        assert result.sites[0].action == "folded"
        for a, b in zip(before, after, strict=True):
            assert_close(a, b)
        result, before, after = fold_and_compare(Spec(bn="nn", gamma=gamma, beta=beta, data_format="NCHW"))
        assert result.sites[0].action == "folded"
        for a, b in zip(before, after, strict=True):
            assert_close(a, b)
