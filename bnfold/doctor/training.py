"""``bnfold doctor`` on TF 1.x training artifacts: a checkpoint and the MetaGraphDef beside it.

A frozen graph has lost the evidence of the TF1 training mistakes users ask
about (update ops not wired to the train op, ``UPDATE_OPS`` collected before
the other towers existed, ``decay=1``/``0``, a validation BN that shares no
variables with the trained one). The training graph still holds it, and the
checkpoint holds what training made of the statistics.

Nothing of the graph is run here: the MetaGraphDef is analysed as a proto
(``graph_def`` and its collections), and variable values are read from the
checkpoint files with ``tf.train.load_checkpoint``, which runs no graph.
Only an inference path the user names (``--outputs``) is frozen, by replacing
its variables with the checkpoint's values.

This module finds and opens the files and freezes the inference path;
:mod:`bnfold.doctor.training_graph` analyses the training graph and turns it
and the checkpoint's values into findings.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf.message import DecodeError
from tensorflow.core.framework import graph_pb2
from tensorflow.core.protobuf import meta_graph_pb2

from bnfold.core.errors import InputError, UsageError, first_line
from bnfold.doctor.training_graph import ASSIGN_OPS, OPTIMIZER_PREFIXES, VARIABLE_OPS
from bnfold.tf.graph import parse_input


# -- finding the files -------------------------------------------------------------
@dataclass
class Artifacts:
    """A training graph and the checkpoint that holds its variables."""

    meta_path: Path
    prefix: str
    meta: meta_graph_pb2.MetaGraphDef
    reader: Any  # tf.train.CheckpointReader
    note: str | None = None  # how the checkpoint was found, when it was not where the checkpoint file said

    @property
    def source(self) -> str:
        return self.prefix if str(self.meta_path) == self.prefix + ".meta" else f"{self.meta_path} + {self.prefix}"


def _is_meta(path: Path) -> bool:
    # by name, not Path.suffix: a checkpoint whose prefix is a directory has a file named just ".meta"
    return path.name.endswith(".meta")


def is_checkpoint(path: Path) -> bool:
    """A ``.meta`` file, a checkpoint prefix (``model.ckpt-1000``, or a directory ``ckpt/`` whose files are
    ``ckpt/.index``...), or a directory with a ``checkpoint`` file."""
    if _is_meta(path):
        return True
    if Path(f"{path}.index").exists() or Path(f"{path}.meta").exists():
        return True
    if not path.is_dir() or (path / "saved_model.pb").exists():
        return False
    return (path / "checkpoint").is_file() or (path / ".index").is_file()


def _state_prefix(directory: Path) -> str | None:
    """The prefix a directory's ``checkpoint`` file names (relative names are relative to the directory), read
    without TensorFlow's ``latest_checkpoint``, which logs an error line when the file names a missing path."""
    from google.protobuf import text_format
    from tensorflow.python.training import checkpoint_state_pb2

    state = checkpoint_state_pb2.CheckpointState()
    try:
        text_format.Parse((directory / "checkpoint").read_text(errors="replace"), state)
    except (OSError, text_format.ParseError):
        return None
    named = state.model_checkpoint_path
    if not named:
        return None
    return named if os.path.isabs(named) else os.path.join(str(directory), named)


def _present(prefix: str) -> bool:
    return Path(prefix + ".index").is_file()


def find_prefix(path: Path) -> tuple[str, str | None]:
    """The checkpoint prefix ``path`` means, found the way ``Saver.restore`` finds one, and a note when it was a guess.

    ``path`` may be a prefix (``model.ckpt-1000``, or a directory whose files are
    ``dir/.index``: a prefix ending in ``/``), one of its files, or a directory
    with a ``checkpoint`` file. That file often names the author's own absolute
    path: when the prefix it names is not there, the checkpoint actually beside
    it is used (the one with the same file name, else the newest), and the note
    says so.
    """
    text = str(path)
    if path.is_dir():
        own = os.path.join(text, "")  # the directory itself as a prefix: dir/.index, dir/.meta
        named = _state_prefix(path) if (path / "checkpoint").is_file() else None
        if named is not None and _present(named):
            return named, None
        if _present(own) and named is None:
            return own, None
        here = sorted(
            (str(index)[: -len(".index")] for index in path.glob("*.index") if index.is_file()),
            key=lambda p: Path(p + ".index").stat().st_mtime,
        )
        if not here:
            said = f"its checkpoint file names {named}, which is not there, and " if named else ""
            raise InputError(f"{path}: {said}no checkpoint (.index) is in the directory; pass the checkpoint prefix")
        if named is None:
            return here[-1], None
        base = os.path.join(text, os.path.basename(named))
        chosen = base if base in here else here[-1]
        return chosen, f"the checkpoint file names {named}, which is not here; read {chosen}, the checkpoint beside it"
    for suffix in (".index", ".meta"):
        if text.endswith(suffix):
            return text[: -len(suffix)], None
    if ".data-" in path.name:
        return text.rsplit(".data-", 1)[0], None
    return text, None


