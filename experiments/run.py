#!/usr/bin/env python3
"""Run a folder of experiment configs (several seeds) and tabulate the results.

    python experiments/run.py experiments/ablations --seeds 1 2 3 --epochs 30
    python experiments/run.py experiments/mnist --configs lenet_uniform2 \
        --init-from runs/experiments/mnist/lenet_fp32/seed{seed}/last.pt --output-root runs/init

Each config runs as ``train_cifar10.py`` or ``train_mnist.py`` (chosen by its
``dataset``) into ``<output-root>/<folder>/<config>/seed<k>/``. A run whose
``final.json`` exists is not run again; one with a ``last.pt`` is resumed, so
an interrupted sweep continues where it stopped; either only when the run there
has the fingerprint of the one requested (``ringq.identity``: a run of other epochs,
recipe or ``--init-from`` source is refused before anything runs, its differing
options named, exit status 2). ``--init-from`` starts every run from an FP32
checkpoint (``{seed}`` in its path becomes the run's seed). The table (Markdown and
CSV: config, seed, soft / hard / fp32 test accuracy, then the mean and population std
over seeds; a uniform K-bit run has hard only) is written to
``<output-root>/<folder>/results.md`` and ``results.csv``. Exit status 1, with a
one-line summary, when any run failed.
"""
import argparse
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import records  # noqa: E402
from ringq import identity  # noqa: E402
from ringq import train as train_lib  # noqa: E402
from ringq.config import with_recorded_split  # noqa: E402
from ringq.errors import RingqError  # noqa: E402
from ringq.runtime import run_logged  # noqa: E402
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


def training_script(cfg):
    return "train_cifar10.py" if cfg.get("dataset", "cifar10") == "cifar10" else "train_mnist.py"


def training_flags(config_path, seed, run_dir, args):
    """The training flags of one config and seed, without --resume / --overwrite."""
    cfg = yaml.safe_load(Path(config_path).read_text()) or {}
    flags = ["--config", str(config_path), "--seed", str(seed), "--output-dir", str(run_dir),
             "--quiet"]
    if args.epochs:
        old_epochs = cfg.get("epochs", 200)
        flags += ["--epochs", str(args.epochs), "--schedule",
                  *map(str, scaled_schedule(cfg.get("schedule", [100, 150]), old_epochs,
                                            args.epochs))]
        if cfg.get("ste_epochs"):
            ste = max(1, round(cfg["ste_epochs"] * args.epochs / old_epochs))
            flags += ["--ste-epochs", str(ste)]
    init_from = args.init_from.replace("{seed}", str(seed)) if args.init_from else None
    for flag, value in (("--subset", args.subset), ("--data-dir", args.data_dir),
                        ("--device", args.device), ("--precision", args.precision),
                        ("--init-from", init_from)):
        if value is not None:
            flags += [flag, str(value)]
    if args.channels_last is not None:
        flags.append("--channels-last" if args.channels_last else "--no-channels-last")
    return flags


def build_command(config_path, seed, run_dir, args):
    """The training command for one config and seed (a list for subprocess): a run with a
    ``last.pt`` is resumed, any other is started afresh."""
    cfg = yaml.safe_load(Path(config_path).read_text()) or {}
    cmd = [sys.executable, str(ROOT / training_script(cfg)),
           *training_flags(config_path, seed, run_dir, args)]
    if (run_dir / "last.pt").exists():
        return cmd + ["--resume", str(run_dir / "last.pt")]
    return cmd + ["--overwrite"]  # the folder may hold the log of a run that never started


def requested_config(config_path, seed, run_dir, args):
    """The resolved config (with ``init_source``) that the command of one job trains;
    RingqError when its flags or its --init-from source are refused."""
    cfg = yaml.safe_load(Path(config_path).read_text()) or {}
    task = "cifar10" if training_script(cfg) == "train_cifar10.py" else "mnist"
    flags = training_flags(config_path, seed, run_dir, args)
    return train_lib.resolve_run(train_lib.get_args_parser(task).parse_args(flags), task)[0]


