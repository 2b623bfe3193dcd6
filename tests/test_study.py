"""The study: its protocol and workers in-process (fast), then `python -m commands.study` for real on a
small grid (2 configurations, 2 learning rates, 2 seeds, 1 epoch) in a git + DVC copy of the project."""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from commands import study_protocol as sp
from commands import study_report
from commands import study_worker as sw
from pipeline import atomic
from pipeline.errors import StageError
from tests.harness import ENV, ROOT, dvc_project, run, write_params

PYTHON = sys.executable
SMALL = [
    "--optimizers", "adam,sgd", "--losses", "sparse_categorical_crossentropy", "--lrs", "0.001",
    "--seeds", "2", "--epochs", "1", "--study-name", "small", "--poll", "0.5",
]  # fmt: skip


def ok(val: float) -> dict:
    return {"outcome": "ok", "val_accuracy": val}


SCCE = "sparse_categorical_crossentropy"
DESIGN = sp.Design(optimizers=("adam", "sgd"), losses=(SCCE, "poisson"), lrs=(0.01, 0.1), seeds=(42, 43),
                   diagnostics=())  # fmt: skip


def test_each_phase_is_chosen_by_the_runs_before_it() -> None:
    phase, tune = sp.next_phase(DESIGN, {})
    assert phase == "tune" and tune == [sp.Run("tune", SCCE, o, lr, 42) for o in ("adam", "sgd") for lr in (0.01, 0.1)]
    assert sp.planned(DESIGN, {}) == (tune, 2 + 2 + 1)  # then 1 more seed each, poisson's 2 rates and 1 more seed
    done = dict(zip(tune, [ok(0.93), ok(0.93), {"outcome": "diverged"}, ok(0.80)], strict=True))
    phase, seeds = sp.next_phase(DESIGN, done)  # a tie goes to the smaller rate; a diverged rate is not chosen
    assert phase == "seeds" and seeds == [sp.Run("seed", SCCE, "adam", 0.01, 43), sp.Run("seed", SCCE, "sgd", 0.1, 43)]
    assert sp.best_optimizer(DESIGN, done) == sp.BEST  # stage 1 is not done
    done |= {seeds[0]: ok(0.80), seeds[1]: ok(0.95)}
    # by the mean validation accuracy over the seeds at the best rate: sgd (0.80, 0.95) over adam (0.93, 0.80)
    assert sp.best_optimizer(DESIGN, done) == "sgd"
    phase, tune2 = sp.next_phase(DESIGN, done)
    assert phase == "tune-2" and tune2 == [sp.Run("tune", "poisson", "sgd", lr, 42) for lr in (0.01, 0.1)]
    done |= {tune2[0]: ok(0.9), tune2[1]: ok(0.91)}
    assert sp.next_phase(DESIGN, done) == ("seeds-2", [sp.Run("seed", "poisson", "sgd", 0.1, 43)])
    done[sp.Run("seed", "poisson", "sgd", 0.1, 43)] = ok(0.9)
    assert sp.next_phase(DESIGN, done) is None and len(sp.planned(DESIGN, done)[0]) == 9


def test_every_learning_rate_diverged_skips_the_seeds_and_stage_2() -> None:
    design = dataclasses.replace(DESIGN, optimizers=("adam",), lrs=(1.0,))
    done = {sp.Run("tune", SCCE, "adam", 1.0, 42): {"outcome": "diverged"}}
    assert sp.runs_of(design, "seeds", done) == [] and sp.best_optimizer(design, done) is None
    assert sp.next_phase(design, done) is None and sp.planned(design, done) == (list(done), 0)


