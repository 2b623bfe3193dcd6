"""The study's protocol, as data: which runs it needs, and what each run's open choices resolve to.

A configuration is a (loss, optimizer) pair. For each one the learning rate is tuned on a log grid
at the first seed by the *validation* accuracy of the saved epoch, then the best learning rate is
rerun at the other seeds (the tuning run at that rate is the first seed's run). Two designs:

- two-stage (default): every optimizer with the baseline loss (stage 1), then every loss with the
  optimizer whose mean validation accuracy over the seeds, at its best learning rate, is highest
  (stage 2: its optimizer is "best" until stage 1 is done);
- grid: every loss x every optimizer.

The baseline pair (default: the project's default loss and Adam) is always in. The plan is a fixed
list of slots, known before any result: a seed slot's learning rate and a stage-2 slot's optimizer
are resolved when a worker takes the slot, from the finished runs its choice depends on. Slots are
ordered so that a slot's dependencies come before it (a worker that takes one early waits, rarely).
Nothing here touches Optuna or DVC: `commands.study_worker` stores and runs the slots.
"""

from __future__ import annotations

import dataclasses
import hashlib
import statistics as pystats
from dataclasses import dataclass, field

import numpy as np

BEST = "best"  # the optimizer of a stage-2 slot, until stage 1 has chosen it
BASELINE = ("sparse_categorical_crossentropy", "adam")
DEFAULT_OPTIMIZERS = ("adam", "sgd", "rmsprop", "adamw", "adagrad", "nadam")
DEFAULT_LRS = (0.0001, 0.001, 0.01, 0.1, 1.0)
DEFAULT_SEEDS = 5
FIRST_SEED = 42  # the project's default train.seed: the first seed's runs can come from the run-cache
# The tutorial's cases: small-gradient losses at SGD's small default step against Adam (gradient norms logged)
DEFAULT_DIAGNOSTICS = (
    ("binary_crossentropy", "sgd", 0.001),
    ("binary_crossentropy", "adam", 0.001),
    ("mean_squared_error", "sgd", 0.001),
    ("mean_squared_error", "adam", 0.001),
)
# short names for experiment names (git ref names: letters, digits, '-', '.')
LOSS_ABBR = {
    "sparse_categorical_crossentropy": "scce",
    "categorical_crossentropy": "cce",
    "binary_crossentropy": "bce",
    "categorical_focal_crossentropy": "cfce",
    "binary_focal_crossentropy": "bfce",
    "kl_divergence": "kld",
    "poisson": "poisson",
    "categorical_hinge": "chinge",
    "squared_hinge": "sqhinge",
    "mean_squared_error": "mse",
}


def lr_text(lr: float) -> str:
    """A learning rate as people write it and YAML 1.1 and 1.2 both read as a float: plain decimals
    up to 8 characters (`0.0001`, never `1e-04`, a string to YAML 1.1), else `1.0e+30` (in names too)."""
    plain = np.format_float_positional(float(lr), trim="-")
    return plain if len(plain) <= 8 else np.format_float_scientific(float(lr), trim="0", exp_digits=2)


@dataclass(frozen=True)
class Design:
    """Everything that decides which runs the study makes; stored with the study and checked on rejoin."""

    optimizers: tuple[str, ...] = DEFAULT_OPTIMIZERS
    losses: tuple[str, ...] = tuple(LOSS_ABBR)
    lrs: tuple[float, ...] = DEFAULT_LRS
    seeds: tuple[int, ...] = tuple(range(FIRST_SEED, FIRST_SEED + DEFAULT_SEEDS))
    epochs: int = 10
    source: str | None = None  # None: params.yaml's data.source
    grid: bool = False
    baseline: tuple[str, str] = BASELINE
    diagnostics: tuple[tuple[str, str, float], ...] = DEFAULT_DIAGNOSTICS
    code: str = ""  # hash of the pipeline's code and params at HEAD: every worker must run the same

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> Design:
        def tuples(value: object) -> object:
            return tuple(tuples(v) for v in value) if isinstance(value, list) else value

        return cls(**{k: tuples(v) for k, v in raw.items()})

    def stage1(self) -> list[tuple[str, str]]:
        """Configurations known before any run: the optimizers with the baseline loss (or the grid)."""
        loss0 = self.baseline[0]
        if self.grid:
            pairs = [(loss, opt) for loss in self.losses for opt in self.optimizers]
        else:
            pairs = [(loss0, opt) for opt in self.optimizers]
        return _unique([self.baseline, *pairs])

    def stage2(self) -> list[tuple[str, str]]:
        """Configurations with the best optimizer of stage 1 (none in a grid)."""
        if self.grid:
            return []
        return [(loss, BEST) for loss in _unique(list(self.losses)) if loss != self.baseline[0]]

    def configs(self) -> list[tuple[str, str]]:
        return self.stage1() + self.stage2()


def _unique(items: list) -> list:
    return list(dict.fromkeys(items))


@dataclass(frozen=True)
class Slot:
    """One run of the plan. `lr` None: the config's best (seed slots); `optimizer` BEST: stage 1's."""

    kind: str  # tune | seed | diag
    loss: str
    optimizer: str
    lr: float | None
    seed: int

    @property
    def key(self) -> str:
        lr = lr_text(self.lr) if self.lr is not None else "best"
        return f"{self.kind}|{self.loss}|{self.optimizer}|{lr}|{self.seed}"

    @classmethod
    def from_key(cls, key: str) -> Slot:
        kind, loss, optimizer, lr, seed = key.split("|")
        return cls(kind, loss, optimizer, None if lr == "best" else float(lr), int(seed))


