"""What a new user meets first on the command line: --version, python -m bnfold, output suffixes,
the tolerance column, and output that is bnfold's own (no TensorFlow start-up lines; --quiet: errors only)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import ROOT, run_graph
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import bnfold
from bnfold import api
from bnfold.cli import app
from bnfold.core.errors import EXIT_INPUT, EXIT_USAGE, UsageError
from bnfold.core.formats import OUTPUT_FORMATS, check_output_format, is_saved_model_destination, output_path
from bnfold.tf.io import load_graph_def

SAMPLES = ROOT / "sample_models"
MODEL = SAMPLES / "conv_fused_nhwc.pb"
runner = CliRunner()

# Lines TensorFlow's C++ runtime (absl, oneDNN, CUDA stubs, cpu_feature_guard) writes at start-up.
NATIVE_LOG = re.compile(
    r"^[IWEF]\d{4} \d\d:\d\d:\d\d|absl::InitializeLog|oneDNN|cuda|cudart|cpu_feature_guard|"
    r"This TensorFlow binary is optimized|rebuild TensorFlow|TF_ENABLE_ONEDNN_OPTS|tensorflow/core/",
    re.IGNORECASE,
)


def bnfold_process(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``python -m bnfold ARGS`` in a user's environment: no TF_CPP_MIN_LOG_LEVEL, oneDNN on (its notice printed)."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env["TF_ENABLE_ONEDNN_OPTS"] = "1"
    env["COLUMNS"] = "200"
    return subprocess.run([sys.executable, "-m", "bnfold", *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def leaked(text: str) -> list[str]:
    return [line for line in text.splitlines() if NATIVE_LOG.search(line)]


# -- --version and python -m bnfold -------------------------------------------------------------


def test_version_from_python_m_bnfold(tmp_path: Path) -> None:
    proc = bnfold_process("--version", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    line, sandbox_line = proc.stdout.splitlines()
    assert line.startswith(f"bnfold {bnfold.__version__} (tensorflow ")
    assert sandbox_line.startswith("sandbox: ")
    assert not list(tmp_path.iterdir())


def test_version_short_flag_and_help_lists_it() -> None:
    result = runner.invoke(app, ["-V"])
    assert result.exit_code == 0
    assert result.stdout.splitlines()[0].startswith(f"bnfold {bnfold.__version__} ")
    help_text = runner.invoke(app, ["--help"]).stdout
    assert "--version" in help_text


# -- output suffixes ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["out.xyz", "out.tflite", "out.h5", "out.PB2"])
def test_unknown_output_suffix_is_a_usage_error_listing_the_formats(tmp_path: Path, name: str) -> None:
    suffix = Path(name).suffix.lower()
    if suffix in OUTPUT_FORMATS:
        pytest.skip(f"{suffix} is a registered output format now")
    dst = tmp_path / name
    result = runner.invoke(app, ["fold", str(MODEL), str(dst), "--no-verify"])
    assert result.exit_code == EXIT_USAGE, result.output
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"bnfold: error: {dst}: unknown output format {suffix!r}")
    for known in OUTPUT_FORMATS:
        assert known in line
    assert "SavedModel directory" in line
    assert not list(tmp_path.iterdir())  # nothing written, no directory named out.xyz


def test_fold_file_refuses_unknown_suffix_before_any_work(tmp_path: Path) -> None:
    dst = tmp_path / "model.tflite"
    with pytest.raises(UsageError, match=r"unknown output format '\.tflite'"):
        bnfold.fold_file(MODEL, dst, verify_outputs=False)
    assert not dst.exists()


def test_trailing_slash_is_a_saved_model_whatever_the_name(tmp_path: Path) -> None:
    import tensorflow as tf

    dst = tmp_path / "model.v2"
    result = runner.invoke(app, ["fold", str(MODEL), f"{dst}/", "-q"])
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    assert (dst / "saved_model.pb").is_file()
    x = np.random.default_rng(0).standard_normal((1, 8, 8, 3)).astype(np.float32)
    (want,) = run_graph(load_graph_def(MODEL), {"x": x}, ["output"])
    serve = tf.saved_model.load(str(dst)).signatures["serving_default"]
    (got,) = serve(tf.constant(x)).values()
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)


@settings(max_examples=60, deadline=None)
@given(
    stem=st.text(st.characters(whitelist_categories=("Ll", "Lu", "Nd"), whitelist_characters="_-"), min_size=1, max_size=8),
    suffix=st.text(st.characters(whitelist_categories=("Ll", "Lu", "Nd")), min_size=1, max_size=6),
    slash=st.booleans(),
)
def test_output_format_rule(stem: str, suffix: str, slash: bool) -> None:
    """Known suffix -> that format; no suffix or a trailing / -> SavedModel; anything else -> usage error."""
    text = f"{stem}.{suffix}" + ("/" if slash else "")
    parsed = output_path(text)
    if slash:
        assert is_saved_model_destination(parsed) and is_saved_model_destination(text)
        check_output_format(parsed)
    elif f".{suffix.lower()}" in OUTPUT_FORMATS:
        assert not is_saved_model_destination(parsed)
        check_output_format(parsed)
    else:
        with pytest.raises(UsageError, match="unknown output format"):
            check_output_format(parsed)
    assert is_saved_model_destination(Path(stem)) and is_saved_model_destination(f"dir/{stem}")


def test_api_reexports_the_one_format_list() -> None:
    assert api.OUTPUT_FORMATS is OUTPUT_FORMATS


# -- the tolerance column -------------------------------------------------------------------------


def test_tolerance_column_is_the_number_compared_against(tmp_path: Path) -> None:
    report = tmp_path / "r.json"
    result = runner.invoke(app, ["fold", str(MODEL), str(tmp_path / "o.pb"), "--report", str(report)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    (check,) = json.loads(report.read_text())["verification"]["outputs"]
    assert check["tolerance_formula"] == "atol + rtol * max_abs_value"
    assert check["tolerance"] == pytest.approx(check["atol"] + check["rtol"] * check["max_abs_value"], rel=1e-12)
    assert check["max_abs_error"] <= check["tolerance"]
    (row,) = [line for line in result.stdout.splitlines() if line.startswith("│ output ")]
    cells = [c.strip() for c in row.strip("│").split("│")]
    assert cells[0] == "output" and cells[-1] == "pass"
    assert float(cells[3]) == pytest.approx(check["tolerance"], rel=2e-3)  # one number, not "1e-06 + 0.0001*6.05"
    assert float(cells[1]) == pytest.approx(check["max_abs_error"], rel=2e-3)


# -- output is bnfold's own -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A frozen graph, its ONNX export and a .keras file: the inputs of each CLI path."""
    root = tmp_path_factory.mktemp("sources")
    inp = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(4, 3, use_bias=False)(inp)
    h = keras.layers.BatchNormalization()(h)
    model = keras.Model(inp, keras.layers.ReLU()(h))
    model.save(root / "small.keras")
    onnx_path = root / "model.onnx"
    assert runner.invoke(app, ["fold", str(MODEL), str(onnx_path), "-q", "--no-verify"]).exit_code == 0
    # A Keras 2 file as users have them: Sequential with input_shape on its first layer, saved by tf_keras
    # (loading it makes Keras warn "Do not pass an input_shape/input_dim argument to a layer").
    tf_keras = pytest.importorskip("tf_keras")
    k2 = tf_keras.Sequential(
        [tf_keras.layers.Conv2D(4, 3, input_shape=(8, 8, 3)), tf_keras.layers.BatchNormalization(), tf_keras.layers.ReLU()]
    )
    k2.save(root / "keras2.h5")
    return {"pb": MODEL, "onnx": onnx_path, "keras": root / "small.keras", "h5": root / "keras2.h5"}


