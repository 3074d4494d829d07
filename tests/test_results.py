"""The committed sweep records in results/: tables are what the records say, no checkpoints."""
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
    assert files and all(p.name in ("summary.md", "summary.csv") or
                         any(p.match(pattern) for pattern in summarize.RECORDS) for p in files)
