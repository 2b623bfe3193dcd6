"""The study on PostgreSQL, for real: a server started here (Debian's `postgresql`, on 127.0.0.1, in a
temporary folder), two workers on one study started together, one killed mid-run (SIGKILL). Every
run of the plan is done exactly once (the dead worker's run retried, not lost) and the report is
complete, also when another clone builds it from the storage alone. Skips, saying why, only where
the server cannot start."""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from commands import study_protocol as sp
from tests.harness import ENV, dvc_project, free_ports, run, wait_for
from tests.test_study import by_experiment, exp_names

PYTHON = sys.executable


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    """A throwaway PostgreSQL server; its URL."""
    bins = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    if not bins:
        pytest.skip("PostgreSQL is not installed (Debian: apt-get install postgresql; .ci/run installs it)")
    bin_dir = bins[-1].parent
    as_pg: list[str] = []
    base = Path(tempfile.mkdtemp(prefix="study-pg-"))
    if os.geteuid() == 0:  # initdb refuses root: run the server as the package's `postgres` user
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no `postgres` user to run the server as")
        os.chown(base, user.pw_uid, user.pw_gid)
        as_pg = ["runuser", "-u", "postgres", "--"]
    data, log = base / "data", base / "server.log"
    init = subprocess.run([*as_pg, bin_dir / "initdb", "-D", data, "-A", "trust", "-U", "postgres", "--no-sync"],
                          capture_output=True, text=True, check=False)  # fmt: skip
    if init.returncode:
        shutil.rmtree(base, ignore_errors=True)
        pytest.skip(f"initdb failed: {init.stderr.strip()[-300:]}")
    port = free_ports()[0]
    options = f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off"
    pg_ctl = [*as_pg, bin_dir / "pg_ctl", "-D", data]
    start = subprocess.run([*pg_ctl, "-l", log, "-w", "-t", "60", "-o", options, "start"], capture_output=True,
                           text=True, check=False)  # fmt: skip
    if start.returncode:
        reason = log.read_text()[-300:] if log.exists() else start.stderr
        shutil.rmtree(base, ignore_errors=True)
        pytest.skip(f"the PostgreSQL server did not start: {reason.strip()}")
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*pg_ctl, "-m", "immediate", "stop"], capture_output=True, check=False)
        shutil.rmtree(base, ignore_errors=True)


def dvc_runs_named(name: str) -> list[int]:
    """Processes whose command line is a `dvc exp run` of that experiment."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if proc.name.isdigit() and b"exp" in argv and name.encode() in argv:
            pids.append(int(proc.name))
    return pids


@pytest.mark.slow(minutes=2)
def test_two_workers_one_killed_every_run_done_once(tmp_path: Path, postgres: str) -> None:
    repo = tmp_path / "repo"
    dvc_project(repo)
    args = [PYTHON, "-m", "commands.study", "--storage", postgres, "--study-name", "pg", "--optimizers", "adam",
            "--losses", "sparse_categorical_crossentropy", "--lrs", "0.001,0.01", "--seeds", "2", "--epochs", "1",
            "--diagnostics", "none", "--heartbeat", "1", "--grace", "4", "--poll", "0.3"]  # fmt: skip
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    workers = [
        subprocess.Popen(args, cwd=repo, env=ENV, stdout=open(log, "w", encoding="utf-8"), stderr=subprocess.STDOUT)  # noqa: SIM115
        for log in logs
    ]
    try:
        try:
            started = wait_for(lambda: re.search(r"trial \d+: (\S+) \.\.\.", logs[0].read_text()), 180, "a run on A")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nA:\n{logs[0].read_text()}\nB:\n{logs[1].read_text()}") from None
        killed = started.group(1)
        time.sleep(0.5)
        workers[0].send_signal(signal.SIGKILL)  # mid-run: its dvc has started
        workers[0].wait()
        workers[1].wait(timeout=600)
    finally:
        for w in workers:
            w.kill()
    out_b = logs[1].read_text()
    assert workers[1].returncode == 0, out_b
    wait_for(lambda: not dvc_runs_named(killed), 30, "the killed worker's dvc to stop")

    assert (repo / "reports/studies/pg/study.md").exists() and not (repo / "reports/study.md").exists()  # its own
    trials = optuna.load_study(study_name="pg", storage=postgres).get_trials()
    runs = by_experiment(trials)  # (Optuna's new trials for a worker that found no run waiting: pruned, aside)
    assert len(runs) == 3  # 2 learning rates, then the best one's second seed
    for name, ts in runs.items():  # exactly once each
        assert [t.state for t in ts].count(TrialState.COMPLETE) == 1, (name, [(t.number, t.state) for t in ts])
    dead = [t for t in trials if t.state == TrialState.FAIL]
    assert [t.user_attrs.get("experiment") for t in dead] == [killed]
    retried = [t for t in trials if t.system_attrs.get("failed_trial") == dead[0].number]
    assert [t.state for t in retried] == [TrialState.COMPLETE] and f"{killed}: validation" in out_b

    report = json.loads((repo / "reports/studies/pg/study.json").read_text(encoding="utf-8"))
    assert report["runs"]["done"] == report["runs"]["planned"] == 3 and report["failed"] == []
    (config,) = report["configs"]
    assert config["seeds"] == [42, 43] and config["test_accuracy"]["n"] == 2  # (no interval from 2 seeds)
    names = exp_names(repo)
    assert killed in names and len(names) == len(set(names)) == 3
    tuned = {e["learning_rate"]: e["validation_accuracy"] for e in config["learning_rates"]}
    best = max(sorted(tuned), key=tuned.__getitem__)  # the better real run's rate (a tie: the smaller)
    assert config["best_learning_rate"] == best and f"pg-scce-adam-lr{sp.lr_text(best)}-s43" in names, tuned

    other = tmp_path / "other"  # another clone: the report from the storage alone
    dvc_project(other)
    run([PYTHON, "-m", "commands.study", "--storage", postgres, "--study-name", "pg", "--report-only"], other)
    rebuilt = json.loads((other / "reports/studies/pg/study.json").read_text(encoding="utf-8"))
    assert rebuilt["configs"] == report["configs"]
