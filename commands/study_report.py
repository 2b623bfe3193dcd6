"""The study's report, from the storage alone: reports/study.md, study.json and its plots.

Per configuration: the best learning rate (by validation accuracy), the test accuracy over the seeds at it (mean,
95% t-interval; none below 3 seeds) beside the test set's own sampling error (Wilson), the paired difference to the
baseline, the epochs to the baseline's mean validation accuracy; then the study held against published results,
each verdict decided by the numbers. Plots: learning-rate sensitivity, performance, the diagnostics' gradients.
"""

from __future__ import annotations

import statistics as pystats
import subprocess
from pathlib import Path
from typing import Any

import yaml

from commands import study_protocol as sp
from commands.statistics import ACCURACY, DIFFERENCE, MIN_N, mean_ci, paired_difference_ci, wilson_ci
from pipeline import arguments, atomic, optimizers

PLOT_LR = "study_lr_sensitivity.png"
PLOT_PERF = "study_performance.png"
PLOT_GRAD = "study_gradients.png"
CHANCE = 0.2  # a validation accuracy at or below this fell to chance (ten classes: 0.1)
TOO_FEW = "too few seeds for an interval"
# Published results this study is held against ("Held against published results" in study.md):
SCHMIDT_2021 = ('Schmidt, Schneider & Hennig, "Descending through a Crowded Valley — Benchmarking Deep Learning '
                'Optimizers", ICML 2021')  # fmt: skip
SCHMIDT_2021_FINDING = ("trying several optimizers at their default hyperparameters does about as well as tuning the "
                        "hyperparameters of one fixed optimizer")  # fmt: skip
LECUN_1998 = ('LeCun, Bottou, Bengio & Haffner, "Gradient-based learning applied to document recognition", '
              "Proc. IEEE 86(11), 1998, table of results; yann.lecun.com/exdb/mnist")  # fmt: skip
LECUN_1998_MSE_300 = {"model": "2-layer fully connected network, 300 hidden units, mean squared error",
                      "test_error": 0.047, "n_test": 10_000}  # fmt: skip  # on MNIST's 10,000 test digits


def config_summary(design: sp.Design, config: tuple[str, str], done: dict[sp.Run, dict], stage: int) -> dict:
    """Everything the report says about one configuration (what has finished of it)."""
    tune = [(lr, done.get(sp.Run("tune", *config, lr, design.seeds[0])) or {}) for lr in design.lrs]
    sensitivity = [{"learning_rate": lr, "validation_accuracy": rec.get("val_accuracy") if sp.ok(rec) else None,
                    "outcome": rec.get("outcome", "not run"), "experiment": rec.get("experiment")}
                   for lr, rec in tune]  # fmt: skip
    runs = sp.seed_runs(design, config, done)
    seeds = sorted(runs)
    test = _interval([runs[s]["test_accuracy"] for s in seeds])
    n_test = next((r["n_test"] for r in runs.values() if r.get("n_test")), None)  # older storages: none
    wilson = {"n_test": n_test, "ci95": wilson_ci(test["mean"], n_test)} if n_test else None
    return {"loss": config[0], "optimizer": config[1], "stage": stage, "baseline": config == tuple(design.baseline),
            "best_learning_rate": sp.best_lr(design, config, done), "seeds": seeds, "test_accuracy": test,
            "test_set_wilson95": wilson, "validation_accuracy": _interval([runs[s]["val_accuracy"] for s in seeds]),
            "learning_rates": sensitivity, "experiments": [runs[s]["experiment"] for s in seeds],
            "_runs": runs}  # fmt: skip


def _interval(values: list[float]) -> dict:
    if not values:
        return {"mean": None, "ci95": [None, None], "n": 0, "values": []}
    return {**mean_ci(values, ACCURACY).as_dict(), "values": values}  # values: in the order of "seeds"