def test_a_setting_of_the_users_goes_to_every_run_and_the_studys_own_keys_are_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`-S KEY=VALUE` (e.g. a local MNIST mirror's data.url) reaches every run's `dvc exp run -S`; a key the study
    sets itself would be overridden or override it, so it is refused in one line."""
    from commands import study

    url = "data.url=file:///m/mnist.npz"
    monkeypatch.setattr(
        sys, "argv", ["study", "--study-name", "m", "--source", "mnist", "-S", url, "-S", "data.sha256=" + "0" * 64]
    )
    design = study.design_from(study.parse_args(), "code")
    run = sp.Run("tune", SCCE, "adam", 0.001, 42)
    wanted = sw.settings(run, design, gradients=False)
    assert wanted["data.url"] == "file:///m/mnist.npz" and wanted["data.sha256"] == "0" * 64
    assert wanted["data.source"] == "mnist" and wanted["train.loss"] == SCCE
    assert sp.Design.from_dict(json.loads(json.dumps(design.as_dict()))) == design  # as stored with the study
    for bad in ("train.seed=1", "nokey"):
        proc = subprocess.run(
            [PYTHON, "-m", "commands.study", "-S", bad], cwd=ROOT, capture_output=True, text=True, check=False
        )
        assert proc.returncode == 2 and "-S/--set-param" in proc.stderr.splitlines()[-1], proc.stderr


def test_diagnostics_run_only_when_asked_and_a_design_stored_before_still_loads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """By default a diagnostic case runs only if the study holds its loss and its optimizer; the design stores the
    list it resolved to. A design stored by the code before (the four cases explicit) loads and reports."""
    from commands import study

    def diagnostics(*argv: str) -> tuple:
        monkeypatch.setattr(sys, "argv", ["study", "--study-name", "d", *argv])
        return study.design_from(study.parse_args(), "code").diagnostics

    assert diagnostics() == sp.DEFAULT_DIAGNOSTICS  # the full default study: all four
    assert diagnostics("--losses", SCCE, "--optimizers", "adam,sgd") == ()
    mse = ("mean_squared_error", "adam", 0.001)
    assert diagnostics("--losses", f"{SCCE},mean_squared_error", "--optimizers", "adam,rmsprop") == (mse,)
    assert diagnostics("--diagnostics", "none") == ()
    assert diagnostics("--losses", SCCE, "--diagnostics", "mean_squared_error:sgd:0.01") == ((*mse[:1], "sgd", 0.01),)
    stored = {"optimizers": ["adam"], "losses": [SCCE], "lrs": [0.001], "seeds": [42, 43], "epochs": 1,
              "source": None, "settings": [["data.url", "file:///m.npz"]], "grid": False, "baseline": [SCCE, "adam"],
              "diagnostics": [list(d) for d in sp.DEFAULT_DIAGNOSTICS], "code": "abc"}  # fmt: skip
    for raw in (stored, {k: v for k, v in stored.items() if k != "settings"}):  # and before -S
        design = sp.Design.from_dict(json.loads(json.dumps(raw)))
        assert design.diagnostics == sp.DEFAULT_DIAGNOSTICS and design.lrs == (0.001,)
        report = study_report.summarize(design, {}, [], "old")
        assert report["runs"]["planned"] == 1 + 4 + 1 and report["data"]["url"] == dict(design.settings).get("data.url")


def fake_study(design: sp.Design, record: Callable[[sp.Run], dict]) -> dict[sp.Run, dict]:
    """Every run of the design done, phase by phase: each run's record is `record(run)`."""
    done: dict[sp.Run, dict] = {}
    while pending := sp.next_phase(design, done):
        done |= {run: {"experiment": run.experiment("t"), "run_s": 10.0, **record(run)} for run in pending[1]}
    return done


# validation accuracy of each tuning run (scce; other losses: 0.01 less); seeds add 0.001 each, the test set 0.003
VAL = {"adam": {0.001: 0.90, 0.01: 0.96, 0.1: None}, "sgd": {0.001: 0.15, 0.01: 0.93, 0.1: 0.94}}


def fake_record(run: sp.Run, n_test: int | None = 1000, mse: float = 0.953) -> dict:
    val = VAL[run.optimizer][run.learning_rate]
    if val is None:
        return {"outcome": "diverged"}
    val += (run.seed - 42) / 1000 - (run.loss != SCCE) / 100
    test = mse if run.loss == "mean_squared_error" else val + 0.003 * (run.seed % 2)
    layers = {f"{kind}/{layer}": [0.5, 0.1] for kind in ("grad_norm", "update_ratio") for layer in ("dense", "dense_1")}
    return {"outcome": "ok", "val_accuracy": val, "test_accuracy": test, "val_curve": [val - 0.05, val],
            "n_test": n_test, **({"gradients": layers} if run.kind == "diag" else {})}  # fmt: skip


def test_the_report_gives_honest_intervals_and_holds_the_study_against_published_results(tmp_path: Path) -> None:
    """Schmidt et al. 2021 (defaults of several against one tuned), the tutorial's binary_crossentropy, LeCun et
    al. 1998's MSE net: each verdict from the numbers; the test set's Wilson interval beside the seeds'."""
    losses = (SCCE, "binary_crossentropy", "mean_squared_error")
    design = sp.Design(optimizers=("adam", "sgd"), losses=losses, lrs=(0.001, 0.01, 0.1), seeds=(42, 43, 44),
                       epochs=1, diagnostics=(("binary_crossentropy", "sgd", 0.001),))  # fmt: skip
    assert study_report.plan(design, {}, 2).startswith("plan: 21 runs (if none diverges), 0 done already; the time")
    done = fake_study(design, fake_record)
    assert len(done) == 21 and study_report.plan(design, done, 2).endswith("21 done already; nothing left to run")
    half = {r: v for i, (r, v) in enumerate(done.items()) if i < 11}
    assert study_report.plan(design, half, 2).endswith("about 1 minute left, 2 workers, 10 s a run")
    assert study_report.plan(design, half, 20).endswith("under a minute left, 20 workers, 10 s a run")
    report = study_report.write(design, done, [], "t", tmp_path)
    schmidt, tutorial, lecun = (report["published"][k] for k in ("schmidt_2021", "tutorial", "lecun_1998"))
    # at Keras' defaults (adam 0.001, sgd 0.01) validation picks sgd: test 0.93 against adam tuned at 0.01: 0.96
    assert (schmidt["defaults"]["optimizer"], schmidt["defaults"]["learning_rate"], schmidt["tuned"]["learning_rate"]) \
        == ("sgd", 0.01, 0.01) and schmidt["difference_points"] == pytest.approx(-3.0)  # fmt: skip
    assert schmidt["agrees"] is False and "this study does not agree" in schmidt["says"]
    assert tutorial["optimizer"] == "adam" and tutorial["says"].endswith(
        "sparse_categorical_crossentropy + adam, paired by seed: -1.00 points [-1.00, -1.00], worse."
    )
    assert not lecun["comparable"] and "not comparable, the study ran on `mnist_sample`" in lecun["says"]
    for c in report["configs"]:
        low, high = c["test_accuracy"]["ci95"]
        assert 0 <= low <= c["test_accuracy"]["mean"] <= high <= 1 and c["test_set_wilson95"]["n_test"] == 1000
    md = (tmp_path / "study.md").read_text()
    assert "1 epoch each, data `mnist_sample` (params.yaml at HEAD)" in md and "too few seeds" not in md
    assert "## Held against published results" in md and "| hidden (`dense`) |" in md and "| output (`dense_1`) |" in md
    pngs = sorted([study_report.PLOT_LR, study_report.PLOT_PERF, study_report.PLOT_GRAD])
    assert sorted(p.name for p in tmp_path.glob("*.png")) == pngs

    whole = dataclasses.replace(design, source="mnist", seeds=(42, 43))
    for mse, verdict in [(0.953, "lies within it: in agreement"), (0.96, "lies above it: this net makes fewer errors")]:
        done = fake_study(whole, functools.partial(fake_record, n_test=10_000, mse=mse))
        lecun = study_report.summarize(whole, done, [], "t")["published"]["lecun_1998"]
        assert lecun["comparable"] and verdict in lecun["says"]
    old = study_report.summarize(whole, fake_study(whole, functools.partial(fake_record, n_test=None)), [], "t")
    assert old["published"]["schmidt_2021"]["agrees"] is None and "no verdict" in old["published"]["lecun_1998"]["says"]
    assert all(c["test_set_wilson95"] is None for c in old["configs"])
    md = study_report.markdown(old, [])
    assert "| 2 | 0.9620 (n=2: too few seeds for an interval) | — | 0 |" in md and "**n=2: too few seeds" in md


def test_records_of_an_older_storage_take_the_test_sets_size_from_the_others() -> None:
    """A storage whose first runs predate n_test: those records take it from the later ones (one test set)."""
    old, new, diverged = (sp.Run("tune", SCCE, "adam", lr, 42) for lr in (0.01, 0.1, 1.0))
    done = {old: ok(0.9), new: {**ok(0.9), "n_test": 1000}, diverged: {"outcome": "diverged"}}
    sw.fill_n_test(done)
    assert done[old]["n_test"] == done[new]["n_test"] == 1000 and "n_test" not in done[diverged]


def fake_runs(monkeypatch: pytest.MonkeyPatch, fail_once: str = "") -> list[str]:
    """run_experiment faked: a record in 20 ms (`fail_once`: that experiment fails its first time)."""
    runs: list[str] = []

    def fake_run(run: sp.Run, name: str, *args: object) -> dict:
        runs.append(name)
        time.sleep(0.02)
        if name == fail_once and runs.count(name) == 1:
            raise sw.TrialFailed("boom")
        val = 0.9 + run.learning_rate / 10 + (run.optimizer == "sgd") / 100
        return {"outcome": "ok", "val_accuracy": val, "test_accuracy": val, "val_curve": [val], "run_s": 0.02}

    monkeypatch.setattr(sw, "run_experiment", fake_run)
    return runs


def start(url: str, name: str, workers: int, *, grace: int = 5) -> None:
    """`workers` worker processes, played by threads with a storage (a database connection) each, started together."""
    joined = threading.Barrier(workers)

    def worker(i: int) -> int:
        storage = sw.open_storage(url, 1, grace)
        sw.join_study(storage, name, DESIGN, grace)
        joined.wait()
        return sw.work(storage, name, DESIGN, label=f"w{i}", push=None, poll_s=0.05, grace_s=grace)

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(worker, range(workers)))


