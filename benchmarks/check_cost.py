"""What the equivalence check costs: `bnfold IN OUT` against `bnfold IN OUT --no-verify`, wall time and peak RSS.

    python benchmarks/check_cost.py                      # ResNet50 and MobileNetV2, 5 repeats
    python benchmarks/check_cost.py --repeats 7 --models ResNet50
    python benchmarks/check_cost.py --tree before=/tmp/before --tree after=.   # two code trees side by side

Each repeat runs every (tree, mode) once, in an order that rotates from one
repeat to the next, so that load from other jobs on a shared machine falls on
all of them alike; the figures are medians over the repeats, and the ratio is
the median of the per-repeat ratios (check over --no-verify of the same tree in
the same repeat). CPU seconds (user + system of bnfold and its worker) show the
work the check adds, which other jobs on the machine do not change as much as
the wall time. Peak RSS is the largest process of the run (bnfold or its
check worker): ``wait4``'s ``ru_maxrss`` covers the waited-for children too,
as GNU time's does. The load average is recorded before and after. Writes
``check_cost.json`` beside this script; no figure here is a test.

The models are keras.applications ResNet50 and MobileNetV2 frozen from Keras
(``run.frozen``, cached in ``benchmarks/_work``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def run_once(tree: Path, model: Path, verify: bool) -> tuple[float, float, float]:
    """Wall seconds, peak RSS (GB, largest process) and CPU seconds (user + system, the worker included) of
    one `bnfold MODEL OUT -q` in a fresh interpreter."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(tree))
    with tempfile.TemporaryDirectory() as tmp:
        args = [sys.executable, "-m", "bnfold", str(model), str(Path(tmp) / "out.pb"), "-q"]
        if not verify:
            args.append("--no-verify")
        start = time.perf_counter()
        proc = subprocess.Popen(args, env=env, cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        err = proc.stderr.read().decode() if proc.stderr else ""
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(args)} (tree {tree}): exit {proc.returncode}: {err.strip()}")
    return wall, usage.ru_maxrss / 1e6, usage.ru_utime + usage.ru_stime  # KB -> GB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--models", default="ResNet50,MobileNetV2")
    parser.add_argument("--tree", action="append", default=[], help="LABEL=PATH of a bnfold source tree (default: this one)")
    parser.add_argument("--out", type=Path, default=HERE / "check_cost.json")
    args = parser.parse_args()
    trees = {label: Path(path).resolve() for label, _, path in (t.partition("=") for t in args.tree)} or {"current": ROOT}
    sys.path.insert(0, str(HERE))
    import run as bench  # noqa: E402  (benchmarks/run.py: the cached frozen models)

    models = {name: bench.frozen(name)[0] for name in args.models.split(",")}
    cells = [(label, verify) for label in trees for verify in (False, True)]
    load_before = [round(v, 2) for v in os.getloadavg()]
    samples: dict[str, dict[str, list[tuple[float, float, float]]]] = {}
    for name, model in models.items():
        run_once(next(iter(trees.values())), model, False)  # warm the page cache and the import caches
        per = samples.setdefault(name, {})
        for repeat in range(args.repeats):
            order = cells[repeat % len(cells) :] + cells[: repeat % len(cells)]
            for label, verify in order:
                wall, rss, cpu = run_once(trees[label], model, verify)
                per.setdefault(f"{label}/{'check' if verify else 'no-verify'}", []).append((wall, rss, cpu))
                print(f"{name} {label} {'check' if verify else 'no-verify'}: {wall:.2f} s, {rss:.2f} GB, {cpu:.2f} s CPU", flush=True)
    results = {}
    for name, per in samples.items():
        for label in trees:
            plain, checked = per[f"{label}/no-verify"], per[f"{label}/check"]
            results[f"{name}/{label}"] = {
                "no_verify_s": statistics.median(w for w, _, _ in plain),
                "check_s": statistics.median(w for w, _, _ in checked),
                "ratio": statistics.median(c[0] / p[0] for p, c in zip(plain, checked, strict=True)),
                "no_verify_cpu_s": statistics.median(c for _, _, c in plain),
                "check_cpu_s": statistics.median(c for _, _, c in checked),
                "cpu_ratio": statistics.median(c[2] / p[2] for p, c in zip(plain, checked, strict=True)),
                "no_verify_peak_rss_gb": statistics.median(r for _, r, _ in plain),
                "check_peak_rss_gb": statistics.median(r for _, r, _ in checked),
                "walls_no_verify": [round(w, 2) for w, _, _ in plain],
                "walls_check": [round(w, 2) for w, _, _ in checked],
            }
    meta = {
        "repeats": args.repeats,
        "trees": {k: str(v) for k, v in trees.items()},
        "cpus": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": [round(v, 2) for v in os.getloadavg()],
    }
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    print(f"\nmedians of {args.repeats} repeats; load average {meta['load_average_before']} before, {meta['load_average_after']} after")
    print("| model / tree | wall --no-verify | wall with the check | ratio | CPU --no-verify | CPU with the check | CPU ratio "
          "| peak RSS --no-verify | peak RSS with the check |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for key, r in results.items():
        print(
            f"| {key} | {r['no_verify_s']:.2f} s | {r['check_s']:.2f} s | {r['ratio']:.2f}x "
            f"| {r['no_verify_cpu_s']:.2f} s | {r['check_cpu_s']:.2f} s | {r['cpu_ratio']:.2f}x "
            f"| {r['no_verify_peak_rss_gb']:.2f} GB | {r['check_peak_rss_gb']:.2f} GB |"
        )


if __name__ == "__main__":
    main()
