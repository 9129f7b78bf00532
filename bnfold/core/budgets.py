"""Size and work budgets, checked from shapes before anything is allocated or run.

A model file can declare a tensor of 10^10 elements in a few bytes (a ``Const``
holding one float, a ``Fill``, an ONNX ``ConstantOfShape``), or a constant
computed through 40 chained 8000x8000 products. bnfold evaluates constants
and makes random inputs on its own initiative, so it checks what they would
cost first: past a budget a constant is "not a constant" (its BN site is
skipped, with the reason) and an input the check would synthesize refuses the
check (exit 4). The worker's memory and time limits (:mod:`bnfold.core.sandbox`)
stay the backstop for what shapes do not tell.

The budgets (docs/security.md):
- ``TENSOR_ELEMENTS``: 2^28 elements (1 GiB of float32) for any one tensor
  bnfold computes or synthesizes, or reads from a ``Const`` whose values are
  not all stored (a value broadcast to its declared shape);
- ``TOTAL_ELEMENTS``: 2^30 elements over all tensors of one constant
  evaluation, and over all inputs synthesized for one batch of the check;
- ``CONST_FLOPS``: 2^36 (about 6.9e10) multiply-adds x 2 for one constant
  evaluation (``MatMul``, ``BatchMatMul``, ``Gemm``, convolutions).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

TENSOR_ELEMENTS = 1 << 28
TOTAL_ELEMENTS = 1 << 30
CONST_FLOPS = 1 << 36


class BudgetExceeded(ValueError):
    """A tensor or a computation larger than bnfold's budgets; a ValueError, so constant readers treat it as "not a constant"."""


def elements(shape: Iterable[int]) -> int:
    count = 1
    for d in shape:
        count *= max(int(d), 0)
    return count


def check_tensor(what: str, shape: Sequence[int]) -> int:
    """The element count of ``shape``; BudgetExceeded past :data:`TENSOR_ELEMENTS`."""
    count = elements(shape)
    if count > TENSOR_ELEMENTS:
        raise BudgetExceeded(f"{what} would hold {count:.3g} elements, over bnfold's budget of 2^28 per tensor")
    return count


class Tally:
    """Elements and FLOPs of one constant evaluation or one batch of inputs, summed as they are declared."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.elements = 0
        self.flops = 0

    def tensor(self, name: str, shape: Sequence[int]) -> None:
        self.elements += check_tensor(f"{self.what}: {name}", shape)
        if self.elements > TOTAL_ELEMENTS:
            raise BudgetExceeded(f"{self.what} would hold {self.elements:.3g} elements in all, over bnfold's budget of 2^30")

    def work(self, name: str, flops: int) -> None:
        self.flops += flops
        if self.flops > CONST_FLOPS:
            raise BudgetExceeded(f"{self.what}: {name} would take {self.flops:.3g} FLOPs, over bnfold's budget of 2^36 for a constant")


def product_flops(op: str, inputs: Sequence[Sequence[int] | None], output: Sequence[int] | None) -> int:
    """Work of a product op from static shapes: 2 x multiply-adds; 0 where shapes are not known (the time limit then holds).

    Covers TensorFlow's and ONNX's names: MatMul/BatchMatMul*/Gemm (output x inner dim),
    convolutions (output x kernel elements per output channel).
    """
    if output is None or any(d < 0 for d in output):
        return 0
    out = elements(output)
    if op in ("MatMul", "BatchMatMul", "BatchMatMulV2", "BatchMatMulV3", "Gemm", "MatMulInteger"):
        a = inputs[0] if inputs else None
        if a is None or not a:
            return 0
        rows = output[-2] if len(output) > 1 else 1
        inner = a[-1] * a[-2] // max(rows, 1) if len(a) > 1 else a[-1]  # transposed or not: what is not a row of the output
        return 2 * out * max(inner, 1)
    w = inputs[1] if len(inputs) > 1 else None
    if w is None or not w or any(d < 0 for d in w):
        return 0
    # Contributions to one output element: the kernel's elements over its output-channel axis.
    out_axis = {"Conv2D": -1, "Conv3D": -1, "Conv2DBackpropInput": -1, "Conv3DBackpropInputV2": -1, "Conv": 0, "ConvTranspose": 1}
    if op == "DepthwiseConv2dNative" and len(w) == 4:
        return 2 * out * max(w[0] * w[1], 1)
    if op in out_axis and len(w) >= 2:
        return 2 * out * max(elements(w) // max(w[out_axis[op]], 1), 1)
    return 0
