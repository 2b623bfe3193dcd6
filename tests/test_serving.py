"""The LiteRT model that evaluate and predict run, held against the Keras model it was converted from.

For a softmax model, a one-vs-rest sigmoid model (the tutorial's binary_crossentropy) and a model
trained on logits: the same probabilities within 1e-5 on the test digits, the same predictions,
and the log loss as evaluate takes it (scikit-learn's `log_loss` of `serving.class_probabilities`)
equal, for softmax outputs, to Keras' own crossentropy of the same outputs. Also: the export is
byte-reproducible, and the log loss of outputs that are not a distribution is taken of the
distribution the README describes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline import losses, optimizers, params, serving

CASES = {
    "softmax": {"loss": "sparse_categorical_crossentropy"},
    "sigmoid": {"loss": "binary_crossentropy"},
    "logits": {"loss": "categorical_crossentropy", "from_logits": True},
}


def shipped(folder: Path, section: dict, small: dict) -> tuple:
    """Train 8 steps on 256 real digits as train does, export as train does: the Keras model shipped,
    the uint8 test images and their labels."""
    from pipeline import export
    from stages import train

    p = params.parse({"train": section})
    wiring = losses.head(p.train.loss, from_logits=p.train.from_logits)
    core = train.build_model(p.model, wiring)
    optimizer = optimizers.build(p.train.optimizer, p.train.lr_schedule)
    loss = losses.build(p.train.loss, p.train.loss_args, from_logits=wiring.from_logits)
    core.compile(optimizer=optimizer, loss=loss, run_eagerly=True)  # eager: 8 steps need no tracing
    labels = losses.encode_labels(small["y_train"][:256], losses.LOSSES[p.train.loss])
    core.fit(small["x_train"][:256], labels, epochs=1, verbose=0)
    stats = {"method": "scale", "mean": 0.0, "std": 1.0}
    model = export.standalone(core, stats, p.train, wiring, optimizer)
    export.save(model, folder, serving.card(p.train.loss, wiring, stats))
    return model, np.rint(small["x_test"] * 255).astype(np.uint8), small["y_test"]


@pytest.mark.parametrize("case", CASES)
def test_litert_gives_keras_probabilities_predictions_and_log_loss(case: str, tmp_path: Path, small: dict) -> None:
    import keras
    from sklearn.metrics import log_loss  # not at collection (docs/testing.md)

    model, x, y = shipped(tmp_path, CASES[case], small)
    expected = model.predict(x, verbose=0)
    litert, card = serving.load(tmp_path)
    got = litert.predict(x, batch_size=64)  # several batches and a short last one
    assert got.shape == (len(x), 10) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert (got.argmax(axis=1) == expected.argmax(axis=1)).all()
    assert card["sha256"]["model.tflite"] == serving.sha256(tmp_path / "model.tflite")

    probabilities = serving.class_probabilities(got, card["output"]["activation"])
    np.testing.assert_allclose(probabilities.sum(axis=1), 1, atol=1e-12)
    ours = log_loss(y, probabilities, labels=range(10))
    if card["output"]["activation"] == "softmax":  # a distribution already: Keras' own crossentropy of it
        keras_value = keras.losses.sparse_categorical_crossentropy(y, expected).numpy().mean()
        assert ours == pytest.approx(float(keras_value), abs=1e-4)
    else:  # one-vs-rest: each row's share of the ten sigmoids
        shares = expected / expected.sum(axis=1, keepdims=True)
        assert ours == pytest.approx(-np.log(shares[np.arange(len(y)), y]).mean(), abs=1e-4)


def test_scores_become_a_distribution_by_softmax_and_sigmoids_by_their_share() -> None:
    import keras

    scores = np.array([[2.0, 0.0, -1.0, 0, 0, 0, 0, 0, 0, 0]], np.float32)
    softmax = keras.ops.softmax(scores).numpy()
    np.testing.assert_allclose(serving.class_probabilities(scores, "linear"), softmax, atol=1e-7)
    sigmoids = np.full((1, 10), 0.1, np.float32)
    sigmoids[0, 3] = 0.9
    np.testing.assert_allclose(serving.class_probabilities(sigmoids, "sigmoid")[0, 3], 0.9 / 1.8, rtol=1e-6)
    underflowed = np.zeros((1, 10), np.float32)  # ten sigmoids at 0 still make a distribution, not a NaN
    np.testing.assert_allclose(serving.class_probabilities(underflowed, "sigmoid"), 0.1)
