"""The training loop: one compiled step, fast on one machine and data-parallel under tf.distribute.

`model.fit` at batch 32 spends most of an MNIST epoch on per-step overhead (1,688 Python ->
TensorFlow round trips), and Keras 3's `fit` does not run under `MultiWorkerMirroredStrategy`.
Here the training set stays in memory as tensors, each epoch's shuffled order is an index matrix,
and one `tf.function` runs `steps_per_execution` steps per call, each a `strategy.run` of the same
per-replica step (every replica gathers its share of the global batch; the optimizer sums the
gradients across replicas). With one replica the whole call is XLA-compiled (`jit_compile`).
The math is `model.fit`'s: the same shuffled batches (the last one partial), the loss averaged
over the global batch (through `optimizer.scale_loss`, as fit's step), one `apply_gradients` per batch
(where Keras clips, accumulates, decays and keeps its moving averages), validation on the held-out
tail, and fit's end: `finalize_variable_values` (use_ema), then the callbacks' `on_train_end`.

Under `multi_worker`, `check_agreement` stops every worker before the first variable unless all
train the same params on the same data (`fingerprint`), `ClusterDeadline` ends a cluster that never
takes its first step, `cluster_errors` turns a peer that went away into one line, and `finish`
carries the chief's word on its outputs to the other workers, so that none reports success for a
run that failed.

Keras callbacks drive everything around it (progress bar, history, dvclive, early stopping),
called at the same moments `fit` calls them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from pipeline import datasets, losses, optimizers, runner
from pipeline.errors import ParamError, StageError

EVAL_BATCH = 4096  # forward passes only: the batch size changes nothing but float sum order


def strategy_for(name: str) -> tf.distribute.Strategy:
    """`train.distribute`: none (default strategy), mirrored (this machine's GPUs), multi_worker (TF_CONFIG).

    Raises StageError when multi_worker finds no usable TF_CONFIG (read by TensorFlow's own
    `TFConfigClusterResolver`): a cluster, and this process's task in it.
    """
    if name == "none":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
    try:
        cluster = resolver.cluster_spec().as_dict()
        valid = resolver.task_type in cluster and 0 <= resolver.task_id < len(cluster[resolver.task_type])
    except (ValueError, TypeError):  # not JSON, not a cluster, no task or a task index that is not a number
        valid = False
    if not valid:
        raise StageError(
            "train.distribute: multi_worker needs TF_CONFIG, JSON like "
            '{"cluster": {"worker": ["host1:12345", "host2:12345"]}, "task": {"type": "worker", "index": 0}} '
            f"(got {os.environ.get('TF_CONFIG')!r}); see docs/training.md"
        )
    return tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver)


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process writes the outputs: the only one, the `chief`, or worker 0 without a chief."""
    resolver = getattr(strategy, "cluster_resolver", None)
    cluster = resolver.cluster_spec().as_dict() if resolver else {}
    if not cluster:
        return True
    if "chief" in cluster:
        return resolver.task_type == "chief"
    return resolver.task_type == "worker" and resolver.task_id == 0


def task_name(strategy: tf.distribute.Strategy) -> str:
    """This process in a multi_worker line: "chief" (the one that writes), else "worker 1" (TF_CONFIG's task)."""
    if is_chief(strategy):
        return "chief"
    return f"{strategy.cluster_resolver.task_type} {strategy.cluster_resolver.task_id}"


def exchange(strategy: tf.distribute.Strategy, value: Any) -> list[Any]:
    """Every replica's JSON-able `value`, this process's among them, in replica order (a process with
    several replicas appears once per replica): `strategy.gather` of the texts' lengths (int32, one per
    replica), then of the UTF-8 texts as int32 codes, padded to the longest. For a few bytes before or
    after training, never between its steps; every worker must call it at the same point."""
    text = np.frombuffer(json.dumps(value).encode(), np.uint8).astype(np.int32)

    def gather(mine: np.ndarray) -> np.ndarray:
        values = strategy.experimental_distribute_values_from_function(lambda _: tf.constant(mine))
        return strategy.gather(values, axis=0).numpy()

    lengths = gather(np.array([len(text)], np.int32))
    padded = np.zeros((1, lengths.max()), np.int32)
    padded[0, : len(text)] = text
    rows = gather(padded)
    return [json.loads(row[:length].astype(np.uint8).tobytes()) for row, length in zip(rows, lengths, strict=True)]


# Settings multi_worker hosts may hold differently (each its own cores, its own patience for the cluster);
# every other key of `model` and `train` must be the same on all of them (`fingerprint`).
PER_HOST = ("train.speed.threads", "train.cluster_timeout_s")


class ClusterDeadline(keras.callbacks.Callback):
    """Ends a multi_worker run with one line when its first training step has not finished within
    `seconds` (a worker that never started, a wrong address). TensorFlow waits for the cluster in C
    holding the GIL, where no thread of its process runs, and takes SIGTERM over (its preemption
    notifier): the stage forks here, TensorFlow runs in the child, and the stage's own process
    stays out of it as the watchdog that keeps the deadline and the signals for the whole run."""

    def __init__(self, seconds: float, outputs: tuple[Path, ...]) -> None:
        super().__init__()
        line = (
            f"train.distribute: multi_worker: the cluster did not take its first step within {seconds:g} s "
            f"(train.cluster_timeout_s); is every worker of TF_CONFIG started and reachable? "
            f"TF_CONFIG: {os.environ.get('TF_CONFIG', '')}"
        )
        self.done: Callable[[], None] | None = runner.fork_watched(seconds, line, outputs)  # returns in the child

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if self.done:  # a step across the cluster finished: every worker answered
            self.done()
            self.done = None


def fingerprint(dumped: dict[str, Any], x: np.ndarray, y: np.ndarray, data: Path) -> dict[str, str]:
    """What every host of a multi_worker run must share, key -> value as a line shows it: each key of the
    `model` and `train` sections but PER_HOST, and the training data as it is fed to the loop (its example
    count and the sha256 of its arrays' dtypes, shapes and bytes)."""

    def flat(value: Any, key: str) -> Iterator[tuple[str, Any]]:
        if isinstance(value, dict):
            for name, inner in value.items():
                yield from flat(inner, f"{key}.{name}")
        elif key not in PER_HOST:
            yield key, value if isinstance(value, str) else json.dumps(value)

    digest = hashlib.sha256()
    for array in (x, y):
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).data)
    settings = dict(item for section in ("model", "train") for item in flat(dumped[section], section))
    return {**settings, f"the training data ({data})": f"{len(x)} examples, sha256 {digest.hexdigest()[:16]}"}


