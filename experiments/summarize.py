#!/usr/bin/env python3
"""The comparison table of a sweep: accuracy, bits, levels and packed size per method.

    python experiments/summarize.py RUNS_DIR --data-dir DIR [--ptq-bits 8 4]
                                    [--bn-recalibrate 10000] [--device cpu] [--archive DEST]
                                    [--paper experiments/paper_resnet20_cifar10.yaml]

RUNS_DIR is a folder the runner wrote (``<config>/seed<k>/``). For every finished
run the evaluations below are written into its folder, each skipped when its JSON
already exists (so the command resumes):

- ``eval_best.json``: ``evaluate.py`` on ``best.pt`` (the epoch chosen on validation);
- quantized runs: ``export_best.json``, the size report of ``export.py`` packing
  ``best.pt`` into ``best.rqp``;
- FP32 runs, for each K of ``--ptq-bits``: ``eval_ptq{K}.json`` / ``eval_best_ptq{K}.json``
  (``evaluate.py --ptq-bits K`` of ``last.pt`` / ``best.pt``) and ``export_ptq{K}.json``
  (the packed size of the post-training quantized final model);
- published-recipe ring runs: ``eval_bn.json``, hard accuracy after BatchNorm is
  re-estimated from ``--bn-recalibrate`` training images with hard weights.

It then writes ``summary.md`` and ``summary.csv`` beside the runs: one row per
config (plus a PTQ row per K and a "BN re-estimated" row where they apply) with
the seeds, the bits per weight, the distinct levels, the test accuracy of the final
model (hard, soft beside it for rings; mean ± population std over seeds) and of ``best.pt``,
and the packed file's bytes with its compression ratio, overall and over the
quantized layers.

``--paper FILE`` (YAML: ``fp32_row``, the FP32 config, and ``accuracy``, the published
figure per config) adds the published figure, the published gap to FP32 and this sweep's
gaps to its FP32 row (FP32's final accuracy minus the row's final hard and soft means);
``RUNS_DIR/paper.yaml`` is read when ``--paper`` is not given, and ``--archive`` copies the
file there.

``--archive DEST`` then copies every run's records (``RECORDS``: config, final
accuracy, per-epoch metrics, log and the JSON reports above, no checkpoints) to
``DEST/<config>/seed<k>/`` with the summary beside them: a tree small enough to
commit, from which this script (no ``--data-dir`` needed: a run without checkpoints
gets no evaluations) and ``plot.py`` redraw the table and the figures.
"""
import argparse
import json
import math
import shutil
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import records  # noqa: E402
from ringq.runtime import run_logged  # noqa: E402

COLUMNS = ["row", "seeds", "bits", "levels", "final_hard", "final_soft", "best_hard", "bytes",
           "ratio", "ratio_quantized"]
