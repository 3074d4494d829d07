#!/usr/bin/env python3
"""Park a sweep's unfinished runs where they travel with the repository, and restore them.

    python experiments/park.py RUNS/cifar10_200ep in_flight/cifar10_200ep
    python experiments/park.py --restore in_flight/cifar10_200ep RUNS/cifar10_200ep

A 200-epoch CPU run spans sessions, and the machine it ran on may not be there for the
next one. Parking copies every unfinished run of SOURCE (a ``last.pt`` without
``final.json``) to ``DEST/<config>/seed<k>/``: ``last.pt``; ``best.pt`` only when it is
another epoch (otherwise it is the same checkpoint, made again on restore);
``config.yaml``, ``metrics.csv`` and ``log.txt``. The checkpoints' recorded config loses
this machine's paths (:func:`ringq.checkpoint.portable_config`) and the log's paths
become placeholders; nothing else changes, so the run continues bit for bit. A run
that has finished in SOURCE is removed from DEST (its records belong in ``results/``:
``summarize.py --archive``).

``--restore`` copies the parked runs back under a runner's output root, where the same
``experiments/run.py`` command (with ``--data-dir``) resumes each where it stopped; a
run that is as far along or further there is left as it is. One line per run is
printed: what was parked, restored, removed or kept.
"""
import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import records  # noqa: E402
from ringq.atomic import save_atomic  # noqa: E402
from ringq.checkpoint import portable_config, safe_load  # noqa: E402
from ringq.runtime import run_cli  # noqa: E402

TEXT_FILES = ("config.yaml", "metrics.csv", "log.txt")


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="a sweep folder of <config>/seed<k>/ runs")
    parser.add_argument("dest", type=Path, help="where the runs go")
    parser.add_argument("--restore", action="store_true",
                        help="copy parked runs (SOURCE) back under a runner's output root (DEST)")
    return parser


def _epoch(path):
    return int(safe_load(path)["epoch"]) if path.is_file() else -1


def park_run(folder, target):
    """Copy the unfinished run in ``folder`` to ``target`` without machine paths; its epoch."""
    target.mkdir(parents=True, exist_ok=True)
    last = safe_load(folder / "last.pt")
    best = safe_load(folder / "best.pt") if (folder / "best.pt").is_file() else None
    save_atomic({**last, "config": portable_config(last["config"])}, target / "last.pt")
    (target / "best.pt").unlink(missing_ok=True)
    if best is not None and best["epoch"] != last["epoch"]:
        save_atomic({**best, "config": portable_config(best["config"])}, target / "best.pt")
    for name in TEXT_FILES:
        if (folder / name).is_file():
            text = (folder / name).read_text()
            (target / name).write_text(records.portable_log(text, folder)
                                       if name == "log.txt" else text)
    return int(last["epoch"])


def park(source, dest):
    for config, seed, folder in records.run_folders(source):
        target, name = dest / config / f"seed{seed}", f"{config} seed {seed}"
        if (folder / "final.json").is_file():
            if target.is_dir():
                shutil.rmtree(target)
                if not any(target.parent.iterdir()):
                    target.parent.rmdir()
                print(f"{name}: finished, removed from {dest}")
        elif (folder / "last.pt").is_file():
            print(f"{name}: parked at epoch {park_run(folder, target)}")


def restore(source, dest):
    for config, seed, folder in records.run_folders(source):
        target, name = dest / config / f"seed{seed}", f"{config} seed {seed}"
        parked, there = _epoch(folder / "last.pt"), _epoch(target / "last.pt")
        if (target / "final.json").is_file() or there >= parked:
            state = "finished" if (target / "final.json").is_file() else f"at epoch {there}"
            print(f"{name}: kept ({state} in {dest})")
            continue
        target.mkdir(parents=True, exist_ok=True)
        for path in folder.iterdir():
            shutil.copy2(path, target / path.name)
        if not (folder / "best.pt").is_file():
            shutil.copy2(folder / "last.pt", target / "best.pt")
        print(f"{name}: restored at epoch {parked}")


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    if not args.source.is_dir():
        print(f"error: no such folder: {args.source}", file=sys.stderr)
        return 2
    try:
        (restore if args.restore else park)(args.source, args.dest)
    except records.RecordError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
