"""dvc.yaml against the code: each stage's params are the sections it reads, its deps the modules it imports
(but those that cannot change its outputs: NOT_DEPS).

DVC reruns a stage only for what dvc.yaml lists. A section a stage reads but does not list would
leave a model "up to date" after a change; a module it imports but does not list, the same after
an edit. These tests read the stages' source (no TensorFlow) and fail on either drift.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from pipeline import params
from tests.harness import ROOT

DVC_YAML = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
PIPELINE = [name for name in DVC_YAML if name != "check"]


def lib_modules(path: Path, seen: set[str] | None = None) -> set[str]:
    """pipeline/*.py files that `path` imports, directly or through each other."""
    seen = set() if seen is None else seen
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module == "pipeline":
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pipeline."):
            names = [node.module.split(".")[1]]
        for name in names:
            module = f"pipeline/{name}.py"
            if module not in seen:
                seen.add(module)
                lib_modules(ROOT / module, seen)
    return seen


def imports_tensorflow(path: Path) -> bool:
    """Whether `path` imports TensorFlow or Keras when it is imported (module level: a function's lazy
    import, e.g. losses.build's, runs only in the stage that calls it)."""
    names = [
        alias.name if isinstance(node, ast.Import) else node.module or ""
        for node in ast.parse(path.read_text(encoding="utf-8")).body
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in (node.names if isinstance(node, ast.Import) else [None])
    ]
    return any(name.split(".")[0] in ("tensorflow", "keras") for name in names)


def sections_read(path: Path) -> set[str]:
    """The params sections a stage reads: `p.<section>` where `p = params.load()`."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    loads = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign)
        and isinstance(node.value, ast.Call)
        and ast.unparse(node.value.func) == "params.load"
    ]
    assert len(loads) == 1 and ast.unparse(loads[0].targets[0]) == "p", f"{path}: one `p = params.load()`"
    return {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "p"
    } & set(params.SECTIONS)


# What a stage imports that cannot change the bytes of its outputs: how it fails, is stopped and says
# so, and how a file is put in place (whole or not at all). Not deps: an edit there reruns no stage.
NOT_DEPS = {"pipeline/errors.py", "pipeline/runner.py", "pipeline/atomic.py"}


@pytest.mark.parametrize("stage", list(DVC_YAML))
def test_each_stage_lists_its_script_and_exactly_the_modules_it_imports(stage: str) -> None:
    script = ROOT / f"stages/{stage}.py"
    assert DVC_YAML[stage]["cmd"] == f"python -m stages.{stage}"
    listed = {d for d in DVC_YAML[stage]["deps"] if d.endswith(".py")}
    modules = {f"stages/{stage}.py", *lib_modules(script)}
    # stages/__init__.py pins TensorFlow's arithmetic (XLA's and oneDNN's instruction sets): a dep of
    # exactly the stages that run TensorFlow
    pinned = {"stages/__init__.py"} if any(imports_tensorflow(ROOT / m) for m in modules) else set()
    assert listed == (modules | pinned) - NOT_DEPS


@pytest.mark.parametrize("stage", PIPELINE)
def test_each_stage_lists_exactly_the_params_sections_it_reads(stage: str) -> None:
    assert set(DVC_YAML[stage]["params"]) == sections_read(ROOT / f"stages/{stage}.py")


def test_every_section_of_the_schema_is_tracked_and_check_reads_the_whole_file() -> None:
    tracked = [section for stage in PIPELINE for section in DVC_YAML[stage]["params"]]
    assert sorted(tracked) == sorted(params.SECTIONS)  # each once: a stage owns its section
    assert "params.yaml" in DVC_YAML["check"]["deps"] and "params" not in DVC_YAML["check"]
    for stage in PIPELINE:
        assert "data/params.ok" in DVC_YAML[stage]["deps"]


def test_no_output_turns_the_run_cache_off() -> None:
    """DVC skips its run-cache for a stage with a persisted output, or an uncached one that is not a metric."""
    for stage in DVC_YAML.values():
        for out in stage.get("outs", []):
            options = next(iter(out.values())) if isinstance(out, dict) else {}
            assert not options.get("persist") and options.get("cache", True), out


def test_a_missing_key_takes_its_default_and_a_missing_section_is_one_line(tmp_path: Path) -> None:
    file = tmp_path / "params.yaml"
    file.write_text("data: {}\nnormalize: {}\nmodel: {}\ntrain:\n  epochs: 3\nevaluate: {}\n")
    loaded = params.load(file)
    assert (
        loaded.train.epochs == 3 and loaded.train.loss_args == {} and loaded == params.parse({"train": {"epochs": 3}})
    )
    for text, first in [("", "data"), ("data: {}\nnormalize: {}\nmodel: {}\ntrain: {}\n", "evaluate")]:
        file.write_text(text)
        with pytest.raises(params.ParamError) as exc:
            params.load(file)
        message = str(exc.value)
        assert message.startswith(f"params.yaml: {first}: section missing (`{first}:`") and "\n" not in message
        assert f"`{first}: {{}}` takes all of its defaults" in message
    file.write_text("data: {}\nnormalize: {}\nmodel: {}\ntrain: {}\nevaluate:\n")  # a bare `evaluate:`
    with pytest.raises(params.ParamError, match=r"evaluate: is empty; write `evaluate: \{\}` to take all of its"):
        params.load(file)
