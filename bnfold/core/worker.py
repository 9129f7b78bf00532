"""Run TensorFlow graphs in a child process, so that an abort inside TensorFlow cannot kill bnfold.

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
model from a file: it loads and freezes SavedModels and Keras files
(``freeze``), folds a Keras file into a Keras file (``keras_fold``), freezes a
Keras file for recalibration and writes its new BN statistics back
(``keras_recalibrate``), converts
with tf2onnx (``tf2onnx``), holds onnxruntime sessions (``ort_load``, then
``run``) and evaluates ONNX constants with the reference evaluator
(``onnx_eval``). A worker for ONNX requests only is a new interpreter without
TensorFlow (:func:`acquire` with ``tensorflow=False``).

The worker is confined (:mod:`bnfold.core.sandbox`) as it starts, while it has one
thread and before it imports TensorFlow or sees a model: Landlock where the
kernel has it, memory and CPU limits everywhere. The parent keeps the
wall-clock deadline of each request and kills a worker that runs past it.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import IO, Any, TypeVar

import numpy as np

from bnfold.core import sandbox
from bnfold.core.errors import BnfoldError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

T = TypeVar("T")
HEADER = struct.Struct(">IQ")  # JSON header length, payload length
# A fatal log line as absl/glog writes it: "F0000 00:00:1796237763.342586    3783 file.cc:737] text"
_GLOG_FATAL = re.compile(r"^F\d{4} [\d:.]+\s+\d+ [^\s\]]+:\d+\] (.*)$")


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


def _resolve_dtype(name: str) -> np.dtype:
    try:
        return np.dtype(name)
    except TypeError:  # bfloat16 and TF's other extension types are known by name to ml_dtypes only
        import ml_dtypes

        return np.dtype(getattr(ml_dtypes, name))


def encode_arrays(arrays: list[np.ndarray]) -> tuple[list[dict[str, Any]], bytes]:
    """Numbers as their raw bytes; TF string tensors (object arrays of bytes) as lengths and bytes,
    since a fixed-width numpy bytes dtype would drop trailing NUL bytes."""
    meta, chunks = [], []
    for value in arrays:
        array = np.asarray(value)
        if array.dtype == object or array.dtype.kind in "SU":
            items = [x if isinstance(x, bytes) else str(x).encode() for x in array.ravel().tolist()]
            data = b"".join(items)
            meta.append({"dtype": "bytes", "shape": list(array.shape), "nbytes": len(data), "lengths": [len(x) for x in items]})
            chunks.append(data)
            continue
        name = array.dtype.str if array.dtype.kind in "biufcM" else array.dtype.name
        meta.append({"dtype": name, "shape": list(array.shape), "nbytes": array.nbytes})
        chunks.append(array.tobytes(order="C"))  # not ascontiguousarray, which makes a scalar 1-d
    return meta, b"".join(chunks)


def decode_arrays(meta: list[dict[str, Any]], payload: bytes) -> list[np.ndarray]:
    arrays, offset = [], 0
    for item in meta:
        size = int(item["nbytes"])
        if item["dtype"] == "bytes":
            items, start = [], offset
            for length in item["lengths"]:
                items.append(payload[start : start + int(length)])
                start += int(length)
            strings = np.empty(len(items), dtype=object)
            strings[:] = items
            arrays.append(strings.reshape(item["shape"]))
        else:
            dtype = _resolve_dtype(str(item["dtype"]))
            count = size // dtype.itemsize if dtype.itemsize else 0
            arrays.append(np.frombuffer(payload, dtype=dtype, count=count, offset=offset).reshape(item["shape"]).copy())
        offset += size
    return arrays


def _send(stream: IO[bytes], header: dict[str, Any], payload: bytes = b"") -> None:
    head = json.dumps(header).encode()
    stream.write(HEADER.pack(len(head), len(payload)))
    stream.write(head)
    if payload:
        stream.write(payload)
    stream.flush()


def _read_exactly(stream: IO[bytes], size: int) -> bytes | None:
    chunks, left = [], size
    while left:
        chunk = stream.read(left)
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _receive(stream: IO[bytes]) -> tuple[dict[str, Any], bytes] | None:
    fixed = _read_exactly(stream, HEADER.size)
    if fixed is None:
        return None
    head_size, payload_size = HEADER.unpack(fixed)
    head = _read_exactly(stream, head_size)
    payload = _read_exactly(stream, payload_size) if payload_size else b""
    if head is None or payload is None:
        return None
    return json.loads(head), payload


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
            env[_FLAVOR_ENV] = "onnx"
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
            _send(self.process.stdin, header, payload)
            if not self.ready:  # its TensorFlow import and warm-up are not the model's time
                started = _wait_readable(self.process.stdout, STARTUP_LIMIT) and _ready(self.process.stdout.fileno())
                self.ready = True
                if not started:
                    raise OSError("the worker did not start")
            answered = _wait_readable(self.process.stdout, self.limits.time)
            reply = _receive(self.process.stdout) if answered else None
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
_FLAVOR_ENV = "BNFOLD_WORKER_FLAVOR"  # "onnx": a spawned worker that serves ONNX requests without importing TensorFlow
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
    """Say once per process, on stderr, that workers run without Landlock here (README "Security")."""
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
            serve(os.fdopen(request_read, "rb"), os.fdopen(reply_write, "wb"))
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


_serving: list[bool] = []  # set in a worker process: loads there run in place


def in_worker() -> bool:
    return bool(_serving)


def freeze_in_worker(request: dict[str, Any]) -> tuple[bytes, dict[str, Any]]:
    """Ask a worker to load and freeze a model file (:func:`bnfold.tf.freeze.load_in_worker`); errors keep their exit codes."""
    from bnfold.core import errors

    worker = acquire()
    path = str(request.get("path", ""))
    try:
        head, body = worker.request({"op": "freeze", **request})
    except GraphRunError as exc:
        release(worker)
        kind = getattr(errors, exc.kind, None)
        if isinstance(kind, type) and issubclass(kind, errors.BnfoldError):
            raise kind(str(exc)) from None
        raise errors.InputError(f"{path}: cannot load the model ({first_line_of(str(exc))})") from None
    except WorkerDied as exc:
        worker.stop()
        raise errors.InputError(f"{path}: loading the model ended bnfold's worker: {exc.describe()}") from None
    except BaseException:
        worker.stop()
        raise
    release(worker)
    return body, head


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


def first_line_of(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[0][:300] if lines else "no message"


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


ABORT_RETRIES = 3  # how often one process runs a graph that TensorFlow aborts (AbortedError), see ABORT_POLICY
ABORT_POLICY = """\
TensorFlow's oneDNN kernels abort a run now and then ("could not create a primitive descriptor
for the reorder primitive", AbortedError), in a process that ran many graphs; the same run then
aborts again in that process, or passes. The one answer, for bnfold and its tests alike: run it
up to ABORT_RETRIES times (TensorFlow's contract: an aborted op may be retried); if every try
aborts, run the graph in a new interpreter with oneDNN off (TF_ENABLE_ONEDNN_OPTS=0), which has no
such kernels, and keep it there. So an abort never decides an answer: the graph's values do."""


def run_retrying_aborts(tf: Any, run: Callable[[], T]) -> T:
    """``run()``, tried again on ``AbortedError`` up to :data:`ABORT_RETRIES` times (:data:`ABORT_POLICY`)."""
    for attempt in range(ABORT_RETRIES):
        try:
            return run()
        except tf.errors.AbortedError:
            if attempt == ABORT_RETRIES - 1:
                raise
    raise AssertionError("unreachable")


class IsolatedGraph:
    """A GraphDef loaded in a worker: ``run`` fetches tensors for feeds, as a ``Session.run`` would.

    A run that TensorFlow keeps aborting moves the graph to a worker with
    oneDNN off (:data:`ABORT_POLICY`), which needs the graph's bytes again:
    ``reload`` makes them (a caller that keeps the ``GraphDef`` anyway, so
    that this object need not hold a second copy); without it the bytes are kept.
    """

    def __init__(
        self,
        graph_bytes: bytes,
        layout_pass: bool = True,
        channels_first: bool = True,
        reload: Callable[[], bytes] | None = None,
        onednn: bool = True,
        budget: str = "",
    ) -> None:
        """``layout_pass``: run as the check does (:func:`bnfold.tf.verify.runner_config`), with grappler's
        layout pass where ``channels_first`` says the graph may need it; else with TensorFlow's default options.
        ``budget``: what the graph computes (a constant), to be refused by :mod:`bnfold.core.budgets` from its
        static shapes before it runs (:class:`GraphRunError` of kind ``BudgetExceeded``)."""
        self.load = {"op": "load", "layout_pass": layout_pass, "channels_first": channels_first, "budget": budget}
        self.reload = reload if reload is not None else (lambda: graph_bytes)
        self.worker = self._start(graph_bytes, onednn)
        self.generation = 0  # counts the moves to another worker, which lose what the old one kept (``stash``)

    def _start(self, graph_bytes: bytes, onednn: bool) -> Worker:
        worker = acquire() if onednn else Worker(onednn=False)
        try:
            worker.request(self.load, graph_bytes)
        except GraphRunError:
            release(worker)  # the worker answered: it holds no graph and serves the next one
            raise
        except BaseException:  # died, or interrupted halfway through the exchange
            worker.stop()
            raise
        return worker

    def run(self, fetches: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.run_kept(fetches, feeds)[0]

    def run_kept(
        self,
        fetches: list[str],
        feeds: dict[str, np.ndarray],
        stored: list[tuple[str, str, int, int]] | None = None,
        stash: dict[str, str] | None = None,
    ) -> tuple[list[np.ndarray], list[dict[str, Any]] | None]:
        """:meth:`run`, with arrays that stay in the worker between runs, so they do not cross the pipe twice.

        ``stored``: (tensor, key, start, stop) feeds the tensor rows ``start:stop`` of what is kept under ``key``.
        ``stash``: tensor -> key; the tensor is computed in the same run (beside ``fetches``, which it
        may repeat) and appended (axis 0) to what is kept under ``key`` instead of being sent back; its
        shape and size are answered (the second item, in ``stash``'s order). Both are forgotten when the
        graph moves to another worker (:data:`ABORT_POLICY`; ``generation`` counts the moves): the run is
        then made without them (the tensors ``stored`` names are computed from the feeds) and the second
        item is None.
        """
        names = list(feeds)
        meta, payload = encode_arrays([feeds[n] for n in names])
        stash = stash or {}
        header: dict[str, Any] = {"op": "run", "fetches": [*fetches, *stash], "feeds": names, "arrays": meta}
        if stored:
            header["stored"] = [list(item) for item in stored]
        if stash:
            header["stash"] = [[len(fetches) + i, key] for i, key in enumerate(stash.values())]
        try:
            head, body = self.worker.request(header, payload)
        except GraphRunError as exc:
            if exc.kind != "AbortedError" or not self.worker.onednn:
                raise
            self.close()
            self.worker = self._start(self.reload(), onednn=False)
            self.generation += 1
            return self.run(fetches, feeds), None
        except WorkerDied:
            self._drop()
            raise
        return decode_arrays(head["arrays"], body), list(head.get("stashed") or [])

    def drop(self, keys: list[str]) -> None:
        """Forget what the worker keeps under ``keys``."""
        if keys and self.worker.alive:
            try:
                self.worker.request({"op": "drop", "keys": keys})
            except WorkerDied:
                self._drop()
                raise

    def _drop(self) -> None:
        self.worker.stop()

    def close(self) -> None:
        if not self.worker.alive:
            return
        try:
            self.worker.request({"op": "unload"})
        except (GraphRunError, WorkerDied):
            self._drop()
            return
        release(self.worker)


def run_without_onednn(graph_bytes: bytes, fetches: list[str], feeds: dict[str, np.ndarray], channels_first: bool = True) -> list[np.ndarray]:
    """One run in a worker with oneDNN off: the last step of :data:`ABORT_POLICY` for a caller that ran the graph itself."""
    graph = IsolatedGraph(graph_bytes, channels_first=channels_first, onednn=False)
    try:
        return graph.run(fetches, feeds)
    finally:
        graph.close()


# -- the worker's side ----------------------------------------------------------------------


def import_serialized(tf: Any, data: bytes) -> Any:
    """A ``tf.Graph`` of a serialized GraphDef, as ``tf.graph_util.import_graph_def(..., name="")`` makes it.

    The bytes go to TensorFlow's C API as they came over the pipe.
    ``import_graph_def`` takes a parsed ``GraphDef`` and serializes it again
    before handing it to the same C function: on ResNet50 (103 MB) the parse
    and that second serialization were 0.23 s of the 0.50 s import, and two
    more copies of the weights in this process. The importer's internals used
    here are TensorFlow's own (``importer.py``); if a TensorFlow version lacks
    them, the public route runs instead.
    """
    graph = tf.Graph()
    entry_points: tuple[Any, ...]
    try:
        from tensorflow.python.client import pywrap_tf_session as c_api
        from tensorflow.python.framework import c_api_util, importer

        entry_points = (
            c_api.TF_NewBufferFromString,
            c_api.TF_DeleteBuffer,
            c_api.TF_GraphImportGraphDefWithResults,
            c_api.TF_ImportGraphDefOptionsSetValidateColocationConstraints,
            c_api_util.ScopedTFImportGraphDefOptions,
            c_api_util.ScopedTFImportGraphDefResults,
            importer._ProcessNewOps,
            graph._mutation_lock,
            graph._c_graph.get,
        )
    except (ImportError, AttributeError):
        entry_points = ()
    if not entry_points:
        from tensorflow.core.framework import graph_pb2

        with graph.as_default():
            tf.graph_util.import_graph_def(graph_pb2.GraphDef.FromString(data), name="")
        return graph
    options = c_api_util.ScopedTFImportGraphDefOptions()
    c_api.TF_ImportGraphDefOptionsSetValidateColocationConstraints(options.options, True)
    buffer = c_api.TF_NewBufferFromString(data)
    try:
        with graph._mutation_lock():  # as importer.py: no run between creating the operations and registering them
            with graph._c_graph.get() as c_graph:
                results = c_api.TF_GraphImportGraphDefWithResults(c_graph, buffer, options.options)
            c_api_util.ScopedTFImportGraphDefResults(results)  # frees the results
            importer._ProcessNewOps(graph)
    except tf.errors.InvalidArgumentError as exc:
        raise ValueError(str(exc)) from None  # what import_graph_def raises for a graph TensorFlow rejects
    finally:
        c_api.TF_DeleteBuffer(buffer)
    return graph


def check_budget(graph: Any, what: str) -> None:
    """Refuse a graph whose static shapes (TensorFlow infers them on import, constant shape inputs
    included: a ``Fill`` of a constant size has its full shape) exceed bnfold's budgets, before it runs."""
    from bnfold.core.budgets import Tally, product_flops

    tally = Tally(what)
    for op in graph.get_operations():
        for tensor in op.outputs:
            shape = tensor.shape
            if shape.rank is not None and shape.is_fully_defined():
                tally.tensor(op.name, shape.as_list())
        if op.type in _PRODUCTS and op.outputs:
            dims = [t.shape.as_list() if t.shape.rank is not None else None for t in op.inputs]
            known = [None if d is None or None in d else d for d in dims]
            out = op.outputs[0].shape
            tally.work(op.name, product_flops(op.type, known, out.as_list() if out.rank is not None and out.is_fully_defined() else None))


_PRODUCTS = {"MatMul", "BatchMatMul", "BatchMatMulV2", "BatchMatMulV3", "Conv2D", "Conv3D", "DepthwiseConv2dNative",
             "Conv2DBackpropInput", "Conv3DBackpropInputV2"}  # fmt: skip


def _warm_up(tf: Any, runner_config: Any) -> None:
    """Import and run a tiny graph of bnfold's own (conv, BN, dense) before the first request.

    The first graph a worker runs pays for what TensorFlow sets up once per
    process (thread pools, oneDNN, the executor's and kernels' code paths): on
    ResNet50 the first runs of the input and folded graphs took 0.50 and
    0.36 s after no warm-up, 0.45 and 0.30 s after it. The warm-up takes
    0.06 s, while bnfold still reads the model.
    """
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, 8, 8, 3], name="x")
        w = tf.constant(np.full((3, 3, 3, 4), 0.1, np.float32))
        y = tf.nn.conv2d(x, w, 1, "SAME")
        y = tf.compat.v1.nn.fused_batch_norm(y, tf.ones([4]), tf.zeros([4]), tf.zeros([4]), tf.ones([4]), is_training=False)[0]
        y = tf.nn.relu(y)
        y = tf.matmul(tf.reduce_mean(y, [1, 2]), tf.ones([4, 2]))
    data = graph.as_graph_def().SerializeToString()
    warm = import_serialized(tf, data)
    with tf.compat.v1.Session(graph=warm, config=runner_config(False)) as session:
        session.run(y.name, {"x:0": np.ones((2, 8, 8, 3), np.float32)})


