"""Bad input, unusual graphs, unsafe numbers and output safety: a clear error every time, nothing lost."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from conftest import ROOT, assert_close, run_graph
from tensorflow.core.framework import graph_pb2
from typer.testing import CliRunner

import bnfold
from bnfold.cli import app
from bnfold.core.errors import EXIT_INPUT, EXIT_OUTPUT, EXIT_UNSAFE, EXIT_USAGE, EXIT_VERIFY, OutputError
from bnfold.core.files import atomic_write
from sample_models.make_samples import Spec, build

runner = CliRunner()
SAMPLE = ROOT / "sample_models" / "conv_fused_nhwc.pb"


def invoke(*args: object) -> object:
    return runner.invoke(app, [str(a) for a in args])


def _write(tmp_path: Path, graph_def: graph_pb2.GraphDef, name: str = "in.pb") -> Path:
    path = tmp_path / name
    path.write_bytes(graph_def.SerializeToString())
    return path


def test_malformed_pbtxt(tmp_path: Path) -> None:
    src = tmp_path / "bad.pbtxt"
    src.write_text('node { name: "x" op: "Placeholder" \n  attr { key: ')
    result = invoke("fold", src, tmp_path / "o.pb")
    assert result.exit_code == EXIT_INPUT and "not a text GraphDef" in result.stderr and str(src) in result.stderr


def test_duplicate_node_names(tmp_path: Path) -> None:
    graph_def = build(Spec())
    graph_def.node.add().CopyFrom(graph_def.node[1])
    result = invoke("fold", _write(tmp_path, graph_def), tmp_path / "o.pb")
    assert result.exit_code == EXIT_INPUT and "duplicate node name" in result.stderr


def test_missing_input_node(tmp_path: Path) -> None:
    graph_def = build(Spec())
    graph_def.node[-1].input[0] = "ghost"
    result = invoke("fold", _write(tmp_path, graph_def), tmp_path / "o.pb")
    assert result.exit_code == EXIT_INPUT and "ghost" in result.stderr


def test_inputs_option_naming_a_missing_node(tmp_path: Path) -> None:
    result = invoke("fold", SAMPLE, tmp_path / "o.pb", "--inputs", "nope")
    assert result.exit_code == EXIT_USAGE and "nope" in result.stderr


# Root reads and writes past permission bits (CI runs as root): there, use files the kernel refuses
# for other reasons. /proc/sys/vm/drop_caches is write-only even for root; sysfs refuses new files.
ROOT_UNREADABLE = Path("/proc/sys/vm/drop_caches")
ROOT_UNWRITABLE_DIR = Path("/sys")


def test_unreadable_input(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        if not ROOT_UNREADABLE.exists():
            pytest.skip("no write-only /proc/sys file on this system")
        src = ROOT_UNREADABLE
    else:
        src = tmp_path / "secret.pb"
        src.write_bytes(SAMPLE.read_bytes())
        src.chmod(0)
    result = invoke("fold", src, tmp_path / "o.pb")
    assert result.exit_code == EXIT_INPUT, result.output
    assert result.stderr.strip() == f"bnfold: error: {src}: permission denied; make the file readable"
    assert list(tmp_path.iterdir()) == ([] if os.geteuid() == 0 else [src])


def test_read_only_output_directory(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        out_dir = ROOT_UNWRITABLE_DIR
    else:
        out_dir = tmp_path / "ro"
        out_dir.mkdir()
        out_dir.chmod(0o500)
    result = invoke("fold", SAMPLE, out_dir / "o.pb")
    assert result.exit_code == EXIT_OUTPUT, result.output
    line = result.stderr.strip()
    assert line in (
        f"bnfold: error: {out_dir / 'o.pb'}: directory {out_dir} is not writable",
        f"bnfold: error: {out_dir / 'o.pb'}: cannot write (Permission denied)",
    )
    assert not (out_dir / "o.pb").exists() and not list(out_dir.glob(".o.pb.*"))


def test_custom_op_passes_through_untouched(tmp_path: Path) -> None:
    """An op TF does not know is kept as is; the fold still happens; the check refuses to run it (allowlist: exit 6)."""
    graph_def = build(Spec())
    custom = graph_def.node.add()
    custom.name, custom.op = "postprocess", "MyCompanyPostprocess"
    custom.input.append("output")
    custom.attr["mode"].s = b"fast"
    src = _write(tmp_path, graph_def)
    out = tmp_path / "o.pb"
    refused = invoke("fold", src, out)
    assert refused.exit_code == EXIT_UNSAFE and "'postprocess' (MyCompanyPostprocess)" in refused.stderr and not out.exists()
    assert invoke("fold", src, out, "--no-verify").exit_code == 0
    written = graph_pb2.GraphDef()
    written.ParseFromString(out.read_bytes())
    kept = [n for n in written.node if n.name == "postprocess"]
    assert kept and kept[0] == custom
    assert not [n for n in written.node if n.op == "FusedBatchNormV3"]


def _graph_with_functions() -> graph_pb2.GraphDef:
    """A TF2 StatelessIf and a PartitionedCall, whose bodies live in the function library."""

    @tf.function
    def helper(t: tf.Tensor) -> tf.Tensor:
        return t * 2.0

    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, 8, 8, 3], name="x")
        spec = Spec()
        w = tf.constant(np.random.default_rng(0).standard_normal((3, 3, 3, 4)).astype(np.float32))
        y = tf.nn.conv2d(x, w, 1, "SAME")
        c = lambda v: tf.constant(np.asarray(v, np.float32))  # noqa: E731
        y = tf.raw_ops.FusedBatchNormV3(
            x=y, scale=c([1, 2, 3, 4]), offset=c([0, 1, 0, 1]), mean=c([0, 0.1, 0, 0.2]), variance=c([1, 1, 2, 2]), is_training=False
        )[0]
        flag = tf.compat.v1.placeholder(tf.bool, [], name="add_one")
        y = tf.cond(flag, lambda: y + 1.0, lambda: y - 1.0)
        tf.identity(helper(y), name="output")
        del spec
    return graph.as_graph_def()


def test_function_library_is_kept(tmp_path: Path) -> None:
    graph_def = _graph_with_functions()
    assert graph_def.library.function and {n.op for n in graph_def.node} & {"StatelessIf", "If"}
    result = bnfold.fold(graph_def)
    assert result.sites[0].action == "folded"
    assert len(result.graph_def.library.function) == len(graph_def.library.function)
    assert {n.op for n in result.graph_def.node} & {"StatelessIf", "If"}  # fed at run time: kept
    for flag in (True, False):
        feeds = {"x": np.random.default_rng(1).standard_normal((2, 8, 8, 3)).astype(np.float32), "add_one": np.array(flag)}
        assert_close(run_graph(graph_def, feeds, ["output"])[0], run_graph(result.graph_def, feeds, ["output"])[0])


def _if_with_bn_in_both_branches() -> graph_pb2.GraphDef:
    """conv -> tf.cond(is_training: BN in training mode, else BN with moving statistics) -> a tf.function
    helper (PartitionedCall) with a While loop inside: branch functions die with the If, the helper,
    its loop bodies and the helper's gradient stay."""

    @tf.function
    def helper(t: tf.Tensor) -> tf.Tensor:
        return tf.while_loop(lambda i, a: i < 2, lambda i, a: (i + 1, a * 0.5), [tf.constant(0), t])[1]

    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, 8, 8, 3], name="x")
        w = tf.constant(np.random.default_rng(0).standard_normal((3, 3, 3, 4)).astype(np.float32))
        y = tf.nn.conv2d(x, w, 1, "SAME")
        c = lambda v: tf.constant(np.asarray(v, np.float32))  # noqa: E731
        stats = {"scale": c([1, 2, 3, 4]), "offset": c([0, 1, 0, 1]), "mean": c([0, 0.1, 0, 0.2]), "variance": c([1, 1, 2, 2])}
        flag = tf.compat.v1.placeholder(tf.bool, [], name="is_training")
        y = tf.cond(
            flag,
            lambda: tf.raw_ops.FusedBatchNormV3(x=y, **{**stats, "mean": c([]), "variance": c([])}, is_training=True)[0],
            lambda: tf.raw_ops.FusedBatchNormV3(x=y, **stats, is_training=False)[0],
        )
        tf.identity(helper(y), name="output")
    return graph.as_graph_def()


