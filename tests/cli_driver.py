"""Runs ``bnfold`` command lines, each in a fresh process forked from one interpreter that imported bnfold and TensorFlow once.

Why: a ``python -m bnfold`` process spends about 7 CPU seconds starting (the
interpreter, TensorFlow, Keras and whatever Keras pulls in) before it reads its
first byte, and the hostile-model suite runs about two hundred of them. Here the
start is paid once; every command still runs in a process of its own, forked
from this driver before the driver ran anything of TensorFlow's (no runtime
threads, no graph, no session), with its own working directory, environment,
stdout/stderr, memory cap (``RLIMIT_AS``) and wall-clock limit, through the same
entry point as the console script (:func:`bnfold.cli.main`). What a command does
to its process (a model's code, a leaked file descriptor, a crash) ends with it.

Protocol: one JSON request per line on stdin (``args``, ``cwd``, ``env``,
``memory_cap``, ``time_cap``), one JSON answer per line on stdout
(``returncode``, ``stdout``, ``stderr``, ``timed_out``).
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import tensorflow  # noqa: E402,F401  - imported once here, inherited by every command

import bnfold.cli  # noqa: E402


def _child(request: dict, out_path: str, err_path: str) -> None:
    """In the forked process: become what ``python -m bnfold ARGS`` would be, run it, and exit with its code."""
    code = 70
    try:
        os.setpgid(0, 0)  # its workers belong to its group: a timeout kills them all
        cap = request["memory_cap"]
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        for fd, path in ((1, out_path), (2, err_path)):
            target = os.open(path, os.O_WRONLY | os.O_TRUNC)
            os.dup2(target, fd)
            os.close(target)
        sys.stdin = open(os.devnull)  # noqa: SIM115
        sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
        sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)
        sys.argv = ["bnfold", *request["args"]]
        try:
            bnfold.cli.main()
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except BaseException:  # noqa: BLE001 - an escaped exception is what Python would print and exit 1 for
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _run(request: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out_path, err_path = os.path.join(tmp, "out"), os.path.join(tmp, "err")
        for path in (out_path, err_path):
            open(path, "w").close()  # noqa: SIM115
        pid = os.fork()
        if pid == 0:
            _child(request, out_path, err_path)
        deadline = time.monotonic() + request["time_cap"]
        timed_out = False
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                timed_out = True
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                _, status = os.waitpid(pid, 0)
                break
            time.sleep(0.05)
        try:
            os.killpg(pid, signal.SIGKILL)  # a worker it left behind
        except ProcessLookupError:
            pass
        with open(out_path, errors="replace") as out, open(err_path, errors="replace") as err:
            return {"returncode": os.waitstatus_to_exitcode(status), "stdout": out.read(), "stderr": err.read(), "timed_out": timed_out}


def main() -> None:
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # nothing else (a library's print) may write into the answers
    for line in sys.stdin:
        answers.write(json.dumps(_run(json.loads(line))) + "\n")


if __name__ == "__main__":
    main()
