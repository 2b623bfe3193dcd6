"""Losses, optimizers and schedules as this project wires them into Keras: each loss's label encoding,
output activation and metric names, every optimizer and schedule built from params, every argument
check against the installed Keras. No training: a step at most (what Keras then does with a step is
Keras' business; the pipeline tests train for real)."""

from __future__ import annotations

import inspect
import typing

import numpy as np
import pytest

from pipeline import arguments, losses, optimizers, params
from pipeline.errors import ParamError


def make(raw_train: dict, raw_model: dict | None = None) -> params.Params:
    return params.parse({"train": raw_train, "model": raw_model or {}})


def build_optimizer(p: params.Params):  # -> keras.optimizers.Optimizer (Keras: imported where a test needs it)
    return optimizers.build(p.train.optimizer, p.train.lr_schedule)


def one_step(p: params.Params, data: dict[str, np.ndarray]) -> tuple:
    """The model, loss and metrics as the train stage builds them for `p`, one step of its optimizer on 256
    real digits (eagerly: no tracing), then the model's outputs on the test digits. Returns the model,
    the loss on the step's batch before and after it, the outputs and the metrics' values on them."""
    import keras

    from stages import train as train_stage

    keras.utils.set_random_seed(p.train.seed)
    spec = losses.LOSSES[p.train.loss]
    wiring = losses.head(p.train.loss, p.model.output_activation, p.train.from_logits)
    model = train_stage.build_model(p.model, wiring)
    loss = losses.build(p.train.loss, p.train.loss_args, from_logits=wiring.from_logits)
    model.compile(optimizer=build_optimizer(p), loss=loss, run_eagerly=True)
    x, y = data["x_train"][:256], losses.encode_labels(data["y_train"][:256], spec)
    before = float(loss(y, model(x)))
    model.train_on_batch(x, y)
    after = float(loss(y, model(x)))
    outputs = model(data["x_test"]).numpy()  # logits or probabilities: the same argmax
    scores = {}
    for metric in losses.metrics(p.train.loss, from_logits=wiring.from_logits):
        metric.update_state(losses.encode_labels(data["y_test"], spec), outputs)
        scores[metric.name] = float(metric.result())
    return model, (before, after), outputs, scores


CASES = [(name, False) for name in losses.LOSSES] + [
    (name, True) for name, spec in losses.LOSSES.items() if spec.from_logits
]


@pytest.mark.parametrize(("loss", "from_logits"), CASES)
def test_every_loss_is_wired_to_its_labels_output_and_metrics(loss: str, from_logits: bool, small: dict) -> None:
    """The labels as the loss expects them (a step lowers it), the output its activation, and `accuracy`
    the top-1 accuracy whatever the loss (scikit-learn's of the same outputs); `binary_accuracy` only for
    one-vs-rest losses, under that name: the share of the ten yes/no answers right, at 0.5 (0 on logits)."""
    from sklearn.metrics import accuracy_score  # not at collection (docs/testing.md)

    p = make({"loss": loss, "from_logits": from_logits})
    model, (before, after), outputs, scores = one_step(p, small)
    assert np.isfinite(before) and after < before, (before, after)
    expected = "linear" if from_logits else losses.LOSSES[loss].default_activation
    assert model.layers[-1].activation.__name__ == expected
    assert scores["accuracy"] == pytest.approx(accuracy_score(small["y_test"], outputs.argmax(axis=1)), abs=1e-6)
    one_vs_rest = losses.LOSSES[loss].one_vs_rest
    assert sorted(scores) == (["accuracy", "binary_accuracy"] if one_vs_rest else ["accuracy"])
    if one_vs_rest:
        answers = outputs > (0.0 if from_logits else 0.5)
        assert scores["binary_accuracy"] == pytest.approx((answers == np.eye(10)[small["y_test"]]).mean(), abs=1e-6)


def test_keras_binary_crossentropy_is_the_tutorials_formula() -> None:
    import keras

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, (64, 10)).astype(np.float32)
    p = rng.uniform(0.01, 0.99, (64, 10)).astype(np.float32)
    formula = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
    keras_value = float(keras.losses.BinaryCrossentropy()(y, p))
    assert keras_value == pytest.approx(formula, rel=1e-5)
    logits = np.log(p / (1 - p))
    assert float(keras.losses.BinaryCrossentropy(from_logits=True)(y, logits)) == pytest.approx(formula, rel=1e-4)


