"""The committed sweep records in results/: tables are what the records say, no checkpoints."""
import json
import shutil
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "experiments"))
import summarize  # noqa: E402

SWEEPS = sorted(p.parent.name for p in (ROOT / "results").glob("*/summary.md"))


def test_there_are_records():
    assert "cifar10_cpu" in SWEEPS


@pytest.mark.parametrize("sweep", SWEEPS)
def test_summary_is_redrawn_from_the_records(sweep, tmp_path, capsys):
    copy = tmp_path / sweep
    shutil.copytree(ROOT / "results" / sweep, copy)
    (copy / "summary.md").unlink()
    assert summarize.main([str(copy)]) == 0  # records only: nothing is evaluated
    assert (copy / "summary.md").read_text() == \
        (ROOT / "results" / sweep / "summary.md").read_text()


@pytest.mark.parametrize("sweep", SWEEPS)
def test_records_hold_no_checkpoints(sweep):
    files = [p for p in (ROOT / "results" / sweep).rglob("*") if p.is_file()]
    assert files and all(p.name in ("summary.md", "summary.csv", summarize.PAPER_FILE) or
                         any(p.match(pattern) for pattern in summarize.RECORDS) for p in files)


OWN_RECORDS = sorted((ROOT / "results" / "own_models").glob("*/*.json"))


def test_own_model_records_carry_no_machine_paths():
    assert OWN_RECORDS
    for path in OWN_RECORDS:
        strings = [v for v in json.loads(path.read_text()).values() if isinstance(v, str)]
        assert not any(v.startswith("/") or "/root" in v for v in strings), path


def test_own_model_table_is_what_the_records_say():
    """Every figure of RESULTS.md section 8's table row is the record's: accuracy, bytes."""
    text = (ROOT / "docs" / "RESULTS.md").read_text()
    section = text.split("## 8. Your own model")[1].split("\n## ")[0]
    rows = {"FP32": "fp32", "k-bit ring-4": "ring4", "LSQ 2-bit": "uniform2",
            "k-bit ring-4, depthwise FP32": "ring4_fp32dw",
            "LSQ 2-bit, depthwise FP32": "uniform2_fp32dw"}
    folder = ROOT / "results" / "own_models" / "mobilenet_v2"
    lines = {line.split("|")[1].strip(): line for line in section.splitlines()
             if line.startswith("| ")}
    for label, name in rows.items():
        records = [name] + ([f"{name}_half"] if name != "fp32" else [])
        for record in records:
            report = json.loads((folder / f"{record}.json").read_text())
            figures = [report["accuracy"], report["bytes"], report["onnx_bytes"]] + \
                ([f"{report['ratio']:.2f}x"] if name != "fp32" else [])
            for figure in figures:
                text = figure if isinstance(figure, str) else \
                    f"{figure:,}" if isinstance(figure, int) else f"{figure:.2f}"
                assert text in lines[label], (record, text)
