"""Compare experiments: `dvc.api.exp_show()` -> reports/compare.md and reports/compare.png.

The table lists every experiment of the current commit (and the commit itself): loss,
optimizer, learning rate, epochs, test accuracy, test log loss (one scale for every loss) and macro F1,
best accuracy first.
The picture overlays the per-epoch validation loss and validation accuracy of each
experiment (colour = loss, line style = optimizer), read from the curves each experiment
recorded (DVC-cached outputs, read with `dvc.api.read`). With `--readme docs/sweep.md` the table
also replaces the block between `<!-- compare:start -->` and `<!-- compare:end -->` there. Nothing is typed in by hand.
It never shrinks a table: with fewer experiments than the table already shows (a fresh
clone has none), it stops with one line unless `--replace` says to.

    python -m commands.report [--out reports] [--readme docs/sweep.md] [--replace]
"""

from __future__ import annotations

import argparse
import json
import os
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import dvc.api
import matplotlib
from dvc.exceptions import DvcException

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.lines import Line2D

from pipeline import atomic, errors, runner

TRAIN_SUMMARY, SCORES = "metrics/train/metrics.json", "metrics/eval/metrics.json"
PARAM_SECTIONS = ("data", "normalize", "model", "train", "evaluate")
CURVES = {
    "val_loss": "metrics/train/plots/metrics/eval/loss.tsv",
    "val_accuracy": "metrics/train/plots/metrics/eval/accuracy.tsv",
}
MARKERS = ("<!-- compare:start -->", "<!-- compare:end -->")


@dataclass
class Experiment:
    name: str
    rev: str
    row: dict[str, Any]  # one row of dvc.api.exp_show(): params and the declared (test) metrics

    def value(self, key: str) -> Any:
        """A column of the row: DVC prefixes a name with its file only where two files share it."""
        for column in (key, f"params.yaml:{key}", f"metrics/eval.json:{key}"):
            if column in self.row:
                value = self.row[column]
                return None if value in ("None", "-", "", "!") else value  # "!": DVC could not read it
        return None

    def committed(self, path: str) -> dict[str, Any]:
        """A JSON output as this experiment recorded it (from DVC's cache), or {} where it has none."""
        text = read_output(self.rev, path)
        return json.loads(text) if text else {}

    @cached_property
    def train_summary(self) -> dict[str, Any]:
        return self.committed(TRAIN_SUMMARY)

    @cached_property
    def scores(self) -> dict[str, Any]:
        return self.committed(SCORES)

    def cell(self, column: str) -> str:
        opt_name, lr = self.value("train.optimizer.name"), self.value("train.optimizer.learning_rate")
        extras = [
            f"{k.rsplit('.', 1)[1]}={_number(v)}"
            for k, v in self.row.items()
            if k.startswith("train.optimizer.")
            and k not in ("train.optimizer.name", "train.optimizer.learning_rate")
            and v not in ("None", "-", None)
        ]
        values = {
            "experiment": self.name,
            "loss": self.value("train.loss"),
            "optimizer": " ".join([str(opt_name), *extras]),
            "lr": _number(lr),
            "epochs": self.train_summary.get("epochs_run"),
            "test accuracy": self.value("test.accuracy"),
            "test log loss": self.value("test.log_loss"),
            "macro F1": self.scores.get("f1_macro"),
        }
        value = values[column]
        return f"{value:.4f}" if isinstance(value, float) and column != "lr" else str(value)


COLUMNS = ("experiment", "loss", "optimizer", "lr", "epochs", "test accuracy", "test log loss", "macro F1")


def _number(value: Any) -> Any:
    """A number as people write it (exp_show gives every number as a float): 10, 0.001, 1e+30."""
    return f"{value:g}" if isinstance(value, float) else value


def read_output(rev: str, path: str) -> str | None:
    """A pipeline output's text as commit or experiment `rev` recorded it, or None where it has none.

    Outputs are DVC-cached: `dvc.api.read` finds the version dvc.lock names at `rev` in the cache.
    """
    try:
        return dvc.api.read(path, rev=rev)
    except (FileNotFoundError, DvcException):
        return None


def _params(exp: Experiment) -> dict[str, str]:
    names = {k: k.removeprefix("params.yaml:") for k in exp.row}
    return {n: str(exp.row[k]) for k, n in names.items() if "/" not in n and n.split(".")[0] in PARAM_SECTIONS}


def experiments(rows: list[dict[str, Any]]) -> list[Experiment]:
    """Finished experiments and baseline commits, from dvc.api.exp_show() rows, best test accuracy first."""
    found = []
    for row in rows:
        if row.get("rev") == "workspace" or row.get("State") in ("Queued", "Running", "Failed"):
            continue
        exp = Experiment(row.get("Experiment") or row["rev"], row["rev"], row)
        if exp.value("test.accuracy") is None:  # never evaluated
            continue
        found.append(exp)
    # a commit whose params an experiment repeats is that experiment (DVC restores it from its run-cache)
    baselines = [e for e in found if e.row.get("typ") == "baseline"]
    repeated = [b for b in baselines if any(o is not b and _params(o) == _params(b) for o in found)]
    unique = [e for e in found if e not in repeated]
    return sorted(unique, key=lambda e: -(e.value("test.accuracy") or 0))


