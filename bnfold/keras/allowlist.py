"""What a Keras file may make bnfold run: its config, read as JSON, checked against an allowlist.

The ``.keras`` config and the ``.h5`` ``model_config`` are read as data, never by
Keras (:func:`bnfold.keras.load.keras_config`). Built-in layer classes that name
no callable pass; layers that name a TensorFlow function (``TFOpLambda`` and
kin) pass only with a function from :data:`TF_FUNCTIONS`; Keras 3 ops only from
its tensor-math modules. Anything else is refused before Keras sees the file
(docs/security.md), unless the user trusts it (``--trust-model``). Keras is
imported lazily, only to list its own built-in classes.
"""

from __future__ import annotations

import functools
import re
from typing import Any

# Layers that are code, or that reach outside the process, whatever their config says.
KERAS_REFUSED: dict[str, str] = {
    "Lambda": "is a Lambda layer: its config is Python code",
    "__lambda__": "carries a serialized Python lambda",
    "TorchModuleWrapper": "carries a pickled PyTorch module (code)",
    "JaxLayer": "carries a JAX function (code)",
    "FlaxLayer": "carries a Flax module (code)",
    "TFSMLayer": "loads another SavedModel from a path its config names",
}
# tf_keras layers that name a TensorFlow API function; only TF_FUNCTIONS may be named.
TF_FUNCTION_LAYERS = {"TFOpLambda", "SlicingOpLambda", "ClassMethod", "InstanceMethod", "InstanceProperty"}

# The explicit list of TensorFlow functions a layer may name: pure tensor math, by TF API name.
# ``math.*``, ``nn.*`` and ``linalg.*``: TensorFlow's pure math namespaces (no I/O, no state).
TF_FUNCTION_NAMESPACES = ("math.", "nn.", "linalg.", "signal.", "bitwise.", "image.resize", "__operators__.")
TF_FUNCTIONS = frozenset(
    """
    reshape tile concat stack unstack transpose squeeze expand_dims gather gather_nd slice strided_slice pad
    cast identity shape size rank split where where_v2 clip_by_value clip_by_norm one_hot range zeros zeros_like ones
    ones_like fill broadcast_to reverse reverse_v2 roll matmul einsum tensordot argmax argmin abs add subtract multiply
    divide maximum minimum exp log sqrt rsqrt square pow sigmoid tanh sign floor ceil round reduce_sum reduce_mean
    reduce_max reduce_min reduce_prod reduce_all reduce_any cumsum cumprod truediv floordiv realdiv negative
    boolean_mask sort argsort norm repeat meshgrid linspace equal not_equal less less_equal greater greater_equal
    logical_and logical_or logical_not add_n bitcast clip_by_global_norm depth_to_space space_to_depth
    batch_to_space space_to_batch convert_to_tensor ensure_shape stop_gradient tensor_scatter_nd_update
    tensor_scatter_nd_add scatter_nd sequence_mask unique searchsorted histogram_fixed_width
    """.split()
)
# RaggedTensor class methods and tensor attributes tf_keras wraps (ClassMethod / Instance*): structure, no I/O.
RAGGED_CLASS_METHODS = frozenset(
    """from_value_rowids from_row_splits from_row_lengths from_row_starts from_row_limits from_uniform_row_length
    from_nested_value_rowids from_nested_row_splits from_nested_row_lengths from_tensor from_sparse""".split()
)
TENSOR_ATTRIBUTES = frozenset(
    """values flat_values row_splits nested_row_splits value_rowids nested_value_rowids nrows row_starts row_limits
    row_lengths nested_row_lengths bounding_shape with_values with_flat_values with_row_splits_dtype merge_dims
    to_tensor to_sparse indices dense_shape shape dtype""".split()
)
# Keras 3 ops (a functional model calling keras.ops records them as layers): modules of pure tensor math.
KERAS_OP_MODULES = ("keras.src.ops.numpy", "keras.src.ops.math", "keras.src.ops.nn", "keras.src.ops.linalg", "keras.src.ops.image")
# Config keys whose string value is a file the layer would read (StringLookup/IntegerLookup/TextVectorization).
PATH_KEYS = frozenset({"vocabulary", "filepath", "path", "file_path", "vocabulary_file"})
# Plain values Keras 3 serializes with a class_name (not classes: tensors, shapes, tuples...).
KERAS_VALUE_CLASSES = frozenset({"__tensor__", "__numpy__", "__keras_tensor__", "__bytes__", "__typespec__", "__tuple__", "__slice__", "__ellipsis__"})
MODULE_ROOTS = ("keras", "tf_keras", "bnfold")


def tf_function_allowed(name: object) -> bool:
    """``nn.relu`` -> True: the function is on the explicit list of pure tensor math (by TF API name)."""
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", name):
        return False
    if name.startswith("compat.v1."):
        name = name[len("compat.v1.") :]
    parts = name.split(".")
    if any(p.startswith("__") and p != "__operators__" for p in parts):
        return False
    if name.startswith("__operators__."):
        return len(parts) == 2
    return name in TF_FUNCTIONS or (name.startswith(TF_FUNCTION_NAMESPACES) and len(parts) == 2 and parts[1] not in ("experimental",))