@contextlib.contextmanager
def cluster_errors() -> Iterator[None]:
    """multi_worker: TensorFlow's UnavailableError (a peer stopped mid-run) as one line (StageError)."""
    try:
        yield
    except tf.errors.UnavailableError as exc:
        said = [line.strip() for line in (exc.message or "").splitlines() if "abort" in line.lower()][:1]
        raise StageError("train.distribute: multi_worker: another worker stopped or cannot be reached"
                         + (f" (TensorFlow: {said[0][:200]})" if said else "")) from None  # fmt: skip


def check_agreement(strategy: tf.distribute.Strategy, settings: dict[str, str]) -> None:
    """Stop every worker of a multi_worker run, before any variable or step, unless all hold the same
    `settings` (what shapes training, key -> value as shown): each raises StageError with the same line,
    naming the first key (in the chief's order) where a worker differs from the chief, and both values.

    Without it, workers with other params or data meet in collectives of other shapes or counts: they
    wait out the cluster timeout, or one fails blaming the network while another ends as if it trained.
    """
    everyone = exchange(strategy, [task_name(strategy), settings])
    chief = next(values for name, values in everyone if name == "chief")
    for name, values in everyone:
        for key in [*chief, *(k for k in values if k not in chief)]:
            if values.get(key) != chief.get(key):
                chiefs, theirs = (v.get(key, "(not set)") for v in (chief, values))
                # a worker that exits as soon as it has the values can close the channel another still reads
                # them from: one more exchange first, which each enters only once it has them
                with contextlib.suppress(tf.errors.OpError):
                    exchange(strategy, None)
                raise StageError(
                    f"train.distribute: multi_worker: workers disagree on {key}: chief {chiefs}, {name} {theirs}; "
                    "run every worker with the same params.yaml and data"
                )


def finish(strategy: tf.distribute.Strategy, failure: str | None = None) -> None:
    """After a multi_worker run has trained, the chief tells the other workers how writing the outputs
    went (`failure`: its error line, or None); they wait for it, and raise StageError with the chief's
    line if it failed, so that no worker reports success for a run that failed. The chief goes on
    whatever the others do (one that has gone no longer needs telling)."""
    try:
        everyone = exchange(strategy, [task_name(strategy), failure])
    except tf.errors.OpError:
        if is_chief(strategy):
            return
        raise
    said = next(failure for name, failure in everyone if name == "chief")
    if said is not None and not is_chief(strategy):
        raise StageError(f"train.distribute: multi_worker: the chief failed after training: {said}")


