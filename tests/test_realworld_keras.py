"""Every file of ../shared/realworld/keras (MANIFEST.md) to every output: .pb, .onnx, a SavedModel, Keras .h5 and .keras.

Each run either folds, with outputs equal to the model as its author's Keras runs
it (tf_keras for these Keras 2 files, TensorFlow for the SavedModel) and the same
signature (input names, ranks, known dims, dtypes; output shapes), or is refused
in one line for the reason listed in REFUSED. The files are used where they are,
never copied into the repository; absent, the tests skip.

``python tests/test_realworld_keras.py`` prints the per-file table of #23's note.
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import assert_close, realworld_path, run_graph

import bnfold
import bnfold.sources
from bnfold.core.errors import BnfoldError

REALWORLD = realworld_path("keras")
FILES = {
    "fer": "fer/fer/data/emotion_model.hdf5",
    "inaSpeechSegmenter": "inaSpeechSegmenter/inaSpeechSegmenter/keras_male_female_cnn.hdf5",
    "basic-pitch": "basic-pitch/basic_pitch/saved_models/icassp_2022/nmp",
    "yamnet": "stm32ai-modelzoo/audio_event_detection/yamnet_256_64x96_tl.h5",
    "mobilenet": "stm32ai-modelzoo/image_classification/mobilenet_v1_0.25_96.h5",
}
FORMATS = {".pb": "out.pb", ".onnx": "out.onnx", "SavedModel": "out_saved_model", ".h5": "out.h5", ".keras": "out.keras"}
# (file, format) -> what the one-line refusal must say: true reasons, not bnfold's limits.
REFUSED = {
    ("basic-pitch", ".h5"): "Keras output needs a Keras model as input",
    ("basic-pitch", ".keras"): "Keras output needs a Keras model as input",
    ("yamnet", ".keras"): "cannot contain character `/`",  # Keras 3 refuses its layer names
}
# file -> BN layers in the model (MANIFEST.md), for the table
BN_LAYERS = {"fer": 14, "inaSpeechSegmenter": 9, "basic-pitch": 3, "yamnet": 11, "mobilenet": 27}

pytestmark = pytest.mark.realworld


@dataclass
class Row:
    file: str
    fmt: str
    folded: int = 0
    standalone: int = 0
    skipped: list[str] | None = None
    error: str | None = None
    signature_equal: bool | None = None
    max_error: float | None = None


def reference(name: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], Any]:
    """Inputs (random, batch 2) and the outputs of the model as its author's Keras or TensorFlow runs it."""
    import tensorflow as tf

    path = REALWORLD / FILES[name]
    rng = np.random.default_rng(0)
    if path.is_dir():
        function = tf.saved_model.load(str(path)).signatures["serving_default"]
        specs = function.structured_input_signature[1]
        feeds = {k: (rng.standard_normal([2, *s.shape[1:]]) * 0.1).astype(s.dtype.as_numpy_dtype) for k, s in specs.items()}
        outputs = {k: v.numpy() for k, v in function(**{k: tf.constant(v) for k, v in feeds.items()}).items()}
        return feeds, outputs, function
    import tf_keras

    model = tf_keras.models.load_model(str(path), compile=False)
    feeds = {t.name.split(":")[0]: rng.standard_normal([2, *t.shape[1:]]).astype(np.float32) for t in model.inputs}
    prediction = model.predict(list(feeds.values())[0], verbose=0)
    return feeds, {"output_0": prediction}, model