def op_error_text(message: str) -> str:
    """TensorFlow's run errors start "Graph execution error:" and say what failed lines later
    ("/home/u/x; Permission denied" above "[[{{node WriteFile}}]]"): that comes first, for one-line errors."""
    lines = [line.strip() for line in message.splitlines()]
    for i, line in enumerate(lines):
        found = re.match(r"\[\[\{\{node ([^}]+)\}\}\]\]", line)
        if found and i > 0 and lines[i - 1] and not lines[i - 1].startswith("Node: "):
            return f"node {found.group(1)!r}: {lines[i - 1]}\n{message}"
    return message


def _freeze(head: dict[str, Any], reply: IO[bytes]) -> None:
    from pathlib import Path

    from bnfold.tf import freeze

    try:
        loaded = freeze.load_here(str(head["kind"]), Path(str(head["path"])), str(head["signature"]), bool(head["trust_model"]))
    except BnfoldError:
        raise
    except Exception as exc:  # noqa: BLE001 - a loader's own failure on a hostile or broken file: the parent reports it
        _send(reply, {"ok": False, "kind": "InputError", "message": f"{head['path']}: cannot load the model ({type(exc).__name__}: {exc})"})
        return
    sig = loaded.signature
    signature = {"name": sig.name, "inputs": sig.inputs, "outputs": sig.outputs} if sig is not None else None
    data = loaded.graph_def.SerializeToString()
    del loaded
    _send(reply, {"ok": True, "signature": signature}, data)


