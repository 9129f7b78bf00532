"""Run models in a confined child process, so that an abort inside TensorFlow cannot kill bnfold.

A graph can make TensorFlow's C++ code fail a ``CHECK`` or abort (a scalar fed
to a conv, a shape a kernel does not expect). That ends the process with
SIGABRT and no message, whatever Python does. bnfold cannot foresee every such
graph, so every run of a graph it did not write (the check, ``doctor --data``,
the doctor's probe) happens in a worker process; when the worker dies, the
parent reports it as one line and writes nothing.

The protocol carries no pickles: a JSON header and raw array bytes, so a graph
that makes the worker write to its stdout cannot make the parent run anything.
One worker serves one graph at a time and is kept for the next graph; a worker
that died is replaced. :func:`prestart` starts one early, so that its
TensorFlow import overlaps the fold.

Beyond TensorFlow graphs, the worker does every other thing that runs a
model from a file. This module is its client side and knows no format; the
requests belong to the adapters and name their handler (:mod:`bnfold.core.serve`):
``bnfold.tf.runner:load`` (a graph to run), ``bnfold.sources:serve_freeze``
(SavedModels and Keras files loaded and frozen), ``bnfold.keras.file:serve_fold``
(a Keras file folded into a Keras file), ``bnfold.recalibration.keras:serve_keras``
(a Keras file's BN statistics measured and written back),
``bnfold.onnx.export:serve_convert`` (tf2onnx), ``bnfold.onnx.runner:load`` and
``:evaluate`` (onnxruntime sessions, ONNX constants by the reference evaluator).
A worker for ONNX requests only is a new interpreter without TensorFlow
(:func:`acquire` with ``tensorflow=False``).

The worker is confined (:mod:`bnfold.core.sandbox`) as it starts, while it has one
thread and before it imports TensorFlow or sees a model: Landlock where the
kernel has it, memory and CPU limits everywhere. The parent keeps the
wall-clock deadline of each request and kills a worker that runs past it.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import IO, Any, TypeVar

from bnfold.core import sandbox, serve
from bnfold.core.protocol import HEADER, first_line_of, receive, send

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

T = TypeVar("T")


class GraphRunError(Exception):
    """TensorFlow refused to load or run the graph (an ``OpError``, ``ValueError``, ...), with its message."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class WorkerDied(Exception):
    """The worker process ended while loading or running a graph: TensorFlow aborted, or the process was killed."""

    def __init__(self, returncode: int | None, last_words: str, limit: str = "", engine: str = "TensorFlow") -> None:
        self.returncode = returncode
        self.last_words = last_words
        self.limit = limit  # which of bnfold's limits ended it, when one did
        self.engine = engine  # what ran in the worker: TensorFlow, onnxruntime, Keras
        super().__init__(self.describe())

    def describe(self) -> str:
        code = self.returncode
        if self.limit:
            return f"the model ran past bnfold's {self.limit}"
        if code is not None and code < 0:
            try:
                how = f"aborted ({signal.Signals(-code).name})"
            except ValueError:
                how = f"was killed by signal {-code}"
        else:
            how = f"ended (exit status {code})"
        said = f": {self.last_words}" if self.last_words else ""
        return f"{self.engine} {how} while running the {'model' if self.engine != 'TensorFlow' else 'graph'}{said}"


# -- arrays over a pipe, without pickle ------------------------------------------------------


# -- the parent's side ------------------------------------------------------------------------


