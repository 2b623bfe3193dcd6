"""`python -m commands.sweep` on DVC's real queue: it reports exactly what it ran, where that grid's
report belongs, and it never waits forever for DVC (a folder DVC cannot encode, workers that die)."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from tests.harness import ENV, ROOT, dvc_project, run, wait_for

pytestmark = pytest.mark.slow(minutes=2)
PYTHON = sys.executable


def rows(table: Path) -> list[str]:
    """The experiment names of a table written by commands.report."""
    lines = table.read_text(encoding="utf-8").splitlines()
    return sorted(line.split(" | ")[0].removeprefix("| ") for line in lines[2:] if line.startswith("| "))


def test_a_small_grid_reports_exactly_what_it_ran_in_its_own_folder(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    dvc_project(repo)
    run(["dvc", "exp", "run", "--temp", "--name", "earlier", "-S", "train.seed=7"], repo)  # not the sweep's
    grid = ["-S", "train.loss=poisson,kl_divergence", "-S", "train.optimizer.name=adam"]
    proc = run([PYTHON, "-m", "commands.sweep", *grid, "--jobs", "2"], repo)
    queued = sorted(line.split("'")[1] for line in proc.stdout.splitlines() if line.startswith("Queued experiment"))
    folder = repo / "reports/sweeps/loss=poisson+kl_divergence_optimizer.name=adam"
    assert len(queued) == 2 and rows(folder / "compare.md") == queued, proc.stdout
    assert (folder / "compare.png").read_bytes()[:4] == b"\x89PNG"
    assert "error" not in proc.stderr and f"all 2 experiments finished -> {folder.relative_to(repo)}" in proc.stdout
    assert not (repo / "reports/compare.md").exists()  # the published grid's report is not this one's
    assert "  2 of 2 ended after " in proc.stdout  # a line as each one ends


def test_make_sweep_publishes_only_the_default_grid() -> None:
    default = run(["make", "-n", "sweep"], ROOT).stdout
    own = run(["make", "-n", "sweep", "LOSSES=poisson", "OPTIMIZERS=adam"], ROOT).stdout
    assert "--out reports --readme docs/sweep.md" in default
    assert "commands.sweep" in own and "--out" not in own and "--readme" not in own


def test_a_folder_dvc_cannot_encode_ends_the_sweep_and_the_study_at_once(tmp_path: Path) -> None:
    """DVC 3.67 fails every --temp or queued run in setup when its cache path is not ASCII, and its
    `--run-all` then waits forever: both commands say so before queueing anything."""
    repo = tmp_path / "lab-ü"
    dvc_project(repo)
    for command in (["commands.sweep", "-S", "train.epochs=1,2"], ["commands.study", "--lrs", "0.01", "--seeds", "1"]):
        proc = run([PYTHON, "-m", *command], repo, check=False, timeout=120)
        line = proc.stderr.strip().splitlines()[-1]
        assert proc.returncode == 2 and line.startswith("error: DVC cannot run experiments outside the workspace")
        assert f"its cache folder {repo}/.dvc/cache has non-ASCII letters" in line
        assert "dvc cache dir --local" in line and "Traceback" not in proc.stderr
    assert "Queued" not in run(["dvc", "queue", "status"], repo).stdout


def test_workers_that_die_or_a_ctrl_c_end_the_sweep_with_one_line_and_a_clean_queue(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    dvc_project(repo)

    def workers() -> list[psutil.Process]:
        found = []
        for proc in psutil.process_iter(["cmdline", "cwd"]):
            if "queue-worker" in " ".join(proc.info["cmdline"] or []) and proc.info["cwd"] == str(repo):
                found.append(proc)
        return found

    def sweep(seeds: str, stop: Callable[[subprocess.Popen[str]], None]) -> tuple[int, str]:
        grid = ["-S", "train.epochs=30", "-S", f"train.seed={seeds}"]  # long enough to be stopped mid-run
        command = [PYTHON, "-m", "commands.sweep", *grid, "--jobs", "2"]
        proc = subprocess.Popen(command, cwd=repo, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_for(workers, 120, "DVC's queue workers")
            stop(proc)
            _, err = proc.communicate(timeout=300)
        finally:
            proc.kill()
        assert "Traceback" not in err
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
