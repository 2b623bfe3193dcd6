"""Write the model as train ships it (`pipeline.serving` reads it): Keras, SavedModel, LiteRT and the card.

TensorFlow and Keras are imported here, so only `train` imports this module. Each file is
written byte-reproducibly: identical weights give identical files (`tests/test_serving.py`).
"""

from __future__ import annotations

import hashlib
import json
import re
import zipfile
from pathlib import Path
from typing import Any

import keras

from pipeline import losses, serving

_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


def standalone(
    core: keras.Model, stats: dict[str, Any], train: Any, wiring: losses.Head, optimizer: keras.optimizers.Optimizer
) -> keras.Model:
    """uint8 (n, 28, 28) images -> `core` (trained on normalized floats) -> float32 (n, 10) `wiring.output`.

    When `core` ends in logits, an Activation layer turns them into the loss's probabilities. The
    model is compiled with the loss on those outputs, its metrics and the trained `optimizer`
    (its state is saved too, so the file can be trained further). It computes in float32 even
    when `core` trained under a mixed-precision policy (its weights are float32 either way): the
    card promises float32 probabilities, and LiteRT's built-in kernels take no bfloat16.
    """
    mean, std = float(stats["mean"]), float(stats["std"])
    if any(layer.compute_dtype != "float32" for layer in core.layers):
        float32 = keras.models.clone_model(
            core, clone_function=lambda layer: layer.__class__.from_config({**layer.get_config(), "dtype": "float32"})
        )
        float32.set_weights(core.get_weights())
        core = float32
    layers: list[keras.layers.Layer] = [
        keras.Input(shape=(28, 28), dtype="uint8", name="image"),
        keras.layers.Rescaling(scale=1 / (255 * std), offset=-mean / std, name="normalize", dtype="float32"),
        *core.layers,
    ]
    if wiring.activation != wiring.output:
        layers.append(keras.layers.Activation(wiring.output, name="probabilities", dtype="float32"))
    model = keras.Sequential(layers, name="mnist_digits")
    model.compile(
        optimizer=optimizer,
        loss=losses.build(train.loss, train.loss_args, from_logits=False),
        metrics=losses.metrics(train.loss, from_logits=False),
    )
    return model


def save(model: keras.Model, folder: Path, model_card: dict[str, Any]) -> None:
    """Write model.keras, saved_model/, model.tflite and model.json (with each file's sha256) into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    raw = folder / "raw.keras"
    model.save(raw)
    reproducible_keras_file(raw, folder / serving.MODEL_FILE)
    raw.unlink()
    export_saved_model(model, folder / serving.SAVED_MODEL)
    (folder / serving.LITERT_FILE).write_bytes(to_litert(folder / serving.SAVED_MODEL))
    files = (serving.MODEL_FILE, serving.LITERT_FILE)
    model_card = {**model_card, "sha256": {name: serving.sha256(folder / name) for name in files}}
    (folder / serving.CARD_FILE).write_text(json.dumps(model_card, indent=2) + "\n")


def to_litert(saved_model: Path) -> bytes:
    """The SavedModel as a LiteRT flatbuffer (TensorFlow's `TFLiteConverter`, float32, no quantization).

    Only TensorFlow Lite's built-in operators: the file runs on plain `ai-edge-litert`, with no
    TensorFlow ops inside it. The converter's output is the same bytes for the same SavedModel.
    """
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model))
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    return converter.convert()


def export_saved_model(model: keras.Model, path: Path) -> None:
    """A SavedModel serving `model` (uint8 `image` in, its outputs out), written reproducibly.

    Keras' own `model.export` lists the variables in an order that changes from run to run
    (it collects them through identity sets); tracking the model's variables in their own
    order gives the same bytes every time. TensorFlow also stamps a random uuid into
    fingerprint.pb: it is replaced by one derived from the content hashes beside it.
    """
    import tensorflow as tf
    from tensorflow.core.protobuf import fingerprint_pb2

    @tf.function(input_signature=[tf.TensorSpec([None, 28, 28], tf.uint8, name="image")])
    def serve(image: tf.Tensor) -> tf.Tensor:
        return model(image, training=False)

    module = tf.Module()
    module.variables_in_order = [v.value for v in model.variables]
    module.serve = serve
    tf.saved_model.save(module, str(path), signatures={"serving_default": serve})
    fingerprint_file = path / "fingerprint.pb"
    fingerprint = fingerprint_pb2.FingerprintDef.FromString(fingerprint_file.read_bytes())
    content = f"{fingerprint.saved_model_checksum}:{fingerprint.checkpoint_hash}".encode()
    fingerprint.uuid = str(int.from_bytes(hashlib.sha256(content).digest()[:16], "big"))
    fingerprint_file.write_bytes(fingerprint.SerializeToString(deterministic=True))


def reproducible_keras_file(src: Path, dest: Path) -> None:
    """Copy a .keras zip without what changes between two saves of the same weights.

    Keras stamps `date_saved` into metadata.json, the save time on the weights' zip entry, and
    Python object ids as `shared_object_id` into config.json. Each entry is rewritten with a
    fixed time, the date dropped and the ids renumbered in order of appearance.
    """
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dest, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename == "metadata.json":
                meta = json.loads(data)
                meta.pop("date_saved", None)
                data = json.dumps(meta).encode()
            elif info.filename == "config.json":
                data = _renumber_shared_ids(data.decode()).encode()
            entry = zipfile.ZipInfo(info.filename, date_time=_ZIP_EPOCH)
            entry.compress_type, entry.external_attr = info.compress_type, 0o644 << 16
            zout.writestr(entry, data)


def _renumber_shared_ids(text: str) -> str:
    ids: dict[str, str] = {}
    return re.sub(
        r'("shared_object_id": )(\d+)', lambda m: m.group(1) + ids.setdefault(m.group(2), str(len(ids))), text
    )
