"""Frozen graphs that other people published (../shared/realworld/tf, MANIFEST.md), used by path.

Each is folded without bnfold's check and compared with the original in TensorFlow
here; sites that must not fold are skipped for the reason the manifest names.
Also: TF 1.x conventions on constructed graphs (no ``versions`` record, the
legacy empty placeholder shape).
"""

from __future__ import annotations

import io
import wave
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_close, realworld_path, run_graph
from tensorflow.core.framework import graph_pb2

import bnfold
from bnfold.core.errors import VerificationError
from bnfold.tf.io import load_graph_def
from bnfold.tf.verify import find_inputs, find_outputs

REALWORLD = realworld_path("tf")
KWS = REALWORLD / "ML-KWS-for-MCU" / "Pretrained_models"
ONE = REALWORLD / "ONE" / "res" / "TensorFlowTests"
AMD = REALWORLD / "AMDMIGraphX" / "test" / "tf" / "models"

# file -> (folded, standalone, skipped, reason of the skipped sites): what the manifest says must happen.
EXPECTED: dict[str, tuple[int, int, int, str | None]] = {
    "AMDMIGraphX/test/tf/models/batchnorm_test.pb": (0, 0, 1, "not constants"),
    "AMDMIGraphX/test/tf/models/batchnormv3_test.pb": (0, 0, 1, "not constants"),
    "AMDMIGraphX/test/tf/models/batchnorm_half_test.pb": (0, 0, 1, "not constants"),
    "ML-KWS-for-MCU/Pretrained_models/CNN/CNN_S.pb": (3, 0, 0, None),
    "ML-KWS-for-MCU/Pretrained_models/CNN/CNN_M.pb": (3, 0, 0, None),
    "ML-KWS-for-MCU/Pretrained_models/CNN/CNN_L.pb": (3, 0, 0, None),
    "ML-KWS-for-MCU/Pretrained_models/CRNN/CRNN_S.pb": (0, 0, 0, None),
    "ML-KWS-for-MCU/Pretrained_models/DS_CNN/DS_CNN_S.pb": (9, 0, 0, None),
    "ML-KWS-for-MCU/Pretrained_models/DS_CNN/DS_CNN_M.pb": (9, 0, 0, None),
    "ML-KWS-for-MCU/Pretrained_models/DS_CNN/DS_CNN_L.pb": (11, 0, 0, None),
    "ONE/res/TensorFlowTests/NET_0003/test.pbtxt": (1, 0, 0, None),
    "ONE/res/TensorFlowTests/NET_0004/test.pbtxt": (1, 0, 0, None),
    "ONE/res/TensorFlowTests/NET_0028/test.pbtxt": (0, 0, 0, None),  # instance norm: another normalization, not a BN
    "ONE/res/TensorFlowTests/UNIT_FusedBatchNorm_000/test.pbtxt": (0, 1, 0, None),
    "ONE/res/TensorFlowTests/UNIT_FusedBatchNorm_001/test.pbtxt": (0, 1, 0, None),
}

pytestmark = pytest.mark.realworld


def wav_bytes(seconds: float = 1.0, rate: int = 16000, seed: int = 0) -> bytes:
    """A mono 16-bit WAV: what the KWS graphs' ``wav_data`` input decodes."""
    samples = (np.random.default_rng(seed).standard_normal(int(seconds * rate)) * 3000).astype(np.int16)
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(samples.tobytes())
    return buffer.getvalue()


