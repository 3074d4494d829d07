"""ringq.report: the recorded-best line, and the library the CLI scripts share."""
import ast

import pytest

from conftest import ROOT
from ringq.report import describe_recorded

SCRIPTS = ("evaluate.py", "export.py", "train_cifar10.py", "train_mnist.py")


def _best(**fields):
    return {"accuracy": 86.34, "split": "val", "epoch": 23, "mode": "hard", **fields}


@pytest.mark.parametrize("meta, line", [
    ({"recorded_best": None}, None),
    ({"recorded_best": _best(of="source checkpoint"), "source_file": "best.pt", "epoch": 23},
     "best val accuracy 86.34 (hard) at epoch 23 of the source checkpoint best.pt, not this "
     "file's"),
    ({"recorded_best": _best(of="source checkpoint", split=None, mode=None, epoch=None)},
     "best accuracy 86.34 of the source checkpoint, not this file's"),
    ({"recorded_best": _best(of="this run"), "epoch": 23},
     "best val accuracy 86.34 (hard) at epoch 23 of this run (this file's epoch)"),
    ({"recorded_best": _best(of="this run", epoch=57), "epoch": 60},
     "best val accuracy 86.34 (hard) at epoch 57 of this run; this file holds epoch 60"),
    ({"recorded_best": _best(of="this run", split="test", mode="soft"), "epoch": None},
     "best test accuracy 86.34 (soft) at epoch 23 of this run"),
])
def test_describe_recorded(meta, line):
    assert describe_recorded(meta) == line


@pytest.mark.parametrize("script", SCRIPTS)
def test_no_script_imports_another(script):
    tree = ast.parse((ROOT / script).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert not imported & {s[:-3] for s in SCRIPTS}, imported
