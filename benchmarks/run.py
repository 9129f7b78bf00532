"""bnfold against the tools users would pick instead: one command, five keras.applications models.

Run: ``pip install -e '.[bench]' && python benchmarks/run.py`` (about 8 minutes on 2 cores from an empty cache;
``--models ResNet50`` for one model, ``--reps N`` for fewer latency runs). Writes
``benchmarks/RESULTS.md`` and ``benchmarks/results.png``; frozen graphs are cached in
``benchmarks/_work/`` (git-ignored). Every definition used is printed in RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
from tensorflow.core.framework import graph_pb2  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from keras_apps import WORK, randomized  # noqa: E402

from bnfold.tf import io as bio  # noqa: E402
from bnfold.tf.canonical import ConstEvaluator  # noqa: E402
from bnfold.tf.fold import LINEAR_OPS, fold_graph  # noqa: E402
from bnfold.tf.graph import GraphIndex  # noqa: E402
from bnfold.tf.recognize import FUSED_BN_OPS, GLOBAL_BN_OPS  # noqa: E402
from bnfold.tf.verify import GraphRunner, find_inputs, find_outputs  # noqa: E402

MODELS = ["ResNet50", "MobileNetV2", "EfficientNetB0", "DenseNet121", "InceptionV3"]
STATIC_OPS = {"Const", "Identity", "NoOp", "Placeholder", "PlaceholderWithDefault"}
PY = sys.executable


# -- models ---------------------------------------------------------------------------------------


def without_bn(model):  # type: ignore[no-untyped-def]
    """The same architecture with every BatchNormalization layer replaced by an identity (no bias added)."""
    import keras

    class PassThrough(keras.layers.Layer):  # BN's call arguments (training, mask), nothing computed
        def call(self, inputs, training=None, mask=None):  # type: ignore[no-untyped-def]
            return inputs

    def clone(layer):  # type: ignore[no-untyped-def]
        if isinstance(layer, keras.layers.BatchNormalization):
            return PassThrough(name=layer.name)
        return layer.__class__.from_config(layer.get_config())

    return keras.models.clone_model(model, clone_function=clone)


def frozen(name: str) -> tuple[Path, Path]:
    """Cached frozen graphs of the model and of its BN-free twin."""
    from bnfold.tf.freeze import freeze_keras

    WORK.mkdir(exist_ok=True)
    path, nobn = WORK / f"{name}.pb", WORK / f"{name}_nobn.pb"
    if not path.exists() or not nobn.exists():
        model = randomized(name, 224)
        if not path.exists():
            path.write_bytes(freeze_keras(model).graph_def.SerializeToString(deterministic=True))
        if not nobn.exists():
            nobn.write_bytes(freeze_keras(without_bn(model)).graph_def.SerializeToString(deterministic=True))
    return path, nobn


def parse(path: Path) -> graph_pb2.GraphDef:
    g = graph_pb2.GraphDef()
    g.ParseFromString(path.read_bytes())
    return g


# -- counting -------------------------------------------------------------------------------------


def tf_sites_left(g: graph_pb2.GraphDef) -> int:
    """BN sites still computed at run time (definition in RESULTS.md), read with bnfold's own evaluator."""
    index = GraphIndex(g)
    ev = ConstEvaluator(index)
    count = sum(1 for n in g.node if n.op in FUSED_BN_OPS | GLOBAL_BN_OPS)
    for n in g.node:
        inputs = index.data_inputs(n)
        if n.op != "Mul" or len(inputs) != 2:
            continue
        consts = [ev.is_const(r) for r in inputs]
        if consts.count(True) != 1:
            continue
        data, const = inputs[consts.index(False)], inputs[consts.index(True)]
        if ev.contains_op(const, {"Rsqrt"}):
            count += 1
            continue
        value = ev.value(const)
        if value is None or value.size <= 1:
            continue  # a scalar (Keras 3 swish's beta) is no per-channel BN scale
        src, _ = index.producer(data)
        while src is not None and src.op in ("BiasAdd", "Add", "AddV2") and len(src.input) == 2:
            src, _ = index.producer(src.input[0])
        if src is not None and src.op in LINEAR_OPS:
            count += 1
    return count


def runtime_ops(g: graph_pb2.GraphDef) -> int:
    return sum(1 for n in g.node if n.op not in STATIC_OPS)


def onnx_runtime_ops(model) -> int:  # type: ignore[no-untyped-def]
    return sum(1 for n in model.graph.node if n.op_type not in ("Constant", "Identity"))


# -- timing helpers -------------------------------------------------------------------------------


def median_time(fn, reps: int, clock=time.perf_counter) -> float:  # type: ignore[no-untyped-def]
    """Median of ``reps`` runs, by the wall clock or another (``time.process_time``: CPU of this process)."""
    times = []
    for _ in range(reps):
        start = clock()
        fn()
        times.append(clock() - start)
    return statistics.median(times)