def trial(train: Any) -> None:
    """Build `train`'s loss, optimizer and schedule and take one training step on a toy model, when
    params.yaml passes Keras more than names and a learning rate (before the real model is built).

    Catches what check's signature test cannot: a value of the right type that Keras refuses only
    once it trains (a list where a number belongs, a schedule argument out of range, ...). Raises
    StageError naming the keys: under DVC, train's outputs are gone by then, and the runner's line
    says how to restore them.
    """
    used = {
        "train.optimizer": set(train.optimizer.kwargs) - {"learning_rate"},
        "train.loss_args": train.loss_args,
        "train.lr_schedule": train.lr_schedule.name != "none",
    }
    keys = ", ".join(key for key, value in used.items() if value)
    if not keys:
        return
    wiring = losses.head(train.loss, from_logits=train.from_logits)
    try:
        optimizer = optimizers.build(train.optimizer, train.lr_schedule)
        loss = losses.build(train.loss, train.loss_args, from_logits=wiring.from_logits)
        # named, so that it takes none of the automatic names ("dense", "sequential") the real model gets
        dense = keras.layers.Dense(losses.NUM_CLASSES, activation=wiring.activation, name="trial_dense")
        model = keras.Sequential([keras.Input((4,)), dense], name="trial")
        model.compile(
            optimizer=optimizer, loss=loss, metrics=losses.metrics(train.loss, from_logits=wiring.from_logits)
        )
        model.train_on_batch(
            np.zeros((2, 4), np.float32), losses.encode_labels(np.array([0, 1]), losses.LOSSES[train.loss])
        )
    except ParamError as exc:
        raise StageError(str(exc)) from None
    except Exception as exc:  # Keras' own complaint, whatever its type
        message = " ".join(str(exc).split())[:300]
        raise StageError(f"params.yaml: {keys}: Keras refused these settings in a one-step trial: {message}") from None


def set_threads(threads: int) -> None:
    """Cap TensorFlow's thread pools (0 keeps TensorFlow's choice: all cores); call before any op runs."""
    if threads > 0:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)


