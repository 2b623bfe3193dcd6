"""The tree shows the architecture (docs/layout.md): stages/ holds exactly the stages dvc.yaml runs,
imports go one way (stages and commands -> pipeline), and no two modules import each other."""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

from tests.harness import ROOT

PACKAGES = ("stages", "pipeline", "commands")


def imports(path: Path) -> set[str]:
    """The project modules `path` imports anywhere in it (`pipeline.losses`, `commands.images`, ...)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module in PACKAGES:
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PACKAGES:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] in PACKAGES}
    return found


GRAPH = {
    f"{path.parent.name}.{path.stem}": imports(path)
    for package in PACKAGES
    for path in sorted((ROOT / package).glob("*.py"))
    if path.stem != "__init__"
}


def test_stages_holds_exactly_the_scripts_dvc_yaml_runs() -> None:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    assert {m.split(".")[1] for m in GRAPH if m.startswith("stages.")} == set(stages)
    assert all(stage["cmd"] == f"python -m stages.{name}" for name, stage in stages.items())


def test_imports_go_one_way_and_form_no_circle() -> None:
    for module, used in GRAPH.items():
        if module.startswith("pipeline."):
            assert not {u for u in used if not u.startswith("pipeline.")}, module  # the library stands alone
        if module.startswith("commands."):
            assert not {u for u in used if u.startswith("stages.")}, module  # a stage is run, not imported
    seen: set[str] = set()

    def walk(module: str, path: tuple[str, ...]) -> None:
        for used in GRAPH.get(module, ()):
            assert used not in path, " -> ".join([*path, used])
            if used not in seen:
                walk(used, (*path, used))
        seen.add(module)

    for module in GRAPH:
        walk(module, (module,))
