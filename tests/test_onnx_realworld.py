"""Every ONNX file in ../shared/realworld/onnx/ (PyTorch 2.13 exports): folded with equal outputs, or skipped for the manifest's reason.

Outputs are compared here, in onnxruntime with optimizations off, on each
module's own ``NAME.input.npy``; bnfold's own check runs too and must pass.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import realworld_files, realworld_path

from bnfold.onnx.pipeline import fold_onnx, fold_onnx_file

REALWORLD = realworld_path("onnx")
FILES = realworld_files("onnx", "*.onnx")
pytestmark = pytest.mark.realworld

# What the manifest says each file exercises, as the action of every BN site (in graph order).
EXPECTED: dict[str, list[str]] = {
    "conv1d_bn1d.dynamo_noopt.onnx": ["folded"] * 3,  # computed zero bias Expand(CastLike(0, x), ...)
    "conv1d_bn1d.legacy.onnx": ["folded"] * 3,
    "mlp_bn1d.dynamo_noopt.onnx": ["folded"] * 2,
    "mlp_bn1d.legacy.onnx": ["folded"] * 2,  # MatMul(x, Transpose(W))
    "preact_traps.dynamo.onnx": ["folded", "standalone", "standalone"],
    "preact_traps.dynamo_noopt.onnx": ["folded", "standalone", "standalone", "folded"],
    "preact_traps.legacy.onnx": ["folded", "standalone", "standalone", "folded"],
    "shared_conv_bn.dynamo.onnx": ["folded"] * 2,
    "shared_conv_bn.dynamo_extdata.onnx": ["folded"] * 2,
    "shared_conv_bn.legacy.onnx": ["folded"] * 2,
    "train_mode_bn.legacy_train.onnx": ["skipped"] * 2,
}


def ort_run(model: onnx.ModelProto | str, x: np.ndarray) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    data = model if isinstance(model, str) else model.SerializeToString()
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    return list(session.run(None, {session.get_inputs()[0].name: x}))


def test_every_realworld_file_is_covered() -> None:
    assert FILES == sorted(EXPECTED), "a file was added to or removed from ../shared/realworld/onnx/: list its expected sites here"


@pytest.mark.parametrize("name", FILES)
def test_realworld_onnx_folded_with_equal_outputs_or_skipped_for_the_manifest_reason(name: str, tmp_path: Path) -> None:
    path = REALWORLD / name
    x = np.load(REALWORLD / f"{name.split('.')[0]}.input.npy")
    out = tmp_path / "out.onnx"
    result = fold_onnx_file(path, out)
    assert [s.action for s in result.sites] == EXPECTED[name], result.sites
    folded = onnx.load(str(out))
    original = onnx.load(str(path))
    # Opset and IR version as exported.
    assert [(o.domain, o.version) for o in folded.opset_import] == [(o.domain, o.version) for o in original.opset_import]
    assert folded.ir_version == original.ir_version
    for a, b in zip(ort_run(str(path), x), ort_run(str(out), x), strict=True):
        assert np.all(np.isfinite(b))
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * float(np.max(np.abs(a))))
    ops = [n.op_type for n in folded.graph.node]
    by_reason = {s.action: s.reason or "" for s in result.sites}
    if name.startswith("train_mode"):
        assert all("training_mode=1" in (s.reason or "") for s in result.sites)
        assert result.onnx is not None and result.onnx.unchanged and result.verification is None
        assert folded.graph == original.graph  # nothing to fold: written unchanged
        return
    assert result.verification is not None and result.verification.passed
    if name.startswith("preact_traps"):
        reasons = [s.reason or "" for s in result.sites if s.action == "standalone"]
        assert any("pads its input" in r for r in reasons), reasons  # BN before a padded conv: backward fold not exact
        assert any("also feeds other ops" in r for r in reasons), reasons  # conv output also read by the residual Add
        assert result.sites[0].reason == "backward"  # BN before the unpadded conv folds into it
    else:
        assert "BatchNormalization" not in ops, by_reason
    if name == "mlp_bn1d.legacy.onnx":
        assert "Transpose" not in ops  # the weight behind Transpose was folded and the Transpose dropped
    if name == "conv1d_bn1d.dynamo_noopt.onnx":
        assert not {"Expand", "CastLike", "Shape"} & set(ops)  # computed bias evaluated, folded, chain removed
    if name.startswith("shared_conv_bn"):
        convs = [n for n in folded.graph.node if n.op_type == "Conv"]
        assert len({c.input[1] for c in convs}) == 2  # each conv got its own weights


def test_realworld_external_data_read_beside_the_model_from_another_cwd(tmp_path: Path) -> None:
    """torch's default export writes m.onnx.data: found beside the model, not in the working directory."""
    out = tmp_path / "sub" / "folded.onnx"
    out.parent.mkdir()
    report = tmp_path / "r.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bnfold.cli", str(REALWORLD / "shared_conv_bn.dynamo_extdata.onnx"), str(out), "--report", str(report), "-q"],
        capture_output=True,
        text=True,
        cwd=tmp_path,  # not the model's folder
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    data_file = out.with_name("folded.onnx.data")
    assert data_file.is_file() and data_file.stat().st_size > 0
    assert json.loads(report.read_text())["onnx"]["external_data"] == str(data_file)
    model = onnx.load(str(out), load_external_data=False)
    locations = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"folded.onnx.data"}
    x = np.load(REALWORLD / "shared_conv_bn.input.npy")
    (a,) = ort_run(str(REALWORLD / "shared_conv_bn.dynamo_extdata.onnx"), x)
    (b,) = ort_run(str(out), x)
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * float(np.max(np.abs(a))))
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_realworld_train_mode_doctor_reports_training_mode() -> None:
    from bnfold.doctor import onnx as onnx_doctor

    report = onnx_doctor.diagnose(REALWORLD / "train_mode_bn.legacy_train.onnx")
    assert report.codes().count("BN_TRAINING_MODE") == 2 and report.exit_code == 1
    model, result = fold_onnx(REALWORLD / "train_mode_bn.legacy_train.onnx", verify_outputs=False)
    assert result.onnx is not None and result.onnx.unchanged
