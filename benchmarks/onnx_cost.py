"""What ``bnfold in.pb out.onnx --no-verify`` costs next to ``python -m tf2onnx.convert`` on the unfolded graph (#16).

Two measurements, both on keras.applications models frozen from Keras 3 (``run.frozen``):

- ``python benchmarks/onnx_cost.py [--models ResNet50 MobileNetV2] [--repeats 5] [--baseline DIR]``:
  wall time and peak RSS (GNU time -v, the largest process) of each command, the
  commands *interleaved* run by run (the order alternates each repeat) so that a
  shared machine's load falls on both alike; medians, ratios and the load average
  before and after go to ``onnx_cost.json``. ``--baseline DIR`` adds a third arm:
  the same bnfold command run from another checkout (e.g. ``git worktree add
  /tmp/base <commit>``), for before/after figures from the same run.
- ``--stages``: one run of each tool in process, with tf2onnx's and bnfold's stage
  functions wrapped to record wall time, RSS at start and end and the peak RSS
  while each ran (a thread reads /proc/self/status every 20 ms). This is the
  profile that says where the seconds and bytes go.

Ratios from one run are what to compare; absolute seconds move with the load.
Nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PY = sys.executable
OPSET = 17  # bnfold's DEFAULT_OPSET, read without importing bnfold (and TensorFlow) in the parent


def rss_mb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) // 1024
    return 0


def io_names(pb: Path) -> tuple[str, str]:
    """The frozen graph's one input placeholder and one output, as tf2onnx wants them (``x:0``)."""
    code = (
        "import sys; from tensorflow.core.framework import graph_pb2; from bnfold.tf.verify import find_inputs, find_outputs\n"
        "g = graph_pb2.GraphDef(); g.ParseFromString(open(sys.argv[1], 'rb').read())\n"
        "print([s.name for s in find_inputs(g)][0], find_outputs(g)[0])"
    )
    out = subprocess.run([PY, "-c", code, str(pb)], capture_output=True, text=True, check=True, cwd=ROOT).stdout.split()
    return f"{out[-2]}:0", f"{out[-1]}:0"


def model_path(name: str) -> Path:
    path = HERE / "_work" / f"{name}.pb"
    if not path.exists():
        code = f"import sys; sys.path.insert(0, {str(HERE)!r}); import run; run.frozen({name!r})"
        subprocess.run([PY, "-c", code], check=True, cwd=ROOT)
    return path


def commands(pb: Path, tmp: Path, inp: str, out: str) -> dict[str, list[str]]:
    return {
        "bnfold": [PY, "-m", "bnfold.cli", str(pb), str(tmp / "bnfold.onnx"), "-q", "--no-verify"],
        "tf2onnx": [PY, "-m", "tf2onnx.convert", "--graphdef", str(pb), "--inputs", inp, "--outputs", out,
                    "--opset", str(OPSET), "--output", str(tmp / "tf2onnx.onnx")],
    }  # fmt: skip


def timed_rss(cmd: list[str], env: dict[str, str], cwd: Path) -> tuple[float, float, float]:
    """Wall seconds, peak RSS in MB (GNU time -v: the largest single process) and CPU seconds (user + system) of one run.

    CPU seconds move less than wall time with the load of a shared machine.
    """
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env, cwd=cwd)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    cpu = sum(float(m) for m in re.findall(r"(?:User|System) time \(seconds\): ([\d.]+)", proc.stderr))
    return elapsed, int(match.group(1)) / 1024 if match else float("nan"), cpu


