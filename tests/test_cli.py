"""The command line: outputs, reports, exit codes, and one-line errors without tracebacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, assert_close, run_graph
from typer.testing import CliRunner

from bnfold.cli import app
from bnfold.core.errors import EXIT_INPUT, EXIT_OUTPUT, EXIT_USAGE, EXIT_VERIFY
from bnfold.tf.io import load_graph_def

SAMPLES = ROOT / "sample_models"
runner = CliRunner()


def invoke(*args: str | Path) -> object:
    return runner.invoke(app, [str(a) for a in args])


def summary(stdout: str) -> str:
    """The one summary line ("N folded, N standalone, N skipped; nodes A -> B")."""
    lines = [line for line in stdout.splitlines() if " folded, " in line and "; nodes " in line]
    assert len(lines) == 1, stdout
    return lines[0].strip()


def same_outputs(original: Path, folded: Path, batch: int = 2) -> None:
    """Both graphs run in TF on the same input and agree: the outcome a user cares about."""
    a_graph, b_graph = load_graph_def(original), load_graph_def(folded)
    x = next(n for n in a_graph.node if n.op == "Placeholder")
    shape = [batch if d.size < 0 else d.size for d in x.attr["shape"].shape.dim]
    feeds = {x.name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
    a, b = run_graph(a_graph, feeds, ["output"])[0], run_graph(b_graph, feeds, ["output"])[0]
    assert_close(a, b)


def test_fold_writes_graph_and_prints_table(tmp_path: Path) -> None:
    out = tmp_path / "folded.pb"
    src = SAMPLES / "conv_keras3.pb"
    result = invoke("fold", src, out)
    assert result.exit_code == 0, result.output
    before, after = len(load_graph_def(src).node), len(load_graph_def(out).node)
    assert summary(result.stdout) == f"1 folded, 0 standalone, 0 skipped; nodes {before} -> {after}"
    assert after < before
    rows = [[c.strip() for c in line.strip("│ ").split("│")] for line in result.stdout.splitlines() if line.strip("│ ").startswith("output ")]
    assert [(r[0], r[-1]) for r in rows] == [("output", "pass")]
    assert not [n for n in load_graph_def(out).node if n.op == "Rsqrt"]
    same_outputs(src, out)


def test_pbtxt_output_and_input(tmp_path: Path) -> None:
    text = tmp_path / "folded.pbtxt"
    assert invoke("fold", SAMPLES / "conv_fused_nhwc.pb", text).exit_code == 0
    assert text.read_text().lstrip().startswith("node")
    same_outputs(SAMPLES / "conv_fused_nhwc.pb", text)
    again = tmp_path / "again.pb"
    result = invoke("fold", text, again)
    assert result.exit_code == 0, result.output
    assert summary(result.stdout).startswith("0 folded, 0 standalone, 0 skipped")  # nothing left to fold
    assert load_graph_def(again) == load_graph_def(text)


def test_report_json_has_sites_ops_and_verification(tmp_path: Path) -> None:
    report = tmp_path / "r.json"
    result = invoke("fold", SAMPLES / "skip_shared_conv.pb", tmp_path / "o.pb", "--report", report)
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    site = data["sites"][0]
    assert set(site) >= {"name", "form", "action", "folded_into", "reason"}
    assert site["action"] == "standalone" and "also feeds" in site["reason"]
    assert data["ops_before"]["FusedBatchNormV3"] == 1 and "FusedBatchNormV3" not in data["ops_after"]
    outputs = data["verification"]["outputs"]
    assert {o["name"] for o in outputs} == {"output", "pre_bn_output"}
    assert all(o["passed"] and "max_abs_error" in o and "rtol" in o for o in outputs)
    assert "random float32" in data["verification"]["inputs"]["x"]


def test_dry_run_and_inspect_write_nothing(tmp_path: Path) -> None:
    out = tmp_path / "o.pb"
    dry = invoke("fold", SAMPLES / "conv_fused_nchw.pb", out, "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert summary(dry.stdout).startswith("1 folded, 0 standalone, 0 skipped")
    assert not out.exists()
    result = invoke("inspect", SAMPLES / "conv_fused_nchw.pb", "--report", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    assert summary(result.stdout).startswith("1 folded, 0 standalone, 0 skipped")
    sites = json.loads((tmp_path / "r.json").read_text())["sites"]
    assert [(s["name"], s["action"], s["folded_into"]) for s in sites] == [("bn", "folded", "conv")]
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_dry_run_with_a_failed_check_says_what_is_true(tmp_path: Path) -> None:
    out = tmp_path / "o.pb"
    result = invoke("fold", SAMPLES / "conv_keras3.pb", out, "--dry-run", "--rtol", "0", "--atol", "0")
    assert result.exit_code == EXIT_VERIFY, result.output
    line = result.stderr.strip()
    assert line.startswith("bnfold: error: ") and line.endswith("(--dry-run: no model is written either way)"), line
    assert "--force writes anyway" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_signature_with_onnx_output_is_a_usage_error(tmp_path: Path) -> None:
    out = tmp_path / "o.onnx"
    result = invoke("fold", SAMPLES / "conv_fused_nhwc.pb", out, "--signature", "other")
    assert result.exit_code == EXIT_USAGE, result.output
    assert result.stderr.strip() == (
        "bnfold: error: --signature: not supported with ONNX input or output; fold the SavedModel to .pb first, then convert"
    )
    assert not out.exists()


def test_zero_tolerance_fails_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "o.pb"
    result = invoke("fold", SAMPLES / "conv_keras3.pb", out, "--rtol", "0", "--atol", "0")
    assert result.exit_code == EXIT_VERIFY
    assert "verification failed" in result.stderr and "nothing written" in result.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_force_writes_despite_failure(tmp_path: Path) -> None:
    out = tmp_path / "o.pb"
    result = invoke("fold", SAMPLES / "conv_keras3.pb", out, "--rtol", "0", "--atol", "0", "--force")
    assert result.exit_code == 0, result.output
    assert result.stderr.strip() == "warning: verification failed; writing anyway because of --force"
    assert not [n for n in load_graph_def(out).node if n.op == "Rsqrt"]
    same_outputs(SAMPLES / "conv_keras3.pb", out)


def test_training_mode_bn_alone_is_skipped_and_the_graph_written_as_it_was(tmp_path: Path) -> None:
    """Nothing to fold, nothing changed (#11): no check runs, so the batch dependence of the
    model's own training-mode BN is the site's reason here (and doctor's BN_TRAINING_MODE)."""
    result = invoke("fold", SAMPLES / "skip_training_bn.pb", tmp_path / "o.pb")
    assert result.exit_code == 0, result.output
    assert "nothing to fold: the model is written unchanged" in result.stdout
    assert load_graph_def(tmp_path / "o.pb") == load_graph_def(SAMPLES / "skip_training_bn.pb")
    assert "training" in result.stdout


def test_training_mode_bn_fails_batch_independence(tmp_path: Path) -> None:
    """The same training-mode BN, checked against itself (bnfold.verify): its outputs depend on the batch."""
    import bnfold

    check = bnfold.verify(SAMPLES / "skip_training_bn.pb", SAMPLES / "skip_training_bn.pb")
    assert not check.passed and check.batch_independent is False and check.batch_error > 0.01


def test_no_verify_writes_without_checking(tmp_path: Path) -> None:
    out = tmp_path / "o.pb"
    result = invoke("fold", SAMPLES / "skip_training_bn.pb", out, "--no-verify")
    assert result.exit_code == 0, result.output
    assert summary(result.stdout).startswith("0 folded, 0 standalone, 1 skipped")
    assert "verification" not in result.stdout  # no check ran
    written = {n.name: n for n in load_graph_def(out).node}
    assert written["bn"].op == "FusedBatchNormV3" and written["bn"].attr["is_training"].b  # the skipped BN is kept as it was
    same_outputs(SAMPLES / "skip_training_bn.pb", out)


def test_input_shape_and_feed_options(tmp_path: Path) -> None:
    x = tmp_path / "x.npy"
    np.save(x, np.random.default_rng(0).standard_normal((4, 8, 8, 3)).astype(np.float32))
    report = tmp_path / "r.json"
    result = invoke("fold", SAMPLES / "conv_fused_nhwc.pb", tmp_path / "o.pb", "--feed", f"x={x}", "--samples", "2", "--report", report)
    assert result.exit_code == 0, result.output
    assert json.loads(report.read_text())["verification"]["inputs"]["x"] == "user feed"
    result = invoke("fold", SAMPLES / "conv_fused_nhwc.pb", tmp_path / "o2.pb", "--input-shape", "x=5,8,8,3", "--report", report)
    assert result.exit_code == 0, result.output
    assert "[5, 8, 8, 3]" in json.loads(report.read_text())["verification"]["inputs"]["x"]


@pytest.mark.parametrize(
    "content,needle",
    [(b"", "empty"), (b"\x00\xff\x13garbage\x99" * 10, "not a binary GraphDef"), (None, "no such file")],
)
def test_bad_input_is_one_line_with_exit_3(tmp_path: Path, content: bytes | None, needle: str) -> None:
    src = tmp_path / "bad.pb"
    if content is not None:
        src.write_bytes(content)
    result = invoke("fold", src, tmp_path / "o.pb")
    assert result.exit_code == EXIT_INPUT, result.output
    assert needle in result.stderr and str(src) in result.stderr
    assert "Traceback" not in result.output and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.77, 0.999])
