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
        self._begin: dict[str, np.ndarray] = {}

    def _kernels(self) -> list[tuple[str, keras.Variable]]:
        return [(layer.name, layer.kernel) for layer in self.model.layers if isinstance(layer, keras.layers.Dense)]

    def on_train_begin(self, logs: dict | None = None) -> None:
        kernels = [kernel for _, kernel in self._kernels()]

        @tf.function(jit_compile=True)  # traced once per fit: eager Keras calls cost more than a small epoch
        def norms() -> list[tf.Tensor]:
            with tf.GradientTape() as tape:
                value = tf.reduce_mean(self.loss(self.y, self.model(self.x, training=False)))  # a mean, even unreduced
            return [tf.norm(g) for g in tape.gradient(value, kernels)]

        self._norms = norms

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._begin = {name: kernel.numpy() for name, kernel in self._kernels()}

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if logs is None:
            return
        if not hasattr(self, "_norms"):  # driven without on_train_begin
            self.on_train_begin()
        kernels = self._kernels()
        for (name, kernel), norm in zip(kernels, self._norms(), strict=True):
            logs[f"grad_norm/{name}"] = float(norm)
            begin = self._begin.get(name)
            if begin is not None:
                size = float(np.linalg.norm(begin))
                moved = float(np.linalg.norm(kernel.numpy() - begin))
                logs[f"update_ratio/{name}"] = moved / size if size > 0 else 0.0
