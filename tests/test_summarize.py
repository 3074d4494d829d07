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
        assert train_main("mnist", tiny_args(idx_data, out, "--model", "mlp", *extra)) == 0
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