def interleaved(name: str, repeats: int, baseline: Path | None) -> dict[str, Any]:
    pb = model_path(name)
    inp, out = io_names(pb)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    with tempfile.TemporaryDirectory(prefix="onnx_cost_") as tmp:
        arms = {k: (v, env, ROOT) for k, v in commands(pb, Path(tmp), inp, out).items()}
        if baseline is not None:  # run from the baseline checkout: `python -m` puts the working directory first on sys.path
            base_cmd = [*arms["bnfold"][0][:-3], str(Path(tmp) / "baseline.onnx"), "-q", "--no-verify"]
            arms["bnfold_baseline"] = (base_cmd, {**env, "PYTHONPATH": str(baseline.resolve())}, baseline.resolve())
        runs: dict[str, list[tuple[float, float, float]]] = {k: [] for k in arms}
        load = [os.getloadavg()[0]]
        order = list(arms)
        for rep in range(repeats):
            for key in order if rep % 2 == 0 else order[::-1]:
                runs[key].append(timed_rss(*arms[key]))
                wall, rss, cpu = runs[key][-1]
                print(f"[{name}] {key} run {rep + 1}: {wall:.1f} s, {rss:.0f} MB, {cpu:.1f} CPU s", flush=True)
            load.append(os.getloadavg()[0])
    medians = {k: {key: statistics.median(r[i] for r in v) for i, key in enumerate(("wall_s", "peak_rss_mb", "cpu_s"))} for k, v in runs.items()}
    b, t = medians["bnfold"], medians["tf2onnx"]
    return {
        "model": name,
        "model_mb": round(pb.stat().st_size / 1e6, 1),
        "repeats": repeats,
        "runs": {k: [{"wall_s": round(w, 2), "peak_rss_mb": round(m), "cpu_s": round(c, 2)} for w, m, c in v] for k, v in runs.items()},
        "median": {k: {"wall_s": round(v["wall_s"], 2), "peak_rss_mb": round(v["peak_rss_mb"]), "cpu_s": round(v["cpu_s"], 2)} for k, v in medians.items()},
        "wall_ratio": round(b["wall_s"] / t["wall_s"], 3),
        "rss_ratio": round(b["peak_rss_mb"] / t["peak_rss_mb"], 3),
        "cpu_ratio": round(b["cpu_s"] / t["cpu_s"], 3),
        "load_1min": [round(x, 2) for x in load],
    }


# -- in-process stage profile (child process) -------------------------------------------------------

STAGES_TF2ONNX = [
    ("tf2onnx.tf_loader", "from_graphdef", "tf2onnx: read + import + freeze + grappler"),
    ("tf2onnx.tf_loader", "freeze_session", "freeze_session"),
    ("tf2onnx.tf_loader", "tf_optimize", "grappler (tf_optimize)"),
    ("tf2onnx.convert", "_convert_common", "tf2onnx: _convert_common"),
    ("tf2onnx.convert", "process_tf_graph", "process_tf_graph"),
    ("tf2onnx.optimizer", "optimize_graph", "ONNX optimizers (optimize_graph)"),
    ("tf2onnx.graph", "Graph.make_model", "make_model"),
    ("tf2onnx.utils", "save_protobuf", "serialize + write"),
]
STAGES_BNFOLD = [
    ("bnfold.onnx.export", "to_onnx", "bnfold: to_onnx"),
    ("bnfold.tf.freeze", "load", "load (read + parse)"),
    ("bnfold.api", "load", "load (read + parse)"),
    ("bnfold.api", "fold", "TF fold (api.fold)"),
    ("bnfold.onnx.export", "convert", "tf2onnx conversion (convert)"),
    ("bnfold.onnx.export", "fold_model", "ONNX fold (fold_model)"),
    ("bnfold.onnx.export", "_check_output_model", "onnx.checker"),
    ("bnfold.onnx.export", "plan_output", "plan_output"),
    ("bnfold.onnx.export", "write_onnx", "serialize + write"),
]


def child(tool: str, pb: str, inp: str, out: str, dst: str) -> None:
    t0 = time.perf_counter()
    stack: list[int] = []
    records: list[dict[str, Any]] = []
    peaks: dict[int, int] = {}

    def sample() -> None:
        while True:
            now = rss_mb()
            for key in list(stack):
                peaks[key] = max(peaks.get(key, 0), now)
            time.sleep(0.02)

    threading.Thread(target=sample, daemon=True).start()

    def wrap(module: str, attr: str, label: str) -> None:
        owner: Any = importlib.import_module(module)
        *path, last = attr.split(".")
        for part in path:
            owner = getattr(owner, part)
        fn = getattr(owner, last)
        if hasattr(fn, "__wrapped__"):
            return  # the same function under another module's name, already timed

        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            key, start, before = len(records), time.perf_counter(), rss_mb()
            records.append({"stage": label, "depth": len(stack)})
            peaks[key] = before
            stack.append(key)
            try:
                return fn(*args, **kwargs)
            finally:
                stack.remove(key)
                records[key].update(start_s=round(start - t0, 2), wall_s=round(time.perf_counter() - start, 2), rss_before_mb=before,
                                    rss_after_mb=rss_mb(), peak_mb=peaks[key])  # fmt: skip

        setattr(owner, last, timed)

    import tf2onnx.convert  # noqa: F401  (TensorFlow and tf2onnx imported: the imports' cost is the first record)

    records.append({"stage": "imports (TensorFlow, tf2onnx, the tool)", "depth": 0, "start_s": 0.0, "wall_s": round(time.perf_counter() - t0, 2),
                    "rss_before_mb": 0, "rss_after_mb": rss_mb(), "peak_mb": rss_mb()})  # fmt: skip
    if tool == "bnfold":
        import bnfold.cli

        for module, attr, label in STAGES_BNFOLD:
            wrap(module, attr, label)
        sys.argv = ["bnfold", pb, dst, "-q", "--no-verify"]
        try:
            bnfold.cli.main()
        except SystemExit as exc:
            if exc.code:
                raise
    else:
        for module, attr, label in STAGES_TF2ONNX:
            wrap(module, attr, label)
        sys.argv = ["tf2onnx", "--graphdef", pb, "--inputs", inp, "--outputs", out, "--opset", str(OPSET), "--output", dst]
        tf2onnx.convert.main()
    total = {"stage": "total in process", "depth": 0, "wall_s": round(time.perf_counter() - t0, 2), "peak_mb": max(peaks.values(), default=0)}
    print("STAGES " + json.dumps([*records, total]), flush=True)


