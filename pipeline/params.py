"""Typed schema of params.yaml (pydantic v2), validated whole before any stage does work.

params.yaml is read as DVC reads and writes it: YAML 1.2 with ruamel.yaml (`1e-3` is a number,
`yes`/`on` are strings, a duplicate key is an error), so whatever `dvc exp run -S` writes is read
back as the user meant it. Every key has a type, a default and, where it matters, a range,
declared once in the models below; pydantic checks them strictly (`true` is not a number, `2.5` not
an integer) and refuses unknown keys. `load()` returns frozen models or raises `ParamError` naming
the dotted key and what is allowed (`_first_error` turns pydantic's error into that one line, with
a "did you mean" for a misspelt key or choice). Rules that join several keys follow the types
(`_check_combinations`), and so does every keyword argument for a Keras constructor: checked
against its signature in the installed Keras' source (`pipeline.arguments`, no Keras import).
TensorFlow-free, so download and normalize import it too.
"""

from __future__ import annotations

import difflib
import math
import re
import typing
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from pipeline import losses, optimizers
from pipeline.errors import ParamError, StageError

PARAMS_FILE = Path("params.yaml")
SEED_LIMIT = 2**32  # numpy's and TensorFlow's seeds are unsigned 32-bit
Seed = Annotated[int, Field(ge=0, lt=SEED_LIMIT)]


def _keras_value(value: Any) -> Any:
    """A value passed on to a Keras constructor: a finite number, true/false, a string, null, or a list of them."""
    pending = [value]
    while pending:  # a loop, not recursion: any nesting depth is one clear error
        item = pending.pop()
        if isinstance(item, list):
            pending.extend(item)
        elif isinstance(item, float) and not math.isfinite(item):
            raise ValueError(f"must be a finite number, got {item}")
        elif item is not None and not isinstance(item, (bool, int, float, str)):
            raise ValueError(f"expected a number, true/false, a string or a list of them, got {item!r}")
    return value


KerasValue = Annotated[Any, AfterValidator(_keras_value)]


def _url(url: str | None) -> str | None:
    if url is None:
        return None
    if not re.match(r"^(https?|file)://", url):
        raise ValueError(f"{url!r} must start with http://, https:// or file://")
    if any(c.isspace() for c in url):
        raise ValueError(f"{url!r} contains a space; write it as %20")
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in 0-65535
    except ValueError as exc:
        raise ValueError(f"{url!r} is not a valid URL ({exc})") from None
    if parts.scheme != "file" and not parts.hostname:
        raise ValueError(f"{url!r} has no host name")
    return url


def _sha256(value: Any) -> str | dict[str, str] | None:
    sums = value.values() if isinstance(value, Mapping) else [value] if value is not None else []
    for item in sums:
        if not isinstance(item, str) or not re.fullmatch(r"[0-9a-f]{64}", item):
            raise ValueError(f"{item!r} is not a sha256 (64 lowercase hex digits), nor a mapping of file -> sha256")
    return {str(k): v for k, v in value.items()} if isinstance(value, Mapping) else value


