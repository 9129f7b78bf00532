"""``bnfold IN OUT``: the command line.

Every user error is one line on stderr and a documented exit code (README:
"Exit codes"); ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from bnfold.core.errors import EXIT_INTERNAL, BnfoldError, UsageError, VerificationError

if TYPE_CHECKING:
    from bnfold.core.comparison import CheckArgs

from bnfold.core.formats import KERAS, ONNX, check_output_format, is_onnx_path, is_saved_model_destination, output_path, route

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Fold batch normalization into conv/dense layers of frozen TensorFlow graphs."
)
COMMANDS = {"fold", "inspect", "doctor", "recalibrate", "--help", "-h", "--version", "-V"}
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
        help="Trust the file: load Keras code (Lambda layers) and run graphs that read/write files or use resources (README: Security).",
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
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", help="NAME=true|false: the value of a training flag; conditionals on it keep only that branch."),
]


def _names(text: str | None) -> list[str] | None:
    return [n.strip() for n in text.split(",") if n.strip()] if text else None


def _pairs(values: list[str] | None, option: str) -> dict[str, str]:
    pairs = {}
    for value in values or []:
        name, sep, rest = value.rpartition("=")
        if not sep or not name or not rest:
            raise UsageError(f"{option}: expected NAME=VALUE, got {value!r}")
        pairs[name] = rest
    return pairs


def _flags(values: list[str] | None) -> dict[str, bool]:
    """``--set is_training=false`` -> ``{"is_training": False}``."""
    flags = {}
    for name, text in _pairs(values, "--set").items():
        low = text.strip().lower()
        if low not in ("true", "false", "1", "0"):
            raise UsageError(f"--set: {name}={text!r}: the value must be true or false")
        flags[name] = low in ("true", "1")
    return flags


def _data_arrays(values: list[str] | None, option: str) -> dict[str, Any] | list[Any] | None:
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


def _limits(memory: str | None, time: float | None) -> None:
    """``--memory-limit`` / ``--time-limit``: for every worker started from now on (bnfold.core.sandbox)."""
    from bnfold.core import sandbox

    size = None
    if memory is not None:
        try:
            size = sandbox.parse_size(memory)
        except ValueError:
            raise UsageError(f"--memory-limit: {memory!r}: give a size like 8G, 512M or 2.5GiB") from None
    sandbox.configure(size, time)


def _check_paths(src: Path, outputs: dict[str, Path | None]) -> None:
    """Before any work: IN is a file or a directory (exit 3), and no output is IN or inside it (exit 5)."""
    from bnfold.core import files

    files.check_input_kind(src)
    for option, path in outputs.items():
        files.check_not_input(src, path, option)


def one_line(text: str) -> str:
    """A message as one line: control characters (a newline in a file name) shown escaped, as Python writes them."""
    return "".join(c if c.isprintable() or c == " " else c.encode("unicode_escape").decode("ascii") for c in text)


def _shapes(values: list[str] | None) -> dict[str, list[int]]:
    shapes = {}
    for name, dims in _pairs(values, "--input-shape").items():
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
    """One stderr line listing the nodes bnfold would not run (README "Security"); they were passed through untouched."""
    foreign = getattr(result, "foreign_ops", [])
    if foreign and not quiet:
        shown = ", ".join(f"{f['node']} ({f['op']})" for f in foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        err.print(
            f"[yellow]warning:[/] {len(foreign)} node(s) that reach outside the graph passed through untouched: {shown}",
            highlight=False,
            soft_wrap=True,
        )


def _run(debug: bool, body) -> None:  # type: ignore[no-untyped-def]
    """Turn bnfold errors into one line and an exit code; internal errors into exit 70."""
    try:
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


@app.command("fold")
def fold_command(
    # readable=False: bnfold's own one-line "permission denied" (exit 3), not typer's usage box (exit 2)
    src: Annotated[Path, typer.Argument(readable=False, help="Model: frozen .pb/.pbtxt, SavedModel directory, .keras, .h5 or .onnx.")],
    dst: Annotated[
        Optional[Path],
        typer.Argument(
            parser=output_path, help="Output: .pb, .pbtxt, .onnx, or a SavedModel directory (a name without suffix, or ending in /)."
        ),
    ] = None,
    inputs: InputsOpt = None,
    outputs: OutputsOpt = None,
    report: ReportOpt = None,
    signature: Annotated[
        Optional[str], typer.Option("--signature", help="SavedModel signature to fold (default serving_default); graph output only.")
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Fold and report, write no model.")] = False,
    no_verify: Annotated[bool, typer.Option("--no-verify", help="Skip the equivalence check.")] = False,
    rtol: Annotated[Optional[float], typer.Option(help="Relative tolerance (default per dtype).")] = None,
    atol: Annotated[Optional[float], typer.Option(help="Absolute tolerance (default per dtype).")] = None,
    input_shape: Annotated[Optional[list[str]], typer.Option("--input-shape", help="NAME=D0,D1,... for inputs with unknown dims.")] = None,
    feed: Annotated[
        Optional[list[str]], typer.Option("--feed", help="NAME=x.npy | true | false | number; NAME may be an internal tensor.")
    ] = None,
    samples: Annotated[int, typer.Option(min=1, help="Batches to compare.")] = 1,
    seed: Annotated[int, typer.Option(help="Seed of the random inputs.")] = 0,
    force: Annotated[bool, typer.Option("--force", help="Write even if verification fails.")] = False,
    in_place: Annotated[bool, typer.Option("--in-place", help="Allow OUT to be IN (still atomic).")] = False,
    set_: SetOpt = None,
    training_bn: Annotated[
        str,
        typer.Option(
            "--training-bn",
            help="is_training=True fused BN: 'keep' (skip, default) or 'moving-stats' (rewrite to inference mode on the moving averages).",
        ),
    ] = "keep",
    opset: Annotated[
        Optional[int], typer.Option("--opset", help="ONNX opset for .onnx output (default 17; tf2onnx converts 9-18).")
    ] = None,
    standalone_affine: Annotated[
        bool,
        typer.Option("--standalone-affine", help="Keras output: a BN with nothing to fold into becomes a fixed per-channel scale-and-shift layer."),
    ] = False,
    recalibrate: Annotated[
        Optional[list[str]],
        typer.Option("--recalibrate", help="x.npy or NAME=x.npy: recompute the BN statistics from this data first, then fold (README: Fix it)."),
    ] = None,
    quiet: QuietOpt = False,
    trust_model: TrustOpt = False,
    memory_limit: MemoryOpt = None,
    time_limit: TimeOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Fold BN in SRC and write DST (.pb, .pbtxt, or .onnx: converted with tf2onnx and checked in onnxruntime)."""

    def body() -> None:
        # No TensorFlow import here: an ONNX-only run (bnfold a.onnx b.onnx) never needs it.
        from bnfold.core import files
        from bnfold.core import report as rep
        from bnfold.core.comparison import parse_feed_value

        _limits(memory_limit, time_limit)
        # OUT that is IN itself is check_output_path's (--in-place allows it); OUT inside a SavedModel IN never is.
        same = dst is not None and os.path.exists(dst) and os.path.exists(src) and os.path.samefile(src, dst)
        _check_paths(src, {"--report": report, "OUT": None if dry_run or same else dst})
        if dst is None and not dry_run:
            raise UsageError("give an output path, or --dry-run to only report")
        if dst is not None and not dry_run:
            check_output_format(dst)
            files.check_output_path(src, dst, in_place, directory=is_saved_model_destination(dst))
        feeds = {name: parse_feed_value(value) for name, value in _pairs(feed, "--feed").items()}
        pipeline = route(src, dst)
        check: CheckArgs = {
            "verify_outputs": not no_verify, "feeds": feeds, "input_shapes": _shapes(input_shape), "rtol": rtol, "atol": atol,
            "samples": samples, "seed": seed, "force": force,
        }  # fmt: skip
        if pipeline == KERAS:
            assert dst is not None
            keras_output(src, dst, dry_run, in_place, standalone_affine, trust_model, report, quiet,
                         [inputs, outputs, set_, opset, training_bn != "keep", recalibrate], check)  # fmt: skip
            return
        if standalone_affine:
            raise UsageError("--standalone-affine applies to Keras output; give an output path ending in .keras or .h5")
        source: Any = src
        out_names = _names(outputs)
        if recalibrate and is_onnx_path(src):
            # ONNX in: recalibrated in onnxruntime (no TensorFlow), then the ModelProto is folded and checked against it
            from bnfold.core import recalibration as rcc
            from bnfold.recalibration.onnx import recalibrate_onnx

            if dst is not None and not is_onnx_path(dst):
                raise UsageError(f"{dst}: ONNX input is written as ONNX; give an output path ending in .onnx")
            if set_ or training_bn != "keep":
                raise UsageError("--set/--training-bn: an ONNX model has no TensorFlow training switch or training-mode BN to resolve")
            source, onnx_recalibrated = recalibrate_onnx(src, _data_arrays(recalibrate, "--recalibrate"), trust_model=trust_model)
            if not quiet:
                rcc.print_report(onnx_recalibrated, out)
        elif recalibrate:
            from bnfold import recalibration as rc
            from bnfold.core import recalibration as rcc

            recalibrated = rc.recalibrate(
                src, _data_arrays(recalibrate, "--recalibrate"), outputs=out_names, set_flags=_flags(set_), trust_model=trust_model
            )
            if not quiet:
                rcc.print_report(recalibrated, out)
            source, out_names = recalibrated.graph_def, recalibrated.outputs
            check["feeds"] = {**recalibrated.flag_feeds, **feeds}  # the check feeds resolved flags the value they were resolved to
        switch_options: dict[str, Any] = {}
        if set_ and not recalibrate:  # recalibration resolved them already
            switch_options["set_flags"] = _flags(set_)
        if training_bn != "keep":
            switch_options["training_bn"] = training_bn
        if switch_options and is_onnx_path(src):
            raise UsageError("--set/--training-bn: an ONNX model has no TensorFlow training switch or training-mode BN to resolve")
        onnx_mode = pipeline == ONNX
        if onnx_mode:  # not for a TF-only run: importing onnx costs its memory (#16)
            from bnfold.onnx import export as onnx_export
            from bnfold.onnx import io as onnx_io
            from bnfold.onnx.pipeline import plan_output
        if is_onnx_path(src) and dst is not None and not is_onnx_path(dst):
            raise UsageError(f"{dst}: ONNX input is written as ONNX; give an output path ending in .onnx")
        if opset is not None and not onnx_mode:
            raise UsageError("--opset applies to ONNX output; give an output path ending in .onnx")
        if signature is not None and onnx_mode:
            raise UsageError("--signature: not supported with ONNX input or output; fold the SavedModel to .pb first, then convert")
        source_options: dict[str, Any] = {} if onnx_mode or recalibrate else {"signature": signature or "serving_default"}
        if no_verify and not onnx_mode and not recalibrate and (dst is None or dry_run or dst.suffix.lower() == ".pb"):
            source_options["stream_constants"] = True  # weights stay in the file until written (bnfold.tf.streaming)
        model = None
        try:
            with verification_progress(quiet) as on_batch:
                from bnfold import api

                check["on_batch"] = on_batch
                if onnx_mode:
                    model, result = api.to_onnx(
                        source, _names(inputs), out_names, opset=opset, trust_model=trust_model, **switch_options, **check
                    )
                else:
                    result = api.fold(source, _names(inputs), out_names, trust_model=trust_model, **switch_options, **source_options, **check)
        except VerificationError as exc:
            if exc.result is not None and not quiet:
                rep.print_result(exc.result, out)  # type: ignore[arg-type]
                if onnx_mode:
                    onnx_export.print_stage(exc.result, out)
            if report is not None and exc.result is not None:
                rep.write_json(exc.result, report)  # type: ignore[arg-type]
            if dry_run:
                raise VerificationError(f"{exc} (--dry-run: no model is written either way)") from None
            hint = "--force writes anyway" if exc.result is not None else "--no-verify writes without the check"
            raise VerificationError(f"{exc}; nothing written ({hint})") from None
        external = dst is not None and not dry_run and model is not None and plan_output(result, model, dst)
        if not quiet:
            rep.print_result(result, out)
            if onnx_mode:
                onnx_export.print_stage(result, out)
        warn_foreign_ops(result, quiet)
        if report is not None:
            rep.write_json(result, report)
        if result.verification is not None and not result.verification.passed:
            if not quiet:
                err.print("[yellow]warning:[/] verification failed; writing anyway because of --force")
        if dst is not None and not dry_run and model is not None:
            data_file = onnx_io.write_onnx(model, dst, bool(external))
            if not quiet:
                out.print(f"wrote {dst}" + (f" (tensors in {data_file})" if data_file else ""))
        elif dst is not None and not dry_run:
            from bnfold import api

            api.write_result(result, dst)
            if not quiet:
                out.print(f"wrote {dst}")
        if result.contents is not None:
            result.contents.close()

    _run(debug, body)


