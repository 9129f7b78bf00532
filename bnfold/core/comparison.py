"""Compare a model with its folded version: the check every format shares.

Numpy only, no framework import: a :class:`Runner` (TensorFlow session,
onnxruntime session, Keras model) runs a model, and :func:`compare_runners`
feeds both the same inputs and compares every output by
``max|a - b| <= atol + rtol * max|a|``. A batch-independence check then runs
one sample alone and inside its batch: a model whose result depends on the
batch still normalizes with batch statistics (BN left in training mode).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypedDict

import numpy as np

from bnfold.core.budgets import BudgetExceeded, Tally
from bnfold.core.errors import UsageError, VerificationError, first_line


def parse_input(ref: str) -> tuple[str, int, bool]:
    """Split a tensor reference (``name``, ``name:1``, ``^name``) into node, output index and control flag."""
    if ref.startswith("^"):
        return ref[1:], -1, True
    name, sep, port = ref.rpartition(":")
    if sep and port.isdigit():
        return name, int(port), False
    return ref, 0, False


def dtype_name(dtype: np.dtype) -> str:
    """A dtype as users know it: ``string`` for object arrays, else numpy's name (``bfloat16`` included)."""
    return "string" if dtype.kind in "OSU" else dtype.name


# Default tolerances per output dtype, chosen from measured fold errors (docs/verification.md).
TOLERANCES: dict[str, tuple[float, float]] = {
    "float64": (1e-9, 1e-12),
    "float32": (1e-4, 1e-6),
    "float16": (1e-2, 1e-3),
    "bfloat16": (5e-2, 1e-2),
}
DEFAULT_BATCH = 2
# Height and width given to image-like inputs whose spatial size is unknown (docs/verification.md).
# 64 survives five stride-2 stages (ResNet, MobileNet) and keeps the check fast.
DEFAULT_IMAGE_SIZE = 64
# What an output's max abs error must not exceed; the report shows the number, the JSON also the formula.
TOLERANCE_FORMULA = "atol + rtol * max_abs_value"


class CheckArgs(TypedDict, total=False):
    """The check's options as keyword arguments: every entry point takes them as ``**check: Unpack[CheckArgs]``.

    ``bnfold.fold``, ``fold_file``, ``to_onnx``, ``fold_onnx``, ``fold_keras``,
    ``fold_keras_file`` and ``verify`` accept the same names with the same
    meaning, and the CLI fills them once from ``--feed``, ``--input-shape``,
    ``--rtol``/``--atol``, ``--samples``, ``--seed``, ``--force`` and
    ``--no-verify``; each entry point turns them into one :class:`CheckOptions`
    (:meth:`CheckOptions.of`), which is what the stages below pass on.
    """

    verify_outputs: bool  # run the check at all (default True)
    force: bool  # keep the result although the check failed (default False)
    feeds: dict[str, np.ndarray] | None
    input_shapes: dict[str, list[int]] | None
    rtol: float | None
    atol: float | None
    samples: int
    seed: int
    batch_check: bool
    on_batch: Callable[[int, int], None] | None


@dataclass(frozen=True)
class CheckOptions:
    """How a check is run (``--feed``, ``--input-shape``, ``--rtol/--atol``, ``--samples``, ``--seed``), as one value.

    ``feeds`` maps a placeholder (or any internal tensor, ``"Mfcc:0"``) to a value
    used in every batch; other inputs are drawn at random, anew for each of the
    ``samples`` batches. ``on_batch(done, total)`` reports progress. ``verify``
    and ``force`` say whether the check runs and whether a failed one still
    lets the result through.
    """

    feeds: dict[str, np.ndarray] = field(default_factory=dict)
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    rtol: float | None = None
    atol: float | None = None
    samples: int = 1
    seed: int = 0
    batch_check: bool = True
    on_batch: Callable[[int, int], None] | None = None
    verify: bool = True
    force: bool = False

    @classmethod
    def of(cls, args: Mapping[str, Any]) -> CheckOptions:
        """The options that ``**check`` keyword arguments (:class:`CheckArgs`) name; a name it does not know is a TypeError,
        as for any function's unknown keyword."""
        unknown = sorted(set(args) - set(CheckArgs.__annotations__))
        if unknown:
            raise TypeError(f"unexpected keyword argument {unknown[0]!r}")
        return cls(
            feeds=dict(args.get("feeds") or {}),
            input_shapes=dict(args.get("input_shapes") or {}),
            rtol=args.get("rtol"),
            atol=args.get("atol"),
            samples=int(args.get("samples", 1)),
            seed=int(args.get("seed", 0)),
            batch_check=bool(args.get("batch_check", True)),
            on_batch=args.get("on_batch"),
            verify=bool(args.get("verify_outputs", True)),
            force=bool(args.get("force", False)),
        )


