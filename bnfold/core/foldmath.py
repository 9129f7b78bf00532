"""The fold arithmetic and its safety checks, shared by every format (TF graphs, ONNX, Keras).

Numpy only, no framework import: each format's adapter reads weights, statistics
and layouts through its own graph access and calls these functions, so the math
(float64, out-/in-channel scaling, bias update, non-finite and overflow checks)
is written once. A function that cannot fold safely returns the reason as a
string instead of a result, and the adapter records it as the site's reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np

Action = Literal["folded", "standalone", "skipped"]


@dataclass
class SiteRecord:
    """What happened to one BN site: the unit of the report, in every format."""

    name: str
    form: str
    action: Action
    folded_into: str | None = None
    reason: str | None = None

    def to_json(self) -> dict[str, object]:
        return asdict(self)


@dataclass
class Folded:
    """New weights (in the weights' own dtype) and a float64 bias, ready to be cast to the op's dtype."""

    weights: np.ndarray
    bias: np.ndarray
    factor: np.ndarray | None = None  # what the weights were multiplied by: W' = scaled(W, factor), to compute them again


def to_float64(value: np.ndarray) -> np.ndarray:
    """Widen floating values (fp16/bf16 included) so all fold math runs in float64."""
    value = np.asarray(value)
    if value.dtype.kind in "fV" or value.dtype.name == "bfloat16":
        return value.astype(np.float64)
    return value


def bn_affine(gamma: np.ndarray, beta: np.ndarray, mean: np.ndarray, var: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray] | str:
    """``s = gamma / sqrt(var + eps)``, ``t = beta - mean * s`` in float64, or why the statistics cannot fold."""
    gamma, beta, mean, var = (np.asarray(to_float64(v), dtype=np.float64).reshape(-1) for v in (gamma, beta, mean, var))
    with np.errstate(all="ignore"):
        denom = var + float(eps)
        if not all(np.all(np.isfinite(v)) for v in (gamma, beta, mean, denom)):
            return "non-finite statistics (NaN/inf in gamma, beta, mean or variance)"
        if not np.all(denom > 0):
            return "variance + epsilon is not positive"
        scale = gamma / np.sqrt(denom)
        shift = beta - mean * scale
    if not (np.all(np.isfinite(scale)) and np.all(np.isfinite(shift))):
        return "scale or shift is not finite (variance + epsilon too small)"
    return scale, shift


def broadcast(vector: np.ndarray, ndim: int, axes: int | Sequence[int], shape: Sequence[int] | None = None) -> np.ndarray:
    """``vector`` shaped to broadcast along ``axes`` of an ``ndim``-D array (several axes: split by ``shape``)."""
    axes = (axes,) if isinstance(axes, int) else tuple(axes)
    dims = [1] * ndim
    if len(axes) == 1:
        dims[axes[0]] = -1
    else:
        assert shape is not None, "several axes need the weights' shape"
        for a in axes:
            dims[a] = shape[a]
    return np.asarray(vector).reshape(dims)


def all_finite(values: np.ndarray) -> bool:
    """Whether every value is finite, without a whole-kernel boolean temporary.

    A sum of squares (one BLAS pass) carries NaN and inf; when it overflows on finite
    values, min and max decide.
    """
    if values.size == 0:
        return True
    if values.dtype in (np.float32, np.float64) and values.flags.c_contiguous:
        flat = values.reshape(-1)
        with np.errstate(over="ignore", invalid="ignore"):
            if np.isfinite(np.vdot(flat, flat)):
                return True
    try:
        return bool(np.isfinite(values.min()) and np.isfinite(values.max()))
    except TypeError:  # a dtype without min/max
        return bool(np.all(np.isfinite(values)))


def scaled(weights: np.ndarray, factor: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``weights * factor`` computed in float64, written straight into the weights' dtype (or ``out``'s).

    Buffered casting avoids a full float64 copy of large kernels; ``out`` lets a
    format write the result where it will be stored (a TF graph's tensor bytes).
    """
    if out is None:
        out = np.empty(weights.shape, dtype=weights.dtype)
    buffer = np.setbufsize(_CAST_BUFFER)  # numpy's default (8192 values) spends a quarter of the time switching buffers
    try:
        with np.errstate(over="ignore", invalid="ignore"):
            np.multiply(weights, factor, out=out, dtype=np.float64, casting="unsafe")
    finally:
        np.setbufsize(buffer)
    return out


_CAST_BUFFER = 1 << 18  # values per buffered chunk in float64: 2 MB, within a core's cache


def fold_after(
    weights: np.ndarray,
    scale: np.ndarray,
    shift: np.ndarray,
    out_axes: int | Sequence[int],
    bias: np.ndarray | None = None,
    out: np.ndarray | None = None,
) -> Folded:
    """A BN after a linear op: ``W' = W * s`` along the out-channel axes, ``b' = b * s + t``.

    ``out_axes`` may name several axes whose product is the channel count (a
    depthwise kernel's ``I, M``), in the order the channels are numbered.
    """
    factor = broadcast(scale, weights.ndim, out_axes, weights.shape)
    old = np.zeros(1) if bias is None else to_float64(bias).reshape(-1)
    with np.errstate(over="ignore", invalid="ignore"):
        new_bias = old * scale + shift
    return Folded(scaled(weights, factor, out), np.asarray(new_bias, dtype=np.float64).reshape(-1), factor)


def fold_before(
    weights: np.ndarray,
    scale: np.ndarray,
    shift: np.ndarray,
    in_axis: int,
    out_axes: int | Sequence[int],
    bias: np.ndarray | None = None,
    out: np.ndarray | None = None,
) -> Folded:
    """A BN before a linear op: ``W' = W * s`` along the in-channel axis, ``b' = b + sum(W * t)``.

    Exact only where no zero padding meets the shift; the adapter checks that.
    The sum runs over every axis but the out-channel axes, so it serves dense
    layers, convolutions of any rank and depthwise kernels alike.
    """
    w64 = to_float64(weights)
    out_axes = (out_axes,) if isinstance(out_axes, int) else tuple(out_axes)
    with np.errstate(over="ignore", invalid="ignore"):
        shifted = w64 * broadcast(shift, w64.ndim, in_axis)
        moved = np.moveaxis(shifted, out_axes, tuple(range(w64.ndim - len(out_axes), w64.ndim)))
        channels = int(np.prod([w64.shape[a] for a in out_axes]))
        extra = moved.reshape(-1, channels).sum(axis=0)
        new_bias = extra if bias is None else to_float64(bias).reshape(-1) + extra
    factor = broadcast(scale, weights.ndim, in_axis)
    return Folded(scaled(weights, factor, out), np.asarray(new_bias, dtype=np.float64), factor)


def storable(folded: Folded, dtype: np.dtype | type, what: str) -> str | None:
    """Why folded values cannot be stored in ``dtype`` (NaN/inf, or fp16 overflow after scaling), else None.

    A fold must never create a non-finite value from finite ones, whatever the
    check says: this is the test every format applies before it writes.
    """
    np_dtype = np.dtype(dtype)
    with np.errstate(over="ignore", invalid="ignore"):
        weights_ok = all_finite(folded.weights)
        bias_ok = bool(np.all(np.isfinite(folded.bias.astype(np_dtype))))
    if not (weights_ok and bias_ok):
        return f"folded weights or bias of {what} are not finite in {np_dtype.name}"
    return None


def fit_channels(vector: np.ndarray, channels: int) -> np.ndarray | None:
    """A per-channel vector of length ``channels``: a scalar is spread, any other length does not fit."""
    vector = np.asarray(vector).reshape(-1)
    if vector.size == channels:
        return vector
    return np.full(channels, vector.item()) if vector.size == 1 else None
