"""What confinement costs (issue #22): `bnfold` on ResNet50 with this tree against a tree without the sandbox.

    python benchmarks/sandbox_cost.py --before /path/to/tree/without/sandbox    # e.g. a checkout of main
    python benchmarks/sandbox_cost.py --before /work/main --repeats 1

One run per tree and case (``--repeats`` for more), each in a fresh interpreter
started by a small launcher (``run_once``: wall seconds, peak RSS of the largest
process, bnfold's or its worker's, CPU seconds of bnfold and its worker):

- ``pb check``: ``bnfold ResNet50.pb out.pb`` -- the check's worker is confined
  (Landlock, rlimits) and each run request waits under a deadline;
- ``savedmodel check``: ``bnfold ResNet50_sm out.pb`` -- with the sandbox the
  SavedModel is loaded and frozen in the confined worker and the GraphDef comes
  back over the pipe; before, it was loaded in bnfold's own process;
- ``savedmodel --no-verify``: the same, without the check: the worker starts for
  the load alone;
- ``pb -> onnx check``: ``bnfold ResNet50.pb out.onnx`` -- with the last step of
  #22, tf2onnx's conversion, the ONNX-side constants and both onnxruntime sessions
  of the check run in the confined worker; before, in bnfold's own process;
- ``keras -> keras check``: ``bnfold ResNet50.keras out.keras`` -- the model is
  loaded, folded, checked, saved and reloaded in the worker, which answers with the
  file's bytes; before, all of it ran in bnfold's own process.

``--only NAME,...`` runs some of the cases; their results replace those of the
same name in ``sandbox_cost.json``, the others are kept (each case records the
load average around it).

Ratios are this tree over the other, from one run of each (``--repeats`` takes
medians), on whatever machine runs it: the load average is recorded. Writes
``sandbox_cost.json`` beside this script; no figure here is a test. The models are
keras.applications ResNet50 with random weights and BN statistics
(``run.frozen``; the SavedModel is ``model.export`` of the same model), cached in
``benchmarks/_work``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))



# Started from a small interpreter, not from this one: Linux keeps a process's peak RSS across exec, so a
# child forked from this process (TensorFlow and the models loaded) would report this process's peak as its own.
LAUNCHER = """
import json, os, subprocess, sys, time
start = time.perf_counter()
proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
out, err = proc.communicate()
wall = time.perf_counter() - start
import resource
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"code": proc.returncode, "wall": wall, "maxrss_kb": usage.ru_maxrss,
                  "cpu": usage.ru_utime + usage.ru_stime, "err": err.decode()[-2000:]}))
"""


def run_once(tree: Path, model: Path, verify: bool, out_name: str = "out.pb") -> tuple[float, float, float]:
    """Wall seconds, peak RSS (GB, largest process: bnfold or its worker) and CPU seconds (user + system, the
    worker included) of one ``bnfold MODEL OUT -q`` in a fresh interpreter, started by a small launcher."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(tree))
    with tempfile.TemporaryDirectory() as tmp:
        args = [sys.executable, "-m", "bnfold", str(model), str(Path(tmp) / out_name), "-q"]
        if not verify:
            args.append("--no-verify")
        proc = subprocess.run([sys.executable, "-c", LAUNCHER, *args], env=env, cwd=tmp, capture_output=True, text=True, check=True)
        facts = json.loads(proc.stdout.strip().splitlines()[-1])
        if facts["code"] != 0:
            raise SystemExit(f"{' '.join(args)} (tree {tree}): exit {facts['code']}: {facts['err'].strip()}")
    return float(facts["wall"]), facts["maxrss_kb"] / 1e6, float(facts["cpu"])  # KB -> GB


def models() -> dict[str, Path]:
    import run  # benchmarks/run.py: the cached ResNet50 with randomized BN statistics

    pb, _ = run.frozen("ResNet50")
    saved = run.WORK / "ResNet50_sm"
    if not (saved / "saved_model.pb").exists():
        model = run.randomized("ResNet50", 224)
        model.export(str(saved), verbose=False)
    keras_file = run.WORK / "ResNet50.keras"
    if not keras_file.exists():
        run.randomized("ResNet50", 224).save(keras_file)
    return {"pb": pb, "savedmodel": saved, "keras": keras_file}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, required=True, help="a bnfold tree without the sandbox (e.g. a checkout of main)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--only", default="", help="comma-separated case names (default: all)")
    args = parser.parse_args()
    paths = models()
    cases = [
        ("pb check", paths["pb"], True, "out.pb"),
        ("savedmodel check", paths["savedmodel"], True, "out.pb"),
        ("savedmodel --no-verify", paths["savedmodel"], False, "out.pb"),
        ("pb -> onnx check", paths["pb"], True, "out.onnx"),
        ("keras -> keras check", paths["keras"], True, "out.keras"),
    ]
    if args.only:
        wanted = set(args.only.split(","))
        cases = [c for c in cases if c[0] in wanted]
    trees = {"before": args.before.resolve(), "after": ROOT}
    load_before = os.getloadavg()
    runs: dict[str, dict[str, list[tuple[float, float, float]]]] = {c[0]: {t: [] for t in trees} for c in cases}
    loads: dict[str, list[list[float]]] = {c[0]: [] for c in cases}
    for repeat in range(args.repeats):
        order = list(trees.items())[:: 1 if repeat % 2 == 0 else -1]  # alternate which tree runs first
        for name, model, verify, out_name in cases:
            for tree_name, tree in order:
                loads[name].append(list(os.getloadavg()))
                runs[name][tree_name].append(run_once(tree, model, verify, out_name))
                print(name, tree_name, runs[name][tree_name][-1], flush=True)
    old = json.loads((HERE / "sandbox_cost.json").read_text()) if args.only and (HERE / "sandbox_cost.json").exists() else {}
    results = dict(old.get("results", {}))
    for name, per_tree in runs.items():
        med = {t: [statistics.median(v[i] for v in per_tree[t]) for i in range(3)] for t in trees}
        results[name] = {
            "before": dict(zip(("wall_s", "peak_rss_gb", "cpu_s"), med["before"], strict=True)),
            "after": dict(zip(("wall_s", "peak_rss_gb", "cpu_s"), med["after"], strict=True)),
            "wall_ratio": med["after"][0] / med["before"][0],
            "rss_ratio": med["after"][1] / med["before"][1],
            "cpu_ratio": med["after"][2] / med["before"][2],
            "load_at_start": loads[name],
        }
    machine = {"cpus": os.cpu_count(), "load_before": load_before, "load_after": os.getloadavg()}
    out = {
        **({"machine_first_cases": old["machine"]} if "machine" in old and args.only else {}),
        "machine": machine,
        "repeats": args.repeats,
        "before_tree": str(trees["before"]),
        "results": results,
    }
    (HERE / "sandbox_cost.json").write_text(json.dumps(out, indent=2) + "\n")
    print("| run | wall before / after (s) | ratio | peak RSS before / after (GB) | ratio | CPU before / after (s) |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        if name not in runs:
            continue
        b, a = r["before"], r["after"]
        print(
            f"| {name} | {b['wall_s']:.1f} / {a['wall_s']:.1f} | {r['wall_ratio']:.2f} | {b['peak_rss_gb']:.2f} / {a['peak_rss_gb']:.2f} "
            f"| {r['rss_ratio']:.2f} | {b['cpu_s']:.1f} / {a['cpu_s']:.1f} |"
        )


if __name__ == "__main__":
    main()
