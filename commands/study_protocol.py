"""The study's protocol, as data: its runs, phase by phase, and what the finished runs choose.

A configuration is a (loss, optimizer) pair. Its learning rate is tuned on a log grid at the first seed by the
*validation* accuracy of the saved epoch (ties: the smaller rate); the best rate is rerun at the other seeds (the
tuning run at it is the first seed's). Two-stage design (default): every optimizer with the baseline loss (stage 1),
then every loss with the optimizer of the highest mean validation accuracy at its best rate (stage 2); or a grid of
every loss x every optimizer; the baseline pair is always in. Phases, each known once the runs before it are done:
`tune` (stage 1's tuning runs, the diagnostics), `seeds`, then `tune-2`, `seeds-2` (none in a grid). Nothing here
touches Optuna or DVC: `commands.study_worker` queues and runs the phases.
"""

from __future__ import annotations

import dataclasses
import statistics as pystats

import numpy as np

BEST = "best"  # a stage-2 configuration's optimizer in the report, until stage 1 has chosen it
BASELINE = ("sparse_categorical_crossentropy", "adam")
DEFAULT_OPTIMIZERS = ("adam", "sgd", "rmsprop", "adamw", "adagrad", "nadam")
DEFAULT_LRS = (0.0001, 0.001, 0.01, 0.1, 1.0)
DEFAULT_SEEDS = 5
FIRST_SEED = 42  # the project's default train.seed: the first seed's runs can come from the run-cache
# The tutorial's cases: small-gradient losses at SGD's small default step against Adam (gradient norms logged)
DEFAULT_DIAGNOSTICS = (("binary_crossentropy", "sgd", 0.001), ("binary_crossentropy", "adam", 0.001),
                       ("mean_squared_error", "sgd", 0.001), ("mean_squared_error", "adam", 0.001))  # fmt: skip
KINDS = ("tune", "seed", "diag")
# the keys each run's own settings hold (`study_worker.settings`): not another `-S`'s to change
STUDY_KEYS = ("train.loss", "train.optimizer.name", "train.optimizer.learning_rate", "train.seed", "train.epochs",
              "data.source", "train.log_gradients")  # fmt: skip
# short names for experiment names (git ref names: letters, digits, '-', '.')
LOSS_ABBR = {"sparse_categorical_crossentropy": "scce", "categorical_crossentropy": "cce", "binary_crossentropy": "bce",
             "categorical_focal_crossentropy": "cfce", "binary_focal_crossentropy": "bfce", "kl_divergence": "kld",
             "poisson": "poisson", "categorical_hinge": "chinge", "squared_hinge": "sqhinge",
             "mean_squared_error": "mse"}  # fmt: skip


def lr_text(lr: float) -> str:
    """A learning rate as people write it and YAML 1.1 and 1.2 both read as a float: plain decimals
    up to 8 characters (`0.0001`, never `1e-04`, a string to YAML 1.1), else `1.0e+30` (in names too)."""
    plain = np.format_float_positional(float(lr), trim="-")
    return plain if len(plain) <= 8 else np.format_float_scientific(float(lr), trim="0", exp_digits=2)


@dataclasses.dataclass(frozen=True)
class Design:
    """Everything that decides which runs the study makes; stored with the study and checked on rejoin."""

    optimizers: tuple[str, ...] = DEFAULT_OPTIMIZERS
    losses: tuple[str, ...] = tuple(LOSS_ABBR)
    lrs: tuple[float, ...] = DEFAULT_LRS
    seeds: tuple[int, ...] = tuple(range(FIRST_SEED, FIRST_SEED + DEFAULT_SEEDS))
    epochs: int = 10
    source: str | None = None  # None: params.yaml's data.source
    settings: tuple[tuple[str, str], ...] = ()  # other params.yaml values for every run (`-S KEY=VALUE`)
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
        losses = self.losses if self.grid else self.baseline[:1]
        return list(dict.fromkeys([self.baseline, *((loss, opt) for loss in losses for opt in self.optimizers)]))

    def stage2(self, optimizer: str | None) -> list[tuple[str, str]]:
        """Every other loss with stage 1's best optimizer (none in a grid, or when no optimizer trained)."""
        losses = dict.fromkeys(loss for loss in self.losses if loss != self.baseline[0])
        return [] if self.grid or optimizer is None else [(loss, optimizer) for loss in losses]

    def phases(self) -> tuple[str, ...]:
        return ("tune", "seeds") if self.grid else ("tune", "seeds", "tune-2", "seeds-2")


