"""The study's workers, on Optuna's own queue: each run (`commands.study_protocol`) is an enqueued trial, taken and
run by `study.optimize` as a DVC experiment (`dvc exp run --temp --name <readable name> -S ...`), its metrics read
back from the experiment. Each run is done once, even by workers on several machines (docs/study.md, "How workers
take runs"): a phase is enqueued by the one process whose `create_study` of its marker (`<study>:<phase>`) succeeds
(the next marker's winner takes over from one silent for the grace period); `study.optimize` switches a trial
WAITING -> RUNNING, which one worker only can do (PostgreSQL locks the row; SQLite: BEGIN IMMEDIATE). A dead
worker's trial goes stale (heartbeat), is failed and enqueued again (`RetryHeartbeatStaleTrialCallback`), its `dvc
exp run` dead with it (PR_SET_PDEATHSIG); a failed run is retried by the next start (marker `<study>:retry-<trial>`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import optuna
import psutil
import sqlalchemy
import yaml
from optuna.trial import FrozenTrial, TrialState

from commands import cache_integrity, study_report
from commands import study_protocol as sp
from pipeline import losses, optimizers, runner
from pipeline.errors import StageError

warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeats: stable in use

DEFAULT_STORAGE = "sqlite:///.dvc/tmp/study/optuna.db"
LOG_DIR = Path(".dvc/tmp/study/logs")  # each trial's `dvc exp run` output, on the machine that ran it
PIPELINE = ("stages", "pipeline", "dvc.yaml", "params.yaml")  # what every worker must share (HEAD's)
BUSY = ("is busy, it is being blocked by", "the index is locked")  # DVC's and git's words for another's lock
MAX_RETRY = 3  # a run whose worker dies this often (killed for memory?) waits for the next start of the command
Retry = optuna.storages.RetryHeartbeatStaleTrialCallback


class TrialFailed(Exception):  # noqa: N818 - a trial's outcome, not a bug
    """The trial's run failed; the message says why and where its log is."""


