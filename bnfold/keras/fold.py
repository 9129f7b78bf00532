"""Keras in, Keras out: fold BatchNormalization layers into the layers around them, at the layer level.

The graph fold needs TensorFlow and gives back a frozen graph; users who keep
training, quantize, convert with ``keras.export`` or run Keras 3 on JAX need
the Keras model itself. So this adapter reads the model's own config (the
layer list and each layer's inbound nodes), decides per BN whether it can fold
(the same rules as the graph fold: fan-out, shared layers, statistics, axes),
edits the config (BN entries removed and their readers rewired, the linear
layer gets ``use_bias=True``), rebuilds the model with ``from_config`` and
copies every weight across. The arithmetic is :mod:`bnfold.core.foldmath`'s; the
check is :func:`bnfold.core.comparison.compare_runners` with a Keras runner. Only
Keras and numpy are used, so the fold and its check run on whichever backend
Keras is configured with.

Works for Keras 3 and legacy ``tf_keras`` (``.h5``); their configs differ only
in how an inbound tensor is written, which :class:`_Scope` hides.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import keras
import numpy as np

from bnfold.core import foldmath, protocol, serve
from bnfold.core.comparison import TOLERANCES, CheckArgs, CheckOptions, InputSpec, Verification, compare_runners, failure_message
from bnfold.core.errors import BnfoldError, InputError, OutputError, UsageError, VerificationError, first_line
from bnfold.core.files import check_output_path
from bnfold.core.foldmath import SiteRecord
from bnfold.core.formats import is_keras_path
from bnfold.core.protocol import decode_arrays, first_line_of, send
from bnfold.core.result import FoldResult

if TYPE_CHECKING:
    from typing_extensions import Unpack


BN_CLASSES = ("BatchNormalization", "SyncBatchNormalization")
FORM = "Keras BatchNormalization"
Ref = tuple[str, int, int]  # (layer name, node index, tensor index), as configs write an inbound tensor
# tf_keras writes a constant argument of an op layer (tf.tile(const, ...)) as [CONSTANT_VALUE, -1, value, kwargs].
CONSTANT_VALUE = "_CONSTANT_VALUE"


@dataclass(frozen=True)
class Linear:
    """Where a linear layer keeps the channels a BN scales: its kernel variable and the axes inside it.

    Axes count from the end of the kernel, so one entry serves 1-, 2- and 3-D
    convolutions. ``in_axis`` None: no backward fold (a transposed conv spreads
    a shift unevenly at the borders; a separable conv's depthwise stage would
    need a second kernel update).
    """

    kernel: str
    out_axes: tuple[int, ...]
    in_axis: int | None


LINEAR: dict[str, Linear] = {
    "Dense": Linear("kernel", (-1,), -2),
    **{f"Conv{d}D": Linear("kernel", (-1,), -2) for d in (1, 2, 3)},
    **{f"DepthwiseConv{d}D": Linear("depthwise_kernel", (-2, -1), -2) for d in (1, 2)},
    **{f"SeparableConv{d}D": Linear("pointwise_kernel", (-1,), None) for d in (1, 2)},
    **{f"Conv{d}DTranspose": Linear("kernel", (-2,), None) for d in (1, 2, 3)},
}


# --------------------------------------------------------------------------------------------
# The standalone affine layer (--standalone-affine)


@keras.saving.register_keras_serializable(package="bnfold", name="ChannelAffine")
class ChannelAffine(keras.layers.Layer):
    """``y = x * scale + shift`` per channel, with fixed weights: a BN that has no statistics to misuse.

    A BN that stays can still be switched to batch statistics (``training=True``,
    fine-tuning with the layer unfrozen); this layer cannot. Registered as
    ``bnfold>ChannelAffine``, so ``keras.saving.load_model`` accepts it in safe
    mode once ``bnfold.keras.fold`` is imported (or with the class passed in
    ``custom_objects``; README "Keras output").
    """

    def __init__(self, axis: int = -1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.axis = int(axis)
        self.supports_masking = True

    def build(self, input_shape: Any) -> None:
        channels = int(input_shape[self.axis])
        self.scale = self.add_weight(name="scale", shape=(channels,), initializer="ones", trainable=False)
        self.shift = self.add_weight(name="shift", shape=(channels,), initializer="zeros", trainable=False)

    def call(self, inputs: Any, mask: Any = None) -> Any:
        ops = keras.ops
        shape = [1] * len(inputs.shape)
        shape[self.axis] = -1
        scale = ops.reshape(ops.cast(self.scale, inputs.dtype), shape)
        shift = ops.reshape(ops.cast(self.shift, inputs.dtype), shape)
        return inputs * scale + shift

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "axis": self.axis}


_LEGACY_AFFINE: dict[int, type] = {}


def legacy_affine_class(tf_keras: Any) -> type:
    """The same layer for legacy ``tf_keras`` (``.h5``), registered there as ``bnfold>ChannelAffine``."""
    if id(tf_keras) in _LEGACY_AFFINE:
        return _LEGACY_AFFINE[id(tf_keras)]

    @tf_keras.saving.register_keras_serializable(package="bnfold", name="ChannelAffine")
    class LegacyChannelAffine(tf_keras.layers.Layer):  # type: ignore[misc,name-defined]
        def __init__(self, axis: int = -1, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.axis = int(axis)
            self.supports_masking = True

        def build(self, input_shape: Any) -> None:
            channels = int(input_shape[self.axis])
            self.scale = self.add_weight(name="scale", shape=(channels,), initializer="ones", trainable=False)
            self.shift = self.add_weight(name="shift", shape=(channels,), initializer="zeros", trainable=False)
            super().build(input_shape)

        def call(self, inputs: Any, mask: Any = None) -> Any:
            import tensorflow as tf

            shape = [1] * inputs.shape.rank
            shape[self.axis] = -1
            return inputs * tf.reshape(tf.cast(self.scale, inputs.dtype), shape) + tf.reshape(tf.cast(self.shift, inputs.dtype), shape)

        def get_config(self) -> dict[str, Any]:
            return {**super().get_config(), "axis": self.axis}

    _LEGACY_AFFINE[id(tf_keras)] = LegacyChannelAffine
    return LegacyChannelAffine


def custom_objects(module: Any = None) -> dict[str, type]:
    """What to pass as ``custom_objects`` to load a file with standalone affine layers (``module``: tf_keras for .h5)."""
    cls = ChannelAffine if module is None or module is keras else legacy_affine_class(module)
    return {"bnfold>ChannelAffine": cls, "ChannelAffine": cls}


# --------------------------------------------------------------------------------------------
# Which Keras, which kind of model


def _framework(model: Any) -> Any:
    """The Keras package the model belongs to: Keras 3, or legacy tf_keras."""
    if type(model).__module__.startswith("tf_keras"):
        import tf_keras

        return tf_keras
    return keras


def _is_keras3(module: Any) -> bool:
    return module is keras


def _model_kind(obj: Any) -> str | None:
    """'functional' or 'sequential' for a model whose layer graph is in its config; None otherwise."""
    cls = type(obj)
    if not cls.__module__.startswith(("keras", "tf_keras")):
        return None
    return {"Functional": "functional", "Sequential": "sequential"}.get(cls.__name__)


def _is_model(obj: Any) -> bool:
    return hasattr(obj, "layers") and hasattr(obj, "inputs") and callable(obj)


def subclassed_error(model: Any, source: str) -> InputError:
    return InputError(
        f"{source}: {type(model).__name__} is a subclassed Keras model, whose layer graph cannot be rebuilt; "
        "fold it as a graph instead (bnfold MODEL out.pb, or model.export('saved_model_dir') then bnfold saved_model_dir out.pb)"
    )


def _sublayers(layer: Any) -> list[Any]:
    flatten = getattr(layer, "_flatten_layers", None)
    if flatten is None:
        return []
    return [sub for sub in flatten(include_self=False, recursive=True)]


def layer_counts(model: Any) -> dict[str, int]:
    """Layer classes in the model, nested models included: the 'op counts' of a Keras fold."""
    counts: dict[str, int] = {}
    seen: set[int] = set()

    def walk(m: Any) -> None:
        for layer in m.layers:
            if id(layer) in seen:
                continue
            seen.add(id(layer))
            name = type(layer).__name__
            counts[name] = counts.get(name, 0) + 1
            if _is_model(layer):
                walk(layer)

    walk(model)
    return counts


# --------------------------------------------------------------------------------------------
# A model's config as a graph of layers and nodes


def _ref_of(item: Any, keras3: bool) -> Ref | None:
    if keras3:
        if isinstance(item, dict) and item.get("class_name") == "__keras_tensor__":
            name, node, tensor = item["config"]["keras_history"]
            return (name, int(node), int(tensor))
        return None
    if (
        isinstance(item, list)
        and len(item) >= 3
        and isinstance(item[0], str)
        and type(item[1]) is int
        and type(item[2]) is int
        and item[0] != CONSTANT_VALUE
        and item[1] >= 0
    ):
        return (item[0], item[1], item[2])
    return None


def _walk_refs(data: Any, keras3: bool) -> Iterator[tuple[Any, Ref]]:
    """Every inbound-tensor reference inside ``data`` (with the object holding it, for rewiring)."""
    ref = _ref_of(data, keras3)
    if ref is not None:
        yield data, ref
        if not keras3 and len(data) > 3:
            yield from _walk_refs(data[3], keras3)  # tf_keras: call kwargs may hold tensors too
        return
    if isinstance(data, dict):
        for value in data.values():
            yield from _walk_refs(value, keras3)
    elif isinstance(data, list | tuple):
        for value in data:
            yield from _walk_refs(value, keras3)


def _set_ref(holder: Any, ref: Ref, keras3: bool) -> None:
    if keras3:
        holder["config"]["keras_history"] = [ref[0], ref[1], ref[2]]
    else:
        holder[0], holder[1], holder[2] = ref


@dataclass
class _Scope:
    """One Functional or Sequential model: its (copied, editable) config and its original layer objects."""

    model: Any
    config: dict[str, Any]
    path: str
    keras3: bool
    sequential: bool
    entries: dict[str, dict[str, Any]] = field(default_factory=dict)
    nodes: dict[str, list[list[Ref]]] = field(default_factory=dict)  # layer -> per node: the tensors it reads
    node_kwargs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    readers: dict[Ref, list[tuple[str, int]]] = field(default_factory=dict)
    outputs: set[Ref] = field(default_factory=set)

    def __post_init__(self) -> None:
        layers = self.config["layers"]
        previous: Ref | None = None
        for entry in layers:
            name = entry.get("name") or entry["config"]["name"]
            self.entries[name] = entry
            if self.sequential:
                if entry["class_name"] == "InputLayer":
                    previous = (name, 0, 0)
                    continue
                self.nodes[name] = [[previous] if previous else []]
                self.node_kwargs[name] = [{}]
                previous = (name, 0, 0)
            else:
                self.nodes[name] = []
                self.node_kwargs[name] = []
                for node in entry.get("inbound_nodes", []):
                    self.nodes[name].append([r for _, r in _walk_refs(node, self.keras3)])
                    self.node_kwargs[name].append(self._kwargs(node))
        if self.sequential:
            if previous:
                self.outputs.add(previous)
        else:
            # Both Keras write output layers as [name, node, tensor] lists.
            self.outputs = {r for _, r in _walk_refs(self.config["output_layers"], False)}
        for name, nodes in self.nodes.items():
            for k, refs in enumerate(nodes):
                for ref in refs:
                    self.readers.setdefault(ref, []).append((name, k))

    def _kwargs(self, node: Any) -> dict[str, Any]:
        if self.keras3 and isinstance(node, dict):
            return dict(node.get("kwargs", {}))
        if not self.keras3 and isinstance(node, list) and node and isinstance(node[0], list) and len(node[0]) > 3:
            kwargs = node[0][3]
            return dict(kwargs) if isinstance(kwargs, dict) else {}
        return {}

    def layer(self, name: str) -> Any:
        return self.model.get_layer(name)

    def class_name(self, name: str) -> str:
        return str(self.entries[name]["class_name"])

    def site(self, name: str) -> str:
        return f"{self.path}{name}"

    def other_readers(self, ref: Ref, allowed: str) -> list[str]:
        """Who reads ``ref`` besides layer ``allowed`` (the model's outputs count as a reader)."""
        names = [n for n, _ in self.readers.get(ref, []) if n != allowed]
        if ref in self.outputs:
            names.append("the model output")
        return names

    def rewire(self, mapping: dict[Ref, Ref]) -> None:
        """Point every reader of a removed layer's output at what the removed layer read."""

        def resolve(ref: Ref) -> Ref:
            seen = 0
            while ref in mapping and seen < 1000:
                ref, seen = mapping[ref], seen + 1
            return ref

        if self.sequential:
            return
        targets = [(entry.get("inbound_nodes", []), self.keras3) for entry in self.config["layers"]]
        for data, keras3 in [*targets, (self.config["output_layers"], False)]:
            for holder, ref in list(_walk_refs(data, keras3)):
                if ref in mapping:
                    _set_ref(holder, resolve(ref), keras3)


# --------------------------------------------------------------------------------------------
# The plan: what happens to each BN and each linear layer


def _numpy(variable: Any) -> np.ndarray:
    if hasattr(variable, "numpy"):
        return np.array(variable.numpy())
    return np.array(keras.ops.convert_to_numpy(variable))


def _rank(layer: Any) -> int | None:
    """Rank of the tensor a layer outputs, from the nodes Keras recorded when it was called."""
    for node in getattr(layer, "_inbound_nodes", []) or getattr(layer, "inbound_nodes", []):
        outputs = node.outputs
        tensor = outputs[0] if isinstance(outputs, list | tuple) else outputs
        shape = getattr(tensor, "shape", None)
        if shape is not None:
            return len(shape)
    return None


def _channel_axis(entry: dict[str, Any], rank: int) -> int:
    """The axis holding a linear layer's channels: last, or 1 for channels_first convolutions."""
    if entry["config"].get("data_format") == "channels_first":
        return 1
    return rank - 1


@dataclass
class _BnInfo:
    name: str
    scale: np.ndarray
    shift: np.ndarray
    axis: int
    rank: int


@dataclass
class _Change:
    """New weights of a linear layer (float64 until written), starting from its own."""

    layer: Any
    weights: dict[str, np.ndarray]
    dtypes: dict[str, np.dtype]

    def kernel(self, attribute: str) -> tuple[str, np.ndarray | None]:
        """The kernel by the layer's attribute (Keras 3 names a depthwise kernel variable plain 'kernel')."""
        variable = getattr(self.layer, attribute, None)
        key = _weight_name(variable) if variable is not None else attribute
        if key not in self.weights and attribute == "depthwise_kernel":
            key = "kernel"
        return key, self.weights.get(key)


def _weight_name(variable: Any) -> str:
    return str(getattr(variable, "path", None) or variable.name).split("/")[-1].split(":")[0]


@dataclass
class _Plan:
    scope: _Scope
    options: FoldOptions
    sites: list[SiteRecord] = field(default_factory=list)
    removed: dict[str, bool] = field(default_factory=dict)  # BN -> True: becomes an Identity (its output is a model output)
    standalone: dict[str, _BnInfo] = field(default_factory=dict)
    changes: dict[str, _Change] = field(default_factory=dict)
    nested: dict[str, _Plan] = field(default_factory=dict)

    # ---- reading a BN

    def bn_info(self, name: str) -> _BnInfo | str:
        layer = self.scope.layer(name)
        for attr, why in (("renorm", "renorm"), ("virtual_batch_size", "virtual batches"), ("adjustment", "an adjustment function")):
            if getattr(layer, attr, None):
                return f"BN uses {why}: its inference output is not one fixed per-channel affine"
        axis = getattr(layer, "axis", -1)
        axes = list(axis) if isinstance(axis, list | tuple) or hasattr(axis, "__iter__") else [axis]
        if len(axes) != 1:
            return f"BN normalizes over several axes {axes}, not one channel axis"
        rank = _rank(layer)
        if rank is None:
            return "BN was never called: its input rank is unknown"
        ax = int(axes[0]) % rank
        for k, kwargs in enumerate(self.scope.node_kwargs.get(name, [])):
            if kwargs.get("training") is True:
                return f"BN call {k} passes training=True: it normalizes with batch statistics"
        mean, var = _numpy(layer.moving_mean), _numpy(layer.moving_variance)
        channels = mean.size
        gamma = _numpy(layer.gamma) if getattr(layer, "scale", True) and getattr(layer, "gamma", None) is not None else np.ones(channels)
        beta = _numpy(layer.beta) if getattr(layer, "center", True) and getattr(layer, "beta", None) is not None else np.zeros(channels)
        affine = foldmath.bn_affine(gamma, beta, mean, var, float(layer.epsilon))
        if isinstance(affine, str):
            return affine
        return _BnInfo(name, affine[0], affine[1], ax, rank)

    # ---- candidates

    def forward_partner(self, bn: str) -> tuple[str | None, str]:
        """The linear layer whose every call feeds only this BN, or None and why not."""
        sc = self.scope
        nodes = sc.nodes.get(bn, [])
        sources = {refs[0][0] if refs else None for refs in nodes}
        if len(sources) != 1 or None in sources:
            return None, f"BN layer is called {len(nodes)} times with inputs from different layers ({', '.join(sorted(map(str, sources)))})"
        (src,) = sources
        assert src is not None
        if src not in sc.entries:
            return None, f"its input {src!r} is outside this model"
        cls = sc.class_name(src)
        if cls not in LINEAR:
            return None, f"it follows {src} ({cls}), not a conv or dense layer"
        if any(r[2] != 0 for refs in nodes for r in refs[:1]):
            return None, f"it reads a second output of {src}"
        if len(sc.nodes[src]) != len({refs[0][1] for refs in nodes}):
            return None, f"{src} is called {len(sc.nodes[src])} times and not every call is followed by this BN"
        for k in range(len(sc.nodes[src])):
            others = sc.other_readers((src, k, 0), bn)
            if others:
                return None, f"fan-out: the output of {src} is also read by {', '.join(others)}"
        activation = sc.entries[src]["config"].get("activation", "linear")
        if activation not in (None, "linear"):
            return None, f"{src} applies activation {activation if isinstance(activation, str) else 'custom'} before the BN"
        return src, ""

    def backward_partner(self, bn: str) -> tuple[str | None, str]:
        """The linear layer that alone reads every output of this BN, or None and why not."""
        sc = self.scope
        nodes = sc.nodes.get(bn, [])
        readers: set[str] = set()
        for k in range(len(nodes)):
            ref = (bn, k, 0)
            direct = sc.readers.get(ref, [])
            if ref in sc.outputs or len(direct) != 1:
                who = [n for n, _ in direct] + (["the model output"] if ref in sc.outputs else [])
                return None, f"its output is read by {', '.join(who) or 'nothing'}"
            readers.add(direct[0][0])
        if len(readers) != 1:
            return None, f"the BN's calls feed different layers ({', '.join(sorted(readers))})"
        (dst,) = readers
        cls = sc.class_name(dst)
        if cls not in LINEAR:
            return None, f"the next layer {dst} ({cls}) is not a conv or dense layer"
        if any(len(refs) != 1 or refs[0][0] != bn for refs in sc.nodes[dst]):
            return None, f"{dst} is also called on other inputs"
        return dst, ""

    # ---- folding

    def change(self, name: str) -> _Change:
        if name not in self.changes:
            layer = self.scope.layer(name)
            weights = {_weight_name(v): v for v in layer.weights}
            self.changes[name] = _Change(
                layer, {k: _numpy(v) for k, v in weights.items()}, {k: np.dtype(_numpy(v).dtype) for k, v in weights.items()}
            )
        return self.changes[name]

    def fold_forward(self, bn: _BnInfo, dst: str) -> str | None:
        sc = self.scope
        entry, table = sc.entries[dst], LINEAR[sc.class_name(dst)]
        if bn.axis != _channel_axis(entry, bn.rank):
            return f"the BN's axis {bn.axis} is not the channel axis of {dst}"
        if sc.entries[dst]["config"].get("lora_rank"):
            return f"{dst} has LoRA enabled"
        change = self.change(dst)
        key, kernel = change.kernel(table.kernel)
        if kernel is None or kernel.dtype.kind != "f":
            return f"{dst} has no float kernel {table.kernel!r} (quantized?)"
        out_axes = tuple(a % kernel.ndim for a in table.out_axes)
        channels = int(np.prod([kernel.shape[a] for a in out_axes]))
        scale, shift = foldmath.fit_channels(bn.scale, channels), foldmath.fit_channels(bn.shift, channels)
        if scale is None or shift is None:
            return f"the BN has {bn.scale.size} channels, {dst} has {channels}"
        folded = foldmath.fold_after(kernel, scale, shift, out_axes, change.weights.get("bias"))
        return self._store(change, dst, key, folded)

    def fold_backward(self, bn: _BnInfo, dst: str) -> str | None:
        sc = self.scope
        entry, cls = sc.entries[dst], sc.class_name(dst)
        table = LINEAR[cls]
        cfg = entry["config"]
        if table.in_axis is None:
            return f"a BN is never folded into the input side of {dst} ({cls})"
        if int(cfg.get("groups", 1) or 1) != 1:
            return f"{dst} is a grouped convolution"
        if bn.axis != _channel_axis(entry, bn.rank):
            return f"the BN's axis {bn.axis} is not the channel axis of {dst}"
        pads = cfg.get("padding", "valid") != "valid" and any(int(k) != 1 for k in cfg.get("kernel_size", [1]))  # 1-wide: no padding
        if cls != "Dense" and pads and np.any(bn.shift != 0):
            return f"{dst} pads with zeros ({cfg.get('padding')} padding) and the BN's shift is not 0: folding it in would be inexact at the borders"
        if cfg.get("lora_rank"):
            return f"{dst} has LoRA enabled"
        change = self.change(dst)
        key, kernel = change.kernel(table.kernel)
        if kernel is None or kernel.dtype.kind != "f":
            return f"{dst} has no float kernel {table.kernel!r} (quantized?)"
        in_axis = table.in_axis % kernel.ndim
        out_axes = tuple(a % kernel.ndim for a in table.out_axes)
        scale, shift = foldmath.fit_channels(bn.scale, kernel.shape[in_axis]), foldmath.fit_channels(bn.shift, kernel.shape[in_axis])
        if scale is None or shift is None:
            return f"the BN has {bn.scale.size} channels, {dst} reads {kernel.shape[in_axis]}"
        folded = foldmath.fold_before(kernel, scale, shift, in_axis, out_axes, change.weights.get("bias"))
        return self._store(change, dst, key, folded)

    def _store(self, change: _Change, dst: str, kernel_name: str, folded: foldmath.Folded) -> str | None:
        dtype = change.dtypes[kernel_name]
        reason = foldmath.storable(folded, dtype, dst)
        if reason:
            return reason
        change.weights[kernel_name] = folded.weights
        change.weights["bias"] = folded.bias.astype(dtype)
        change.dtypes.setdefault("bias", dtype)
        return None

    def run(self) -> None:
        sc = self.scope
        for name, entry in sc.entries.items():
            if entry["class_name"] in ("Functional", "Sequential") or _model_kind_entry(entry):
                inner = sc.layer(name)
                if _model_kind(inner) is not None:
                    self.nested[name] = plan_model(inner, self.options, f"{sc.path}{name}/")
                    self.sites.extend(self.nested[name].sites)
                    continue
            if entry["class_name"] not in (*BN_CLASSES, *LINEAR, "InputLayer"):
                self._opaque(name)
        bns = [n for n, e in sc.entries.items() if e["class_name"] in BN_CLASSES]
        records: dict[str, SiteRecord] = {}
        waiting: dict[str, tuple[_BnInfo, str]] = {}
        for bn in bns:
            info = self.bn_info(bn)
            if isinstance(info, str):
                records[bn] = SiteRecord(sc.site(bn), FORM, "skipped", reason=info)
                continue
            dst, why = self.forward_partner(bn)
            if dst is not None:
                problem = self.fold_forward(info, dst)
                if problem is None:
                    records[bn] = SiteRecord(sc.site(bn), FORM, "folded", folded_into=sc.site(dst))
                    self.removed[bn] = any(ref in sc.outputs for ref in self._bn_refs(bn))
                    continue
                why = problem
            waiting[bn] = (info, why)
        for bn, (info, why) in waiting.items():
            dst, back_why = self.backward_partner(bn)
            if dst is not None:
                problem = self.fold_backward(info, dst)
                if problem is None:
                    records[bn] = SiteRecord(
                        sc.site(bn), FORM, "folded", folded_into=sc.site(dst), reason="BN before the layer (backward fold)"
                    )
                    self.removed[bn] = False
                    continue
                back_why = problem
            reason = f"nothing to fold into: after: {why}; before: {back_why}"
            if self.options.standalone_affine:
                self.standalone[bn] = info
                records[bn] = SiteRecord(sc.site(bn), FORM, "standalone", folded_into="ChannelAffine", reason=reason)
            else:
                records[bn] = SiteRecord(sc.site(bn), FORM, "skipped", reason=reason)
        self.sites.extend(records[bn] for bn in bns)

    def _bn_refs(self, bn: str) -> list[Ref]:
        return [(bn, k, 0) for k in range(len(self.scope.nodes.get(bn, [])))]

    def _opaque(self, name: str) -> None:
        """BN inside a layer bnfold cannot rebuild (a custom or subclassed layer) is reported, not touched."""
        layer = self.scope.layer(name)
        for sub in _sublayers(layer):
            if type(sub).__name__ in BN_CLASSES:
                self.sites.append(
                    SiteRecord(
                        self.scope.site(f"{name}/{sub.name}"),
                        FORM,
                        "skipped",
                        reason=f"inside {name} ({type(layer).__name__}), a layer whose inner graph bnfold cannot rebuild",
                    )
                )

    # ---- the new config

    def edit(self) -> None:
        sc = self.scope
        mapping: dict[Ref, Ref] = {}
        for bn, identity in self.removed.items():
            entry = sc.entries[bn]
            if identity:
                self._replace(entry, "Identity", "keras.layers" if sc.keras3 else entry.get("module", "keras.layers"), {})
                continue
            for k, refs in enumerate(sc.nodes[bn]):
                mapping[(bn, k, 0)] = refs[0]
        for bn, info in self.standalone.items():
            entry = sc.entries[bn]
            name = "bnfold>ChannelAffine"
            self._replace(entry, "ChannelAffine" if sc.keras3 else name, "bnfold.keras.fold", {"axis": info.axis}, registered=name)
        sc.rewire(mapping)
        drop = {bn for bn, identity in self.removed.items() if not identity}
        sc.config["layers"] = [e for e in sc.config["layers"] if (e.get("name") or e["config"]["name"]) not in drop]
        for name in self.changes:
            sc.entries[name]["config"]["use_bias"] = True
        for name, nested in self.nested.items():
            nested.edit()
            sc.entries[name]["config"] = nested.scope.config

    def _replace(self, entry: dict[str, Any], cls: str, module: str, extra: dict[str, Any], registered: str | None = None) -> None:
        old = entry["config"]
        entry["class_name"] = cls
        entry["module"] = module
        entry["registered_name"] = registered
        entry["config"] = {"name": old["name"], "trainable": old.get("trainable", True), "dtype": old.get("dtype"), **extra}
        for node in entry.get("inbound_nodes", []):  # BN's call kwargs (mask, training) mean nothing to the new layer
            if self.scope.keras3 and isinstance(node, dict):
                node["kwargs"] = {}
            elif isinstance(node, list):
                for item in node:
                    if isinstance(item, list) and len(item) > 3:
                        item[3] = {}

    # ---- weights

    def copy_weights(self, new_model: Any) -> None:
        """Every layer's weights into the rebuilt model: bit-exact copies, folded values where folded."""
        sc = self.scope
        for name, entry in sc.entries.items():
            if name in self.removed or entry["class_name"] == "InputLayer":
                continue
            old, new = sc.layer(name), new_model.get_layer(name)
            if name in self.nested:
                self.nested[name].copy_weights(new)
            elif name in self.standalone:
                info = self.standalone[name]
                new.set_weights([info.scale.astype(np.float32), info.shift.astype(np.float32)])
            elif name in self.changes:
                change = self.changes[name]
                new.set_weights([change.weights[_weight_name(v)].astype(change.dtypes[_weight_name(v)]) for v in new.weights])
            else:
                new.set_weights(old.get_weights())


def _model_kind_entry(entry: dict[str, Any]) -> bool:
    config = entry.get("config", {})
    return isinstance(config, dict) and "layers" in config and ("output_layers" in config or entry["class_name"] == "Sequential")


@dataclass(frozen=True)
class FoldOptions:
    standalone_affine: bool = False


def plan_model(model: Any, options: FoldOptions, path: str = "") -> _Plan:
    kind = _model_kind(model)
    if kind is None:
        raise subclassed_error(model, path.rstrip("/") or f"<{type(model).__name__} {getattr(model, 'name', '')}>")
    module = _framework(model)
    config = copy.deepcopy(model.get_config())
    scope = _Scope(model, config, path, _is_keras3(module), kind == "sequential")
    plan = _Plan(scope, options)
    plan.run()
    return plan


# --------------------------------------------------------------------------------------------
# Running a Keras model for the check


class KerasRunner:
    """A Keras model as a :class:`bnfold.core.comparison.Runner`: inference mode, inputs in the model's order."""

    errors: tuple[type[BaseException], ...] = (ValueError, TypeError)

    def __init__(self, model: Any) -> None:
        self.model = model
        self.input_names = input_names(model)
        self.output_names = output_names(model)

    def run(self, fetches: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        args = [feeds[n] for n in self.input_names]
        result = self.model(args[0] if len(args) == 1 else args, training=False)
        if isinstance(result, dict):
            flat = [result[k] for k in (self.output_names if set(self.output_names) <= set(result) else result)]
        elif isinstance(result, list | tuple):
            flat = list(result)
        else:
            flat = [result]
        arrays = dict(zip(self.output_names, (_to_numpy(t) for t in flat), strict=False))
        return [arrays[f] for f in fetches]

    def close(self) -> None:
        pass


def _to_numpy(tensor: Any) -> np.ndarray:
    if hasattr(tensor, "numpy"):
        return np.asarray(tensor.numpy())
    return np.asarray(keras.ops.convert_to_numpy(tensor))


def input_names(model: Any) -> list[str]:
    """The names of the model's InputLayers, in order: what a rebuilt model keeps (a tensor's own name may not)."""
    names = []
    for i, tensor in enumerate(model.inputs):
        history = getattr(tensor, "_keras_history", None)
        owner = getattr(history, "operation", None) or getattr(history, "layer", None)
        names.append(str(getattr(owner, "name", None) or getattr(tensor, "name", f"input_{i}")).split(":")[0])
    return names


def output_names(model: Any) -> list[str]:
    names = list(getattr(model, "output_names", None) or [f"output_{i}" for i in range(len(model.outputs))])
    seen: dict[str, int] = {}
    unique = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        unique.append(name if seen[name] == 1 else f"{name}_{seen[name] - 1}")
    return unique


def input_specs(model: Any) -> dict[str, InputSpec]:
    specs = {}
    for name, tensor in zip(input_names(model), model.inputs, strict=True):
        dtype = tensor.dtype
        dtype = getattr(dtype, "as_numpy_dtype", dtype)
        shape = [None if d is None else int(d) for d in tensor.shape]
        specs[name] = InputSpec(name, np.dtype(dtype), shape)
    return specs


def _compute_dtype(model: Any) -> str:
    """The narrowest float any layer computes in: mixed precision makes every output that coarse, whatever its dtype."""
    order = ["float64", "float32", "float16", "bfloat16"]
    worst = "float32"
    for layer in _sublayers(model) or model.layers:
        dtype = str(getattr(layer, "compute_dtype", "float32") or "float32")
        if dtype in order and order.index(dtype) > order.index(worst):
            worst = dtype
    return worst


def compare_models(original: Any, folded: Any, options: CheckOptions) -> Verification:
    """Run both models on the same inputs (inference mode) and compare every output, as every format does."""
    compute = _compute_dtype(original)
    if compute in ("float16", "bfloat16") and (options.rtol is None or options.atol is None):
        rtol, atol = TOLERANCES[compute]
        options = dataclasses.replace(
            options, rtol=rtol if options.rtol is None else options.rtol, atol=atol if options.atol is None else options.atol
        )
    unknown = [n for n in options.feeds if n not in input_names(original)]
    if unknown:
        raise UsageError(f"--feed: the Keras model has no input {unknown[0]!r} (inputs: {', '.join(input_names(original))})")
    result = compare_runners(
        lambda: KerasRunner(original), lambda: KerasRunner(folded), input_specs(original), output_names(original), options
    )
    if compute in ("float16", "bfloat16"):
        result.notes.append(f"layers compute in {compute} (mixed precision): {compute} tolerances")
    return result


# --------------------------------------------------------------------------------------------
# The API


def fold_keras(
    model: Any, *, standalone_affine: bool = False, source: str | None = None, **check: Unpack[CheckArgs]
) -> tuple[Any, FoldResult]:
    """Fold a Functional or Sequential Keras model's BN layers; return the new model and the report.

    The input model is not modified. The new model keeps layer names, input and
    output names and order, the dtype policy, and every unfolded layer's weights
    bit for bit. With ``verify_outputs`` both models run on the same inputs in
    inference mode and :class:`~bnfold.core.errors.VerificationError` is raised when
    an output differs beyond tolerance (unless ``force``); ``check`` takes the
    check's options (:class:`~bnfold.core.comparison.CheckArgs`).
    """
    options = CheckOptions.of(check)
    name = source or f"<{type(model).__name__} {getattr(model, 'name', '')}>"
    if _model_kind(model) is None:
        raise subclassed_error(model, name)
    try:
        plan = plan_model(model, FoldOptions(standalone_affine=standalone_affine))
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:  # a config form the reader does not know
        raise InputError(
            f"{name}: cannot read the layer graph in the model's config ({type(exc).__name__}: {first_line(exc)[:200]}); "
            "fold it as a graph (out.pb) or save it with a current Keras"
        ) from None
    new_model = _rebuild(model, plan, name)
    _carry_compile(model, new_model)
    result = FoldResult(
        graph_def=None,
        sites=plan.sites,
        inputs=input_names(model),
        outputs=output_names(model),
        ops_before=layer_counts(model),
        ops_after=layer_counts(new_model),
        source=name,
    )
    if options.verify:
        result.verification = compare_models(model, new_model, options)
        if not result.verification.passed and not options.force:
            raise VerificationError(f"{name}: verification failed: {failure_message(result.verification)}", result)
    return new_model, result


def _rebuild(model: Any, plan: _Plan, name: str) -> Any:
    plan.edit()
    try:
        new_model = type(model).from_config(plan.scope.config)
    except Exception as exc:  # noqa: BLE001 - Keras raises many kinds while deserializing layers
        raise InputError(
            f"{name}: cannot rebuild the Keras model from its config ({first_line(exc)[:200]}); fold it as a graph (out.pb)"
        ) from None
    plan.copy_weights(new_model)
    return new_model


def _carry_compile(model: Any, new_model: Any) -> None:
    """Keep the loss/optimizer/metrics settings, so the folded model can be trained further as it was."""
    get = getattr(model, "get_compile_config", None)
    compile_from = getattr(new_model, "compile_from_config", None)
    if get is None or compile_from is None or not getattr(model, "compiled", False):
        return
    try:
        config = get()
        if config:
            compile_from(config)
    except Exception:  # noqa: BLE001 - a custom loss that does not deserialize: the user compiles again
        pass


# --------------------------------------------------------------------------------------------
# Files



def load_model(path: Path, trust_model: bool = False) -> Any:
    """The model as its author saved it: :func:`bnfold.tf.freeze.load_keras_model` (Keras 2 files with tf_keras).

    An ``.h5`` written by Keras 2 is folded with tf_keras, so the ``.h5``
    written back loads where the input did.
    """
    from bnfold.keras.load import load_keras_model

    if path.is_dir():
        raise InputError(f"{path}: is a directory; Keras output needs a .keras or .h5 model file as input")
    return load_keras_model(path, trust_model, custom_objects)


def write_model(model: Any, dst: Path, check_against: CheckOptions | None = None) -> None:
    """Save atomically, after proving the file loads (safe mode for .keras) and predicts what ``model`` does."""
    write_bytes(dst, saved_bytes(model, dst, check_against))


def write_bytes(dst: Path, data: bytes) -> None:
    """``dst`` atomically (a temporary file beside it, renamed over it), with the mode a new file gets."""
    from bnfold.core.files import atomic_write

    atomic_write(dst, lambda tmp: tmp.write_bytes(data))


def saved_bytes(model: Any, dst: Path, check_against: CheckOptions | None = None) -> bytes:
    """The file ``model.save`` writes for ``dst``, once it is proven to load (safe mode for .keras) and to predict
    what ``model`` does. Saved in a temporary directory (the worker's private one), keeping ``dst``'s suffix,
    because Keras picks the format from it."""
    module = _framework(model)
    where = Path(tempfile.mkdtemp(prefix="bnfold-save-"))
    tmp = where / f"{dst.stem or 'model'}{dst.suffix}"
    try:
        if dst.suffix.lower() == ".keras" or _is_keras3(module):
            model.save(str(tmp))
        else:
            model.save(str(tmp), save_format="h5")
        if _is_keras3(module):
            reloaded = keras.saving.load_model(str(tmp), compile=False, safe_mode=True, custom_objects=custom_objects())
        else:
            reloaded = module.models.load_model(str(tmp), compile=False, custom_objects=custom_objects(module))
        options = check_against or CheckOptions()
        same = compare_runners(
            lambda: KerasRunner(model),
            lambda: KerasRunner(reloaded),
            input_specs(model),
            output_names(model),
            CheckOptions(feeds=options.feeds, input_shapes=options.input_shapes, seed=options.seed, batch_check=False),
        )
        if not same.passed:
            raise VerificationError(
                f"{dst}: the written file does not predict what the folded model does ({failure_message(same)}); nothing written"
            )
        return tmp.read_bytes()
    except OSError as exc:
        raise OutputError(f"{dst}: cannot write ({exc.strerror or exc})") from None
    finally:
        tmp.unlink(missing_ok=True)
        try:
            where.rmdir()
        except OSError:
            pass


def fold_keras_file(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    in_place: bool = False,
    dry_run: bool = False,
    trust_model: bool = False,
    **options: Any,
) -> tuple[Any, FoldResult]:
    """``bnfold model.keras folded.keras``: load, fold, check, write (nothing is written when the check fails).

    The model is loaded, folded, checked and saved in bnfold's confined worker
    (:mod:`bnfold.core.worker`), since loading a file runs what it carries; the
    worker answers with the saved file's bytes and the report as JSON, and this
    process writes ``dst``. The folded model stays in the worker: the first
    item returned is None (load ``dst`` to use it). Inside a worker, or for a
    live model (:func:`fold_keras`), everything runs where it is called.
    """

    src_path, dst_path = Path(src), Path(dst)
    if not is_keras_path(src_path):
        raise UsageError(f"{dst_path}: Keras output needs a Keras model as input (.keras or .h5), not {src_path.name}")
    if not dry_run:
        check_output_path(src_path, dst_path, in_place)
    if serve.in_worker():
        data, result = fold_here(str(src_path), str(dst_path), dry_run, trust_model, options)
        if data is not None:
            write_bytes(dst_path, data)
        return None, result
    return None, _fold_in_worker(src_path, dst_path, dry_run, trust_model, options)


_WORKER_OPTIONS = ("verify_outputs", "standalone_affine", "input_shapes", "rtol", "atol", "samples", "seed", "force")


def _fold_in_worker(src: Path, dst: Path, dry_run: bool, trust_model: bool, options: dict[str, Any]) -> FoldResult:
    """:func:`fold_here` in the confined worker: only the options, the feeds' arrays, the file's bytes and the report's JSON cross."""
    from bnfold.core import sandbox
    from bnfold.core import worker as isolation
    from bnfold.core.result import result_from_json
    from bnfold.keras.load import check_keras_input

    unknown = set(options) - {*_WORKER_OPTIONS, "feeds", "on_batch"}
    if unknown:
        raise TypeError(f"fold_keras_file() got unexpected keyword arguments {sorted(unknown)}")
    check_keras_input(src, trust_model)  # refused here, before any Keras reads the file
    feeds = dict(options.get("feeds") or {})
    meta, payload = protocol.encode_arrays(list(feeds.values()))
    header = {
        "op": FOLD, "src": str(src), "dst": str(dst), "dry_run": dry_run, "trust_model": trust_model,
        "options": {k: options[k] for k in _WORKER_OPTIONS if k in options}, "feeds": list(feeds), "arrays": meta,
    }  # fmt: skip
    sandbox.allow_read(src)
    try:
        head, body = isolation.ask(header, payload, engine="Keras")
    except isolation.GraphRunError as exc:
        raise isolation.as_bnfold_error(exc, lambda text: InputError(f"{src}: cannot fold the model ({text})")) from None
    except isolation.WorkerDied as exc:
        raise InputError(f"{src}: folding the model ended bnfold's worker: {exc.describe()}") from None
    result = result_from_json(head["result"])
    if head.get("failed"):
        raise VerificationError(str(head["failed"]), result)
    on_batch = options.get("on_batch")
    if on_batch is not None and result.verification is not None:
        on_batch(1, 1)
    if not dry_run:
        write_bytes(dst, body)
    return result


def fold_here(src: str, dst: str, dry_run: bool, trust_model: bool, options: dict[str, Any]) -> tuple[bytes | None, FoldResult]:
    """The worker's side of :func:`fold_keras_file`: the saved file's bytes (None with ``dry_run``) and the report."""
    src_path, dst_path = Path(src), Path(dst)
    model = load_model(src_path, trust_model)
    new_model, result = fold_keras(model, source=str(src_path), **options)
    checked = CheckOptions.of({k: v for k, v in options.items() if k != "standalone_affine"})
    check_options = CheckOptions(feeds=checked.feeds, input_shapes=checked.input_shapes, seed=checked.seed)
    if not _is_keras3(_framework(new_model)) and dst_path.suffix.lower() == ".keras":
        new_model = as_keras3(new_model, src_path, dst_path, check_options)
        if result.verification is not None:
            result.verification.notes.append(f"written by Keras 2: {dst_path.name} is its Keras {keras.__version__} rebuild, checked against it")
    return (None if dry_run else saved_bytes(new_model, dst_path, check_options)), result


# Keras 2 arguments that Keras 3 no longer accepts, dropped only at the value where they change nothing:
# ``groups=1`` (every conv), and a separable conv's ``kernel_*`` (Keras 2 stored them, its separable
# convs never used them: their kernels are the depthwise and pointwise ones).
_UNUSED_KERNEL_ARGS = ("kernel_initializer", "kernel_regularizer", "kernel_constraint")
_KERAS2_NO_OPS: dict[str, Callable[[str, Any], bool]] = {
    **{f"SeparableConv{d}D": (lambda key, value: key in _UNUSED_KERNEL_ARGS or (key == "groups" and value == 1)) for d in (1, 2)},
    **{f"DepthwiseConv{d}D": (lambda key, value: key == "groups" and value == 1) for d in (1, 2)},
    **{f"Conv{d}D": (lambda key, value: False) for d in (1, 2, 3)},
}


def keras2_config_for_keras3(config: Any) -> Any:
    """A Keras 2 model config with the arguments Keras 3 refuses but that change nothing removed (a copy).

    Anything else Keras 3 does not have stays, so Keras 3 refuses it and the
    refusal names it: a translation that changed the model would be worse.
    """
    if isinstance(config, list):
        return [keras2_config_for_keras3(item) for item in config]
    if not isinstance(config, dict):
        return config
    out = {key: keras2_config_for_keras3(value) for key, value in config.items()}
    no_op = _KERAS2_NO_OPS.get(str(out.get("class_name")))
    inner = out.get("config")
    if no_op is not None and isinstance(inner, dict):
        out["config"] = {key: value for key, value in inner.items() if not no_op(key, value)}
    return out


def keras_reason(exc: BaseException) -> str:
    """The cause in a Keras deserialization error, which opens with the whole layer config and ends with the reason."""
    text = str(exc)
    marker = "Exception encountered:"
    while marker in text:
        text = text.split(marker, 1)[1]
    text = text.strip()
    return (text.splitlines()[0] if text else first_line(exc))[:300]


def as_keras3(legacy: Any, src: Path, dst: Path, options: CheckOptions) -> Any:
    """The same model in Keras 3, for ``.keras`` output from a Keras 2 file; refused in one line where it is not the same.

    Keras 3 rebuilds a Keras 2 model from its ``.h5`` form with its own legacy
    reader. That rebuild is accepted only when it declares the same inputs and
    outputs (names where the file names them, ranks, known dims, dtypes) and
    predicts what the tf_keras model does; otherwise (a layer or argument Keras
    3 does not have, a name it refuses, a Sequential input it reads with another
    rank) :class:`OutputError` says why and suggests ``.h5`` output.
    """
    from bnfold.keras.load import TensorDecl, _loaded_decls, signature_difference

    def refuse(why: str) -> OutputError:
        return OutputError(
            f"{dst}: {src} was written by Keras 2 and Keras {keras.__version__} cannot rebuild it exactly ({why}); "
            f"write {dst.with_suffix('.h5').name} instead"
        )

    fd, tmp_name = tempfile.mkstemp(prefix=".bnfold-keras2-", suffix=".h5")
    os.close(fd)
    try:
        legacy.save(tmp_name, save_format="h5")
        import h5py

        with h5py.File(tmp_name, "r+") as handle:
            config = json.loads(handle.attrs["model_config"])
            handle.attrs["model_config"] = json.dumps(keras2_config_for_keras3(config))
        try:
            rebuilt = keras.saving.load_model(tmp_name, compile=False, safe_mode=True, custom_objects=custom_objects())
        except Exception as exc:  # noqa: BLE001 - Keras raises many kinds while deserializing legacy layers
            raise refuse(keras_reason(exc)) from None
    finally:
        Path(tmp_name).unlink(missing_ok=True)
    wanted = _loaded_decls(list(legacy.inputs)), _loaded_decls(list(legacy.outputs))
    if _model_kind(legacy) == "sequential":  # a Sequential's input is named by whoever builds it; compare the rest
        wanted = [TensorDecl(None, d.shape, d.dtype) for d in wanted[0]], [TensorDecl(None, d.shape, d.dtype) for d in wanted[1]]
    why = signature_difference(wanted, list(rebuilt.inputs), list(rebuilt.outputs))
    if why:
        raise refuse(why)
    runner_names = input_names(legacy), output_names(legacy)

    def renamed(model: Any) -> KerasRunner:
        runner = KerasRunner(model)
        runner.input_names, runner.output_names = list(runner_names[0]), list(runner_names[1])
        return runner

    same = compare_runners(
        lambda: KerasRunner(legacy),
        lambda: renamed(rebuilt),
        input_specs(legacy),
        output_names(legacy),
        CheckOptions(feeds=options.feeds, input_shapes=options.input_shapes, seed=options.seed, batch_check=False),
    )
    if not same.passed:
        raise refuse(f"it predicts differently: {failure_message(same)}")
    return rebuilt


def serve_fold(state: serve.State, head: dict[str, Any], payload: bytes, reply: IO[bytes]) -> None:
    """``bnfold a.keras b.keras`` in the worker: load, fold, check, save to the private directory and check the
    saved file (:func:`bnfold.keras.fold.fold_here`); answered with the file's bytes and the report as JSON."""
    from bnfold.core.errors import InputError, VerificationError

    options = dict(head["options"])
    options["feeds"] = dict(zip(head["feeds"], decode_arrays(head["arrays"], payload), strict=True))
    try:
        data, result = fold_here(str(head["src"]), str(head["dst"]), bool(head["dry_run"]), bool(head["trust_model"]), options)
    except VerificationError as exc:
        if exc.result is None:
            raise
        send(reply, {"ok": True, "failed": str(exc), "result": exc.result.to_json()})  # type: ignore[attr-defined]
        return
    except (BnfoldError, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - a layer's own code (a trusted Lambda) failing in the confined worker
        raise InputError(f"{head['src']}: the model failed in bnfold's worker ({type(exc).__name__}: {first_line_of(str(exc))})") from None
    send(reply, {"ok": True, "result": result.to_json()}, data or b"")


FOLD = f"{__name__}:serve_fold"
