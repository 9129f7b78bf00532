"""``bnfold doctor`` and ``bnfold recalibrate``: find BN misuse, and repair the statistics from data.

The doctor and the recalibration of the matching format do the work
(:mod:`bnfold.doctor`, :mod:`bnfold.recalibration`); ONNX files never import
TensorFlow.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from bnfold.cli.common import (
    CheckpointOpt,
    DebugOpt,
    MemoryOpt,
    OutputsOpt,
    QuietOpt,
    SetOpt,
    TimeOpt,
    TrustOpt,
    check_paths,
    data_arrays,
    flags,
    names,
    out,
    run,
)
from bnfold.core.errors import UsageError
from bnfold.core.formats import check_output_format, is_onnx_path, is_saved_model_destination, output_path


def doctor_command(
    src: Annotated[Path, typer.Argument(help="Model: frozen .pb/.pbtxt, SavedModel directory, .keras, .h5, or a TF1 checkpoint.")],
    data: Annotated[
        Optional[list[str]],
        typer.Option("--data", help="x.npy (inputs in order) or NAME=x.npy: real data for the drift check (BN_STATS_DRIFT)."),
    ] = None,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write the findings as JSON here.")] = None,
    set_: SetOpt = None,
    outputs: OutputsOpt = None,
    checkpoint: CheckpointOpt = None,
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

        check_paths(src, {"--json": json_path, "--plot": plot})
        if is_onnx_path(src):
            from bnfold.doctor import onnx as doctor  # no TensorFlow for ONNX files
        else:
            from bnfold.doctor import graph as doctor  # type: ignore[no-redef]

        report = doctor.diagnose(
            src,
            data=data_arrays(data, "--data"),  # type: ignore[arg-type]
            set_flags=flags(set_),
            outputs=names(outputs),
            checkpoint=checkpoint,
            train_op=names(train_op),
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

    run(debug, body, memory_limit, time_limit)


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
    checkpoint: CheckpointOpt = None,
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
            data_arrays(data, "--data"),
            outputs=names(outputs),
            set_flags=flags(set_),
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

    run(debug, body)