def test_dead_functions_are_dropped_after_an_if_is_inlined() -> None:
    graph_def = _if_with_bn_in_both_branches()
    library = {f.signature.name: f for f in graph_def.library.function}
    with_bn = {name for name, f in library.items() if any(n.op == "FusedBatchNormV3" for n in f.node_def)}
    assert len(with_bn) == 2  # both branches
    result = bnfold.fold(graph_def, set_flags={"is_training": False})
    assert [s.action for s in result.sites] == ["folded"] and result.verification and result.verification.passed
    kept = {f.signature.name for f in result.graph_def.library.function}
    assert not kept & with_bn  # no BN left anywhere in the file
    assert not any(n.op == "FusedBatchNormV3" for f in result.graph_def.library.function for n in f.node_def)
    # the helper, reached through PartitionedCall, and its While loop's cond and body are kept, bit for bit
    assert len(kept) == len(library) - 2 and all(library[name] == f for f in result.graph_def.library.function for name in [f.signature.name])
    calls = [n for n in result.graph_def.node if n.op in ("PartitionedCall", "StatefulPartitionedCall")]
    assert calls and calls[0].attr["f"].func.name in kept
    feeds = {"x": np.random.default_rng(1).standard_normal((2, 8, 8, 3)).astype(np.float32), "is_training": np.array(False)}
    assert_close(run_graph(graph_def, feeds, ["output"])[0], run_graph(result.graph_def, {"x": feeds["x"]}, ["output"])[0])