def run_timed(cmd: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return elapsed, proc


def max_rss_mb(cmd: list[str]) -> float:
    """Maximum resident set size of ``cmd`` (GNU time -v), in MB."""
    return timed_rss(cmd)[1]


def timed_rss(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and maximum resident set size (MB, GNU time -v: the largest single process) of ``cmd``."""
    elapsed, proc = run_timed(["/usr/bin/time", "-v", *cmd])
    match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    return elapsed, int(match.group(1)) / 1024 if match else float("nan")


def tf_latency(paths: dict[str, Path], batch: int, reps: int) -> dict[str, float]:
    """Median seconds per run of each graph, the graphs interleaved run by run."""
    runners, names = {}, {}
    for k, p in paths.items():
        g = parse(p)
        names[k] = ([s.name for s in find_inputs(g)][0], find_outputs(g)[0])
        runners[k] = GraphRunner(g)
    x = np.random.default_rng(0).standard_normal((batch, 224, 224, 3)).astype(np.float32)
    times: dict[str, list[float]] = {k: [] for k in runners}
    for k, r in runners.items():  # warm-up (graph optimization, allocation)
        r.run([names[k][1]], {names[k][0]: x})
    for _ in range(reps):
        for k, r in runners.items():
            start = time.perf_counter()
            r.run([names[k][1]], {names[k][0]: x})
            times[k].append(time.perf_counter() - start)
    for r in runners.values():
        r.close()
    return {k: statistics.median(v) for k, v in times.items()}


def ort_latency(models: dict[str, bytes], batch: int, reps: int) -> dict[str, float]:
    import onnxruntime as ort

    out: dict[str, float] = {}
    x = np.random.default_rng(0).standard_normal((batch, 224, 224, 3)).astype(np.float32)
    sessions = {}
    for key, data in models.items():
        for level, name in ((ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "off"), (ort.GraphOptimizationLevel.ORT_ENABLE_ALL, "on")):
            opts = ort.SessionOptions()
            opts.graph_optimization_level = level
            opts.log_severity_level = 3
            sessions[f"{key}/{name}"] = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    times: dict[str, list[float]] = {k: [] for k in sessions}
    feeds = {k: {s.get_inputs()[0].name: x} for k, s in sessions.items()}
    for k, s in sessions.items():
        s.run(None, feeds[k])
    for _ in range(reps):
        for k, s in sessions.items():
            start = time.perf_counter()
            s.run(None, feeds[k])
            times[k].append(time.perf_counter() - start)
    out = {k: statistics.median(v) for k, v in times.items()}
    return out


def stock_tf2onnx(graph_def: graph_pb2.GraphDef, tf_in: str, tf_out: str, opset: int):  # type: ignore[no-untyped-def]
    """tf2onnx's own ``from_graph_def``, as its users call it (bnfold's ``convert`` runs its stages leaner)."""
    import tf2onnx

    model, _ = tf2onnx.convert.from_graph_def(graph_def, input_names=[f"{tf_in}:0"], output_names=[f"{tf_out}:0"], opset=opset)
    return model


def movement_floor(data: bytes) -> Callable[[], None]:
    """The data movement any fold of this graph does, and nothing else: a lower bound for ``bnfold.fold``.

    For each kernel the real fold replaces: read its bytes out of the parsed graph, multiply them by a
    per-channel vector in float64 into a buffer, copy that into a new GraphDef; copy every other node
    into it; serialize. No recognition, no graph index, no checks.
    """
    from bnfold.core.foldmath import scaled
    from bnfold.tf.fold import LINEAR_OPS
    from bnfold.tf.graph import const_array
    from bnfold.tf.tensors import ContentBuffer, Scratch

    original = graph_pb2.GraphDef.FromString(data)
    nodes = {n.name: n for n in original.node}
    folded_names = {n.name for n in fold_graph(original)[0].node}

    def source(ref: str) -> str:
        node = nodes[ref.split(":")[0]]
        while node.op == "Identity":
            node = nodes[node.input[0].split(":")[0]]
        return node.name

    weights = {source(n.input[LINEAR_OPS[n.op].weight_slot]) for n in original.node if n.op in LINEAR_OPS}
    replaced = sorted(w for w in weights if w not in folded_names)

    def run() -> None:
        graph = graph_pb2.GraphDef()
        graph.ParseFromString(data)
        by_name = {n.name: n for n in graph.node}
        out, scratch = graph_pb2.GraphDef(), Scratch()
        for name in replaced:
            w = const_array(by_name[name].attr["value"].tensor)
            buffer = ContentBuffer(w.shape, w.dtype, scratch)
            scaled(w, np.ones(w.shape[-1]), buffer.array)
            node = out.node.add()
            node.name, node.op = f"{name}/folded", "Const"
            tensor = node.attr["value"].tensor
            tensor.dtype = by_name[name].attr["value"].tensor.dtype
            tensor.tensor_shape.CopyFrom(by_name[name].attr["value"].tensor.tensor_shape)
            buffer.write_content(tensor)
        gone = set(replaced)
        out.node.extend(n for n in graph.node if n.name not in gone)
        out.SerializeToString(deterministic=True)

    return run


# -- one model ------------------------------------------------------------------------------------


def measure(name: str, reps: int, tmp: Path) -> dict[str, object]:
    import onnx
    from tensorflow.python.tools import optimize_for_inference_lib

    from bnfold.api import to_onnx
    from bnfold.onnx.export import DEFAULT_OPSET
    from bnfold.onnx.recognize import leftover_sites

    print(f"[{name}] freezing (cached)", flush=True)
    path, nobn_path = frozen(name)
    original = parse(path)
    (tf_in,) = [s.name for s in find_inputs(original)]
    (tf_out,) = find_outputs(original)
    size_mb = path.stat().st_size / 1e6
    row: dict[str, object] = {"model": name, "size_mb": round(size_mb, 1), "nodes": len(original.node)}

    # Fold time: floor (read + parse + write) vs bnfold (read + parse + fold + write), in process, median of 3.
    print(f"[{name}] fold time", flush=True)
    out_pb = tmp / f"{name}_folded.pb"

    def floor() -> None:
        g = graph_pb2.GraphDef()
        g.ParseFromString(path.read_bytes())
        bio.write_graph_def(g, tmp / "floor.pb")

    def bnfold_fold() -> None:  # what `bnfold in.pb out.pb --no-verify` runs: the streaming path (bnfold.tf.streaming)
        from bnfold import api

        result = api.fold(path, verify_outputs=False, stream_constants=True)
        api.write_result(result, out_pb)
        result.contents.close()

    floor(), bnfold_fold()  # warm caches (page cache, imports)
    row["floor_s"] = median_time(floor, 3)
    row["fold_s"] = median_time(bnfold_fold, 3)
    folded = parse(out_pb)
    protected = {tf_in, tf_out}

    def copy_fold() -> None:  # the Python API on a caller's GraphDef: the input is left alone, so the result is a new graph
        fold_graph(original, protected)

    row["fold_graph_copy_s"] = median_time(copy_fold, 3)

    def opt() -> graph_pb2.GraphDef:
        g = graph_pb2.GraphDef()
        g.ParseFromString(path.read_bytes())
        o = optimize_for_inference_lib.optimize_for_inference(g, [tf_in], [tf_out], 1)  # DT_FLOAT
        (tmp / "opt.pb").write_bytes(o.SerializeToString(deterministic=True))
        return o

    row["opt_s"] = median_time(opt, 1)
    optimized = parse(tmp / "opt.pb")

    # BN removal and runtime ops in TF graphs.
    nobn = parse(nobn_path)
    row["sites_original"] = tf_sites_left(original)
    row["sites_bnfold"] = tf_sites_left(folded)
    row["sites_opt"] = tf_sites_left(optimized)
    row["ops_original"], row["ops_bnfold"], row["ops_opt"], row["ops_nobn"] = (runtime_ops(g) for g in (original, folded, optimized, nobn))

    # CLI end to end (verification on), and peak memory of the --no-verify fold.
    print(f"[{name}] CLI", flush=True)
    report = tmp / f"{name}.json"
    row["cli_pb_s"], _ = run_timed([PY, "-m", "bnfold.cli", str(path), str(out_pb), "-q", "--report", str(report)])
    data = json.loads(report.read_text())
    row["err_pb"] = max(o["max_abs_error"] for o in data["verification"]["outputs"])
    row["rss_fold_mb"] = statistics.median(max_rss_mb([PY, "-m", "bnfold.cli", str(path), str(tmp / "m.pb"), "-q", "--no-verify"]) for _ in range(3))

    # ONNX: conversion stage in process (tf2onnx on the unfolded graph vs bnfold's TF fold + tf2onnx + ONNX fold,
    # no verification in either), and end to end as subprocesses (tf2onnx's CLI vs bnfold's CLI with its check).
    print(f"[{name}] ONNX", flush=True)
    start = time.perf_counter()
    plain = stock_tf2onnx(parse(path), tf_in, tf_out, DEFAULT_OPSET)
    row["onnx_tf2onnx_s"] = time.perf_counter() - start
    start = time.perf_counter()
    ours, _ = to_onnx(path, verify_outputs=False)
    row["onnx_bnfold_s"] = time.perf_counter() - start
    plain_path, ours_path = tmp / f"{name}_tf2onnx.onnx", tmp / f"{name}_bnfold.onnx"
    row["cli_tf2onnx_s"], _ = run_timed(
        [PY, "-m", "tf2onnx.convert", "--graphdef", str(path), "--inputs", f"{tf_in}:0", "--outputs", f"{tf_out}:0",
         "--opset", str(DEFAULT_OPSET), "--output", str(plain_path)]
    )  # fmt: skip
    row["cli_onnx_s"], _ = run_timed([PY, "-m", "bnfold.cli", str(path), str(ours_path), "-q", "--report", str(report)])
    data = json.loads(report.read_text())
    row["err_onnx"] = max(o["max_abs_error"] for o in data["verification"]["outputs"])
    left_plain, left_ours = leftover_sites(plain), leftover_sites(onnx.load(str(ours_path)))
    row["onnx_sites_tf2onnx"], row["onnx_sites_bnfold"] = sum(left_plain.values()), sum(left_ours.values())
    row["onnx_ops_tf2onnx"], row["onnx_ops_bnfold"] = onnx_runtime_ops(plain), onnx_runtime_ops(ours)

    # Latency.
    print(f"[{name}] latency", flush=True)
    graphs = {"original": path, "bnfold": out_pb, "nobn": nobn_path}
    for batch, n in ((1, 4 * reps), (32, reps)):
        lat = tf_latency(graphs, batch, n)
        for k, v in lat.items():
            row[f"tf_b{batch}_{k}"] = v
    lat = ort_latency({"tf2onnx": plain.SerializeToString(), "bnfold": ours_path.read_bytes()}, 1, 4 * reps)
    for k, v in lat.items():
        row[f"ort_b1_{k}"] = v
    return row


# -- the targets of issue #16 (ResNet50) ---------------------------------------------------------


def targets(name: str, tmp: Path, reps: int = 3) -> dict[str, float]:
    """The rows of issue #16: in-memory fold over the in-memory floor, the CLI with and without the check,
    and ``bnfold in.pb out.onnx --no-verify`` against ``python -m tf2onnx.convert`` (wall and peak RSS)."""
    from bnfold import api
    from bnfold.onnx.export import DEFAULT_OPSET

    path, _ = frozen(name)
    data = path.read_bytes()
    original = parse(path)
    (tf_in,) = [s.name for s in find_inputs(original)]
    (tf_out,) = find_outputs(original)
    del original

    def floor() -> None:
        g = graph_pb2.GraphDef()
        g.ParseFromString(data)
        g.SerializeToString(deterministic=True)

    def fold() -> None:
        g = graph_pb2.GraphDef()
        g.ParseFromString(data)
        api.fold(g, verify_outputs=False).graph_def.SerializeToString(deterministic=True)

    movement = movement_floor(data)
    floor(), fold(), movement()
    t: dict[str, float] = {"mem_floor_s": median_time(floor, 5), "mem_fold_s": median_time(fold, 5), "mem_movement_s": median_time(movement, 5)}
    t["mem_floor_cpu_s"], t["mem_fold_cpu_s"] = median_time(floor, 5, time.process_time), median_time(fold, 5, time.process_time)
    print(f"[targets] in memory {t}", flush=True)
    cli = [PY, "-m", "bnfold.cli", str(path)]
    pb = interleaved({"pb_noverify": [*cli, str(tmp / "t.pb"), "-q", "--no-verify"], "pb_check": [*cli, str(tmp / "t.pb"), "-q"]}, reps)
    print(f"[targets] pb {pb}", flush=True)
    onnx = interleaved(
        {
            "onnx_noverify": [*cli, str(tmp / "t.onnx"), "-q", "--no-verify"],
            "tf2onnx": [PY, "-m", "tf2onnx.convert", "--graphdef", str(path), "--inputs", f"{tf_in}:0", "--outputs", f"{tf_out}:0",
                        "--opset", str(DEFAULT_OPSET), "--output", str(tmp / "t2.onnx")],
        },
        reps,
    )  # fmt: skip
    print(f"[targets] onnx {onnx}", flush=True)
    for key, (wall, rss) in {**pb, **onnx}.items():
        t[f"{key}_s"], t[f"{key}_mb"] = wall, rss
    return t


def interleaved(commands: dict[str, list[str]], reps: int) -> dict[str, tuple[float, float]]:
    """Median wall seconds and peak RSS (MB) of each command, the commands run in turn (rotating which goes
    first), so that a change in the machine's load falls on all of them alike."""
    runs: dict[str, list[tuple[float, float]]] = {k: [] for k in commands}
    keys = list(commands)
    for rep in range(reps):
        for key in keys[rep % len(keys) :] + keys[: rep % len(keys)]:
            runs[key].append(timed_rss(commands[key]))
    return {k: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v)) for k, v in runs.items()}


