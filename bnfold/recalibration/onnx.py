"""``bnfold recalibrate model.onnx out.onnx --data x.npy``: new BN statistics for an ONNX model, without TensorFlow.

The same computation as :mod:`bnfold.recalibration.graph` (per-channel moments of each
BN's input, inference mode, upstream BNs first, one pass per depth level, float64
merging, the doctor's minimum, the same data reader and memory budget), run in
onnxruntime with optimizations off. The BNs are the ``BatchNormalization`` nodes
whose mean and variance are initializers; the written model differs from the
input only in those initializers' values (same names, dtypes and shapes), and
in a ``training_mode=1`` BN becoming an inference-mode one (no ``training_mode``,
one output) unless the model reads its running-statistics outputs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from bnfold.core.errors import UsageError, VerificationError, first_line
from bnfold.core.findings import MIN_DRIFT_VALUES as MIN_VALUES_PER_CHANNEL
from bnfold.core.findings import BnStats
from bnfold.core.recalibration import DEFAULT_MEMORY_BUDGET, Data, Feeder, LayerRecord, Moments, RecalibrationResult, _summary, drift_score


def _sites(model: onnx.ModelProto) -> tuple[list[tuple[BnStats, Any, bool]], list[str]]:
    """Each BatchNormalization whose mean and variance are initializers: (its statistics, the node, training mode)."""
    initializers = {init.name: init for init in model.graph.initializer}
    graph_inputs = {i.name for i in model.graph.input}
    read = {i for node in model.graph.node for i in node.input} | {o.name for o in model.graph.output}
    sites, notes = [], []
    for node in model.graph.node:
        if node.op_type != "BatchNormalization":
            continue
        name = node.name or node.output[0]
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        training = bool(attrs.get("training_mode", 0))
        if len(node.input) < 5 or not {node.input[3], node.input[4]} <= set(initializers) or {node.input[3], node.input[4]} & graph_inputs:
            notes.append(f"{name}: its mean/variance are not initializers of the model; left as it is")
            continue
        if training and any(out and out in read for out in node.output[1:]):
            notes.append(f"{name}: training_mode=1 and the model reads its running mean/variance outputs; left as it is")
            continue
        mean, var = (numpy_helper.to_array(initializers[node.input[i]]).astype(np.float64).reshape(-1) for i in (3, 4))
        eps = float(attrs.get("epsilon", 1e-5))  # type: ignore[arg-type]
        sites.append((BnStats(name, node.input[0], mean, var, eps, 1), node, training))
    return sites, notes


def _to_inference(node: Any) -> None:
    """A training-mode BatchNormalization becomes an inference-mode one: no ``training_mode``, one output."""
    keep = [a for a in node.attribute if a.name != "training_mode"]
    del node.attribute[:]
    node.attribute.extend(keep)
    del node.output[1:]


def recalibrate_onnx(
    source: str | os.PathLike[str] | onnx.ModelProto, data: Data, *, memory_budget: int = DEFAULT_MEMORY_BUDGET, trust_model: bool = False
) -> tuple[onnx.ModelProto, RecalibrationResult]:
    """The recalibrated model and the per-BN records.

    ``data``: what :func:`bnfold.recalibrate` takes (arrays in input order or by name, an
    iterable of batches, a ``tf.data.Dataset``); arrays are cut into batches whose
    inputs and fetched BN inputs fit ``memory_budget`` bytes. The model passes the ONNX
    allowlist before it runs (:func:`bnfold.onnx.io.check_allowlist`), unless ``trust_model``.
    """
    from bnfold.core.trust import trusting
    from bnfold.onnx.fold import OnnxFolder
    from bnfold.onnx.io import OrtRunner, check_allowlist, input_specs, load_onnx

    with trusting(trust_model):
        if isinstance(source, onnx.ModelProto):
            model, name = source, "<ModelProto>"
            check_allowlist(model, name)
        else:
            model, name = load_onnx(source)[0], str(source)
    feeder = Feeder([(spec.name, spec.dtype) for spec in input_specs(model)], data, memory_budget)
    initializers = {init.name: init for init in model.graph.initializer}
    found, notes = _sites(model)
    sites = [(stat, node) for stat, node, _ in found]
    training = {stat.name for stat, _, is_training in found if is_training}
    if not sites:
        raise UsageError(f"{name}: no BatchNormalization with stored statistics to recalibrate" + (f" ({notes[0]})" if notes else ""))

    # depth levels: 1 + the deepest BN whose output reaches a BN's input
    height: dict[str, int] = {}
    level: dict[str, int] = {}
    bn_of = {id(node): stat.name for stat, node in sites}
    for node in model.graph.node:
        h = max((height.get(i, 0) for i in node.input if i), default=0)
        if id(node) in bn_of:
            level[bn_of[id(node)]] = height.get(node.input[0], 0)
            h = max(h, level[bn_of[id(node)]] + 1)
        for out in node.output:
            height[out] = h

    calibration = onnx.ModelProto()
    calibration.CopyFrom(model)
    types = OnnxFolder(model).types
    placeholders: dict[str, tuple[str, str]] = {}
    by_name = {(n.name or n.output[0]): n for n in calibration.graph.node}
    have = {o.name for o in calibration.graph.output}
    for stat, node in sites:
        copy = by_name[stat.name]
        pair = []
        for slot, which in ((3, "mean"), (4, "variance")):
            init = initializers[node.input[slot]]
            ph = f"bnfold_recalibrated/{stat.name}/{which}"
            calibration.graph.input.append(helper.make_tensor_value_info(ph, init.data_type, list(init.dims)))
            copy.input[slot] = ph
            pair.append(ph)
        placeholders[stat.name] = (pair[0], pair[1])
        if stat.name in training:
            _to_inference(copy)
        if stat.input_ref not in have:
            calibration.graph.output.append(
                helper.make_tensor_value_info(stat.input_ref, types.get(stat.input_ref, onnx.TensorProto.FLOAT), None)
            )
            have.add(stat.input_ref)
    current = {
        stat.name: (numpy_helper.to_array(initializers[node.input[3]]), numpy_helper.to_array(initializers[node.input[4]]))
        for stat, node in sites
    }
    old = {k: (v[0].copy(), v[1].copy()) for k, v in current.items()}

    def stat_feeds() -> dict[str, np.ndarray]:
        return {ph: current[n][i] for n, (m, v) in placeholders.items() for i, ph in enumerate((m, v))}

    def run(runner: OrtRunner, fetches: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        try:
            return runner.run(fetches, {**feeds, **stat_feeds()})
        except runner.errors as exc:
            raise VerificationError(f"--data: could not run the model on the data: {first_line(exc)}") from None

    sizes: list[int] = []

    def measure(group: list[Any], runner: OrtRunner) -> dict[str, Moments]:
        moments = {stat.name: Moments() for stat, _ in group}
        sizes.clear()
        for batch in feeder.batches():
            values = run(runner, [stat.input_ref for stat, _ in group], batch)
            for (stat, _), value in zip(group, values, strict=True):
                moments[stat.name].add(np.asarray(value), 1)  # ONNX BatchNormalization: channels on axis 1
            sizes.append(len(next(iter(batch.values()))) if batch else 0)
        return moments

    runner = OrtRunner(calibration)
    measured: dict[str, Moments] = {}
    kept: dict[str, str] = {}
    try:
        feeder.size_batches(lambda one: run(runner, sorted({stat.input_ref for stat, _ in sites}), one))
        for depth in sorted(set(level.values())):
            group = [(stat, node) for stat, node in sites if level[stat.name] == depth]
            for stat_name, m in measure(group, runner).items():
                measured[stat_name] = m
                shape = current[stat_name][0].shape
                if m.mean is None or m.count < MIN_VALUES_PER_CHANNEL:
                    kept[stat_name] = (
                        f"the data gives {m.count} value(s) per channel, fewer than the doctor's minimum of {MIN_VALUES_PER_CHANNEL}"
                    )
                elif m.mean.size != int(np.prod(shape)) or not (np.all(np.isfinite(m.mean)) and np.all(np.isfinite(m.var))):
                    kept[stat_name] = "its input's channels do not match its statistics, or are not finite"
                else:
                    dtype = current[stat_name][0].dtype
                    current[stat_name] = (m.mean.reshape(shape).astype(dtype), m.var.reshape(shape).astype(dtype))
        after = measure(sites, runner)
    finally:
        runner.close()
    result_model = onnx.ModelProto()
    result_model.CopyFrom(model)
    for node in result_model.graph.node:
        if (node.name or node.output[0]) in training and (node.name or node.output[0]) not in kept:
            _to_inference(node)
    for init in result_model.graph.initializer:
        for stat, node in sites:
            if stat.name in kept:
                continue
            for slot, position in ((3, 0), (4, 1)):
                if init.name == node.input[slot]:
                    init.CopyFrom(numpy_helper.from_array(current[stat.name][position], init.name))
    layers = []
    for stat, _ in sites:
        m, a = measured[stat.name], after[stat.name]
        new = None if stat.name in kept else current[stat.name]
        mean_now, var_now = current[stat.name]
        layers.append(
            LayerRecord(
                stat.name,
                stat.name,
                "BatchNormalization" + (" (training mode -> inference)" if stat.name in training and new is not None else ""),
                level[stat.name],
                "kept" if new is None else "recalibrated",
                m.count,
                _summary(old[stat.name][0]),
                _summary(old[stat.name][1]),
                _summary(new[0]) if new is not None else None,
                _summary(new[1]) if new is not None else None,
                drift_score(old[stat.name][0].reshape(-1), old[stat.name][1].reshape(-1), m.mean, m.var, stat.eps)
                if m.mean is not None
                else None,
                drift_score(mean_now.reshape(-1), var_now.reshape(-1), a.mean, a.var, stat.eps) if a.mean is not None else None,
                kept.get(stat.name, ""),
            )  # fmt: skip
        )
    inputs = [i.name for i in model.graph.input if i.name not in initializers]
    total = sum(sizes)
    result = RecalibrationResult(
        None, layers, inputs, [o.name for o in model.graph.output], name, total, len(set(level.values())) + 1, sizes, notes=notes
    )
    return result_model, result


def recalibrate_onnx_file(src: Path, dst: Path, data: Any, **options: Any) -> RecalibrationResult:
    """ONNX in, ONNX out (written atomically; external data beside it when the model needs it)."""
    from bnfold.core.formats import is_onnx_path
    from bnfold.onnx.io import write_onnx

    unsupported = {k: v for k, v in options.items() if v not in (None, False, {}, []) and k not in ("memory_budget", "trust_model")}
    if unsupported:
        raise UsageError(f"--{next(iter(unsupported)).replace('_', '-')}: applies to TensorFlow models, not to ONNX files")
    if not is_onnx_path(dst):
        raise UsageError(f"{dst}: ONNX input is written as ONNX; give an output path ending in .onnx")
    budget = options.get("memory_budget") or DEFAULT_MEMORY_BUDGET
    model, result = recalibrate_onnx(src, data, memory_budget=budget, trust_model=bool(options.get("trust_model")))
    write_onnx(model, dst)
    return result
