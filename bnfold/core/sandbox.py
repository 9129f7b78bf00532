"""Confine the worker process that loads and runs models: Landlock on Linux, plus resource limits.

A model is a program (TensorFlow's SECURITY.md). bnfold's allowlist decides
from the file's bytes what may run; this module is the second layer, which
must hold alone when the allowlist misses a route: the worker that loads and
runs a model may read only the Python installation and the model's own files,
write only a private temporary directory, and (Landlock ABI 4 and later) make
no TCP connection nor listen; from ABI 6 it may not signal processes outside
itself (bnfold) nor reach abstract Unix sockets. Memory (``RLIMIT_DATA``) and
CPU time (``RLIMIT_CPU``) are capped in the worker; the wall-clock deadline is
kept by the parent (:mod:`bnfold.core.worker`), which kills a worker past it.

Landlock is used through its three system calls with ``ctypes``: the PyPI
bindings were a pre-release (``landlock`` 1.0.0.dev5) or 0.x packages a few
months old, and the calls are small and stable (kernel ABI, Linux 5.13+).

This module imports nothing heavy (no numpy): a spawned worker confines
itself before anything starts a thread, since Landlock restricts the calling
thread and the threads it starts afterwards, not threads that already run.
"""

from __future__ import annotations

import ctypes
import os
import platform
import re
import sys
import tempfile
from dataclasses import dataclass, field

# -- Landlock's kernel interface (include/uapi/linux/landlock.h) ------------------------------

_SYS_CREATE_RULESET, _SYS_ADD_RULE, _SYS_RESTRICT_SELF = 444, 445, 446  # the same on every architecture
_CREATE_RULESET_VERSION = 1
_RULE_PATH_BENEATH, _RULE_NET_PORT = 1, 2
_PR_SET_NO_NEW_PRIVS = 38

FS_EXECUTE = 1 << 0
FS_WRITE_FILE = 1 << 1
FS_READ_FILE = 1 << 2
FS_READ_DIR = 1 << 3
FS_REMOVE_DIR = 1 << 4
FS_REMOVE_FILE = 1 << 5
FS_MAKE_CHAR = 1 << 6
FS_MAKE_DIR = 1 << 7
FS_MAKE_REG = 1 << 8
FS_MAKE_SOCK = 1 << 9
FS_MAKE_FIFO = 1 << 10
FS_MAKE_BLOCK = 1 << 11
FS_MAKE_SYM = 1 << 12
FS_REFER = 1 << 13  # ABI 2
FS_TRUNCATE = 1 << 14  # ABI 3
FS_IOCTL_DEV = 1 << 15  # ABI 5
NET_BIND_TCP = 1 << 0  # ABI 4
NET_CONNECT_TCP = 1 << 1
SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0  # ABI 6
SCOPE_SIGNAL = 1 << 1

_FILE_RIGHTS = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE | FS_IOCTL_DEV  # what a rule on a file (not a directory) may grant
READ = FS_EXECUTE | FS_READ_FILE | FS_READ_DIR


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1  # __attribute__((packed)) in the kernel's header
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


# The directory that holds the bnfold package (bnfold/core/sandbox.py -> its grandparent's parent): spawned workers import
# bnfold from it, so they may read it.
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _fs_rights(abi: int) -> int:
    rights = (1 << 13) - 1
    if abi >= 2:
        rights |= FS_REFER
    if abi >= 3:
        rights |= FS_TRUNCATE
    if abi >= 5:
        rights |= FS_IOCTL_DEV
    return rights


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


_abi_cache: list[int] = []


def landlock_abi() -> int:
    """Landlock's ABI version on this kernel; 0 where there is none (not Linux, kernel < 5.13, or not enabled at boot)."""
    if not _abi_cache:
        abi = 0
        libc = _libc() if sys.platform.startswith("linux") else None
        if libc is not None:
            value = libc.syscall(ctypes.c_long(_SYS_CREATE_RULESET), None, ctypes.c_size_t(0), ctypes.c_uint32(_CREATE_RULESET_VERSION))
            abi = max(0, int(value))
        _abi_cache.append(abi)
    return _abi_cache[0]


def status() -> str:
    """One line for ``bnfold --version`` and the README: what confines the worker on this machine."""
    abi = landlock_abi()
    if abi == 0:
        if not sys.platform.startswith("linux"):
            where = f"{platform.system() or sys.platform} has no Landlock"
        else:
            where = f"kernel {platform.release()} has no Landlock enabled (Linux 5.13+ with lsm=landlock)"
        return f"sandbox: off ({where}); the allowlist stands alone; memory/CPU/time limits apply"
    what = ["files"]
    if abi >= 4:
        what.append("TCP")
    if abi >= 6:
        what.append("signals")
    return f"sandbox: Landlock ABI {abi} ({', '.join(what)}), memory/CPU/time limits"


