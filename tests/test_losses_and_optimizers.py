"""Losses, optimizers and schedules against real Keras: every loss trains, every optimizer builds, every
argument check agrees with the installed Keras."""

from __future__ import annotations

import inspect
import typing

import keras
import numpy as np
import pytest
from sklearn.metrics import accuracy_score

from pipeline import arguments, losses, optimizers, params
from pipeline.errors import ParamError
from stages import train as train_stage


def make(raw_train: dict, raw_model: dict | None = None) -> params.Params:
    return params.parse({"train": raw_train, "model": raw_model or {}})


def build_optimizer(p: params.Params) -> keras.optimizers.Optimizer:
    return optimizers.build(p.train.optimizer, p.train.lr_schedule)


def fit_one_epoch(p: params.Params, data: dict[str, np.ndarray]) -> tuple[keras.Model, dict[str, float], np.ndarray]:
    """Train one epoch as the train stage does; return the model, Keras' test scores, predicted classes."""
    keras.utils.set_random_seed(p.train.seed)
    spec = losses.LOSSES[p.train.loss]
    wiring = losses.head(p.train.loss, p.model.output_activation, p.train.from_logits)
    model = train_stage.build_model(p.model, wiring)
    model.compile(
        optimizer=optimizers.build(p.train.optimizer, p.train.lr_schedule),
        loss=losses.build(p.train.loss, p.train.loss_args, from_logits=wiring.from_logits),
        metrics=losses.metrics(p.train.loss, from_logits=wiring.from_logits),
    )
    model.fit(data["x_train"], losses.encode_labels(data["y_train"], spec), epochs=1, batch_size=32, verbose=0)
    scores = model.evaluate(data["x_test"], losses.encode_labels(data["y_test"], spec), verbose=0, return_dict=True)
    outputs = model.predict(data["x_test"], verbose=0)  # logits or probabilities: the same argmax
    return model, scores, outputs.argmax(axis=1)


CASES = [(name, False) for name in losses.LOSSES] + [
    (name, True) for name, spec in losses.LOSSES.items() if spec.from_logits
]


@pytest.mark.slow
@pytest.mark.parametrize(("loss", "from_logits"), CASES)
def test_every_loss_trains_and_keras_accuracy_is_top1_accuracy(loss: str, from_logits: bool, small: dict) -> None:
    p = make({"loss": loss, "from_logits": from_logits})
    model, scores, predicted = fit_one_epoch(p, small)
    assert np.isfinite(scores["loss"])
    sklearn_accuracy = accuracy_score(small["y_test"], predicted)
    assert scores["accuracy"] == pytest.approx(sklearn_accuracy, abs=1e-6)
    assert sklearn_accuracy > 0.2  # one epoch on 1,000 real digits learns something (chance is 0.1)
    expected = "linear" if from_logits else losses.LOSSES[loss].default_activation
    assert model.layers[-1].activation.__name__ == expected


def test_one_vs_rest_losses_report_binary_accuracy_under_its_own_name(small: dict) -> None:
    p = make({"loss": "binary_crossentropy"})
    _, scores, predicted = fit_one_epoch(p, small)
    # binary accuracy counts 10 yes/no answers per image, 9 of them "no": it flatters the model
    assert scores["binary_accuracy"] > scores["accuracy"]
    assert scores["accuracy"] == pytest.approx(accuracy_score(small["y_test"], predicted), abs=1e-6)


def test_keras_binary_crossentropy_is_the_tutorials_formula() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, (64, 10)).astype(np.float32)
    p = rng.uniform(0.01, 0.99, (64, 10)).astype(np.float32)
    formula = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
    keras_value = float(keras.losses.BinaryCrossentropy()(y, p))
    assert keras_value == pytest.approx(formula, rel=1e-5)
    logits = np.log(p / (1 - p))
    assert float(keras.losses.BinaryCrossentropy(from_logits=True)(y, logits)) == pytest.approx(formula, rel=1e-4)


def test_the_tutorials_example_crashes_in_plain_keras_3_and_runs_through_the_lab(small: dict) -> None:
    model = keras.Sequential(
        [
            keras.Input((28, 28)),
            keras.layers.Flatten(),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(10, activation="sigmoid"),
        ]
    )
    model.compile(optimizer="adam", loss="binary_crossentropy", metrics=["accuracy"])
    with pytest.raises(ValueError, match="must have the same rank"):
        model.fit(small["x_train"][:64], small["y_train"][:64], epochs=1, verbose=0)
    _, scores, _ = fit_one_epoch(make({"loss": "binary_crossentropy"}), small)
    assert np.isfinite(scores["loss"])


def test_the_optimizer_list_is_every_optimizer_keras_ships() -> None:
    wrappers = {"optimizer", "lossscaleoptimizer", "multioptimizer"}
    shipped = {
        name.lower()
        for name, cls in vars(keras.optimizers).items()
        if inspect.isclass(cls) and issubclass(cls, keras.optimizers.Optimizer)
    }
    assert set(optimizers.OPTIMIZERS) == shipped - wrappers