def keras_output(src: Path, dst: Path, dry_run: bool, in_place: bool, standalone_affine: bool, trust_model: bool,
                 report: Path | None, quiet: bool, graph_only: list[object], check: CheckArgs) -> None:  # fmt: skip
    """``bnfold model.keras folded.keras``: the layer-level fold (bnfold.keras.fold), report as for graphs."""
    from bnfold.core import report as rep
    from bnfold.keras import file as keras_fold

    if any(graph_only):
        raise UsageError(
            "--inputs/--outputs/--set/--training-bn/--opset/--recalibrate apply to graph output; Keras output (.keras/.h5) takes none of them"
        )
    try:
        with verification_progress(quiet) as on_batch:
            _, result = keras_fold.fold_keras_file(
                src, dst, in_place=in_place, dry_run=dry_run, trust_model=trust_model, standalone_affine=standalone_affine,
                **check, on_batch=on_batch,
            )  # fmt: skip
    except VerificationError as exc:
        if isinstance(exc.result, keras_fold.FoldResult):
            if not quiet:
                rep.print_result(exc.result, out)
            if report is not None:
                rep.write_json(exc.result, report)
            hint = "--dry-run: no model is written either way" if dry_run else "--force writes anyway"
            raise VerificationError(f"{exc}; nothing written ({hint})") from None
        raise
    if not quiet:
        rep.print_result(result, out)
    if report is not None:
        rep.write_json(result, report)
    if result.verification is not None and not result.verification.passed and not quiet:
        err.print("[yellow]warning:[/] verification failed; written anyway because of --force")
    if not dry_run and not quiet:
        out.print(f"wrote {dst}")


