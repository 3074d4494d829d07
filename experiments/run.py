#!/usr/bin/env python3
"""Run a folder of experiment configs (several seeds) and tabulate the results.

    python experiments/run.py experiments/ablations --seeds 1 2 3 --epochs 30
    python experiments/run.py experiments/mnist --configs lenet_uniform2 \
        --init-from runs/experiments/mnist/lenet_fp32/seed{seed}/last.pt --output-root runs/init

Each config runs as ``train_cifar10.py`` or ``train_mnist.py`` (chosen by its
``dataset``) into ``<output-root>/<folder>/<config>/seed<k>/``. A run whose
``final.json`` exists is not run again; one with a ``last.pt`` is resumed, so
an interrupted sweep continues where it stopped. ``--init-from`` starts every
run from an FP32 checkpoint (``{seed}`` in its path becomes the run's seed). The
table (Markdown and CSV: config, seed, soft / hard / fp32 test accuracy, then mean
and std over seeds; a uniform K-bit run has hard only) is written to
``<output-root>/<folder>/results.md`` and ``results.csv``.
"""
import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
MODES = ("soft", "hard", "fp32")


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="folder of YAML configs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42], help="seeds to run")
    parser.add_argument("--configs", nargs="+", metavar="NAME",
                        help="run only these configs of the folder (file names without .yaml)")
    parser.add_argument("--epochs", type=int, help="override epochs; LR milestones are scaled "
                        "in proportion")
    parser.add_argument("--subset", type=int, help="override subset (training images)")
    parser.add_argument("--data-dir", help="override data_dir")
    parser.add_argument("--device", help="override device")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"),
                        help="override precision")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction,
                        help="override channels_last")
    parser.add_argument("--init-from", metavar="TEMPLATE",
                        help="start every run from this FP32 checkpoint; {seed} is replaced by "
                             "the run's seed (e.g. runs/experiments/mnist/lenet_fp32/"
                             "seed{seed}/last.pt)")
    parser.add_argument("--output-root", default="runs/experiments", help="where runs go")
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel (CPU threads "
                        "are split between them)")
    parser.add_argument("--plot", metavar="DIR", help="at the end, draw the sweep's figures "
                        "into DIR (experiments/plot.py)")
    parser.add_argument("--collect-only", action="store_true",
                        help="only tabulate runs already finished")
    return parser


def scaled_schedule(schedule, old_epochs, new_epochs):
    """Milestones moved to the same fractions of a new epoch count, strictly increasing."""
    out = []
    for m in schedule:
        new = max(1, min(new_epochs, round(m * new_epochs / old_epochs)))
        if not out or new > out[-1]:
            out.append(new)
    return out


def build_command(config_path, seed, run_dir, args):
    """The training command for one config and seed (a list for subprocess)."""
    cfg = yaml.safe_load(Path(config_path).read_text()) or {}
    script = "train_cifar10.py" if cfg.get("dataset", "cifar10") == "cifar10" else "train_mnist.py"
    cmd = [sys.executable, str(ROOT / script), "--config", str(config_path), "--seed", str(seed),
           "--output-dir", str(run_dir), "--quiet"]
    if args.epochs:
        old_epochs = cfg.get("epochs", 200)
        cmd += ["--epochs", str(args.epochs), "--schedule",
                *map(str, scaled_schedule(cfg.get("schedule", [100, 150]), old_epochs,
                                          args.epochs))]
        if cfg.get("ste_epochs"):
            ste = max(1, round(cfg["ste_epochs"] * args.epochs / old_epochs))
            cmd += ["--ste-epochs", str(ste)]
    init_from = args.init_from.replace("{seed}", str(seed)) if args.init_from else None
    for flag, value in (("--subset", args.subset), ("--data-dir", args.data_dir),
                        ("--device", args.device), ("--precision", args.precision),
                        ("--init-from", init_from)):
        if value is not None:
            cmd += [flag, str(value)]
    if args.channels_last is not None:
        cmd.append("--channels-last" if args.channels_last else "--no-channels-last")
    if (run_dir / "last.pt").exists():
        cmd += ["--resume", str(run_dir / "last.pt")]
    else:
        cmd += ["--overwrite"]  # the folder may hold the log of a run that never started
    return cmd