def summarize(design: sp.Design, done: dict[sp.Run, dict], failed: list[dict], name: str) -> dict:
    """The report's numbers (study.json). `done`: each done run's record; `failed`: {experiment, message,
    trial} of each run whose last trial failed."""
    best = sp.best_optimizer(design, done)
    stage2 = design.stage2(best or sp.BEST)  # "best" until stage 1 has chosen
    configs = [config_summary(design, c, done, 2 if c in stage2 else 1) for c in design.stage1() + stage2]
    base_runs = next(c for c in configs if c["baseline"])["_runs"]
    target = pystats.fmean(r["val_accuracy"] for r in base_runs.values()) if base_runs else None
    for c in configs:
        runs = c.pop("_runs")
        common = [s for s in c["seeds"] if s in base_runs]
        pairs = [[runs[s]["test_accuracy"] for s in common], [base_runs[s]["test_accuracy"] for s in common]]
        diff = paired_difference_ci(*pairs, DIFFERENCE).as_dict() if common else {"mean": None, "ci95": [None, None]}
        zero = {"mean": 0.0, "ci95": [0.0, 0.0] if len(common) >= MIN_N else [None, None]}  # as the other rows
        c["difference_to_baseline"] = zero if c["baseline"] else diff
        c["difference_to_baseline"]["n"] = len(common)
        curves = [runs[s]["val_curve"] for s in c["seeds"]] if target else []  # the first epoch that reaches it:
        per_seed = [next((e for e, v in enumerate(curve, 1) if v >= target - 1e-12), None) for curve in curves]
        reached = [e for e in per_seed if e is not None]
        c["epochs_to_baseline_validation"] = {"target": target, "per_seed": per_seed, "reached": len(reached),
                                              "median": pystats.median(reached) if reached else None}  # fmt: skip
    diagnostics = [{"loss": loss, "optimizer": opt, "learning_rate": lr, "gradients": rec.get("gradients", {}),
                    **{key: rec.get(key) for key in ("outcome", "experiment", "val_curve")}} for loss, opt, lr in
                   design.diagnostics if (rec := done.get(sp.Run("diag", loss, opt, lr, design.seeds[0])))]  # fmt: skip
    known, later = sp.planned(design, done)
    run_s = [done[run].get("run_s") or 0.0 for run in known if run in done]
    # the data (--source, else HEAD's params.yaml's; a `-S data.url=` it came from) and the hidden units
    proc = subprocess.run(["git", "show", "HEAD:params.yaml"], capture_output=True, encoding="utf-8", check=False)
    head, own = (yaml.safe_load(proc.stdout) if proc.returncode == 0 else None) or {}, dict(design.settings)
    data = {"source": design.source or ((head.get("data") or {}).get("source", "mnist_sample") if head else "unknown"),
            "from": "--source" if design.source else "params.yaml at HEAD", "url": own.get("data.url"), "hidden_units":
            own.get("model.hidden_units", (head.get("model") or {}).get("hidden_units", [128]))}  # fmt: skip
    published = {"schmidt_2021": defaults_against_tuning(design, done), "tutorial": against_tutorial(configs, design),
                 "lecun_1998": against_lecun(configs, design, data)}  # fmt: skip
    return {"study": name, "design": {k: v for k, v in design.as_dict().items() if k != "diagnostics"}, "data": data,
            "baseline": {"loss": design.baseline[0], "optimizer": design.baseline[1]},
            "best_optimizer": best if stage2 and best != sp.BEST else None,
            "runs": {"planned": len(known) + later, "done": len(run_s), "failed": len(failed),
                     "run_seconds": round(sum(run_s), 1)},
            "configs": configs, "published": published, "diagnostics": diagnostics, "failed": failed}  # fmt: skip


def plan(design: sp.Design, done: dict[sp.Run, dict], workers: int) -> str:
    """The plan, said before the runs: the runs the study makes when every configuration trains (`sp.planned`),
    how many are done, and about how long (the mean run_s of those finished in this storage)."""
    known, later = sp.planned(design, done)
    total, finished = len(known) + later, sum(run in done for run in known)
    seconds = [record["run_s"] for record in done.values() if record.get("run_s")]
    mean = pystats.fmean(seconds) if seconds else 0.0
    minutes = round((total - finished) * mean / workers / 60)
    when = f"about {_n(minutes, 'minute')}" if minutes else "under a minute"
    left = ("nothing left to run" if total == finished else f"{when} left, {_n(workers, 'worker')}, {mean:.0f} s a "
            "run" if seconds else "the time is known after the first runs (printed when their phase ends)")  # fmt: skip
    return f"plan: {_n(total, 'run')} (if none diverges), {finished} done already; {left}"


def _n(count: float, word: str) -> str:
    return f"{count:,} {word}{'' if count == 1 else 's'}"