def markdown(exps: list[Experiment]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(e.cell(c) for c in COLUMNS) + " |" for e in exps]
    return "\n".join(lines) + "\n"


def curve(rev: str, path: str) -> tuple[list[int], list[float]]:
    """Per-epoch values of one dvclive TSV as `rev` recorded it."""
    text = read_output(rev, path)
    if text is None:
        return [], []
    rows = [line.split("\t") for line in text.splitlines()[1:] if line]
    return [int(r[0]) + 1 for r in rows], [float(r[1]) for r in rows]


def plot(exps: list[Experiment], out: Path) -> None:
    """Validation loss and accuracy per epoch, one line per experiment: colour = loss, style = optimizer."""
    losses = sorted({e.cell("loss") for e in exps})
    optimizers = sorted({(e.cell("optimizer"), e.cell("lr")) for e in exps})
    colours = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(losses)}
    styles = {key: ("-", "--", ":", "-.")[i % 4] for i, key in enumerate(optimizers)}
    fig, axes = plt.subplots(1, 2, figsize=(14, 6))
    for e in exps:
        style = {"color": colours[e.cell("loss")], "linestyle": styles[(e.cell("optimizer"), e.cell("lr"))]}
        for ax, path in zip(axes, CURVES.values(), strict=True):
            ax.plot(*curve(e.rev, path), **style, linewidth=1.4, alpha=0.85)
    axes[0].set(title="Validation loss (each loss on its own scale)", xlabel="epoch", ylabel="val_loss", yscale="log")
    axes[1].set(title="Validation top-1 accuracy", xlabel="epoch", ylabel="val_accuracy", ylim=(0, 1))
    for ax in axes:
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    loss_keys = [Line2D([], [], color=colours[name], label=name) for name in losses]
    opt_keys = [Line2D([], [], color="black", linestyle=styles[k], label=f"{k[0]}, lr {k[1]}") for k in optimizers]
    fig.legend(handles=loss_keys, loc="lower left", ncol=4, fontsize=8, frameon=False, title="loss (colour)")
    fig.legend(handles=opt_keys, loc="lower right", ncol=1, fontsize=8, frameon=False, title="optimizer (line)")
    fig.tight_layout(rect=(0, 0.05 + 0.03 * max((len(losses) + 3) // 4, len(optimizers)), 1, 1))
    atomic.save_figure(fig, out, dpi=90)
    plt.close(fig)


def rows_shown(text: str) -> int:
    """How many experiments a table written by `markdown` holds (in a README: the compare block's)."""
    start, end = MARKERS
    if start in text and end in text:
        text = text[text.index(start) : text.index(end)]
    return sum(1 for line in text.splitlines() if line.startswith("| ") and not line.startswith("| experiment |"))


def update_readme(readme: Path, table: str, image: str) -> None:
    text = readme.read_text(encoding="utf-8")
    start, end = MARKERS
    if start not in text or end not in text:
        raise errors.StageError(f"{readme} has no {start} ... {end} block to fill")
    image = Path(os.path.relpath(image, readme.parent)).as_posix()  # the link works from the page's folder
    block = f"{start}\n{table}\n![Validation curves per experiment]({image})\n{end}"
    atomic.write_text(readme, re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m commands.report", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("reports"), help="folder for compare.md and compare.png")
    parser.add_argument("--readme", type=Path, help="also fill the compare block of this README")
    parser.add_argument("--replace", action="store_true", help="replace a table that shows more experiments")
    args = parser.parse_args()
    exps = experiments(dvc.api.exp_show())
    if not exps:
        raise errors.StageError("no finished experiments to compare; run `make sweep` or `dvc exp run` first")
    for existing in [args.out / "compare.md", *([args.readme] if args.readme else [])]:
        shown = rows_shown(existing.read_text(encoding="utf-8")) if existing.exists() else 0
        if len(exps) < shown and not args.replace:
            raise errors.StageError(
                f"{existing} shows {shown} experiments but only {len(exps)} are here (experiments live in the "
                "machine that ran them); nothing was changed. Run `make sweep` first, `dvc exp pull` them, "
                "or pass --replace (make compare REPLACE=1) to overwrite"
            )
    write(exps, args.out, args.readme)


def write(exps: list[Experiment], out: Path, readme: Path | None = None) -> None:
    """The table and picture of `exps` -> out/compare.md and out/compare.png (and `readme`'s block)."""
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(exps)
    plot(exps, out / "compare.png")
    atomic.write_text(out / "compare.md", f"{table}\n![Validation curves per experiment](compare.png)\n")
    if readme:
        update_readme(readme, table, (out / "compare.png").as_posix())
    print(table)
    print(f"{len(exps)} experiment{'s' * (len(exps) != 1)} -> {out / 'compare.md'}, {out / 'compare.png'}")


if __name__ == "__main__":
    runner.run(main, writes_outputs=False)
