"""The loss / optimizer registry: the one place that knows how each choice must be wired.

For every loss it records the label encoding Keras expects (integer class ids or one-hot
rows), the output activations that make sense for it (the first is what `auto` picks), and
whether it can train on logits; `head` turns that into how the model ends (used by train,
serving, the card and the trial). Accuracy always means multi-class top-1 accuracy (argmax of
the outputs against the true class), whatever the loss; one-vs-rest losses additionally
report `binary_accuracy`, under that name, never as "accuracy".

Importing this module is cheap (numpy only), so `params` can take its names as the schema's
choices without TensorFlow. Every keyword a user passes a Keras constructor is checked against
that constructor's signature as the installed Keras' source declares it (`check_arguments`, read
with `ast`, no Keras import: stage `check` answers at once). The `make_*` functions import Keras
when called (train only) and let the constructor judge the values; `trial` takes one training
step with them first, which catches what only training reveals. Raises ParamError naming the key.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import inspect
import re
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from pipeline.errors import ParamError, StageError

if TYPE_CHECKING:  # pragma: no cover
    import keras

    from pipeline.params import TrainParams

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

# Every optimizer class in `keras.optimizers`, less the base class and the wrappers that take
# other optimizers (LossScaleOptimizer, MultiOptimizer); tests/test_registry.py checks this.
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

HIDDEN_ACTIVATIONS: tuple[str, ...] = (
    "relu",
    "elu",
    "selu",
    "gelu",
    "silu",
    "swish",
    "mish",
    "tanh",
    "sigmoid",
    "softplus",
    "leaky_relu",
    "linear",
)
OUTPUT_ACTIVATIONS: tuple[str, ...] = ("softmax", "sigmoid", "linear", "tanh")

# Keyword arguments a user may not pass through `train.loss_args`: set elsewhere or meaningless.
_RESERVED_LOSS_ARGS = {"from_logits": "train.from_logits", "name": None, "dtype": None, "reduction": None}


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
    """Integer class ids as the loss expects them: int32 ids, or float32 one-hot rows."""
    y = np.asarray(y)
    if spec.labels == "sparse":
        return y.astype(np.int32)
    return np.eye(NUM_CLASSES, dtype=np.float32)[y]


REQUIRED = object()  # a constructor parameter without a default value
_SOURCES = {"loss": "losses", "optimizer": "optimizers", "schedule": "optimizers/schedules"}


def _source_folder(kind: str) -> Path:
    """The installed Keras' source folder of a kind of class, found without importing Keras."""
    spec = importlib.util.find_spec("keras")
    if spec is None or not spec.submodule_search_locations:
        raise ParamError("train", "Keras is not installed in this environment; run `make setup`")
    return Path(next(iter(spec.submodule_search_locations))) / "src" / _SOURCES[kind]


@functools.cache
def _keras_classes(kind: str) -> dict[str, ast.ClassDef]:
    """Every class the installed Keras defines in `keras/src/<folder>/*.py` (tests aside), by name.

    Read from the source with `ast`, not imported: importing Keras starts TensorFlow (seconds,
    700 MB), and `check` must answer at once. The installed version's own source, so the
    signatures are always those of the Keras that trains (tests/test_registry.py compares them
    with `inspect.signature` of the imported classes).
    """
    classes = {}
    for path in sorted(_source_folder(kind).glob("*.py")):
        if not path.name.endswith("_test.py"):
            classes.update((n.name, n) for n in ast.parse(path.read_bytes()).body if isinstance(n, ast.ClassDef))
    return classes


def _literal(node: ast.expr | None) -> Any:
    if node is None:
        return REQUIRED
    try:
        return ast.literal_eval(node)
    except ValueError:  # an expression, not a constant: no type to compare with
        return None


def _accepted(kind: str, class_name: str, exclude: set[str]) -> dict[str, Any]:
    """Keyword parameters of the Keras class's `__init__` -> default (`REQUIRED` for none), from its source.

    Without self, *args, **kwargs and `exclude`; a class without its own `__init__` takes its
    base's. Raises KeyError for a class the installed Keras does not define there.
    """
    classes = _keras_classes(kind)
    node = classes[class_name]
    while not (init := next((f for f in node.body if isinstance(f, ast.FunctionDef) and f.name == "__init__"), None)):
        node = classes[next(b.id if isinstance(b, ast.Name) else b.attr for b in node.bases)]
    args = init.args
    positional = args.posonlyargs + args.args
    defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
    pairs = [*zip(positional, defaults, strict=True), *zip(args.kwonlyargs, args.kw_defaults, strict=True)]
    return {arg.arg: _literal(default) for arg, default in pairs[1:] if arg.arg not in exclude}