# --- held against published results -------------------------------------------------------------------


def _entry(record: dict, optimizer: str, lr: float) -> dict:  # a tuning run, with its test accuracy's Wilson interval
    n, acc = record.get("n_test"), record["test_accuracy"]
    wilson = " [{:.4f}, {:.4f}]".format(*wilson_ci(acc, n)) if n else ""
    return {"optimizer": optimizer, "learning_rate": lr, "validation_accuracy": record["val_accuracy"], "n_test": n,
            "test_accuracy": acc, "wilson95": wilson_ci(acc, n) if n else None,
            "says": f"{optimizer} at lr {sp.lr_text(lr)}: {acc:.4f}{wilson}"}  # fmt: skip


def defaults_against_tuning(design: sp.Design, done: dict[sp.Run, dict]) -> dict:
    """Schmidt et al. 2021 here: of stage 1's optimizers at their Keras default rate (on the grid), the best by
    validation accuracy against the baseline optimizer at its tuned rate, by test accuracy (first seed: the same
    test digits); agrees when the pick lies in the tuned run's 95% Wilson interval (the test set's sampling error)."""
    (loss, base_opt), first = design.baseline, design.seeds[0]
    defaults = {o: arguments.accepted("optimizer", optimizers.class_name(o))["learning_rate"]
                for l_, o in design.stage1() if l_ == loss}  # fmt: skip
    picks = [_entry(r, o, lr) for o, lr in defaults.items() if sp.ok(r := done.get(sp.Run("tune", loss, o, lr, first)))]
    tuned_lr = sp.best_lr(design, design.baseline, done)
    out = {"source": SCHMIDT_2021, "finding": SCHMIDT_2021_FINDING, "agrees": None, "says": "Not computed: no "
           "optimizer of stage 1 trained at its Keras default rate (on the grid), or the baseline has no tuned "
           "rate."}  # fmt: skip
    if not picks or tuned_lr is None:
        return out
    pick = max(picks, key=lambda e: e["validation_accuracy"])  # ties: listed first
    tuned = _entry(done[sp.Run("tune", loss, base_opt, tuned_lr, first)], base_opt, tuned_lr)
    diff, wilson = 100 * (pick["test_accuracy"] - tuned["test_accuracy"]), tuned["wilson95"]
    agrees = wilson[0] <= pick["test_accuracy"] <= wilson[1] if wilson else None
    at = ", ".join(f"{o} {sp.lr_text(lr)}{'' if lr in design.lrs else ' (off the grid)'}" for o, lr in defaults.items())
    verdict = (f"{'within' if agrees else 'beyond'} the test set's sampling error ({_n(tuned['n_test'], 'digit')}, "
               f"95% Wilson): this study {'agrees' if agrees else 'does not agree'}") if wilson else (
               "the runs do not record n_test (an older storage): no verdict")  # fmt: skip
    return {**out, "defaults": pick, "tuned": tuned, "difference_points": diff, "agrees": agrees,
            "says": f"At Keras' default rates ({at}), validation accuracy picks {pick['says']}; the baseline's "
                    f"optimizer at its tuned rate, {tuned['says']}: a difference of {diff:+.2f} points, "
                    f"{verdict}."}  # fmt: skip


def _row(configs: list[dict], loss: str, design: sp.Design) -> dict | None:
    """The loss's row at its tuned rate: stage 2's, or in a grid the baseline optimizer's."""
    rows = [c for c in configs if c["loss"] == loss and c["seeds"]]
    return next((c for c in rows if c["stage"] == 2 or c["optimizer"] == design.baseline[1]), None)