def feeds_for(graph_def: graph_pb2.GraphDef, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for spec in find_inputs(graph_def):
        if spec.dtype.kind == "O":
            feeds[spec.name] = np.array(wav_bytes(seed=seed), dtype=object)
            continue
        shape = [2 if d is None else d for d in (spec.shape or [])]
        value = rng.standard_normal(shape)
        if spec.name != "x" and "input" not in spec.name:  # BN parameters fed at run time: keep the variance positive
            value = np.abs(value) + 0.1
        feeds[spec.name] = value.astype(spec.dtype)
    return feeds


@pytest.mark.parametrize("relative", sorted(EXPECTED))
def test_realworld_graph_folds_right_or_skips_for_the_manifest_reason(relative: str) -> None:
    path = REALWORLD / relative
    graph_def = load_graph_def(path)
    outputs = find_outputs(graph_def)
    result = bnfold.fold(graph_def, outputs=outputs, verify_outputs=False)
    folded, standalone, skipped, reason = EXPECTED[relative]
    assert (result.count("folded"), result.count("standalone"), result.count("skipped")) == (folded, standalone, skipped), result.sites
    if reason:
        assert all(reason in (s.reason or "") for s in result.sites if s.action == "skipped"), result.sites
    assert result.graph_def is not None
    feeds = feeds_for(graph_def)
    expected = run_graph(graph_def, feeds, outputs)
    actual = run_graph(result.graph_def, feeds, outputs)
    for a, b in zip(expected, actual, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert_close(a, b, rtol=1e-2 if a.dtype == np.float16 else 1e-4)
    if folded:
        left = {n.op for n in result.graph_def.node} & {"FusedBatchNorm", "FusedBatchNormV3", "Rsqrt"}
        assert not left, left


@pytest.mark.parametrize("name", ["CNN/CNN_S.pb", "DS_CNN/DS_CNN_S.pb"])
def test_kws_graph_checked_through_its_mfcc_tensor(name: str) -> None:
    """The string input cannot be made up; the decoded MFCCs can be fed, and the check runs from there."""
    graph_def = load_graph_def(KWS / name)
    (mfcc,) = run_graph(graph_def, {"wav_data": np.array(wav_bytes(), dtype=object)}, ["Mfcc:0"])
    with pytest.raises(VerificationError, match="Mfcc"):
        bnfold.fold(graph_def)  # no feed: the error names the tensor to feed instead
    result = bnfold.fold(graph_def, feeds={"Mfcc:0": mfcc})
    assert result.verification is not None and result.verification.passed
    assert result.count("folded") == EXPECTED[f"ML-KWS-for-MCU/Pretrained_models/{name}"][0]


def _conv_bn_graph(producer: int | None, placeholder_shape: list[int] | None) -> graph_pb2.GraphDef:
    """Placeholder -> Conv2D -> FusedBatchNorm (V1) as TF 1.x wrote it; ``placeholder_shape=[]`` is ``shape {}``."""
    graph = tf.Graph()
    rng = np.random.default_rng(0)
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, shape=[None, 6, 6, 3], name="x")
        y = tf.nn.conv2d(x, tf.constant(rng.standard_normal((3, 3, 3, 4)).astype(np.float32)), 1, "SAME", name="conv")
        scale, offset, mean = (tf.constant(rng.standard_normal(4).astype(np.float32)) for _ in range(3))
        var = tf.constant(rng.uniform(0.5, 2, 4).astype(np.float32))
        tf.raw_ops.FusedBatchNorm(x=y, scale=scale, offset=offset, mean=mean, variance=var, is_training=False, name="bn")
        tf.identity(graph.get_tensor_by_name("bn:0"), name="output")
    graph_def = graph.as_graph_def()
    if producer is None:
        graph_def.ClearField("versions")
    else:
        graph_def.versions.producer = producer
    if placeholder_shape is not None:
        node = next(n for n in graph_def.node if n.name == "x")
        node.attr["shape"].shape.Clear()
        for d in placeholder_shape:
            node.attr["shape"].shape.dim.add().size = d
    return graph_def


def test_graph_without_versions_record_is_read_and_folded(tmp_path: Path) -> None:
    graph_def = _conv_bn_graph(None, None)
    src = tmp_path / "tf1.pb"
    src.write_bytes(graph_def.SerializeToString())
    loaded = load_graph_def(src)
    assert not loaded.HasField("versions")
    result = bnfold.fold_file(src, tmp_path / "out.pb")
    assert result.count("folded") == 1 and result.verification is not None and result.verification.passed
    x = np.random.default_rng(1).standard_normal((2, 6, 6, 3)).astype(np.float32)
    written = load_graph_def(tmp_path / "out.pb")
    assert_close(run_graph(graph_def, {"x": x}, ["output"])[0], run_graph(written, {"x": x}, ["output"])[0])


@pytest.mark.parametrize("producer", [0, 21])
def test_legacy_empty_placeholder_shape_means_unknown(producer: int) -> None:
    """Up to producer 21, ``shape {}`` is "unknown": bnfold must not feed a scalar (which aborts TF's conv)."""
    graph_def = _conv_bn_graph(producer, [])
    (spec,) = find_inputs(graph_def)
    assert spec.shape is None
    with pytest.raises(VerificationError, match="--input-shape x="):
        bnfold.fold(graph_def)
    result = bnfold.fold(graph_def, input_shapes={"x": [2, 6, 6, 3]})
    assert result.verification is not None and result.verification.passed and result.count("folded") == 1


def test_empty_placeholder_shape_is_a_scalar_in_new_graphs() -> None:
    graph_def = _conv_bn_graph(1000, [])
    (spec,) = find_inputs(graph_def)
    assert spec.shape == []