@functools.cache
def keras_builtin_classes() -> frozenset[str]:
    """Class names Keras (3 and tf_keras) and bnfold register as built-in and that name no callable of the file's choosing."""
    import importlib

    names: set[str] = set()
    spaces = ["layers", "initializers", "regularizers", "constraints", "optimizers", "losses", "metrics", "dtype_policies", "models", "mixed_precision"]
    for root in ("keras", "tf_keras"):
        try:
            base = importlib.import_module(root)
        except ImportError:
            continue
        for space in spaces:
            module = getattr(base, space, None)
            for attr in dir(module) if module is not None else ():
                if isinstance(getattr(module, attr, None), type):
                    names.add(attr)
        names.update({"Functional", "Sequential", "Model", "DTypePolicy", "FloatDTypePolicy", "Policy", "InputLayer"})
    names.add("ChannelAffine")
    return frozenset(names - set(KERAS_REFUSED) - TF_FUNCTION_LAYERS)


@functools.cache
def keras_op_classes(module: str) -> frozenset[str]:
    """Operation classes of one of :data:`KERAS_OP_MODULES` (never a module the file names otherwise)."""
    import importlib

    if module not in KERAS_OP_MODULES:
        return frozenset()
    try:
        mod = importlib.import_module(module)
        from keras.src.ops.operation import Operation
    except ImportError:
        return frozenset()
    return frozenset(n for n in dir(mod) if isinstance(getattr(mod, n), type) and issubclass(getattr(mod, n), Operation))


@functools.cache
def keras_activations() -> frozenset[str]:
    names: set[str] = set()
    for root in ("keras", "tf_keras"):
        try:
            import importlib

            module = importlib.import_module(root).activations
        except (ImportError, AttributeError):
            continue
        names.update(n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n)) and n not in ("get", "serialize", "deserialize"))
    return frozenset(names)


def keras_refusal(config: Any) -> tuple[str, str] | None:
    """(layer name, why) for the first entry of a Keras config that is not on the allowlist, else None.

    Walks every nested dict and list iteratively (nested models, wrappers, cells,
    initializers, dtype policies), skipping ``compile_config`` (bnfold loads with
    ``compile=False``, so losses and metrics are never deserialized).
    """
    stack: list[tuple[Any, str]] = [(config, "<model>")]
    while stack:
        item, layer = stack.pop()
        if isinstance(item, list):
            stack.extend((value, layer) for value in reversed(item))
            continue
        if not isinstance(item, dict):
            continue
        inner = item.get("config")
        name = item.get("name") or (inner.get("name") if isinstance(inner, dict) else None)
        if "class_name" in item and isinstance(name, str):
            layer = name
        if "class_name" in item:
            why = _entry_refusal(item)
            if why:
                return layer, why
        for key, value in item.items():
            if key == "compile_config":
                continue
            if key in PATH_KEYS and isinstance(value, str) and value:
                return layer, f"names a file to read in {key!r} ({value[:80]!r})"
            if key in ("function_type", "output_shape_type") and value == "lambda":
                return layer, "carries a serialized Python lambda"
            if isinstance(value, dict | list):
                stack.append((value, layer))
    return None


def _entry_refusal(entry: dict[str, Any]) -> str | None:
    class_name = entry.get("class_name")
    module = entry.get("module")
    raw = entry.get("config")
    inner: dict[str, Any] = raw if isinstance(raw, dict) else {}
    if not isinstance(class_name, str):
        return "has a class_name that is not a name"
    if class_name in KERAS_REFUSED:
        return KERAS_REFUSED[class_name]
    if class_name in KERAS_VALUE_CLASSES:
        return None
    if module is not None and (not isinstance(module, str) or module.split(".")[0] not in MODULE_ROOTS) and not (
        class_name == "function" and module == "builtins"
    ):
        return f"names {module}.{class_name}: loading it would import and run code from outside Keras"
    registered = entry.get("registered_name")
    if class_name == "function":
        target = entry.get("config")
        if isinstance(target, str) and target in keras_activations() and (module in (None, "builtins") or "activations" in str(module)):
            return None
        return f"names the function {module}.{target}, which is not a Keras activation"
    if class_name in TF_FUNCTION_LAYERS:
        if class_name in ("TFOpLambda", "SlicingOpLambda"):
            target = inner.get("function")
            if class_name == "SlicingOpLambda" and target != "__operators__.getitem":
                return f"is a SlicingOpLambda calling tf.{target}, which is not slicing"
            if tf_function_allowed(target):
                return None
            return f"is a {class_name} calling tf.{target}, which is not on bnfold's list of pure tensor functions"
        if class_name == "ClassMethod":
            cls, method = inner.get("cls_symbol"), inner.get("method_name")
            if cls == "RaggedTensor" and method in RAGGED_CLASS_METHODS:
                return None
            return f"is a ClassMethod calling tf.{cls}.{method}, which is not on bnfold's list of pure tensor functions"
        attr = inner.get("attr_name")
        return None if attr in TENSOR_ATTRIBUTES else f"is a {class_name} using the attribute {attr!r}, which is not on bnfold's list of tensor attributes"
    if isinstance(module, str) and module.startswith("keras.src.ops."):
        if class_name in keras_op_classes(module):
            return None
        return f"names {module}.{class_name}, which is not a Keras tensor op bnfold allows"
    if registered not in (None, class_name) and not (isinstance(registered, str) and registered.startswith("keras")):
        return f"names the registered object {registered!r}: a custom object, which is code"
    if class_name in keras_builtin_classes():
        return None
    return f"is a {class_name}, which is not a layer built into Keras (custom code)"