@dataclass
class InputSpec:
    """An input of a model: its numpy dtype (``object`` for strings) and shape (None: unknown rank)."""

    name: str
    dtype: np.dtype
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

    @property
    def tolerance(self) -> float:
        """The number ``max_abs_error`` is compared against (``TOLERANCE_FORMULA``)."""
        return self.atol + self.rtol * self.max_abs_value


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
        return max(failing, key=lambda o: o.max_abs_error - o.tolerance, default=None)

    def to_json(self) -> dict[str, object]:
        data = asdict(self)
        for out, check in zip(data["outputs"], self.outputs, strict=True):
            out["tolerance"] = check.tolerance
            out["tolerance_formula"] = TOLERANCE_FORMULA
        data["passed"] = self.passed
        return data


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


def _run_batch(runner: Runner, outputs: list[str], feeds: dict[str, np.ndarray], tick: Callable[[], None]) -> list[np.ndarray]:
    tick()
    try:
        return runner.run(outputs, feeds)
    except runner.errors as exc:
        raise VerificationError(f"could not run the model for verification: {first_line(exc)}") from None


def image_spatial_axes(shape: list[int | None]) -> tuple[int, int] | None:
    """The unknown height and width axes of an image-like input (rank 4, 1 to 4 known channels), else None.

    Only such inputs get a made-up size: a conv net takes any height and width,
    while an unknown dimension of any other input may be a length the model
    fixes in ways bnfold cannot know.
    """
    if len(shape) != 4:
        return None
    nhwc = shape[1] is None and shape[2] is None and shape[3] is not None and 1 <= shape[3] <= 4
    nchw = shape[2] is None and shape[3] is None and shape[1] is not None and 1 <= shape[1] <= 4
    if nhwc == nchw:
        return None
    return (1, 2) if nhwc else (2, 3)


# Words that mark a boolean input as a training flag: the check feeds it false (inference) on every route,
# and doctor assumes false for it.
TRAINING_WORDS = ("train", "learning_phase", "phase", "mode")


def looks_like_training_flag(name: str) -> bool:
    """Whether an input's name says it selects training behaviour (``is_training``, ``phase_train``, ``mode``)."""
    low = name.split(":")[0].lower().rsplit("/", 1)[-1]
    return any(word in low for word in TRAINING_WORDS)


def _synthesize(
    spec: InputSpec, shape_override: list[int] | None, batch: int, rng: np.random.Generator, tally: Tally | None = None
) -> tuple[np.ndarray, str]:
    """Random data for one input; ``tally`` sums the elements of every input made for the check (bnfold.core.budgets)."""
    np_dtype = np.dtype(spec.dtype)
    shape: list[int | None]
    if shape_override is not None:
        shape, how = list(shape_override), "--input-shape"
    elif spec.shape is None and np_dtype.kind == "b" and looks_like_training_flag(spec.name):
        shape, how = [], "a training flag of unknown rank: a scalar"
    elif spec.shape is None:
        raise VerificationError(f"input {spec.name!r} has unknown rank; give --input-shape {spec.name}=D0,D1,... or --no-verify")
    else:
        shape = list(spec.shape)
        how = "declared shape"
        if shape and shape[0] is None:
            shape[0] = batch
            how = f"declared shape, batch {batch} (default)"
        spatial = image_spatial_axes(shape)
        if spatial is not None:
            for axis in spatial:
                shape[axis] = DEFAULT_IMAGE_SIZE
            layout = "NCHW" if spatial == (2, 3) else "NHWC"
            how += f", height and width {DEFAULT_IMAGE_SIZE} (default for an image-like {layout} input)"
        if any(d is None for d in shape):
            raise VerificationError(
                f"input {spec.name!r} has unknown dimensions {spec.shape}; give --input-shape {spec.name}=D0,D1,... or --no-verify"
            )
    kind = dtype_name(np_dtype)
    dims = [d for d in shape if d is not None]  # every dimension is known by now
    try:  # from the shape, before numpy allocates anything
        (tally or Tally("the check's random inputs")).tensor(f"input {spec.name!r}", dims)
    except BudgetExceeded as exc:
        raise VerificationError(f"{exc}; give a smaller --input-shape {spec.name}=..., a --feed, or --no-verify") from None
    if np_dtype.kind == "f" or kind == "bfloat16":
        value = rng.standard_normal(dims).astype(np_dtype)
    elif np_dtype.kind == "b":
        value = np.zeros(dims, dtype=bool)
        how += ", all false"
    elif np_dtype.kind in "iu":
        value = rng.integers(0, 8, size=dims).astype(np_dtype)
    else:
        raise VerificationError(f"input {spec.name!r} is {kind}; bnfold cannot make such data: pass --feed {spec.name}=... or --no-verify")
    return value, f"random {kind} {list(shape)} ({how})"


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
    return run_candidate(run_reference(open_reference, specs, outputs, options), open_candidate, specs, outputs, options)