def against_tutorial(configs: list[dict], design: sp.Design) -> dict:
    """The tutorial's binary_crossentropy (ten sigmoid outputs) against softmax, each at its tuned rate: paired over
    the seeds with the baseline loss under the same optimizer (the loss alone differs), and with the baseline."""
    c = _row(configs, "binary_crossentropy", design)
    if c is None:
        return {"says": "`binary_crossentropy` is not in this study (or has not run yet)."}
    softmax = next((o for o in configs if o["loss"] == design.baseline[0] and o["optimizer"] == c["optimizer"]), c)
    pairs = [(a, b) for s, a in zip(c["seeds"], c["test_accuracy"]["values"], strict=True)
             for t, b in zip(softmax["seeds"], softmax["test_accuracy"]["values"], strict=True) if s == t]  # fmt: skip
    same = paired_difference_ci(*zip(*pairs, strict=True), DIFFERENCE).as_dict() if pairs and softmax is not c else None
    said = []
    for diff, against in ((same, f"{design.baseline[0]} with {c['optimizer']}"),
                          (c["difference_to_baseline"], f"the baseline, {' + '.join(design.baseline)}")):  # fmt: skip
        if diff is not None and not (diff is same and softmax["baseline"]):  # (the baseline's, said next)
            low, high = diff["ci95"]
            verdict = ("no verdict" if low is None else "no difference shown (the interval holds 0)" if low <= 0 <= high
                       else "better" if low > 0 else "worse")  # fmt: skip
            said.append(f"against {against}, paired by seed: {_fmt(diff, 100, 2, ' points', sign=True)}, {verdict}")
    return {"optimizer": c["optimizer"], "against_same_optimizer": same, "says": f"`binary_crossentropy` (sigmoid "
            f"outputs) with {c['optimizer']} at its tuned lr {sp.lr_text(c['best_learning_rate'])}: "
            f"{_fmt(c['test_accuracy'])}; {'; '.join(said)}."}  # fmt: skip


def against_lecun(configs: list[dict], design: sp.Design, data: dict) -> dict:
    """This study's mean_squared_error row beside LeCun et al. 1998's 2-layer MSE net: comparable only on the
    whole of MNIST; agrees when 4.7% lies in the 95% Wilson interval of our mean error on our test digits."""
    published, c = LECUN_1998_MSE_300["test_error"], _row(configs, "mean_squared_error", design)
    out = {"source": LECUN_1998, "published": LECUN_1998_MSE_300, "comparable": data["source"] == "mnist",
           "says": "`mean_squared_error` is not in this study (or has not run yet)."}  # fmt: skip
    if c is None:
        return out
    error, wilson = 1 - c["test_accuracy"]["mean"], c["test_set_wilson95"]
    says = (f"{LECUN_1998_MSE_300['model']}: {published:.1%} test error on MNIST's 10,000 test digits. This study's "
            f"`mean_squared_error` with {c['optimizer']} at lr {sp.lr_text(c['best_learning_rate'])} "
            f"({str(data['hidden_units']).strip('[]')} hidden units, {_n(design.epochs, 'epoch')}, "
            f"{_n(len(c['seeds']), 'seed')}): {error:.2%} test error")  # fmt: skip
    if not out["comparable"] or wilson is None:
        why = "the runs do not record n_test (an older storage): no verdict" if out["comparable"] else (
            f"not comparable, the study ran on `{data['source']}`, not all of MNIST")  # fmt: skip
        return {**out, "optimizer": c["optimizer"], "test_error": error, "says": f"{says}: {why}."}
    low, high = 1 - wilson["ci95"][1], 1 - wilson["ci95"][0]
    where = "within" if low <= published <= high else "below" if published < low else "above"
    verdict = {"within": "in agreement", "above": "this net makes fewer errors", "below": "this net makes more errors"}
    return {**out, "optimizer": c["optimizer"], "test_error": error,
            "says": f"{says}, 95% Wilson [{low:.2%}, {high:.2%}] on {_n(wilson['n_test'], 'digit')}: the published "
                    f"{published:.1%} lies {where} it: {verdict[where]}."}  # fmt: skip


# --- study.md ------------------------------------------------------------------------------------------


def _fmt(iv: dict, scale: float = 1.0, digits: int = 4, unit: str = "", sign: bool = False) -> str:
    if iv.get("mean") is None:
        return "—"
    text = f"{iv['mean'] * scale:{'+' if sign else ''}.{digits}f}{unit}"
    low, high = iv["ci95"]
    if low is None or high is None:
        return f"{text} (n={iv['n']}: {TOO_FEW})"
    bound = f"{'+' if sign else ''}.{digits}f"  # a difference's bounds signed, as its mean: [-0.20, +0.34]
    return f"{text} [{low * scale + 0.0:{bound}}, {high * scale + 0.0:{bound}}]"


