"""Show a fold to people (rich tables) and to scripts (JSON).

Both views come from the same :class:`~bnfold.api.FoldResult`, so the table and
``--report`` never disagree.
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bnfold.core.files import atomic_write
from bnfold.core.result import FoldResult

# Ops that carry BN work at inference, counted before and after.
BN_OPS = ("FusedBatchNorm", "FusedBatchNormV2", "FusedBatchNormV3", "BatchNormWithGlobalNormalization", "Rsqrt")


def sites_table(result: FoldResult) -> Table:
    table = Table(title=f"BN sites in {result.source}", show_lines=False)
    for column in ("site", "form", "action", "folded into / reason"):
        table.add_column(column, overflow="fold")
    style = {"folded": "green", "standalone": "yellow", "skipped": "red"}
    for site in result.sites:
        detail = site.folded_into or site.reason or ""
        if site.action == "folded" and site.reason:
            detail += f" ({site.reason})"
        table.add_row(site.name, site.form, f"[{style[site.action]}]{site.action}[/]", detail)
    return table


def ops_table(result: FoldResult) -> Table:
    table = Table(title="op counts")
    for column in ("op", "before", "after"):
        table.add_column(column, justify="right" if column != "op" else "left")
    changed = sorted(k for k in set(result.ops_before) | set(result.ops_after) if result.ops_before.get(k, 0) != result.ops_after.get(k, 0))
    for op in changed:
        table.add_row(op, str(result.ops_before.get(op, 0)), str(result.ops_after.get(op, 0)))
    table.add_row("[bold]all nodes[/]", str(sum(result.ops_before.values())), str(sum(result.ops_after.values())))
    return table


def verification_table(result: FoldResult) -> Table | None:
    check = result.verification
    if check is None:
        return None
    table = Table(title=f"verification ({check.samples} batch(es); inputs: {'; '.join(f'{k}: {v}' for k, v in check.inputs.items())})")
    for column in ("output", "max abs err", "max rel err", "tolerance (abs)", "result"):
        table.add_column(column)
    for out in check.outputs:
        tolerance = f"{out.tolerance:.3g}"  # atol + rtol * max|a| (the formula and its terms are in --report's JSON)
        verdict = "[green]pass[/]" if out.passed else "[red]FAIL[/]"
        table.add_row(out.name, f"{out.max_abs_error:.3g}", f"{out.max_rel_error:.3g}", tolerance, verdict)
    if check.batch_independent is not None:
        verdict = "[green]pass[/]" if check.batch_independent else "[red]FAIL[/]"
        table.add_row("batch independence", f"{check.batch_error:.3g}", "", "same as outputs", verdict)
    return table


def print_result(result: FoldResult, console: Console) -> None:
    for switch in result.switches:
        console.print(
            f"training switch {switch.flag} = {str(switch.value).lower()} ({switch.how}): kept one branch of {len(switch.nodes)} conditional(s)"
        )
    for rewrite in result.training_bn:
        console.print(f"training-mode BN {rewrite.node}: {rewrite.detail}")
    console.print(sites_table(result))
    others = getattr(result, "other_normalizations", [])
    if others:
        console.print(f"other normalizations (not BN, nothing to fold): {len(others)} ({', '.join(s.name for s in others[:3])}{', ...' if len(others) > 3 else ''})")
    console.print(ops_table(result))
    if result.unchanged or (result.onnx is not None and result.onnx.unchanged):
        console.print("nothing to fold: the model is written unchanged (nothing changed, so no check is needed)")
    table = verification_table(result)
    if table is not None:
        console.print(table)
        for note in result.verification.notes if result.verification else []:
            console.print(f"note: {note}")
    console.print(
        f"{result.count('folded')} folded, {result.count('standalone')} standalone, {result.count('skipped')} skipped; "
        f"nodes {sum(result.ops_before.values())} -> {sum(result.ops_after.values())}"
    )


def write_json(result: FoldResult, path: Path) -> None:
    text = json.dumps(result.to_json(), indent=2, default=float)
    atomic_write(path, lambda tmp: tmp.write_text(text + "\n"))