@dataclass
class ReferenceRun:
    """The first half of :func:`compare_runners`: the inputs made, and what the reference model gave for them.

    A caller that has the reference before the candidate (the TF check: the
    input graph before the fold is done) runs this half first.
    """

    result: Verification
    per_sample: list[dict[str, np.ndarray]]
    expected: list[list[np.ndarray]]
    tick: Callable[[], None]
    total: int


def run_reference(
    open_reference: Callable[[], Runner], specs: dict[str, InputSpec], outputs: list[str], options: CheckOptions
) -> ReferenceRun:
    """Make the inputs and run the reference model on each batch; the model is closed before this returns."""
    feeds, on_batch = options.feeds, options.on_batch
    fed_names = {parse_input(k)[0] for k in feeds}
    result = Verification(samples=options.samples)
    rng = np.random.default_rng(options.seed)
    per_sample: list[dict[str, np.ndarray]] = []
    tally = Tally("the check's random inputs")
    for _ in range(max(1, options.samples)):
        batch_feeds = dict(feeds)
        for name, spec in specs.items():
            if name in fed_names or name in feeds:
                continue
            batch_feeds[name], how = _synthesize(spec, options.input_shapes.get(name), DEFAULT_BATCH, rng, tally)
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
        try:
            expected_all = [_run_batch(reference, outputs, batch, tick) for batch in per_sample]
        except VerificationError as exc:
            defaulted = [n for n, how in result.inputs.items() if "(default for an image-like" in how]
            if not defaulted:
                raise
            raise VerificationError(
                f"{exc}; input {defaulted[0]!r} was given the default size {DEFAULT_IMAGE_SIZE}x{DEFAULT_IMAGE_SIZE}: "
                f"give --input-shape {defaulted[0]}=D0,D1,D2,D3"
            ) from None
    finally:
        reference.close()
    return ReferenceRun(result, per_sample, expected_all, tick, total)


def run_candidate(
    reference: ReferenceRun, open_candidate: Callable[[], Runner], specs: dict[str, InputSpec], outputs: list[str], options: CheckOptions
) -> Verification:
    """The second half of :func:`compare_runners`: run the candidate on the same inputs, compare, check batch independence."""
    result, per_sample, tick = reference.result, reference.per_sample, reference.tick
    candidate = open_candidate()
    try:
        actual_all = [_run_batch(candidate, outputs, batch, tick) for batch in per_sample]
        checks: dict[str, OutputCheck] = {}
        for expected, actual in zip(reference.expected, actual_all, strict=True):
            for name, a, b in zip(outputs, expected, actual, strict=False):
                a = np.asarray(a)
                d_rtol, d_atol = TOLERANCES.get(a.dtype.name, TOLERANCES["float32"])
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
            _check_batch_independence(candidate, outputs, per_sample[0], actual_all[0], specs, result)
        if options.on_batch is not None:
            options.on_batch(reference.total, reference.total)
    finally:
        candidate.close()
    return result


def _check_batch_independence(
    runner: Runner,
    outputs: list[str],
    batch_feeds: dict[str, np.ndarray],
    together: list[np.ndarray],
    specs: dict[str, InputSpec],
    result: Verification,
) -> None:
    """Sample 0 run alone must equal sample 0 run in its batch.

    ``together`` holds the outputs the same runner gave for ``batch_feeds``
    (the comparison's first batch): running that batch again would compute
    them a second time (0.14 s on ResNet50), so only the sample alone runs.
    """
    batched = [n for n, s in specs.items() if s.shape and s.shape[0] is None and n in batch_feeds]
    if not batched or any(batch_feeds[n].shape[0] < 2 for n in batched):
        result.notes.append("batch-independence check skipped: no input with a free batch dimension and >1 sample")
        return
    single = {k: (v[:1] if k in batched else v) for k, v in batch_feeds.items()}
    try:
        alone = runner.run(outputs, single)
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