def test_a_library_without_conditionals_is_kept_as_it_was() -> None:
    """Nothing inlined, nothing pruned: a function no node calls is the user's business."""
    graph_def = _graph_with_functions()
    graph_def.library.function.add().CopyFrom(graph_def.library.function[0])
    graph_def.library.function[-1].signature.name = "nobody_calls_me"
    result = bnfold.fold(graph_def, verify_outputs=False)
    assert result.graph_def.library == graph_def.library


@pytest.mark.parametrize(
    "stats,expected",
    [
        ({"mean": np.full(4, 1e6), "var": np.full(4, 1e-4)}, "folded"),  # cancellation, still within tolerance
        ({"gamma": np.full(4, 1e4), "var": np.full(4, 1e-6)}, None),  # fp32 is fine; scale 1e7
    ],
)
def test_huge_means_and_scales_still_verify(stats: dict, expected: str | None) -> None:  # type: ignore[type-arg]
    rng = np.random.default_rng(0)
    base = {"gamma": rng.uniform(0.5, 1.5, 4), "beta": rng.normal(0, 1, 4), "mean": rng.normal(0, 1, 4), "var": rng.uniform(0.5, 2, 4)}
    result = bnfold.fold(build(Spec(stats={**base, **stats})))
    assert result.verification.passed
    if expected:
        assert result.sites[0].action == expected


def test_fp16_overflow_after_scaling_is_not_folded() -> None:
    """gamma/sqrt(var) = 1e6 would turn fp16 weights into inf: the site must not be folded silently."""
    stats = {"gamma": np.full(4, 1.0), "beta": np.zeros(4), "mean": np.zeros(4), "var": np.full(4, 1e-12)}
    graph_def = build(Spec(dtype="float16", stats=stats, epsilon=0.0))
    for node in graph_def.node:
        if node.op == "FusedBatchNormV3":
            node.attr["epsilon"].f = 0.0
    result = bnfold.fold(graph_def, verify_outputs=False)
    site = result.sites[0]
    assert site.action != "folded" and "overflow" in (site.reason or "")
    weights = [n for n in result.graph_def.node if n.name.endswith("bnfold_weights")]
    assert weights == []


def test_interrupted_write_leaves_nothing(tmp_path: Path) -> None:
    dst = tmp_path / "out.pb"

    def partial_then_interrupt(tmp: Path) -> None:
        tmp.write_bytes(b"half a model")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(dst, partial_then_interrupt)
    assert list(tmp_path.iterdir()) == []


def test_full_disk_is_an_output_error_and_leaves_nothing(tmp_path: Path) -> None:
    dst = tmp_path / "out.pb"

    def disk_full(tmp: Path) -> None:
        tmp.write_bytes(b"some")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OutputError, match="No space left"):
        atomic_write(dst, disk_full)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_replaced_only_on_success(tmp_path: Path) -> None:
    out = tmp_path / "o.pb"
    out.write_bytes(b"previous result")
    inexact = ROOT / "sample_models" / "conv_keras3.pb"  # its fold differs in the last bits: zero tolerance fails
    result = invoke("fold", inexact, out, "--rtol", "0", "--atol", "0")
    assert result.exit_code == EXIT_VERIFY, result.output
    assert out.read_bytes() == b"previous result"
    assert invoke("fold", inexact, out).exit_code == 0 and out.read_bytes() != b"previous result"


def test_same_input_gives_byte_identical_output(tmp_path: Path) -> None:
    for name in ("conv_keras3", "dense_nn_transpose_b", "skip_shared_conv"):
        src = ROOT / "sample_models" / f"{name}.pb"
        a, b = tmp_path / f"{name}_a.pb", tmp_path / f"{name}_b.pb"
        assert invoke("fold", src, a, "-q").exit_code == 0
        assert invoke("fold", src, b, "-q").exit_code == 0
        assert a.read_bytes() == b.read_bytes()
        again = tmp_path / f"{name}_again.pb"
        assert invoke("fold", a, again, "-q").exit_code == 0
        assert again.read_bytes() == a.read_bytes()  # folding a folded graph changes nothing


