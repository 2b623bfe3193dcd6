"""Shared fixtures: the project root, a small slice of the real bundled MNIST sample, stage runners."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent

# Tests run stages in subprocesses; they must find the venv's python and dvc first, and a git
# identity, since a fresh machine has none.
ENV = {
    **os.environ,
    "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    "PYTHONPATH": "",
    "GIT_AUTHOR_NAME": "pipeline tests",
    "GIT_AUTHOR_EMAIL": "tests@example.invalid",
    "GIT_COMMITTER_NAME": "pipeline tests",
    "GIT_COMMITTER_EMAIL": "tests@example.invalid",
    "DVC_NO_ANALYTICS": "1",
    "TF_CPP_MIN_LOG_LEVEL": "2",
}


def run(cmd: list[str], cwd: Path, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run a command with the test environment; on an unexpected exit show its output."""
    proc = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def tracked_files() -> list[str]:
    """The project as a fresh clone has it (tracked and not-ignored files), outputs excluded."""
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return [f for f in out if (ROOT / f).is_file() and not f.startswith(("tests/", "benchmarks/", "reports/"))]


def git_project(path: Path, overrides: dict | None = None) -> Path:
    """A git + DVC copy of the project at `path` (params with `overrides`), committed, nothing run."""
    for name in tracked_files():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, path / name)
    write_params(path, overrides or {})
    run(["git", "init", "-q", "-b", "main"], path)
    run(["git", "add", "-A"], path)
    run(["git", "commit", "-qm", "project"], path)
    return path


_TRAINED: dict[str, tuple[Path, subprocess.CompletedProcess[str]]] = {}  # one per test process


def dvc_project(path: Path) -> subprocess.CompletedProcess[str]:
    """A git + DVC copy of the project at `path`, `dvc repro` run once at 1 epoch and committed.

    Returns that `dvc repro`'s output. The first call in a test process builds the repository in
    a folder of its own that no test touches; later calls copy it (git, DVC cache and all),
    which gives each caller the same fresh repository in a fraction of a second.
    """
    if "repo" not in _TRAINED:
        template = Path(tempfile.mkdtemp(prefix="trained-template-")) / "repo"
        atexit.register(shutil.rmtree, template.parent, ignore_errors=True)
        git_project(template, {"train": {"epochs": 1}})
        proc = run(["dvc", "repro"], template)
        run(["git", "add", "-A"], template)
        run(["git", "commit", "-qm", "dvc repro, 1 epoch"], template)
        _TRAINED["repo"] = (template, proc)
    template, proc = _TRAINED["repo"]
    shutil.copytree(template, path, symlinks=True, dirs_exist_ok=True)
    return proc


def reset_worktree(repo: Path) -> None:
    """Every tracked file as HEAD has it, and HEAD back on main.

    `git checkout -- .` is not enough after `dvc exp run`: DVC can leave a changed file whose
    index entry carries the new file's size and time but the old content, so git thinks it is
    unchanged and skips it. Dropping the index first makes git compare and rewrite every file.
    """
    run(["git", "rm", "-r", "-q", "-f", "--cached", "."], repo)
    run(["git", "reset", "-q", "--hard", "HEAD"], repo)
    run(["git", "checkout", "-q", "main"], repo)


def write_params(project: Path, overrides: dict) -> dict:
    """params.yaml of the project with `overrides` merged in, section by section (one level deep)."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in overrides.items():
        for key, value in values.items():
            if isinstance(value, dict) and isinstance(params[section].get(key), dict):
                params[section][key] = {**params[section][key], **value}
            else:
                params[section][key] = value
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return params


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A scratch copy of the stage code and params.yaml, for running stages as a user would."""
    shutil.copytree(ROOT / "stages", tmp_path / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    return tmp_path


@pytest.fixture(scope="session")
def sample() -> dict[str, np.ndarray]:
    """The real bundled MNIST sample (uint8 Keras layout), read once per session."""
    from stages.lib import datasets, params

    return datasets.download(params.DataParams())


@pytest.fixture(scope="session")
def small(sample: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """1,000 train and 300 test real digits scaled to [0, 1]: enough to learn, quick to fit."""
    return {
        "x_train": sample["x_train"][:1000].astype(np.float32) / 255,
        "y_train": sample["y_train"][:1000],
        "x_test": sample["x_test"][:300].astype(np.float32) / 255,
        "y_test": sample["y_test"][:300],
    }


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The longest modules first (`slow(minutes=...)`; a stable sort keeps each module's order),
    so that the xdist workers of `make test` (one module at a time each) finish near each other."""

    def minutes(item: pytest.Item) -> float:
        marker = item.get_closest_marker("slow")
        return marker.kwargs.get("minutes", 1) if marker else 0

    items.sort(key=lambda item: -minutes(item))
