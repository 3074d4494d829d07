#!/usr/bin/env python3
"""Figures of a sweep: accuracy against bits for every method, and training curves.

    python experiments/plot.py RUNS_DIR [RUNS_DIR ...] --out docs/figures/ [--curves NAME ...]

RUNS_DIR is a folder the runner wrote (``<output-root>/<folder>``, holding
``<config>/seed<k>/``). Every finished run (``final.json``, ``config.yaml``) is a
point; so is every ``eval_*.json`` report of ``evaluate.py --json`` of the final model
saved in a run folder (post-training quantization of an FP32 run, for example; the
``eval_best*.json`` reports of ``best.pt`` that ``summarize.py`` writes are left out).
Runs are seeds of a point only when their recipe fingerprints agree (``records``): two
configs that give the same point (a lever beside its row), or a seed twice, are refused;
a method whose points mix recipes of several RUNS_DIRs (the 30- and the 60-epoch sweep)
is drawn as one series per RUNS_DIR, labelled with the folder's name. Methods:

- FP32 (a horizontal line with its seed band);
- PTQ: ``evaluate.py --ptq-bits K`` of an FP32 run;
- LSQ QAT: ``--quantization uniform --bits K`` (and with ``--init-from`` or
  ``--distill-from``);
- ring, published recipe: soft and hard (triangle ring, Gaussian kernel only);
- ring, k-bit recipe (``ring_layout: distinct``; and with ``--init-from`` or
  ``--distill-from``).

x is the bits per weight (log2 of the ring size for rings), y the test accuracy of
the final model, the mean over seeds with the population std as error bar; a
second panel shows the same points close up, the top ``ZOOM_SPAN`` points of accuracy.
``training_curves.png`` shows train loss and validation accuracy (soft / FP32 solid,
hard dashed) per epoch, the mean over seeds, of the configs named by ``--curves``
(default: the configs with the most seeds).
"""
import argparse
import csv
import json
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import records  # noqa: E402

FIGURES = ("accuracy_vs_bits.png", "training_curves.png")
STYLE = {"PTQ": ("tab:gray", "s"), "LSQ QAT": ("tab:blue", "o"),
         "LSQ QAT, FP32 init": ("tab:cyan", "o"), "ring published, soft": ("tab:orange", "^"),
         "ring published, hard": ("tab:red", "v"), "ring k-bit": ("tab:green", "D"),
         "ring k-bit, FP32 init": ("tab:olive", "D"), "LSQ QAT, distilled": ("tab:purple", "P"),
         "ring k-bit, distilled": ("tab:brown", "P")}


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUNS_DIR",
                        help="folders of <config>/seed<k>/ runs")
    parser.add_argument("--out", type=Path, default=Path("docs/figures"),
                        help="where the PNG files go (default: %(default)s)")
    parser.add_argument("--curves", nargs="+", metavar="NAME",
                        help="configs whose training curves are drawn")
    return parser


def run_points(cfg, final):
    """[(method, bits, accuracy)] that one finished run contributes."""
    quantization = cfg["quantization"]
    accuracy = final["accuracy"]
    init = (", FP32 init" if cfg.get("init_from") else "") + \
        (", distilled" if cfg.get("distill_from") else "")
    if quantization == "none":
        return [("FP32", 32, accuracy["fp32"])]
    if quantization == "uniform":
        return [("LSQ QAT" + init, cfg["bits"], accuracy["hard"])]
    bits = math.log2(cfg["ring_size"])
    if cfg.get("ring_layout") == "distinct":
        return [("ring k-bit" + init, bits, accuracy["hard"])]
    if cfg.get("ring_type", "triangle") == "triangle" and \
            cfg.get("interpolation", "gaussian") == "gaussian":
        return [("ring published, soft", bits, accuracy["soft"]),
                ("ring published, hard", bits, accuracy["hard"])]
    return []