# -- limits -----------------------------------------------------------------------------------

_GIB = 1 << 30


def _physical_memory() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 8 * _GIB


DEFAULT_TIME_LIMIT = 600.0  # seconds of wall time per request to the worker (a load, a batch of the check)


def default_memory_limit() -> int:
    """Three quarters of the machine's memory: a model may use most of it, but not push the machine into swap or the OOM killer."""
    return max(2 * _GIB, _physical_memory() * 3 // 4)


@dataclass
class Limits:
    """What the worker may use. ``memory``: bytes of data (``RLIMIT_DATA``: heap, anonymous and private
    writable mappings; TensorFlow's reserved but untouched address space does not count, where
    ``RLIMIT_AS`` would). ``time``: wall seconds per request, and ``time`` x cores of CPU time for the worker."""

    memory: int = field(default_factory=default_memory_limit)
    time: float = DEFAULT_TIME_LIMIT
    read_paths: list[str] = field(default_factory=list)  # the model's files: a SavedModel's assets, a Keras file
    private_dir: str = ""  # made and removed by the parent; the one place the worker may write


limits = Limits()


def configure(memory_limit: int | None = None, time_limit: float | None = None) -> None:
    """Set the worker's limits for workers started from now on (the CLI's ``--memory-limit``/``--time-limit``)."""
    if memory_limit is not None:
        limits.memory = int(memory_limit)
    if time_limit is not None:
        limits.time = float(time_limit)


def allow_read(path: str | os.PathLike[str]) -> None:
    """Let workers started from now on read ``path`` (a model's file or directory), and nothing else of the user's."""
    real = os.path.realpath(path)
    if real not in limits.read_paths:
        limits.read_paths.append(real)


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``8G``, ``512M``, ``1.5GiB``, ``1000000`` (bytes) -> bytes; binary multiples. ValueError otherwise."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(text)
    number, unit = float(match.group(1)), match.group(2).lower()
    size = int(number * (1 << (10 * " kmgt".index(unit or " "))))
    if size <= 0:
        raise ValueError(text)
    return size


# -- confining the worker -------------------------------------------------------------------


def _python_paths() -> list[str]:
    """What the interpreter reads when it imports: its prefixes, every sys.path entry, bnfold itself."""
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, PACKAGE_ROOT}
    # Not sys.path[0]: the directory of the script that runs bnfold (or the working directory), which is the user's.
    paths.update(p for p in sys.path[1:] if p and os.path.isabs(p))
    if sys.executable:
        paths.add(os.path.dirname(os.path.realpath(sys.executable)))
    return sorted(paths)


# System files TensorFlow, onnxruntime and the dynamic loader read: libraries, CPU and cgroup facts, time zones.
SYSTEM_READ = ["/usr", "/lib", "/lib32", "/lib64", "/opt", "/etc/ld.so.cache", "/etc/localtime", "/etc/nsswitch.conf",
               "/etc/passwd", "/etc/group", "/proc", "/sys/devices/system/cpu", "/sys/fs/cgroup", "/dev/urandom", "/dev/random"]  # fmt: skip
SYSTEM_READ_WRITE = ["/dev/null", "/dev/zero", "/dev/shm"]


def _gpu_devices() -> list[str]:
    try:
        return [os.path.join("/dev", name) for name in os.listdir("/dev") if name.startswith(("nvidia", "dri", "kfd"))]
    except OSError:
        return []


@dataclass
class Confinement:
    """What :func:`confine` did, for the worker's self-test and the parent's messages."""

    landlock_abi: int = 0
    private_dir: str = ""
    errors: list[str] = field(default_factory=list)


def confine(settings: Limits | None = None) -> Confinement:
    """Confine this process (its calling thread and everything it starts later) for good.

    Call it in the worker before it imports TensorFlow or reads a model, while
    it has one thread. Limits are set everywhere they exist; Landlock where the
    kernel has it. Nothing here can be undone by the process afterwards.
    """
    settings = settings or limits
    done = Confinement()
    done.private_dir = settings.private_dir or tempfile.mkdtemp(prefix="bnfold-worker-")
    os.environ["TMPDIR"] = done.private_dir
    os.environ["KERAS_HOME"] = os.path.join(done.private_dir, "keras")
    tempfile.tempdir = done.private_dir
    _set_limits(settings, done)
    abi = landlock_abi()
    if abi:
        try:
            _landlock(abi, settings.read_paths, done.private_dir)
            done.landlock_abi = abi
        except OSError as exc:
            done.errors.append(f"landlock: {exc}")
    return done


