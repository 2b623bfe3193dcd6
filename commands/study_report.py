"""The study's report, from the storage alone: reports/study.md, study.json and its plots.

Per configuration: the best learning rate (by validation accuracy), the test accuracy over the
seeds at it (mean, 95% t-interval), the paired difference to the baseline over the same seeds,
and the epochs each seed's run took to reach the baseline's mean validation accuracy. Plots: the
learning-rate sensitivity (validation accuracy against the rate, one line per configuration) and
the performance (mean and interval per configuration); with gradient logging, the diagnostics'
gradient norms and update ratios per epoch.
"""

from __future__ import annotations

import statistics as pystats
from pathlib import Path
from typing import Any

from commands import study_protocol as sp
from commands.statistics import mean_ci, paired_difference_ci
from pipeline import atomic

PLOT_LR = "study_lr_sensitivity.png"
PLOT_PERF = "study_performance.png"
PLOT_GRAD = "study_gradients.png"


def config_summary(design: sp.Design, config: tuple[str, str], done: dict[sp.Run, dict], stage: int) -> dict:
    """Everything the report says about one configuration (what has finished of it)."""
    loss, opt = config
    tune = [(lr, done.get(sp.Run("tune", loss, opt, lr, design.seeds[0]))) for lr in design.lrs]
    sensitivity = [
        {
            "learning_rate": lr,
            "validation_accuracy": rec.get("val_accuracy") if sp.ok(rec) else None,
            "outcome": rec["outcome"] if rec else "not run",
            "experiment": rec.get("experiment") if rec else None,
        }
        for lr, rec in tune
    ]
    runs = sp.seed_runs(design, config, done)
    return {
        "loss": loss,
        "optimizer": opt,
        "stage": stage,
        "baseline": config == tuple(design.baseline),
        "best_learning_rate": sp.best_lr(design, config, done),
        "seeds": sorted(runs),
        "test_accuracy": _interval([runs[s]["test_accuracy"] for s in sorted(runs)]),
        "validation_accuracy": _interval([runs[s]["val_accuracy"] for s in sorted(runs)]),
        "learning_rates": sensitivity,
        "experiments": [runs[s]["experiment"] for s in sorted(runs)],
        "_runs": runs,
    }


def _interval(values: list[float]) -> dict:
    if not values:
        return {"mean": None, "ci95": [None, None], "n": 0, "values": []}
    return {**mean_ci(values).as_dict(), "values": values}  # values: in the order of "seeds"