def by_experiment(trials: list) -> dict[str, list]:
    runs: dict[str, list] = {}
    for t in trials:
        if "experiment" in t.user_attrs:
            runs.setdefault(t.user_attrs["experiment"], []).append(t)
        else:  # Optuna's new trial for a worker that lost the race for the last waiting run: pruned at once
            assert t.state == TrialState.PRUNED and not t.params, t
    return runs


def test_workers_that_race_run_each_run_once_and_a_rerun_retries_the_failed_one_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three workers on one SQLite study, started together twice: the first time one run fails, the second
    time it alone is run again. The runs themselves are faked."""
    failing = "race-scce-sgd-lr0.1-s42"
    runs = fake_runs(monkeypatch, fail_once=failing)
    url = f"sqlite:///{tmp_path}/study.db"
    start(url, "race", 3)
    trials = optuna.load_study(study_name="race", storage=url).get_trials()
    assert [t.user_attrs["experiment"] for t in trials if t.state == TrialState.FAIL] == [failing]
    assert len(runs) == len(set(runs)) == 4  # stage 1's tuning runs; the seeds wait for all of them
    start(url, "race", 3)
    trials = optuna.load_study(study_name="race", storage=url).get_trials()
    planned = {run.experiment("race") for run in sp.planned(DESIGN, sw.collect(trials)[0])[0]}
    assert sorted(by_experiment(trials)) == sorted(planned) and len(planned) == 9
    for name, ts in by_experiment(trials).items():
        assert [t.state for t in ts] == ([TrialState.FAIL] if name == failing else []) + [TrialState.COMPLETE]
    assert sorted(runs) == sorted([*planned, failing])  # each run once, the failed one twice
    assert "race-poisson-sgd-lr0.1-s43" in runs  # stage 2 took stage 1's best optimizer


def test_a_dead_workers_run_goes_stale_and_another_runs_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker that took a run and died (no heartbeat since): after the grace period Optuna fails its
    trial, enqueues it again, and a live worker runs it, once."""
    runs = fake_runs(monkeypatch)
    url = f"sqlite:///{tmp_path}/study.db"
    storage = sw.open_storage(url, 1, 2)
    study = sw.join_study(storage, "dead", DESIGN, 2)
    sw.once(storage, "dead:tune", functools.partial(sw.enqueue, study, sp.runs_of(DESIGN, "tune", {}), "dead"), 2)
    dead = study.ask()  # the dead worker's: taken, one heartbeat, and no more
    storage.record_heartbeat(dead._trial_id)
    start(url, "dead", 2, grace=2)
    trials = study.get_trials()
    (failed,) = [t for t in trials if t.state == TrialState.FAIL]
    assert failed.number == dead.number and failed.user_attrs["experiment"] == "dead-scce-adam-lr0.01-s42"
    retried = [t for t in trials if t.system_attrs.get("failed_trial") == dead.number]
    assert [t.state for t in retried] == [TrialState.COMPLETE]
    assert len(runs) == len(set(runs)) == 9 and all(len(ts) <= 2 for ts in by_experiment(trials).values())


