"""Why a configuration stalls: per-layer gradient norms and update ratios, logged each epoch.

`GradientStats(loss, x_batch, y_batch)` is a Keras callback. At the end of each epoch it adds to
the epoch's `logs`, for each Dense layer's kernel W:

- `grad_norm/<layer>`: ||dL/dW||, the gradient of the training loss (the loss object the model
  trains with, so `from_logits` is honoured) on one fixed batch, the same every epoch;
- `update_ratio/<layer>`: ||W_end - W_begin|| / ||W_begin||, how far the epoch moved the kernel
  relative to its size (W_begin captured at the start of the epoch). Around 1e-3 per step is the
  usual rule of thumb for healthy training (Karpathy, CS231n "Neural Networks Part 3": ratio of
  updates to weights); an epoch of many steps sits higher, a stalled layer far lower.

Placed before dvclive's `DVCLiveCallback` in the callback list, the keys reach dvclive (which logs
them as `train/grad_norm/<layer>` etc.) and Keras' History. The forward pass runs with
`training=False` and no random op, so logging changes no weight and no random stream: a run
trains to the same bytes with and without it. Its cost is one forward and backward pass on the
batch and a copy of the kernels per epoch (benchmarks/gradient_stats.py measures it).
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf


class GradientStats(keras.callbacks.Callback):
    """Adds `grad_norm/<layer>` and `update_ratio/<layer>` for every Dense kernel to each epoch's logs."""

    def __init__(self, loss: keras.losses.Loss, x_batch: np.ndarray, y_batch: np.ndarray) -> None:
        super().__init__()
        self.loss = loss
        self.x = tf.constant(x_batch)
        self.y = tf.constant(y_batch)

    def on_train_begin(self, logs: dict | None = None) -> None:
        dense = [layer for layer in self.model.layers if isinstance(layer, keras.layers.Dense)]
        self.names = [layer.name for layer in dense]
        kernels = [layer.kernel for layer in dense]
        begins = [tf.Variable(tf.zeros(k.shape, k.dtype), trainable=False) for k in kernels]  # W_begin, on device

        @tf.function
        def snapshot() -> None:
            for begin, kernel in zip(begins, kernels, strict=True):
                begin.assign(kernel)

        @tf.function  # one call an epoch: the gradient on the probe batch and every ratio, in one graph
        def stats() -> tuple[tf.Tensor, tf.Tensor]:
            with tf.GradientTape() as tape:
                value = tf.reduce_mean(self.loss(self.y, self.model(self.x, training=False)))  # a mean, even unreduced
            norms = [tf.norm(g) for g in tape.gradient(value, kernels)]
            ratios = [tf.math.divide_no_nan(tf.norm(k - b), tf.norm(b)) for k, b in zip(kernels, begins, strict=True)]
            return tf.stack(norms), tf.stack(ratios)

        self._snapshot, self._stats = snapshot, stats

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        if not hasattr(self, "_stats"):  # driven without on_train_begin
            self.on_train_begin()
        self._snapshot()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if logs is None or not hasattr(self, "_stats"):
            return
        norms, ratios = (t.numpy() for t in self._stats())
        for name, norm, ratio in zip(self.names, norms, ratios, strict=True):
            logs[f"grad_norm/{name}"] = float(norm)
            logs[f"update_ratio/{name}"] = float(ratio)
