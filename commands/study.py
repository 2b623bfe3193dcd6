"""The study: a fair, repeatable answer to "which loss, which optimizer": `python -m commands.study`.

Each (loss, optimizer) configuration's learning rate is tuned on a log grid by the validation accuracy, the best
rate rerun with K seeds; the report (reports/study.md, study.json, plots) gives the test accuracy's mean with a 95%
interval beside the test set's own sampling error, the paired difference to the baseline, and the study held against
published results. Default design: every optimizer with the baseline loss, then every loss with the best of them
(`--grid`: every loss x every optimizer). Every run is a DVC experiment named for what it is
(`study-scce-adam-lr0.001-s42`); Optuna's storage (SQLite in .dvc/tmp, or PostgreSQL for several machines) holds the
plan, printed first, and the results: what is there is not rerun. Not a DVC stage: it drives DVC.

    python -m commands.study --workers 2
    python -m commands.study --losses binary_crossentropy --optimizers adam,sgd --lrs 0.001,0.1 --seeds 3 --epochs 1
    python -m commands.study --storage postgresql://user:pw@host/db --push origin    # on each machine (same commit)
    python -m commands.study --storage postgresql://user:pw@host/db --report-only    # any clone
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from commands import study_protocol as sp
from pipeline import datasets, errors, losses, optimizers, params, runner


def names(known: tuple[str, ...] | dict, what: str):
    def parse(text: str) -> tuple[str, ...]:
        items = tuple(x.strip() for x in text.split(",") if x.strip())
        bad = [x for x in items if x not in known]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(bad) or '(none)'} (known: {', '.join(known)})")
        return items

    return parse


def rates(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"learning rates must be numbers, got {text!r}") from None
    if not values or any(not 0 < v < math.inf for v in values):
        raise argparse.ArgumentTypeError(f"learning rates must be finite numbers > 0, got {text!r}")
    return tuple(sorted(set(values)))


def diagnostics(text: str) -> tuple[tuple[str, str, float], ...]:
    items = [] if text == "none" else [item.split(":") for item in text.split(",")]
    try:
        out = tuple((loss, opt, float(lr)) for loss, opt, lr in items)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--diagnostics takes loss:optimizer:lr,... or none, got {text!r}") from None
    if any(loss not in losses.LOSSES or opt not in optimizers.OPTIMIZERS for loss, opt, _ in out):
        raise argparse.ArgumentTypeError(f"--diagnostics: unknown loss or optimizer in {text!r}")
    return out


def setting(text: str) -> tuple[str, str]:
    key, equals, value = text.partition("=")
    if not equals or not key.strip():
        raise argparse.ArgumentTypeError(f"takes KEY=VALUE, as dvc exp run -S, got {text!r}")
    if key in sp.STUDY_KEYS:
        raise argparse.ArgumentTypeError(f"{key} is the study's to set (its own options set it), not -S")
    return key.strip(), value


def positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return int(text)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m commands.study", description=__doc__.splitlines()[0])
    default_diag = ",".join(f"{a}:{b}:{sp.lr_text(c)}" for a, b, c in sp.DEFAULT_DIAGNOSTICS)
    p.add_argument("--optimizers", type=names(optimizers.OPTIMIZERS, "optimizer"), default=sp.DEFAULT_OPTIMIZERS)
    p.add_argument("--losses", type=names(losses.LOSSES, "loss"), default=tuple(losses.LOSSES))
    p.add_argument("--lrs", type=rates, default=sp.DEFAULT_LRS, help="learning-rate grid (default 1e-4 ... 1)")
    p.add_argument("--seeds", type=positive, default=sp.DEFAULT_SEEDS, help="seeds per configuration (default 5)")
    p.add_argument("--first-seed", type=int, default=sp.FIRST_SEED, help="seeds are FIRST, FIRST+1, ... (42)")
    p.add_argument("--epochs", type=positive, default=10)
    p.add_argument("--source", choices=datasets.SOURCES, help="data.source (default: params.yaml's), e.g. mnist")
    p.add_argument("-S", "--set-param", type=setting, action="append", default=[], metavar="KEY=VALUE",
                   help="a params.yaml value for every run, as dvc exp run -S (data.url=file:///m.npz)")  # fmt: skip
    p.add_argument("--grid", action="store_true", help="every loss x every optimizer, not two stages")
    p.add_argument("--baseline", default=",".join(sp.BASELINE), help="LOSS,OPTIMIZER (default %(default)s)")
    p.add_argument("--diagnostics", type=diagnostics, help=f"loss:optimizer:lr,... or none (default: those of "
                   f"{default_diag} whose loss and optimizer the study runs)")  # fmt: skip
    p.add_argument("--workers", type=positive, default=1, help="workers in this process (one core each)")
    p.add_argument("--storage", default=None, help="Optuna storage URL (default: a SQLite file in .dvc/tmp)")
    p.add_argument("--study-name", default="study", help="also the experiments' name prefix (default study)")
    p.add_argument("--push", metavar="GIT_REMOTE", help="dvc exp push each finished experiment there")
    p.add_argument("--report-only", action="store_true", help="write the report from the storage; run nothing")
    p.add_argument("--reports", type=Path, help="report folder (reports; reports/studies/NAME for --study-name NAME)")
    p.add_argument("--heartbeat", type=positive, default=10, help=argparse.SUPPRESS)
    p.add_argument("--grace", type=positive, default=40, help=argparse.SUPPRESS)
    p.add_argument("--poll", type=float, default=2.0, help=argparse.SUPPRESS)
    return p.parse_args()


def design_from(args: argparse.Namespace, code: str) -> sp.Design:
    """The study's design from its options. Raises StageError for a bad --baseline or --study-name, and for settings
    of its own under the published study's name (its report would replace reports/study*)."""
    baseline = tuple(args.baseline.split(","))
    if len(baseline) != 2 or baseline[0] not in losses.LOSSES or baseline[1] not in optimizers.OPTIMIZERS:
        known = f"losses: {', '.join(losses.LOSSES)}; optimizers: {', '.join(optimizers.OPTIMIZERS)}"
        raise errors.StageError(f"--baseline takes LOSS,OPTIMIZER, got {args.baseline!r} ({known})")
    if not all(c.isalnum() or c in "-_" for c in args.study_name):
        raise errors.StageError(f"--study-name: letters, digits, - and _ only (names experiments): {args.study_name!r}")
    # by default the tutorial's cases that the study's losses and optimizers hold, stored as that list
    own = tuple(d for d in sp.DEFAULT_DIAGNOSTICS if d[0] in args.losses and d[1] in args.optimizers)
    seeds = tuple(range(args.first_seed, args.first_seed + args.seeds))
    design = sp.Design(optimizers=args.optimizers, losses=args.losses, lrs=args.lrs, seeds=seeds, epochs=args.epochs,
                       source=args.source, settings=tuple(args.set_param), grid=args.grid, baseline=baseline,
                       diagnostics=own if args.diagnostics is None else args.diagnostics, code=code)  # fmt: skip
    if args.study_name == "study" and dataclasses.replace(design, code="") != sp.Design():
        raise errors.StageError("a study with settings of its own needs a name of its own: --study-name NAME (make "
                                "study STUDY=NAME); its report goes to reports/studies/NAME/, the published "
                                "reports/study* come from the default study only")  # fmt: skip
    return design


