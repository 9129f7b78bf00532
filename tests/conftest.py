"""Shared helpers: run real TensorFlow graphs and compare them, independently of bnfold.verify."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Reference runs of channels_first Keras models execute eagerly, and TF's CPU kernels run NCHW
# convolutions only through oneDNN, which TF turns off by default on CPUs without AVX-512 (CI's).
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402
from tensorflow.core.framework import graph_pb2  # noqa: E402
from tensorflow.core.protobuf import config_pb2, rewriter_config_pb2  # noqa: E402

BN_OPS = {"FusedBatchNorm", "FusedBatchNormV2", "FusedBatchNormV3", "BatchNormWithGlobalNormalization", "Rsqrt"}


def session_config() -> config_pb2.ConfigProto:
    """NCHW convolutions run on the CPU only through oneDNN, which TF turns off on CPUs without
    AVX-512: let grappler's layout pass convert them (exact), as on a user's laptop."""
    config = config_pb2.ConfigProto()
    config.graph_options.rewrite_options.cpu_layout_conversion = rewriter_config_pb2.RewriterConfig.NCHW_TO_NHWC
    return config


def run_graph(graph_def: graph_pb2.GraphDef, feeds: dict[str, np.ndarray], fetches: list[str]) -> list[np.ndarray]:
    graph = tf.Graph()
    with graph.as_default():
        tf.graph_util.import_graph_def(graph_def, name="")
    with tf.compat.v1.Session(graph=graph, config=session_config()) as session:
        names = [f if ":" in f else f"{f}:0" for f in fetches]
        return session.run(names, {(k if ":" in k else f"{k}:0"): v for k, v in feeds.items()})


def bn_ops(graph_def: graph_pb2.GraphDef) -> list[str]:
    return [n.name for n in graph_def.node if n.op in BN_OPS]


def max_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)))) if np.size(a) else 0.0


def assert_close(a: np.ndarray, b: np.ndarray, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    scale = float(np.max(np.abs(np.asarray(a, np.float64)))) if np.size(a) else 0.0
    err = max_error(a, b)
    assert err <= atol + rtol * scale, f"max abs error {err} > {atol} + {rtol} * {scale}"


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--fuzz-examples", type=int, default=40, help="hypothesis examples per fuzz test (CI: 40)")
    parser.addoption("--run-slow", action="store_true", help="also run tests marked slow (several-hundred-MB graphs)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: long test, run with --run-slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
