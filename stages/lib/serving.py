"""The model as train ships it: raw uint8 28x28 images in, class probabilities out, and its card.

`models/` holds three things, versioned together as one DVC output:

- `model.keras`: the trained layers behind a `Rescaling` layer that applies `normalize`'s
  transform and, for a model trained on logits, an output `Activation` (softmax / sigmoid).
  It is compiled with the loss (on probabilities) and metrics it was trained for, so a user
  needs only `keras.saving.load_model(path, safe_mode=True)` and `predict` / `evaluate`.
  Written byte-reproducibly: identical weights give an identical file.
- `model.json`: the card — what goes in, what comes out, the loss and how it wants its labels.
  `evaluate` and `predict` read this, never params.yaml, so a params edit after training cannot
  make them misread the model.
- `saved_model/`: a TensorFlow SavedModel for serving (`tf.saved_model.load(path).serve(images)`,
  or its `serving_default` signature for TF Serving).
"""

from __future__ import annotations

import hashlib
import json
import re
import zipfile
from pathlib import Path
from typing import Any

import keras

from stages.lib import registry
from stages.lib.errors import StageError

MODEL_DIR = Path("models")
MODEL_FILE, CARD_FILE, SAVED_MODEL = "model.keras", "model.json", "saved_model"
OUTPUTS = {"softmax": "probabilities", "sigmoid": "one-vs-rest probabilities", "linear": "scores", "tanh": "scores"}
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


def standalone(
    core: keras.Model, stats: dict[str, Any], train: Any, wiring: registry.Head, optimizer: keras.optimizers.Optimizer
) -> keras.Model:
    """uint8 (n, 28, 28) images -> `core` (trained on normalized floats) -> float32 (n, 10) `wiring.output`.

    When `core` ends in logits, an Activation layer turns them into the loss's probabilities. The
    model is compiled with the loss on those outputs, its metrics and the trained `optimizer`
    (its state is saved too, so the file can be trained further).
    """
    mean, std = float(stats["mean"]), float(stats["std"])
    layers: list[keras.layers.Layer] = [
        keras.Input(shape=(28, 28), dtype="uint8", name="image"),
        keras.layers.Rescaling(scale=1 / (255 * std), offset=-mean / std, name="normalize"),
        *core.layers,
    ]
    if wiring.activation != wiring.output:
        # float32 under a mixed-precision policy too: the card promises float32 probabilities
        layers.append(keras.layers.Activation(wiring.output, name="probabilities", dtype="float32"))
    model = keras.Sequential(layers, name="mnist_digits")
    model.compile(
        optimizer=optimizer,
        loss=registry.make_loss(train, from_logits=False),
        metrics=registry.make_metrics(train, from_logits=False),
    )
    return model


def card(loss: str, wiring: registry.Head, stats: dict[str, Any]) -> dict[str, Any]:
    """What `model.json` says about the model: its input, its output, and its loss's wiring
    (`save` adds the sha256 of the model.keras it describes)."""
    return {
        "input": {"shape": [28, 28], "dtype": "uint8", "ink": "light on dark, 0-255, as in MNIST"},
        "output": {"activation": wiring.output, "meaning": OUTPUTS[wiring.output], "classes": list(range(10))},
        "loss": loss,
        "labels": registry.LOSSES[loss].labels,
        "normalization": stats,
    }


def save(model: keras.Model, folder: Path, model_card: dict[str, Any]) -> None:
    """Write model.keras (reproducibly), model.json and saved_model/ into `folder` (created)."""
    folder.mkdir(parents=True, exist_ok=True)
    raw = folder / "raw.keras"
    model.save(raw)
    reproducible_keras_file(raw, folder / MODEL_FILE)
    raw.unlink()
    model_card = {**model_card, "model_sha256": hashlib.sha256((folder / MODEL_FILE).read_bytes()).hexdigest()}
    (folder / CARD_FILE).write_text(json.dumps(model_card, indent=2) + "\n")
    export_saved_model(model, folder / SAVED_MODEL)


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


def load(folder: Path = MODEL_DIR) -> tuple[keras.Model, dict[str, Any]]:
    """The shipped model and its card, or a StageError saying what is missing."""
    path, card_path = folder / MODEL_FILE, folder / CARD_FILE
    if not path.exists() or not card_path.exists():
        missing = path if not path.exists() else card_path
        raise StageError(f"{missing} not found; train a model first (dvc repro), or fetch one (dvc pull)")
    if not zipfile.is_zipfile(path):
        raise StageError(f"{path}: not a complete .keras file (truncated or damaged); `dvc checkout` it or retrain")
    try:
        model_card = json.loads(card_path.read_text())
    except (OSError, ValueError) as exc:
        raise StageError(f"{card_path}: not a readable card ({exc}); `dvc checkout {folder}` or retrain") from None
    if model_card.get("model_sha256") != hashlib.sha256(path.read_bytes()).hexdigest():
        raise StageError(
            f"{card_path} describes another model than {path} (its model_sha256 differs); the two must come "
            f"from one run: `dvc checkout {folder}`, or retrain (dvc repro)"
        )
    if model_card.get("loss") not in registry.LOSSES:
        raise StageError(f"{card_path}: unknown loss {model_card.get('loss')!r}; retrain with this version")
    try:
        model = keras.saving.load_model(path, safe_mode=True)
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as exc:
        if "safe_mode" in str(exc) or "lambda" in str(exc).lower():
            raise StageError(
                f"{path} holds code (a Lambda layer or a custom function), and is refused: models are loaded with "
                "safe_mode, which runs no code from a file. Use a model this pipeline trained (dvc repro)"
            ) from None
        raise StageError(f"{folder}: cannot load the model ({exc}); `dvc checkout` it or retrain (dvc repro)") from None
    return model, model_card