def check_runs(design: sp.Design, sw: Any) -> None:
    """Read what the study's runs would write into params.yaml (HEAD's, with `dvc exp run -S`'s values: each
    configuration at the first and last rate and seed) with the pipeline's own schema, before the study is stored:
    a bad -S or --first-seed is one line here, not a failed run per trial. Raises StageError."""
    from ruamel.yaml import YAML

    yaml = YAML(typ="safe", pure=True)
    configs = [*design.stage1(), *((loss, design.baseline[1]) for loss in design.losses)]
    runs = [sp.Run("tune", *config, lr, seed) for config in configs
            for lr, seed in ((design.lrs[0], design.seeds[0]), (design.lrs[-1], design.seeds[-1]))]  # fmt: skip
    runs += [sp.Run("diag", loss, opt, lr, design.seeds[0]) for loss, opt, lr in design.diagnostics]
    head = sw.git("show", "HEAD:params.yaml")  # once: each run below parses its own copy
    for run in runs:
        raw = yaml.load(head) or {}
        for key, value in sw.settings(run, design, gradients=run.kind == "diag").items():
            *path, last = key.split(".")
            node = raw
            for part in path:
                node = node.setdefault(part, {}) if isinstance(node, dict) else {}
            node[last] = yaml.load(value)
        try:
            params.parse(raw)
        except errors.ParamError as exc:
            raise errors.StageError(f"the study's runs would be refused: {exc} (from -S, --first-seed or HEAD's "
                                    "params.yaml); nothing was run or stored") from None  # fmt: skip


def main() -> None:
    args = parse_args()
    # the published study's report is reports/study.md; a study of another name never writes over it
    named = Path("reports/studies", args.study_name)
    args.reports = args.reports or (Path("reports") if args.study_name == "study" else named)
    import optuna

    from commands import cache_integrity, study_report
    from commands import study_worker as sw

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # a failed run is one line of ours, with its log
    if not args.report_only:
        design = design_from(args, sw.code_id())  # first: before another worker's `dvc exp run -S` edits params.yaml
        check_runs(design, sw)
    url = args.storage or sw.DEFAULT_STORAGE
    storage = sw.open_storage(url, args.heartbeat, args.grace)
    if args.report_only:
        try:
            study = optuna.load_study(study_name=args.study_name, storage=storage)
        except KeyError:
            raise errors.StageError(f"no study {args.study_name!r} in {sw.redact(url)}") from None
        design = sp.Design.from_dict(study.user_attrs["design"])
    else:
        from dvc.repo import Repo

        with Repo(".") as repo:  # each run is a `dvc exp run --temp`
            cache_integrity.check_runs_outside_workspace(repo)
        study = sw.join_study(storage, args.study_name, design, args.grace)
        print(study_report.plan(design, sw.collect(study.get_trials(deepcopy=False))[0], args.workers), flush=True)
        started = time.time()
        options = {"push": args.push, "poll_s": args.poll, "grace_s": args.grace, "workers": args.workers}
        with ThreadPoolExecutor(args.workers) as pool:  # threads: each run is a dvc subprocess
            ran = pool.map(lambda i: sw.work(storage, args.study_name, design, label=f"w{i + 1}", **options),
                           range(args.workers))  # fmt: skip
            print(f"ran {sum(ran)} experiments in {time.time() - started:.0f} s", flush=True)
    done, failed = sw.collect(study.get_trials(deepcopy=False))
    sw.fill_n_test(done)
    failed = [sw.failure(t) for t in failed]
    known, later = sp.planned(design, done)
    planned = len(known) + later
    if done:  # a study where nothing finished leaves the reports that are there
        study_report.write(design, done, failed, args.study_name, args.reports)
        print(f"study {args.study_name!r}: {len(done)} of {planned} runs done -> {args.reports}/study.md")
    if failed:
        raise errors.StageError(f"{len(failed)} of {planned} runs failed (run the study again to retry them); "
                                f"first: {failed[0]['experiment']}: {failed[0]['message']}")  # fmt: skip


if __name__ == "__main__":
    runner.run(main, writes_outputs=False)