def test_a_phase_is_enqueued_once_by_processes_that_reach_it_together_or_after_one_died(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/study.db"
    optuna.create_study(storage=sw.open_storage(url, 1, 1), study_name="q")
    runs = sp.runs_of(DESIGN, "tune", {})
    together = threading.Barrier(4)

    def process(_: int) -> None:
        storage = sw.open_storage(url, 1, 1)
        study = optuna.load_study(study_name="q", storage=storage)
        together.wait()
        sw.once(storage, "q:tune", functools.partial(sw.enqueue, study, runs, "q"), 5)

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(process, range(4)))
    storage = sw.open_storage(url, 1, 1)
    study = optuna.load_study(study_name="q", storage=storage)
    assert [t.user_attrs["experiment"] for t in study.get_trials()] == [r.experiment("q") for r in runs]

    optuna.create_study(storage=storage, study_name="q:seeds")  # won the marker, enqueued 1 of 2 and died
    seeds = [sp.Run("seed", SCCE, opt, 0.1, 43) for opt in ("adam", "sgd")]
    sw.enqueue(study, seeds[:1], "q")
    sw.once(storage, "q:seeds", functools.partial(sw.enqueue, study, seeds, "q"), 1)  # after 1 s: taken over
    sw.once(storage, "q:seeds", functools.partial(sw.enqueue, study, seeds, "q"), 1)  # done: nothing more
    assert [t.user_attrs["experiment"] for t in study.get_trials()[4:]] == [r.experiment("q") for r in seeds]


