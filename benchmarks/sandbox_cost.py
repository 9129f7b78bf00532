"""What confinement costs (issue #22): `bnfold` on ResNet50 with this tree against a tree without the sandbox.

    python benchmarks/sandbox_cost.py --before /path/to/tree/without/sandbox    # e.g. a checkout of main
    python benchmarks/sandbox_cost.py --before /work/main --repeats 1

Three runs per tree, each in a fresh interpreter (``check_cost.run_once``: wall
seconds, peak RSS of the largest process, CPU seconds of bnfold and its worker):

- ``pb check``: ``bnfold ResNet50.pb out.pb`` -- the check's worker is confined
  (Landlock, rlimits) and each run request waits under a deadline;
- ``savedmodel check``: ``bnfold ResNet50_sm out.pb`` -- with the sandbox the
  SavedModel is loaded and frozen in the confined worker and the GraphDef comes
  back over the pipe; before, it was loaded in bnfold's own process;
- ``savedmodel --no-verify``: the same, without the check: the worker starts for
  the load alone.

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
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from check_cost import run_once  # noqa: E402


def models() -> dict[str, Path]:
    import run  # benchmarks/run.py: the cached ResNet50 with randomized BN statistics

    pb, _ = run.frozen("ResNet50")
    saved = run.WORK / "ResNet50_sm"
    if not (saved / "saved_model.pb").exists():
        model = run.randomized("ResNet50", 224)
        model.export(str(saved), verbose=False)
    return {"pb": pb, "savedmodel": saved}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, required=True, help="a bnfold tree without the sandbox (e.g. a checkout of main)")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    paths = models()
    cases = [("pb check", paths["pb"], True), ("savedmodel check", paths["savedmodel"], True), ("savedmodel --no-verify", paths["savedmodel"], False)]
    trees = {"before": args.before.resolve(), "after": ROOT}
    load_before = os.getloadavg()
    runs: dict[str, dict[str, list[tuple[float, float, float]]]] = {c[0]: {t: [] for t in trees} for c in cases}
    for repeat in range(args.repeats):
        order = list(trees.items())[:: 1 if repeat % 2 == 0 else -1]  # alternate which tree runs first
        for name, model, verify in cases:
            for tree_name, tree in order:
                runs[name][tree_name].append(run_once(tree, model, verify))
                print(name, tree_name, runs[name][tree_name][-1], flush=True)
    results = {}
    for name, per_tree in runs.items():
        med = {t: [statistics.median(v[i] for v in per_tree[t]) for i in range(3)] for t in trees}
        results[name] = {
            "before": dict(zip(("wall_s", "peak_rss_gb", "cpu_s"), med["before"], strict=True)),
            "after": dict(zip(("wall_s", "peak_rss_gb", "cpu_s"), med["after"], strict=True)),
            "wall_ratio": med["after"][0] / med["before"][0],
            "rss_ratio": med["after"][1] / med["before"][1],
            "cpu_ratio": med["after"][2] / med["before"][2],
        }
    out = {
        "machine": {"cpus": os.cpu_count(), "load_before": load_before, "load_after": os.getloadavg()},
        "repeats": args.repeats,
        "before_tree": str(trees["before"]),
        "results": results,
    }
    (HERE / "sandbox_cost.json").write_text(json.dumps(out, indent=2) + "\n")
    print("| run | wall before / after (s) | ratio | peak RSS before / after (GB) | ratio | CPU before / after (s) |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        b, a = r["before"], r["after"]
        print(
            f"| {name} | {b['wall_s']:.1f} / {a['wall_s']:.1f} | {r['wall_ratio']:.2f} | {b['peak_rss_gb']:.2f} / {a['peak_rss_gb']:.2f} "
            f"| {r['rss_ratio']:.2f} | {b['cpu_s']:.1f} / {a['cpu_s']:.1f} |"
        )


if __name__ == "__main__":
    main()
