"""GradientStats: the gradient norms against the gradient worked out by hand, the update ratios against
the weights before and after, dvclive logging the keys, and a run that trains to the same weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

PROBE = 128


def model_and_loop() -> tuple:
    import keras
    import tensorflow as tf

    from pipeline import engine

    keras.utils.set_random_seed(7)
    model = keras.Sequential(
        [keras.Input((28, 28)), keras.layers.Flatten(), keras.layers.Dense(32, activation="relu"),
         keras.layers.Dense(10, activation="softmax")]
    )  # fmt: skip
    loss = keras.losses.SparseCategoricalCrossentropy()
    metrics = lambda: [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]  # noqa: E731
    loop = engine.Loop(model, loss, metrics, keras.optimizers.Adam(0.001), tf.distribute.get_strategy(),
                       steps_per_execution=256, jit_compile=False)  # fmt: skip
    return model, loss, loop


def by_hand(model: object, x: np.ndarray, y: np.ndarray) -> float:
    """||dL/dW2|| of mean sparse crossentropy over softmax(relu(x W1 + b1) W2 + b2): h^T (p - onehot(y)) / n."""
    w1, b1, w2, b2 = (w.numpy().astype(np.float64) for w in model.weights)
    h = np.maximum(x.reshape(len(x), -1) @ w1 + b1, 0)
    z = h @ w2 + b2
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    return float(np.linalg.norm(h.T @ (p - np.eye(10)[y]) / len(x)))


def fit(loop: object, data: dict, callbacks: list, epochs: int = 2) -> dict:
    return loop.fit(data["x_train"], data["y_train"], epochs=epochs, batch_size=32, validation_split=0.1, seed=1,
                    callbacks=callbacks, verbose=0)  # fmt: skip


def test_norms_and_ratios_are_what_they_say(small: dict, tmp_path: Path) -> None:
    import keras
    from dvclive import Live
    from dvclive.keras import DVCLiveCallback

    from pipeline.gradient_stats import GradientStats

    model, loss, loop = model_and_loop()
    x, y = small["x_train"][:PROBE], small["y_train"][:PROBE]
    begin = [w.numpy() for w in model.weights]

    class AtEnd(keras.callbacks.Callback):  # after GradientStats: the weights its numbers describe
        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            self.hand = by_hand(model, x, y)
            self.end = [w.numpy() for w in model.weights]

    at_end = AtEnd()
    with Live(str(tmp_path / "live"), save_dvc_exp=False, dvcyaml=None) as live:
        history = fit(loop, small, [GradientStats(loss, x, y), at_end, DVCLiveCallback(live=live)], epochs=1)
    names = [layer.name for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    assert {f"grad_norm/{n}" for n in names} | {f"update_ratio/{n}" for n in names} <= set(history)
    assert history[f"grad_norm/{names[1]}"][0] == pytest.approx(at_end.hand, rel=1e-4)
    for i, name in enumerate(names):  # kernels are weights 0 and 2: one epoch moved them this far
        moved = np.linalg.norm(at_end.end[2 * i] - begin[2 * i]) / np.linalg.norm(begin[2 * i])
        assert history[f"update_ratio/{name}"][0] == pytest.approx(moved, rel=1e-5) and moved > 0
    curves = tmp_path / "live/plots/metrics/train"  # dvclive's names: train/<key>
    assert (curves / f"grad_norm/{names[0]}.tsv").is_file() and (curves / f"update_ratio/{names[1]}.tsv").is_file()


def test_logging_changes_no_weight(small: dict) -> None:
    import tensorflow as tf

    from pipeline.gradient_stats import GradientStats

    tf.config.experimental.enable_op_determinism()
    model, loss, loop = model_and_loop()
    fit(loop, small, [GradientStats(loss, small["x_train"][:PROBE], small["y_train"][:PROBE])])
    logged = [w.numpy() for w in model.weights]
    model, _, loop = model_and_loop()
    fit(loop, small, [])
    assert all(np.array_equal(a, w.numpy()) for a, w in zip(logged, model.weights, strict=True))