def stages(name: str) -> dict[str, Any]:
    pb = model_path(name)
    inp, out = io_names(pb)
    result: dict[str, Any] = {"model": name}
    with tempfile.TemporaryDirectory(prefix="onnx_cost_") as tmp:
        for tool in ("tf2onnx", "bnfold"):
            proc = subprocess.run([PY, __file__, "--_child", tool, str(pb), inp, out, str(Path(tmp) / f"{tool}.onnx")],
                                  capture_output=True, text=True, cwd=ROOT)  # fmt: skip
            line = next((x for x in proc.stdout.splitlines() if x.startswith("STAGES ")), None)
            if line is None:
                raise SystemExit(f"{tool} stage run failed: {proc.stderr[-2000:]}")
            result[tool] = json.loads(line[len("STAGES ") :])
    return result


def print_stages(profile: dict[str, Any]) -> None:
    for tool in ("tf2onnx", "bnfold"):
        print(f"\n{profile['model']}, {tool} (in process, one run)")
        print(f"| {'stage':52s} | wall s | RSS before -> after MB | peak MB |")
        for r in profile[tool]:
            if "rss_before_mb" in r and r["wall_s"] < 0.02 and r["peak_mb"] - r["rss_before_mb"] < 20:
                continue  # a stage that cost nothing worth a row
            name = "  " * r["depth"] + r["stage"]
            span = f"{r['rss_before_mb']} -> {r['rss_after_mb']}" if "rss_before_mb" in r else ""
            print(f"| {name:52s} | {r['wall_s']:6.2f} | {span:22s} | {r.get('peak_mb', '')!s:7s} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["ResNet50", "MobileNetV2"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--baseline", type=Path, help="another bnfold checkout to run as a third arm (PYTHONPATH)")
    parser.add_argument("--stages", action="store_true", help="only the in-process stage profile of both tools")
    parser.add_argument("--out", type=Path, default=HERE / "onnx_cost.json")
    parser.add_argument("--_child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        child(*args._child)
        return
    if args.stages:
        for name in args.models:
            print_stages(stages(name))
        return
    results = [interleaved(name, args.repeats, args.baseline) for name in args.models]
    args.out.write_text(json.dumps({"cpus": os.cpu_count(), "results": results}, indent=1) + "\n")
    print(f"\nmedians of {args.repeats}, interleaved; wall s / peak RSS / CPU s (user + system)")
    print("| model | bnfold --no-verify | tf2onnx CLI | wall ratio | RSS ratio | CPU ratio | load (1 min) |")
    print("|---|---|---|---|---|---|---|")

    def cell(m: dict[str, float]) -> str:
        return f"{m['wall_s']:.1f} s, {m['peak_rss_mb'] / 1024:.2f} GB, {m['cpu_s']:.1f} s"

    for r in results:
        b, t = r["median"]["bnfold"], r["median"]["tf2onnx"]
        print(f"| {r['model']} | {cell(b)} | {cell(t)} | {r['wall_ratio']:.2f}x | {r['rss_ratio']:.2f}x | {r['cpu_ratio']:.2f}x | "
              f"{min(r['load_1min']):.1f}-{max(r['load_1min']):.1f} |")  # fmt: skip
        if "bnfold_baseline" in r["median"]:
            base = r["median"]["bnfold_baseline"]
            print(f"| {r['model']}, baseline bnfold | {cell(base)} | | {base['wall_s'] / t['wall_s']:.2f}x | "
                  f"{base['peak_rss_mb'] / t['peak_rss_mb']:.2f}x | {base['cpu_s'] / t['cpu_s']:.2f}x | |")  # fmt: skip


if __name__ == "__main__":
    main()