# How Keras' docstrings begin an argument's description -> the Python type it takes (first match wins).
_DOCUMENTED = (
    ("list", "list"),
    ("bool", "bool"),
    ("str", "str"),
    ("float", "number"),
    ("int", "number"),
    ("number", "number"),
)


@functools.cache
def _documented_types(kind: str, class_name: str) -> dict[str, str]:
    """Argument -> type, from the class's docstring ("clipnorm: Float. If set, ...", "decay_steps: A
    Python integer."), for the arguments whose default (None, or none) shows no type. An optimizer
    also documents the base class's arguments (`base_optimizer_keyword_args`, one text for all)."""
    texts = [ast.get_docstring(_keras_classes(kind)[class_name]) or ""]
    if kind == "optimizer":
        base = ast.parse((_source_folder(kind) / "base_optimizer.py").read_bytes())
        texts += [
            n.value.value
            for n in base.body
            if isinstance(n, ast.Assign)
            and any(getattr(t, "id", "") == "base_optimizer_keyword_args" for t in n.targets)
        ]
    types = {}
    for name, description in re.findall(r"^\s*(\w+): (?:An? )?(?:Python )?(\w+)", "\n".join(texts), re.M):
        found = next((t for word, t in _DOCUMENTED if description.lower().startswith(word)), None)
        if found:
            types.setdefault(name, found)
    return types


_EXPECTED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "number": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "list": (lambda v: isinstance(v, list), "a list"),
}


def _check_kwargs(
    kwargs: Mapping[str, Any], kind: str, class_name: str, exclude: set[str], *, key: str, what: str
) -> dict[str, Any]:
    """Unknown keys, missing required ones, and values of another type than the constructor's default
    (bool, number, str) or, where the default shows none (None, or no default), than its docstring says.

    Returns the arguments with an integer made a float where the default is a float: YAML's `1`
    (what `dvc exp run -S learning_rate=1` writes) is a number, and Keras wants a float there.
    """
    accepted, documented = _accepted(kind, class_name, exclude), _documented_types(kind, class_name)
    names = ", ".join(sorted(accepted))
    checked = {}
    for name, value in kwargs.items():
        if name not in accepted:
            raise ParamError(f"{key}.{name}", f"not a parameter of {what}; accepted: {names}")
        default = accepted[name]
        if isinstance(default, bool):
            kind = "bool"
        elif isinstance(default, (int, float)):
            kind = "number"
        elif isinstance(default, str):
            kind = "str"
        else:  # None or none: what Keras' docstring says it takes (else Keras checks it while training)
            kind = documented.get(name, "")
        if kind and not _EXPECTED[kind][0](value):
            raise ParamError(f"{key}.{name}", f"expected {_EXPECTED[kind][1]}, got {value!r}")
        checked[name] = float(value) if isinstance(default, float) and isinstance(value, int) else value
    missing = [name for name, default in accepted.items() if default is REQUIRED and name not in checked]
    if missing:
        raise ParamError(f"{key}.{missing[0]}", f"required by {what}; add it (it has no default)")
    return checked


