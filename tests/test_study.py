"""The study: its protocol and workers in-process (fast), then `python -m commands.study` for real on a
small grid (2 configurations, 2 learning rates, 2 seeds, 1 epoch) in a git + DVC copy of the project."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from optuna.trial import TrialState

from commands import study_protocol as sp
from commands import study_worker as sw
from pipeline import atomic
from tests.harness import ENV, ROOT, dvc_project, run, write_params

PYTHON = sys.executable
SMALL = [
    "--optimizers", "adam,sgd", "--losses", "sparse_categorical_crossentropy", "--lrs", "0.001,0.01",
    "--seeds", "2", "--epochs", "1", "--diagnostics", "none", "--poll", "0.5",
]  # fmt: skip


def done(record: dict) -> sp.KeyState:
    return sp.KeyState(done={"outcome": "ok", **record})


def test_the_plan_puts_dependencies_first_and_resolves_only_when_they_are_done() -> None:
    design = sp.Design(optimizers=("adam", "sgd"), losses=("sparse_categorical_crossentropy", "poisson"),
                       lrs=(0.01, 0.1), seeds=(42, 43), diagnostics=())  # fmt: skip
    slots = sp.plan(design)
    keys = [s.key for s in slots]
    assert len(keys) == len(set(keys)) == 3 * (2 + 1)  # adam, sgd, then poisson + best: 2 lrs + 1 more seed each
    for i, slot in enumerate(slots):  # every tuning run a slot depends on is planned before it
        if slot.kind == "seed":
            assert all(keys.index(sp.Slot("tune", slot.loss, slot.optimizer, lr, 42).key) < i for lr in design.lrs)
    seed_adam = sp.Slot("seed", "sparse_categorical_crossentropy", "adam", None, 43)
    queued = {key: sp.KeyState(waiting=[i]) for i, key in enumerate(keys)}
    assert sp.resolve(seed_adam, design, queued).status == "wait"
    assert sp.resolve(seed_adam, design, {}).status == "blocked"  # what it needs was never queued
    states = {
        **queued,
        sp.Slot("tune", "sparse_categorical_crossentropy", "adam", 0.01, 42).key: done({"val_accuracy": 0.93}),
        sp.Slot("tune", "sparse_categorical_crossentropy", "adam", 0.1, 42).key: done({"val_accuracy": 0.93}),
        sp.Slot("tune", "sparse_categorical_crossentropy", "sgd", 0.01, 42).key: done({"val_accuracy": 0.80}),
        sp.Slot("tune", "sparse_categorical_crossentropy", "sgd", 0.1, 42).key: sp.KeyState(
            done={"outcome": "diverged"}
        ),
    }
    assert sp.resolve(seed_adam, design, states).spec.lr == 0.01  # a tie goes to the smaller rate
    stage2 = sp.Slot("tune", "poisson", sp.BEST, 0.1, 42)
    assert sp.resolve(stage2, design, states).status == "wait"  # stage 1's seeds are not done yet
    states[seed_adam.key] = done({"val_accuracy": 0.80})
    states[sp.Slot("seed", "sparse_categorical_crossentropy", "sgd", None, 43).key] = done({"val_accuracy": 0.95})
    # by the mean validation accuracy over the seeds at the best rate: sgd (0.80, 0.95) over adam (0.93, 0.80)
    assert sp.resolve(stage2, design, states).spec == sp.Spec("poisson", "sgd", 0.1, 42, False)
    failed = sp.KeyState(failed=[(0.0, "boom", 7)])
    states[sp.Slot("tune", "sparse_categorical_crossentropy", "sgd", 0.1, 42).key] = failed
    assert sp.resolve(stage2, design, states).status == "blocked"


def test_every_learning_rate_diverged_skips_the_seeds() -> None:
    design = sp.Design(optimizers=("adam",), losses=("sparse_categorical_crossentropy",), lrs=(1.0,),
                       seeds=(42, 43), diagnostics=())  # fmt: skip
    states = {sp.Slot("tune", *design.baseline, 1.0, 42).key: sp.KeyState(done={"outcome": "diverged"})}
    res = sp.resolve(sp.Slot("seed", *design.baseline, None, 43), design, states)
    assert res.status == "skip" and "diverged" in res.reason


def test_workers_that_race_run_each_slot_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three workers on one SQLite study whose plan was enqueued twice (two creators racing): every
    slot is run exactly once, the copies are dropped as duplicates. The runs themselves are faked."""
    design = sp.Design(optimizers=("adam", "sgd"), losses=("sparse_categorical_crossentropy", "poisson"),
                       lrs=(0.01, 0.1), seeds=(42, 43), diagnostics=())  # fmt: skip
    runs: list[str] = []

    def fake_run(spec: sp.Spec, name: str, *args: object) -> dict:
        runs.append(name)
        time.sleep(0.02)
        val = 0.9 + spec.lr / 10 + (spec.optimizer == "sgd") / 100
        return {"outcome": "ok", "val_accuracy": val, "test_accuracy": val, "val_curve": [val], "run_s": 0.02}

    monkeypatch.setattr(sw, "run_experiment", fake_run)
    monkeypatch.setattr(sw, "gradients_supported", lambda: False)
    url = f"sqlite:///{tmp_path}/study.db"
    lock = sw.StorageLock(url)
    study = sw.join_study(sw.open_storage(url, 1, 5), "race", design, lock)
    for slot in sp.plan(design):  # a second creator's copies
        study.enqueue_trial({}, user_attrs=sw.slot_attrs(slot))
    workers = [
        sw.Worker(study, design, lock, prefix="race", label=f"w{i}", push=None, poll_s=0.05, started=time.time())
        for i in range(3)
    ]
    threads = [threading.Thread(target=w.run) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    trials = study.get_trials()
    by_slot: dict[str, list] = {}
    for t in trials:
        by_slot.setdefault(t.user_attrs["slot"], []).append(t)
    assert sorted(by_slot) == sorted(s.key for s in sp.plan(design))
    for key, ts in by_slot.items():
        assert [t.state for t in ts].count(TrialState.COMPLETE) == 1, key
        assert all(t.user_attrs.get("outcome") == "duplicate" for t in ts if t.state != TrialState.COMPLETE), key
    assert len(runs) == len(set(runs)) == len(by_slot)
    assert any("poisson-sgd" in name for name in runs)  # stage 2 took stage 1's best optimizer


def test_a_learning_rate_is_written_as_people_write_it_and_yaml_reads_it_back() -> None:
    spec = sp.Spec("sparse_categorical_crossentropy", "sgd", 1e30, 42, False)
    assert spec.experiment("study", "tune") == "study-scce-sgd-lr1.0e+30-s42"  # not lr1000000000000000000000000000000
    for lr, text in [(0.0001, "0.0001"), (1e-5, "0.00001"), (1, "1"), (1e30, "1.0e+30"), (1.5e-9, "1.5e-09")]:
        assert sp.lr_text(lr) == text and float(yaml.safe_load(text)) == lr  # YAML 1.1 (PyYAML) reads a float


LATIN1_REPORT = """
import sys
from pathlib import Path
from commands import study_protocol as sp, study_report
design = sp.Design(optimizers=("adam", "sgd"), losses=("sparse_categorical_crossentropy",), lrs=(0.01,),
                   seeds=(42, 43, 44), diagnostics=())
states = {}
for i, slot in enumerate(sp.plan(design)):
    acc = 0.9 + 0.01 * i
    record = {"outcome": "ok", "val_accuracy": acc, "test_accuracy": acc, "test_log_loss": 0.3, "val_curve": [acc],
              "experiment": f"e{i}", "run_s": 1.0, "read_s": 0.1, "optimizer": slot.optimizer, "loss": slot.loss,
              "learning_rate": 0.01, "seed": slot.seed}
    states[slot.key] = sp.KeyState(done={"outcome": "diverged"} if slot.optimizer == "sgd" else record)
study_report.write(design, states, "study", Path(sys.argv[1]))
"""


def test_reports_are_utf8_and_whole_under_a_latin1_locale(tmp_path: Path) -> None:
    """An older server's ISO-8859-1 locale: the report's "—" (sgd diverged: no best rate) once ended the
    study in a UnicodeEncodeError with study.md left at 0 bytes."""
    if shutil.which("localedef") is None:
        pytest.skip("no localedef here to build an ISO-8859-1 locale")
    subprocess.run(["localedef", "-i", "en_US", "-f", "ISO-8859-1", tmp_path / "en_US.ISO-8859-1"], check=True)
    env = {**ENV, "LOCPATH": str(tmp_path), "LC_ALL": "en_US.ISO-8859-1", "PYTHONUTF8": "0"}
    probe = [PYTHON, "-c", "import locale; print(locale.getpreferredencoding())"]
    assert subprocess.run(probe, env=env, capture_output=True, text=True, check=True).stdout.strip() == "ISO-8859-1"
    out = tmp_path / "reports"
    subprocess.run([PYTHON, "-c", LATIN1_REPORT, str(out)], cwd=ROOT, env=env, check=True)
    assert "| sparse_categorical_crossentropy | sgd | — |" in (out / "study.md").read_text(encoding="utf-8")

    before = (out / "study.md").read_bytes()  # a write that fails keeps the previous file whole
    with pytest.raises(UnicodeEncodeError):
        atomic.write_text(out / "study.md", "a lone surrogate \udce9 is not UTF-8")
    assert (out / "study.md").read_bytes() == before and sorted(p.name for p in out.iterdir() if "tmp" in p.name) == []


def study_json(repo: Path) -> dict:
    return json.loads((repo / "reports/study.json").read_text())


def exp_names(repo: Path) -> list[str]:
    return sorted(run(["dvc", "exp", "list", "--name-only"], repo).stdout.split())


@pytest.mark.slow(minutes=3)
def test_a_small_study_end_to_end_then_a_rerun_runs_nothing(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    dvc_project(repo)  # trained at 1 epoch: the baseline's first run comes from DVC's run-cache
    proc = run([PYTHON, "-m", "commands.study", *SMALL, "--workers", "2"], repo, timeout=900)
    assert "ran 6 experiments" in proc.stdout, proc.stdout
    report = study_json(repo)
    assert report["runs"]["planned"] == report["runs"]["done"] == 6 and report["failed"] == []
    configs = {c["optimizer"]: c for c in report["configs"]}
    assert sorted(configs) == ["adam", "sgd"] and configs["adam"]["baseline"]
    for c in configs.values():
        acc = c["test_accuracy"]
        assert c["seeds"] == [42, 43] and c["best_learning_rate"] in (0.001, 0.01)
        assert acc["ci95"][0] <= acc["mean"] <= acc["ci95"][1] and 0.1 < acc["mean"] <= 1
        assert [e["outcome"] for e in c["learning_rates"]] == ["ok", "ok"]
        assert c["epochs_to_baseline_validation"]["target"] is not None
    assert configs["adam"]["difference_to_baseline"]["mean"] == 0.0
    diff = configs["sgd"]["difference_to_baseline"]
    assert diff["n"] == 2 and diff["mean"] == pytest.approx(
        sum(configs["sgd"]["test_accuracy"]["values"]) / 2 - sum(configs["adam"]["test_accuracy"]["values"]) / 2
    )
    md = (repo / "reports/study.md").read_text()
    assert "| sparse_categorical_crossentropy | sgd |" in md and "(baseline)" in md
    for png in ("study_lr_sensitivity.png", "study_performance.png"):
        assert (repo / "reports" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    names = exp_names(repo)  # every run is a DVC experiment, named for what it is
    assert len(names) == 6 and "study-scce-adam-lr0.001-s42" in names
    best = configs["sgd"]
    name = f"study-scce-sgd-lr{sp.lr_text(best['best_learning_rate'])}-s43"
    assert name in best["experiments"]
    run(["dvc", "exp", "apply", name], repo)  # restores its model and metrics
    applied = json.loads((repo / "metrics/eval.json").read_text())["test"]["accuracy"]
    assert applied == best["test_accuracy"]["values"][1]
    run(["git", "checkout", "-q", "--", "."], repo)

    again = run([PYTHON, "-m", "commands.study", *SMALL, "--workers", "2"], repo)
    assert "ran 0 experiments" in again.stdout and exp_names(repo) == names
    assert study_json(repo)["configs"] == report["configs"]


@pytest.mark.slow(minutes=1)
def test_a_failed_run_is_named_with_where_to_see_why(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    dvc_project(repo)
    write_params(repo, {"train": {"epochs": 1, "batch_size": 5000}})  # valid, and refused by check: 4,000 digits
    run(["git", "commit", "-qam", "a batch larger than the training set"], repo)
    args = ["--optimizers", "adam", "--losses", "sparse_categorical_crossentropy", "--lrs", "0.001", "--seeds", "1",
            "--epochs", "1", "--diagnostics", "none", "--study-name", "bad"]  # fmt: skip
    proc = run([PYTHON, "-m", "commands.study", *args], repo, check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    log = ".dvc/tmp/study/logs/bad-scce-adam-lr0.001-s42.log"
    assert line.startswith("error: 1 of 1 runs failed") and f"cat {log}" in line, line
    assert "train.batch_size" in (repo / log).read_text()
    bad = run([PYTHON, "-m", "commands.study", "--losses", "nope"], repo, check=False)
    assert bad.returncode == 2 and "unknown loss nope" in bad.stderr