RECORDS = ("config.yaml", "final.json", "metrics.csv", "log.txt", "eval_*.json", "export_*.json")
PAPER_COLUMNS = ["paper", "paper_gap", "gap_hard", "gap_soft"]
PAPER_FILE = "paper.yaml"


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, metavar="RUNS_DIR", help="folder of <config>/seed<k>/")
    parser.add_argument("--data-dir", help="the dataset the runs trained on (needed when "
                        "a run with checkpoints lacks an evaluation)")
    parser.add_argument("--ptq-bits", type=int, nargs="*", default=[8, 4], metavar="K",
                        help="post-training quantization widths for FP32 runs (default: 8 4)")
    parser.add_argument("--bn-recalibrate", type=int, default=10000, metavar="N",
                        help="training images for the BatchNorm re-estimation of published "
                             "ring runs (0: none; default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="device of the evaluations")
    parser.add_argument("--archive", type=Path, metavar="DEST",
                        help="copy the runs' records (no checkpoints) and the summary to DEST")
    parser.add_argument("--paper", type=Path, metavar="FILE",
                        help="published figures (YAML: fp32_row, accuracy: {config: %%}) to "
                             "set beside the rows, with the gaps to FP32 (default: "
                             f"RUNS_DIR/{PAPER_FILE} when present)")
    return parser


def load_paper(path):
    """The published figures of ``path``: {"fp32_row": config, "accuracy": {config: %}};
    RecordError (one line) when the file is not of that shape."""
    try:
        paper = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise records.RecordError(f"{path}: not a readable YAML file ({type(e).__name__})") \
            from None
    accuracy = paper.get("accuracy") if isinstance(paper, dict) else None
    if not (isinstance(accuracy, dict) and accuracy and
            all(isinstance(v, (int, float)) for v in accuracy.values()) and
            paper.get("fp32_row") in accuracy):
        raise records.RecordError(f"{path}: expected fp32_row: CONFIG and accuracy: {{CONFIG: "
                                  f"PERCENT}} holding that config")
    return paper


def published_ring(cfg):
    return cfg["quantization"] == "ring" and cfg.get("ring_layout", "published") == "published"


def evaluations(folder, cfg, args):
    """{json file name: command} of the evaluations a run gets (see the module docstring)."""
    data_dir = Path(args.data_dir or ".").resolve()  # the commands run in the run's folder
    evaluate = [sys.executable, ROOT / "evaluate.py", "--data-dir", data_dir, "--no-download",
                "--device", args.device, "--quiet"]
    export = [sys.executable, ROOT / "export.py", "--quiet"]
    best, last = "best.pt", "last.pt"  # relative: the reports name the run's own files
    steps = {"eval_best.json": evaluate + ["--checkpoint", best]}
    if cfg["quantization"] == "none":
        for k in args.ptq_bits:
            steps[f"eval_ptq{k}.json"] = evaluate + ["--checkpoint", last, "--ptq-bits", k]
            steps[f"eval_best_ptq{k}.json"] = evaluate + ["--checkpoint", best, "--ptq-bits", k]
            steps[f"export_ptq{k}.json"] = export + ["--checkpoint", last, "--bits", k,
                                                     "--output", f"ptq{k}.rqp"]
    else:
        steps["export_best.json"] = export + ["--checkpoint", best, "--output", "best.rqp"]
    if published_ring(cfg) and args.bn_recalibrate:
        steps["eval_bn.json"] = evaluate + ["--checkpoint", last, "--bn-recalibrate",
                                            args.bn_recalibrate]
    return steps


def missing_evaluations(folder, cfg, args):
    """{name: command} of the evaluations a run with checkpoints still lacks (none for a
    record without checkpoints, such as an ``--archive`` copy)."""
    if not any(folder.glob("*.pt")):
        return {}
    return {name: cmd for name, cmd in evaluations(folder, cfg, args).items()
            if not (folder / name).exists()}


def run_evaluations(folder, steps):
    """Run the evaluations ``steps`` ({json name: command}) in the run's folder; the names
    of those that failed."""
    return [f"{folder}/{name}" for name, cmd in steps.items()
            if run_logged(cmd + ["--json", name], folder / "summarize.log", folder)[0]]


def _read(folder, name):
    path = folder / name
    return json.loads(path.read_text()) if path.exists() else None


def _bits_and_levels(cfg, final):
    if cfg["quantization"] == "none":
        return 32, "-"
    if cfg["quantization"] == "uniform":
        return cfg["bits"], f"{2 ** cfg['bits']} per channel"
    return math.log2(cfg["ring_size"]), final.get("num_distinct_values", "-")


def row_samples(config, folder, cfg, final, ptq_bits):
    """{row name: {column: value}} that one run contributes (one seed's values)."""
    rows = {}
    bits, levels = _bits_and_levels(cfg, final)
    best = _read(folder, "eval_best.json")
    main = "fp32" if cfg["quantization"] == "none" else "hard"
    size = _read(folder, "export_best.json") or {}
    rows[config] = {"bits": bits, "levels": levels, "final_hard": final["accuracy"][main],
                    "final_soft": final["accuracy"].get("soft"),
                    "best_hard": best["accuracy"][main] if best else None,
                    "bytes": size.get("file_bytes"), "ratio": size.get("ratio"),
                    "ratio_quantized": size.get("quantized_layers_ratio")}
    for k in ptq_bits if cfg["quantization"] == "none" else ():
        last, best_k = _read(folder, f"eval_ptq{k}.json"), _read(folder, f"eval_best_ptq{k}.json")
        size = _read(folder, f"export_ptq{k}.json") or {}
        if last:
            rows[f"{config} PTQ INT{k}"] = {
                "bits": k, "levels": f"{2 ** k} per channel",
                "final_hard": last["accuracy"]["hard"],
                "best_hard": best_k["accuracy"]["hard"] if best_k else None,
                "bytes": size.get("file_bytes"), "ratio": size.get("ratio"),
                "ratio_quantized": size.get("quantized_layers_ratio")}
    bn = _read(folder, "eval_bn.json")
    if bn:
        rows[f"{config} hard + BN re-estimated"] = {
            "bits": bits, "levels": levels, "final_hard": bn["bn_recalibration"]["accuracy"]}
    return rows


def _mean(values):
    """The mean of the values that are not None; None when there are none."""
    values = [v for v in values if v is not None]
    return records.mean_std(values)[0] if values else None


def summarise(runs, ptq_bits, paper=None):
    """Table rows (dicts of COLUMNS, and PAPER_COLUMNS with ``paper``, formatted), in config
    order; RecordError when the runs of one config are not seeds of one recipe."""
    samples = {}
    for group in records.rows_by_config(runs).values():
        for run in group:
            for row, values in row_samples(run.config, run.folder, run.cfg, run.final,
                                           ptq_bits).items():
                samples.setdefault(row, []).append(values)
    means = {row: {key: _mean([s.get(key) for s in seeds]) for key in ("final_hard", "final_soft")}
             for row, seeds in samples.items()}
    table = []
    for row, seeds in samples.items():
        out = {"row": row, "seeds": len(seeds), "bits": f"{seeds[0]['bits']:g}",
               "levels": seeds[0]["levels"]}
        for key in ("final_hard", "final_soft", "best_hard"):
            out[key] = records.format_mean_std([s[key] for s in seeds if s.get(key) is not None])
        for key, fmt in (("bytes", "{:,.0f}"), ("ratio", "{:.2f}x"),
                         ("ratio_quantized", "{:.2f}x")):
            values = [s[key] for s in seeds if s.get(key) is not None]
            out[key] = fmt.format(records.mean_std(values)[0]) if values else "-"
        if paper:
            out.update(paper_columns(row, means, paper))
        table.append(out)
    return table


def paper_columns(row, means, paper):
    """The published figure and gap of ``row``, and its gaps to this sweep's FP32 row."""
    published, fp32_row = paper["accuracy"], paper["fp32_row"]
    fp32 = means.get(fp32_row, {}).get("final_hard")

    def gap(reference, value):
        return "-" if reference is None or value is None else f"{reference - value:.2f}"

    return {"paper": f"{published[row]:.2f}" if row in published else "-",
            "paper_gap": gap(published[fp32_row], published.get(row)),
            "gap_hard": gap(fp32, means[row]["final_hard"]),
            "gap_soft": gap(fp32, means[row]["final_soft"])}


HEADER = ["row", "seeds", "bits", "levels", "final, hard", "final, soft", "best.pt, hard",
          "packed bytes (best.pt)", "ratio (best.pt)", "ratio, quantized layers"]
PAPER_HEADER = ["paper", "paper's gap to FP32", "gap to FP32, hard", "gap to FP32, soft"]
NOTE = (f"Test accuracy, {records.STD_LABEL}. The packed bytes and ratios are those of "
        "best.pt's packed file (the final model's file differs by a few bytes of header).")
PAPER_NOTE = (" The paper's figures and gaps are its own (soft mode for rings); the gaps to "
              "FP32 are this sweep's FP32 final accuracy minus the row's final mean.")


def write_summary(table, root, paper=False):
    columns, header = (COLUMNS + PAPER_COLUMNS, HEADER + PAPER_HEADER) if paper else \
        (COLUMNS, HEADER)
    records.write_csv(root / "summary.csv", columns, table)
    text = NOTE + (PAPER_NOTE if paper else "") + "\n\n" + records.markdown_table(
        header, [[r[c] for c in columns] for r in table])
    (root / "summary.md").write_text(text + "\n")
    return text


def archive(runs, dest):
    """Copy the ``RECORDS`` of every run to ``dest/<config>/seed<k>/``; the log's machine
    paths become placeholders (:func:`records.portable_log`)."""
    for run in runs:
        target, folder = dest / run.config / f"seed{run.seed}", run.folder
        target.mkdir(parents=True, exist_ok=True)
        for pattern in RECORDS:
            for path in folder.glob(pattern):
                if path.name == "log.txt":
                    (target / path.name).write_text(records.portable_log(path.read_text(),
                                                                         folder))
                else:
                    shutil.copy2(path, target / path.name)


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    if not args.runs.is_dir():
        print(f"error: no such folder: {args.runs}", file=sys.stderr)
        return 2
    paper_path = args.paper or (args.runs / PAPER_FILE)
    try:
        runs = records.finished_runs(args.runs)
        records.rows_by_config(runs)
        paper = load_paper(paper_path) if args.paper or paper_path.is_file() else None
    except records.RecordError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not runs:
        print(f"error: no finished runs (final.json) under {args.runs}", file=sys.stderr)
        return 2
    steps = {run.folder: missing_evaluations(run.folder, run.cfg, args) for run in runs}
    if any(steps.values()) and not args.data_dir:
        print(f"error: {sum(map(len, steps.values()))} evaluation(s) to run (first: "
              f"{next(f for f, s in steps.items() if s)}); pass --data-dir", file=sys.stderr)
        return 2
    failed = [name for folder, todo in steps.items() for name in run_evaluations(folder, todo)]
    table = summarise(runs, args.ptq_bits, paper)
    print(write_summary(table, args.runs, bool(paper)))
    if args.archive:
        archive(runs, args.archive)
        write_summary(table, args.archive, bool(paper))
        if paper and paper_path.resolve() != (args.archive / PAPER_FILE).resolve():
            shutil.copy2(paper_path, args.archive / PAPER_FILE)
    if failed:
        print(f"{len(failed)} evaluation(s) failed; see summarize.log in: "
              + ", ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