def git(*args: str) -> str:
    proc = subprocess.run(["git", *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise StageError(f"`git {' '.join(args)}` failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def code_id() -> str:
    """Hash of HEAD's pipeline files. Raises StageError on uncommitted changes to them (another machine
    would not have them)."""
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", *PIPELINE).strip()
    deadline = time.monotonic() + 60
    # a worker of another process in this folder (the PostgreSQL test runs two): its `dvc exp run --temp -S`
    # writes params.yaml here while it stashes the run
    while dirty and _dvc_running_here() and time.monotonic() < deadline:
        time.sleep(0.5)
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", *PIPELINE).strip()
    if dirty:
        raise StageError(f"uncommitted changes to the pipeline ({', '.join(line[3:] for line in dirty.splitlines())}): "
                         "every trial runs HEAD's code, on every machine; commit or stash them first")  # fmt: skip
    listing = [line for line in git("ls-tree", "-r", "HEAD", "--", *PIPELINE).splitlines()
               if "study" not in line.rsplit("/", 1)[-1]]  # the driver aside  # fmt: skip
    return hashlib.sha256("\n".join(listing).encode()).hexdigest()[:12]


def _dvc_running_here() -> bool:
    here = os.getcwd()
    for proc in psutil.process_iter(["cmdline", "cwd"]):
        with contextlib.suppress(psutil.Error):
            if proc.info["cwd"] == here and any(Path(arg).name == "dvc" for arg in (proc.info["cmdline"] or [])[:2]):
                return True
    return False


def open_storage(url: str, heartbeat_s: int, grace_s: int) -> optuna.storages.RDBStorage:
    """An RDB storage (SQLite file or PostgreSQL URL) with heartbeats and retry of a dead worker's trial.
    Raises StageError when it cannot be opened (SQLAlchemy's first line says why)."""
    sqlite = url.startswith("sqlite:///")
    kwargs: dict = {}
    if sqlite:  # pysqlite begins no transaction itself (isolation_level None): the "begin" listener below does
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 120, "isolation_level": None}}
    for attempt in range(5):  # two workers creating the tables of a new database at once: one retries
        try:
            storage = optuna.storages.RDBStorage(url, heartbeat_interval=heartbeat_s, grace_period=grace_s,
                                                 heartbeat_stale_trial_callback=Retry(MAX_RETRY), **kwargs)  # fmt: skip
            break
        except Exception as exc:  # SQLAlchemy's errors: a wrong URL, an unreachable server, a bad password
            error = exc
            time.sleep(0.5 + random.random() * (attempt + 1))
    else:
        raise StageError(f"cannot open the study storage {redact(url)}: {str(error).splitlines()[0]}") from None
    if sqlite:  # SQLAlchemy's recipe for SQLite: Optuna's read-then-write (WAITING -> RUNNING) holds the lock
        sqlalchemy.event.listen(storage.engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE"))
    return storage


def redact(url: str) -> str:
    """The URL without its password (SQLAlchemy's rendering; one it cannot parse, as given)."""
    with contextlib.suppress(sqlalchemy.exc.ArgumentError):
        return sqlalchemy.engine.make_url(url).render_as_string()
    return url


def once(storage: optuna.storages.BaseStorage, marker: str, action: Callable[[], None], grace_s: float) -> None:
    """Do `action`, an idempotent enqueue, in the one process whose `create_study(marker)` succeeds; the
    others wait until it marks it done, or for the grace period: then the next marker's winner does it."""
    while True:
        try:
            gate = optuna.create_study(storage=storage, study_name=marker)
        except optuna.exceptions.DuplicatedStudyError:
            gate = optuna.load_study(study_name=marker, storage=storage)
            deadline = time.monotonic() + grace_s
            while not gate.user_attrs.get("done") and time.monotonic() < deadline:
                time.sleep(0.2)
            if gate.user_attrs.get("done"):
                return
            marker += "'"  # its winner died before it was done
            continue
        action()
        gate.set_user_attr("done", True)
        return


def enqueue(study: optuna.Study, runs: list[sp.Run], prefix: str, after: int = -1, say: str = "") -> None:
    """Enqueue each run with no trial numbered after `after` (not `skip_if_exists`: a retry has the failed
    trial's params); then print `say`, if any."""
    have = {t.user_attrs.get("experiment") for t in study.get_trials(deepcopy=False) if t.number > after}
    for run in runs:
        if run.experiment(prefix) not in have:
            study.enqueue_trial(vars(run), user_attrs={"experiment": run.experiment(prefix)})
    if say:
        print(say, flush=True)


def join_study(storage: optuna.storages.RDBStorage, name: str, design: sp.Design, grace_s: float) -> optuna.Study:
    """The study, created with this design (one process sets it) or joined if its design is the same; its failed
    runs queued again. Raises StageError when its settings, or its code while it is not done, differ from here."""
    study = optuna.create_study(storage=storage, study_name=name, direction="maximize", load_if_exists=True)
    mine = functools.partial(study.set_user_attr, "design", design.as_dict())
    once(storage, f"{name}:design", lambda: "design" in study.user_attrs or mine(), grace_s)  # the first one's
    stored = sp.Design.from_dict(study.user_attrs["design"])
    diffs = [f"{k}: {v!r} there, {getattr(design, k)!r} here" for k, v in vars(stored).items()
             if k != "code" and v != getattr(design, k)]  # fmt: skip
    if diffs:
        raise StageError(f"study {name!r} was created with other settings ({'; '.join(diffs)}): run it with the same "
                         "settings, or start another with --study-name NAME (make study STUDY=NAME)")  # fmt: skip
    done, failed = collect(study.get_trials(deepcopy=False))
    if stored.code != design.code and sp.next_phase(stored, done):
        raise StageError(f"study {name!r} runs other code (its pipeline files hash to {stored.code}, this checkout's "
                         f"to {design.code}): every worker must be on the same commit; check out the study's, or start "
                         "another with --study-name")  # fmt: skip
    for t in failed:  # real failures, and runs whose worker died too often; not those Optuna is retrying
        if "message" in t.user_attrs or len(Retry.retry_history(t)) >= MAX_RETRY:
            again = functools.partial(enqueue, study, [sp.Run(**t.params)] if t.params else [], name, t.number)
            once(storage, f"{name}:retry-{t.number}", again, grace_s)
    return study


def collect(trials: list[FrozenTrial]) -> tuple[dict[sp.Run, dict], list[FrozenTrial]]:
    """Each done run's record (its trial COMPLETE, or PRUNED: diverged), and the last trial of each run
    that failed (FAIL) and has none done, waiting or running since."""
    done: dict[sp.Run, dict] = {}
    last: dict[str, FrozenTrial] = {}
    for t in sorted(trials, key=lambda t: t.number):
        if "experiment" not in t.user_attrs:  # Optuna's new trial for a worker that found nothing waiting
            continue
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED):
            done.setdefault(sp.Run(**t.params), {**t.params, **t.user_attrs})
        last[t.user_attrs["experiment"]] = t
    names = {record["experiment"] for record in done.values()}
    return done, [t for name, t in last.items() if t.state == TrialState.FAIL and name not in names]


def failure(t: FrozenTrial) -> dict:
    """What the report says of a failed run's last trial."""
    stale = f"its worker stopped (no heartbeat), {len(Retry.retry_history(t)) + 1} time(s)"
    return {"experiment": t.user_attrs["experiment"], "message": t.user_attrs.get("message", stale), "trial": t.number}


# --- the worker loop and one trial ---------------------------------------------------------------------


def work(storage: optuna.storages.RDBStorage, name: str, design: sp.Design, *, label: str, push: str | None,
         poll_s: float, grace_s: float, workers: int = 1) -> int:  # fmt: skip
    """Run the study's runs until every one is done, or only failed ones are left; how many ran here. The
    process that enqueues a phase after the first prints the plan with the time left (`workers` here)."""
    study = optuna.load_study(study_name=name, storage=storage)  # one per worker: `optimize` is not re-entrant
    params = yaml.safe_load(git("show", "HEAD:params.yaml")) or {}
    gradients = "log_gradients" in (params.get("train") or {})  # this pipeline can log gradient norms
    ran: list[str] = []
    objective = functools.partial(trial_run, design=design, label=label, push=push, gradients=gradients, ran=ran)
    enqueued: set[str] = set()
    while True:
        optuna.storages.fail_stale_trials(study)  # a dead worker's run: failed, and enqueued again
        states = {t.state for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING, TrialState.RUNNING))}
        if TrialState.WAITING in states:
            study.optimize(objective, n_trials=1, catch=(TrialFailed,))
        elif TrialState.RUNNING in states:  # the phase's last runs, or a dead worker's until it goes stale
            time.sleep(poll_s)
        else:
            done = collect(study.get_trials(deepcopy=False))[0]
            pending = sp.next_phase(design, done)
            if pending is None or pending[0] in enqueued:  # all done, or only failed runs are left
                return len(ran)
            enqueued.add(pending[0])
            said = f"[{label}] phase {pending[0]}: {study_report.plan(design, done, workers)}" if done else ""
            phase = functools.partial(enqueue, study, pending[1], name, say=said)  # the first phase's plan: main's
            once(storage, f"{name}:{pending[0]}", phase, grace_s)