def summarize(design: sp.Design, done: dict[sp.Run, dict], failed: list[dict], name: str) -> dict:
    """The report's numbers (study.json). `done`: each done run's record; `failed`: {experiment, message,
    trial} of each run whose last trial failed."""
    best = sp.best_optimizer(design, done)
    stage2 = design.stage2(best or sp.BEST)  # "best" until stage 1 has chosen
    configs = [config_summary(design, c, done, 2 if c in stage2 else 1) for c in design.stage1() + stage2]
    base = next(c for c in configs if c["baseline"])
    base_runs = base["_runs"]
    target = pystats.fmean(r["val_accuracy"] for r in base_runs.values()) if base_runs else None
    for c in configs:
        runs = c.pop("_runs")
        common = [s for s in c["seeds"] if s in base_runs]
        if c["baseline"]:
            c["difference_to_baseline"] = {"mean": 0.0, "ci95": [0.0, 0.0], "n": len(common)}
        elif common:
            diff = paired_difference_ci(
                [runs[s]["test_accuracy"] for s in common], [base_runs[s]["test_accuracy"] for s in common]
            )
            c["difference_to_baseline"] = diff.as_dict()
        else:
            c["difference_to_baseline"] = {"mean": None, "ci95": [None, None], "n": 0}
        per_seed = [_first_reaching(runs[s]["val_curve"], target) for s in c["seeds"]] if target else []
        reached = [e for e in per_seed if e is not None]
        c["epochs_to_baseline_validation"] = {
            "target": target,
            "per_seed": per_seed,
            "median": pystats.median(reached) if reached else None,
            "reached": len(reached),
        }
    diagnostics = []
    for loss, opt, lr in design.diagnostics:
        rec = done.get(sp.Run("diag", loss, opt, lr, design.seeds[0]))
        if rec:
            diagnostics.append(
                {
                    "loss": loss,
                    "optimizer": opt,
                    "learning_rate": lr,
                    "outcome": rec.get("outcome"),
                    "experiment": rec.get("experiment"),
                    "val_curve": rec.get("val_curve"),
                    "gradients": rec.get("gradients", {}),
                }
            )
    known, later = sp.planned(design, done)
    finished = [done[run] for run in known if run in done]
    run_s = [record.get("run_s") or 0.0 for record in finished]
    return {
        "study": name,
        "design": {k: v for k, v in design.as_dict().items() if k != "diagnostics"},
        "baseline": {"loss": design.baseline[0], "optimizer": design.baseline[1]},
        "best_optimizer": best if stage2 and best != sp.BEST else None,
        "runs": {
            "planned": len(known) + later,
            "done": len(finished),
            "failed": len(failed),
            "run_seconds": round(sum(run_s), 1),
        },
        "configs": configs,
        "diagnostics": diagnostics,
        "failed": failed,
    }


def _first_reaching(curve: list[float], target: float) -> int | None:
    return next((epoch for epoch, value in enumerate(curve, start=1) if value >= target - 1e-12), None)


def _fmt(iv: dict, scale: float = 1.0, digits: int = 4, sign: bool = False) -> str:
    if iv.get("mean") is None:
        return "—"
    m = iv["mean"] * scale
    low, high = iv["ci95"]
    text = f"{m:+.{digits}f}" if sign else f"{m:.{digits}f}"
    if low is None or high is None:
        return text
    return f"{text} [{low * scale:.{digits}f}, {high * scale:.{digits}f}]"


def markdown(report: dict, images: list[str]) -> str:
    d = report["design"]
    base = report["baseline"]
    lines = [
        f"# Study `{report['study']}`: which loss, which optimizer",
        "",
        f"Each configuration's learning rate was tuned on {', '.join(sp.lr_text(x) for x in d['lrs'])} by the "
        f"validation accuracy (seed {d['seeds'][0]}); the best rate was rerun with seeds "
        f"{', '.join(map(str, d['seeds']))}; {d['epochs']} epochs each, data "
        f"`{d['source'] or 'params.yaml'}`. Test accuracy: mean over the seeds with its 95% t-interval. "
        f"Difference: paired by seed against the baseline ({base['loss']} + {base['optimizer']} at its own best "
        f"rate), in accuracy points. Epochs: the median number of epochs the seeds' runs took to reach the "
        f"baseline's mean validation accuracy (runs that reached it / runs).",
        "",
    ]
    if report["best_optimizer"]:
        lines += [f"Best optimizer of stage 1 (by validation accuracy): **{report['best_optimizer']}**.", ""]
    lines += [
        "| loss | optimizer | best lr | seeds | test accuracy [95% CI] | difference to baseline, points [95% CI] "
        "| epochs to baseline's val. acc. |",
        "|---|---|---|---|---|---|---|",
    ]
    ranked = sorted(report["configs"], key=lambda c: -(c["test_accuracy"]["mean"] or -1))
    for c in ranked:
        e = c["epochs_to_baseline_validation"]
        epochs = f"{e['median']:g} ({e['reached']}/{len(c['seeds'])})" if e["median"] is not None else "not reached"
        lr = sp.lr_text(c["best_learning_rate"]) if c["best_learning_rate"] is not None else "—"
        name = f"**{c['optimizer']}** (baseline)" if c["baseline"] else c["optimizer"]
        diff = "0" if c["baseline"] else _fmt(c["difference_to_baseline"], 100, 2, sign=True)
        lines.append(
            f"| {c['loss']} | {name} | {lr} | {len(c['seeds'])} | {_fmt(c['test_accuracy'])} | {diff} | {epochs} |"
        )
    lines += _sensitivity_table(report)
    if report["diagnostics"]:
        lines += _gradient_table(report)
    runs = report["runs"]
    lines += [
        "",
        f"Runs: {runs['done']} of {runs['planned']} done, {runs['failed']} failed; "
        f"{runs['run_seconds'] / 60:.1f} minutes of runs in all (summed over workers).",
    ]
    for f in report["failed"]:
        lines.append(f"- failed: `{f['experiment']}` (trial {f['trial']}): {f['message']}")
    lines += ["", *[f"![{alt}]({path})" for alt, path in images], ""]
    return "\n".join(lines)