PATHS = {
    "fold pb -> pb (checked in TF)": ("fold", "{pb}", "out.pb"),
    "fold pb -> onnx (checked in onnxruntime)": ("fold", "{pb}", "out.onnx"),
    "fold onnx -> onnx": ("fold", "{onnx}", "out.onnx"),
    "fold keras -> pb (frozen first)": ("fold", "{keras}", "out.pb"),
    "fold pb -> SavedModel": ("fold", "{pb}", "out"),
    "fold Keras 2 h5 -> pb": ("fold", "{h5}", "out.pb"),
    "fold Keras 2 h5 -> h5": ("fold", "{h5}", "out.h5"),
    "fold Keras 2 h5 -> onnx": ("fold", "{h5}", "out.onnx"),
    "inspect": ("inspect", "{pb}"),
    "doctor": ("doctor", "{pb}"),
}


def _args(template: tuple[str, ...], sources: dict[str, Path]) -> list[str]:
    return [part.format(**{k: str(v) for k, v in sources.items()}) for part in template]


# Each CLI path is run once (a subprocess each costs a TensorFlow start-up): three quiet, three not.
QUIET_PATHS = ["fold pb -> pb (checked in TF)", "fold onnx -> onnx", "inspect", "fold pb -> SavedModel"]
QUIET_PATHS += ["fold Keras 2 h5 -> pb", "fold Keras 2 h5 -> h5", "fold Keras 2 h5 -> onnx", "fold pb -> onnx (checked in onnxruntime)"]


