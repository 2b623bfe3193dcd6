"""Shared fixtures on top of `tests.harness` (a scratch project, a slice of the real bundled MNIST sample),
the three tiers and the order in which `make test` runs the tests.

Tiers (docs/testing.md): a test marked neither `pipeline` nor `system` is a unit test (`make test-fast`);
`pipeline`: real dvc, stages or commands in subprocesses, or a trained project; `system`: the world
around it (PID namespaces, PostgreSQL, S3, Chromium, several cooperating processes). A marker's
`seconds=` is what the test takes on one core, for the order: the longest first.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import pytest

from tests import harness
from tests.harness import ROOT, copy_code, shared_template

TIERS = ("pipeline", "system")
# Modules whose tests still say `slow` (the tier before there were two): their tier, by module.
SLOW_MEANS = {"test_where_it_runs.py": "system", "test_study_postgres.py": "system"}
UNIT_SECONDS, TIER_SECONDS = 0.5, 10.0  # a test's estimate when its marker gives none
GROUPS = "xdist-groups.json"  # test id -> its group, written by the workers for the controller's scheduler


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A scratch copy of the stage code and params.yaml, for running stages as a user would."""
    copy_code(tmp_path)
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    return tmp_path


@pytest.fixture(scope="session")
def sample() -> dict[str, np.ndarray]:
    """The real bundled MNIST sample (uint8 Keras layout), read once per session."""
    from pipeline import params
    from stages.download import download

    return download(params.DataParams())


@pytest.fixture(scope="session")
def small(sample: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """1,000 train and 300 test real digits scaled to [0, 1]: enough to learn, quick to fit."""
    return {
        "x_train": sample["x_train"][:1000].astype(np.float32) / 255,
        "y_train": sample["y_train"][:1000],
        "x_test": sample["x_test"][:300].astype(np.float32) / 255,
        "y_test": sample["y_test"][:300],
    }


def seconds(item: pytest.Item) -> float:
    """The test's estimate: its tier marker's `seconds=`."""
    for name in TIERS:
        marker = item.get_closest_marker(name)
        if marker:
            return float(marker.kwargs.get("seconds", TIER_SECONDS))
    return UNIT_SECONDS


def shares_a_fixture(item: pytest.Item) -> bool:
    """Whether the test uses a module-, class- or package-scoped fixture (built once for the tests beside it)."""
    info = getattr(item, "_fixtureinfo", None)
    defs = info.name2fixturedefs.values() if info else []
    return any(fixturedefs[-1].scope in ("module", "class", "package") for fixturedefs in defs if fixturedefs)


@pytest.hookimpl(tryfirst=True)  # before `-m` selects by tier
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tier markers for tests that still say `slow`; one xdist group per module for tests that share a
    module's fixture (`--dist loadgroup` sends them to one worker, which builds it once); then every
    unit of work (a group, or a test on its own) by its estimate, the longest first, so that the two
    workers of `make test` finish near each other (each group's tests in their own order)."""
    for item in items:
        slow = item.get_closest_marker("slow")
        if slow and not any(item.get_closest_marker(name) for name in TIERS):  # `slow(minutes=m)`: m / 2 minutes
            estimate = 30.0 * slow.kwargs["minutes"] if "minutes" in slow.kwargs else TIER_SECONDS
            item.add_marker(getattr(pytest.mark, SLOW_MEANS.get(item.path.name, "pipeline"))(seconds=estimate))
        if shares_a_fixture(item) and not item.get_closest_marker("xdist_group"):
            item.add_marker(pytest.mark.xdist_group(item.path.name))

    def unit(item: pytest.Item) -> str:
        group = item.get_closest_marker("xdist_group")
        return f"@{group.args[0] if group.args else group.kwargs.get('name', 'default')}" if group else item.nodeid

    cost: dict[str, float] = {}
    for item in items:
        cost[unit(item)] = cost.get(unit(item), 0.0) + seconds(item)
    items.sort(key=lambda item: -cost[unit(item)])  # stable: a group's tests keep their order
    run_id = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if hasattr(config, "workerinput") and run_id:  # for the controller's scheduler, below
        groups = {item.nodeid: unit(item) for item in items if unit(item).startswith("@")}
        folder = shared_template(run_id)
        folder.mkdir(exist_ok=True)
        mine = folder / f"{GROUPS}.{os.getpid()}"
        mine.write_text(json.dumps(groups), encoding="utf-8")
        os.replace(mine, folder / GROUPS)  # every worker writes the same


def pytest_collection_finish(session: pytest.Session) -> None:
    """The shared templates the selected tests copy (their modules call `dvc_project(`, `trained_project(`):
    a worker that waits for one builds another of them meanwhile (tests/harness.py)."""
    sources = [path.read_text(encoding="utf-8") for path in {item.path for item in session.items}]
    wanted = {name for name, call in harness.COPIED_BY.items() if any(call in text for text in sources)}
    harness.WANTED.update(wanted)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """`--dist loadgroup` with the groups the workers found (above). xdist 3.8 marks a grouped test by
    appending `@group` to its id, which pytest 9 no longer lets a plugin change: its own loadgroup sends
    every test on its own. Here the scheduler reads the groups from the workers' file instead."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadGroupScheduling

    class Grouped(LoadGroupScheduling):
        groups: dict[str, str] | None = None

        def _split_scope(self, nodeid: str) -> str:
            if self.groups is None:  # read once every worker has collected (scheduling starts then)
                file = shared_template(config.option.testrunuid) / GROUPS
                self.groups = json.loads(file.read_text(encoding="utf-8")) if file.exists() else {}
            return self.groups.get(nodeid) or super()._split_scope(nodeid)

    return Grouped(config, log)


def pytest_configure(config: pytest.Config) -> None:
    """The xdist controller picks the run's id itself, so that it knows which shared templates to remove."""
    if not hasattr(config, "workerinput") and hasattr(config.option, "testrunuid") and not config.option.testrunuid:
        config.option.testrunuid = uuid.uuid4().hex


def pytest_unconfigure(config: pytest.Config) -> None:
    if not hasattr(config, "workerinput") and getattr(config.option, "testrunuid", None):
        shutil.rmtree(shared_template(config.option.testrunuid), ignore_errors=True)