def trial_run(trial: optuna.Trial, *, design: sp.Design, label: str, push: str | None, gradients: bool,
              ran: list[str]) -> float:  # fmt: skip
    """The objective: the trial's run as a DVC experiment; its validation accuracy. Raises TrialFailed, and
    optuna.TrialPruned when training diverged (or no run was waiting)."""
    name = trial.user_attrs.get("experiment")
    if name is None:
        raise optuna.TrialPruned("no run was waiting")
    lrs = [*design.lrs, *(lr for _, _, lr in design.diagnostics)]
    run = sp.Run(  # the enqueued values, recorded as the trial's params (a param's choices: the same in every trial)
        trial.suggest_categorical("kind", sp.KINDS),
        trial.suggest_categorical("loss", tuple(losses.LOSSES)),
        trial.suggest_categorical("optimizer", optimizers.OPTIMIZERS),
        trial.suggest_float("learning_rate", min(lrs), max(lrs), log=True),
        trial.suggest_int("seed", design.seeds[0], design.seeds[-1]),
    )
    trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}:{label}")
    print(f"[{label}] trial {trial.number}: {name} ...", flush=True)
    try:
        record = run_experiment(run, name, design, gradients, push)
    except Exception as exc:  # the next start of the command retries a trial with a message (optimize re-raises a bug)
        trial.set_user_attr("message", str(exc) or type(exc).__name__)
        print(f"[{label}] {name}: failed: {exc}", flush=True)
        raise
    for key, value in record.items():
        trial.set_user_attr(key, value)
    ran.append(name)
    if record["outcome"] == "diverged":
        print(f"[{label}] {name}: diverged ({record['run_s']:.0f} s)", flush=True)
        raise optuna.TrialPruned(record["message"])
    print(f"[{label}] {name}: validation {record['val_accuracy']:.4f}, test {record['test_accuracy']:.4f} "
          f"({record['run_s']:.0f} s)", flush=True)  # fmt: skip
    return record["val_accuracy"]


