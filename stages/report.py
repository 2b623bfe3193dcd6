"""Compare experiments: `dvc exp show --json` -> reports/compare.md and reports/compare.png.

The table lists every experiment of the current commit (and the commit itself): loss,
optimizer, learning rate, epochs, test accuracy, test loss, macro F1 and training time, best
accuracy first. The picture overlays the per-epoch validation loss and validation accuracy
of each experiment (colour = loss, line style = optimizer), read from the curves each
experiment committed. With `--readme README.md` the table also replaces the block between
`<!-- compare:start -->` and `<!-- compare:end -->` there. Nothing is typed in by hand.

    python -m stages.report [--out reports] [--readme README.md]
"""

from __future__ import annotations

import argparse
import io
import json
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.lines import Line2D

from stages.lib import errors

CURVES = {
    "val_loss": "metrics/train/plots/metrics/eval/loss.tsv",
    "val_accuracy": "metrics/train/plots/metrics/eval/accuracy.tsv",
}
MARKERS = ("<!-- compare:start -->", "<!-- compare:end -->")


@dataclass
class Experiment:
    name: str
    rev: str
    params: dict
    train: dict
    test: dict

    def cell(self, column: str) -> str:
        t, opt = self.params.get("train", {}), self.params.get("train", {}).get("optimizer", {})
        values = {
            "experiment": self.name,
            "loss": t.get("loss"),
            "optimizer": " ".join(
                [str(opt.get("name"))] + [f"{k}={v}" for k, v in opt.items() if k not in ("name", "learning_rate")]
            ),
            "lr": opt.get("learning_rate"),
            "epochs": self.train.get("epochs_run"),
            "test accuracy": self.test.get("accuracy"),
            "test loss": self.test.get("loss"),
            "macro F1": self.test.get("f1_macro"),
            "train time (s)": self.train.get("train_time_s"),
        }
        value = values[column]
        return f"{value:.4f}" if isinstance(value, float) and column not in ("lr", "train time (s)") else str(value)


COLUMNS = (
    "experiment",
    "loss",
    "optimizer",
    "lr",
    "epochs",
    "test accuracy",
    "test loss",
    "macro F1",
    "train time (s)",
)


def dvc(*args: str) -> str:
    proc = subprocess.run(["dvc", *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise errors.StageError(f"`dvc {' '.join(args)}` failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def experiments(show: list[dict]) -> list[Experiment]:
    """Baseline commits and their experiments, with results, from `dvc exp show --json`."""
    found, baselines = [], set()
    for baseline in show:
        if baseline["rev"] == "workspace":
            continue
        baselines.add(baseline["rev"])
        entries = [(baseline.get("name") or baseline["rev"][:7], baseline)]
        for exp in baseline.get("experiments") or []:
            entries += [(exp.get("name") or r["rev"][:7], r) for r in exp.get("revs", [])]
        for name, entry in entries:
            data = entry.get("data") or {}
            metrics = data.get("metrics") or {}
            test = (metrics.get("metrics/eval.json") or {}).get("data")
            if not test:  # failed, queued or never evaluated
                continue
            params = ((data.get("params") or {}).get("params.yaml") or {}).get("data", {})
            train = (metrics.get("metrics/train/metrics.json") or {}).get("data", {})
            found.append(Experiment(name, entry["rev"], params, train, test))
    # a commit whose params an experiment repeats is that experiment (DVC restores it from its run cache)
    repeated = [e for e in found if any(o is not e and o.params == e.params for o in found) and e.rev in baselines]
    unique = [e for e in found if e not in repeated]
    return sorted(unique, key=lambda e: -(e.test.get("accuracy") or 0))


def markdown(exps: list[Experiment]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(e.cell(c) for c in COLUMNS) + " |" for e in exps]
    return "\n".join(lines) + "\n"


def curve(rev: str, path: str) -> tuple[list[int], list[float]]:
    """Per-epoch values of one dvclive TSV as committed in `rev` (they are git-tracked)."""
    proc = subprocess.run(["git", "show", f"{rev}:{path}"], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return [], []
    rows = [line.split("\t") for line in io.StringIO(proc.stdout).read().splitlines()[1:] if line]
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
    fig.savefig(out, dpi=90)
    plt.close(fig)


def update_readme(readme: Path, table: str, image: str) -> None:
    text = readme.read_text()
    start, end = MARKERS
    if start not in text or end not in text:
        raise errors.StageError(f"{readme} has no {start} ... {end} block to fill")
    block = f"{start}\n{table}\n![Validation curves per experiment]({image})\n{end}"
    readme.write_text(re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("reports"), help="folder for compare.md and compare.png")
    parser.add_argument("--readme", type=Path, help="also fill the compare block of this README")
    args = parser.parse_args()
    exps = experiments(json.loads(dvc("exp", "show", "--json")))
    if not exps:
        raise errors.StageError("no finished experiments to compare; run `make sweep` or `dvc exp run` first")
    args.out.mkdir(parents=True, exist_ok=True)
    table = markdown(exps)
    plot(exps, args.out / "compare.png")
    (args.out / "compare.md").write_text(f"{table}\n![Validation curves per experiment](compare.png)\n")
    if args.readme:
        update_readme(args.readme, table, (args.out / "compare.png").as_posix())
    print(table)
    print(f"{len(exps)} experiments -> {args.out / 'compare.md'}, {args.out / 'compare.png'}")


if __name__ == "__main__":
    errors.run(main)