def targets_table(t: dict[str, float], rows: list[dict], scale: list[dict], baseline_mb: float) -> list[str]:  # type: ignore[type-arg]
    per_block = [s["fold_s"] / s["blocks"] * 1e6 for s in scale]
    per_block_cpu = [s["fold_cpu_s"] / s["blocks"] * 1e6 for s in scale]
    rss = [(r["rss_fold_mb"] - baseline_mb) / r["size_mb"] for r in rows]
    status = {True: "met", False: "not met"}
    fold_ratio = t["mem_fold_s"] / t["mem_floor_s"]
    fold_cpu = t["mem_fold_cpu_s"] / t["mem_floor_cpu_s"]
    wall = t["onnx_noverify_s"] / t["tf2onnx_s"]
    check = t["pb_check_s"] / t["pb_noverify_s"]
    flat = per_block[-1] / per_block[0]
    return [
        "## Targets of issue #16 (ResNet50, median of the repeats, this run)",
        "",
        "| what | now | target | |",
        "|---|---|---|---|",
        f"| in-process fold (`bnfold.fold(gd, verify_outputs=False)` + serialize) over the in-memory floor (parse + serialize) | "
        f"{fold_ratio:.2f}x ({t['mem_fold_s']:.2f} s vs {t['mem_floor_s']:.2f} s); CPU {fold_cpu:.2f}x; the data movement alone "
        f"(no graph logic, see Definitions) {t['mem_movement_s'] / t['mem_floor_s']:.2f}x | <= 1.3x | {status[fold_ratio <= 1.3]} |",
        f"| `bnfold in.pb out.onnx --no-verify` over `python -m tf2onnx.convert` on the unfolded graph, wall | "
        f"{wall:.2f}x ({t['onnx_noverify_s']:.1f} s vs {t['tf2onnx_s']:.1f} s) | <= 1.0x | {status[wall <= 1.0]} |",
        f"| same, peak RSS | {t['onnx_noverify_mb'] / 1024:.1f} GB vs {t['tf2onnx_mb'] / 1024:.1f} GB | <= tf2onnx's | "
        f"{status[t['onnx_noverify_mb'] <= t['tf2onnx_mb']]} |",
        f"| `bnfold in.pb out.pb` with the check (graphs run in the worker process) over `--no-verify` | "
        f"{check:.2f}x ({t['pb_check_s']:.1f} s vs {t['pb_noverify_s']:.1f} s; peak RSS {t['pb_check_mb']:.0f} vs {t['pb_noverify_mb']:.0f} MB, "
        f"largest process) | <= 1.4x | {status[check <= 1.4]} |",
        f"| per-block fold cost, {scale[0]['blocks']} -> {scale[-1]['blocks']} blocks (synthetic; the fold alone, fresh process) | "
        f"{' -> '.join(f'{v:.0f}' for v in per_block)} us ({flat:.2f}x); CPU {' -> '.join(f'{v:.0f}' for v in per_block_cpu)} us "
        f"({per_block_cpu[-1] / per_block_cpu[0]:.2f}x) | flat within 10% | {status[abs(flat - 1) <= 0.1]} |",
        f"| fold peak RSS over model size, above the TF baseline | {min(rss):.2f} to {max(rss):.2f}x | <= 1.5x | {status[max(rss) <= 1.5]} |",
        "",
    ]


