"""The model as train ships it, read without TensorFlow: raw uint8 28x28 images in, the loss's outputs out.

`models/` holds four things, versioned together as one DVC output (`pipeline.export` writes them):

- `model.tflite`: the shipped model as a LiteRT flatbuffer, converted by TensorFlow's own
  `TFLiteConverter` from the SavedModel below. `evaluate` and `predict` run it with LiteRT
  (`ai-edge-litert`, TensorFlow's inference runtime): a tenth of a second and about 50 MB where
  importing TensorFlow takes seconds and 700 MB. Its outputs agree with Keras' within 1e-5
  (tests/test_serving.py).
- `model.keras`: the same model for Keras users (`keras.saving.load_model(path, safe_mode=True)`),
  compiled with the loss and metrics it was trained for, so it can be trained further.
- `saved_model/`: a TensorFlow SavedModel for TF Serving (`serving_default`: uint8 `image` in).
- `model.json`: the card: what goes in, what comes out, the loss and how it wants its labels,
  and the sha256 of each model file. `evaluate` and `predict` read this, never params.yaml, so a
  params edit after training cannot make them misread the model.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import losses
from pipeline.errors import StageError

MODEL_DIR = Path("models")
MODEL_FILE, LITERT_FILE, CARD_FILE, SAVED_MODEL = "model.keras", "model.tflite", "model.json", "saved_model"
OUTPUTS = {"softmax": "probabilities", "sigmoid": "one-vs-rest probabilities", "linear": "scores", "tanh": "scores"}


def card(loss: str, wiring: losses.Head, stats: dict[str, Any]) -> dict[str, Any]:
    """What `model.json` says about the model: its input, its output, and its loss's wiring
    (`export.save` adds the sha256 of each model file it describes)."""
    return {
        "input": {"shape": [28, 28], "dtype": "uint8", "ink": "light on dark, 0-255, as in MNIST"},
        "output": {"activation": wiring.output, "meaning": OUTPUTS[wiring.output], "classes": list(range(10))},
        "loss": loss,
        "labels": losses.LOSSES[loss].labels,
        "normalization": stats,
    }


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class LiteRTModel:
    """The LiteRT flatbuffer behind `predict`: uint8 (n, 28, 28) -> float32 (n, 10), in batches.

    TensorFlow Lite's reference kernels, on one thread: plain loops compiled into the wheel, with no
    dispatch on the CPU's instruction set (the optimized kernels and the XNNPACK delegate pick
    AVX-512, AVX2+FMA or SSE code at run time, which rounds differently), so the metrics are the
    same bytes on every machine. 0.08 s for 1,000 digits, 0.8 s for 10,000.
    """

    def __init__(self, path: Path) -> None:
        from ai_edge_litert.interpreter import Interpreter, OpResolverType

        try:
            self.interpreter = Interpreter(
                model_path=str(path),
                num_threads=1,
                experimental_op_resolver_type=OpResolverType.BUILTIN_REF,
            )
        except (ValueError, RuntimeError) as exc:
            raise StageError(f"{path}: not a model LiteRT can read ({exc}); `dvc checkout` it or retrain") from None
        self.input = self.interpreter.get_input_details()[0]["index"]
        self.output = self.interpreter.get_output_details()[0]["index"]
        self.batch = 0

    def predict(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """float32 (n, 10) outputs for uint8 (n, 28, 28) images; empty input, empty output."""
        parts = [self._run(images[start : start + batch_size]) for start in range(0, len(images), batch_size)]
        return np.concatenate(parts) if parts else np.zeros((0, losses.NUM_CLASSES), np.float32)

    def _run(self, batch: np.ndarray) -> np.ndarray:
        if len(batch) != self.batch:
            self.interpreter.resize_tensor_input(self.input, [len(batch), 28, 28])
            self.interpreter.allocate_tensors()
            self.batch = len(batch)
        self.interpreter.set_tensor(self.input, np.ascontiguousarray(batch, dtype=np.uint8))
        self.interpreter.invoke()
        return self.interpreter.get_tensor(self.output).copy()


def load(folder: Path = MODEL_DIR) -> tuple[LiteRTModel, dict[str, Any]]:
    """The shipped LiteRT model and its card, or a StageError saying what is missing or wrong."""
    path, card_path = folder / LITERT_FILE, folder / CARD_FILE
    if not path.exists() or not card_path.exists():
        missing = path if not path.exists() else card_path
        raise StageError(f"{missing} not found; train a model first (dvc repro), or fetch one (dvc pull)")
    try:
        model_card = json.loads(card_path.read_text(encoding="utf-8"))
        recorded = model_card["sha256"][LITERT_FILE]
        if model_card["output"]["activation"] not in OUTPUTS:
            raise ValueError(f"unknown output activation {model_card['output']['activation']!r}")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StageError(f"{card_path}: not a readable card ({exc!r}); `dvc checkout {folder}` or retrain") from None
    if recorded != sha256(path):
        raise StageError(
            f"{card_path} describes another model than {path} (its sha256 differs); the two must come "
            f"from one run: `dvc checkout {folder}`, or retrain (dvc repro)"
        )
    if model_card.get("loss") not in losses.LOSSES:
        raise StageError(f"{card_path}: unknown loss {model_card.get('loss')!r}; retrain with this version")
    return LiteRTModel(path), model_card


def class_probabilities(outputs: np.ndarray, activation: str) -> np.ndarray:
    """The model's outputs as a distribution over the ten classes: float64 (n, 10), rows summing to 1.

    softmax outputs are one already. One-vs-rest sigmoid outputs (and softmax-or-sigmoid losses
    such as poisson) are divided by their row's sum; scores (linear, tanh: the hinge losses, mean
    squared error on a linear output) go through a softmax. Every loss's model is then scored by
    one log loss (`evaluate`'s `test.log_loss`), whatever scale its own loss has.
    """
    values = outputs.astype(np.float64)
    if activation in ("linear", "tanh"):
        values = np.exp(values - values.max(axis=1, keepdims=True))
    values = np.clip(values, 1e-15, None)  # a row of sigmoids that all underflowed still has a share each
    return values / values.sum(axis=1, keepdims=True)
