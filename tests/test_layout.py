"""Behaviour that moved in the layout of issue #24: one place maps a path to its format, one record carries the
check's options through every entry point, the worker core runs only bnfold's own requests, and core/ loads no
framework. (The import contracts themselves are lint-imports' job in CI.)
"""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT
from hypothesis import given
from hypothesis import strategies as st

from bnfold.core import formats
from bnfold.core.comparison import CheckArgs, CheckOptions
from bnfold.core.errors import UsageError
from bnfold.core.serve import CORE_REQUESTS, handler

SUFFIXES = {".pb": formats.GRAPH, ".pbtxt": formats.GRAPH, ".onnx": formats.ONNX, ".keras": formats.KERAS, ".h5": formats.KERAS, ".HDF5": formats.KERAS}


@given(stem=st.text(alphabet="abcxyz_-0123456789", min_size=1, max_size=12), suffix=st.sampled_from(sorted(SUFFIXES)))
def test_one_place_names_the_format_of_a_path(stem: str, suffix: str) -> None:
    path = Path("some dir") / f"{stem}{suffix}"
    assert formats.input_format(path) == SUFFIXES[suffix]
    assert formats.output_format(path) == SUFFIXES[suffix]
    assert formats.is_onnx_path(path) == (SUFFIXES[suffix] == formats.ONNX)
    assert formats.is_keras_path(path) == (SUFFIXES[suffix] == formats.KERAS)


def test_directories_and_unknown_outputs(tmp_path: Path) -> None:
    assert formats.input_format(tmp_path) == formats.SAVED_MODEL
    assert formats.output_format(formats.output_path("folded/")) == formats.SAVED_MODEL
    assert formats.output_format(tmp_path / "folded") == formats.SAVED_MODEL
    with pytest.raises(UsageError, match="unknown output format '.tflite'"):
        formats.output_format(tmp_path / "m.tflite")


@pytest.mark.parametrize(
    ("src", "dst", "pipeline"),
    [
        ("m.pb", "f.pb", formats.GRAPH),
        ("m.pb", "f.onnx", formats.ONNX),
        ("m.onnx", "f.onnx", formats.ONNX),
        ("m.onnx", None, formats.ONNX),
        ("m.keras", "f.keras", formats.KERAS),
        ("m.h5", "f.pb", formats.GRAPH),  # a Keras file frozen to a TF graph
        ("m.keras", None, formats.GRAPH),  # a dry run reports the graph fold
        ("m.keras", "f.onnx", formats.ONNX),
    ],
)
def test_the_route_of_a_fold(src: str, dst: str | None, pipeline: str) -> None:
    assert formats.route(src, dst) == pipeline


def test_check_options_come_from_one_record() -> None:
    options = CheckOptions.of({"rtol": 1e-3, "feeds": None, "samples": 3, "verify_outputs": False, "force": True})
    assert (options.rtol, options.atol, options.samples, options.feeds, options.verify, options.force) == (1e-3, None, 3, {}, False, True)
    assert CheckOptions.of({}) == CheckOptions()
    with pytest.raises(TypeError, match="'rtoll'"):
        CheckOptions.of({"rtoll": 1e-3})


def test_every_entry_point_takes_the_check_record() -> None:
    """The check's options are declared once (CheckArgs) and every entry point takes them as ``**check``, so
    their signatures cannot drift apart again."""
    from bnfold import api
    from bnfold.keras.fold import fold_keras
    from bnfold.onnx.pipeline import fold_onnx, fold_onnx_file
    from bnfold.tf.verify import verify

    for function in (api.fold, api.to_onnx, fold_onnx, fold_onnx_file, fold_keras, verify):
        parameters = inspect.signature(function).parameters
        spread = [p for p in parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD]
        assert [p.annotation for p in spread] == ["Unpack[CheckArgs]"], function.__qualname__
        assert not set(parameters) & set(CheckArgs.__annotations__), f"{function.__qualname__} spells a check option out again"


def test_a_misspelled_check_option_is_refused_before_any_work() -> None:
    import bnfold

    with pytest.raises(TypeError, match="'rtoll'"):
        bnfold.fold(ROOT / "sample_models" / "conv_fused_nhwc.pb", rtoll=1e-3)  # type: ignore[call-arg]


@pytest.mark.parametrize("op", ["os:system", "json:loads", "bnfold.no_such_module:x", "bnfold.core.serve:not_there", "bnfold", "", 7])
def test_the_worker_runs_only_bnfold_handlers(op: object) -> None:
    with pytest.raises(ValueError, match="unknown request"):
        handler(op)


def test_the_worker_finds_a_format_handler_by_name() -> None:
    from bnfold.onnx import runner
    from bnfold.tf import runner as tf_runner

    assert handler(runner.LOAD) is runner.load and handler(tf_runner.LOAD) is tf_runner.load
    assert set(CORE_REQUESTS) == {"run", "drop", "unload", "selftest"}


def test_core_loads_no_framework() -> None:
    """core/ is what an ONNX-only run and the CLI's start import: no TensorFlow, onnx or Keras there."""
    modules = sorted(p.stem for p in (ROOT / "bnfold" / "core").glob("*.py") if p.stem != "__init__")
    script = (
        "import sys\n"
        + "".join(f"import bnfold.core.{m}\n" for m in modules)
        + "print([m for m in ('tensorflow', 'onnx', 'keras', 'onnxruntime', 'tf2onnx') if m in sys.modules])\n"
    )
    found = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, check=True)
    assert found.stdout.strip() == "[]", found.stderr[-2000:]
