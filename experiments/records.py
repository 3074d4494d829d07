"""The records of finished runs, grouped into table rows: shared by run.py, summarize.py and
plot.py.

A sweep folder holds ``<config>/seed<k>/`` run folders; a run is finished when its
``final.json`` exists, and its ``config.yaml`` says what it trained. Runs are seeds of
one row only when their recipe fingerprints (``ringq.identity``) agree and their seeds
differ; anything else is a :class:`RecordError`, which the scripts print as one line
(exit status 2) before any work. Spreads are the population standard deviation over
seeds (``STD_LABEL``).
"""
import csv
import json
import re
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # imported by the scripts in experiments/

from ringq import identity  # noqa: E402
from ringq.config import with_recorded_split  # noqa: E402

SEED_FOLDER = re.compile(r"seed(\d+)")
PATH_FLAGS = {"--data-dir": "DIR", "--init-from": "SOURCE", "--distill-from": "SOURCE",
              "--resume": "RUN/last.pt"}
# "$ INTERPRETER [/any/folder/]SCRIPT.py": the script keeps its path under the root
COMMAND_LINE = re.compile(r"^\$ \S+ (?:/\S*?/)?((?:experiments/|examples/|bench/)?[\w.-]+\.py)\b",
                          re.M)
STD_LABEL = "mean ± population std over seeds"


class RecordError(Exception):
    """Records that cannot be tabulated as they are; the message is one line."""


@dataclass(frozen=True)
class Run:
    """One finished run: where it is, what it trained (``cfg``) and its ``final.json``."""
    root: Path
    config: str
    seed: int
    folder: Path
    cfg: dict
    final: dict

    @property
    def recipe(self):
        """The recipe fingerprint: equal for the seeds of one row."""
        return identity.recipe_fingerprint(self.cfg)


def _read(path, parse):
    try:
        return parse(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as e:
        raise RecordError(f"{path}: unreadable ({type(e).__name__}: "
                          f"{(str(e).splitlines() or [''])[0][:120]})") from None


def portable_log(text, folder):
    """A run's log.txt without this machine's paths: the run folder becomes ``RUN``, a
    command line's interpreter becomes ``python`` and its script loses the folder it ran
    from (the repository root or a snapshot of it), paths under the repository root
    become relative, and an absolute path after a flag of ``PATH_FLAGS`` becomes its
    placeholder."""
    text = text.replace(str(Path(folder).resolve()), "RUN").replace(str(folder), "RUN")
    text = COMMAND_LINE.sub(r"$ python \1", text)
    text = text.replace(str(ROOT) + "/", "")
    for flag, placeholder in PATH_FLAGS.items():
        text = re.sub(rf"{flag} /\S+", f"{flag} {placeholder}", text)
    return text


def run_folders(root):
    """(config name, seed, folder) of every ``<config>/seed<k>/`` folder under ``root``.

    RecordError for a folder whose name starts with ``seed`` but is not ``seed<k>``
    (``seed1.bak``): it would be read as a seed, or silently left out.
    """
    for config_dir in sorted(p for p in Path(root).iterdir() if p.is_dir()):
        for folder in sorted(p for p in config_dir.iterdir() if p.is_dir()):
            match = SEED_FOLDER.fullmatch(folder.name)
            if match:
                yield config_dir.name, int(match.group(1)), folder
            elif folder.name.startswith("seed"):
                raise RecordError(f"{folder}: not a run folder (expected seed<k>); move it out "
                                  f"of {root}")


def finished_runs(root):
    """[Run] of every finished run under ``root``, in config and seed order."""
    runs = []
    for config, seed, folder in run_folders(root):
        if not (folder / "final.json").is_file():
            continue
        if not (folder / "config.yaml").is_file():
            raise RecordError(f"{folder}: final.json without config.yaml; the run's settings "
                              f"are unknown")
        cfg = _read(folder / "config.yaml", yaml.safe_load)
        final = _read(folder / "final.json", json.loads)
        if not isinstance(cfg, dict) or not isinstance(final, dict) or \
                not isinstance(final.get("accuracy"), dict):
            raise RecordError(f"{folder}: config.yaml or final.json is not a run record")
        if cfg.get("seed", seed) != seed:
            raise RecordError(f"{folder}: the folder says seed {seed}, config.yaml "
                              f"seed {cfg['seed']}")
        runs.append(Run(Path(root), config, seed, folder, with_recorded_split(cfg), final))
    return runs


def load_runs(roots):
    """[Run] of every finished run under each of ``roots`` (RecordError for a missing one)."""
    missing = [str(r) for r in roots if not Path(r).is_dir()]
    if missing:
        raise RecordError(f"no such folder: {', '.join(missing)}")
    return [run for root in roots for run in finished_runs(root)]


def check_seeds_of_one_row(name, runs):
    """RecordError unless ``runs`` share one recipe and no seed twice (``name``: the row)."""
    first = runs[0]
    for run in runs[1:]:
        if run.recipe != first.recipe:
            raise RecordError(
                f"{name}: {first.folder} and {run.folder} trained different recipes "
                f"({identity.differences(first.cfg, run.cfg, per_run=False)}); they are not "
                f"seeds of one row: put them in separate sweep folders")
    seeds = [run.seed for run in runs]
    twice = sorted({s for s in seeds if seeds.count(s) > 1})
    if twice:
        raise RecordError(f"{name}: seed {twice[0]} appears twice ("
                          + ", ".join(str(r.folder) for r in runs if r.seed == twice[0])
                          + "); a row averages distinct seeds")


def rows_by_config(runs):
    """{config name: [Run]} in order of appearance, each checked as seeds of one row."""
    rows = {}
    for run in runs:
        rows.setdefault(run.config, []).append(run)
    for name, group in rows.items():
        check_seeds_of_one_row(name, group)
    return rows


def mean_std(values):
    """(mean, population std) of ``values``; the std is 0.0 for a single value."""
    return statistics.fmean(values), statistics.pstdev(values) if len(values) > 1 else 0.0


def format_mean_std(values, digits=2):
    """``"mean ± std"`` (``STD_LABEL``), the mean alone for a single value, ``-`` for none."""
    if not values:
        return "-"
    mean, std = mean_std(values)
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if len(values) > 1 else "")


def markdown_table(header, rows):
    """A Markdown table: ``header`` [cells], ``rows`` [[cells]]."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_csv(path, fieldnames, rows):
    """``rows`` (dicts) as CSV at ``path``; missing fields are empty."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fieldnames, restval="")
        writer.writeheader()
        writer.writerows(rows)
