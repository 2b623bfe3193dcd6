"""Typed schema of params.yaml, validated whole before any stage does work.

params.yaml is read as DVC reads and writes it: YAML 1.2 with ruamel.yaml (`1e-3` is a
number, `yes`/`on` are strings, a duplicate key is an error), so whatever `dvc exp run -S`
writes is read back as the user meant it. Every key has a type, a default and, where it
matters, a range. `load()` returns frozen
dataclasses or raises `ParamError` naming the dotted key: unknown keys (with a "did you mean"),
wrong types, out-of-range values, unknown loss / optimizer / schedule names (listing the valid
ones) and combinations that cannot work. TensorFlow-free, so download and normalize can
import it too. The optimizer's and loss's own keyword arguments are checked against the real
Keras constructors by `stages.lib.registry` when train builds them, before it reads any data.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import operator
import re
import types
import typing
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from stages.lib import registry
from stages.lib.errors import ParamError

PARAMS_FILE = Path("params.yaml")
SEED_LIMIT = 2**32  # numpy's and TensorFlow's seeds are unsigned 32-bit


def bounded(
    default: Any, *, ge: float | None = None, gt: float | None = None, le: float | None = None, lt: float | None = None
) -> Any:
    """A dataclass field with a numeric range, checked by the loader."""
    return field(default=default, metadata={"ge": ge, "gt": gt, "le": le, "lt": lt})


@dataclass(frozen=True)
class Named:
    """A `{name: ..., other keys}` section: `name` picks a Keras class, the rest are its kwargs."""

    name: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DataParams:
    source: Literal["mnist_sample", "mnist", "fashion_mnist"] = "mnist_sample"
    url: str | None = None  # override the location: a file URL, or a base URL for several files
    sha256: str | dict[str, str] | None = None  # override the checksum (a mapping for several files)
    test_fraction: float = bounded(0.2, gt=0, lt=1)  # mnist_sample only: held-out share, stratified
    split_seed: int = bounded(42, ge=0, lt=SEED_LIMIT)


@dataclass(frozen=True)
class NormalizeParams:
    method: Literal["scale", "standardize"] = "scale"


@dataclass(frozen=True)
class ModelParams:
    hidden_units: list[int] = field(default_factory=lambda: [128], metadata={"ge": 1, "le": 65536})  # each item
    activation: str = "relu"
    dropout: float = bounded(0.0, ge=0, lt=1)
    output_activation: str = "auto"  # auto or one of registry.OUTPUT_ACTIVATIONS


@dataclass(frozen=True)
class EarlyStoppingParams:
    enabled: bool = False
    monitor: Literal["val_loss", "val_accuracy", "loss", "accuracy"] = "val_loss"
    patience: int = bounded(3, ge=0)
    min_delta: float = bounded(0.0, ge=0)
    restore_best_weights: bool = True


@dataclass(frozen=True)
class SpeedParams:
    """How fast, not what: the same math (the last float bits may differ with these)."""

    jit_compile: bool = True  # XLA-compile the training loop (with one replica)
    steps_per_execution: int = bounded(256, ge=1, le=1_000_000)  # steps per compiled call
    threads: int = bounded(1, ge=0, le=1024)  # TensorFlow threads per pool; 0 = all cores


@dataclass(frozen=True)
class TrainParams:
    loss: str = "sparse_categorical_crossentropy"
    loss_args: dict[str, Any] = field(default_factory=dict)
    from_logits: bool = False
    optimizer: Named = field(default_factory=lambda: Named("adam", {"learning_rate": 0.001}))
    lr_schedule: Named = field(default_factory=lambda: Named("none"))
    early_stopping: EarlyStoppingParams = field(default_factory=EarlyStoppingParams)
    epochs: int = bounded(10, ge=1, le=100_000)
    batch_size: int = bounded(32, ge=1, le=1_000_000)
    validation_split: float = bounded(0.1, ge=0, lt=1)
    seed: int = bounded(42, ge=0, lt=SEED_LIMIT)
    speed: SpeedParams = field(default_factory=SpeedParams)
    distribute: Literal["none", "mirrored", "multi_worker"] = "none"
    mixed_precision: bool = False  # float16 (GPU) / bfloat16 (CPU) compute, float32 weights


@dataclass(frozen=True)
class EvaluateParams:
    batch_size: int = bounded(256, ge=1, le=1_000_000)
    confusion_normalize: Literal["none", "true", "pred", "all"] = "none"  # for the PNG only


@dataclass(frozen=True)
class Params:
    data: DataParams = field(default_factory=DataParams)
    normalize: NormalizeParams = field(default_factory=NormalizeParams)
    model: ModelParams = field(default_factory=ModelParams)
    train: TrainParams = field(default_factory=TrainParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)


SECTIONS = tuple(f.name for f in dataclasses.fields(Params))  # what dvc.yaml's `params:` lists


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
    """Validate a params mapping (as loaded from YAML) into `Params`."""
    params = _build(Params, raw, "")
    _check_names_and_combinations(params)
    return params


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _build(cls: type, raw: Any, key: str) -> Any:
    where = key or "params.yaml"
    if not isinstance(raw, Mapping):
        raise ParamError(where, f"expected a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in raw:
        if name not in fields:
            close = difflib.get_close_matches(str(name), fields, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ParamError(_join(key, str(name)), f"unknown key{hint} (known: {', '.join(fields)})")
    values = {}
    for name, f in fields.items():
        if name in raw:
            values[name] = _value(hints[name], raw[name], _join(key, name), f.metadata)
    return cls(**values)


def _value(tp: Any, value: Any, key: str, limits: Mapping[str, Any]) -> Any:  # noqa: PLR0911, PLR0912
    origin = typing.get_origin(tp)
    if tp is Named:
        if not isinstance(value, Mapping) or not isinstance(value.get("name"), str):
            raise ParamError(key, f"expected a mapping with a 'name', got {value!r}")
        kwargs = {str(k): v for k, v in value.items() if k != "name"}
        for name, v in kwargs.items():
            _check_kwarg(v, f"{key}.{name}")
        return Named(value["name"], kwargs)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool) or value is None:  # `-S key=true` writes YAML's true, not "true"
            value = {True: "true", False: "false", None: "none"}[value]
        if value not in choices:
            raise ParamError(key, f"{value!r} is not allowed; choose one of: {', '.join(choices)}")
        return value
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            if option is type(None):
                if value is None:
                    return None
                continue
            try:
                return _value(option, value, key, limits)
            except ParamError:
                continue
        names = " or ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
        raise ParamError(key, f"expected {names}, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ParamError(key, f"expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_value(item, v, f"{key}[{i}]", limits) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ParamError(key, f"expected a mapping, got {value!r}")
        _, item = typing.get_args(tp)
        return {str(k): _value(item, v, _join(key, str(k)), {}) for k, v in value.items()}
    if tp is Any:
        _check_kwarg(value, key)
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ParamError(key, f"expected true or false, got {value!r}")
        return value
    if tp in (int, float):
        value = _number(tp, value, key)
        _check_range(value, key, limits)
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ParamError(key, f"expected a string, got {value!r}")
        return value
    raise TypeError(f"schema type {tp!r} at {key} is not supported")  # a bug in this module


def _check_kwarg(value: Any, key: str) -> None:
    """A value passed on to a Keras constructor: a finite number, true/false, a string, or a list of them."""
    if isinstance(value, list):
        for i, item in enumerate(value):
            _check_kwarg(item, f"{key}[{i}]")
    elif isinstance(value, float) and not math.isfinite(value):
        raise ParamError(key, f"must be a finite number, got {value}")
    elif value is not None and not isinstance(value, (bool, int, float, str)):
        raise ParamError(key, f"expected a number, true/false, a string or a list of them, got {value!r}")


def _type_name(tp: Any) -> str:
    return {str: "a string", int: "an integer", float: "a number"}.get(tp, "a mapping")


def _number(tp: type, value: Any, key: str) -> int | float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (tp is int and isinstance(value, float)):
        raise ParamError(key, f"expected {_type_name(tp)}, got {value!r}")
    if not math.isfinite(value):
        raise ParamError(key, f"must be a finite number, got {value}")
    return tp(value)


_COMPARISONS = {
    "ge": (">=", operator.ge),
    "gt": (">", operator.gt),
    "le": ("<=", operator.le),
    "lt": ("<", operator.lt),
}


def _check_range(value: float, key: str, limits: Mapping[str, Any]) -> None:
    for name, (symbol, compare) in _COMPARISONS.items():
        bound = limits.get(name)
        if bound is not None and not compare(value, bound):
            raise ParamError(key, f"must be {symbol} {bound}, got {value}")


def _one_of(key: str, value: str, allowed: typing.Iterable[str]) -> None:
    allowed = list(allowed)
    if value not in allowed:
        close = difflib.get_close_matches(value, allowed, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ParamError(key, f"unknown {value!r}{hint}; choose one of: {', '.join(allowed)}")


def _check_url(url: str) -> None:
    if not re.match(r"^(https?|file)://", url):
        raise ParamError("data.url", f"{url!r} must start with http://, https:// or file://")
    if any(c.isspace() for c in url):
        raise ParamError("data.url", f"{url!r} contains a space; write it as %20")
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in 0-65535
    except ValueError as exc:
        raise ParamError("data.url", f"{url!r} is not a valid URL ({exc})") from None
    if parts.scheme != "file" and not parts.hostname:
        raise ParamError("data.url", f"{url!r} has no host name")


def _check_names_and_combinations(p: Params) -> None:
    d, t = p.data, p.train
    if d.url is not None:
        _check_url(d.url)
    checksums = d.sha256.values() if isinstance(d.sha256, dict) else [d.sha256] if d.sha256 else []
    for value in checksums:
        if not re.fullmatch(r"[0-9a-f]{64}", value):
            raise ParamError("data.sha256", f"{value!r} is not a sha256 (64 lowercase hex digits)")
    _one_of("model.activation", p.model.activation, registry.HIDDEN_ACTIVATIONS)
    _one_of("model.output_activation", p.model.output_activation, ["auto", *registry.OUTPUT_ACTIVATIONS])
    _one_of("train.loss", t.loss, registry.LOSSES)
    _one_of("train.optimizer.name", t.optimizer.name, registry.OPTIMIZERS)
    _one_of("train.lr_schedule.name", t.lr_schedule.name, ["none", *registry.LR_SCHEDULES])
    if t.lr_schedule.name == "none" and t.lr_schedule.kwargs:
        raise ParamError("train.lr_schedule", "has settings but name is 'none'; pick a schedule or drop them")
    lr = t.optimizer.kwargs.get("learning_rate")
    if lr is not None:
        lr = _number(float, lr, "train.optimizer.learning_rate")
        _check_range(lr, "train.optimizer.learning_rate", {"gt": 0})
    registry.check_combination(t.loss, p.model.output_activation, t.from_logits)
    registry.check_effect(t)
    if t.early_stopping.enabled and t.early_stopping.monitor.startswith("val_") and t.validation_split == 0:
        raise ParamError(
            "train.early_stopping.monitor",
            f"'{t.early_stopping.monitor}' needs validation data; set train.validation_split > 0 or monitor loss",
        )