class Worker:
    """One child process with TensorFlow that runs one graph at a time.

    Forked from this process where that is safe (:func:`prefer_fork`), so
    that it starts with the TensorFlow this process has imported already;
    else a new interpreter that imports TensorFlow itself.
    """

    def __init__(self, onednn: bool = True, tensorflow: bool = True) -> None:
        """``onednn=False``: a new interpreter with TensorFlow's oneDNN kernels off (:data:`ABORT_POLICY`).
        ``tensorflow=False``: a worker for ONNX models only (onnxruntime, the ONNX reference evaluator), which
        does not import TensorFlow when it is a new interpreter; a forked worker has TensorFlow either way."""
        self.log = tempfile.TemporaryFile()  # the child's stderr: TF's start-up lines stay out of bnfold's output
        self.onednn = onednn
        private = tempfile.mkdtemp(prefix="bnfold-worker-")  # removed by stop(): the worker cannot be trusted to
        self.limits = sandbox.Limits(sandbox.limits.memory, sandbox.limits.time, list(sandbox.limits.read_paths), private)
        _warn_unconfined()
        forked = onednn and _can_fork()
        self.tensorflow = tensorflow or forked
        self.process: subprocess.Popen[bytes] | _Forked = _fork(self.log, self.limits) if forked else self._spawn()
        self.ready = False  # until the worker says it has started (TensorFlow imported, warmed up)
        _started.append(self)
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                _widen_pipe(stream.fileno())

    def _spawn(self) -> subprocess.Popen[bytes]:
        env = dict(os.environ)
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        if not self.onednn:
            env["TF_ENABLE_ONEDNN_OPTS"] = "0"
        if not self.tensorflow:
            env[serve.FLAVOR_ENV] = "onnx"
        # The worker imports this very bnfold, also when it was found through sys.path alone.
        env["PYTHONPATH"] = os.pathsep.join([sandbox.PACKAGE_ROOT, *filter(None, [env.get("PYTHONPATH")])])
        env[_LIMITS_ENV] = json.dumps(
            {"memory": self.limits.memory, "time": self.limits.time, "read": self.limits.read_paths, "private": self.limits.private_dir}
        )
        return subprocess.Popen(
            # Confined first, with one thread: bnfold.core.sandbox imports nothing that starts threads (numpy's BLAS does).
            [sys.executable, "-c", "from bnfold.worker_start import main; main()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            env=env,
            cwd=os.getcwd(),
            start_new_session=True,  # a terminal's Ctrl-C reaches bnfold, which then ends the worker
        )

    def request(self, header: dict[str, Any], payload: bytes = b"") -> tuple[dict[str, Any], bytes]:
        assert self.process.stdin is not None and self.process.stdout is not None
        try:
            send(self.process.stdin, header, payload)
            if not self.ready:  # its TensorFlow import and warm-up are not the model's time
                started = _wait_readable(self.process.stdout, STARTUP_LIMIT) and _ready(self.process.stdout.fileno())
                self.ready = True
                if not started:
                    raise OSError("the worker did not start")
            answered = _wait_readable(self.process.stdout, self.limits.time)
            reply = receive(self.process.stdout) if answered else None
        except (BrokenPipeError, ConnectionResetError, OSError):
            answered, reply = True, None
        if not answered:
            self.process.kill()
            self.process.wait()
            raise WorkerDied(None, "", f"time limit of {self.limits.time:g} s for one step (--time-limit)")
        if reply is None:
            raise self._death()
        if head_kind(reply[0]) == "MemoryError":
            raise WorkerDied(None, "", f"memory limit of {_gib(self.limits.memory)} (--memory-limit)")
        head, body = reply
        if not head.get("ok"):
            raise GraphRunError(str(head.get("kind", "error")), str(head.get("message", "")))
        return head, body

    def _death(self) -> WorkerDied:
        try:
            code = self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        words = self._last_words()
        limit = ""
        if code == -signal.SIGXCPU or code == -signal.SIGKILL and _cpu_spent(words):
            limit = f"CPU-time limit of {self.limits.time:g} s x cores (--time-limit)"
        elif "MemoryError" in words or "bad_alloc" in words or "Out of memory" in words or "OOM" in words:
            limit = f"memory limit of {_gib(self.limits.memory)} (--memory-limit)"
        return WorkerDied(code, words, limit)

    def _last_words(self) -> str:
        """The line TensorFlow printed when it gave up (``Check failed: ...``), if any."""
        try:
            self.log.seek(0, os.SEEK_END)
            size = self.log.tell()
            self.log.seek(max(0, size - 65536))
            text = self.log.read().decode("utf-8", "replace")
        except OSError:
            return ""
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        for line in reversed(lines):
            fatal = _GLOG_FATAL.match(line)
            if fatal or "Check failed" in line:
                return (fatal.group(1) if fatal else line)[:300]
        return lines[-1][:300] if lines else ""

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def echo_log(self) -> None:
        """With ``--debug`` (:data:`echo_logs`), what the worker printed goes to bnfold's stderr."""
        if echo_logs and not self.log.closed:
            self.log.seek(0)
            sys.stderr.write(self.log.read().decode("utf-8", "replace"))

    def stop(self) -> None:
        if self.alive:
            try:
                assert self.process.stdin is not None
                self.process.stdin.close()
                self.process.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()
        self.echo_log()
        self.log.close()
        shutil.rmtree(self.limits.private_dir, ignore_errors=True)
        if self in _started:
            _started.remove(self)


echo_logs = False  # --debug: what a worker printed (library warnings, TF's log lines) is copied to stderr as it stops
STARTUP_LIMIT = 600.0  # seconds a worker may take to import TensorFlow and warm up, on a busy machine
_LIMITS_ENV = "BNFOLD_WORKER_LIMITS"  # how a spawned worker learns its limits and the model's paths
_warned: list[bool] = []


def head_kind(head: dict[str, Any]) -> str:
    return "" if head.get("ok") else str(head.get("kind", ""))


def _gib(size: int) -> str:
    return f"{size / (1 << 30):.3g} GiB"


def _cpu_spent(words: str) -> bool:
    return "CPU time limit" in words


def _ready(fd: int) -> bool:
    """Read the worker's "ready" message from the pipe itself, byte-exact: a buffered read could take the
    answer that follows it into Python's buffer, where the deadline's ``select`` would not see it."""
    def exactly(size: int) -> bytes | None:
        data = b""
        while len(data) < size:
            chunk = os.read(fd, size - len(data))
            if not chunk:
                return None
            data += chunk
        return data

    fixed = exactly(HEADER.size)
    if fixed is None:
        return False
    head_size, payload_size = HEADER.unpack(fixed)
    return exactly(head_size + payload_size) is not None


def _wait_readable(stream: IO[bytes], seconds: float) -> bool:
    """Whether the worker starts its answer within ``seconds`` (the wall-clock deadline of one request)."""
    import select

    try:
        ready, _, _ = select.select([stream], [], [], seconds)
    except (OSError, ValueError):
        return True  # the read that follows reports the broken pipe
    return bool(ready)


def _warn_unconfined() -> None:
    """Say once per process, on stderr, that workers run without Landlock here (docs/security.md)."""
    if _warned or sandbox.landlock_abi():
        return
    _warned.append(True)
    try:
        print(f"bnfold: warning: {sandbox.status()}", file=sys.stderr)
    except (OSError, ValueError):
        pass


_spare: list[Worker] = []
_started: list[Worker] = []  # every worker of this process, for the exit handler
PIPE_SIZE = 1 << 20  # Linux's default limit for an unprivileged process (/proc/sys/fs/pipe-max-size)


def _widen_pipe(fd: int) -> None:
    """A 1 MiB pipe instead of 64 KiB: a 100 MB graph crosses in 0.085 s instead of 0.14 s (fewer wake-ups
    of the reader per byte); where the system does not allow it, the pipe stays as it is."""
    setter = getattr(fcntl, "F_SETPIPE_SZ", None) if fcntl is not None else None
    if setter is None:
        return
    try:
        fcntl.fcntl(fd, setter, PIPE_SIZE)
    except OSError:
        pass


# -- forked workers ---------------------------------------------------------------------------


def _os_threads() -> int:
    """Threads of this process, as the kernel counts them (-1 where it cannot be read)."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return -1


_THREADS_AT_IMPORT = _os_threads()  # numpy, imported above, has started its BLAS threads by now
_fork_preferred = False


def prefer_fork() -> None:
    """Fork workers from this process from now on, wherever :func:`_can_fork` finds it safe.

    The command line calls this as it starts: a worker forked once this
    process has imported TensorFlow starts with that TensorFlow, where a new
    interpreter imports it again (4.3 s of CPU on 2 cores; while this process
    imports its own, the two imports share the cores). The API leaves it off,
    since a caller's process may hold threads and descriptors a child should
    not inherit.
    """
    global _fork_preferred, _THREADS_AT_IMPORT
    if sys.platform.startswith("linux"):
        # Imported here, so that the threads its import starts count as known ones: none of TensorFlow's
        # own, but TF imports scipy where it is installed, whose OpenBLAS starts its thread pool (fork-safe:
        # OpenBLAS stops its pool around a fork); counted from numpy's import, no worker was ever forked.
        # A process that had TensorFlow already may have run it (threads): its count stays numpy's.
        if "tensorflow" not in sys.modules:
            import tensorflow  # noqa: F401

            _THREADS_AT_IMPORT = max(_THREADS_AT_IMPORT, _os_threads())
        _fork_preferred = True
    else:  # no fork: a new interpreter now, whose TensorFlow import overlaps this process's
        prestart()


def _can_fork() -> bool:
    """Whether a fork is safe now: Linux, TensorFlow imported, and no thread started since its import (numpy's, scipy's BLAS pools).

    A forked child has only the forking thread; a lock another thread held
    stays locked in it forever. TensorFlow starts no thread when imported (TF
    2.21: the process has as many threads after ``import tensorflow`` as
    before), but its runtime does (eager context, sessions), and so do
    onnxruntime and Python threads: any such thread means a new interpreter instead.
    """
    if not _fork_preferred or not sys.platform.startswith("linux") or "tensorflow" not in sys.modules:
        return False
    threads = _os_threads()
    return 0 < threads <= _THREADS_AT_IMPORT and threading.active_count() == 1


class _Forked:
    """A forked worker, seen through the part of ``subprocess.Popen`` that :class:`Worker` uses."""

    def __init__(self, pid: int, stdin: IO[bytes], stdout: IO[bytes]) -> None:
        self.pid, self.stdin, self.stdout = pid, stdin, stdout
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self._reap(os.WNOHANG)
        return self.returncode

    def _reap(self, flags: int) -> None:
        try:
            pid, status = os.waitpid(self.pid, flags)
        except ChildProcessError:  # reaped already
            self.returncode = self.returncode if self.returncode is not None else -signal.SIGKILL
            return
        if pid:
            self.returncode = os.waitstatus_to_exitcode(status)

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is None:
                self._reap(0)
            elif time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"worker {self.pid}", timeout or 0)
            else:
                time.sleep(0.005)
        assert self.returncode is not None
        return self.returncode

    def kill(self) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _fork(log: IO[bytes], limits: sandbox.Limits) -> _Forked:
    """Fork a worker that serves requests on a pipe, its stderr (and stdout) going to ``log``."""
    request_read, request_write = os.pipe()
    reply_read, reply_write = os.pipe()
    inherited = [f.fileno() for w in _started for f in (w.process.stdin, w.process.stdout, w.log) if f is not None and not f.closed]
    for stream in (sys.stdout, sys.stderr):  # what is buffered is written once, by this process
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass
    pid = os.fork()
    if pid == 0:  # the worker: never returns to the caller's stack
        code = 1
        try:
            os.setsid()  # a terminal's Ctrl-C reaches bnfold, which then ends the worker
            for sig in (signal.SIGINT, signal.SIGTERM):  # the parent's handlers (clean-up of its writes) are not ours
                signal.signal(sig, signal.SIG_DFL)
            for fd in (request_write, reply_read, *inherited):  # other ends and other workers' pipes: EOF must reach them
                os.close(fd)
            os.dup2(log.fileno(), 2)
            os.dup2(log.fileno(), 1)
            os.dup2(request_read, 0)
            sys.stdout = sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
            sandbox.confine(limits)  # the child has one thread: the confinement covers every thread it starts
            serve.serve(os.fdopen(request_read, "rb"), os.fdopen(reply_write, "wb"))
            code = 0
        except BaseException:  # noqa: BLE001 - the worker's last words, for the parent to report
            import traceback

            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(request_read)
    os.close(reply_write)
    return _Forked(pid, os.fdopen(request_write, "wb"), os.fdopen(reply_read, "rb"))


def prestart() -> None:
    """Start a worker now, so its TensorFlow import runs while the caller folds."""
    if not any(w.alive for w in _spare):
        _spare.append(Worker())


def acquire(tensorflow: bool = True) -> Worker:
    """A started worker that may read every model path allowed so far (:func:`bnfold.core.sandbox.allow_read`), else a new one.

    ``tensorflow=False``: the request needs no TensorFlow (an ONNX model's run or constant); a spare worker
    of either kind serves it, and a new one is an ONNX-only interpreter unless it can be forked."""
    while _spare:
        worker = _spare.pop()
        if worker.alive and set(sandbox.limits.read_paths) <= set(worker.limits.read_paths) and (worker.tensorflow or not tensorflow):
            return worker
        worker.stop()
    return Worker(tensorflow=tensorflow)


def ask(header: dict[str, Any], payload: bytes = b"", *, tensorflow: bool = True, engine: str = "TensorFlow") -> tuple[dict[str, Any], bytes]:
    """One request to a pooled worker (a one-shot job: convert, evaluate, fold a Keras file), answered as
    :meth:`Worker.request` answers; the worker goes back to the pool after an answer and is stopped after a death."""
    worker = acquire(tensorflow)
    try:
        reply = worker.request(header, payload)
    except GraphRunError:
        release(worker)
        raise
    except WorkerDied as exc:
        worker.stop()
        exc.engine = engine
        raise
    except BaseException:
        worker.stop()
        raise
    release(worker)
    return reply


def as_bnfold_error(exc: GraphRunError, fallback: Callable[[str], BaseException]) -> BaseException:
    """The worker's :class:`~bnfold.core.errors.BnfoldError` as the same class here (its exit code kept), else ``fallback(message)``."""
    from bnfold.core import errors

    kind = getattr(errors, exc.kind, None)
    if isinstance(kind, type) and issubclass(kind, errors.BnfoldError):
        return kind(str(exc))
    return fallback(first_line_of(str(exc)))


def release(worker: Worker) -> None:
    if worker.alive and worker.onednn and not _spare:
        _spare.append(worker)
    else:
        worker.stop()


@atexit.register
def _stop_workers() -> None:
    _spare.clear()
    while _started:
        worker = _started.pop()
        if worker.alive:
            worker.process.kill()
            worker.process.wait()
        worker.echo_log()
        shutil.rmtree(worker.limits.private_dir, ignore_errors=True)


# -- the worker's side ----------------------------------------------------------------------


# A fatal log line as absl/glog writes it: "F0000 00:00:1796237763.342586    3783 file.cc:737] text"
_GLOG_FATAL = re.compile(r"^F\d{4} [\d:.]+\s+\d+ [^\s\]]+:\d+\] (.*)$")