def report_points(report):
    """[(method, bits, accuracy)] of one ``evaluate.py --json`` report (PTQ only)."""
    if "ptq" in report:
        return [("PTQ", report["ptq"]["bits"], report["accuracy"]["hard"])]
    return []


def _run_points(run):
    """[(method, bits, accuracy)] of one Run: its final model and its eval_*.json reports."""
    found = run_points(run.cfg, run.final)
    for report in sorted(run.folder.glob("eval_*.json")):
        if not report.name.startswith("eval_best"):
            found += report_points(json.loads(report.read_text()))
    return found


def _split_by_root(groups):
    """The keys of ``groups`` ({key: [Run]}) whose runs mix recipes of several roots."""
    return {key for key, runs in groups.items()
            if len({r.recipe for r in runs}) > 1 and len({r.root for r in runs}) > 1}


def collect(roots):
    """{series: {bits: [accuracy per seed]}}, {curve name: [metrics rows per seed]} and the
    set of "model on dataset" names the runs cover.

    A series is a method, or ``method [folder]`` when the method's points mix recipes of
    several roots; curves likewise. RecordError when runs of two configs would give the
    same point (a lever config beside its row, say), or one seed would count twice:
    their accuracies are not seeds of one mean.
    """
    runs = records.load_runs(roots)
    found = [(method, bits, run, accuracy) for run in runs
             for method, bits, accuracy in _run_points(run)]
    by_method = defaultdict(list)
    for method, bits, run, _ in found:
        by_method[method, bits].append(run)
    split = {method for method, _ in _split_by_root(by_method)}
    points, members = defaultdict(lambda: defaultdict(list)), defaultdict(list)
    for method, bits, run, accuracy in found:
        series = f"{method} [{run.root.name}]" if method in split else method
        points[series][bits].append(accuracy)
        members[series, bits].append(run)
    for (series, bits), group in members.items():
        configs = sorted({r.config for r in group})
        if len(configs) > 1:
            raise records.RecordError(
                f"configs {', '.join(configs)} all give the point {series!r} at {bits:g} "
                f"bits; plot their folders separately")
        records.check_seeds_of_one_row(f"{series!r} at {bits:g} bits", group)
    by_config = defaultdict(list)
    for run in runs:
        by_config[run.config].append(run)
    split_configs = _split_by_root(by_config)
    curves, subjects = defaultdict(list), set()
    for run in runs:
        subjects.add(f"{run.cfg['model']} on {run.cfg.get('dataset', 'cifar10')}")
        if (run.folder / "metrics.csv").exists():
            name = f"{run.config} [{run.root.name}]" if run.config in split_configs \
                else run.config
            with open(run.folder / "metrics.csv") as f:
                curves[name].append(list(csv.DictReader(f)))
    return points, curves, subjects


def method_of(series):
    """The method of a series name (``"FP32 [cifar10_cpu]"`` -> ``"FP32"``)."""
    return series.split(" [")[0]


ZOOM_SPAN = 5.0  # points of accuracy shown by the right-hand panel, below the best


def zoom_limits(points):
    """y range (lo, hi) of the close-up: from the best mean (or the top of the FP32
    band) down ``ZOOM_SPAN`` points, with half a point of margin above."""
    tops = []
    for series, by_bits in points.items():
        if method_of(series) == "FP32":
            mean, std = records.mean_std(by_bits[32])
            tops.append(mean + std)
        else:
            tops += [records.mean_std(seeds)[0] for seeds in by_bits.values()]
    top = max(tops)
    return top - ZOOM_SPAN, top + 0.5


LINESTYLES = ("-", ":", "-.", (0, (5, 1)))  # one per RUNS_DIR of a series split by folder