@dataclasses.dataclass(frozen=True)
class Run:
    """One run of the study; the field names are its Optuna trial's params."""

    kind: str  # tune | seed | diag
    loss: str
    optimizer: str
    learning_rate: float
    seed: int

    def experiment(self, prefix: str) -> str:
        """Its DVC experiment's name, e.g. study-scce-adam-lr0.001-s42 (study-diag-... for diagnostics)."""
        tag = "diag-" if self.kind == "diag" else ""
        loss = LOSS_ABBR.get(self.loss, self.loss)
        return f"{prefix}-{tag}{loss}-{self.optimizer}-lr{lr_text(self.learning_rate)}-s{self.seed}"


def ok(record: dict | None) -> bool:
    return bool(record) and record.get("outcome") == "ok"


def runs_of(design: Design, phase: str, done: dict[Run, dict]) -> list[Run]:
    """The runs of `phase`, chosen by the records of the runs before it (`done`: each done run's record)."""
    first, rest = design.seeds[0], design.seeds[1:]
    stage = design.stage1() if phase in ("tune", "seeds") else design.stage2(best_optimizer(design, done))
    if phase.startswith("tune"):
        runs = [Run("tune", loss, opt, lr, first) for loss, opt in stage for lr in design.lrs]
        diagnostics = [Run("diag", loss, opt, lr, first) for loss, opt, lr in design.diagnostics]
        return runs + diagnostics if phase == "tune" else runs
    best = {config: best_lr(design, config, done) for config in stage}
    return [Run("seed", *config, lr, seed) for config, lr in best.items() if lr is not None for seed in rest]


def next_phase(design: Design, done: dict[Run, dict]) -> tuple[str, list[Run]] | None:
    """The first phase with a run not done, and its runs; None when every run of the study is done."""
    for phase in design.phases():
        runs = runs_of(design, phase, done)
        if any(run not in done for run in runs):
            return phase, runs
    return None


def planned(design: Design, done: dict[Run, dict]) -> tuple[list[Run], int]:
    """The runs known so far (each phase's, up to the first not done) and how many the later phases will add
    when every configuration trains."""
    pending, phases = next_phase(design, done), design.phases()
    cut = phases.index(pending[0]) + 1 if pending else len(phases)
    stage1, stage2, seeds = len(design.stage1()), len(design.stage2(BEST)), len(design.seeds) - 1
    size = {"seeds": stage1 * seeds, "tune-2": stage2 * len(design.lrs), "seeds-2": stage2 * seeds}
    return [run for phase in phases[:cut] for run in runs_of(design, phase, done)], sum(map(size.get, phases[cut:]))


def best_lr(design: Design, config: tuple[str, str], done: dict[Run, dict]) -> float | None:
    """The learning rate whose tuning run has the highest validation accuracy (ties: the smaller rate); None
    while none of them has trained."""
    runs = [(lr, done.get(Run("tune", *config, lr, design.seeds[0]))) for lr in design.lrs]
    scored = [(record["val_accuracy"], -lr) for lr, record in runs if ok(record)]
    return -max(scored)[1] if scored else None


def seed_runs(design: Design, config: tuple[str, str], done: dict[Run, dict]) -> dict[int, dict]:
    """Each seed's record at the configuration's best learning rate (the first seed's: its tuning run), trained ones."""
    lr = best_lr(design, config, done)
    if lr is None:
        return {}
    records = {seed: done.get(Run("seed", *config, lr, seed)) for seed in design.seeds[1:]}
    records[design.seeds[0]] = done.get(Run("tune", *config, lr, design.seeds[0]))
    return {seed: records[seed] for seed in design.seeds if ok(records[seed])}


def best_optimizer(design: Design, done: dict[Run, dict]) -> str | None:
    """Stage 1's optimizer with the highest mean validation accuracy over the seeds (ties: listed first);
    BEST until every run of stage 1 is done, None when none trained."""
    stage1 = runs_of(design, "tune", done) + runs_of(design, "seeds", done)
    if any(run not in done for run in stage1):
        return BEST
    scores = []
    for index, config in enumerate(design.stage1()):
        values = [record["val_accuracy"] for record in seed_runs(design, config, done).values()]
        if values:
            scores.append((pystats.fmean(values), -index, config[1]))
    return max(scores)[2] if scores else None