def test_a_study_is_joined_with_its_own_settings_and_code_only(tmp_path: Path) -> None:
    storage = sw.open_storage(f"sqlite:///{tmp_path}/study.db", 1, 1)
    sw.join_study(storage, "mine", DESIGN, 1)
    with pytest.raises(StageError, match="created with other settings .epochs: 10 there, 3 here"):
        sw.join_study(storage, "mine", dataclasses.replace(DESIGN, epochs=3), 1)
    with pytest.raises(StageError, match="runs other code"):  # while it is not done
        sw.join_study(storage, "mine", dataclasses.replace(DESIGN, code="another"), 1)


def test_on_sqlite_optunas_pop_takes_each_waiting_trial_once(tmp_path: Path) -> None:
    """Four workers popping one queue at once (`study.ask`, what `study.optimize` does): without the storage's
    BEGIN IMMEDIATE, SQLite lets two read one trial as WAITING and both take it."""
    url = f"sqlite:///{tmp_path}/queue.db"
    study = optuna.create_study(storage=sw.open_storage(url, 60, 120), study_name="queue")
    for i in range(60):
        study.enqueue_trial({}, user_attrs={"i": i})
    taken: list[int] = []

    def worker(_: int) -> None:
        mine = optuna.load_study(study_name="queue", storage=sw.open_storage(url, 60, 120))
        while "i" in (trial := mine.ask()).user_attrs:
            taken.append(trial.user_attrs["i"])
        mine.tell(trial, state=TrialState.PRUNED)

    with warnings.catch_warnings(), ThreadPoolExecutor(4) as pool:
        warnings.simplefilter("ignore")  # Optuna: heartbeats are meant for optimize
        list(pool.map(worker, range(4)))
    assert sorted(taken) == list(range(60))