@app.command("doctor")
def doctor_command(
    src: Annotated[Path, typer.Argument(help="Model: frozen .pb/.pbtxt, SavedModel directory, .keras, .h5, or a TF1 checkpoint.")],
    data: Annotated[
        Optional[list[str]],
        typer.Option("--data", help="x.npy (inputs in order) or NAME=x.npy: real data for the drift check (BN_STATS_DRIFT)."),
    ] = None,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write the findings as JSON here.")] = None,
    set_: SetOpt = None,
    outputs: OutputsOpt = None,
    checkpoint: Annotated[
        Optional[Path], typer.Option("--checkpoint", help="With a .meta training graph: the checkpoint prefix (model.ckpt-1000).")
    ] = None,
    train_op: Annotated[
        Optional[str], typer.Option("--train-op", help="TF1 checkpoint: the train op (default: the train_op collection or the optimizer).")
    ] = None,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="With --data: draw the drift per BN layer to this PNG (needs matplotlib).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only errors; the exit code and --json carry the findings.")] = False,
    trust_model: TrustOpt = False,
    memory_limit: MemoryOpt = None,
    time_limit: TimeOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Find BN misuse that makes inference differ from training; exit 1 when anything is at warning level or above.

    SRC may also be a TF 1.x checkpoint prefix with its .meta beside it, or a .meta with --checkpoint.
    """

    def body() -> None:
        from bnfold.core.formats import is_onnx_path

        _limits(memory_limit, time_limit)
        _check_paths(src, {"--json": json_path, "--plot": plot})
        if is_onnx_path(src):
            from bnfold.doctor import onnx as doctor  # no TensorFlow for ONNX files
        else:
            from bnfold.doctor import graph as doctor  # type: ignore[no-redef]

        report = doctor.diagnose(
            src,
            data=_data_arrays(data, "--data"),  # type: ignore[arg-type]
            set_flags=_flags(set_),
            outputs=_names(outputs),
            checkpoint=checkpoint,
            train_op=_names(train_op),
            trust_model=trust_model,
        )
        if plot is not None and not report.drift:
            raise UsageError("--plot: needs --data (the drift per BN layer is measured on your data)")
        if not quiet:
            doctor.print_report(report, out)
        if json_path is not None:
            doctor.write_json(report, json_path)
        if plot is not None:
            doctor.write_plot(report.drift, plot)
        raise typer.Exit(report.exit_code)

    _run(debug, body)


@app.command("recalibrate")
def recalibrate_command(
    src: Annotated[
        Path, typer.Argument(readable=False, help="Model: frozen .pb/.pbtxt, SavedModel, .keras, .h5, .onnx, or a TF1 checkpoint with --outputs.")
    ],
    dst: Annotated[
        Path,
        typer.Argument(parser=output_path, help="Output: .pb, .pbtxt, .onnx, a SavedModel directory, or .keras/.h5 for Keras input."),
    ],
    data: Annotated[
        Optional[list[str]],
        typer.Option("--data", help="x.npy (inputs in order) or NAME=x.npy: calibration samples along axis 0 (a few hundred)."),
    ] = None,
    outputs: OutputsOpt = None,
    set_: SetOpt = None,
    checkpoint: Annotated[
        Optional[Path], typer.Option("--checkpoint", help="With a .meta training graph: the checkpoint prefix (model.ckpt-1000).")
    ] = None,
    memory_budget: Annotated[
        int, typer.Option("--memory-budget", min=1, help="MiB for one batch's inputs plus every BN input it produces (default 1024).")
    ] = 1024,
    opset: Annotated[Optional[int], typer.Option("--opset", help="ONNX opset for .onnx output from a TF model (default 17).")] = None,
    report: Annotated[Optional[Path], typer.Option("--report", "--json", help="Write the per-BN records as JSON here.")] = None,
    in_place: Annotated[bool, typer.Option("--in-place", help="Allow OUT to be IN (still atomic).")] = False,
    quiet: QuietOpt = False,
    trust_model: TrustOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Recompute every BN's moving mean/variance from calibration data (inference mode, upstream BNs first) and write DST."""

    def body() -> None:
        from bnfold.core import files
        from bnfold.core import recalibration as rc

        if not data:
            raise UsageError("recalibrate needs --data x.npy (a few hundred samples of the training data, along axis 0)")
        check_output_format(dst)
        files.check_output_path(src, dst, in_place, directory=is_saved_model_destination(dst))
        if is_onnx_path(src):
            from bnfold.recalibration.onnx import recalibrate_onnx_file as recalibrate_file  # no TensorFlow for ONNX files
        else:
            from bnfold.recalibration import recalibrate_file  # type: ignore[assignment]
        options: dict[str, Any] = {"opset": opset} if opset is not None else {}
        result = recalibrate_file(
            src,
            dst,
            _data_arrays(data, "--data"),
            outputs=_names(outputs),
            set_flags=_flags(set_),
            checkpoint=checkpoint,
            memory_budget=memory_budget * 2**20,
            trust_model=trust_model,
            **options,
        )
        if not quiet:
            rc.print_report(result, out)
        if report is not None:
            rc.write_json(result, report)
        if not quiet:
            out.print(f"wrote {dst}")

    _run(debug, body)


