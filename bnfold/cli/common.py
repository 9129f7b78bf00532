"""What every bnfold command shares: the consoles, the option types, parsing of option values, and the
error boundary (:func:`run`) that turns every failure into one line and a documented exit code
(README "Exit codes"), or a traceback with ``--debug``.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from bnfold.core.errors import EXIT_INTERNAL, BnfoldError, UsageError

out = Console()
err = Console(stderr=True)

InputsOpt = Annotated[Optional[str], typer.Option("--inputs", help="Comma-separated input placeholders (default: all placeholders).")]
OutputsOpt = Annotated[Optional[str], typer.Option("--outputs", help="Comma-separated output nodes (default: the graph's sinks).")]
ReportOpt = Annotated[Optional[Path], typer.Option("--report", help="Write the per-site report as JSON here.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Print only errors.")]
TrustOpt = Annotated[
    bool,
    typer.Option(
        "--trust-model",
        help="Trust the file: load Keras code (Lambda layers) and run graphs that read/write files or use resources (docs/security.md).",
    ),
]
MemoryOpt = Annotated[
    Optional[str],
    typer.Option("--memory-limit", help="Memory the worker that loads and runs the model may use, like 8G (default: 3/4 of RAM)."),
]
TimeOpt = Annotated[
    Optional[float],
    typer.Option("--time-limit", min=1, help="Seconds of wall time per load or run of the model in the worker (default 600; CPU: x cores)."),
]
CheckpointOpt = Annotated[
    Optional[Path], typer.Option("--checkpoint", help="With a .meta training graph: the checkpoint prefix (model.ckpt-1000).")
]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", help="NAME=true|false: the value of a training flag; conditionals on it keep only that branch."),
]


def names(text: str | None) -> list[str] | None:
    return [n.strip() for n in text.split(",") if n.strip()] if text else None


def pairs(values: list[str] | None, option: str) -> dict[str, str]:
    pairs = {}
    for value in values or []:
        name, sep, rest = value.rpartition("=")
        if not sep or not name or not rest:
            raise UsageError(f"{option}: expected NAME=VALUE, got {value!r}")
        pairs[name] = rest
    return pairs


def flags(values: list[str] | None) -> dict[str, bool]:
    """``--set is_training=false`` -> ``{"is_training": False}``."""
    flags = {}
    for name, text in pairs(values, "--set").items():
        low = text.strip().lower()
        if low not in ("true", "false", "1", "0"):
            raise UsageError(f"--set: {name}={text!r}: the value must be true or false")
        flags[name] = low in ("true", "1")
    return flags


def data_arrays(values: list[str] | None, option: str) -> dict[str, Any] | list[Any] | None:
    """``--data x.npy`` (inputs in order) or ``--data NAME=x.npy``: the arrays, as doctor and recalibrate take them."""
    from bnfold.core.comparison import parse_feed_value

    def load(text: str) -> Any:
        try:
            return parse_feed_value(text)
        except UsageError as exc:  # its message names --feed
            raise UsageError(str(exc).replace("--feed:", f"{option}:", 1)) from None

    named: dict[str, Any] = {}
    ordered = []
    for value in values or []:
        name, sep, path = value.rpartition("=")
        if sep and name:
            named[name] = load(path)
        else:
            ordered.append(load(value))
    if named and ordered:
        raise UsageError(f"{option}: give either NAME=x.npy for every input or plain paths in input order, not both")
    return named or ordered or None


def limits(memory: str | None, time: float | None) -> None:
    """``--memory-limit`` / ``--time-limit``: for every worker started from now on (bnfold.core.sandbox)."""
    from bnfold.core import sandbox

    size = None
    if memory is not None:
        try:
            size = sandbox.parse_size(memory)
        except ValueError:
            raise UsageError(f"--memory-limit: {memory!r}: give a size like 8G, 512M or 2.5GiB") from None
    sandbox.configure(size, time)


def check_paths(src: Path, outputs: dict[str, Path | None]) -> None:
    """Before any work: IN is a file or a directory (exit 3), and no output is IN or inside it (exit 5)."""
    from bnfold.core import files

    files.check_input_kind(src)
    for option, path in outputs.items():
        files.check_not_input(src, path, option)


def one_line(text: str) -> str:
    """A message as one line: control characters (a newline in a file name) shown escaped, as Python writes them."""
    return "".join(c if c.isprintable() or c == " " else c.encode("unicode_escape").decode("ascii") for c in text)


def shapes(values: list[str] | None) -> dict[str, list[int]]:
    shapes = {}
    for name, dims in pairs(values, "--input-shape").items():
        try:
            shapes[name] = [int(d) for d in dims.split(",")]
        except ValueError:
            raise UsageError(f"--input-shape: {name}={dims!r}: dimensions must be integers, like 1,224,224,3") from None
        if any(d < 0 for d in shapes[name]):
            raise UsageError(f"--input-shape: {name}={dims!r}: dimensions must be 0 or more (a known size for every unknown dim)")
    return shapes


@contextmanager
def verification_progress(quiet: bool) -> Iterator[Callable[[int, int], None] | None]:
    """A transient rich progress bar on stderr while both graphs run; nothing when quiet or not a terminal
    (a bar redirected to a file or pipe leaves an empty line behind)."""
    if quiet or not err.is_terminal:
        yield None
        return
    # Shown from the first batch on: its refresh thread would keep the check's worker from being forked.
    progress = Progress(TextColumn("verifying"), BarColumn(), MofNCompleteColumn(), console=err, transient=True)
    task = None

    def on_batch(done: int, total: int) -> None:
        nonlocal task
        if task is None:
            progress.start()
            task = progress.add_task("verify", total=None)
        progress.update(task, completed=done, total=total)

    try:
        yield on_batch
    finally:
        progress.stop()


def warn_foreign_ops(result: object, quiet: bool) -> None:
    """One stderr line listing the nodes bnfold would not run (docs/security.md); they were passed through untouched."""
    foreign = getattr(result, "foreign_ops", [])
    if foreign and not quiet:
        shown = ", ".join(f"{f['node']} ({f['op']})" for f in foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        err.print(
            f"[yellow]warning:[/] {len(foreign)} node(s) that reach outside the graph passed through untouched: {shown}",
            highlight=False,
            soft_wrap=True,
        )


def run(debug: bool, body: Callable[[], None], memory_limit: str | None = None, time_limit: float | None = None) -> None:
    """Run a command's ``body`` under the worker's limits (``--memory-limit``, ``--time-limit``), turning bnfold errors
    into one line and an exit code and internal errors into exit 70."""
    try:
        limits(memory_limit, time_limit)
        body()
    except BnfoldError as exc:
        if debug:
            traceback.print_exc()
        err.print(f"[red]bnfold: error:[/] {escape(one_line(str(exc)))}", highlight=False, soft_wrap=True)  # messages quote [brackets]
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        err.print("bnfold: interrupted; nothing was written")
        raise typer.Exit(130) from None
    except typer.Exit:
        raise
    except Exception as exc:  # noqa: BLE001 - the last line of defence for users
        if debug:
            traceback.print_exc()
        err.print(
            f"[red]bnfold: internal error:[/] {type(exc).__name__}: {escape(one_line(str(exc)))} (rerun with --debug for a traceback)",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(EXIT_INTERNAL) from None