class ModelRunError(ValueError):
    """onnxruntime, the ONNX reference evaluator or tf2onnx refused or failed on the model (their own exception types)."""


class OrtSession:
    """An onnxruntime session in the worker (graph optimizations off), run as the TF session is: by names."""

    def __init__(self, source: bytes | str) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        except MemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise ModelRunError(first_line_of(str(exc))) from None
        self.inputs = [i.name for i in self.session.get_inputs()]

    def run(self, fetches: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        try:
            return list(self.session.run(fetches, feeds))
        except MemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise ModelRunError(first_line_of(str(exc))) from None

    def close(self) -> None:
        del self.session


def _onnx_eval(head: dict[str, Any], payload: bytes) -> list[np.ndarray]:
    """The ONNX reference evaluator on a constant's subgraph (:class:`bnfold.onnx.fold.ConstValues`)."""
    import onnx
    from onnx.reference import ReferenceEvaluator

    size = int(head["model_bytes"])
    model = onnx.ModelProto.FromString(payload[:size])
    feeds = dict(zip(head["feeds"], decode_arrays(head["arrays"], payload[size:]), strict=True))
    try:
        return [np.asarray(v) for v in ReferenceEvaluator(model).run(list(head["fetches"]), feeds)]
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - the reference evaluator raises anything
        raise ModelRunError(f"{type(exc).__name__}: {first_line_of(str(exc))}") from None


def _tf2onnx(head: dict[str, Any], payload: bytes, reply: IO[bytes]) -> None:
    """tf2onnx's conversion of a folded GraphDef (:func:`bnfold.onnx.export.convert`), answered with the ONNX model's bytes;
    a model past protobuf's 2 GB is written with external data in the private directory instead, and its path answered."""
    from tensorflow.core.framework import graph_pb2

    from bnfold.onnx.export import convert
    from bnfold.onnx.io import serialize_within_limit

    graph_def = graph_pb2.GraphDef.FromString(payload)
    del payload
    model = convert(graph_def, list(head["inputs"]), list(head["outputs"]), int(head["opset"]))
    del graph_def
    data = serialize_within_limit(model)
    if data is not None:
        del model
        _send(reply, {"ok": True}, data)
        return
    import onnx

    where = tempfile.mkdtemp(prefix="tf2onnx-")
    onnx.save_model(model, os.path.join(where, "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    _send(reply, {"ok": True, "path": os.path.join(where, "model.onnx")})


def _keras_fold(head: dict[str, Any], payload: bytes, reply: IO[bytes]) -> None:
    """``bnfold a.keras b.keras`` in the worker: load, fold, check, save to the private directory and check the
    saved file (:func:`bnfold.keras.fold.fold_here`); answered with the file's bytes and the report as JSON."""
    from bnfold.core.errors import InputError, VerificationError
    from bnfold.keras import fold as keras_fold

    options = dict(head["options"])
    options["feeds"] = dict(zip(head["feeds"], decode_arrays(head["arrays"], payload), strict=True))
    try:
        data, result = keras_fold.fold_here(str(head["src"]), str(head["dst"]), bool(head["dry_run"]), bool(head["trust_model"]), options)
    except VerificationError as exc:
        if exc.result is None:
            raise
        _send(reply, {"ok": True, "failed": str(exc), "result": exc.result.to_json()})  # type: ignore[attr-defined]
        return
    except (BnfoldError, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - a layer's own code (a trusted Lambda) failing in the confined worker
        raise InputError(f"{head['src']}: the model failed in bnfold's worker ({type(exc).__name__}: {first_line_of(str(exc))})") from None
    _send(reply, {"ok": True, "result": result.to_json()}, data or b"")


def _keras_recalibrate(head: dict[str, Any], payload: bytes, reply: IO[bytes]) -> None:
    """``bnfold recalibrate a.keras b.keras`` in the worker (:func:`bnfold.recalibration.graph.recalibrate_keras_file`), in two steps.

    ``freeze``: load the file, freeze it with each BN layer's moving mean tagged; answered with the GraphDef's bytes
    followed by the layers' real statistics as arrays, their names and the signature as JSON. ``write``: load the
    file again, set the new statistics sent as arrays (by layer number), save it in the private directory and
    check the saved file; answered with its bytes.
    """
    from bnfold.core.errors import InputError
    from bnfold.recalibration import graph as recalibration

    src, trust_model = str(head["src"]), bool(head["trust_model"])
    try:
        if head["step"] == "freeze":
            loaded, names, real = recalibration.keras_tagged_here(src, trust_model)
            sig = loaded.signature
            signature = {"name": sig.name, "inputs": sig.inputs, "outputs": sig.outputs} if sig is not None else None
            graph = loaded.graph_def.SerializeToString()
            del loaded
            meta, data = encode_arrays([a for pair in real for a in pair])
            _send(reply, {"ok": True, "graph_bytes": len(graph), "names": names, "arrays": meta, "signature": signature}, graph + data)
            return
        if head["step"] != "write":
            raise ValueError(f"unknown keras_recalibrate step {head['step']!r}")
        arrays = decode_arrays(head["arrays"], payload)
        numbers = [int(n) for n in head["layers"]]
        if len(arrays) != 2 * len(numbers):
            raise ValueError("keras_recalibrate: two arrays per layer")
        values = {n: (arrays[2 * i], arrays[2 * i + 1]) for i, n in enumerate(numbers)}
        data = recalibration.keras_write_here(src, str(head["dst"]), trust_model, values)
    except (BnfoldError, MemoryError, ValueError):
        raise
    except Exception as exc:  # noqa: BLE001 - a layer's own code (a trusted Lambda) failing in the confined worker
        raise InputError(f"{src}: the model failed in bnfold's worker ({type(exc).__name__}: {first_line_of(str(exc))})") from None
    _send(reply, {"ok": True}, data)


def _stored(store: dict[str, Any], key: str) -> np.ndarray:
    """The array kept under ``key``: the chunks that runs appended, joined along axis 0 once, on first use."""
    if key not in store:
        raise KeyError(f"nothing is kept under {key!r} in this worker")
    value = store[key]
    if isinstance(value, list):
        value = store[key] = np.concatenate(value) if len(value) > 1 else value[0]
    return value  # type: ignore[no-any-return]


def _stash(store: dict[str, Any], outputs: list[Any], stash: list[list[Any]]) -> tuple[list[Any], list[dict[str, Any]]]:
    """The outputs to send back; the ones ``stash`` names ([fetch index, key] pairs) are appended to the store under
    their key instead, and only their shapes and sizes are answered, in ``stash``'s order."""
    if not stash:
        return outputs, []
    kept: list[dict[str, Any]] = []
    for index, key in stash:
        array = np.asarray(outputs[int(index)])
        chunks = store.setdefault(str(key), [])
        if not isinstance(chunks, list):
            raise ValueError(f"{key!r} was read already; appending to it is not allowed")
        chunks.append(array)
        kept.append({"shape": list(array.shape), "nbytes": int(array.nbytes)})
    stashed = {int(index) for index, _ in stash}
    return [value for i, value in enumerate(outputs) if i not in stashed], kept


def serve(requests: IO[bytes] | None = None, reply: IO[bytes] | None = None) -> None:
    """The worker's loop: read requests on stdin, answer on the original stdout until stdin closes.

    Anything the graph or TensorFlow prints to stdout goes to stderr instead,
    so it cannot be taken for an answer. A forked worker passes its pipes.
    A spawned worker for ONNX models only (``BNFOLD_WORKER_FLAVOR=onnx``) does not import TensorFlow.
    """
    if reply is None:
        reply = os.fdopen(os.dup(1), "wb")
        os.dup2(2, 1)
    if requests is None:
        requests = sys.stdin.buffer
    _serving.append(True)
    tf: Any = None
    caught: tuple[type[BaseException], ...] = (ValueError, TypeError, KeyError, BnfoldError, MemoryError)
    if os.environ.pop(_FLAVOR_ENV, "") != "onnx":
        import tensorflow as tf  # type: ignore[no-redef]

        from bnfold.tf.verify import runner_config

        caught = (tf.errors.OpError, *caught)
        try:
            _warm_up(tf, runner_config)
        except Exception:  # noqa: BLE001 - only a head start: the requests run all the same without it
            pass
    _send(reply, {"ok": True, "ready": True})  # from here on, the parent's deadline counts
    session: Any = None
    store: dict[str, Any] = {}  # arrays a run kept here for later runs of the same graph (``stash``/``stored``)
    while True:
        message = _receive(requests)
        if message is None:
            return
        head, payload = message
        del message  # the graph's bytes go with ``payload`` once it is imported
        try:
            if head["op"] in ("load", "freeze", "tf2onnx", "keras_fold", "keras_recalibrate") and tf is None:
                raise ValueError(f"request {head['op']!r} needs TensorFlow, which this worker did not import")
            if head["op"] in ("load", "ort_load", "unload"):
                store.clear()
            if head["op"] == "load":
                session = None  # the previous graph's session, if a caller skipped "unload"
                graph = import_serialized(tf, payload)
                payload = b""
                if head.get("budget"):
                    check_budget(graph, str(head["budget"]))
                config = runner_config(bool(head.get("channels_first", True))) if head.get("layout_pass", True) else None
                session = tf.compat.v1.Session(graph=graph, config=config)
                _send(reply, {"ok": True})
            elif head["op"] == "run":
                if session is None:
                    raise ValueError("no graph is loaded")
                values = decode_arrays(head["arrays"], payload)
                feeds = dict(zip(head["feeds"], values, strict=True))
                for name, key, start, stop in head.get("stored") or []:
                    feeds[str(name)] = _stored(store, str(key))[int(start) : int(stop)]
                if isinstance(session, OrtSession):
                    outputs = session.run(head["fetches"], feeds)
                else:
                    outputs = run_retrying_aborts(tf, functools.partial(session.run, head["fetches"], feeds))
                del feeds, values
                outputs, stashed = _stash(store, outputs, list(head.get("stash") or []))
                meta, data = encode_arrays(outputs)
                _send(reply, {"ok": True, "arrays": meta, "stashed": stashed}, data)
            elif head["op"] == "drop":
                for key in head["keys"]:
                    store.pop(str(key), None)
                _send(reply, {"ok": True})
            elif head["op"] == "freeze":
                _freeze(head, reply)
            elif head["op"] == "ort_load":
                session = None
                session = OrtSession(str(head["path"]) if head.get("path") else payload)
                payload = b""
                _send(reply, {"ok": True, "inputs": session.inputs})
            elif head["op"] == "onnx_eval":
                meta, data = encode_arrays(_onnx_eval(head, payload))
                _send(reply, {"ok": True, "arrays": meta}, data)
            elif head["op"] == "tf2onnx":
                _tf2onnx(head, payload, reply)
            elif head["op"] == "keras_fold":
                _keras_fold(head, payload, reply)
            elif head["op"] == "keras_recalibrate":
                _keras_recalibrate(head, payload, reply)
            elif head["op"] == "selftest":
                answers = sandbox.self_test(tempfile.gettempdir(), head["outside"], head["secret"], int(head["port"]))
                _send(reply, {"ok": True, "answers": answers, "abi": sandbox.landlock_abi()})
            elif head["op"] == "unload":
                if session is not None:
                    session.close()
                session = None
                _send(reply, {"ok": True})
            else:
                raise ValueError(f"unknown request {head['op']!r}")
        except caught as exc:
            kind = type(exc).__name__
            message_text = op_error_text(getattr(exc, "message", None) or str(exc))
            _send(reply, {"ok": False, "kind": kind, "message": message_text})