def test_a_learning_rate_is_written_as_people_write_it_and_yaml_reads_it_back() -> None:
    run = sp.Run("tune", SCCE, "sgd", 1e30, 42)
    assert run.experiment("study") == "study-scce-sgd-lr1.0e+30-s42"  # not lr1000000000000000000000000000000
    for lr, text in [(0.0001, "0.0001"), (1e-5, "0.00001"), (1, "1"), (1e30, "1.0e+30"), (1.5e-9, "1.5e-09")]:
        assert sp.lr_text(lr) == text and float(yaml.safe_load(text)) == lr  # YAML 1.1 (PyYAML) reads a float


LATIN1_REPORT = """
import sys
from pathlib import Path
from commands import study_protocol as sp, study_report
design = sp.Design(optimizers=("adam", "sgd"), losses=("sparse_categorical_crossentropy",), lrs=(0.01,),
                   seeds=(42, 43, 44), diagnostics=())
done = {}
for i, run in enumerate(sp.runs_of(design, "tune", {}) + [sp.Run("seed", *design.baseline, 0.01, s) for s in (43, 44)]):
    acc = 0.9 + 0.01 * i
    done[run] = {"outcome": "ok", "val_accuracy": acc, "test_accuracy": acc, "test_log_loss": 0.3, "val_curve": [acc],
                 "experiment": f"e{i}", "run_s": 1.0, "read_s": 0.1}
    if run.optimizer == "sgd":
        done[run] = {"outcome": "diverged"}
study_report.write(design, done, [], "study", Path(sys.argv[1]))
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


def study_json(out: Path) -> dict:
    return json.loads((out / "study.json").read_text())


def exp_names(repo: Path) -> list[str]:
    return sorted(run(["dvc", "exp", "list", "--name-only"], repo).stdout.split())


@pytest.mark.slow(minutes=3)
def test_a_small_study_end_to_end_then_a_rerun_runs_nothing(tmp_path: Path) -> None:
    """Under a name of its own (`--study-name small`): the project's reports/study* stay byte for byte, its report
    goes to reports/studies/small/. The plan printed first says 4 runs and 4 run; no diagnostic runs (none of the
    tutorial's cases is in it); 2 seeds give no t-interval, and the report says so. One learning rate: how the
    runs before a phase choose it is test_each_phase_is_chosen_by_the_runs_before_it's, and a choice
    between real runs' rates tests/test_study_postgres.py's."""
    repo = tmp_path / "repo"
    dvc_project(repo)  # trained at 1 epoch: the baseline's first run comes from DVC's run-cache
    published = {p.name: p.read_bytes() for p in (ROOT / "reports").glob("study*")}
    (repo / "reports").mkdir(exist_ok=True)
    for name, data in published.items():  # committed here as in the project
        (repo / "reports" / name).write_bytes(data)
    run(["git", "add", "reports"], repo)
    run(["git", "commit", "-qm", "the published study"], repo)
    proc = run([PYTHON, "-m", "commands.study", *SMALL, "--workers", "2"], repo, timeout=900)
    plan = proc.stdout.index("plan: 4 runs (if none diverges), 0 done already; the time is known after the first runs")
    assert plan < proc.stdout.index("] trial ") and "ran 4 experiments" in proc.stdout, proc.stdout
    assert {p.name: p.read_bytes() for p in (repo / "reports").glob("study*")} == published
    out = repo / "reports/studies/small"
    report = study_json(out)
    assert report["runs"]["planned"] == report["runs"]["done"] == 4 and report["failed"] == []
    assert report["diagnostics"] == [] and report["design"]["settings"] == []
    configs = {c["optimizer"]: c for c in report["configs"]}
    assert sorted(configs) == ["adam", "sgd"] and configs["adam"]["baseline"]
    for c in configs.values():
        acc = c["test_accuracy"]
        assert c["seeds"] == [42, 43] and c["best_learning_rate"] == 0.001
        assert acc["ci95"] == [None, None] and acc["n"] == 2 and 0.1 < acc["mean"] <= 1  # no interval from 2 seeds
        low, high = c["test_set_wilson95"]["ci95"]
        assert c["test_set_wilson95"]["n_test"] == 1000 and 0 <= low < acc["mean"] < high <= 1
        assert [e["outcome"] for e in c["learning_rates"]] == ["ok"]
        assert c["epochs_to_baseline_validation"]["target"] is not None
    assert configs["adam"]["difference_to_baseline"]["mean"] == 0.0
    diff = configs["sgd"]["difference_to_baseline"]
    assert diff["n"] == 2 and diff["ci95"] == [None, None]
    assert diff["mean"] == pytest.approx(
        sum(configs["sgd"]["test_accuracy"]["values"]) / 2 - sum(configs["adam"]["test_accuracy"]["values"]) / 2
    )
    md = (out / "study.md").read_text()
    assert "| sparse_categorical_crossentropy | sgd |" in md and "(baseline)" in md
    assert "**n=2: too few seeds for an interval.**" in md and "(n=2: too few seeds for an interval)" in md
    assert "1 epoch each, data `mnist_sample` (params.yaml at HEAD)" in md and "## Held against published" in md
    for png in ("study_lr_sensitivity.png", "study_performance.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    names = exp_names(repo)  # every run is a DVC experiment, named for what it is; no diagnostic among them
    assert len(names) == 4 and "small-scce-adam-lr0.001-s42" in names and not any("diag" in n for n in names)
    best = configs["sgd"]
    name = f"small-scce-sgd-lr{sp.lr_text(best['best_learning_rate'])}-s43"
    assert name in best["experiments"]
    run(["dvc", "exp", "apply", name], repo)  # restores its model and metrics
    applied = json.loads((repo / "metrics/eval.json").read_text())["test"]["accuracy"]
    assert applied == best["test_accuracy"]["values"][1]
    run(["git", "checkout", "-q", "--", "."], repo)

    again = run([PYTHON, "-m", "commands.study", *SMALL, "--workers", "2"], repo)
    assert "plan: 4 runs (if none diverges), 4 done already; nothing left to run" in again.stdout
    assert "ran 0 experiments" in again.stdout and exp_names(repo) == names
    assert study_json(out)["configs"] == report["configs"]
    assert n_test_of_an_older_storage(repo, "small") == [1000] * 4


def n_test_of_an_older_storage(repo: Path, name: str) -> list[int]:
    """The study's records as a storage from before runs recorded n_test holds them, given it by `fill_n_test`."""
    done, _ = sw.collect(
        optuna.load_study(study_name=name, storage=f"sqlite:///{repo}/.dvc/tmp/study/optuna.db").trials
    )
    for record in done.values():
        del record["n_test"]
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(repo)
        sw.fill_n_test(done)
    return [record["n_test"] for record in done.values()]


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


@pytest.mark.pipeline(seconds=8)
def test_settings_of_its_own_need_a_name_and_bad_ones_are_refused_before_anything_is_stored(tmp_path: Path) -> None:
    """The published reports/study* come from the default study only: settings of its own under that name are
    refused in one line; a -S or seed that every run's check would refuse is one line before the study is stored
    (its name stays free). `make study` passes a name and DIAGNOSTICS on."""
    repo = tmp_path / "repo"
    dvc_project(repo)
    refused = {
        ("--lrs", "0.1"): "error: a study with settings of its own needs a name of its own: --study-name NAME",
        ("--study-name", "s", "--first-seed", "-1"): "error: the study's runs would be refused: params.yaml: "
        "train.seed: must be >= 0, got -1",
        ("--study-name", "s", "-S", "data.url=notaurl"): "error: the study's runs would be refused: params.yaml: "
        "data.url: 'notaurl' must start with http://",
    }
    for args, line in refused.items():
        proc = run([PYTHON, "-m", "commands.study", *args], repo, check=False)
        assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith(line), proc.stderr
        assert "Traceback" not in proc.stderr
    assert not (repo / ".dvc/tmp/study").exists()  # nothing stored
    named = run(["make", "-n", "-o", "setup", "study", "LRS=0.1", "STUDY=mine", "DIAGNOSTICS=none"], ROOT).stdout
    assert "--lrs 0.1" in named and "--study-name mine" in named and "--diagnostics none" in named
    assert "--study-name" not in run(["make", "-n", "-o", "setup", "study"], ROOT).stdout