def test_the_tutorials_example_crashes_in_plain_keras_3_and_runs_through_the_lab(small: dict) -> None:
    import keras

    model = keras.Sequential(
        [
            keras.Input((28, 28)),
            keras.layers.Flatten(),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(10, activation="sigmoid"),
        ]
    )
    model.compile(optimizer="adam", loss="binary_crossentropy", metrics=["accuracy"], run_eagerly=True)
    with pytest.raises(ValueError, match="must have the same rank"):
        model.fit(small["x_train"][:64], small["y_train"][:64], epochs=1, verbose=0)
    _, (before, after), _, _ = one_step(make({"loss": "binary_crossentropy"}), small)
    assert np.isfinite(after) and after < before


def test_the_optimizer_list_is_every_optimizer_keras_ships() -> None:
    import keras

    wrappers = {"optimizer", "lossscaleoptimizer", "multioptimizer"}
    shipped = {
        name.lower()
        for name, cls in vars(keras.optimizers).items()
        if inspect.isclass(cls) and issubclass(cls, keras.optimizers.Optimizer)
    }
    assert set(optimizers.OPTIMIZERS) == shipped - wrappers


@pytest.mark.parametrize("name", optimizers.OPTIMIZERS)
def test_every_optimizer_builds_with_its_params_and_takes_a_step(name: str) -> None:
    """The class and learning rate params name, and one finite step on a Dense kernel whose first rows
    see no input (MNIST's border pixels: a gradient of 0 there)."""
    import keras

    # Keras' Adafactor adds epsilon_1=1e-30 to squared gradients; where inputs are always 0 (MNIST's
    # border pixels) its factored second moment underflows to 0 on CPUs that flush denormals, and the
    # first step is 0/0 = NaN (the train stage then stops with "training diverged"). 1e-20 avoids it.
    extra = {"epsilon_1": 1e-20} if name == "adafactor" else {}
    p = make({"optimizer": {"name": name, "learning_rate": 0.01, **extra}})
    optimizer = build_optimizer(p)
    assert type(optimizer).__name__.lower() == name
    assert float(optimizer.learning_rate) == pytest.approx(0.01)
    kernel = keras.Variable(np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32))
    before = kernel.numpy()
    gradient = np.random.default_rng(1).normal(size=(8, 4)).astype(np.float32)
    gradient[:3] = 0.0
    optimizer.apply([keras.ops.convert_to_tensor(gradient)], [kernel])
    assert np.isfinite(kernel.numpy()).all() and not np.array_equal(kernel.numpy(), before)


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
    import keras

    p = make({"optimizer": {"name": "adam", "learning_rate": 0.01}, "lr_schedule": schedule})
    opt = optimizers.build(p.train.optimizer, p.train.lr_schedule)
    assert isinstance(opt._learning_rate, keras.optimizers.schedules.LearningRateSchedule)
    first = float(opt._learning_rate(0))
    assert first == pytest.approx(0.01)
    assert float(opt._learning_rate(500)) < first


@pytest.mark.parametrize(("optimizer", "own"), [("sgd", 0.01), ("adam", 0.001), ("rmsprop", 0.001)])
def test_a_schedule_without_a_learning_rate_starts_at_the_optimizers_own_default(optimizer: str, own: float) -> None:
    import keras

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


# (kind, class name) of every loss, optimizer and schedule the lab offers; the class is looked up in the test
KERAS_CLASSES = (
    [("loss", s.keras_class) for s in losses.LOSSES.values()]
    + [("optimizer", optimizers.class_name(name)) for name in optimizers.OPTIMIZERS]
    + [("schedule", name) for name in optimizers.LR_SCHEDULES.values()]
)


def keras_class(kind: str, name: str) -> type:
    import keras

    modules = {"loss": keras.losses, "optimizer": keras.optimizers, "schedule": keras.optimizers.schedules}
    return getattr(modules[kind], name)


@pytest.mark.parametrize(("kind", "name"), KERAS_CLASSES)
def test_signatures_read_from_the_keras_source_are_the_imported_classes_own(kind: str, name: str) -> None:
    """What check judges by (no Keras import) is exactly what Keras' constructors take."""
    cls = keras_class(kind, name)
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
    import keras

    assert callable(keras.activations.get(activation))


@pytest.mark.parametrize(("kind", "name"), KERAS_CLASSES)
def test_the_types_read_from_keras_docstrings_agree_with_the_defaults(kind: str, name: str) -> None:
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