# -- scaling --------------------------------------------------------------------------------------


def synthetic(blocks: int) -> graph_pb2.GraphDef:
    """``blocks`` x (3x3 conv 32->32 + FusedBatchNormV3 + Relu), built as a GraphDef directly."""
    import tensorflow as tf

    rng = np.random.default_rng(0)
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [1, 16, 16, 32], name="x")
        for _ in range(blocks):
            w = tf.constant(rng.standard_normal((3, 3, 32, 32)).astype(np.float32))
            x = tf.nn.conv2d(x, w, 1, "SAME")
            stats = [tf.constant(rng.uniform(0.5, 1.5, 32).astype(np.float32)) for _ in range(4)]
            x, *_ = tf.raw_ops.FusedBatchNormV3(x=x, scale=stats[0], offset=stats[1], mean=stats[2], variance=stats[3], is_training=False)
            x = tf.nn.relu(x)
        tf.identity(x, name="y")
    return graph.as_graph_def()


_SCALING_RUN = r"""
import json, os, resource, sys, time
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
sys.path.insert(0, sys.argv[2])
import run
from tensorflow.core.framework import graph_pb2
from bnfold.tf.fold import fold_graph
def fold(data):
    g = graph_pb2.GraphDef()
    g.ParseFromString(data)
    r0, w0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    out, _ = fold_graph(g, {"x", "y"}, in_place=True)
    w1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    return out, w1 - w0, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
fold(run.synthetic(10).SerializeToString())  # imports, registries, first-call costs
data = run.synthetic(int(sys.argv[1])).SerializeToString()
g = graph_pb2.GraphDef()
w0 = time.perf_counter(); g.ParseFromString(data); g.SerializeToString(deterministic=True); floor = time.perf_counter() - w0
out, wall, cpu = fold(data)
w0 = time.perf_counter(); out.SerializeToString(deterministic=True); serialize = time.perf_counter() - w0
print(json.dumps({"mb": len(data) / 1e6, "floor_s": floor, "fold_s": wall, "fold_cpu_s": cpu, "serialize_s": serialize}))
"""