@pytest.mark.slow
def test_graph_of_several_hundred_megabytes(tmp_path: Path) -> None:
    """~0.9 GB of weights in 24 conv+BN layers: folded, verified, written, with no 2 GB protobuf trouble."""
    graph = tf.Graph()
    rng = np.random.default_rng(0)
    with graph.as_default():
        h = tf.compat.v1.placeholder(tf.float32, [None, 4, 4, 1024], name="x")
        for i in range(24):
            w = tf.constant(rng.standard_normal((3, 3, 1024, 1024), dtype=np.float32) * 0.01, name=f"w{i}")
            h = tf.nn.conv2d(h, w, 1, "SAME")
            c = lambda v: tf.constant(v.astype(np.float32))  # noqa: E731
            h = tf.raw_ops.FusedBatchNormV3(
                x=h,
                scale=c(rng.uniform(0.5, 1.5, 1024)),
                offset=c(rng.normal(0, 0.1, 1024)),
                mean=c(rng.normal(0, 0.1, 1024)),
                variance=c(rng.uniform(0.5, 2, 1024)),
                is_training=False,
            )[0]
        tf.nn.relu(h, name="output")
    src = _write(tmp_path, graph.as_graph_def(), "big.pb")
    assert src.stat().st_size > 300e6
    result = invoke("fold", src, tmp_path / "big_folded.pb", "-q")
    assert result.exit_code == 0, result.output


def test_sigterm_during_a_write_leaves_no_temporary_file(tmp_path: Path) -> None:
    """A write that blocks mid-file is killed with SIGTERM: the process exits 143 and no .out.pb.*.tmp stays."""
    import signal
    import subprocess
    import sys
    import time

    script = f"""
import sys, time
from pathlib import Path
sys.path.insert(0, {str(ROOT)!r})
from bnfold.core.files import atomic_write

def write(tmp):
    tmp.write_bytes(b"half a model")
    print("writing", flush=True)
    time.sleep(60)

atomic_write(Path({str(tmp_path / "out.pb")!r}), write)
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "writing"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # the temporary exists mid-write
    proc.send_signal(signal.SIGTERM)
    start = time.monotonic()
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    assert time.monotonic() - start < 30
    assert list(tmp_path.iterdir()) == []


def test_saved_model_directory_follows_the_umask(tmp_path: Path) -> None:
    """Not mkdtemp's 0700: a server running as another user must be able to read the model."""
    out = tmp_path / "served"
    old = os.umask(0o022)
    try:
        result = invoke("fold", SAMPLE, out, "-q")
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    assert (out / "saved_model.pb").exists()
    assert out.stat().st_mode & 0o777 == 0o755


def _fp32_weights_on_fp16_conv() -> tuple[graph_pb2.GraphDef, graph_pb2.GraphDef]:
    """What the old fold wrote for mixed precision: a float32 filter on a float16 Conv2D (TF cannot import it)."""
    original = build(Spec(dtype="float16"))
    broken = graph_pb2.GraphDef()
    broken.CopyFrom(original)
    for node in broken.node:
        if node.name == "weights":
            values = tf.make_ndarray(node.attr["value"].tensor).astype(np.float32)
            node.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(values))
            node.attr["dtype"].type = tf.float32.as_datatype_enum
    return original, broken


def test_a_folded_graph_tf_cannot_load_is_bnfolds_bug_exit_70() -> None:
    from bnfold.core.errors import EXIT_INTERNAL, BnfoldError
    from bnfold.tf.verify import verify

    original, broken = _fp32_weights_on_fp16_conv()
    with pytest.raises(BnfoldError) as info:
        verify(original, broken)
    assert info.value.exit_code == EXIT_INTERNAL
    message = str(info.value)
    assert message.startswith("TensorFlow cannot load the folded graph (") and message.endswith(
        "this is a bug in bnfold: please report it with the input model"
    )
    assert "--no-verify" not in message


def test_cli_reports_a_broken_fold_as_internal_error_without_suggesting_no_verify(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """bnfold's own fold stage replaced by one returning a graph TF rejects: the CLI must not advise --no-verify."""
    from bnfold.core.errors import EXIT_INTERNAL
    from bnfold.tf import pipeline
    from bnfold.tf.fold import FoldOutcome

    original, broken = _fp32_weights_on_fp16_conv()
    monkeypatch.setattr(pipeline, "fold_graph_outcome", lambda *args, **kwargs: FoldOutcome(broken, [], []))
    out = tmp_path / "o.pb"
    result = invoke("fold", _write(tmp_path, original), out)
    assert result.exit_code == EXIT_INTERNAL, result.output
    line = result.stderr.strip()
    assert line.startswith("bnfold: error: TensorFlow cannot load the folded graph") and "report it" in line
    assert "--no-verify" not in result.stderr and not out.exists()
