"""What happens to each BN of a Keras model, decided in full before anything is rebuilt.

The rules are the graph fold's (fan-out, shared layers, statistics, axes)
applied to layers and their calls. A :class:`_Plan` holds every decision, the
new weights (float64 until written) and the config edit, so the model is
rebuilt once, after all decisions are made, and a BN that cannot fold is
reported without anything half-changed. The arithmetic is
:mod:`bnfold.core.foldmath`'s, shared with the other formats.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np

from bnfold.core import foldmath
from bnfold.core.foldmath import SiteRecord
from bnfold.keras.layer_graph import Ref, _framework, _is_keras3, _model_kind, _Scope, _sublayers, subclassed_error

BN_CLASSES = ("BatchNormalization", "SyncBatchNormalization")
FORM = "Keras BatchNormalization"


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