def scaling(reps: int = 3) -> list[dict[str, float]]:
    """Fold cost per block, each size in fresh processes (median of ``reps``).

    A fold in a fresh process meets fresh memory at every size, as ``bnfold in.pb out.pb``
    does; repeats inside one process would let small graphs reuse the memory freed by the
    previous repeat and large ones not, which measures the allocator, not the fold. The fold
    alone (``fold_graph`` in place) is bnfold's cost; parse + serialize (the floor) are shown
    beside it, since they grow per block on their own.
    """
    rows = []
    for blocks in (100, 400, 1600):
        runs = []
        for _ in range(reps):
            proc = subprocess.run([PY, "-c", _SCALING_RUN, str(blocks), str(HERE)], capture_output=True, text=True)
            if proc.returncode:
                raise SystemExit(f"scaling run failed: {proc.stderr[-2000:]}")
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        row = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        rows.append({"blocks": blocks, **row})
    return rows


# -- output ---------------------------------------------------------------------------------------


def ms(v: object) -> str:
    return f"{float(v) * 1000:.1f}"  # type: ignore[arg-type]


def write_results(rows: list[dict], scale: list[dict], baseline_mb: float, total_s: float, target: dict[str, float] | None = None) -> str:  # type: ignore[type-arg]
    import platform

    lines = [
        "# bnfold benchmark results",
        "",
        f"Generated by `python benchmarks/run.py` in {total_s / 60:.1f} min on {os.cpu_count()} CPU cores "
        f"({platform.processor() or platform.machine()}), Python {platform.python_version()}. "
        "Absolute times vary between machines and runs; quote the ratios.",
        "",
        "Models: keras.applications, weights=None, BN statistics randomized (gamma U(0.5,1.5), beta N(0,0.3), "
        "mean N(0,0.3), var U(0.5,2)), 224x224x3 input (InceptionV3 too), frozen once with `bnfold.tf.freeze.freeze_keras`.",
        "",
        *(targets_table(target, rows, scale, baseline_mb) if target else []),
        "## BN removal and runtime ops",
        "",
        "| model | MB | BN sites | left: bnfold | left: optimize_for_inference | left: tf2onnx ONNX | left: bnfold ONNX | "
        "runtime ops: original / bnfold / optimize_for_inference / no-BN | ONNX ops: tf2onnx / bnfold |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['size_mb']} | {r['sites_original']} | {r['sites_bnfold']} | {r['sites_opt']} | "
            f"{r['onnx_sites_tf2onnx']} | {r['onnx_sites_bnfold']} | {r['ops_original']} / {r['ops_bnfold']} / {r['ops_opt']} / {r['ops_nobn']} | "
            f"{r['onnx_ops_tf2onnx']} / {r['onnx_ops_bnfold']} |"
        )
    lines += [
        "",
        "## Fold time, memory, error",
        "",
        "| model | floor ms | bnfold fold ms | fold / floor | fold_graph (copy) ms | optimize_for_inference ms | "
        "CLI .pb s (with check) | fold RSS above baseline MB | / model size | max abs error .pb | max abs error .onnx |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        extra = r["rss_fold_mb"] - baseline_mb
        lines.append(
            f"| {r['model']} | {ms(r['floor_s'])} | {ms(r['fold_s'])} | **{r['fold_s'] / r['floor_s']:.2f}x** | {ms(r['fold_graph_copy_s'])} | "
            f"{ms(r['opt_s'])} | {r['cli_pb_s']:.1f} | {extra:.0f} | **{extra / r['size_mb']:.2f}x** | {r['err_pb']:.1e} | {r['err_onnx']:.1e} |"
        )
    lines += [
        "",
        "## ONNX export time",
        "",
        "| model | conversion stage: tf2onnx s | bnfold (fold + tf2onnx + ONNX fold) s | ratio | end to end: tf2onnx CLI s | `bnfold in.pb out.onnx` s (with onnxruntime check) | ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['onnx_tf2onnx_s']:.1f} | {r['onnx_bnfold_s']:.1f} | **{r['onnx_bnfold_s'] / r['onnx_tf2onnx_s']:.2f}x** | "
            f"{r['cli_tf2onnx_s']:.1f} | {r['cli_onnx_s']:.1f} | **{r['cli_onnx_s'] / r['cli_tf2onnx_s']:.2f}x** |"
        )
    lines += [
        "",
        "## Latency (median ms; ratios against the original graph / tf2onnx's file)",
        "",
        "| model | TF b1: original / bnfold / no-BN | bnfold / original | no-BN / original | TF b32: original / bnfold / no-BN | bnfold / original | no-BN / original | "
        "ORT b1 opt off: tf2onnx / bnfold | ORT b1 opt on: tf2onnx / bnfold |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        b1 = [r[f"tf_b1_{k}"] for k in ("original", "bnfold", "nobn")]
        b32 = [r[f"tf_b32_{k}"] for k in ("original", "bnfold", "nobn")]
        lines.append(
            f"| {r['model']} | {' / '.join(ms(v) for v in b1)} | **{b1[1] / b1[0]:.2f}** | {b1[2] / b1[0]:.2f} | "
            f"{' / '.join(ms(v) for v in b32)} | **{b32[1] / b32[0]:.2f}** | {b32[2] / b32[0]:.2f} | "
            f"{ms(r['ort_b1_tf2onnx/off'])} / {ms(r['ort_b1_bnfold/off'])} | {ms(r['ort_b1_tf2onnx/on'])} / {ms(r['ort_b1_bnfold/on'])} |"
        )
    lines += [
        "",
        "## Fold cost against graph size (synthetic: N x conv 3x3 32->32 + FusedBatchNormV3 + Relu)",
        "",
        "Each size in fresh processes (median of 3): the fold alone (`fold_graph` in place on the parsed graph), "
        "its CPU time (user + system), and the floor (parse + serialize) for comparison.",
        "",
        "| blocks | MB | fold ms | fold us per block | fold CPU us per block | floor ms | floor us per block |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in scale:
        lines.append(
            f"| {s['blocks']} | {s['mb']:.1f} | {ms(s['fold_s'])} | {s['fold_s'] / s['blocks'] * 1e6:.0f} | "
            f"{s['fold_cpu_s'] / s['blocks'] * 1e6:.0f} | {ms(s['floor_s'])} | {s['floor_s'] / s['blocks'] * 1e6:.0f} |"
        )
    lines += ["", DEFINITIONS]
    return "\n".join(lines) + "\n"


DEFINITIONS = """## Definitions

- **BN sites** (TF graphs): `FusedBatchNorm*` and `BatchNormWithGlobalNormalization` nodes, plus every `Mul`
  whose other operand is constant and that either comes from an `Rsqrt` of constants (a decomposed
  `tf.nn.batch_normalization` / Keras 3 BN) or is per-channel (not a scalar such as swish's beta) and
  sits right behind a conv/dense op (through an optional
  `BiasAdd`/`Add`): a per-channel scale still computed per inference. Run on the original it counts each BN
  once. **left** = the same count on each tool's output.
- **BN sites left in ONNX**: `bnfold.onnx.recognize.leftover_sites`: `BatchNormalization` nodes plus per-channel
  `Mul`/`Add` right after a `Conv`/`ConvTranspose`/`Gemm`/`MatMul` (a conv's own bias input is not counted).
- **In-process fold target**: `bnfold.fold(graph_def, verify_outputs=False)` on a freshly parsed GraphDef (the
  caller's graph, so the result is built beside it) and serializing the result, against parsing and serializing
  alone, medians of 5. **The data movement alone**: what any fold of the graph moves, with no graph logic: read
  each kernel the fold replaces out of the parsed graph, multiply it by a per-channel vector in float64 (the fold
  math's precision), copy it into a new GraphDef, copy the other nodes, serialize (`movement_floor` in run.py).
- **Runtime ops**: nodes that run per inference: all but `Const`, `Identity`, `NoOp`, `Placeholder`,
  `PlaceholderWithDefault` (ONNX: all but `Constant`/`Identity`).
- **floor**: read the `.pb`, parse it, write it back with the same writer bnfold uses (no fold), in process,
  median of 3. **bnfold fold**: `bnfold.fold(in, verify_outputs=False, stream_constants=True)` + `write_result`
  in process (read node by node with the weights left in the file, canonicalize, fold, write with the values
  spliced in), median of 3: the work of `bnfold in.pb out.pb --no-verify` without Python/TF start-up. **fold_graph (copy)**: `fold_graph` on a caller's GraphDef (not modified, so the result is
  a new graph), without parse or write. **optimize_for_inference**:
  `tensorflow.python.tools.optimize_for_inference_lib.optimize_for_inference` (its BN folding passes
  `fuse_decomposed_batch_norm` and `fold_batch_norms` always run), parse + optimize + serialize, one run.
- **CLI .pb**: `bnfold in.pb out.pb` as a subprocess, verification on (TF start-up, fold, both graphs run in TF).
- **Fold RSS**: maximum resident set size (GNU `time -v`) of `bnfold in.pb out.pb --no-verify` minus that of
  `python -c "import tensorflow, bnfold.cli, bnfold.api"` (the baseline, printed below the tables), medians of 3.
- **ONNX conversion stage**: in process, no verification in either: `tf2onnx.convert.from_graph_def` of the
  unfolded graph (tf2onnx as its users call it; its output also gives the tf2onnx ONNX columns) vs `bnfold.to_onnx(path, verify_outputs=False)` (load, TF fold, tf2onnx on the folded graph,
  ONNX-side fold, `onnx.checker`). **End to end**: subprocesses, `python -m tf2onnx.convert --graphdef` vs
  `bnfold in.pb out.onnx` (which also runs the file in onnxruntime against TF).
- **Latency**: `session.run` of the whole graph on random input, one warm-up run, then the graphs run
  interleaved (original, bnfold, no-BN, repeated), median. Batch 1: 4 x reps runs, batch 32: reps runs.
  ONNX files in onnxruntime (CPU) with graph optimizations off and on (ORT folds BN itself when on).
- **No-BN reference**: the Keras model cloned with every `BatchNormalization` replaced by `Identity`, frozen the
  same way. keras.applications convs before BN have `use_bias=False`, so this graph has neither BN nor bias:
  it is a lower bound the folded graph (which keeps one `BiasAdd` per folded BN) can approach but not pass.
- **Max abs error**: from bnfold's own verification (batch of 2 random inputs; the ONNX file in onnxruntime,
  optimizations off, against the original graph in TF).
"""


def chart(rows: list[dict], path: Path) -> None:  # type: ignore[type-arg]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["model"] for r in rows]
    x = np.arange(len(names))
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8))
    series = [
        ("bnfold fold / floor", [r["fold_s"] / r["floor_s"] for r in rows]),
        ("optimize_for_inference / floor", [r["opt_s"] / r["floor_s"] for r in rows]),
        ("bnfold ONNX / tf2onnx (conversion)", [r["onnx_bnfold_s"] / r["onnx_tf2onnx_s"] for r in rows]),
    ]
    w = 0.27
    for i, (label, values) in enumerate(series):
        a.bar(x + (i - 1) * w, values, w, label=label)
    a.axhline(1.5, color="k", ls="--", lw=0.8, label="target 1.5x floor")
    a.set_xticks(x, names, rotation=20, fontsize=8)
    a.set_yscale("log")
    a.set_title("Time ratios (lower is better)", fontsize=10)
    a.legend(fontsize=7)
    series = [
        ("TF b1 bnfold / original", [r["tf_b1_bnfold"] / r["tf_b1_original"] for r in rows]),
        ("TF b1 no-BN / original", [r["tf_b1_nobn"] / r["tf_b1_original"] for r in rows]),
        ("TF b32 bnfold / original", [r["tf_b32_bnfold"] / r["tf_b32_original"] for r in rows]),
        ("TF b32 no-BN / original", [r["tf_b32_nobn"] / r["tf_b32_original"] for r in rows]),
    ]
    w = 0.2
    for i, (label, values) in enumerate(series):
        b.bar(x + (i - 1.5) * w, values, w, label=label)
    b.axhline(1.0, color="k", ls="--", lw=0.8)
    b.set_xticks(x, names, rotation=20, fontsize=8)
    b.set_title("TF latency ratios (below 1: faster than original)", fontsize=10)
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=MODELS)
    parser.add_argument("--reps", type=int, default=3, help="batch-32 latency runs (batch 1: 4x as many)")
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    args = parser.parse_args()
    start = time.perf_counter()
    baseline = statistics.median(max_rss_mb([PY, "-c", "import tensorflow, bnfold.cli, bnfold.api"]) for _ in range(3))
    rows = []
    WORK.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=WORK) as tmp:
        target = targets("ResNet50", Path(tmp)) if "ResNet50" in args.models else None
        for name in args.models:
            rows.append(measure(name, args.reps, Path(tmp)))
            print(json.dumps(rows[-1]), flush=True)
    print("[scaling]", flush=True)
    scale = scaling()
    total = time.perf_counter() - start
    text = write_results(rows, scale, baseline, total, target)
    text += f"\nBaseline RSS (`import tensorflow, bnfold`): {baseline:.0f} MB.\n"
    args.out.write_text(text)
    chart(rows, args.out.with_name("results.png"))
    (args.out.with_name("results.json")).write_text(
        json.dumps({"rows": rows, "scaling": scale, "baseline_mb": baseline, "targets": target}, indent=1)
    )
    print(text)
    print(f"total {total / 60:.1f} min")


if __name__ == "__main__":
    main()
