"""Keyword arguments for Keras constructors, judged by the installed Keras' own source, without importing it.

`check` must answer at once, and importing Keras starts TensorFlow (seconds, 700 MB). So each
constructor's signature is read from `keras/src/<folder>/*.py` with `ast`: its parameter names,
which are required, and each default's type; where a default shows no type (None, or none), the
type its docstring names ("clipnorm: Float. If set, ..."). It is the installed version's source, so
these are always the signatures of the Keras that trains (tests/test_losses.py holds them against
`inspect.signature` of the imported classes). Raises ParamError naming the dotted key.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from pipeline.errors import ParamError

REQUIRED = object()  # a constructor parameter without a default value
FOLDERS = {"loss": "losses", "optimizer": "optimizers", "schedule": "optimizers/schedules"}


def _source_folder(kind: str) -> Path:
    """The installed Keras' source folder of a kind of class, found without importing Keras."""
    spec = importlib.util.find_spec("keras")
    if spec is None or not spec.submodule_search_locations:
        raise ParamError("train", "Keras is not installed in this environment; run `make setup`")
    return Path(next(iter(spec.submodule_search_locations))) / "src" / FOLDERS[kind]


@functools.cache
def keras_classes(kind: str) -> dict[str, ast.ClassDef]:
    """Every class the installed Keras defines in `keras/src/<folder>/*.py` (tests aside), by name."""
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


def accepted(kind: str, class_name: str, exclude: set[str] = frozenset()) -> dict[str, Any]:
    """Keyword parameters of the Keras class's `__init__` -> default (`REQUIRED` for none), from its source.

    Without self, *args, **kwargs and `exclude`; a class without its own `__init__` takes its
    base's. Raises KeyError for a class the installed Keras does not define there.
    """
    classes = keras_classes(kind)
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
def documented_types(kind: str, class_name: str) -> dict[str, str]:
    """Argument -> type, from the class's docstring ("clipnorm: Float. If set, ...", "decay_steps: A
    Python integer."). An optimizer also documents the base class's arguments
    (`base_optimizer_keyword_args` in base_optimizer.py, one text for all)."""
    texts = [ast.get_docstring(keras_classes(kind)[class_name]) or ""]
    if kind == "optimizer":
        base = ast.parse((_source_folder(kind) / "base_optimizer.py").read_bytes())
        texts += [
            n.value.value
            for n in base.body
            if isinstance(n, ast.Assign)
            and any(getattr(t, "id", "") == "base_optimizer_keyword_args" for t in n.targets)
        ]
    found = {}
    for name, description in re.findall(r"^\s*(\w+): (?:An? )?(?:Python )?(\w+)", "\n".join(texts), re.M):
        documented = next((t for word, t in _DOCUMENTED if description.lower().startswith(word)), None)
        if documented:
            found.setdefault(name, documented)
    return found


_EXPECTED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "number": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "list": (lambda v: isinstance(v, list), "a list"),
}


def check(
    kwargs: Mapping[str, Any], kind: str, class_name: str, exclude: set[str], *, key: str, what: str
) -> dict[str, Any]:
    """Unknown keys, missing required ones, and values of another type than the constructor's default
    (bool, number, str) or, where the default shows none, than its docstring says. Raises ParamError.

    Returns the arguments with an integer made a float where the default is a float: YAML's `1`
    (what `dvc exp run -S learning_rate=1` writes) is a number, and Keras wants a float there.
    """
    defaults, documented = accepted(kind, class_name, exclude), documented_types(kind, class_name)
    checked = {}
    for name, value in kwargs.items():
        if name not in defaults:
            raise ParamError(f"{key}.{name}", f"not a parameter of {what}; accepted: {', '.join(sorted(defaults))}")
        default = defaults[name]
        if isinstance(default, bool):
            expected = "bool"
        elif isinstance(default, (int, float)):
            expected = "number"
        elif isinstance(default, str):
            expected = "str"
        else:  # None or none: what Keras' docstring says it takes (else Keras checks it while training)
            expected = documented.get(name, "")
        if expected and not _EXPECTED[expected][0](value):
            raise ParamError(f"{key}.{name}", f"expected {_EXPECTED[expected][1]}, got {value!r}")
        checked[name] = float(value) if isinstance(default, float) and isinstance(value, int) else value
    missing = [name for name, default in defaults.items() if default is REQUIRED and name not in checked]
    if missing:
        raise ParamError(f"{key}.{missing[0]}", f"required by {what}; add it (it has no default)")
    return checked


def construct(cls: type, kwargs: dict[str, Any], *, key: str, what: str) -> Any:
    """`cls(**kwargs)`, a refusal (TypeError, ValueError) as a ParamError naming `key`."""
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ParamError(key, f"{what} rejected these settings: {exc}") from exc