def _sensitivity_table(report: dict) -> list[str]:
    lines = ["", "Validation accuracy at each learning rate (tuning runs; `div.`: training diverged):", ""]
    lrs = report["design"]["lrs"]
    lines += [
        "| loss | optimizer | " + " | ".join(sp.lr_text(x) for x in lrs) + " |",
        "|---|---|" + "---|" * len(lrs),
    ]
    for c in report["configs"]:
        cells = []
        for entry in c["learning_rates"]:
            v = entry["validation_accuracy"]
            cells.append(f"{v:.4f}" if v is not None else {"diverged": "div."}.get(entry["outcome"], "—"))
        lines.append(f"| {c['loss']} | {c['optimizer']} | " + " | ".join(cells) + " |")
    return lines


def _gradient_table(report: dict) -> list[str]:
    lines = [
        "",
        "## Why: gradients of the tutorial's cases",
        "",
        "One run each at the first seed. Gradient norm: each Dense kernel's gradient of the training loss on "
        "one fixed batch, at the end of epoch 1 and of the last epoch; update ratio: how far an epoch moved "
        "the kernel, relative to its size (||W_end - W_begin|| / ||W_begin||).",
        "",
        "| loss | optimizer | lr | val. acc. (last epoch) | layer | gradient norm (first -> last) | "
        "update ratio (first -> last) |",
        "|---|---|---|---|---|---|---|",
    ]
    for g in report["diagnostics"]:
        val = f"{g['val_curve'][-1]:.4f}" if g.get("val_curve") else g.get("outcome", "—")
        layers = sorted({k.split("/", 1)[1] for k in g["gradients"]})
        if not layers:
            lines.append(f"| {g['loss']} | {g['optimizer']} | {sp.lr_text(g['learning_rate'])} | {val} | — | "
                         "not logged (needs train.log_gradients) | — |")  # fmt: skip
        for layer in layers:
            norm = g["gradients"].get(f"grad_norm/{layer}", [])
            ratio = g["gradients"].get(f"update_ratio/{layer}", [])
            lines.append(
                f"| {g['loss']} | {g['optimizer']} | {sp.lr_text(g['learning_rate'])} | {val} | {layer} | "
                f"{_ends(norm)} | {_ends(ratio)} |"
            )
    return lines


def _ends(values: list[float]) -> str:
    return f"{values[0]:.3g} -> {values[-1]:.3g}" if values else "—"


def plots(report: dict, out: Path) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = [_plot_sensitivity(plt, report, out), _plot_performance(plt, report, out)]
    if any(g["gradients"] for g in report["diagnostics"]):
        images.append(_plot_gradients(plt, report, out))
    return images


