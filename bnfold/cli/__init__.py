"""``bnfold IN OUT``: the command line.

Every user error is one line on stderr and a documented exit code (README:
"Exit codes"); ``--debug`` shows the traceback instead. The commands live in
:mod:`bnfold.cli.fold` (fold, inspect) and :mod:`bnfold.cli.doctor` (doctor,
recalibrate); what they share is :mod:`bnfold.cli.common`.
"""


from __future__ import annotations

import logging
import os
import sys
from typing import Annotated

import typer

from bnfold.cli.common import err, one_line, out  # noqa: F401  (one_line: the tests' one-line check)
from bnfold.cli.doctor import doctor_command, recalibrate_command
from bnfold.cli.fold import fold_command, inspect_command

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Fold batch normalization into conv/dense layers of frozen TensorFlow graphs."
)
app.command("fold")(fold_command)
app.command("doctor")(doctor_command)
app.command("recalibrate")(recalibrate_command)
app.command("inspect")(inspect_command)
COMMANDS = {"fold", "inspect", "doctor", "recalibrate", "--help", "-h", "--version", "-V"}


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
