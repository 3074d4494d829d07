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


def test_paper_columns_and_gaps(sweep, tmp_path, capsys):
    """--paper sets the published figure and gaps beside the rows; the archive keeps the
    file, so the table redraws from the records alone."""
    root, data = sweep
    paper = tmp_path / "paper.yaml"
    paper.write_text("fp32_row: mlp_fp32\naccuracy: {mlp_fp32: 91.93, mlp_ring4: 89.27}\n")
    dest = tmp_path / "records"
    assert summarize.main([str(root), "--data-dir", str(data), "--ptq-bits", "8",
                           "--bn-recalibrate", "60", "--paper", str(paper),
                           "--archive", str(dest)]) == 0
    with open(dest / "summary.csv") as f:
        rows = {r["row"]: r for r in csv.DictReader(f)}
    fp32 = float(rows["mlp_fp32"]["final_hard"])
    ring = rows["mlp_ring4"]
    assert (ring["paper"], ring["paper_gap"]) == ("89.27", "2.66")
    assert float(ring["gap_hard"]) == pytest.approx(fp32 - float(ring["final_hard"]), abs=0.011)
    assert float(ring["gap_soft"]) == pytest.approx(fp32 - float(ring["final_soft"]), abs=0.011)
    assert rows["mlp_fp32"]["gap_hard"] == "0.00" and rows["mlp_fp32"]["gap_soft"] == "-"
    assert rows["mlp_uniform2"]["paper"] == rows["mlp_uniform2"]["paper_gap"] == "-"
    assert "| paper | paper's gap to FP32 |" in (dest / "summary.md").read_text()
    table = (dest / "summary.md").read_text()
    (dest / "summary.md").unlink()
    assert summarize.main([str(dest), "--ptq-bits", "8"]) == 0  # reads dest/paper.yaml
    assert (dest / "summary.md").read_text() == table


@pytest.mark.parametrize("text", ["[1, 2]", "fp32_row: x\naccuracy: {y: 1.0}\n",
                                  "fp32_row: x\naccuracy: {x: high}\n", "a: [unclosed\n"])
def test_a_bad_paper_file_is_one_line(sweep, tmp_path, capsys, text):
    root, _ = sweep
    paper = tmp_path / "paper.yaml"
    paper.write_text(text)
    assert summarize.main([str(root), "--paper", str(paper)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {paper}") and "\n" not in err


def test_the_published_figures_file():
    paper = summarize.load_paper(ROOT / "experiments" / "paper_resnet20_cifar10.yaml")
    assert paper["accuracy"] == {"resnet20_fp32": 91.93, "resnet20_ring8": 89.99,
                                 "resnet20_ring4": 89.27}
    assert all((ROOT / "experiments" / "cifar10_200ep" / f"{row}.yaml").is_file()
               for row in paper["accuracy"])