def _plot_sensitivity(plt: Any, report: dict, out: Path) -> tuple[str, str]:
    configs = report["configs"]
    colors = plt.get_cmap("tab20")
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for i, c in enumerate(configs):
        xs = [e["learning_rate"] for e in c["learning_rates"] if e["validation_accuracy"] is not None]
        ys = [e["validation_accuracy"] for e in c["learning_rates"] if e["validation_accuracy"] is not None]
        div = [e["learning_rate"] for e in c["learning_rates"] if e["outcome"] == "diverged"]
        style = {"lw": 2.5, "color": "black"} if c["baseline"] else {"lw": 1.2, "color": colors(i % 20)}
        ax.plot(xs, ys, marker="o", ms=3, label=f"{c['loss']} + {c['optimizer']}", **style)
        if div:
            ax.plot(div, [0.0] * len(div), "x", color=style["color"])
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel(f"validation accuracy (seed {report['design']['seeds'][0]}; x: diverged)")
    ax.set_title("Learning-rate sensitivity")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    atomic.save_figure(fig, out / PLOT_LR, dpi=110)
    plt.close(fig)
    return ("Validation accuracy against learning rate", PLOT_LR)


def _plot_performance(plt: Any, report: dict, out: Path) -> tuple[str, str]:
    configs = report["configs"]
    ranked = [c for c in sorted(configs, key=lambda c: c["test_accuracy"]["mean"] or -1) if c["seeds"]]
    fig, ax = plt.subplots(figsize=(9, 0.9 + 0.35 * max(len(ranked), 1)))
    for y, c in enumerate(ranked):
        m = c["test_accuracy"]["mean"]
        low, high = c["test_accuracy"]["ci95"]
        err = [[m - low], [high - m]] if low is not None else None
        color = "black" if c["baseline"] else "tab:blue"
        ax.errorbar(m, y, xerr=err, fmt="o", color=color, capsize=3)
        if c["baseline"]:
            ax.axvline(m, color="black", lw=0.8, ls="--")
    ax.set_yticks(range(len(ranked)))
    ax.set_yticklabels([f"{c['loss']} + {c['optimizer']} (lr {sp.lr_text(c['best_learning_rate'])})" for c in ranked])
    ax.tick_params(axis="y", labelsize=7)
    ax.set_xlabel("test accuracy: mean over seeds, 95% CI (dashed: baseline)")
    ax.set_title("Performance at each configuration's best learning rate")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    atomic.save_figure(fig, out / PLOT_PERF, dpi=110)
    plt.close(fig)
    return ("Test accuracy per configuration with 95% CI", PLOT_PERF)


def _plot_gradients(plt: Any, report: dict, out: Path) -> tuple[str, str]:
    colors = plt.get_cmap("tab20")
    diag = [g for g in report["diagnostics"] if g["gradients"]]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, g in enumerate(diag):
        label = f"{g['loss']} + {g['optimizer']} {sp.lr_text(g['learning_rate'])}"
        for ax, kind in zip(axes, ("grad_norm", "update_ratio"), strict=True):
            keys = sorted(k for k in g["gradients"] if k.startswith(kind + "/"))
            for j, key in enumerate(keys):
                vals = g["gradients"][key]
                ax.plot(range(1, len(vals) + 1), vals, ls="-" if j == 0 else ":", color=colors(i * 2 % 20),
                        label=f"{label} {key.split('/', 1)[1]}")  # fmt: skip
    for ax, title in zip(axes, ("gradient norm (fixed batch)", "update ratio per epoch"), strict=True):
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    atomic.save_figure(fig, out / PLOT_GRAD, dpi=110)
    plt.close(fig)
    return ("Gradient norms and update ratios of the diagnostics", PLOT_GRAD)


def write(design: sp.Design, done: dict[sp.Run, dict], failed: list[dict], name: str, out: Path) -> dict:
    """Write study.md, study.json and the plots into `out`; returns the report."""
    report = summarize(design, done, failed, name)
    out.mkdir(parents=True, exist_ok=True)
    images = plots(report, out)
    atomic.write_json(out / "study.json", report)
    atomic.write_text(out / "study.md", markdown(report, images))
    return report