def run_one(cmd, run_dir, threads):
    run_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with open(run_dir / "log.txt", "a") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    print(f"{'done' if code == 0 else f'FAILED ({code})'}: {run_dir}", flush=True)
    return code


def collect(configs, seeds, out_dir):
    """Rows {config, seed, soft, hard, fp32} for every finished run."""
    rows = []
    for config in configs:
        for seed in seeds:
            final = out_dir / config.stem / f"seed{seed}" / "final.json"
            if final.exists():
                acc = json.loads(final.read_text())["accuracy"]
                rows.append({"config": config.stem, "seed": seed,
                             **{m: acc.get(m) for m in MODES}})
    return rows


def summarise(rows):
    """Per config: mean and population std over seeds for every mode present."""
    out = []
    for config in dict.fromkeys(r["config"] for r in rows):
        group = [r for r in rows if r["config"] == config]
        entry = {"config": config, "seeds": len(group)}
        for m in MODES:
            values = [r[m] for r in group if r[m] is not None]
            if values:
                entry[m] = (statistics.fmean(values), statistics.pstdev(values))
        out.append(entry)
    return out


def write_tables(rows, out_dir):
    with open(out_dir / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["config", "seed", *MODES])
        writer.writeheader()
        writer.writerows(rows)
        for s in summarise(rows):
            writer.writerow({"config": s["config"], "seed": "mean",
                             **{m: f"{s[m][0]:.2f}" for m in MODES if m in s}})
            writer.writerow({"config": s["config"], "seed": "std",
                             **{m: f"{s[m][1]:.2f}" for m in MODES if m in s}})

    def cell(s, m):
        return f"{s[m][0]:.2f} ± {s[m][1]:.2f}" if m in s else "-"
    lines = ["| config | seeds | soft | hard (k-bit) | fp32 |", "|---|---|---|---|---|"]
    lines += [f"| {s['config']} | {s['seeds']} | " + " | ".join(cell(s, m) for m in MODES) + " |"
              for s in summarise(rows)]
    lines += ["", "| config | seed | soft | hard | fp32 |", "|---|---|---|---|---|"]
    lines += [f"| {r['config']} | {r['seed']} | " + " | ".join(
        "-" if r[m] is None else f"{r[m]:.2f}" for m in MODES) + " |" for r in rows]
    (out_dir / "results.md").write_text("\n".join(lines) + "\n")
    return "\n".join(lines)


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    folder = Path(args.folder)
    configs = sorted(folder.glob("*.yaml"))
    if args.configs:
        unknown = set(args.configs) - {c.stem for c in configs}
        if unknown:
            print(f"error: no config(s) {', '.join(sorted(unknown))} in {folder}", file=sys.stderr)
            return 2
        configs = [c for c in configs if c.stem in args.configs]
    if not configs:
        print(f"error: no *.yaml configs in {folder}", file=sys.stderr)
        return 2
    out_dir = Path(args.output_root) / folder.name
    out_dir.mkdir(parents=True, exist_ok=True)
    if not args.collect_only:
        jobs = [(c, s) for c in configs for s in args.seeds
                if not (out_dir / c.stem / f"seed{s}" / "final.json").exists()]
        threads = max(1, (os.cpu_count() or 1) // max(1, args.jobs))
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            codes = list(pool.map(
                lambda job: run_one(build_command(job[0], job[1], out_dir / job[0].stem /
                                                  f"seed{job[1]}", args),
                                    out_dir / job[0].stem / f"seed{job[1]}", threads), jobs))
        failed = sum(code != 0 for code in codes)
        if failed:
            print(f"{failed} run(s) failed; see their log.txt", file=sys.stderr)
    print(write_tables(collect(configs, args.seeds, out_dir), out_dir))
    if args.plot:
        import plot
        return plot.main([str(out_dir), "--out", args.plot])
    return 0


if __name__ == "__main__":
    sys.exit(main())