def find_experiment(name: str) -> str | None:
    """The git ref of the experiment called `name` (this commit's first), or None."""
    refs = [r for r in git("for-each-ref", "--format=%(refname)", "refs/exps/").split() if r.endswith("/" + name)]
    head = git("rev-parse", "HEAD").strip()
    mine = [r for r in refs if r.startswith(f"refs/exps/{head[:2]}/{head[2:]}/")]
    return (mine or refs or [None])[0]


def settings(run: sp.Run, design: sp.Design, gradients: bool) -> dict[str, str]:
    out = {"train.loss": run.loss, "train.optimizer.name": run.optimizer,
           "train.optimizer.learning_rate": sp.lr_text(run.learning_rate), "train.seed": str(run.seed),
           "train.epochs": str(design.epochs)}  # fmt: skip
    if design.source:
        out["data.source"] = design.source
    out.update(design.settings)
    if run.kind == "diag" and gradients:
        out["train.log_gradients"] = "true"
    return out


def check_experiment(ref: str, name: str, wanted: dict[str, str]) -> None:
    """Raises TrialFailed unless the experiment of this name has these params (else the names collide)."""
    params = yaml.safe_load(git("show", f"{ref}:params.yaml"))
    for key, value in wanted.items():
        got = functools.reduce(lambda d, part: d.get(part) if isinstance(d, dict) else None, key.split("."), params)
        with contextlib.suppress(TypeError, ValueError):
            if float(got) == float(value):  # type: ignore[arg-type]
                continue
        if str(got).lower() != value.lower():
            raise TrialFailed(f"an experiment called {name} exists with {key}={got} (not {value}): remove it "
                              f"(dvc exp remove {name}) or give this study another --study-name")  # fmt: skip