class Loop:
    """Trains `model` (built under `strategy.scope()`) with `loss`, `metrics` and `optimizer`."""

    def __init__(
        self,
        model: keras.Model,
        loss: keras.losses.Loss,
        make_metrics: Callable[[], list[keras.metrics.Metric]],
        optimizer: keras.optimizers.Optimizer,
        strategy: tf.distribute.Strategy,
        *,
        steps_per_execution: int,
        jit_compile: bool,
    ) -> None:
        self.model, self.optimizer, self.strategy = model, optimizer, strategy
        # the same loss, unreduced: one value per example (averaged by `tf.nn.compute_average_loss`)
        self.per_example_loss = type(loss).from_config({**loss.get_config(), "reduction": "none"})
        self.steps_per_execution = steps_per_execution
        self.epoch_seconds: list[float] = []  # wall time of each epoch of the last fit (training, validation)
        with strategy.scope():
            optimizer.build(model.trainable_variables)
            self.train_metrics = [keras.metrics.Mean(name="loss"), *make_metrics()]
        self.val_metrics = [keras.metrics.Mean(name="loss"), *make_metrics()]
        one_replica = strategy.num_replicas_in_sync == 1
        # autograph=False: nothing here is Python control flow on tensors (the loop is tf.while_loop),
        # and AutoGraph's source transformation took half a second of every run's tracing
        self._run_steps = tf.function(self._steps, jit_compile=jit_compile and one_replica, autograph=False)
        # the partial last batch and validation run once an epoch: not worth an XLA compilation each
        self._run_tail = tf.function(self._steps, autograph=False)
        self._evaluate = tf.function(self._eval_batch, autograph=False)

    def _replica_step(self, x: tf.Tensor, y: tf.Tensor, rows: tf.Tensor) -> None:
        """One update on this replica's share of a global batch (`rows`: its indices into x, y)."""
        context = tf.distribute.get_replica_context()
        replicas, me = context.num_replicas_in_sync, context.replica_id_in_sync_group
        size = tf.shape(rows)[0]
        base, extra = size // replicas, size % replicas  # the first `extra` replicas take one row more
        share = base + tf.cast(me < extra, tf.int32)
        start = me * base + tf.minimum(me, extra)
        mine = rows[start : start + share]
        xb, yb = tf.gather(x, mine), tf.gather(y, mine)
        with tf.GradientTape() as tape:
            predictions = self.model(xb, training=True)
            per_example = self.per_example_loss(yb, predictions)
            # this replica's sum over the global batch size; the optimizer sums the replicas' gradients,
            # so the update follows the global batch's mean loss (model.fit's math)
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=size)
            scaled = self.optimizer.scale_loss(loss)  # loss scaling under mixed_float16
        weights = self.model.trainable_variables
        gradients = tape.gradient(scaled, weights)
        self.optimizer.apply_gradients(zip(gradients, weights, strict=True))
        self.train_metrics[0].update_state(per_example)
        for metric in self.train_metrics[1:]:
            metric.update_state(yb, predictions)

    def _steps(self, x: tf.Tensor, y: tf.Tensor, batches: tf.Tensor, first: tf.Tensor, count: tf.Tensor) -> None:
        """Rows `first` to `first + count - 1` of `batches` (int32, one global batch of indices a row)."""

        def step(i: tf.Tensor) -> tf.Tensor:
            self.strategy.run(self._replica_step, args=(x, y, batches[i]))
            return i + 1

        # tensors `first` and `count`, not Python ints: XLA compiles once, not once per distinct (first, count)
        tf.while_loop(lambda i: i < first + count, step, [first])

    def _eval_batch(self, x: tf.Tensor, y: tf.Tensor) -> None:
        predictions = self.model(x, training=False)
        self.val_metrics[0].update_state(self.per_example_loss(y, predictions))
        for metric in self.val_metrics[1:]:
            metric.update_state(y, predictions)

    def fit(
        self,
        x: np.ndarray,
        y: np.ndarray,
        *,
        epochs: int,
        batch_size: int,
        validation_split: float,
        seed: int,
        callbacks: Sequence[keras.callbacks.Callback],
        verbose: int,
    ) -> dict[str, list[float]]:
        """model.fit's contract: the last `validation_split` held out, reshuffled batches each epoch, and
        its end: the optimizer's final values, then `on_train_end`. Returns the History's dict."""
        n_train, _ = datasets.fit_validation_counts(len(x), validation_split)
        x_train, y_train = tf.constant(x[:n_train]), tf.constant(y[:n_train])
        x_val, y_val = x[n_train:], y[n_train:]
        full, rest = divmod(n_train, batch_size)
        steps = full + (rest > 0)
        size = self.steps_per_execution
        chunks = [(first, min(size, full - first)) for first in range(0, full, size)]
        hooks = keras.callbacks.CallbackList(
            list(callbacks), add_history=True, add_progbar=verbose != 0, model=self.model,
            verbose=verbose, epochs=epochs, steps=steps,
        )  # fmt: skip
        rng = np.random.default_rng(seed)
        self.model.stop_training = False
        self.epoch_seconds = []
        hooks.on_train_begin()
        for epoch in range(epochs):
            began = time.perf_counter()
            for metric in self.train_metrics + self.val_metrics:
                metric.reset_state()
            hooks.on_epoch_begin(epoch)
            order = rng.permutation(n_train).astype("int32")
            batches = tf.constant(order[: full * batch_size].reshape(full, batch_size))
            for first, count in chunks:
                self._run_steps(x_train, y_train, batches, tf.constant(first), tf.constant(count))
                hooks.on_train_batch_end(first + count - 1, self._results(self.train_metrics))
            if rest:
                tail = tf.constant(order[full * batch_size :][None])  # one partial batch
                self._run_tail(x_train, y_train, tail, tf.constant(0), tf.constant(1))
                hooks.on_train_batch_end(steps - 1, self._results(self.train_metrics))
            logs = self._results(self.train_metrics)
            if len(x_val):
                for start in range(0, len(x_val), EVAL_BATCH):
                    self._evaluate(x_val[start : start + EVAL_BATCH], y_val[start : start + EVAL_BATCH])
                logs.update({f"val_{k}": v for k, v in self._results(self.val_metrics).items()})
            self.epoch_seconds.append(time.perf_counter() - began)
            hooks.on_epoch_end(epoch, logs)
            if self.model.stop_training:
                break
        # model.fit's end, in its order: the optimizer's final values (use_ema: each weight becomes its
        # moving average), then on_train_end, where EarlyStopping restores its best epoch's weights
        with self.strategy.scope():
            self.optimizer.finalize_variable_values(self.model.trainable_variables)
        hooks.on_train_end(logs)
        return self.model.history.history

    @staticmethod
    def _results(metrics: list[keras.metrics.Metric]) -> dict[str, float]:
        return {m.name: float(m.result()) for m in metrics}
