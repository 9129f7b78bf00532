"""``bnfold IN OUT`` and ``bnfold inspect``: fold (or only report) through the pipeline the paths pick.

:func:`bnfold.core.formats.route` picks the pipeline (Keras layers, ONNX, or a TF
graph), the check's options travel as one :class:`~bnfold.core.comparison.CheckArgs`
record, and the work is :mod:`bnfold.api`'s; this module only reads options and
prints the report.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from bnfold.core.errors import UsageError, VerificationError

if TYPE_CHECKING:
    from bnfold.core.comparison import CheckArgs

from bnfold.cli.common import (
    DebugOpt,
    InputsOpt,
    MemoryOpt,
    OutputsOpt,
    QuietOpt,
    ReportOpt,
    SetOpt,
    TimeOpt,
    TrustOpt,
    check_paths,
    data_arrays,
    err,
    flags,
    names,
    out,
    pairs,
    run,
    shapes,
    verification_progress,
    warn_foreign_ops,
)
from bnfold.core.formats import KERAS, ONNX, check_output_format, is_onnx_path, is_saved_model_destination, output_path, route


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
        typer.Option("--recalibrate", help="x.npy or NAME=x.npy: recompute the BN statistics from this data first, then fold (docs/recalibrate.md)."),
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

        # OUT that is IN itself is check_output_path's (--in-place allows it); OUT inside a SavedModel IN never is.
        same = dst is not None and os.path.exists(dst) and os.path.exists(src) and os.path.samefile(src, dst)
        check_paths(src, {"--report": report, "OUT": None if dry_run or same else dst})
        if dst is None and not dry_run:
            raise UsageError("give an output path, or --dry-run to only report")
        if dst is not None and not dry_run:
            check_output_format(dst)
            files.check_output_path(src, dst, in_place, directory=is_saved_model_destination(dst))
        feeds = {name: parse_feed_value(value) for name, value in pairs(feed, "--feed").items()}
        pipeline = route(src, dst)
        check: CheckArgs = {
            "verify_outputs": not no_verify, "feeds": feeds, "input_shapes": shapes(input_shape), "rtol": rtol, "atol": atol,
            "samples": samples, "seed": seed, "force": force,
        }  # fmt: skip
        if pipeline == KERAS:
            assert dst is not None
            keras_output(src, dst, dry_run, in_place, standalone_affine, trust_model, report, quiet,
                         [inputs, outputs, set_, opset, training_bn != "keep", recalibrate], check)  # fmt: skip
            return
        if standalone_affine:
            raise UsageError("--standalone-affine applies to Keras output; give an output path ending in .keras or .h5")
        if is_onnx_path(src) and dst is not None and not is_onnx_path(dst):
            raise UsageError(f"{dst}: ONNX input is written as ONNX; give an output path ending in .onnx")
        if is_onnx_path(src) and (set_ or training_bn != "keep"):
            raise UsageError("--set/--training-bn: an ONNX model has no TensorFlow training switch or training-mode BN to resolve")
        source: Any = src
        out_names = names(outputs)
        if recalibrate and is_onnx_path(src):
            # ONNX in: recalibrated in onnxruntime (no TensorFlow), then the ModelProto is folded and checked against it
            from bnfold.core import recalibration as rcc
            from bnfold.recalibration.onnx import recalibrate_onnx

            source, onnx_recalibrated = recalibrate_onnx(src, data_arrays(recalibrate, "--recalibrate"), trust_model=trust_model)
            if not quiet:
                rcc.print_report(onnx_recalibrated, out)
        elif recalibrate:
            from bnfold import recalibration as rc
            from bnfold.core import recalibration as rcc

            recalibrated = rc.recalibrate(
                src, data_arrays(recalibrate, "--recalibrate"), outputs=out_names, set_flags=flags(set_), trust_model=trust_model
            )
            if not quiet:
                rcc.print_report(recalibrated, out)
            source, out_names = recalibrated.graph_def, recalibrated.outputs
            check["feeds"] = {**recalibrated.flag_feeds, **feeds}  # the check feeds resolved flags the value they were resolved to
        switch_options: dict[str, Any] = {}
        if set_ and not recalibrate:  # recalibration resolved them already
            switch_options["set_flags"] = flags(set_)
        if training_bn != "keep":
            switch_options["training_bn"] = training_bn
        onnx_mode = pipeline == ONNX
        if onnx_mode:  # not for a TF-only run: importing onnx costs its memory (#16)
            from bnfold.onnx import export as onnx_export
            from bnfold.onnx import io as onnx_io
            from bnfold.onnx.pipeline import plan_output
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
                        source, names(inputs), out_names, opset=opset, trust_model=trust_model, **switch_options, **check
                    )
                else:
                    result = api.fold(source, names(inputs), out_names, trust_model=trust_model, **switch_options, **source_options, **check)
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

    run(debug, body, memory_limit, time_limit)


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
    run(debug, lambda: inspect(src, names(inputs), names(outputs), report, quiet, trust_model), memory_limit, time_limit)


def inspect(src: Path, inputs: list[str] | None, outputs: list[str] | None, report: Path | None, quiet: bool, trust_model: bool) -> None:
    """``bnfold inspect``: the fold without the check, its report printed and nothing written (ONNX without TensorFlow)."""
    from bnfold.core import report as rep
    from bnfold.core.formats import is_onnx_path

    check_paths(src, {"--report": report})
    if is_onnx_path(src):
        from bnfold.core.trust import trusting
        from bnfold.onnx.pipeline import fold_onnx

        with trusting(trust_model):
            result = fold_onnx(src, inputs, outputs, verify_outputs=False)[1]
    else:
        from bnfold import api

        result = api.fold(src, inputs, outputs, verify_outputs=False, trust_model=trust_model)
    if not quiet:
        rep.print_result(result, out)
    warn_foreign_ops(result, quiet)
    if report is not None:
        rep.write_json(result, report)
