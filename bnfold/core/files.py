"""File reads and atomic writes shared by every format, without TensorFlow.

Writes go to a temporary file in the destination directory and are renamed into
place, so an interrupted run never leaves a half-written model behind and the
input is never touched. ONNX-only runs use this module so that they need no
TensorFlow; :mod:`bnfold.tf.io` re-exports it for the TF side.
"""

from __future__ import annotations

import os
import signal
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from bnfold.core.errors import InputError, OutputError


def read_bytes(path: Path) -> bytes:
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, not a frozen graph (.pb/.pbtxt)")
    try:
        return path.read_bytes()
    except PermissionError:
        raise InputError(f"{path}: permission denied; make the file readable") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror})") from None


def check_input_kind(path: Path) -> None:
    """IN is a regular file or a directory (a SavedModel), checked before anything opens it.

    A FIFO would block the read forever, a device (``/dev/zero``) would be read
    until memory runs out, a socket cannot be read: each is refused at once.
    A path that does not exist is left to the loader (a TF1 checkpoint prefix is
    no file, and the loaders say "no such file" with their own hint).
    """
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return
    kind = "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file"
    raise InputError(f"{path}: is {kind}, not a model file; give a model file or a SavedModel directory")


def check_not_input(src: Path | None, dst: Path | None, option: str) -> None:
    """No output may be the input, or a file inside an input directory, by its path or through a link (exit 5).

    ``--report IN`` or ``--json`` into a SavedModel directory would replace part
    of the model that bnfold promises never to modify.
    """
    if src is None or dst is None or not os.path.lexists(src):
        return
    source = os.path.realpath(src)
    target = os.path.realpath(dst)  # follows a link at dst, and links among its parents
    inside = os.path.isdir(source) and os.path.commonpath([source, target]) == source
    same = target == source or (os.path.exists(dst) and os.path.exists(src) and os.path.samefile(src, dst))  # a hard link
    if same or inside:
        where = "is the input" if same else f"is inside the input {src}"
        raise OutputError(f"{dst}: {option} {where}; choose a path outside the model")


def check_output_path(src: Path | None, dst: Path, in_place: bool = False, directory: bool = False) -> None:
    """Fail before any work when the result could not be written or would replace the input."""
    if src is not None and src.exists() and dst.exists() and os.path.samefile(src, dst) and not in_place:
        raise OutputError(f"{dst}: is the input; choose another output path or pass --in-place")
    parent = dst.parent if str(dst.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"{dst}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{dst}: directory {parent} is not writable")
    if directory:
        if dst.exists() and not dst.is_dir():
            raise OutputError(f"{dst}: exists and is not a directory; a SavedModel output is a directory")
        if dst.is_dir() and any(dst.iterdir()) and not (dst / "saved_model.pb").exists():
            raise OutputError(f"{dst}: is a non-empty directory that is not a SavedModel; bnfold will not replace it")
    elif dst.is_dir():
        raise OutputError(f"{dst}: is a directory; give a file name ending in .pb, .pbtxt or .onnx")


@contextmanager
def terminating_cleanly() -> Iterator[None]:
    """Turn SIGTERM into ``SystemExit(143)`` while a write runs, so its cleanup (``except BaseException``) runs.

    Python's default SIGTERM kills the process on the spot, leaving ``.out.pb.*.tmp``
    behind; only Ctrl-C (KeyboardInterrupt) cleaned up. Signals can be set only
    from the main thread: elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def atomic_write(dst: Path, write: Callable[[Path], object]) -> None:
    """Let ``write`` fill a temporary file beside ``dst``, then rename it over ``dst``."""
    with terminating_cleanly():
        _atomic_write(dst, write)


def _atomic_write(dst: Path, write: Callable[[Path], object]) -> None:
    parent = dst.parent if str(dst.parent) else Path(".")
    try:  # a directory that passed os.access can still refuse (root on sysfs, a read-only mount)
        fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=parent)
    except OSError as exc:
        raise OutputError(f"{dst}: cannot write ({exc.strerror or exc})") from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        mode = 0o644 & ~_umask()
        os.chmod(tmp_path, mode)
        os.replace(tmp_path, dst)
    except OSError as exc:
        tmp_path.unlink(missing_ok=True)
        raise OutputError(f"{dst}: cannot write ({exc.strerror or exc})") from None
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def atomic_write_many(writes: dict[Path, Callable[[Path], object]]) -> None:
    """Write several files that belong together (a model and its data file) all-or-nothing.

    Every file is filled in a temporary beside its destination first; only when
    all writes succeeded are they renamed into place, data files before the model
    that names them, so a reader never sees a model whose data is missing.
    """
    with terminating_cleanly():
        _atomic_write_many(writes)


def _atomic_write_many(writes: dict[Path, Callable[[Path], object]]) -> None:
    temps: dict[Path, Path] = {}
    try:
        for dst, write in writes.items():
            parent = dst.parent if str(dst.parent) else Path(".")
            fd, name = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=parent)
            os.close(fd)
            temps[dst] = Path(name)
            write(temps[dst])
            os.chmod(temps[dst], 0o644 & ~_umask())
        for dst in reversed(list(writes)):
            os.replace(temps[dst], dst)
    except OSError as exc:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
        raise OutputError(f"{next(iter(writes))}: cannot write ({exc.strerror or exc})") from None
    except BaseException:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
