"""The losses, and the one place that knows how each must be wired: labels, output activation, logits, metrics.

For every loss, `LOSSES` records the label encoding Keras expects (integer class ids or one-hot
rows), the output activations that make sense for it (the first is what `auto` picks), and
whether it can train on logits; `head` turns that into how the model ends (used by train,
serving, the card and the trial). Accuracy always means multi-class top-1 accuracy (argmax of the
outputs against the true class), whatever the loss; one-vs-rest losses also report
`binary_accuracy`, under that name, never as "accuracy".

Importing this module is cheap (numpy only): params takes its names as the schema's choices, and
evaluate and predict read a model's wiring, without TensorFlow. `build` and `metrics` import
Keras when called (train only). Raises ParamError naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from pipeline import arguments
from pipeline.errors import ParamError

if TYPE_CHECKING:  # pragma: no cover
    import keras

NUM_CLASSES = 10


@dataclass(frozen=True)
class LossSpec:
    """How one Keras loss is wired: labels, output activation, logits, metrics."""

    keras_class: str
    labels: Literal["sparse", "onehot"]
    activations: tuple[str, ...]  # allowed output activations; the first is the `auto` choice
    from_logits: bool  # accepts `from_logits=True` (then the output layer is linear)
    one_vs_rest: bool = False  # ten independent sigmoids: also report binary_accuracy

    @property
    def default_activation(self) -> str:
        return self.activations[0]


LOSSES: dict[str, LossSpec] = {
    "sparse_categorical_crossentropy": LossSpec("SparseCategoricalCrossentropy", "sparse", ("softmax",), True),
    "categorical_crossentropy": LossSpec("CategoricalCrossentropy", "onehot", ("softmax",), True),
    "binary_crossentropy": LossSpec("BinaryCrossentropy", "onehot", ("sigmoid",), True, one_vs_rest=True),
    "categorical_focal_crossentropy": LossSpec("CategoricalFocalCrossentropy", "onehot", ("softmax",), True),
    "binary_focal_crossentropy": LossSpec("BinaryFocalCrossentropy", "onehot", ("sigmoid",), True, one_vs_rest=True),
    "kl_divergence": LossSpec("KLDivergence", "onehot", ("softmax",), False),
    "poisson": LossSpec("Poisson", "onehot", ("softmax", "sigmoid"), False),
    "categorical_hinge": LossSpec("CategoricalHinge", "onehot", ("linear", "tanh"), False),
    "squared_hinge": LossSpec("SquaredHinge", "onehot", ("linear", "tanh"), False),
    "mean_squared_error": LossSpec("MeanSquaredError", "onehot", ("softmax", "sigmoid", "linear"), False),
}
OUTPUT_ACTIVATIONS: tuple[str, ...] = ("softmax", "sigmoid", "linear", "tanh")

# Keyword arguments a user may not pass through `train.loss_args`: set elsewhere or meaningless.
RESERVED = {"from_logits": "train.from_logits", "name": None, "dtype": None, "reduction": None}


@dataclass(frozen=True)
class Head:
    """How the model ends for one loss: the one place that decides it (train, serving, the card, the trial).

    `activation`: the last Dense layer's, as trained ("linear" when the loss is computed on logits).
    `from_logits`: whether the loss and metrics take that layer's raw outputs.
    `output`: what the shipped model outputs: the loss's own probabilities (softmax / sigmoid) on
    logits, else `activation`; the shipped model appends an Activation layer when they differ.
    """

    activation: str
    from_logits: bool
    output: str


def head(loss: str, output_activation: str = "auto", from_logits: bool = False) -> Head:
    """The Head for `train.loss`, `model.output_activation` and `train.from_logits` (checked by check_combination)."""
    spec = LOSSES[loss]
    output = spec.default_activation if from_logits or output_activation == "auto" else output_activation
    return Head(activation="linear" if from_logits else output, from_logits=from_logits, output=output)


def check_combination(loss: str, requested: str, from_logits: bool) -> None:
    """Raise ParamError for an output activation / logits setting that makes no sense for `loss`."""
    spec = LOSSES[loss]
    if from_logits and not spec.from_logits:
        ok = ", ".join(n for n, s in LOSSES.items() if s.from_logits)
        raise ParamError("train.from_logits", f"'{loss}' cannot train on logits; losses that can: {ok}")
    if from_logits and requested not in ("auto", "linear"):
        raise ParamError(
            "model.output_activation",
            f"'{requested}' with train.from_logits: true; on logits the output layer is linear (use auto or linear)",
        )
    if not from_logits and requested != "auto" and requested not in spec.activations:
        hint = " (or linear with train.from_logits: true)" if spec.from_logits else ""
        raise ParamError(
            "model.output_activation",
            f"'{requested}' does not fit loss '{loss}'; allowed: auto, {', '.join(spec.activations)}{hint}",
        )


def encode_labels(y: np.ndarray, spec: LossSpec) -> np.ndarray:
    """Integer class ids (shape (n,)) as the loss expects them: int32 ids (n,), or float32 one-hot rows (n, 10)."""
    y = np.asarray(y)
    if spec.labels == "sparse":
        return y.astype(np.int32)
    return np.eye(NUM_CLASSES, dtype=np.float32)[y]


def kwargs(loss: str, loss_args: dict[str, Any], *, from_logits: bool) -> dict[str, Any]:
    """`train.loss_args` checked against the loss's constructor (no Keras import), with `from_logits`."""
    spec = LOSSES[loss]
    for name in loss_args:
        if name in RESERVED:
            raise ParamError(
                f"train.loss_args.{name}", f"set {RESERVED[name]} instead" if RESERVED[name] else "cannot be set here"
            )
    checked = arguments.check(
        loss_args, "loss", spec.keras_class, set(RESERVED), key="train.loss_args", what=f"loss '{loss}'"
    )
    return {**checked, "from_logits": from_logits} if spec.from_logits else checked


def build(loss: str, loss_args: dict[str, Any], *, from_logits: bool) -> keras.losses.Loss:
    """The Keras loss for `train.loss` and `train.loss_args`, on logits or not (`Head.from_logits`).

    Raises ParamError for an argument the loss does not take or refuses.
    """
    import keras

    config = kwargs(loss, loss_args, from_logits=from_logits)
    cls = getattr(keras.losses, LOSSES[loss].keras_class)
    return arguments.construct(cls, config, key="train.loss_args", what=f"loss '{loss}'")


def metrics(loss: str, *, from_logits: bool) -> list[keras.metrics.Metric]:
    """Top-1 `accuracy` for every loss, plus `binary_accuracy` for one-vs-rest losses (threshold 0 on logits)."""
    import keras

    spec = LOSSES[loss]
    if spec.labels == "sparse":
        found = [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]
    else:
        found = [keras.metrics.CategoricalAccuracy(name="accuracy")]
    if spec.one_vs_rest:  # logits above 0 <=> probabilities above 0.5
        found.append(keras.metrics.BinaryAccuracy(name="binary_accuracy", threshold=0.0 if from_logits else 0.5))
    return found
