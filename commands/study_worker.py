"""The study's workers: Optuna's storage holds the plan's slots, each worker takes one at a time and
runs it as a DVC experiment of the pipeline (`dvc exp run --temp --name <readable name> -S ...`).

Why it is run once, even with workers on several machines started together:
- the study's creator (`optuna.create_study(load_if_exists=False)` succeeds for one process only)
  enqueues every slot as a WAITING trial; a worker takes one by switching it WAITING -> RUNNING in
  the storage, which succeeds for one worker only (PostgreSQL: SELECT ... FOR UPDATE; SQLite, one
  machine: under a file lock as well, since SQLite's driver does not lock on the read);
- a worker that finds the queue empty enqueues the slots that have no trial at all (a creator that
  died mid-way) or whose trial failed before this run started; should two do it at once, the
  later copy of a slot is dropped when taken (PRUNED, `outcome: duplicate`): a slot's run is the
  one with the lowest trial id among those running or done;
- every trial a worker holds has a heartbeat (Optuna's RDB heartbeat table); a trial whose worker
  died (killed, machine lost) goes stale after the grace period, and the next worker to look fails
  it and Optuna's `RetryHeartbeatStaleTrialCallback` enqueues it again: retried, not lost. The
  `dvc exp run` of a dead worker dies with it (PR_SET_PDEATHSIG), and its stage with that dvc;
- an experiment that already exists under the trial's name (its worker died after DVC finished)
  is read, not rerun; a configuration that ran before comes from DVC's run-cache.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import optuna
import psutil
import yaml
from optuna.trial import TrialState

from commands import cache_integrity
from commands import study_protocol as sp
from pipeline import runner
from pipeline.errors import StageError

warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeats: stable in use

DEFAULT_STORAGE = "sqlite:///.dvc/tmp/study/optuna.db"
LOG_DIR = Path(".dvc/tmp/study/logs")  # each trial's `dvc exp run` output, on the machine that ran it
PIPELINE = ("stages", "pipeline", "dvc.yaml", "params.yaml")  # what every worker must share (HEAD's)
BUSY = ("is busy, it is being blocked by", "the index is locked")  # DVC's and git's words for another's lock
BUSY_TRIES = 5
BLOCKED_AFTER_S = 15.0  # a dependency failed this long ago and no retry was queued: give up on the slot


class TrialFailed(Exception):  # noqa: N818 - a trial's outcome, not a bug
    """The trial's run failed; the message says why and where its log is."""


def git(*args: str) -> str:
    proc = subprocess.run(["git", *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise StageError(f"`git {' '.join(args)}` failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def code_id() -> str:
    """Hash of HEAD's pipeline files; refuses uncommitted changes to them (another machine would not have them)."""
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", *PIPELINE).strip()
    deadline = time.monotonic() + 60
    # another worker's `dvc exp run --temp -S` in this folder writes params.yaml while it stashes the run
    while dirty and _dvc_running_here() and time.monotonic() < deadline:
        time.sleep(0.5)
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", *PIPELINE).strip()
    if dirty:
        raise StageError(
            f"uncommitted changes to the pipeline ({', '.join(line[3:] for line in dirty.splitlines())}): every "
            "trial runs HEAD's code, on every machine; commit or stash them first"
        )
    listing = git("ls-tree", "-r", "HEAD", "--", *PIPELINE).splitlines()
    return sp.code_id("\n".join(line for line in listing if "study" not in line.rsplit("/", 1)[-1]))  # the driver aside


def _dvc_running_here() -> bool:
    """Whether a `dvc` command runs in this folder (another study worker's experiment)."""
    here = os.getcwd()
    for proc in psutil.process_iter(["cmdline", "cwd"]):
        with contextlib.suppress(psutil.Error):
            if proc.info["cwd"] == here and any(Path(arg).name == "dvc" for arg in (proc.info["cmdline"] or [])[:2]):
                return True
    return False


def gradients_supported() -> bool:
    """Whether this pipeline's params.yaml has `train.log_gradients` (the train stage can log gradient norms)."""
    params = yaml.safe_load(git("show", "HEAD:params.yaml")) or {}
    return "log_gradients" in (params.get("train") or {})


# --- storage -----------------------------------------------------------------------------------


def open_storage(url: str, heartbeat_s: int, grace_s: int) -> optuna.storages.RDBStorage:
    """An RDB storage (SQLite file or PostgreSQL URL) with heartbeats and retry of a dead worker's trial."""
    kwargs: dict = {}
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 120}}
    for attempt in range(5):  # two workers creating the tables of a new database at once: one retries
        try:
            return optuna.storages.RDBStorage(
                url,
                heartbeat_interval=heartbeat_s,
                grace_period=grace_s,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3),
                **kwargs,
            )
        except Exception as exc:  # SQLAlchemy's errors: a wrong URL, an unreachable server, a bad password
            error = exc
            time.sleep(0.5 + random.random() * (attempt + 1))
    raise StageError(f"cannot open the study storage {redact(url)}: {str(error).splitlines()[0]}") from None


