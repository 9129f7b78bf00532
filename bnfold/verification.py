"""Prove the folded graph computes what the original did, before anything is written.

Both graphs run in TensorFlow on the same inputs; every output passes when
``max|a - b| <= atol + rtol * max|a|``. A batch-independence check then runs
one sample alone and inside its batch: a graph whose result depends on the
batch still normalizes with batch statistics (BN left in training mode).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import graph_pb2, types_pb2
from tensorflow.core.protobuf import config_pb2, rewriter_config_pb2

from bnfold.errors import UsageError, VerificationError, first_line
from bnfold.graph import attr, parse_input

# Default tolerances per output dtype, chosen from measured fold errors (README: "Tolerances").
TOLERANCES: dict[int, tuple[float, float]] = {
    types_pb2.DT_DOUBLE: (1e-9, 1e-12),
    types_pb2.DT_FLOAT: (1e-4, 1e-6),
    types_pb2.DT_HALF: (1e-2, 1e-3),
    types_pb2.DT_BFLOAT16: (5e-2, 1e-2),
}
DEFAULT_BATCH = 2
NON_OUTPUT_OPS = {"Const", "NoOp", "Placeholder", "PlaceholderWithDefault", "Assert", "SaveV2", "RestoreV2"}


@dataclass(frozen=True)
class CheckOptions:
    """How a check is run (``--feed``, ``--input-shape``, ``--rtol/--atol``, ``--samples``, ``--seed``), as one value.

    ``feeds`` maps a placeholder (or any internal tensor, ``"Mfcc:0"``) to a value
    used in every batch; other inputs are drawn at random, anew for each of the
    ``samples`` batches. ``on_batch(done, total)`` reports progress.
    """

    feeds: dict[str, np.ndarray] = field(default_factory=dict)
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    rtol: float | None = None
    atol: float | None = None
    samples: int = 1
    seed: int = 0
    batch_check: bool = True
    on_batch: Callable[[int, int], None] | None = None


@dataclass
class InputSpec:
    name: str
    dtype: int
    shape: list[int | None] | None


@dataclass
class OutputCheck:
    """The comparison of one output."""

    name: str
    max_abs_error: float
    max_rel_error: float
    max_abs_value: float
    rtol: float
    atol: float
    passed: bool


@dataclass
class Verification:
    """The whole check: per-output results, batch independence, and how inputs were made."""

    outputs: list[OutputCheck] = field(default_factory=list)
    inputs: dict[str, str] = field(default_factory=dict)
    samples: int = 1
    batch_independent: bool | None = None
    batch_error: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outputs) and self.batch_independent is not False

    def worst(self) -> OutputCheck | None:
        failing = [o for o in self.outputs if not o.passed] or self.outputs
        return max(failing, key=lambda o: o.max_abs_error - (o.atol + o.rtol * o.max_abs_value), default=None)

    def to_json(self) -> dict[str, object]:
        data = asdict(self)
        data["passed"] = self.passed
        return data


def find_inputs(graph_def: graph_pb2.GraphDef) -> list[InputSpec]:
    """The graph's placeholders, with their declared dtype and shape."""
    specs = []
    for node in graph_def.node:
        if node.op == "Placeholder":
            shape_proto = attr(node, "shape").shape
            shape = (
                None if shape_proto.unknown_rank or "shape" not in node.attr else [d.size if d.size >= 0 else None for d in shape_proto.dim]
            )
            specs.append(InputSpec(node.name, attr(node, "dtype").type, shape))
    return specs


def find_outputs(graph_def: graph_pb2.GraphDef) -> list[str]:
    """Sinks: nodes no other node reads data from, that compute something."""
    read = {parse_input(ref)[0] for node in graph_def.node for ref in node.input if not ref.startswith("^")}
    return [n.name for n in graph_def.node if n.name not in read and n.op not in NON_OUTPUT_OPS]


