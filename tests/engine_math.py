"""Run by tests/test_engine.py in its own process: the loop's math against Keras's own train step.

Two logical CPU devices are set up before TensorFlow starts, so `mirrored` has two replicas in
one process. For each case the same initial weights are trained three ways over the same
batches the loop draws (its seeded permutation, the last batch partial): Keras's
`train_on_batch` one batch at a time (the reference: model.fit's step), and `engine.Loop`.
Prints one JSON line per case: the largest weight difference from the reference and the epoch
losses of both. Without arguments, every case tests/test_engine.py holds it to (one TensorFlow start).

    python -m tests.engine_math [STRATEGY JIT OPTIMIZER]
"""

from __future__ import annotations

import json
import sys

import tensorflow as tf

tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * 2
)

import keras  # noqa: E402
import numpy as np  # noqa: E402

from pipeline import engine  # noqa: E402

N, BATCH, EPOCHS, SEED = 200, 32, 2, 7  # 6 full batches of 32 and one of 8 an epoch (10% held out: 180)
RATES = {"sgd": 0.1, "adam": 0.001}


def build() -> keras.Model:
    keras.utils.set_random_seed(0)
    layers = [keras.Input((28, 28)), keras.layers.Flatten(), keras.layers.Dense(16, "relu"), keras.layers.Dense(10)]
    return keras.Sequential(layers)


def make_optimizer(name: str) -> keras.optimizers.Optimizer:
    return keras.optimizers.get({"class_name": name, "config": {"learning_rate": RATES[name]}})


CASES = [("none", "jit", "sgd"), ("none", "nojit", "adam"), ("mirrored", "nojit", "sgd"), ("mirrored", "nojit", "adam")]


def main() -> None:
    for case in [tuple(sys.argv[1:4])] if len(sys.argv) > 1 else CASES:
        compare(*case)


def compare(strategy_name: str, jit_name: str, optimizer_name: str) -> None:
    jit = jit_name == "jit"
    rng = np.random.default_rng(1)
    x, y = rng.random((N, 28, 28), dtype=np.float32), rng.integers(0, 10, N)

    def loss() -> keras.losses.Loss:
        return keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def metrics() -> list[keras.metrics.Metric]:
        return [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]

    reference = build()
    initial = reference.get_weights()
    reference.compile(optimizer=make_optimizer(optimizer_name), loss=loss())
    n_train = int(N * 0.9)
    order_rng = np.random.default_rng(SEED)
    reference_losses = []
    for _ in range(EPOCHS):
        order, total = order_rng.permutation(n_train), 0.0
        for start in range(0, n_train, BATCH):
            rows = order[start : start + BATCH]
            total += float(reference.train_on_batch(x[rows], y[rows])) * len(rows)
        reference_losses.append(total / n_train)

    strategy = engine.strategy_for(strategy_name)
    if strategy_name == "mirrored":
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        model = build()
        model.set_weights(initial)
        optimizer = make_optimizer(optimizer_name)
        train_loss = loss()
    loop = engine.Loop(model, train_loss, metrics, optimizer, strategy, steps_per_execution=4, jit_compile=jit)
    history = loop.fit(x, y, epochs=EPOCHS, batch_size=BATCH, validation_split=0.1, seed=SEED, callbacks=[], verbose=0)
    difference = max(
        float(np.abs(a - b).max()) for a, b in zip(model.get_weights(), reference.get_weights(), strict=True)
    )
    print(json.dumps({"case": [strategy_name, jit_name, optimizer_name], "replicas": strategy.num_replicas_in_sync,
                      "max_weight_difference": difference, "losses": history["loss"],
                      "reference_losses": reference_losses}))  # fmt: skip


if __name__ == "__main__":
    main()