def markdown(report: dict, images: list[tuple[str, str]]) -> str:
    d, data, base, runs = report["design"], report["data"], report["baseline"], report["runs"]
    where = f" from {data['url']}" if data["url"] else f" ({data['from']})"
    few = sorted({n for c in report["configs"] if 0 < (n := c["test_accuracy"]["n"]) < MIN_N})
    lines = [f"# Study `{report['study']}`: which loss, which optimizer", "",
        f"Each configuration's learning rate was tuned on {', '.join(map(sp.lr_text, d['lrs']))} by the validation "
        f"accuracy (seed {d['seeds'][0]}); the best rate was rerun with seeds {', '.join(map(str, d['seeds']))}; "
        f"{_n(d['epochs'], 'epoch')} each, data `{data['source']}`{where}. Test accuracy: mean over the seeds with its "
        f"95% t-interval (within [0, 1]; none below {MIN_N} seeds): it covers the training's randomness (initial "
        "weights, batch order) on this one test set. Beside it, the test set's own sampling error, which the seeds do "
        "not cover: ± half the 95% Wilson interval of one run's accuracy on that many digits, in points. Difference: "
        f"paired by seed against the baseline ({base['loss']} + {base['optimizer']} at its own best rate), in "
        "points. Epochs: the median number of epochs the seeds' runs took to reach the baseline's mean validation "
        "accuracy (runs that reached it / runs).", ""]  # fmt: skip
    lines += [f"**n={', '.join(map(str, few))}: {TOO_FEW}.** With fewer than {MIN_N} seeds no t-interval is given "
              "(t with 1 degree of freedom: 12.7 standard errors); run more (--seeds).", ""] if few else []  # fmt: skip
    if report["best_optimizer"]:
        lines += [f"Best optimizer of stage 1 (by validation accuracy): **{report['best_optimizer']}**.", ""]
    lines += ["| loss | optimizer | best lr | seeds | test accuracy [95% CI] | test set ±, points (digits) | "
              "difference to baseline, points [95% CI] | epochs to baseline's val. acc. |",
              "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for c in sorted(report["configs"], key=lambda c: -(c["test_accuracy"]["mean"] or -1)):
        e = c["epochs_to_baseline_validation"]
        epochs = f"{e['median']:g} ({e['reached']}/{len(c['seeds'])})" if e["median"] is not None else "not reached"
        lr = sp.lr_text(c["best_learning_rate"]) if c["best_learning_rate"] is not None else "—"
        name = f"**{c['optimizer']}** (baseline)" if c["baseline"] else c["optimizer"]
        diff = "0" if c["baseline"] else _fmt(c["difference_to_baseline"], 100, 2, sign=True)
        w = c["test_set_wilson95"]  # half its width, in points
        wilson = f"±{(w['ci95'][1] - w['ci95'][0]) * 50:.2f} ({w['n_test']:,})" if w else "—"
        lines.append(f"| {c['loss']} | {name} | {lr} | {len(c['seeds'])} | {_fmt(c['test_accuracy'])} | {wilson} | "
                     f"{diff} | {epochs} |")  # fmt: skip
    lines += ["", "Validation accuracy at each learning rate (tuning runs; `div.`: training diverged):", "",
              f"| loss | optimizer | {' | '.join(map(sp.lr_text, d['lrs']))} |",
              "|---|---|" + "---|" * len(d["lrs"])]  # fmt: skip
    for c in report["configs"]:
        cells = [f"{v:.4f}" if (v := e["validation_accuracy"]) is not None else "div." if e["outcome"] == "diverged"
                 else "—" for e in c["learning_rates"]]  # fmt: skip
        lines.append(f"| {c['loss']} | {c['optimizer']} | " + " | ".join(cells) + " |")
    said = report["published"]
    lines += ["", "## Held against published results", "",
              f"- **{SCHMIDT_2021}**: {SCHMIDT_2021_FINDING}. {said['schmidt_2021']['says']}",
              f"- **The tutorial's configuration**: {said['tutorial']['says']}",
              f"- **{LECUN_1998}**: {said['lecun_1998']['says']}"]  # fmt: skip
    lines += _gradient_table(report) if report["diagnostics"] else []
    lines += ["", f"Runs: {runs['done']} of {runs['planned']} done, {runs['failed']} failed; "
              f"{runs['run_seconds'] / 60:.1f} minutes of runs in all (summed over workers)."]  # fmt: skip
    lines += [f"- failed: `{f['experiment']}` (trial {f['trial']}): {f['message']}" for f in report["failed"]]
    return "\n".join([*lines, "", *[f"![{alt}]({path})" for alt, path in images], ""])


def _layers(keys: Any) -> dict[str, str]:
    """Keras' automatic Dense names in model order (dense, dense_1, ...) -> hidden (numbered if several), output."""
    order = sorted(keys, key=lambda k: int(k.rpartition("_")[2]) if k.rpartition("_")[2].isdigit() else 0)
    return {k: "output" if k == order[-1] else "hidden" if len(order) == 2 else f"hidden {i + 1}"
            for i, k in enumerate(order)}  # fmt: skip


def _gradient_table(report: dict) -> list[str]:
    lines = ["", "## Why: gradients of the tutorial's cases", "", "One run each at the first seed. Gradient norm: each "
             "Dense kernel's gradient of the training loss on one fixed batch, at the end of epoch 1 and of the last "
             "epoch; update ratio: how far an epoch moved the kernel, relative to its size (||W_end - W_begin|| / "
             "||W_begin||).", "", "| loss | optimizer | lr | val. acc. (last epoch) | layer | gradient norm (first -> "
             "last) | update ratio (first -> last) |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for g in report["diagnostics"]:
        val = f"{g['val_curve'][-1]:.4f}" if g.get("val_curve") else g.get("outcome", "—")
        head = f"| {g['loss']} | {g['optimizer']} | {sp.lr_text(g['learning_rate'])} | {val} |"
        layers = _layers({k.split("/", 1)[1] for k in g["gradients"]})
        if not layers:
            lines.append(f"{head} — | not logged (needs train.log_gradients) | — |")
        for layer, what in layers.items():
            ends = [f"{v[0]:.3g} -> {v[-1]:.3g}" if (v := g["gradients"].get(f"{kind}/{layer}")) else "—"
                    for kind in ("grad_norm", "update_ratio")]  # fmt: skip
            lines.append(f"{head} {what} (`{layer}`) | {' | '.join(ends)} |")
    return lines


# --- plots ---------------------------------------------------------------------------------------------

STYLES = ("-", "--", "-.", ":")
MARKERS = "osD^vP*<>hX"


def plots(report: dict, out: Path) -> list[tuple[str, str]]:
    import matplotlib.pyplot as plt

    plt.switch_backend("Agg")  # files only, no display
    figures = [("Validation accuracy against learning rate", PLOT_LR, _plot_sensitivity),
               ("Test accuracy per configuration with 95% CI", PLOT_PERF, _plot_performance)]  # fmt: skip
    if any(g["gradients"] for g in report["diagnostics"]):
        figures.append(("Gradient norms and update ratios of the diagnostics (per layer)", PLOT_GRAD, _plot_gradients))
    for _, name, draw in figures:
        fig = draw(plt, report)
        fig.tight_layout()
        atomic.save_figure(fig, out / name, dpi=110, bbox_inches="tight")  # long labels stay whole
        plt.close(fig)
    return [(alt, name) for alt, name, _ in figures]


def _plot_sensitivity(plt: Any, report: dict) -> Any:
    """A panel per stage (grid: per optimizer), baseline in black; x: diverged (at 0), red ring: fell to chance."""
    configs, grid = report["configs"], report["design"]["grid"]
    base = next(c for c in configs if c["baseline"])
    panels: dict[Any, list[dict]] = {}
    for c in configs:
        panels.setdefault(c["optimizer"] if grid else c["stage"], [base] if not c["baseline"] else []).append(c)
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 6.5), sharey=True, squeeze=False)
    for ax, (key, group) in zip(axes[0], panels.items(), strict=True):
        for i, c in enumerate(group):
            own = {"color": plt.get_cmap("tab10")(i % 10), "ls": STYLES[i % 4], "marker": MARKERS[i % len(MARKERS)]}
            style = {"color": "black", "lw": 2.5, "marker": "o"} if c["baseline"] else {"lw": 1.3, **own}
            xs, ys = ([e[k] for e in c["learning_rates"] if e["validation_accuracy"] is not None]
                      for k in ("learning_rate", "validation_accuracy"))  # fmt: skip
            ax.plot(xs, ys, ms=5, label=f"{c['loss']} + {c['optimizer']}" if xs else None, **style)
            div = [e["learning_rate"] for e in c["learning_rates"] if e["outcome"] == "diverged"]
            ax.plot(div, [0.0] * len(div), "x", ms=10, mew=2, color=style["color"])
            low = [i for i, y in enumerate(ys) if y <= CHANCE]
            ax.plot([xs[i] for i in low], [ys[i] for i in low], "o", ms=12, mfc="none", mec="red", mew=1.5)
        ax.plot([], [], "x", ms=10, mew=2, color="grey", label="diverged (drawn at 0)")
        ax.plot([], [], "o", ms=12, mfc="none", mec="red", label=f"fell to chance (val. acc. <= {CHANCE:g})")
        what = f"each optimizer with {base['loss']}" if key == 1 else f"each loss with {group[-1]['optimizer']}"
        title = f"{key}: every loss" if grid else f"stage {key}: {what}"
        ax.set(xscale="log", xlabel="learning rate (log scale)", title=title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2)
    axes[0][0].set_ylabel(f"validation accuracy (tuning runs, seed {report['design']['seeds'][0]})")
    fig.suptitle("Learning-rate sensitivity (black: the baseline)")
    return fig