def identity_conflict(config_path, seed, run_dir, args):
    """Why the run already in ``run_dir`` (finished or resumable) is not the one requested,
    naming the options that differ; None when it is, or when there is none."""
    if not ((run_dir / "final.json").exists() or (run_dir / "last.pt").exists()):
        return None
    recorded_path = run_dir / "config.yaml"
    if not recorded_path.is_file():
        return f"{run_dir}: a run without config.yaml; its settings are unknown"
    recorded = with_recorded_split(yaml.safe_load(recorded_path.read_text()) or {})
    requested = requested_config(config_path, seed, run_dir, args)
    if identity.run_fingerprint(recorded) == identity.run_fingerprint(requested):
        return None
    state = "finished" if (run_dir / "final.json").exists() else "unfinished"
    return (f"{run_dir}: the {state} run there trained other settings than requested "
            f"({identity.differences(recorded, requested)}); use another --output-root")


def run_one(cmd, run_dir, threads):
    run_dir.mkdir(parents=True, exist_ok=True)
    code, _ = run_logged(cmd, run_dir / "log.txt", ROOT, env={"OMP_NUM_THREADS": str(threads)})
    print(f"{'done' if code == 0 else f'FAILED ({code})'}: {run_dir}", flush=True)
    return code


def write_tables(runs, out_dir):
    """results.csv / results.md of ``runs`` (seeds of one row checked); the Markdown."""
    rows = records.rows_by_config(runs)
    per_seed = [{"config": r.config, "seed": r.seed,
                 **{m: r.final["accuracy"].get(m) for m in MODES}} for r in runs]
    summary = [{"config": name, "seeds": len(group),
                **{m: [r.final["accuracy"][m] for r in group if r.final["accuracy"].get(m)
                       is not None] for m in MODES}} for name, group in rows.items()]
    stats = []
    for s in summary:
        for label, index in (("mean", 0), ("std", 1)):
            stats.append({"config": s["config"], "seed": label, **{
                m: f"{records.mean_std(s[m])[index]:.2f}" for m in MODES if s[m]}})
    records.write_csv(out_dir / "results.csv", ["config", "seed", *MODES], per_seed + stats)
    text = "\n".join([
        f"Test accuracy of the final model ({records.STD_LABEL}).", "",
        records.markdown_table(["config", "seeds", "soft", "hard (k-bit)", "fp32"],
                               [[s["config"], s["seeds"], *(records.format_mean_std(s[m])
                                                           for m in MODES)] for s in summary]),
        "",
        records.markdown_table(["config", "seed", "soft", "hard", "fp32"],
                               [[r["config"], r["seed"], *("-" if r[m] is None else f"{r[m]:.2f}"
                                                           for m in MODES)] for r in per_seed])])
    (out_dir / "results.md").write_text(text + "\n")
    return text


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
    jobs = [(c, s, out_dir / c.stem / f"seed{s}") for c in configs for s in args.seeds]
    try:
        conflicts = [] if args.collect_only else \
            [c for c in (identity_conflict(*job, args) for job in jobs) if c]
    except RingqError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if conflicts:
        print("error: " + "\n".join(conflicts), file=sys.stderr)
        return 2
    out_dir.mkdir(parents=True, exist_ok=True)
    failed = []
    if not args.collect_only:
        todo = [job for job in jobs if not (job[2] / "final.json").exists()]
        threads = max(1, (os.cpu_count() or 1) // max(1, args.jobs))
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            codes = list(pool.map(lambda job: run_one(build_command(*job, args), job[2],
                                                      threads), todo))
        failed = [str(job[2]) for job, code in zip(todo, codes) if code != 0]
    names, seeds = {c.stem for c in configs}, set(args.seeds)
    try:
        runs = [r for r in records.finished_runs(out_dir) if r.config in names and r.seed in seeds]
        print(write_tables(runs, out_dir) if runs else "no finished runs to tabulate")
    except records.RecordError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if failed:
        print(f"error: {len(failed)} of {len(jobs)} run(s) failed (see their log.txt): "
              + ", ".join(failed), file=sys.stderr)
        return 1
    if args.plot:
        import plot
        return plot.main([str(out_dir), "--out", args.plot])
    return 0

if __name__ == "__main__":
    sys.exit(main())
