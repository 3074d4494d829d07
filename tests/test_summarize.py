"""experiments/summarize.py on a tiny sweep trained here: evaluations, packed sizes, table."""
import csv
import sys

import pytest

from conftest import ROOT
from run_helpers import tiny_args, train_main

pytest_plugins = ["run_helpers"]
sys.path.insert(0, str(ROOT / "experiments"))
import summarize  # noqa: E402

CONFIGS = {"mlp_fp32": ("--quantization", "none"),
           "mlp_ring4": ("--ring-size", 4),
           "mlp_uniform2": ("--quantization", "uniform", "--bits", 2, "--select-mode", "hard")}


@pytest.fixture(scope="module")
def sweep(idx_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    for name, extra in CONFIGS.items():
        out = root / name / "seed1"
        assert train_main("mnist", tiny_args(idx_data, out, "--model", "mlp", "--seed", 1,
                                             *extra)) == 0
    return root, idx_data


def test_evaluations_and_table(sweep):
    root, data = sweep
    args = [str(root), "--data-dir", str(data), "--ptq-bits", "8", "--bn-recalibrate", "60"]
    assert summarize.main(args) == 0
    for name in ("eval_best.json", "eval_ptq8.json", "eval_best_ptq8.json", "export_ptq8.json"):
        assert (root / "mlp_fp32" / "seed1" / name).is_file()
    assert (root / "mlp_ring4" / "seed1" / "eval_bn.json").is_file()
    assert (root / "mlp_uniform2" / "seed1" / "best.rqp").is_file()
    with open(root / "summary.csv") as f:
        rows = {r["row"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"mlp_fp32", "mlp_fp32 PTQ INT8", "mlp_ring4",
                         "mlp_ring4 hard + BN re-estimated", "mlp_uniform2"}
    assert rows["mlp_fp32"]["bits"] == "32" and rows["mlp_fp32"]["bytes"] == "-"
    assert rows["mlp_uniform2"]["levels"] == "4 per channel"
    assert rows["mlp_ring4"]["levels"] == "2" and rows["mlp_ring4"]["final_soft"] != "-"
    for row in ("mlp_fp32 PTQ INT8", "mlp_ring4", "mlp_uniform2"):
        assert int(rows[row]["bytes"].replace(",", "")) > 0
        assert float(rows[row]["ratio_quantized"].rstrip("x")) > 1
    assert "| mlp_uniform2 | 1 | 2 |" in (root / "summary.md").read_text()
    written = {p: p.stat().st_mtime_ns for p in (root / "mlp_fp32" / "seed1").glob("*.json")}
    assert summarize.main(args) == 0  # resumes: nothing is evaluated again
    assert all(p.stat().st_mtime_ns == t for p, t in written.items())


def test_no_runs_is_one_line(tmp_path, capsys):
    assert summarize.main([str(tmp_path), "--data-dir", str(tmp_path)]) == 2
    assert "no finished runs" in capsys.readouterr().err


def test_archive_holds_records_and_redraws_the_table(sweep, tmp_path, capsys):
    root, data = sweep
    dest = tmp_path / "records"
    assert summarize.main([str(root), "--data-dir", str(data), "--ptq-bits", "8",
                           "--bn-recalibrate", "60", "--archive", str(dest)]) == 0
    copied = {p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()}
    assert {"mlp_fp32/seed1/final.json", "mlp_fp32/seed1/metrics.csv",
            "mlp_fp32/seed1/eval_ptq8.json", "mlp_ring4/seed1/eval_bn.json",
            "mlp_uniform2/seed1/export_best.json", "summary.md"} <= copied
    assert not any(name.endswith((".pt", ".rqp")) for name in copied)
    table = (dest / "summary.md").read_text()
    assert table == (root / "summary.md").read_text()
    (dest / "summary.md").unlink()
    assert summarize.main([str(dest), "--ptq-bits", "8"]) == 0  # records only: no data needed
    assert (dest / "summary.md").read_text() == table
    import plot
    assert plot.main([str(dest), "--out", str(tmp_path / "figures")]) == 0
    assert all((tmp_path / "figures" / name).stat().st_size > 10_000 for name in plot.FIGURES)


def test_missing_evaluation_without_data_dir_is_one_line(sweep, tmp_path, capsys):
    root, _ = sweep
    (root / "mlp_fp32" / "seed1" / "eval_best.json").rename(tmp_path / "kept.json")
    try:
        assert summarize.main([str(root), "--ptq-bits", "8"]) == 2
        assert "evaluation(s) to run (first:" in capsys.readouterr().err
    finally:
        (tmp_path / "kept.json").rename(root / "mlp_fp32" / "seed1" / "eval_best.json")
