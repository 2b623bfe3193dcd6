"""DVC's run-cache and what experiments leave, through the real `dvc exp run`, the queue and `dvc exp apply`.

Params that ran before (in the workspace or in the queue) restore the stage's outputs without
running it; after `dvc exp apply` of any experiment, in any order, the outputs are exactly what
its params produce (`dvc status` clean, nothing retrains); a refused change leaves nothing to
redo; a key removed takes its default, a section removed is one line from `check`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.harness import BIN, digests, dvc_project, reset_worktree, restore, run

pytestmark = pytest.mark.slow(minutes=4)  # on one core: schedules the longest first
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
    stages = ("check", "download", "normalize", "train", "evaluate")
    return [s for s in stages if f"Running stage '{s}'" in output]


def test_params_that_ran_before_come_from_the_run_cache_in_the_workspace_and_the_queue(
    repo: Path, baseline: dict
) -> None:
    first = run(["dvc", "exp", "run", "-S", "train.epochs=2"], repo).stdout
    assert ran(first) == ["check", "train", "evaluate"]
    two_epochs = digests(repo)
    back = run(["dvc", "exp", "run", "-S", "train.epochs=1"], repo).stdout  # the committed params again
    # check reads params.yaml's bytes, which `-S` rewrote in DVC's own layout: it may run (0.3 s)
    assert ran(back) in ([], ["check"]) and "Stage 'train' is cached - skipping run, checking out outputs" in back
    assert digests(repo) == baseline
    reset_worktree(repo)
    run(["dvc", "checkout", "--force"], repo)
    run(["dvc", "exp", "run", "--queue", "-n", "two-epochs-again", "-S", "train.epochs=2"], repo)
    run(["dvc", "exp", "run", "--run-all"], repo)
    log = run(["dvc", "queue", "logs", "two-epochs-again"], repo).stdout
    assert ran(log) in ([], ["check"]) and "Stage 'train' is cached" in log, log
    run(["dvc", "exp", "apply", "two-epochs-again"], repo)
    assert digests(repo) == two_epochs and CLEAN in run(["dvc", "status"], repo).stdout


def test_apply_in_either_order_leaves_exactly_the_experiments_outputs(repo: Path, baseline: dict) -> None:
    """binary_crossentropy logs binary_accuracy curves that sparse_categorical_crossentropy does not."""
    for name, loss in (("bce", "binary_crossentropy"), ("scce-sgd", "sparse_categorical_crossentropy")):
        run(
            ["dvc", "exp", "run", "--queue", "-n", name, "-S", f"train.loss={loss}", "-S", "train.optimizer.name=sgd"],
            repo,
        )
    run(["dvc", "exp", "run", "--run-all"], repo)
    assert "Failed" not in run(["dvc", "queue", "status"], repo).stdout
    seen = {}
    for name in ("bce", "scce-sgd", "bce", "scce-sgd"):
        run(["dvc", "exp", "apply", name], repo)
        curves = {p.name for p in (repo / "metrics/train/plots/metrics/train").iterdir()}
        assert ("binary_accuracy.tsv" in curves) == (name == "bce"), (name, curves)
        assert CLEAN in run(["dvc", "status"], repo).stdout, name
        assert ran(run(["dvc", "repro"], repo).stdout) == [], name
        assert seen.setdefault(name, digests(repo)) == digests(repo)


def test_a_refused_change_then_params_restored_leaves_dvc_status_clean(repo: Path, baseline: dict) -> None:
    proc = run(["dvc", "exp", "run", "-S", "train.seed=-1"], repo, check=False)
    assert proc.returncode != 0 and "error: params.yaml: train.seed: must be >= 0, got -1" in proc.stderr
    assert "dvc checkout" not in proc.stderr  # a refusal touches nothing: nothing to restore
    assert digests(repo) == baseline
    run(["git", "checkout", "-q", "--", "params.yaml"], repo)
    assert CLEAN in run(["dvc", "status"], repo).stdout


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


def test_a_sweep_names_its_failed_experiments_and_exits_non_zero(repo: Path, baseline: dict) -> None:
    """`dvc exp run --run-all` exits 0 after a failure; `python -m commands.sweep` (make sweep) does not."""
    grid = ["-S", "train.optimizer.learning_rate=0.001,1e30"]  # the committed params (run-cache), and one that diverges
    proc = run([str(BIN / "python"), "-m", "commands.sweep", *grid], repo, check=False)
    line = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and line.startswith("error: 1 of 2 experiments did not finish: "), proc.stderr
    failed = line.split("finish: ")[1].split(" (")[0]
    assert "(Failed)" in line and f"dvc queue logs {failed}" in line
    assert "training diverged at epoch 1" in run(["dvc", "queue", "logs", failed], repo).stdout