def _plot_performance(plt: Any, report: dict) -> Any:
    ranked = [c for c in sorted(report["configs"], key=lambda c: c["test_accuracy"]["mean"] or -1) if c["seeds"]]
    fig, ax = plt.subplots(figsize=(9, 1.8 + 0.35 * len(ranked)))
    ax.set_ylim(-0.7, len(ranked) - 0.3)  # the first and last rows whole
    for y, c in enumerate(ranked):
        m, (low, high) = c["test_accuracy"]["mean"], c["test_accuracy"]["ci95"]
        ax.errorbar(m, y, xerr=[[m - low], [high - m]] if low is not None else None, fmt="o", capsize=3,
                    color="black" if c["baseline"] else "tab:blue")  # fmt: skip
        if c["baseline"]:
            ax.axvline(m, color="black", lw=0.8, ls="--")
            if c["test_set_wilson95"]:  # what another test set of as many digits could move the baseline
                ax.axvspan(*c["test_set_wilson95"]["ci95"], color="grey", alpha=0.15, lw=0)
    seeds = sorted({len(c["seeds"]) for c in ranked})
    ax.set(yticks=range(len(ranked)), title="Performance at each configuration's best learning rate",
           xlabel=f"test accuracy: mean over {'/'.join(map(str, seeds))} seeds with its 95% t-interval (none below "
                  f"{MIN_N}); dashed: the baseline, grey: its test set's 95% Wilson interval")  # fmt: skip
    ax.set_yticklabels([f"{c['loss']} + {c['optimizer']} (lr {sp.lr_text(c['best_learning_rate'])})" for c in ranked],
                       fontsize=7)  # fmt: skip
    ax.grid(axis="x", alpha=0.3)
    return fig