def test_truncated_pb_is_refused_only_where_certain(tmp_path: Path, fraction: float) -> None:
    """A cut mid-node is a parse error, a cut that leaves a node reading a missing node is corrupt: both refused.

    A cut on a node boundary that leaves a whole graph is a graph TensorFlow accepts (TF 1.x wrote no
    ``versions`` record at all), so it folds like any other.
    """
    import tensorflow as tf
    from google.protobuf.message import DecodeError
    from tensorflow.core.framework import graph_pb2

    data = (SAMPLES / "conv_keras3.pb").read_bytes()
    cut = data[: int(len(data) * fraction)]
    src = tmp_path / "cut.pb"
    src.write_bytes(cut)
    graph = graph_pb2.GraphDef()
    try:
        graph.ParseFromString(cut)
        names = {n.name for n in graph.node}
        whole = bool(graph.node) and all(r.lstrip("^").split(":")[0] in names for n in graph.node for r in n.input)
    except DecodeError:
        whole = False
    result = invoke("fold", src, tmp_path / "o.pb")
    if not whole:
        assert result.exit_code == EXIT_INPUT, result.output
        assert len(result.stderr.strip().splitlines()) == 1 and str(src) in result.stderr
        assert not (tmp_path / "o.pb").exists()
    else:
        assert result.exit_code == 0, result.output
        written = graph_pb2.GraphDef()
        written.ParseFromString((tmp_path / "o.pb").read_bytes())
        with tf.Graph().as_default():
            tf.graph_util.import_graph_def(written, name="")  # TensorFlow imports what bnfold wrote


