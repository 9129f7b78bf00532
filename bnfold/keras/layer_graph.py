"""A Keras model's config, read as a graph of layers and the tensors between them.

The fold never edits live layer objects: ``from_config`` is the one way Keras
offers to get the same model with layers taken out, so planning and editing
happen on a copy of ``get_config()``. Keras 3 and legacy ``tf_keras`` write an
inbound tensor differently; :class:`_Scope` is where that difference stays, so
the planner (:mod:`bnfold.keras.plan`) reads one shape of graph. Which Keras a
model belongs to, and whether its layer graph is in its config at all (a
subclassed model's is not), are answered here too, since every later stage asks.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import keras

from bnfold.core.errors import InputError

Ref = tuple[str, int, int]  # (layer name, node index, tensor index), as configs write an inbound tensor
# tf_keras writes a constant argument of an op layer (tf.tile(const, ...)) as [CONSTANT_VALUE, -1, value, kwargs].
CONSTANT_VALUE = "_CONSTANT_VALUE"


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