def run_case(name: str, fmt: str, tmp: Path) -> Row:
    """Fold one file to one format; compare outputs and signature with the reference. Refusals are rows too."""
    import tensorflow as tf

    src = REALWORLD / FILES[name]
    dst = tmp / FORMATS[fmt]
    row = Row(name, fmt)
    try:
        result = bnfold.fold_file(src, dst)
    except BnfoldError as exc:
        row.error = str(exc)
        return row
    row.folded, row.standalone = result.count("folded"), result.count("standalone")
    row.skipped = [f"{s.name}: {s.reason}" for s in result.sites if s.action == "skipped"]
    feeds, expected, original = reference(name)
    x = list(feeds.values())
    errors: list[float] = []
    same = True

    def compare(want: np.ndarray, got: np.ndarray) -> None:
        nonlocal same
        same = same and np.shape(want) == np.shape(got)
        assert_close(want, got)
        errors.append(float(np.max(np.abs(np.asarray(want, np.float64) - np.asarray(got, np.float64)))))

    want = [expected[k] for k in sorted(expected)]
    if fmt in (".pb", "SavedModel"):
        original_frozen = bnfold.sources.load(src).graph_def
        places = {n.name: n for n in original_frozen.node if n.op == "Placeholder"}
        if fmt == ".pb":
            graph_def = bnfold.tf.io.load_graph_def(dst)
            written = {n.name: n for n in graph_def.node if n.op == "Placeholder"}
            same = set(written) == set(places) and all(
                written[k].attr["dtype"] == places[k].attr["dtype"] and written[k].attr["shape"] == places[k].attr["shape"] for k in places
            )
            signature = result.signature
            assert signature is not None
            inputs = {signature.inputs[k].split(":")[0]: v for k, v in feeds.items()} if src.is_dir() else dict(zip(places, x, strict=True))
            got = run_graph(graph_def, inputs, [signature.outputs[k] for k in sorted(signature.outputs)])
        else:
            loaded = tf.saved_model.load(str(dst)).signatures["serving_default"]
            before = bnfold.sources.load(src).signature
            assert before is not None
            same = sorted(loaded.structured_input_signature[1]) == sorted(before.inputs)
            same = same and sorted(loaded.structured_outputs) == sorted(before.outputs)
            keys = sorted(before.inputs)
            outs = loaded(**{k: tf.constant(v) for k, v in zip(keys, x if not src.is_dir() else [feeds[k] for k in keys], strict=True)})
            got = [outs[k].numpy() for k in sorted(outs)]
        for w, g in zip(want, got, strict=True):
            compare(w, g)
    elif fmt == ".onnx":
        import onnx
        import onnxruntime as ort

        model = onnx.load(str(dst))
        stage = result.onnx
        assert stage is not None and result.signature is not None
        places = {n.name: n for n in bnfold.sources.load(src).graph_def.node if n.op == "Placeholder"}
        for value in model.graph.input:
            tf_name = value.name.split(":")[0]
            dims = [d.size for d in places[tf_name].attr["shape"].shape.dim] if tf_name in places else None
            onnx_dims = [d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim]
            same = same and dims == onnx_dims
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        signature = result.signature
        if src.is_dir():
            onnx_feeds = {stage.input_names[signature.inputs[k].split(":")[0]]: v for k, v in feeds.items()}
        else:
            onnx_feeds = dict(zip([i.name for i in session.get_inputs()], x, strict=True))
        fetch = [stage.output_names[signature.outputs[k].split(":")[0]] for k in sorted(signature.outputs)]
        for w, g in zip(want, session.run(fetch, onnx_feeds), strict=True):
            compare(w, g)
    else:
        from bnfold.keras.load import declared_signature, keras_config, signature_difference

        if fmt == ".h5":
            import tf_keras

            folded = tf_keras.models.load_model(str(dst), compile=False)
            got = folded.predict(x[0], verbose=0)
        else:
            import keras

            folded = keras.saving.load_model(str(dst), compile=False)
            got = np.asarray(folded(x[0], training=False))
        declared = declared_signature(keras_config(src))
        assert declared is not None
        same = signature_difference(declared, folded.inputs, folded.outputs) is None
        same = same and [tuple(t.shape) for t in folded.outputs] == [tuple(t.shape) for t in original.outputs]
        compare(want[0], got)
    row.signature_equal = same
    row.max_error = max(errors) if errors else None
    return row


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("name", sorted(FILES))
def test_realworld_keras_file_to_every_format(name: str, fmt: str, tmp_path: Path) -> None:
    if not (REALWORLD / FILES[name]).exists():
        pytest.skip(f"{FILES[name]} is not in ../shared/realworld/keras")
    row = run_case(name, fmt, tmp_path)
    if (name, fmt) in REFUSED:
        assert row.error is not None and REFUSED[(name, fmt)] in row.error, row
        assert "\n" not in row.error
        assert not any(tmp_path.iterdir()), "a refused run writes nothing"
        return
    assert row.error is None, row.error
    assert row.signature_equal, row
    assert row.folded + row.standalone > 0


def table() -> str:
    """The note's table: per file and format, BN layers, folded, skipped with reasons, error, signature equal."""
    lines = [
        "| file | format | BN layers | folded (+ standalone) | skipped (reason) | max abs output error | signature equal |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in FILES:
        for fmt in FORMATS:
            with tempfile.TemporaryDirectory() as tmp:
                row = run_case(name, fmt, Path(tmp))
            if row.error:
                reason = row.error.split(": ", 1)[-1][:160]
                lines.append(f"| {name} | {fmt} | {BN_LAYERS[name]} | - | - | refused: {reason} | - |")
                continue
            skipped = "; ".join(row.skipped or []) or "0"
            err = f"{row.max_error:.2e}" if row.max_error is not None else "-"
            sig = "yes" if row.signature_equal else "no"
            folded = f"{row.folded}" + (f" (+ {row.standalone})" if row.standalone else "")
            lines.append(f"| {name} | {fmt} | {BN_LAYERS[name]} | {folded} | {skipped} | {err} | {sig} |")
            print(lines[-1], file=sys.stderr, flush=True)
    return "\n".join(lines)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    print(table())