def open_artifacts(path: Path, checkpoint: Path | None = None) -> Artifacts:
    """Find the ``.meta`` and the checkpoint for ``path``; read the proto and open the checkpoint's reader."""
    import tensorflow as tf

    note = None
    if _is_meta(path):
        meta_path = path
        if checkpoint is not None:
            prefix, note = find_prefix(checkpoint)
        elif _present(str(path)[: -len(".meta")]):
            prefix = str(path)[: -len(".meta")]
        else:
            try:
                prefix, note = find_prefix(path.parent)
            except InputError:
                raise InputError(
                    f"{path}: no checkpoint beside this .meta; give it with --checkpoint PREFIX (like model.ckpt-1000)"
                ) from None
    else:
        if checkpoint is not None:
            raise UsageError(f"--checkpoint: {path} is already a checkpoint; --checkpoint goes with a .meta file")
        prefix, note = find_prefix(path)
        meta_path = Path(prefix + ".meta")
        if not meta_path.is_file():
            raise InputError(
                f"{prefix}: no {meta_path.name} beside the checkpoint (the training graph); "
                "pass the .meta file and the checkpoint: bnfold doctor graph.meta --checkpoint PREFIX"
            )
    if not meta_path.is_file():
        raise InputError(f"{meta_path}: no such file")
    meta = meta_graph_pb2.MetaGraphDef()
    try:
        meta.ParseFromString(meta_path.read_bytes())
    except (DecodeError, RuntimeWarning, ValueError) as exc:
        raise InputError(f"{meta_path}: not a MetaGraphDef ({first_line(exc)}); pass the .meta that tf.train.Saver wrote") from None
    if not meta.graph_def.node:
        raise InputError(f"{meta_path}: the MetaGraphDef holds no graph")
    if not _present(prefix):
        raise InputError(f"{prefix}: no checkpoint with this prefix ({Path(prefix + '.index').name} is missing); pass its prefix, like model.ckpt-1000")
    try:
        reader = tf.compat.v1.train.NewCheckpointReader(prefix)  # the prefix as given: load_checkpoint would read dir/ as a directory
    except (tf.errors.OpError, ValueError) as exc:
        raise InputError(f"{prefix}: cannot read the checkpoint ({first_line(exc)}); pass its prefix, like model.ckpt-1000") from None
    return Artifacts(meta_path, prefix, meta, reader, note)



# -- the inference path ---------------------------------------------------------------
def freeze_inference_path(artifacts: Artifacts, outputs: list[str]) -> graph_pb2.GraphDef:
    """The subgraph behind ``outputs`` with every variable replaced by its checkpoint value.

    Control edges from update and optimizer ops are cut first: the inference
    path must not carry training steps. Uses TF's own converter with values from
    the checkpoint reader instead of a session, so nothing is run.
    """
    from tensorflow.python.framework import convert_to_constants as ctc
    from tensorflow.python.framework import graph_util

    graph_def = graph_pb2.GraphDef()
    graph_def.CopyFrom(artifacts.meta.graph_def)
    names = {n.name: n for n in graph_def.node}
    wanted = [parse_input(o)[0] for o in outputs]
    missing = [o for o in wanted if o not in names]
    if missing:
        raise UsageError(f"--outputs: no node named {missing[0]!r} in the training graph")
    training_ops = {n.name for n in graph_def.node if n.op in ASSIGN_OPS or n.op.startswith(OPTIMIZER_PREFIXES)}
    for node in graph_def.node:
        keep = [r for r in node.input if not (r.startswith("^") and r[1:] in training_ops)]
        if len(keep) != len(node.input):
            del node.input[:]
            node.input.extend(keep)
    from tensorflow.python.util import deprecation

    with deprecation.silence():
        sub = graph_util.extract_sub_graph(graph_def, wanted)
    reader = artifacts.reader

    class CheckpointData(ctc._ConverterData):  # noqa: SLF001 - TF's converter, fed from the checkpoint
        def __init__(self) -> None:
            super().__init__(sub)
            for node in self.graph_def.node:
                if node.op in VARIABLE_OPS:
                    if not reader.has_tensor(node.name):
                        raise InputError(
                            f"{artifacts.prefix}: the checkpoint has no value for variable {node.name!r} of the inference path"
                        )
                    self._tensor_data[node.name] = ctc._TensorData(  # noqa: SLF001
                        numpy=np.asarray(reader.get_tensor(node.name)), dtype=node.attr["dtype"].type, index=None
                    )

    try:
        frozen, _ = ctc._replace_variables_by_constants(converter_data=CheckpointData())  # noqa: SLF001
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{artifacts.meta_path}: cannot freeze the path to {', '.join(wanted)} ({first_line(exc)})") from None
    return frozen
