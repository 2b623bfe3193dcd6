"""DVC's run-cache and what experiments leave, through the real `dvc exp run` and `dvc exp apply`.

Params that ran before restore the stage's outputs without running it; after `dvc exp apply` of
any experiment, in any order, the outputs are exactly what its params produce (`dvc status` clean,
nothing retrains); a refused change leaves nothing to redo; a key removed takes its default, a
section removed is one line from `check`. The run-cache through the queue, and a sweep naming its
failed experiments, are tests/test_sweep.py's (one sweep shows both).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.harness import STAGES, digests, dvc_project, reset_worktree, restore, run

pytestmark = pytest.mark.pipeline(seconds=8)
CLEAN = "Data and pipelines are up to date."


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    path = tmp_path / "runcache"
    dvc_project(path)  # 1 epoch, committed; each test its own copy
    return path


@pytest.fixture
def baseline(repo: Path) -> dict[str, str]:
    """The committed outputs; the test must leave the workspace restorable to them."""
    outputs = digests(repo)
    yield outputs
    restore(repo)
    assert digests(repo) == outputs


def ran(output: str) -> list[str]:
    return [s for s in STAGES if f"Running stage '{s}'" in output]


@pytest.mark.pipeline(seconds=25)
def test_params_that_ran_before_come_from_the_run_cache_and_apply_in_either_order_gives_each_ones_outputs(
    repo: Path, baseline: dict
) -> None:
    """binary_crossentropy (new: trains) logs binary_accuracy curves that the committed
    sparse_categorical_crossentropy (back again: from the run-cache) does not; applying them in turn,
    each way round, leaves exactly each one's outputs, `dvc status` clean and nothing to rerun."""
    bce = ["-S", "train.loss=binary_crossentropy", "-S", "train.optimizer.name=sgd"]
    first = run(["dvc", "exp", "run", "-n", "bce", *bce], repo).stdout
    assert ran(first) == ["check", "train", "evaluate"], first
    back = ["-S", "train.loss=sparse_categorical_crossentropy", "-S", "train.optimizer.name=adam"]  # committed
    again = run(["dvc", "exp", "run", "-n", "scce", *back], repo).stdout
    # check reads params.yaml's bytes, which `-S` rewrote in DVC's own layout: it may run (0.3 s)
    assert ran(again) in ([], ["check"]) and "Stage 'train' is cached - skipping run, checking out outputs" in again
    assert digests(repo) == baseline
    seen = {"scce": baseline}
    for name in ("bce", "scce", "bce"):  # from the workspace's, then each way round
        run(["dvc", "exp", "apply", name], repo)
        curves = {p.name for p in (repo / "metrics/train/plots/metrics/train").iterdir()}
        assert ("binary_accuracy.tsv" in curves) == (name == "bce"), (name, curves)
        assert CLEAN in run(["dvc", "status"], repo).stdout, name
        assert seen.setdefault(name, digests(repo)) == digests(repo), name
    assert ran(run(["dvc", "repro"], repo).stdout) == []


@pytest.mark.pipeline(seconds=4)
def test_a_refused_change_touches_nothing_and_once_params_are_restored_dvc_status_is_clean(
    repo: Path, baseline: dict
) -> None:
    """Stopped at check before anything ran: every output and dvc.lock's record as they were (but check's),
    no command to restore them printed, no traceback."""
    lock = digests(repo, lock=True)
    proc = run(["dvc", "exp", "run", "-S", "train.seed=-1"], repo, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "error: params.yaml: train.seed: must be >= 0, got -1" in proc.stderr, output
    assert "dvc checkout" not in proc.stderr  # a refusal touches nothing: nothing to restore
    assert "Running stage 'train'" not in output and "Traceback" not in output
    assert digests(repo, lock=True) == lock
    run(["git", "checkout", "-q", "--", "params.yaml"], repo)
    assert CLEAN in run(["dvc", "status"], repo).stdout


@pytest.mark.pipeline(seconds=20)
def test_a_removed_key_takes_its_default_and_a_removed_section_is_one_line(repo: Path, baseline: dict) -> None:
    proc = run(["dvc", "exp", "run", "-S", "~train.loss_args", "-S", "~train.seed"], repo)
    assert "missing from" not in proc.stdout + proc.stderr
    assert digests(repo) == baseline  # the defaults are the committed values: the same model
    reset_worktree(repo)
    for change in (["-S", "~evaluate"], ["-S", "~data", "-S", "~normalize"]):
        proc = run(["dvc", "exp", "run", *change], repo, check=False)
        lines = [line for line in proc.stderr.splitlines() if line.startswith("error: params.yaml")]
        assert proc.returncode != 0 and len(lines) == 1 and "section missing" in lines[0], proc.stderr
        assert "missing from 'params.yaml'" not in proc.stderr and ran(proc.stdout) == ["check"]
        reset_worktree(repo)
    (repo / "params.yaml").write_text("")  # "all defaults"
    proc = run(["dvc", "repro"], repo, check=False)
    assert proc.returncode != 0 and "error: params.yaml: data: section missing (`data:`, `normalize:`" in proc.stderr
    assert digests(repo) == baseline