def _draw_accuracy(ax, points):
    order = {method: i for i, method in enumerate(("FP32", *STYLE))}
    roots = sorted({s.split(" [")[1] for s in points if " [" in s})
    for series in sorted(points, key=lambda s: (order.get(method_of(s), 99), s)):
        method = method_of(series)
        root = series.split(" [")[1] if " [" in series else None
        ls = LINESTYLES[roots.index(root) % len(LINESTYLES)] if root else "-"
        if method == "FP32":
            mean, std = records.mean_std(points[series][32])
            ax.axhline(mean, color="black", lw=1.2, ls=ls, label=f"{series} ({mean:.2f})")
            ax.axhspan(mean - std, mean + std, color="black", alpha=0.08)
            continue
        if method not in STYLE:
            continue
        color, marker = STYLE[method]
        bits = sorted(points[series])
        stats = [records.mean_std(points[series][b]) for b in bits]
        ax.errorbar(bits, [m for m, _ in stats], yerr=[s for _, s in stats], color=color,
                    marker=marker, capsize=3, lw=1.2, label=series,
                    ls="--" if "soft" in method and not root else ls,
                    mfc="white" if root and roots.index(root) else color)
    ax.set_xscale("log", base=2)
    ax.set_xticks([1, 2, 3, 4, 8])
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("bits per weight")
    ax.grid(alpha=0.3)


def plot_accuracy_vs_bits(points, subject, path):
    """Left: every point; right: the top ``ZOOM_SPAN`` points, where the methods
    that keep close to FP32 can be told apart."""
    fig, (full_ax, zoom_ax) = plt.subplots(1, 2, figsize=(12, 4.8), dpi=120)
    for ax in (full_ax, zoom_ax):
        _draw_accuracy(ax, points)
    full_ax.set_ylabel("test accuracy (%)")
    full_ax.set_title("all points")
    full_ax.legend(fontsize=8, loc="lower right")
    zoom_ax.set_ylim(*zoom_limits(points))
    zoom_ax.set_title(f"close-up: the top {ZOOM_SPAN:g} points")
    fig.suptitle(f"{subject}: accuracy against bits ({records.STD_LABEL})")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _column(runs, key):
    """Per epoch, the mean of ``key`` over the runs that have a value there (None if none)."""
    out = []
    for epoch in range(max(len(rows) for rows in runs)):
        values = [float(rows[epoch][key]) for rows in runs
                  if epoch < len(rows) and rows[epoch].get(key)]
        out.append(statistics.fmean(values) if values else None)
    return out


def plot_training_curves(curves, names, path):
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for color, name in zip(colors * 4, names):
        runs = curves[name]
        epochs = range(1, max(len(rows) for rows in runs) + 1)
        label = f"{name} ({len(runs)} seed{'s' if len(runs) > 1 else ''})"
        loss_ax.plot(epochs, _column(runs, "train_loss"), color=color, label=label)
        acc_ax.plot(epochs, _column(runs, "eval_acc"), color=color, label=f"{label}, soft/fp32")
        hard = _column(runs, "eval_hard_acc")
        if any(v is not None for v in hard):
            acc_ax.plot(epochs, hard, color=color, ls="--", label=f"{name}, hard")
    loss_ax.set(xlabel="epoch", ylabel="train loss", yscale="log", title="training loss")
    acc_ax.set(xlabel="epoch", ylabel="validation accuracy (%)",
               title="validation accuracy (solid: soft or FP32, dashed: hard)")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    try:
        points, curves, subjects = collect(args.runs)
    except records.RecordError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not points:
        print(f"error: no finished runs (final.json) under {', '.join(map(str, args.runs))}",
              file=sys.stderr)
        return 2
    names = args.curves or sorted(curves, key=lambda n: (-len(curves[n]), n))[:3]
    unknown = [n for n in names if n not in curves]
    if unknown:
        print(f"error: no runs of {', '.join(unknown)}; found {', '.join(sorted(curves))}",
              file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    plot_accuracy_vs_bits(points, ", ".join(sorted(subjects)), args.out / FIGURES[0])
    plot_training_curves(curves, names, args.out / FIGURES[1])
    print("wrote " + ", ".join(str(args.out / f) for f in FIGURES))
    return 0


if __name__ == "__main__":
    sys.exit(main())