def parse_feed_value(text: str) -> np.ndarray:
    """A feed from the command line: a ``.npy`` path, ``true``/``false``, or a number."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return np.array(lowered == "true")
    if text.endswith(".npy"):
        path = Path(text)
        if not path.is_file():
            raise UsageError(f"--feed: {text}: no such .npy file")
        try:
            return np.load(path, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise UsageError(f"--feed: {text}: not a readable .npy file ({exc})") from None
    try:
        return np.array(float(text))
    except ValueError:
        raise UsageError(f"--feed: {text!r} is not a .npy path, true/false or a number") from None


class Runner(Protocol):
    """What verification needs of a runtime: run outputs on feeds, and the errors meaning "cannot run this"."""

    errors: tuple[type[BaseException], ...]

    def run(self, fetches: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]: ...

    def close(self) -> None: ...


def runner_config() -> config_pb2.ConfigProto:
    """Grappler's layout pass only, converting NCHW to NHWC on the CPU.

    TensorFlow's CPU kernels run NCHW convolutions only through oneDNN, which
    TensorFlow turns off on CPUs without AVX-512; the layout pass makes such
    graphs runnable everywhere. It is exact (transposes around the op), and
    both graphs of a check get it alike.
    """
    config = config_pb2.ConfigProto()
    rewrites = config.graph_options.rewrite_options
    rewrites.optimizers.append("layout")
    rewrites.cpu_layout_conversion = rewriter_config_pb2.RewriterConfig.NCHW_TO_NHWC
    return config


class GraphRunner:
    """One imported graph and session, reused across batches.

    Grappler is off but for its layout pass (:func:`runner_config`): the check
    compares the graphs as written (as onnxruntime runs with optimizations off
    for ONNX), and grappler's other rewrites cost more
    than the run itself on large models (0.9 GB graph: 11 GB and 58 s with it,
    5.9 GB and 10 s without).
    """

    errors: tuple[type[BaseException], ...] = (tf.errors.OpError, ValueError, TypeError, KeyError)

    def __init__(self, graph_def: graph_pb2.GraphDef) -> None:
        self.graph = tf.Graph()
        with self.graph.as_default():
            tf.graph_util.import_graph_def(graph_def, name="")
        self.session = tf.compat.v1.Session(graph=self.graph, config=runner_config())

    def run(self, fetches: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run([_tensor_name(f) for f in fetches], {_tensor_name(k): v for k, v in feeds.items()})

    def close(self) -> None:
        self.session.close()
        del self.session, self.graph


def open_graph_runner(graph_def: graph_pb2.GraphDef, which: str, hint: str = "; --no-verify skips the check") -> GraphRunner:
    """Import a graph for checking; a graph TF cannot load is reported, not a crash."""
    try:
        return GraphRunner(graph_def)
    except GraphRunner.errors as exc:
        raise VerificationError(f"TensorFlow cannot load {which} ({first_line(exc)}){hint}") from None


def _run_batch(runner: Runner, outputs: list[str], feeds: dict[str, np.ndarray], tick: Callable[[], None]) -> list[np.ndarray]:
    tick()
    try:
        return runner.run(outputs, feeds)
    except runner.errors as exc:
        raise VerificationError(f"could not run the model for verification: {first_line(exc)}") from None


def _tensor_name(ref: str) -> str:
    name, index, _ = parse_input(ref)
    return f"{name}:{index}"


def _synthesize(spec: InputSpec, shape_override: list[int] | None, batch: int, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    np_dtype = tf.dtypes.as_dtype(spec.dtype).as_numpy_dtype
    if shape_override is not None:
        shape, how = shape_override, "--input-shape"
    elif spec.shape is None:
        raise VerificationError(f"input {spec.name!r} has unknown rank; give --input-shape {spec.name}=D0,D1,... or --no-verify")
    else:
        shape = list(spec.shape)
        how = "declared shape"
        if shape and shape[0] is None:
            shape[0] = batch
            how = f"declared shape, batch {batch} (default)"
        if any(d is None for d in shape):
            raise VerificationError(
                f"input {spec.name!r} has unknown dimensions {spec.shape}; give --input-shape {spec.name}=D0,D1,... or --no-verify"
            )
    kind = tf.dtypes.as_dtype(spec.dtype)
    if kind.is_floating:
        value = rng.standard_normal(shape).astype(np_dtype)
    elif kind.is_bool:
        value = np.zeros(shape, dtype=bool)
        how += ", all false"
    elif kind.is_integer:
        value = rng.integers(0, 8, size=shape).astype(np_dtype)
    else:
        raise VerificationError(
            f"input {spec.name!r} is {kind.name}; bnfold cannot make such data: pass --feed {spec.name}=... or --no-verify"
        )
    return value, f"random {kind.name} {list(shape)} ({how})"


def compare(name: str, a: np.ndarray, b: np.ndarray, rtol: float, atol: float) -> OutputCheck:
    a64, b64 = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a64.shape != b64.shape:
        return OutputCheck(name, float("inf"), float("inf"), 0.0, rtol, atol, False)
    with np.errstate(all="ignore"):
        diff = np.abs(a64 - b64)
        same_nonfinite = (~np.isfinite(a64)) & (a64 == b64) | (np.isnan(a64) & np.isnan(b64))
        diff = np.where(same_nonfinite, 0.0, diff)
        finite = np.abs(a64[np.isfinite(a64)])
        max_abs_value = float(finite.max()) if finite.size else 0.0
        max_abs = float(np.nan_to_num(diff, nan=np.inf).max()) if diff.size else 0.0
        max_rel = max_abs / max_abs_value if max_abs_value else (0.0 if max_abs == 0 else float("inf"))
    return OutputCheck(name, max_abs, max_rel, max_abs_value, rtol, atol, max_abs <= atol + rtol * max_abs_value)


def needed_inputs(graph_def: graph_pb2.GraphDef, outputs: list[str], fed: set[str]) -> set[str]:
    """Placeholders the outputs depend on, not counting those behind a fed tensor.

    Lets a user feed an internal tensor (``Mfcc:0``) in place of a string input
    that bnfold cannot synthesize.
    """
    nodes = {n.name: n for n in graph_def.node}
    stack = [parse_input(o)[0] for o in outputs]
    seen: set[str] = set()
    found: set[str] = set()
    while stack:
        name = stack.pop()
        if name in seen or name not in nodes:
            continue
        seen.add(name)
        if name in fed:
            continue
        node = nodes[name]
        if node.op == "Placeholder":
            found.add(name)
        stack.extend(parse_input(r)[0] for r in node.input)
    return found


def _as_graph_def(graph: graph_pb2.GraphDef | str | os.PathLike[str]) -> graph_pb2.GraphDef:
    if isinstance(graph, graph_pb2.GraphDef):
        return graph
    from bnfold.io import load_graph_def

    return load_graph_def(graph)


def verify(
    original: graph_pb2.GraphDef | str | os.PathLike[str],
    folded: graph_pb2.GraphDef | str | os.PathLike[str],
    inputs: list[str] | None = None,
    outputs: list[str] | None = None,
    feeds: dict[str, np.ndarray] | None = None,
    input_shapes: dict[str, list[int]] | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    samples: int = 1,
    seed: int = 0,
    batch_check: bool = True,
    on_batch: Callable[[int, int], None] | None = None,
) -> Verification:
    """Run both graphs (GraphDefs or paths) on the same inputs and compare every output.

    The keyword arguments are those of :class:`CheckOptions`.
    """
    original, folded = _as_graph_def(original), _as_graph_def(folded)
    feeds = dict(feeds or {})
    specs = {s.name: s for s in find_inputs(original)}
    if inputs:
        missing = [n for n in inputs if n not in specs]
        if missing:
            raise UsageError(f"--inputs: {missing[0]!r} is not a placeholder of the graph")
        specs = {n: specs[n] for n in inputs}
    outputs = outputs or find_outputs(original)
    if not outputs:
        raise VerificationError("the graph has no outputs to compare; name them with --outputs")
    fed_names = {parse_input(k)[0] for k in feeds}
    unknown = [k for k in fed_names if k not in {n.name for n in original.node}]
    if unknown:
        raise UsageError(f"--feed: no node named {unknown[0]!r} in the graph")
    needed = needed_inputs(original, outputs, fed_names)
    specs = {n: s for n, s in specs.items() if n in needed}
    options = CheckOptions(feeds, input_shapes or {}, rtol, atol, samples, seed, batch_check, on_batch)
    return compare_runners(
        lambda: open_graph_runner(original, "the input graph"),
        lambda: open_graph_runner(folded, "the folded graph"),
        specs,
        outputs,
        options,
    )


def compare_runners(
    open_reference: Callable[[], Runner],
    open_candidate: Callable[[], Runner],
    specs: dict[str, InputSpec],
    outputs: list[str],
    options: CheckOptions,
) -> Verification:
    """The comparison both paths share (TF vs TF, TF vs onnxruntime, onnxruntime vs onnxruntime).

    Runners are opened one after the other, so only one model is loaded at a
    time: a TF session holds its own copies of every weight.
    """
    feeds, on_batch = options.feeds, options.on_batch
    fed_names = {parse_input(k)[0] for k in feeds}
    result = Verification(samples=options.samples)
    rng = np.random.default_rng(options.seed)
    per_sample: list[dict[str, np.ndarray]] = []
    for _ in range(max(1, options.samples)):
        batch_feeds = dict(feeds)
        for name, spec in specs.items():
            if name in fed_names or name in feeds:
                continue
            batch_feeds[name], how = _synthesize(spec, options.input_shapes.get(name), DEFAULT_BATCH, rng)
            result.inputs[name] = how
        per_sample.append(batch_feeds)
    for name in feeds:
        result.inputs[name] = "user feed"
    total = 2 * len(per_sample) + (1 if options.batch_check else 0)
    steps = iter(range(total + 1))

    def tick() -> None:
        if on_batch is not None:
            on_batch(next(steps), total)

    reference = open_reference()
    try:
        expected_all = [_run_batch(reference, outputs, batch, tick) for batch in per_sample]
    finally:
        reference.close()
    candidate = open_candidate()
    try:
        actual_all = [_run_batch(candidate, outputs, batch, tick) for batch in per_sample]
        checks: dict[str, OutputCheck] = {}
        for expected, actual in zip(expected_all, actual_all, strict=True):
            for name, a, b in zip(outputs, expected, actual, strict=False):
                a = np.asarray(a)
                dtype = tf.dtypes.as_dtype(a.dtype).as_datatype_enum if a.dtype != object else types_pb2.DT_FLOAT
                d_rtol, d_atol = TOLERANCES.get(dtype, TOLERANCES[types_pb2.DT_FLOAT])
                rtol = d_rtol if options.rtol is None else options.rtol
                check = compare(name, a, b, rtol, d_atol if options.atol is None else options.atol)
                prev = checks.get(name)
                if prev is None or check.max_abs_error > prev.max_abs_error:
                    check.passed = check.passed and (prev is None or prev.passed)
                    checks[name] = check
                elif not check.passed:
                    prev.passed = False
        result.outputs = list(checks.values())
        if options.batch_check:
            tick()
            _check_batch_independence(candidate, outputs, per_sample[0], specs, result)
        if on_batch is not None:
            on_batch(total, total)
    finally:
        candidate.close()
    return result


def _check_batch_independence(
    runner: Runner,
    outputs: list[str],
    batch_feeds: dict[str, np.ndarray],
    specs: dict[str, InputSpec],
    result: Verification,
) -> None:
    """Sample 0 run alone must equal sample 0 run in its batch."""
    batched = [n for n, s in specs.items() if s.shape and s.shape[0] is None and n in batch_feeds]
    if not batched or any(batch_feeds[n].shape[0] < 2 for n in batched):
        result.notes.append("batch-independence check skipped: no input with a free batch dimension and >1 sample")
        return
    single = {k: (v[:1] if k in batched else v) for k, v in batch_feeds.items()}
    try:
        alone = runner.run(outputs, single)
        together = runner.run(outputs, batch_feeds)
    except runner.errors as exc:
        result.notes.append(f"batch-independence check skipped: {first_line(exc)}")
        return
    worst = 0.0
    independent = True
    for name, a, b, check in zip(outputs, alone, together, result.outputs, strict=False):
        if a.ndim == 0 or b.ndim == 0 or a.shape[0] != 1:
            continue
        cmp = compare(name, b[:1], a, check.rtol, check.atol)
        worst = max(worst, cmp.max_abs_error)
        independent &= cmp.passed
    result.batch_independent = independent
    result.batch_error = worst


def failure_message(result: Verification) -> str:
    """One line naming what failed, for the CLI and for exceptions."""
    if result.batch_independent is False:
        return (
            f"output depends on the batch: sample 0 alone differs from sample 0 in a batch by {result.batch_error:.3g}; "
            "a BN still uses batch statistics (training mode) - see `bnfold doctor`"
        )
    worst = result.worst()
    if worst is None:
        return "nothing was compared"
    return (
        f"output {worst.name!r} differs by {worst.max_abs_error:.3g} (max |value| {worst.max_abs_value:.3g}), "
        f"over the tolerance atol={worst.atol:g} + rtol={worst.rtol:g} * max|value|"
    )