def _set_limits(settings: Limits, done: Confinement) -> None:
    try:
        import resource
    except ImportError:  # Windows
        done.errors.append("no resource limits on this platform")
        return
    cpu = max(1, int(settings.time * (os.cpu_count() or 1)))
    # CPU: SIGXCPU at the soft limit ends the worker; the hard limit a little later is the backstop.
    for name, soft, hard in (("RLIMIT_DATA", settings.memory, settings.memory), ("RLIMIT_CPU", cpu, cpu + 5), ("RLIMIT_CORE", 0, 0)):
        which = getattr(resource, name, None)
        if which is None:
            continue
        try:
            _, current = resource.getrlimit(which)
            if current != resource.RLIM_INFINITY:
                soft, hard = min(soft, current), min(hard, current)
            resource.setrlimit(which, (soft, hard))
        except (OSError, ValueError) as exc:
            done.errors.append(f"{name}: {exc}")


def _landlock(abi: int, read_paths: list[str], private_dir: str) -> None:
    libc = _libc()
    if libc is None:
        raise OSError("no C library to call Landlock through")
    fs = _fs_rights(abi)
    attr = _RulesetAttr(fs, NET_BIND_TCP | NET_CONNECT_TCP if abi >= 4 else 0, SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if abi >= 6 else 0)
    size = ctypes.sizeof(_RulesetAttr) if abi >= 6 else (16 if abi >= 4 else 8)
    ruleset = libc.syscall(ctypes.c_long(_SYS_CREATE_RULESET), ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if ruleset < 0:
        raise OSError(ctypes.get_errno(), f"landlock_create_ruleset: {os.strerror(ctypes.get_errno())}")
    try:
        for path in [*SYSTEM_READ, *_python_paths(), *read_paths]:
            _allow(libc, ruleset, path, READ & fs)
        write = fs & ~(FS_EXECUTE | FS_MAKE_CHAR | FS_MAKE_BLOCK)
        for path in [*SYSTEM_READ_WRITE, *_gpu_devices()]:
            _allow(libc, ruleset, path, READ | FS_WRITE_FILE | (FS_IOCTL_DEV & fs) | (FS_TRUNCATE & fs))
        _allow(libc, ruleset, private_dir, write)
        if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), f"prctl(NO_NEW_PRIVS): {os.strerror(ctypes.get_errno())}")
        if libc.syscall(ctypes.c_long(_SYS_RESTRICT_SELF), ctypes.c_int(ruleset), ctypes.c_uint32(0)) != 0:
            raise OSError(ctypes.get_errno(), f"landlock_restrict_self: {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(ruleset)


def _allow(libc: ctypes.CDLL, ruleset: int, path: str, rights: int) -> None:
    """One path-beneath rule; a path that does not exist here is skipped (not every system has /lib32)."""
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError:
        return
    try:
        if not os.path.isdir(path):
            rights &= _FILE_RIGHTS
        rule = _PathBeneathAttr(rights, fd)
        if libc.syscall(ctypes.c_long(_SYS_ADD_RULE), ctypes.c_int(ruleset), ctypes.c_int(_RULE_PATH_BENEATH), ctypes.byref(rule), ctypes.c_uint32(0)) != 0:
            raise OSError(ctypes.get_errno(), f"landlock_add_rule {path!r}: {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(fd)


def self_test(private_dir: str, outside: str, secret: str, port: int) -> dict[str, str]:
    """Try what a hostile model would, from inside the confined worker: each answer is ``blocked`` or what happened.

    ``outside``: a path the worker must not create; ``secret``: a file of the user's it must not read;
    ``port``: a TCP port on 127.0.0.1 that listens.
    """
    import errno
    import socket

    answers: dict[str, str] = {}

    def attempt(name: str, action: object) -> None:
        try:
            action()  # type: ignore[operator]
            answers[name] = "allowed"
        except OSError as exc:
            answers[name] = "blocked" if exc.errno in (errno.EACCES, errno.EPERM) else f"failed ({exc.strerror})"

    def write_outside() -> None:
        with open(outside, "w") as handle:
            handle.write("hostile")

    def write_private() -> None:
        with open(os.path.join(private_dir, "ok"), "w") as handle:
            handle.write("fine")

    def connect() -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass

    def listen() -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))

    def read_secret() -> None:
        with open(secret, "rb") as handle:
            handle.read()

    attempt("write_outside", write_outside)
    attempt("write_private", write_private)
    attempt("tcp_connect", connect)
    attempt("tcp_bind", listen)
    attempt("read_secret", read_secret)
    return answers
