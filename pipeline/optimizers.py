"""The optimizers and learning-rate schedules: `train.optimizer` and `train.lr_schedule` -> Keras objects.

`build` is the whole way from params to Keras: the section's name is the Keras class (`adamw` ->
`keras.optimizers.AdamW`), every other key an argument of its constructor, checked against the
installed Keras' signature (`pipeline.arguments`, also what `check` runs, without Keras), then
passed to the class in `keras.optimizers` (`keras.optimizers.get` would do the same by name, but
its table lacks Lamb in Keras 3.15). A key that is not given takes Keras' own default: the
learning rate is the optimizer's own (Adam's 0.001, SGD's 0.01) unless params.yaml sets it, and a
schedule starts from the optimizer's rate. Raises ParamError naming the key.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from pipeline import arguments

if TYPE_CHECKING:  # pragma: no cover
    import keras

# Every optimizer class in `keras.optimizers`, less the base class and the wrappers that take
# other optimizers (LossScaleOptimizer, MultiOptimizer); tests/test_optimizers.py checks this.
OPTIMIZERS: tuple[str, ...] = (
    "adadelta",
    "adafactor",
    "adagrad",
    "adam",
    "adamax",
    "adamw",
    "ftrl",
    "lamb",
    "lion",
    "muon",
    "nadam",
    "rmsprop",
    "schedulefreeadamw",
    "sgd",
)

# `train.lr_schedule.name` -> class in keras.optimizers.schedules.
LR_SCHEDULES: dict[str, str] = {
    "exponential_decay": "ExponentialDecay",
    "cosine_decay": "CosineDecay",
    "cosine_decay_restarts": "CosineDecayRestarts",
    "inverse_time_decay": "InverseTimeDecay",
    "piecewise_constant": "PiecewiseConstantDecay",
    "polynomial_decay": "PolynomialDecay",
}

# Optimizer arguments Keras' optimizers cannot honour with several replicas (train.distribute mirrored or
# multi_worker), in model.fit as in this project's loop (base_optimizer.py, backend/tensorflow/optimizer.py):
# each replica clips its own share of the gradient before the replicas' shares are summed, and gradient
# accumulation and the EMA overwrite call merge_call inside a cond, which tf.distribute refuses mid-trace.
_PER_REPLICA_CLIP = (
    "Keras clips each replica's share of the gradient, not the batch's, so the update would depend on the "
    "number of replicas"
)
_MERGE_IN_COND = "Keras' optimizer fails under tf.distribute with it (merge_call inside a cond; model.fit too)"
ONE_REPLICA_ONLY: dict[str, str] = {
    "clipnorm": _PER_REPLICA_CLIP,
    "clipvalue": _PER_REPLICA_CLIP,
    "global_clipnorm": _PER_REPLICA_CLIP,
    "gradient_accumulation_steps": _MERGE_IN_COND,
    "ema_overwrite_frequency": _MERGE_IN_COND,
}


class Choice(Protocol):
    """A `{name: ..., other keys}` section of params.yaml (`params.Named`)."""

    name: str

    @property
    def kwargs(self) -> dict[str, Any]: ...


def class_name(optimizer: str) -> str:
    """The Keras class of an optimizer name (`adamw` -> `AdamW`), from the installed Keras' source."""
    return next(name for name in arguments.keras_classes("optimizer") if name.lower() == optimizer)


def kwargs(optimizer: Choice) -> dict[str, Any]:
    """`train.optimizer`'s arguments checked against the optimizer's constructor (no Keras import)."""
    return arguments.check(
        optimizer.kwargs,
        "optimizer",
        class_name(optimizer.name),
        {"name"},
        key="train.optimizer",
        what=f"optimizer '{optimizer.name}'",
    )


def schedule_kwargs(schedule: Choice, optimizer: Choice) -> dict[str, Any]:
    """`train.lr_schedule`'s arguments checked against the schedule's constructor (no Keras import);
    its initial learning rate is the optimizer's (params.yaml's, else the optimizer's own default)."""
    cls, config = LR_SCHEDULES[schedule.name], dict(schedule.kwargs)
    if "initial_learning_rate" in arguments.accepted("schedule", cls) and "initial_learning_rate" not in config:
        own = arguments.accepted("optimizer", class_name(optimizer.name))["learning_rate"]  # SGD's 0.01, ...
        config["initial_learning_rate"] = float(optimizer.kwargs.get("learning_rate", own))
    what = f"schedule '{schedule.name}'"
    return arguments.check(config, "schedule", cls, {"name"}, key="train.lr_schedule", what=what)


def build(optimizer: Choice, schedule: Choice) -> keras.optimizers.Optimizer:
    """The optimizer `train.optimizer` names, with its arguments and `train.lr_schedule` (name `none`: none)."""
    import keras

    config = kwargs(optimizer)
    if schedule.name != "none":
        config["learning_rate"] = arguments.construct(
            getattr(keras.optimizers.schedules, LR_SCHEDULES[schedule.name]),
            schedule_kwargs(schedule, optimizer),
            key="train.lr_schedule",
            what=f"schedule '{schedule.name}'",
        )
    what = f"optimizer '{optimizer.name}'"
    cls = getattr(keras.optimizers, class_name(optimizer.name))
    return arguments.construct(cls, config, key="train.optimizer", what=what)