def test_not_frozen_graph_names_the_variable(tmp_path: Path) -> None:
    import tensorflow as tf

    graph = tf.Graph()
    with graph.as_default():
        v = tf.compat.v1.get_variable("kernel", shape=[2], use_resource=True)
        tf.identity(v.read_value(), name="out")
    src = tmp_path / "unfrozen.pb"
    src.write_bytes(graph.as_graph_def().SerializeToString())
    result = invoke("fold", src, tmp_path / "o.pb")
    assert result.exit_code == EXIT_INPUT and "not frozen" in result.stderr and "kernel" in result.stderr


def test_output_equal_to_input_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "m.pb"
    src.write_bytes((SAMPLES / "conv_fused_nhwc.pb").read_bytes())
    before = src.read_bytes()
    result = invoke("fold", src, src)
    assert result.exit_code == EXIT_OUTPUT and "--in-place" in result.stderr
    assert src.read_bytes() == before
    assert invoke("fold", src, src, "--in-place").exit_code == 0
    assert src.read_bytes() != before
    original = tmp_path / "original.pb"
    original.write_bytes(before)
    assert not [n for n in load_graph_def(src).node if n.op.startswith("FusedBatchNorm")]
    same_outputs(original, src)


def test_unwritable_output_directory_fails_before_work(tmp_path: Path) -> None:
    result = invoke("fold", SAMPLES / "conv_fused_nhwc.pb", tmp_path / "missing" / "o.pb")
    assert result.exit_code == EXIT_OUTPUT and "does not exist" in result.stderr


def test_unknown_output_name_is_a_usage_error(tmp_path: Path) -> None:
    result = invoke("fold", SAMPLES / "conv_fused_nhwc.pb", tmp_path / "o.pb", "--outputs", "nope")
    assert result.exit_code == EXIT_USAGE and "nope" in result.stderr


def test_console_script_default_command_and_quiet_errors(tmp_path: Path) -> None:
    """`bnfold IN OUT` works without the `fold` word; errors are one line, no TF chatter."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-c", "from bnfold.cli import main; main()"]
    ok = subprocess.run([*cmd, str(SAMPLES / "conv_fused_nhwc.pb"), str(tmp_path / "o.pb"), "-q"], capture_output=True, text=True, env=env)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "o.pb").exists()
    bad = subprocess.run([*cmd, str(tmp_path / "missing.pb"), str(tmp_path / "o2.pb")], capture_output=True, text=True, env=env)
    assert bad.returncode == EXIT_INPUT
    assert bad.stderr.strip().splitlines() == [f"bnfold: error: {tmp_path / 'missing.pb'}: no such file"]