@app.command("inspect")
def inspect_command(
    src: Annotated[Path, typer.Argument(help="Model: frozen .pb/.pbtxt, SavedModel directory, .keras or .h5.")],
    inputs: InputsOpt = None,
    outputs: OutputsOpt = None,
    report: ReportOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only errors (with --report: only the JSON).")] = False,
    trust_model: TrustOpt = False,
    memory_limit: MemoryOpt = None,
    time_limit: TimeOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Report what would be folded, and why anything would not; write nothing."""

    def body() -> None:
        from bnfold.core import report as rep
        from bnfold.core.formats import is_onnx_path

        _limits(memory_limit, time_limit)
        _check_paths(src, {"--report": report})
        if is_onnx_path(src):
            from bnfold.core.trust import trusting
            from bnfold.onnx.pipeline import fold_onnx  # no TensorFlow for ONNX files

            with trusting(trust_model):
                result = fold_onnx(src, _names(inputs), _names(outputs), verify_outputs=False)[1]
        else:
            from bnfold import api

            result = api.fold(src, _names(inputs), _names(outputs), verify_outputs=False, trust_model=trust_model)
        if not quiet:
            rep.print_result(result, out)
        warn_foreign_ops(result, quiet)
        if report is not None:
            rep.write_json(result, report)

    _run(debug, body)


def _version_text() -> str:
    """bnfold's version and the converters it runs, read from package metadata (no TensorFlow import)."""
    from importlib import metadata

    from bnfold import __version__

    parts = []
    for package in ("tensorflow", "tf2onnx", "onnx", "onnxruntime"):
        try:
            parts.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            parts.append(f"{package} not installed")
    from bnfold.core import sandbox

    return f"bnfold {__version__} ({', '.join(parts)}; Python {sys.version.split()[0]})\n{sandbox.status()}"


def _show_version(value: bool) -> None:
    if value:
        out.print(_version_text(), highlight=False, soft_wrap=True)
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool, typer.Option("--version", "-V", callback=_show_version, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    """Fold batch normalization into conv/dense layers of frozen TensorFlow graphs."""


def _silence_native_logs() -> None:
    """Send TensorFlow's C++ log lines (fd 2) to /dev/null; Python's stderr keeps the terminal.

    TF 2.21 logs through absl before ``TF_CPP_MIN_LOG_LEVEL`` is read, which
    would bury bnfold's one-line errors. ``--debug`` keeps everything.
    """
    try:
        saved = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        return
    sys.stderr.flush()
    os.dup2(devnull, 2)
    os.close(devnull)
    sys.stderr = os.fdopen(saved, "w", buffering=1)


def _foreign_output_to_debug(debug: bool) -> None:
    """Python warnings and log records of the libraries bnfold drives are shown with ``--debug`` only.

    They are not bnfold's output: Keras warns about ``input_shape`` on every Keras 2
    ``.h5`` it loads, tf_keras that HDF5 is legacy, TensorFlow that compiled metrics
    are not built, tf2onnx logs each pass. None asks the user to act; whatever goes
    wrong reaches the user as bnfold's own one-line error and exit code. Without
    ``--debug``, warnings become log records and every record below CRITICAL is
    dropped; with it, both are printed on stderr as Python prints them.
    """
    if not debug:
        logging.captureWarnings(True)
        logging.disable(logging.ERROR)
    else:  # the libraries run in the worker now: what they printed there is shown too
        from bnfold.core import worker as isolation

        isolation.echo_logs = True


def main() -> None:
    """Console entry point: ``bnfold IN OUT`` means ``bnfold fold IN OUT``."""
    argv = sys.argv[1:]
    # Before TensorFlow is imported (here and in any child process that inherits the environment):
    # its C++ start-up lines are not bnfold's output. A value the user set is kept.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "--debug" not in argv:
        _silence_native_logs()
    _foreign_output_to_debug("--debug" in argv)
    if argv and argv[0] not in COMMANDS:
        argv = ["fold", *argv]
    if _runs_a_tf_graph(argv):
        from bnfold.core import worker as isolation

        isolation.prefer_fork()  # the check's worker is forked once this process has TensorFlow: no second import
    app(args=argv, prog_name="bnfold")


def _runs_a_tf_graph(argv: list[str]) -> bool:
    """Whether this command will run a TensorFlow graph in a worker: a fold with the check from a
    TF model to a TF or ONNX file, a Keras-to-Keras fold, or ``doctor --data``. A guess from the words only; a wrong one
    costs a process start or the overlap, never a result."""
    if not argv or any(a in ("--help", "-h", "--version", "-V") for a in argv):
        return False
    paths = [a.lower().rstrip("/") for a in argv[1:] if not a.startswith("-")]
    if argv[0] == "doctor":
        return "--data" in argv and not (paths and paths[0].endswith(".onnx"))
    if argv[0] == "recalibrate" or "--recalibrate" in argv:
        return not (paths and paths[0].endswith(".onnx"))
    if argv[0] == "fold" and len(paths) >= 2 and paths[1].endswith((".keras", ".h5", ".hdf5")):
        return True  # the Keras-to-Keras fold: load, fold, check and save in a TensorFlow worker
    if argv[0] != "fold" or "--no-verify" in argv or len(paths) < 2:
        return False
    return not paths[0].endswith(".onnx") and not paths[1].endswith((".keras", ".h5"))


if __name__ == "__main__":
    main()