def redact(url: str) -> str:
    """The URL without its password."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest and ":" in rest.split("@", 1)[0]:
        user = rest.split("@", 1)[0].split(":", 1)[0]
        rest = f"{user}:***@{rest.split('@', 1)[1]}"
    return f"{scheme}{sep}{rest}"


class StorageLock:
    """Serializes read-check-write steps on a SQLite storage (one machine); PostgreSQL needs none."""

    def __init__(self, url: str) -> None:
        self.path = Path(url.removeprefix("sqlite:///") + ".lock") if url.startswith("sqlite:///") else None

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        if self.path is None:
            yield
            return
        with open(
            self.path, "a", encoding="utf-8"
        ) as handle:  # a new open file per call: locks threads of this process too
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield


def join_study(storage: optuna.storages.RDBStorage, name: str, design: sp.Design, lock: StorageLock) -> optuna.Study:
    """Create the study and enqueue its plan (one process wins), or join it if its design is the same."""
    try:
        study = optuna.create_study(storage=storage, study_name=name, direction="maximize", load_if_exists=False)
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage)
        for _ in range(60):  # its creator writes the design right after creating it
            if "design" in study.user_attrs:
                break
            time.sleep(0.5)
        else:
            study.set_user_attr("design", design.as_dict())
        check_design(name, sp.Design.from_dict(study.user_attrs["design"]), design, study)
        return study
    study.set_user_attr("design", design.as_dict())
    with lock():
        for slot in sp.plan(design):
            study.enqueue_trial({}, user_attrs=slot_attrs(slot))
    return study


def slot_attrs(slot: sp.Slot) -> dict:
    return {"slot": slot.key, "kind": slot.kind, "loss": slot.loss, "optimizer": slot.optimizer, "seed": slot.seed}


def check_design(name: str, stored: sp.Design, mine: sp.Design, study: optuna.Study) -> None:
    diffs = [
        f"{k}: {getattr(stored, k)!r} there, {getattr(mine, k)!r} here"
        for k in stored.as_dict()
        if k != "code" and getattr(stored, k) != getattr(mine, k)
    ]
    if diffs:
        raise StageError(
            f"study {name!r} was created with other settings ({'; '.join(diffs)}): run it with the same "
            "settings, or start another with --study-name NAME (make study STUDY=NAME)"
        )
    if stored.code != mine.code:
        states = collect(study.get_trials(deepcopy=False))
        if any(states.get(s.key, sp.KeyState()).done is None for s in sp.plan(stored)):
            raise StageError(
                f"study {name!r} runs other code (its pipeline files hash to {stored.code}, this checkout's to "
                f"{mine.code}): every worker must be on the same commit; check out the study's, or start another "
                "with --study-name"
            )


def collect(trials: list[optuna.trial.FrozenTrial]) -> dict[str, sp.KeyState]:
    """Each slot's state from all of the study's trials (the lowest-numbered done run is the slot's)."""
    states: dict[str, sp.KeyState] = {}
    for t in sorted(trials, key=lambda t: t.number):
        key = t.user_attrs.get("slot")
        if key is None:
            continue
        st = states.setdefault(key, sp.KeyState())
        outcome = t.user_attrs.get("outcome")
        if t.state == TrialState.COMPLETE or (t.state == TrialState.PRUNED and outcome in ("diverged", "skipped")):
            if st.done is None:
                st.done = {**t.user_attrs, "number": t.number}
        elif t.state == TrialState.WAITING:
            st.waiting.append(t._trial_id)
        elif t.state == TrialState.RUNNING:
            st.running.append(t._trial_id)
        elif t.state == TrialState.FAIL:
            when = t.datetime_complete.timestamp() if t.datetime_complete else 0.0
            st.failed.append((when, t.user_attrs.get("message", "its worker stopped (no heartbeat)"), t.number))
    return states


# --- one trial: a DVC experiment -----------------------------------------------------------------


def find_experiment(name: str) -> str | None:
    """The git ref of the experiment called `name` (this commit's first), or None."""
    refs = [r for r in git("for-each-ref", "--format=%(refname)", "refs/exps/").split() if r.endswith("/" + name)]
    head = git("rev-parse", "HEAD").strip()
    mine = [r for r in refs if r.startswith(f"refs/exps/{head[:2]}/{head[2:]}/")]
    return (mine or refs or [None])[0]


def settings(spec: sp.Spec, design: sp.Design, gradients: bool) -> dict[str, str]:
    out = {
        "train.loss": spec.loss,
        "train.optimizer.name": spec.optimizer,
        "train.optimizer.learning_rate": sp.lr_text(spec.lr),
        "train.seed": str(spec.seed),
        "train.epochs": str(design.epochs),
    }
    if design.source:
        out["data.source"] = design.source
    if spec.log_gradients and gradients:
        out["train.log_gradients"] = "true"
    return out


def check_experiment(ref: str, name: str, wanted: dict[str, str]) -> None:
    """An existing experiment of this name must be this run (same params), or the names collide."""
    params = yaml.safe_load(git("show", f"{ref}:params.yaml"))
    for key, value in wanted.items():
        got: object = params
        for part in key.split("."):
            got = got.get(part) if isinstance(got, dict) else None
        if str(got).lower() != value.lower() and not _same_number(got, value):
            raise TrialFailed(
                f"an experiment called {name} exists with {key}={got} (not {value}): remove it "
                f"(dvc exp remove {name}) or give this study another --study-name"
            )


def _same_number(got: object, value: str) -> bool:
    try:
        return float(got) == float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False


def run_experiment(spec: sp.Spec, name: str, design: sp.Design, gradients: bool, push: str | None) -> dict:
    """Run (or find) the experiment; its numbers as the trial's record. Raises TrialFailed."""
    wanted = settings(spec, design, gradients)
    began = time.perf_counter()
    ref = find_experiment(name)
    log = LOG_DIR / f"{name}.log"
    if ref is not None:
        check_experiment(ref, name, wanted)
    else:
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        cmd = ["dvc", "exp", "run", "--temp", "--name", name]
        for key, value in wanted.items():
            cmd += ["-S", f"{key}={value}"]
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        dies_with_this_worker = functools.partial(runner.die_with_parent, signal.SIGTERM)  # dvc then stops its stage
        for _ in range(BUSY_TRIES):  # another worker's dvc in this folder holds git's index or DVC's stash a moment
            with open(log, "w", encoding="utf-8") as out:
                out.write(f"$ {' '.join(cmd)}\n")
                out.flush()
                rc = subprocess.run(
                    cmd, stdout=out, stderr=subprocess.STDOUT, env=env, preexec_fn=dies_with_this_worker, check=False
                ).returncode
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
    return {
        **record,
        "outcome": "ok",
        "run_s": round(run_s, 2),
        "read_s": round(time.perf_counter() - began - run_s, 2),
    }


def read_metrics(ref: str) -> dict:
    """Test and validation accuracy, the per-epoch validation curve and any gradient curves, from the
    experiment's DVC-cached outputs (DVC reads them from the cache at that git ref). Raises TrialFailed
    when the cache lacks one of its outputs (`dvc exp run` only warns when the cache's disk is full)."""
    from dvc.repo import Repo

    with Repo.open(".", rev=ref) as repo:
        missing = cache_integrity.not_in_cache(repo)
        if missing:
            name = ref.rsplit("/", 1)[-1]
            raise TrialFailed(
                f"{name}'s outputs are not in DVC's cache: {', '.join(missing)} (its disk may be full); make room, "
                f"then `dvc exp remove {name}` and run the study again"
            )
        fs = repo.dvcfs
        test = json.loads(fs.read_text("metrics/eval.json"))["test"]
        summary = json.loads(fs.read_text("metrics/train/metrics.json"))
        curve = _tsv(fs.read_text("metrics/train/plots/metrics/eval/accuracy.tsv"))
        gradients = {}
        base = "metrics/train/plots/metrics/train"
        for path in sorted(fs.find(base)):
            rel = path.split(base + "/", 1)[-1]
            if rel.startswith(("grad_norm/", "update_ratio/")) and rel.endswith(".tsv"):
                gradients[rel.removesuffix(".tsv")] = _tsv(fs.read_text(path))
    return {
        "experiment_ref": ref,
        "test_accuracy": test["accuracy"],
        "test_log_loss": test["log_loss"],
        "val_accuracy": summary["saved"]["val_accuracy"],
        "saved_epoch": summary["saved"]["epoch"],
        "val_curve": curve,
        **({"gradients": gradients} if gradients else {}),
    }


def _tsv(text: str) -> list[float]:
    rows = [line.split("\t") for line in text.strip().splitlines()[1:]]
    return [float(row[-1]) for row in rows if row and row[-1]]


# --- the worker loop ------------------------------------------------------------------------------


class Worker:
    """Takes slots until the plan is done: pops a WAITING trial, resolves it, runs it, records it."""

    def __init__(
        self,
        study: optuna.Study,
        design: sp.Design,
        lock: StorageLock,
        *,
        prefix: str,
        label: str,
        push: str | None,
        poll_s: float,
        started: float,
    ) -> None:
        self.study, self.design, self.lock, self.prefix, self.label = study, design, lock, prefix, label
        self.storage = study._storage
        self.push, self.poll_s, self.started = push, poll_s, started
        self.gradients = gradients_supported()
        self.held: list[int] = []  # trial ids taken (RUNNING) but waiting for their dependencies
        self.beating: set[int] = set()
        self.blocked_since: dict[int, float] = {}
        self.ran = 0
        self._stop = threading.Event()

    # heartbeats of every trial this worker holds
    def _beat(self) -> None:
        interval = self.storage.get_heartbeat_interval() or 10
        while not self._stop.wait(interval):
            for trial_id in list(self.beating):
                with contextlib.suppress(Exception):
                    self.storage.record_heartbeat(trial_id)

    def _hold(self, trial_id: int) -> None:
        self.storage.record_heartbeat(trial_id)
        self.beating.add(trial_id)

    def _claim(self, trial_id: int) -> bool:
        """WAITING -> RUNNING for this worker only."""
        try:
            with self.lock():
                if not self.storage.set_trial_state_values(trial_id, state=TrialState.RUNNING):
                    return False
                self._hold(trial_id)
                return True
        except optuna.exceptions.UpdateFinishedTrialError:
            return False

    def _pop(self) -> int | None:
        for t in self.storage.get_all_trials(self.study._study_id, deepcopy=False, states=(TrialState.WAITING,)):
            if self._claim(t._trial_id):
                return t._trial_id
        return None

    def _finish(self, trial_id: int, state: TrialState, value: float | None = None, **attrs: object) -> None:
        for key, val in attrs.items():
            self.storage.set_trial_user_attr(trial_id, key, val)
        self.storage.set_trial_state_values(trial_id, state=state, values=None if value is None else [value])
        self.beating.discard(trial_id)
        self.blocked_since.pop(trial_id, None)
        if trial_id in self.held:
            self.held.remove(trial_id)

    def run(self) -> None:
        beat = threading.Thread(target=self._beat, daemon=True, name=f"heartbeat-{self.label}")
        beat.start()
        try:
            self._loop()
        finally:
            self._stop.set()

    def _loop(self) -> None:
        while True:
            with self.lock():
                optuna.storages.fail_stale_trials(self.study)
            trials = self.study.get_trials(deepcopy=False)
            states = collect(trials)
            if self.held:
                if not self._advance(states):
                    time.sleep(self.poll_s)
                continue
            trial_id = self._pop()
            if trial_id is not None:
                self._take(trial_id)
                continue
            mine = self.beating
            others = [t for t in trials if t.state == TrialState.RUNNING and t._trial_id not in mine]
            if others:
                time.sleep(self.poll_s)
                continue
            if not self._refill(states):
                return

    def _take(self, trial_id: int) -> None:
        if not self._duplicate(trial_id):
            self.held.append(trial_id)

    def _duplicate(self, trial_id: int) -> bool:
        """Drop a claimed trial whose slot another trial holds or has done (read after claiming: of two
        workers that claim copies of one slot at once, at least one sees the other's claim)."""
        trials = self.study.get_trials(deepcopy=False)
        mine = next(t for t in trials if t._trial_id == trial_id)
        key = mine.user_attrs["slot"]
        st = collect([t for t in trials if t.user_attrs.get("slot") == key])[key]
        earlier = [t.number for t in trials if t._trial_id in st.running and t._trial_id < trial_id]
        if st.done is None and not earlier:
            return False
        first = st.done["number"] if st.done else earlier[0]
        self._finish(trial_id, TrialState.PRUNED, outcome="duplicate", message=f"slot taken by trial {first}")
        return True

    def _advance(self, states: dict[str, sp.KeyState]) -> bool:
        """Run or settle a held trial whose dependencies are done; else claim a WAITING dependency.
        False: nothing to do but wait for others."""
        waiting_deps: list[int] = []
        for trial_id in list(self.held):
            key = self.storage.get_trial(trial_id).user_attrs["slot"]
            slot = sp.Slot.from_key(key)
            res = sp.resolve(slot, self.design, states)
            if res.status == "ready":
                self._execute(trial_id, slot, res.spec)
                return True
            if res.status == "skip":
                self._finish(trial_id, TrialState.PRUNED, outcome="skipped", message=res.reason)
                return True
            if res.status == "blocked":
                newest = max((f[0] for k in res.deps for f in states.get(k, sp.KeyState()).failed), default=0.0)
                since = self.blocked_since.setdefault(trial_id, time.time())
                if time.time() - max(since, newest) > BLOCKED_AFTER_S:
                    self._finish(trial_id, TrialState.FAIL, outcome="error", message=f"not run: {res.reason}")
                    return True
                continue
            self.blocked_since.pop(trial_id, None)
            waiting_deps += [i for k in res.deps for i in states.get(k, sp.KeyState()).waiting]
        for dep in waiting_deps:  # a dependency nobody runs (e.g. a dead worker's, queued again): run it here
            if self._claim(dep):
                self._take(dep)
                return True
        return False

    def _execute(self, trial_id: int, slot: sp.Slot, spec: sp.Spec) -> None:
        name = spec.experiment(self.prefix, slot.kind)
        self.storage.set_trial_user_attr(trial_id, "experiment", name)
        self.storage.set_trial_user_attr(trial_id, "worker", f"{socket.gethostname()}:{os.getpid()}:{self.label}")
        resolved = {"loss": spec.loss, "optimizer": spec.optimizer, "learning_rate": spec.lr, "seed": spec.seed}
        print(f"[{self.label}] trial {self.storage.get_trial(trial_id).number}: {name} ...", flush=True)
        try:
            record = run_experiment(spec, name, self.design, self.gradients, self.push)
        except TrialFailed as exc:
            self._finish(trial_id, TrialState.FAIL, outcome="error", message=str(exc), **resolved)
            print(f"[{self.label}] {name}: failed: {exc}", flush=True)
            return
        self.ran += 1
        if record["outcome"] == "diverged":
            self._finish(trial_id, TrialState.PRUNED, **record, **resolved)
            print(f"[{self.label}] {name}: diverged ({record['run_s']:.0f} s)", flush=True)
            return
        self._finish(trial_id, TrialState.COMPLETE, record["val_accuracy"], **record, **resolved)
        print(
            f"[{self.label}] {name}: validation {record['val_accuracy']:.4f}, test {record['test_accuracy']:.4f} "
            f"({record['run_s']:.0f} s)",
            flush=True,
        )

    def _refill(self, states: dict[str, sp.KeyState]) -> bool:
        """Queue the slots with no trial, or whose trials all failed before this run began. False: all done."""
        todo = []
        for slot in sp.plan(self.design):
            st = states.get(slot.key, sp.KeyState())
            idle = st.done is None and not st.waiting and not st.running
            if idle and not any(when >= self.started for when, _, _ in st.failed):
                todo.append(slot)
        if not todo:
            return False
        with self.lock():
            for slot in todo:
                self.study.enqueue_trial({}, user_attrs=slot_attrs(slot))
        return True