@pytest.mark.slow
@pytest.mark.parametrize("name", optimizers.OPTIMIZERS)
def test_every_optimizer_builds_with_its_params_and_takes_a_step(name: str, small: dict) -> None:
    # Keras' Adafactor adds epsilon_1=1e-30 to squared gradients; where inputs are always 0 (MNIST's
    # border pixels) its factored second moment underflows to 0 on CPUs that flush denormals, and the
    # first step is 0/0 = NaN (the train stage then stops with "training diverged"). 1e-20 avoids it.
    extra = {"epsilon_1": 1e-20} if name == "adafactor" else {}
    p = make({"optimizer": {"name": name, "learning_rate": 0.01, **extra}})
    optimizer = optimizers.build(p.train.optimizer, p.train.lr_schedule)
    assert type(optimizer).__name__.lower() == name
    assert float(optimizer.learning_rate) == pytest.approx(0.01)
    data = {k: v[:64] for k, v in small.items()}
    _, scores, _ = fit_one_epoch(p, data)
    assert np.isfinite(scores["loss"])


def test_optimizer_arguments_reach_the_constructor() -> None:
    sgd = {"name": "sgd", "learning_rate": 0.05, "momentum": 0.9, "nesterov": True, "clipnorm": 1.0}
    opt = build_optimizer(make({"optimizer": sgd}))
    assert (opt.momentum, opt.nesterov, opt.clipnorm) == (0.9, True, 1.0)


@pytest.mark.parametrize(
    ("optimizer", "key", "fragment"),
    [
        ({"name": "adam", "momentum": 0.9}, "train.optimizer.momentum", "accepted: amsgrad, beta_1, beta_2"),
        ({"name": "sgd", "nesterov": "yes"}, "train.optimizer.nesterov", "expected true or false"),
        ({"name": "sgd", "momentum": "high"}, "train.optimizer.momentum", "expected a number"),
        ({"name": "sgd", "momentum": 2.0}, "train.optimizer", "optimizer 'sgd' rejected these settings"),
    ],
)
def test_bad_optimizer_arguments_name_the_key_and_the_accepted_ones(optimizer: dict, key: str, fragment: str) -> None:
    with pytest.raises(ParamError) as info:
        build_optimizer(make({"optimizer": optimizer}))
    assert info.value.key == key and fragment in str(info.value), str(info.value)


@pytest.mark.parametrize(
    "schedule",
    [
        {"name": "exponential_decay", "decay_steps": 100, "decay_rate": 0.9},
        {"name": "cosine_decay", "decay_steps": 1000},
        {"name": "cosine_decay_restarts", "first_decay_steps": 100},
        {"name": "inverse_time_decay", "decay_steps": 100, "decay_rate": 0.5},
        {"name": "piecewise_constant", "boundaries": [100, 200], "values": [0.01, 0.005, 0.001]},
        {"name": "polynomial_decay", "decay_steps": 1000},
    ],
)
def test_every_learning_rate_schedule_builds_from_params(schedule: dict) -> None:
    p = make({"optimizer": {"name": "adam", "learning_rate": 0.01}, "lr_schedule": schedule})
    opt = optimizers.build(p.train.optimizer, p.train.lr_schedule)
    assert isinstance(opt._learning_rate, keras.optimizers.schedules.LearningRateSchedule)
    first = float(opt._learning_rate(0))
    assert first == pytest.approx(0.01)
    assert float(opt._learning_rate(500)) < first


@pytest.mark.parametrize(("optimizer", "own"), [("sgd", 0.01), ("adam", 0.001), ("rmsprop", 0.001)])
def test_a_schedule_without_a_learning_rate_starts_at_the_optimizers_own_default(optimizer: str, own: float) -> None:
    schedule = {"name": "exponential_decay", "decay_steps": 100, "decay_rate": 0.9}
    opt = build_optimizer(make({"optimizer": {"name": optimizer}, "lr_schedule": schedule}))
    assert float(opt._learning_rate(0)) == pytest.approx(own)  # SGD's 0.01, not a shared 0.001
    assert own == pytest.approx(keras.optimizers.get(optimizer).get_config()["learning_rate"])


def test_bad_schedule_arguments_are_clear() -> None:
    with pytest.raises(ParamError, match="train.lr_schedule.decay_step: not a parameter of schedule 'cosine_decay'"):
        build_optimizer(make({"lr_schedule": {"name": "cosine_decay", "decay_step": 10}}))
    with pytest.raises(ParamError, match="train.lr_schedule.decay_steps: required by schedule 'exponential_decay'"):
        make({"lr_schedule": {"name": "exponential_decay"}})  # refused by params (check), without Keras
    with pytest.raises(ParamError, match="schedule 'exponential_decay' rejected these settings"):  # by Keras
        build_optimizer(make({"lr_schedule": {"name": "exponential_decay", "decay_steps": 0, "decay_rate": 1}}))