class Section(BaseModel):
    """A section of params.yaml: strict types, no unknown keys, immutable."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


class Named(Section):
    """A `{name: ..., other keys}` section: `name` picks a Keras class, the other keys are its arguments."""

    model_config = ConfigDict(extra="allow")
    __pydantic_extra__: dict[str, KerasValue] = Field(init=False)
    name: str

    @model_validator(mode="before")
    @classmethod
    def _has_a_name(cls, value: Any) -> Any:
        if not isinstance(value, Mapping) or not isinstance(value.get("name"), str):
            raise ValueError(f"expected a mapping with a 'name', got {value!r}")
        return value

    @property
    def kwargs(self) -> dict[str, Any]:
        """The keyword arguments for the class `name` picks (every key but `name`)."""
        return {k: v for k, v in self.model_dump().items() if k != "name" and v is not None}


class OptimizerParams(Named):
    name: Literal[optimizers.OPTIMIZERS]
    learning_rate: Annotated[float, Field(gt=0)] | None = None  # not given: the optimizer's own default


class ScheduleParams(Named):
    name: Literal[("none", *optimizers.LR_SCHEDULES)]


class DataParams(Section):
    source: Literal["mnist_sample", "mnist", "fashion_mnist"] = "mnist_sample"
    url: Annotated[str | None, AfterValidator(_url)] = None  # a file URL, or a base URL for several files
    sha256: Annotated[Any, AfterValidator(_sha256)] = None  # a sum, or a mapping of file -> sum for several files
    test_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.2  # mnist_sample only: held-out share, stratified
    split_seed: Seed = 42
    timeout_s: Annotated[float, Field(gt=0, le=1e6)] = 600  # the whole download, retries included, in seconds


class NormalizeParams(Section):
    method: Literal["scale", "standardize"] = "scale"


class ModelParams(Section):
    hidden_units: list[Annotated[int, Field(ge=1, le=65536)]] = Field(default_factory=lambda: [128])
    activation: Literal[
        "relu", "elu", "selu", "gelu", "silu", "swish", "mish", "tanh", "sigmoid", "softplus", "leaky_relu", "linear"
    ] = "relu"
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    output_activation: Literal[("auto", *losses.OUTPUT_ACTIVATIONS)] = "auto"


class EarlyStoppingParams(Section):
    enabled: bool = False
    monitor: Literal["val_loss", "val_accuracy", "loss", "accuracy"] = "val_loss"
    patience: Annotated[int, Field(ge=0)] = 3
    min_delta: Annotated[float, Field(ge=0)] = 0.0
    restore_best_weights: bool = True


class SpeedParams(Section):
    """How fast, not what: the same math (the last float bits may differ with these)."""

    jit_compile: bool = True  # XLA-compile the training loop (with one replica)
    steps_per_execution: Annotated[int, Field(ge=1, le=1_000_000)] = 256  # steps per compiled call
    threads: Annotated[int, Field(ge=0, le=1024)] = 1  # TensorFlow threads per pool; 0 = all cores


class TrainParams(Section):
    loss: Literal[tuple(losses.LOSSES)] = "sparse_categorical_crossentropy"
    loss_args: dict[str, KerasValue] = Field(default_factory=dict)
    from_logits: bool = False
    optimizer: OptimizerParams = Field(default_factory=lambda: OptimizerParams(name="adam"))
    lr_schedule: ScheduleParams = Field(default_factory=lambda: ScheduleParams(name="none"))
    early_stopping: EarlyStoppingParams = Field(default_factory=EarlyStoppingParams)
    epochs: Annotated[int, Field(ge=1, le=100_000)] = 10
    batch_size: Annotated[int, Field(ge=1, le=1_000_000)] = 32
    validation_split: Annotated[float, Field(ge=0, lt=1)] = 0.1
    seed: Seed = 42
    speed: SpeedParams = Field(default_factory=SpeedParams)
    distribute: Literal["none", "mirrored", "multi_worker"] = "none"
    cluster_timeout_s: Annotated[float, Field(gt=0, le=1e6)] = 600  # multi_worker: its first step, at the latest
    mixed_precision: bool = False  # float16 (GPU) / bfloat16 (CPU) compute, float32 weights
    log_gradients: bool = False  # per epoch, each Dense kernel's gradient norm and update ratio (dvclive)


# `confusion_normalize` spellings of earlier versions: YAML reads `true` as a boolean, `null` as None.
_CONFUSION_ALIASES = {True: "actual", "true": "actual", "pred": "predicted", None: "none"}


def _confusion_alias(value: Any) -> Any:
    return _CONFUSION_ALIASES.get(value, value) if isinstance(value, (bool, str, type(None))) else value


class EvaluateParams(Section):
    batch_size: Annotated[int, Field(ge=1, le=1_000_000)] = 256
    # for the PNG only: counts, or shares of each actual class (rows), each predicted class, or all
    confusion_normalize: Annotated[
        Literal["none", "actual", "predicted", "all"], pydantic.BeforeValidator(_confusion_alias)
    ] = "none"


class Params(Section):
    data: DataParams = Field(default_factory=DataParams)
    normalize: NormalizeParams = Field(default_factory=NormalizeParams)
    model: ModelParams = Field(default_factory=ModelParams)
    train: TrainParams = Field(default_factory=TrainParams)
    evaluate: EvaluateParams = Field(default_factory=EvaluateParams)


SECTIONS = tuple(Params.model_fields)  # what dvc.yaml's `params:` lists


def load(path: str | Path = PARAMS_FILE) -> Params:
    """Read and validate params.yaml; raise ParamError on the first problem.

    A missing key takes its default; a missing section is refused (DVC, which tracks the
    stages' sections whole, would stop with "missing from params.yaml" after check).
    """
    try:
        raw = YAML(typ="safe", pure=True).load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ParamError("(file)", f"{path} not found; run from the project root") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ParamError("(file)", f"cannot read {path} ({exc})") from None
    except RecursionError:
        raise ParamError("(file)", f"{path} nests lists or mappings too deeply to read; no setting needs it") from None
    except YAMLError as exc:
        problem = " ".join(str(getattr(exc, "problem", "") or exc).split())
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ParamError("(file)", f"not valid YAML{where}: {problem}") from None
    raw = raw if raw is not None else {}
    empty = [name for name in SECTIONS if isinstance(raw, Mapping) and name in raw and raw[name] is None]
    if empty:  # `evaluate:` with nothing under it
        raise ParamError(empty[0], f"is empty; write `{empty[0]}: {{}}` to take all of its defaults")
    missing = [name for name in SECTIONS if isinstance(raw, Mapping) and name not in raw]
    if missing:
        sections = ", ".join(f"`{name}:`" for name in missing)
        raise ParamError(
            missing[0],
            f"section missing ({sections}); DVC tracks each stage's section of params.yaml whole, so every "
            f"section must be there: `{missing[0]}: {{}}` takes all of its defaults, and so does a missing key",
        )
    return parse(raw)


def parse(raw: Any) -> Params:
    """Validate a params mapping (as loaded from YAML) into `Params`; raise ParamError on the first problem."""
    if not isinstance(raw, Mapping):
        raise ParamError("params.yaml", f"expected a mapping of keys, got {raw!r}")
    try:
        p = Params.model_validate(raw)
    except pydantic.ValidationError as exc:
        raise _first_error(exc) from None
    _check_combinations(p)
    return p


_EXPECTED = {
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "string": "a string",
    "list": "a list",
    "dict": "a mapping",
    "model": "a mapping of keys",
}
_BOUNDS = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}


def _first_error(exc: pydantic.ValidationError) -> ParamError:
    """pydantic's first error as one ParamError: the dotted key, what is wrong and what is allowed."""
    error = exc.errors(include_url=False)[0]
    loc, kind, value, ctx = error["loc"], error["type"], error.get("input"), error.get("ctx") or {}
    key = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".")
    if kind == "extra_forbidden":
        known = list(_field_owner(loc).model_fields)
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return ParamError(key, f"unknown key{hint} (known: {', '.join(known)})")
    if kind == "literal_error":
        choices = [str(c) for c in typing.get_args(_field_owner(loc).model_fields[loc[-1]].annotation)]
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        shown = "null" if value is None else str(value).lower() if isinstance(value, bool) else repr(value)  # YAML's
        return ParamError(key, f"unknown {shown}{hint}; choose one of: {', '.join(choices)}")
    if kind in _BOUNDS:
        bound = next(iter(ctx.values()))
        bound = int(bound) if isinstance(bound, float) and bound.is_integer() else bound
        return ParamError(key, f"must be {_BOUNDS[kind]} {bound}, got {value}")
    if kind == "finite_number":
        return ParamError(key, f"must be a finite number, got {value}")
    if kind == "value_error":
        return ParamError(key, str(ctx.get("error", error["msg"])))
    expected = _EXPECTED.get(kind.split("_")[0])
    return ParamError(key, f"expected {expected}, got {value!r}" if expected else error["msg"])