# Arguments Keras accepts and then ignores unless another one is set: (section, class name or "*",
# argument) -> (does it take effect, given the section's arguments; what it needs). From the Keras
# sources: BinaryFocalCrossentropy applies `alpha` only with apply_class_balancing; SGD's Nesterov
# step is a momentum step; every optimizer's `ema_*` settings act only with use_ema.
NEEDS: dict[tuple[str, str, str], tuple[Callable[[Mapping[str, Any]], bool], str]] = {
    ("train.loss_args", "binary_focal_crossentropy", "alpha"): (
        lambda kw: kw.get("apply_class_balancing") is True,
        "apply_class_balancing: true",
    ),
    ("train.optimizer", "sgd", "nesterov"): (
        lambda kw: kw["nesterov"] is not True or (isinstance(kw.get("momentum"), (int, float)) and kw["momentum"] > 0),
        "momentum > 0",
    ),
    ("train.optimizer", "*", "ema_momentum"): (lambda kw: kw.get("use_ema") is True, "use_ema: true"),
    ("train.optimizer", "*", "ema_overwrite_frequency"): (lambda kw: kw.get("use_ema") is True, "use_ema: true"),
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


def check_effect(train: TrainParams) -> None:
    """Raise ParamError for an argument that would be accepted and then have no effect (NEEDS, and
    use_ema under EarlyStopping's restore) or would not do with several replicas what it does with one
    (ONE_REPLICA_ONLY)."""
    given = {
        "train.loss_args": (train.loss, train.loss_args),
        "train.optimizer": (train.optimizer.name, train.optimizer.kwargs),
    }
    for (section, owner, argument), (takes_effect, needs) in NEEDS.items():
        name, kwargs = given[section]
        if owner in ("*", name) and argument in kwargs and not takes_effect(kwargs):
            message = f"has no effect for '{name}' without {needs}; add it, or drop this"
            raise ParamError(f"{section}.{argument}", message)
    opt, es = train.optimizer.kwargs, train.early_stopping
    if opt.get("use_ema") is True and not opt.get("ema_overwrite_frequency") and es.enabled and es.restore_best_weights:
        raise ParamError(
            "train.optimizer.use_ema",
            "has no effect with train.early_stopping.restore_best_weights: true: as in model.fit, the moving "
            "averages replace the weights at the end, then EarlyStopping restores its best epoch's own weights "
            "over them; set restore_best_weights: false, or drop use_ema",
        )
    unsafe = next((name for name in ONE_REPLICA_ONLY if name in opt), None)
    if unsafe and train.distribute != "none":
        raise ParamError(
            f"train.optimizer.{unsafe}",
            f"not with train.distribute: {train.distribute}: {ONE_REPLICA_ONLY[unsafe]}; drop it, or train "
            "with distribute: none",
        )
    schedule_lr = train.lr_schedule.kwargs.get("initial_learning_rate")
    optimizer_lr = train.optimizer.kwargs.get("learning_rate")
    if None not in (schedule_lr, optimizer_lr) and schedule_lr != optimizer_lr:
        raise ParamError(
            "train.optimizer.learning_rate",
            f"{optimizer_lr} has no effect: train.lr_schedule.initial_learning_rate ({schedule_lr}) sets the "
            "learning rate; drop one of them (without initial_learning_rate the schedule starts from this one)",
        )


def _construct(cls: type, kwargs: Mapping[str, Any], key: str, what: str) -> Any:
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ParamError(key, f"{what} rejected these settings: {exc}") from exc


def loss_kwargs(train: TrainParams, *, from_logits: bool) -> dict[str, Any]:
    """`train.loss_args` checked against the loss's constructor (no Keras import), with `from_logits`."""
    spec = LOSSES[train.loss]
    for name in train.loss_args:
        if name in _RESERVED_LOSS_ARGS:
            where = _RESERVED_LOSS_ARGS[name]
            raise ParamError(f"train.loss_args.{name}", f"set {where} instead" if where else "cannot be set here")
    exclude, what = set(_RESERVED_LOSS_ARGS), f"loss '{train.loss}'"
    kwargs = _check_kwargs(train.loss_args, "loss", spec.keras_class, exclude, key="train.loss_args", what=what)
    return {**kwargs, "from_logits": from_logits} if spec.from_logits else kwargs


def optimizer_kwargs(train: TrainParams) -> dict[str, Any]:
    """`train.optimizer`'s arguments checked against the optimizer's constructor (no Keras import)."""
    opt = train.optimizer
    class_name = next(name for name in _keras_classes("optimizer") if name.lower() == opt.name)
    what = f"optimizer '{opt.name}'"
    return _check_kwargs(opt.kwargs, "optimizer", class_name, {"name"}, key="train.optimizer", what=what)


def schedule_kwargs(train: TrainParams) -> dict[str, Any]:
    """`train.lr_schedule`'s arguments checked against the schedule's constructor (no Keras import);
    its initial learning rate is the optimizer's when not given."""
    sched = train.lr_schedule
    class_name, kwargs = LR_SCHEDULES[sched.name], dict(sched.kwargs)
    if "initial_learning_rate" in _accepted("schedule", class_name, set()) and "initial_learning_rate" not in kwargs:
        optimizer = next(name for name in _keras_classes("optimizer") if name.lower() == train.optimizer.name)
        own = _accepted("optimizer", optimizer, set())["learning_rate"]  # SGD's 0.01, Adam's 0.001, ...
        kwargs["initial_learning_rate"] = float(train.optimizer.kwargs.get("learning_rate", own))
    what = f"schedule '{sched.name}'"
    return _check_kwargs(kwargs, "schedule", class_name, {"name"}, key="train.lr_schedule", what=what)


def check_arguments(train: TrainParams) -> None:
    """Every argument params.yaml passes a Keras constructor, judged by that constructor's signature as the
    installed Keras' source declares it: unknown names, missing required ones, wrong types. Raises ParamError.

    Keras is not imported (stage `check` answers at once). What only Keras' first step can judge
    (a value of the right type that it refuses) is `trial`'s, in `train`.
    """
    if train.loss_args:
        loss_kwargs(train, from_logits=False)
    if set(train.optimizer.kwargs) - {"learning_rate"}:
        optimizer_kwargs(train)
    if train.lr_schedule.name != "none":
        schedule_kwargs(train)


def make_loss(train: TrainParams, *, from_logits: bool) -> keras.losses.Loss:
    """The Keras loss for `train.loss` and `train.loss_args`, on logits or not (`Head.from_logits`).

    Raises ParamError for an argument the loss does not take or refuses.
    """
    import keras

    cls = getattr(keras.losses, LOSSES[train.loss].keras_class)
    return _construct(cls, loss_kwargs(train, from_logits=from_logits), "train.loss_args", f"loss '{train.loss}'")


def make_metrics(train: TrainParams, *, from_logits: bool) -> list[keras.metrics.Metric]:
    """Top-1 `accuracy` for every loss, plus `binary_accuracy` for one-vs-rest losses (threshold 0 on logits)."""
    import keras

    spec = LOSSES[train.loss]
    if spec.labels == "sparse":
        metrics = [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]
    else:
        metrics = [keras.metrics.CategoricalAccuracy(name="accuracy")]
    if spec.one_vs_rest:  # logits above 0 <=> probabilities above 0.5
        metrics.append(keras.metrics.BinaryAccuracy(name="binary_accuracy", threshold=0.0 if from_logits else 0.5))
    return metrics


def optimizer_classes(keras: types.ModuleType) -> dict[str, type]:
    """Every optimizer class in `keras.optimizers`, by lower-case name (`adamw` -> AdamW)."""
    return {
        name.lower(): cls
        for name, cls in vars(keras.optimizers).items()
        if inspect.isclass(cls) and issubclass(cls, keras.optimizers.Optimizer) and name.lower() in OPTIMIZERS
    }


def make_optimizer(train: TrainParams) -> keras.optimizers.Optimizer:
    """The optimizer `train.optimizer` names, with its keyword arguments and learning-rate schedule."""
    import keras

    opt = train.optimizer
    kwargs = optimizer_kwargs(train)
    if train.lr_schedule.name != "none":
        kwargs["learning_rate"] = make_schedule(train)
    return _construct(optimizer_classes(keras)[opt.name], kwargs, "train.optimizer", f"optimizer '{opt.name}'")


def make_schedule(train: TrainParams) -> keras.optimizers.schedules.LearningRateSchedule:
    """The `train.lr_schedule` object; its initial learning rate is the optimizer's."""
    import keras

    sched = train.lr_schedule
    cls = getattr(keras.optimizers.schedules, LR_SCHEDULES[sched.name])
    return _construct(cls, schedule_kwargs(train), "train.lr_schedule", f"schedule '{sched.name}'")


def keras_arguments(train: TrainParams) -> list[str]:
    """The sections through which `train` passes Keras more than the names and learning rate
    params.py checks itself (empty: nothing for `trial` to do)."""
    used = {
        "train.optimizer": set(train.optimizer.kwargs) - {"learning_rate"},
        "train.loss_args": train.loss_args,
        "train.lr_schedule": train.lr_schedule.name != "none",
    }
    return [key for key, value in used.items() if value]


def trial(train: TrainParams) -> None:
    """Build the loss, optimizer and schedule and take one training step on a toy model (in `train`,
    before the real model is built).

    Catches what a signature check cannot: a value of the right type that Keras refuses only
    once it trains (a list where a number belongs, a schedule argument out of range, ...).
    Raises StageError naming the keys: under DVC, train's outputs are gone by then, and the
    runner's line says how to restore them.
    """
    import keras

    wiring = head(train.loss, from_logits=train.from_logits)
    keys = ", ".join(keras_arguments(train)) or "train"
    try:
        optimizer = make_optimizer(train)
        loss = make_loss(train, from_logits=wiring.from_logits)
        metrics = make_metrics(train, from_logits=wiring.from_logits)
        # named, so that it takes none of the automatic names ("dense", "sequential") the real model gets
        dense = keras.layers.Dense(NUM_CLASSES, activation=wiring.activation, name="trial_dense")
        model = keras.Sequential([keras.Input((4,)), dense], name="trial")
        model.compile(optimizer=optimizer, loss=loss, metrics=metrics)
        model.train_on_batch(np.zeros((2, 4), np.float32), encode_labels(np.array([0, 1]), LOSSES[train.loss]))
    except ParamError as exc:
        raise StageError(str(exc)) from None
    except Exception as exc:  # Keras' own complaint, whatever its type
        message = " ".join(str(exc).split())[:300]
        raise StageError(f"params.yaml: {keys}: Keras refused these settings in a one-step trial: {message}") from None
