"""`python -m commands.sweep` on DVC's real queue: it reports exactly what it ran, where that grid's
report belongs, names what failed, takes params that ran before from the run-cache, and it never
waits forever for DVC (a folder DVC cannot encode, workers that die)."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from tests.harness import ENV, ROOT, digests, dvc_project, run, wait_for

PYTHON = sys.executable


def rows(table: Path) -> list[str]:
    """The experiment names of a table written by commands.report."""
    lines = table.read_text(encoding="utf-8").splitlines()
    return sorted(line.split(" | ")[0].removeprefix("| ") for line in lines[2:] if line.startswith("| "))


@pytest.mark.pipeline(seconds=25)
def test_a_grid_reports_what_it_ran_in_its_own_folder_names_what_failed_and_reuses_what_ran_before(
    tmp_path: Path,
) -> None:
    """An experiment run earlier (`--temp`: evaluate's picture normalized; only evaluate reruns), then the
    grid: that normalization at the committed learning rate (train unchanged, evaluate from DVC's
    run-cache, through the queue: the earlier run's outputs, byte for byte) and at one that diverges.
    The sweep exits 2 naming the failed one, with the command that shows why, after the report of the
    one that finished, in the grid's own folder; the earlier experiment is not in it. `dvc exp run
    --run-all` alone would exit 0 here."""
    repo = tmp_path / "repo"
    dvc_project(repo)
    normalized = ["-S", "evaluate.confusion_normalize=all"]
    earlier = run(["dvc", "exp", "run", "--temp", "--name", "earlier", *normalized], repo).stdout
    assert [s for s in ("train", "evaluate") if f"Running stage '{s}'" in earlier] == ["evaluate"], earlier
    grid = ["-S", "train.optimizer.learning_rate=0.001,1e30", *normalized]
    proc = run([PYTHON, "-m", "commands.sweep", *grid, "--jobs", "2"], repo, check=False)
    queued = [line.split("'")[1] for line in proc.stdout.splitlines() if line.startswith("Queued experiment")]
    line = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and line.startswith("error: 1 of 2 experiments did not finish: "), proc.stderr
    failed = line.split("finish: ")[1].split(" (")[0]
    (finished,) = set(queued) - {failed}
    assert "(Failed)" in line and f"dvc queue logs {failed}" in line
    assert "training diverged at epoch 1" in run(["dvc", "queue", "logs", failed], repo).stdout
    assert "  2 of 2 ended after " in proc.stdout  # a line as each one ends
    folder = repo / "reports/sweeps/optimizer.learning_rate=0.001+1e30_evaluate.confusion_normalize=all"
    assert rows(folder / "compare.md") == [finished], proc.stdout
    assert (folder / "compare.png").read_bytes()[:4] == b"\x89PNG"
    assert not (repo / "reports/compare.md").exists()  # the published grid's report is not this one's
    log = run(["dvc", "queue", "logs", finished], repo).stdout
    assert "Stage 'evaluate' is cached - skipping run, checking out outputs" in log, log
    assert not [s for s in ("train", "evaluate") if f"Running stage '{s}'" in log], log
    outputs = {}
    for name in ("earlier", finished):
        run(["dvc", "exp", "apply", name], repo)
        outputs[name] = digests(repo)
    assert outputs[finished] == outputs["earlier"]
    assert "Data and pipelines are up to date." in run(["dvc", "status"], repo).stdout


@pytest.mark.pipeline(seconds=1)
def test_make_sweep_publishes_only_the_default_grid() -> None:
    default = run(["make", "-n", "sweep"], ROOT).stdout
    own = run(["make", "-n", "sweep", "LOSSES=poisson", "OPTIMIZERS=adam"], ROOT).stdout
    assert "--out reports --readme docs/sweep.md" in default
    assert "commands.sweep" in own and "--out" not in own and "--readme" not in own


@pytest.mark.pipeline(seconds=5)
def test_a_folder_dvc_cannot_encode_ends_the_sweep_and_the_study_at_once(tmp_path: Path) -> None:
    """DVC 3.67 fails every --temp or queued run in setup when its cache path is not ASCII, and its
    `--run-all` then waits forever: both commands say so before queueing anything."""
    repo = tmp_path / "lab-ü"
    dvc_project(repo)
    for command in (
        ["commands.sweep", "-S", "train.epochs=1,2"],
        ["commands.study", "--study-name", "s", "--lrs", "0.01", "--seeds", "1"],
    ):
        proc = run([PYTHON, "-m", *command], repo, check=False, timeout=120)
        line = proc.stderr.strip().splitlines()[-1]
        assert proc.returncode == 2 and line.startswith("error: DVC cannot run experiments outside the workspace")
        assert f"its cache folder {repo}/.dvc/cache has non-ASCII letters" in line
        assert "dvc cache dir --local" in line and "Traceback" not in proc.stderr
    assert "Queued" not in run(["dvc", "queue", "status"], repo).stdout


@pytest.mark.system(seconds=40)
def test_workers_that_die_or_a_ctrl_c_end_the_sweep_with_one_line_and_a_clean_queue(tmp_path: Path) -> None:
    """Each stop comes once an experiment trains (its train stage runs, under the queue): by then the sweep
    has seen DVC's workers at work."""
    repo = tmp_path / "repo"
    dvc_project(repo)

    def workers() -> list[psutil.Process]:
        found = []
        for proc in psutil.process_iter(["cmdline", "cwd"]):
            if "queue-worker" in " ".join(proc.info["cmdline"] or []) and proc.info["cwd"] == str(repo):
                found.append(proc)
        return found

    def training() -> list[psutil.Process]:
        """The train stages of the sweep's experiments (each in its own copy of the repository, under .dvc)."""
        found = []
        for proc in psutil.process_iter(["cmdline", "cwd"]):
            cmdline, cwd = " ".join(proc.info["cmdline"] or []), proc.info["cwd"] or ""
            if cmdline.endswith("-m stages.train") and cwd.startswith(f"{repo}/.dvc/"):
                found.append(proc)
        return found

    def sweep(seeds: str, stop: Callable[[subprocess.Popen[str]], None]) -> tuple[int, str]:
        grid = ["-S", "train.epochs=30", "-S", f"train.seed={seeds}"]  # long enough to be stopped mid-run
        command = [PYTHON, "-m", "commands.sweep", *grid, "--jobs", "2"]
        # the stages of a sweep stopped before end once they see their dvc gone: were one still there, the stop
        # below could reach this sweep before Python has its handlers (SIGINT's default then ends it silently)
        wait_for(lambda: not training(), 60, "the earlier sweep's stages to end")
        proc = subprocess.Popen(command, cwd=repo, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_for(training, 120, "an experiment of the sweep to train")
            stop(proc)
            out, err = proc.communicate(timeout=300)
        finally:
            proc.kill()
        assert "Traceback" not in err and err.strip(), (proc.returncode, out, err)
        status = run(["dvc", "queue", "status"], repo).stdout
        assert "Running" not in status and "Queued" not in status, status  # nothing left behind, nothing stuck
        return proc.returncode, err.strip().splitlines()[-1]

    def kill_workers(_: subprocess.Popen[str]) -> None:
        for worker in workers():
            for proc in [*worker.children(recursive=True), worker]:
                proc.send_signal(signal.SIGKILL)

    status, line = sweep("1,2", kill_workers)
    assert status == 2 and line.startswith("error: DVC's queue workers stopped with 2 of 2 experiments unfinished")
    assert "were stopped and taken off DVC's queue" in line and "Run the sweep again" in line

    status, line = sweep("3,4", lambda proc: proc.send_signal(signal.SIGINT))
    assert status == 130
    assert line == "interrupted (Ctrl-C): the sweep's 2 unfinished experiments were stopped and taken off DVC's queue"
    assert not [p for p in psutil.process_iter(["cmdline"]) if "exec-run" in " ".join(p.info["cmdline"] or [])]