def _field_owner(loc: tuple) -> type[BaseModel]:
    """The section model that holds the field at `loc` (a path of field names)."""
    owner: type[BaseModel] = Params
    for part in loc[:-1]:
        owner = typing.get_args(owner.model_fields[part].annotation) or owner.model_fields[part].annotation
    return owner


def check_unchanged(p: Params, *sections: str, path: str | Path = PARAMS_FILE) -> None:
    """Raise StageError if params.yaml's `sections` no longer hold what this run read from it.

    DVC records params.yaml as it finds it when a stage ends: an edit made while the stage ran
    would be recorded for outputs made with the old values. Call it before the outputs are moved
    into place.
    """
    try:
        now = load(path).model_dump()
    except ParamError:
        now = {}
    before = p.model_dump()
    changed = [name for name in sections if now.get(name) != before[name]]
    if changed:
        keys = [key for name in changed for key in _differing(before[name], now.get(name), name)][:3]
        raise StageError(
            f"params.yaml changed while this stage ran ({', '.join(keys)}); nothing was saved, since dvc.lock "
            "would record those values for outputs made with the old ones. Run it again"
        )


def _differing(a: Any, b: Any, key: str) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [k for name in a.keys() | b.keys() for k in _differing(a.get(name), b.get(name), f"{key}.{name}")]
    return [key] if a != b else []