def _plot_gradients(plt: Any, report: dict) -> Any:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, g in enumerate(d for d in report["diagnostics"] if d["gradients"]):
        for j, (layer, what) in enumerate(_layers({k.split("/", 1)[1] for k in g["gradients"]}).items()):
            for ax, kind in zip(axes, ("grad_norm", "update_ratio"), strict=True):
                vals = g["gradients"].get(f"{kind}/{layer}", [])
                ax.plot(range(1, len(vals) + 1), vals, marker=".", color=plt.get_cmap("tab10")(i % 10),
                        ls=":" if what == "output" else STYLES[j % 3],
                        label=f"{g['loss']} + {g['optimizer']} {sp.lr_text(g['learning_rate'])}, {what}")  # fmt: skip
    for ax, title in zip(axes, ("gradient norm (fixed batch)", "update ratio per epoch"), strict=True):
        ax.set(yscale="log", xlabel="epoch", title=title)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return fig


def write(design: sp.Design, done: dict[sp.Run, dict], failed: list[dict], name: str, out: Path) -> dict:
    """Write study.md, study.json and the plots into `out`; returns the report."""
    report = summarize(design, done, failed, name)
    out.mkdir(parents=True, exist_ok=True)
    images = plots(report, out)
    atomic.write_json(out / "study.json", report)
    atomic.write_text(out / "study.md", markdown(report, images))
    return report