def run_experiment(run: sp.Run, name: str, design: sp.Design, gradients: bool, push: str | None) -> dict:
    """Run (or find) the experiment; its numbers as the trial's record. Raises TrialFailed."""
    wanted = settings(run, design, gradients)
    began = time.perf_counter()
    ref = find_experiment(name)
    log = LOG_DIR / f"{name}.log"
    if ref is not None:
        check_experiment(ref, name, wanted)
    else:
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        cmd = ["dvc", "exp", "run", "--temp", "--name", name]
        cmd += [arg for key, value in wanted.items() for arg in ("-S", f"{key}={value}")]
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        dies_with_this_worker = functools.partial(runner.die_with_parent, signal.SIGTERM)  # dvc then stops its stage
        for _ in range(5):  # another worker's dvc in this folder holds git's index or DVC's stash a moment: retry
            with open(log, "w", encoding="utf-8") as out:
                out.write(f"$ {' '.join(cmd)}\n")
                out.flush()
                rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                    preexec_fn=dies_with_this_worker, check=False).returncode  # fmt: skip
            text = log.read_text(encoding="utf-8", errors="replace")
            if rc == 0 or not any(busy in text for busy in BUSY):
                break
            time.sleep(random.uniform(1, 3))
        if rc != 0:
            errors = [line.strip() for line in text.splitlines() if line.startswith(("error:", "ERROR:"))]
            first = errors[0] if errors else (text.strip().splitlines() or ["no output"])[-1]
            if "training diverged" in text:
                return {"outcome": "diverged", "message": first, "run_s": round(time.perf_counter() - began, 2)}
            raise TrialFailed(f"`dvc exp run` exited {rc}: {first} (see why: cat {log} on {socket.gethostname()})")
        ref = find_experiment(name)
        if ref is None:
            raise TrialFailed(f"`dvc exp run` made no experiment called {name} (see why: cat {log})")
    run_s = time.perf_counter() - began
    record = read_metrics(ref)
    if push:
        proc = subprocess.run(["dvc", "exp", "push", push, name], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise TrialFailed(f"`dvc exp push {push} {name}` failed: {(proc.stderr or proc.stdout).strip()[-300:]}")
    read_s = time.perf_counter() - began - run_s
    return {**record, "outcome": "ok", "run_s": round(run_s, 2), "read_s": round(read_s, 2)}


def read_metrics(ref: str) -> dict:
    """Test and validation accuracy, the test digits (n_test), the validation and any gradient curves, from the
    experiment's DVC-cached outputs at that git ref. Raises TrialFailed when the cache lacks one of them."""
    from dvc.repo import Repo

    with Repo.open(".", rev=ref) as repo:
        missing = cache_integrity.not_in_cache(repo)
        if missing:
            name = ref.rsplit("/", 1)[-1]
            raise TrialFailed(f"{name}'s outputs are not in DVC's cache: {', '.join(missing)} (its disk may be full); "
                              f"make room, then `dvc exp remove {name}` and run the study again")  # fmt: skip
        fs = repo.dvcfs
        test = json.loads(fs.read_text("metrics/eval.json"))["test"]
        saved = json.loads(fs.read_text("metrics/train/metrics.json"))["saved"]  # the epoch early stopping kept
        n_test = json.loads(fs.read_text("metrics/eval/metrics.json")).get("n_test")  # the test digits
        base, gradients = "metrics/train/plots/metrics/train/", {}
        for path in sorted(fs.find(base)):
            rel = path.split(base, 1)[-1]
            if rel.startswith(("grad_norm/", "update_ratio/")) and rel.endswith(".tsv"):
                gradients[rel.removesuffix(".tsv")] = _tsv(fs.read_text(path))
        return {"experiment_ref": ref, "test_accuracy": test["accuracy"], "test_log_loss": test["log_loss"],
                "n_test": n_test, "val_accuracy": saved["val_accuracy"], "saved_epoch": saved["epoch"],
                "val_curve": _tsv(fs.read_text("metrics/train/plots/metrics/eval/accuracy.tsv")),
                **({"gradients": gradients} if gradients else {})}  # fmt: skip


def fill_n_test(done: dict[sp.Run, dict]) -> None:
    """Give records of an older storage (no `n_test`) the test set's size: every run of a study shares its test set,
    so a record that has it, else one of their experiments here, gives it (without either they stay without)."""
    from dvc.repo import Repo

    n_test = next((record["n_test"] for record in done.values() if record.get("n_test")), None)
    for ref in [] if n_test else [record["experiment_ref"] for record in done.values() if "experiment_ref" in record]:
        with contextlib.suppress(Exception), Repo.open(".", rev=ref) as repo:  # a ref that is not in this clone
            n_test = json.loads(repo.dvcfs.read_text("metrics/eval/metrics.json"))["n_test"]
        break
    for record in done.values():
        if n_test and sp.ok(record) and not record.get("n_test"):
            record["n_test"] = n_test


def _tsv(text: str) -> list[float]:
    rows = [line.split("\t") for line in text.strip().splitlines()[1:]]
    return [float(row[-1]) for row in rows if row and row[-1]]