def plan(design: Design) -> list[Slot]:
    """Every slot, dependencies first; each config's seeds after the next config's tuning runs."""
    first, rest = design.seeds[0], design.seeds[1:]

    def staged(configs: list[tuple[str, str]]) -> list[Slot]:
        out: list[Slot] = []
        pending: list[Slot] = []
        for loss, opt in configs:
            out += [Slot("tune", loss, opt, lr, first) for lr in design.lrs]
            out += pending
            pending = [Slot("seed", loss, opt, None, seed) for seed in rest]
        return out + pending

    diagnostics = [Slot("diag", loss, opt, lr, first) for loss, opt, lr in design.diagnostics]
    return staged(design.stage1()) + diagnostics + staged(design.stage2())


@dataclass
class KeyState:
    """What the storage holds for one slot: `done` (its record), else trial ids waiting / running / failed."""

    done: dict | None = None
    waiting: list[int] = field(default_factory=list)
    running: list[int] = field(default_factory=list)
    failed: list[tuple[float, str, int]] = field(default_factory=list)  # (when, message, trial number)


@dataclass(frozen=True)
class Spec:
    """A resolved slot: the exact run."""

    loss: str
    optimizer: str
    lr: float
    seed: int
    log_gradients: bool

    def experiment(self, prefix: str, kind: str) -> str:
        tag = "diag-" if kind == "diag" else ""
        return f"{prefix}-{tag}{LOSS_ABBR.get(self.loss, self.loss)}-{self.optimizer}-lr{lr_text(self.lr)}-s{self.seed}"


@dataclass(frozen=True)
class Resolution:
    status: str  # ready | wait | blocked | skip
    spec: Spec | None = None
    deps: tuple[str, ...] = ()  # keys not done yet (wait) or failed (blocked)
    reason: str = ""


class _NotYet(Exception):  # noqa: N818 - control flow inside resolve()
    def __init__(self, status: str, deps: list[str], reason: str = "") -> None:
        super().__init__(reason)
        self.status, self.deps, self.reason = status, deps, reason


def resolve(slot: Slot, design: Design, states: dict[str, KeyState]) -> Resolution:
    """The run a slot stands for, or what it waits for (`wait`), or why it cannot run (`blocked`, `skip`)."""
    try:
        optimizer = best_optimizer(design, states) if slot.optimizer == BEST else slot.optimizer
        lr = slot.lr if slot.lr is not None else best_lr(design, (slot.loss, slot.optimizer), states)
    except _NotYet as exc:
        return Resolution(exc.status, deps=tuple(exc.deps), reason=exc.reason)
    return Resolution("ready", Spec(slot.loss, optimizer, lr, slot.seed, slot.kind == "diag"))


def _need(keys: list[str], states: dict[str, KeyState]) -> list[dict]:
    missing = [k for k in keys if states.get(k, KeyState()).done is None]
    failed = [k for k in missing if not states.get(k, KeyState()).waiting and not states.get(k, KeyState()).running]
    if failed:
        raise _NotYet("blocked", failed, f"it depends on {len(failed)} run(s) that failed or were never queued")
    if missing:
        raise _NotYet("wait", missing)
    return [states[k].done for k in keys]


def ok(record: dict | None) -> bool:
    return bool(record) and record.get("outcome") == "ok"


def tuning(design: Design, config: tuple[str, str], states: dict[str, KeyState]) -> list[dict]:
    """The tuning runs' records of a config, in learning-rate order (raises _NotYet until all are done)."""
    loss, opt = config
    return _need([Slot("tune", loss, opt, lr, design.seeds[0]).key for lr in design.lrs], states)


def best_lr(design: Design, config: tuple[str, str], states: dict[str, KeyState]) -> float:
    """The learning rate with the highest validation accuracy (ties: the smaller rate)."""
    records = tuning(design, config, states)
    scored = [(r["val_accuracy"], -lr) for lr, r in zip(design.lrs, records, strict=True) if ok(r)]
    if not scored:
        raise _NotYet("skip", [], f"no learning rate of {config[0]} + {config[1]} trained (all diverged or skipped)")
    return -max(scored)[1]


def seed_runs(design: Design, config: tuple[str, str], states: dict[str, KeyState]) -> tuple[float, list[dict]]:
    """The best learning rate and the records of every seed's run at it (the first seed's is its tuning run)."""
    lr = best_lr(design, config, states)
    loss, opt = config
    keys = [Slot("tune", loss, opt, lr, design.seeds[0]).key]
    keys += [Slot("seed", loss, opt, None, seed).key for seed in design.seeds[1:]]
    return lr, _need(keys, states)


def best_optimizer(design: Design, states: dict[str, KeyState]) -> str:
    """Stage 1's optimizer with the highest mean validation accuracy over the seeds (ties: listed first)."""
    scores = []
    for index, (loss, opt) in enumerate(design.stage1()):
        try:
            _, runs = seed_runs(design, (loss, opt), states)
        except _NotYet as exc:
            if exc.status == "skip":
                continue
            raise
        vals = [r["val_accuracy"] for r in runs if ok(r)]
        if vals:
            scores.append((pystats.fmean(vals), -index, opt))
    if not scores:
        raise _NotYet("skip", [], "no optimizer of stage 1 trained")
    return max(scores)[2]


def code_id(listing: str) -> str:
    """A short hash of `git ls-tree HEAD -- <pipeline files>`: the code every worker must share."""
    return hashlib.sha256(listing.encode()).hexdigest()[:12]
