"""Shared helpers: run real TensorFlow graphs and compare them, independently of bnfold.verify.

Also the one place that decides (see docs/development.md, "Tests"):

- whether the published models are here (``realworld`` fixture and marker,
  ``BNFOLD_REALWORLD`` / ``BNFOLD_NO_REALWORLD``);
- how hypothesis runs (profiles ``ci``, the default, and ``fuzz`` with ``--run-slow``);
- what a TensorFlow abort means in a test (``run_graph`` goes through bnfold's own runner policy).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Reference runs of channels_first Keras models execute eagerly, and TF's CPU kernels run NCHW
# convolutions only through oneDNN, which TF turns off by default on CPUs without AVX-512 (CI's).
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402
from tensorflow.core.framework import graph_pb2  # noqa: E402
from tensorflow.core.protobuf import config_pb2, rewriter_config_pb2  # noqa: E402

from bnfold.tf import runner  # noqa: E402

# -- the published models (../shared/realworld, MANIFEST.md there) ---------------------------------------------


def _realworld_root() -> Path | None:
    """Where the published models are, or None: absent (a user's clone) or hidden (``BNFOLD_NO_REALWORLD=1``).

    ``BNFOLD_REALWORLD=/path`` points at a copy elsewhere. They are other people's
    files under their own licences, used by path and never copied into the project.
    """
    if os.environ.get("BNFOLD_NO_REALWORLD", "") not in ("", "0"):
        return None
    path = Path(os.environ.get("BNFOLD_REALWORLD") or ROOT.parent / "shared" / "realworld")
    return path if path.is_dir() else None


REALWORLD_ROOT = _realworld_root()
REALWORLD_SKIP = (
    "needs the published models (../shared/realworld beside the project, or BNFOLD_REALWORLD=/path; "
    "hidden by BNFOLD_NO_REALWORLD=1): see docs/development.md, Tests"
)


def realworld_path(*parts: str) -> Path:
    """A path under the published models, for module-level names; a test that opens it must be marked ``realworld``.

    Where they are absent this is where they would be, so that collection never fails.
    """
    return (REALWORLD_ROOT or ROOT.parent / "shared" / "realworld").joinpath(*parts)


def realworld_files(subdir: str, pattern: str) -> list[Any]:
    """Parameters of a test over published files: their paths relative to ``subdir`` (``rglob(pattern)``), sorted.

    Where the models are absent: one parameter skipped for :data:`REALWORLD_SKIP`
    (rather than pytest's "got empty parameter set"), so every skip gives the same reason.
    """
    if REALWORLD_ROOT is None:
        return [pytest.param("absent", marks=pytest.mark.skip(reason=REALWORLD_SKIP), id="absent")]
    folder = REALWORLD_ROOT / subdir
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob(pattern))


@pytest.fixture
def realworld() -> Path:
    """The published models' folder (``realworld / "onnx" / name``); the test skips for :data:`REALWORLD_SKIP` without them."""
    if REALWORLD_ROOT is None:
        pytest.skip(REALWORLD_SKIP)
    return REALWORLD_ROOT


# -- hypothesis: the same examples on every run in CI; random ones only when asked for ------------------------

settings.register_profile(
    "ci",  # the default: derandomized (examples from a hash of the test), no example database, failures reproducible
    derandomize=True,
    database=None,
    print_blob=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "fuzz",  # --run-slow or --hypothesis-profile fuzz: new random examples each run (with --fuzz-examples N for more)
    derandomize=False,
    print_blob=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("BNFOLD_HYPOTHESIS_PROFILE", "ci"))

BN_OPS = {"FusedBatchNorm", "FusedBatchNormV2", "FusedBatchNormV3", "BatchNormWithGlobalNormalization", "Rsqrt"}


def session_config() -> config_pb2.ConfigProto:
    """NCHW convolutions run on the CPU only through oneDNN, which TF turns off on CPUs without
    AVX-512: let grappler's layout pass convert them (exact), as on a user's laptop."""
    config = config_pb2.ConfigProto()
    config.graph_options.rewrite_options.cpu_layout_conversion = rewriter_config_pb2.RewriterConfig.NCHW_TO_NHWC
    return config


def run_graph(graph_def: graph_pb2.GraphDef, feeds: dict[str, np.ndarray], fetches: list[str]) -> list[np.ndarray]:
    """Run here, under bnfold's one answer to TensorFlow's intermittent aborts (``runner.ABORT_POLICY``):
    tried again, then run in a worker with oneDNN off. An ``AbortedError`` never reaches a test."""
    graph = tf.Graph()
    with graph.as_default():
        tf.graph_util.import_graph_def(graph_def, name="")
    names = [f if ":" in f else f"{f}:0" for f in fetches]
    fed = {(k if ":" in k else f"{k}:0"): v for k, v in feeds.items()}
    with tf.compat.v1.Session(graph=graph, config=session_config()) as session:
        try:
            return runner.run_retrying_aborts(tf, lambda: session.run(names, fed))
        except tf.errors.AbortedError:
            pass
    return runner.run_without_onednn(graph_def.SerializeToString(), names, fed)


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
    parser.addoption("--run-slow", action="store_true", help="also run tests marked slow (several-hundred-MB graphs), hypothesis with random examples (profile fuzz)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: long test, run with --run-slow")
    config.addinivalue_line("markers", "realworld: needs the published models (../shared/realworld); skipped without them")
    if config.getoption("--run-slow") and not config.getoption("--hypothesis-profile", None):
        settings.load_profile("fuzz")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    absent = pytest.mark.skip(reason=REALWORLD_SKIP)
    slow = pytest.mark.skip(reason="slow: run with --run-slow")
    for item in items:
        if "realworld" in getattr(item, "fixturenames", ()) and not item.get_closest_marker("realworld"):
            item.add_marker(pytest.mark.realworld)  # so that ``-m realworld`` selects every test that reads them
        if REALWORLD_ROOT is None and item.get_closest_marker("realworld"):
            item.add_marker(absent)
        if "slow" in item.keywords and not config.getoption("--run-slow"):
            item.add_marker(slow)