@pytest.mark.parametrize("path", QUIET_PATHS)
def test_quiet_prints_nothing_on_success(tmp_path: Path, sources: dict[str, Path], path: str) -> None:
    proc = bnfold_process(*_args(PATHS[path], sources), "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "", proc.stdout
    assert proc.stderr == "", proc.stderr
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == ([PATHS[path][2]] if PATHS[path][0] == "fold" else [])


def test_library_warnings_are_shown_with_debug_only(tmp_path: Path, sources: dict[str, Path]) -> None:
    """What -q hides above is really there: Keras' and tf_keras' warnings on a Keras 2 .h5, shown with --debug."""
    proc = bnfold_process(*_args(PATHS["fold Keras 2 h5 -> h5"], sources), "-q", "--debug", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "UserWarning" in proc.stderr, proc.stderr


@pytest.mark.parametrize("path", ["fold pb -> onnx (checked in onnxruntime)", "fold keras -> pb (frozen first)", "doctor"])
def test_no_native_start_up_lines_in_output(tmp_path: Path, sources: dict[str, Path], path: str) -> None:
    proc = bnfold_process(*_args(PATHS[path], sources), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert leaked(proc.stdout) == []
    assert proc.stderr == "", proc.stderr  # the table goes to stdout; stderr is for errors
    assert proc.stdout.strip(), "the report itself is printed"


@pytest.mark.parametrize("quiet", [False, True])
def test_an_error_is_one_line_on_stderr_and_nothing_else(tmp_path: Path, quiet: bool) -> None:
    missing = tmp_path / "missing.pb"
    proc = bnfold_process(missing, "out.pb", *(["-q"] if quiet else []), cwd=tmp_path)
    assert proc.returncode == EXIT_INPUT
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [f"bnfold: error: {missing}: no such file"]


def test_console_script_in_a_fresh_environment_prints_only_bnfold_output(tmp_path: Path) -> None:
    """The installed ``bnfold`` script (not ``python -m``), no TF_CPP_MIN_LOG_LEVEL: a .keras source,
    frozen in this process (TensorFlow's eager start-up) and checked in the worker, prints no native line."""
    script = Path(sys.executable).with_name("bnfold")
    if not script.exists():
        pytest.skip("bnfold console script not installed beside this Python")
    model = tmp_path / "m.keras"
    inp = keras.Input((8, 8, 3))
    keras.Model(inp, keras.layers.BatchNormalization()(keras.layers.Conv2D(4, 3)(inp))).save(model)
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env["TF_ENABLE_ONEDNN_OPTS"] = "1"
    env["COLUMNS"] = "200"
    proc = subprocess.run([str(script), str(model), "out.pb"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", proc.stderr
    assert leaked(proc.stdout) == [] and proc.stdout.strip()


def test_debug_keeps_the_traceback_and_the_error(tmp_path: Path) -> None:
    """Silencing TensorFlow's native lines never swallows bnfold's own error output."""
    proc = bnfold_process(tmp_path / "missing.pb", "out.pb", "--debug", cwd=tmp_path)
    assert proc.returncode == EXIT_INPUT
    assert "Traceback (most recent call last)" in proc.stderr
    assert proc.stderr.splitlines()[-1] == f"bnfold: error: {tmp_path / 'missing.pb'}: no such file"


def test_native_log_pattern_catches_real_tensorflow_start_up_lines() -> None:
    """The leak check must be able to fail: TF's own start-up lines match it."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env["TF_ENABLE_ONEDNN_OPTS"] = "1"
    proc = subprocess.run([sys.executable, "-c", "import tensorflow"], capture_output=True, text=True, env=env, timeout=300)
    assert leaked(proc.stderr), proc.stderr