# Arguments Keras accepts and then ignores unless another one is set: (section, class name or "*",
# argument) -> (does it take effect, given the section's arguments; what it needs). From the Keras
# sources: BinaryFocalCrossentropy applies `alpha` only with apply_class_balancing; SGD's Nesterov
# step is a momentum step; every optimizer's `ema_*` settings act only with use_ema.
NEEDS: dict[tuple[str, str, str], tuple[Any, str]] = {
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


def _check_combinations(p: Params) -> None:
    """Rules that join several keys, and every argument for a Keras constructor checked against its
    signature (`pipeline.arguments`): a ParamError names the key to change."""
    t, opt, es = p.train, p.train.optimizer.kwargs, p.train.early_stopping
    if t.lr_schedule.name == "none" and t.lr_schedule.kwargs:
        raise ParamError("train.lr_schedule", "has settings but name is 'none'; pick a schedule or drop them")
    losses.check_combination(t.loss, p.model.output_activation, t.from_logits)
    given = {"train.loss_args": (t.loss, t.loss_args), "train.optimizer": (t.optimizer.name, opt)}
    for (section, owner, argument), (takes_effect, needs) in NEEDS.items():
        name, kwargs = given[section]
        if owner in ("*", name) and argument in kwargs and not takes_effect(kwargs):
            raise ParamError(
                f"{section}.{argument}", f"has no effect for '{name}' without {needs}; add it, or drop this"
            )
    if opt.get("use_ema") is True and not opt.get("ema_overwrite_frequency") and es.enabled and es.restore_best_weights:
        raise ParamError(
            "train.optimizer.use_ema",
            "has no effect with train.early_stopping.restore_best_weights: true: as in model.fit, the moving "
            "averages replace the weights at the end, then EarlyStopping restores its best epoch's own weights "
            "over them; set restore_best_weights: false, or drop use_ema",
        )
    unsafe = next((name for name in optimizers.ONE_REPLICA_ONLY if name in opt), None)
    if unsafe and t.distribute != "none":
        raise ParamError(
            f"train.optimizer.{unsafe}",
            f"not with train.distribute: {t.distribute}: {optimizers.ONE_REPLICA_ONLY[unsafe]}; drop it, or train "
            "with distribute: none",
        )
    schedule_lr, optimizer_lr = t.lr_schedule.kwargs.get("initial_learning_rate"), opt.get("learning_rate")
    if None not in (schedule_lr, optimizer_lr) and schedule_lr != optimizer_lr:
        raise ParamError(
            "train.optimizer.learning_rate",
            f"{optimizer_lr} has no effect: train.lr_schedule.initial_learning_rate ({schedule_lr}) sets the "
            "learning rate; drop one of them (without initial_learning_rate the schedule starts from this one)",
        )
    if t.loss_args:
        losses.kwargs(t.loss, t.loss_args, from_logits=False)
    if set(opt) - {"learning_rate"}:
        optimizers.kwargs(t.optimizer)
    if t.lr_schedule.name != "none":
        optimizers.schedule_kwargs(t.lr_schedule, t.optimizer)
    if es.enabled and es.monitor.startswith("val_") and t.validation_split == 0:
        raise ParamError(
            "train.early_stopping.monitor",
            f"'{es.monitor}' needs validation data; set train.validation_split > 0 or monitor loss",
        )