def keras_classes() -> list[tuple[str, str, type]]:
    """(kind, class name, class) for every loss, optimizer and schedule the lab offers."""
    return (
        [("loss", s.keras_class, getattr(keras.losses, s.keras_class)) for s in losses.LOSSES.values()]
        + [("optimizer", c, getattr(keras.optimizers, c)) for c in map(optimizers.class_name, optimizers.OPTIMIZERS)]
        + [("schedule", n, getattr(keras.optimizers.schedules, n)) for n in optimizers.LR_SCHEDULES.values()]
    )


@pytest.mark.parametrize(("kind", "name", "cls"), keras_classes(), ids=lambda v: v if isinstance(v, str) else "")
def test_signatures_read_from_the_keras_source_are_the_imported_classes_own(kind: str, name: str, cls: type) -> None:
    """What check judges by (no Keras import) is exactly what Keras' constructors take."""
    imported = {
        p.name: arguments.REQUIRED if p.default is p.empty else p.default
        for p in list(inspect.signature(cls.__init__).parameters.values())[1:]
        if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
    }
    assert arguments.accepted(kind, name, set()) == imported


def test_loss_arguments_are_checked_against_the_loss() -> None:
    loss = losses.build("categorical_crossentropy", {"label_smoothing": 0.1}, from_logits=False)
    assert loss.label_smoothing == 0.1
    with pytest.raises(ParamError, match="train.loss_args.label_smoothing: not a parameter of loss 'kl_divergence'"):
        kl = make({"loss": "kl_divergence", "loss_args": {"label_smoothing": 0.1}})
        losses.build(kl.train.loss, kl.train.loss_args, from_logits=False)
    with pytest.raises(ParamError, match="train.loss_args.from_logits: set train.from_logits instead"):
        losses.build("sparse_categorical_crossentropy", {"from_logits": True}, from_logits=False)


HIDDEN_ACTIVATIONS = typing.get_args(params.ModelParams.model_fields["activation"].annotation)


@pytest.mark.parametrize("activation", HIDDEN_ACTIVATIONS + losses.OUTPUT_ACTIVATIONS)
def test_every_allowed_activation_exists_in_keras(activation: str) -> None:
    assert callable(keras.activations.get(activation))


@pytest.mark.parametrize(("kind", "name", "cls"), keras_classes(), ids=lambda v: v if isinstance(v, str) else "")
def test_the_types_read_from_keras_docstrings_agree_with_the_defaults(kind: str, name: str, cls: type) -> None:
    """check takes a type from Keras' docstring where the default (None) shows none; where both exist,
    they must agree, or the reading is wrong."""
    documented = arguments.documented_types(kind, name)
    python_types = {"bool": (bool,), "str": (str,), "number": (int, float), "list": (list, tuple)}
    for argument, default in arguments.accepted(kind, name, set()).items():
        if argument in documented and default not in (None, arguments.REQUIRED):
            assert isinstance(default, python_types[documented[argument]]), (argument, default, documented[argument])
            assert isinstance(default, bool) == (documented[argument] == "bool"), (argument, default)
    if kind == "optimizer":  # the base class's arguments, documented once for every optimizer
        assert {documented[a] for a in ("clipnorm", "weight_decay", "gradient_accumulation_steps")} == {"number"}


def test_a_wrong_type_where_keras_defaults_to_none_is_refused_by_params() -> None:
    for optimizer, key in [
        ({"name": "adam", "clipnorm": "abc"}, "clipnorm"),
        ({"name": "muon", "exclude_layers": "x"}, "exclude_layers"),
    ]:
        with pytest.raises(ParamError, match=f"train.optimizer.{key}: expected a"):
            make({"optimizer": optimizer})
    make({"optimizer": {"name": "adam", "clipnorm": 1}})  # an integer is a number


@pytest.mark.parametrize("argument", optimizers.ONE_REPLICA_ONLY)
def test_an_optimizer_argument_keras_cannot_honour_on_several_replicas_is_refused_with_them(argument: str) -> None:
    """Keras' optimizer clips each replica's share of the gradient (the update would depend on the replica
    count) and fails under tf.distribute with accumulation or EMA overwrites: one line naming the key."""
    optimizer = {"name": "adam", argument: 2, **({"use_ema": True} if argument.startswith("ema_") else {})}
    for distribute in ("mirrored", "multi_worker"):
        with pytest.raises(ParamError, match=f"train.optimizer.{argument}: not with train.distribute: {distribute}: "):
            make({"optimizer": optimizer, "distribute": distribute})
    make({"optimizer": optimizer})  # one replica: model.fit's own math, which the loop matches
