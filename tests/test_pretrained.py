"""The packed k-bit models in pretrained/ reproduce the accuracy README and docs/RESULTS.md give."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT, SHARED
from ringq.packing import load_packed

FASHION = SHARED / "data" / "fashion-mnist"
# file: (hard test accuracy on Fashion-MNIST, bits per quantized weight, distinct levels)
EXPECTED = {"lenet_ring4_kbit_fashion_mnist.rqp": (92.00, 2, 4),
            "lenet_ring8_kbit_fashion_mnist.rqp": (91.66, 3, 8)}


def test_every_pretrained_file_is_listed():
    assert {p.name for p in (ROOT / "pretrained").glob("*.rqp")} >= set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_pretrained_file_loads_as_k_bit(name):
    model, config, extra = load_packed(ROOT / "pretrained" / name)
    assert config["ring_layout"] == "distinct" and extra.get("dataset") == "fashion-mnist"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_pretrained_accuracy(name, tmp_path):
    if not (FASHION / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip(f"Fashion-MNIST not found in {FASHION} (../shared is absent)")
    accuracy, bits, levels = EXPECTED[name]
    out = tmp_path / "report.json"
    result = subprocess.run([sys.executable, "evaluate.py", "--checkpoint", f"pretrained/{name}",
                             "--data-dir", str(FASHION), "--json", str(out), "--quiet",
                             "--no-download"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert list(report["accuracy"]) == ["hard"]
    assert report["accuracy"]["hard"] == pytest.approx(accuracy, abs=0.02)
    assert report["num_distinct_values"] == levels and report["effective_bits"] == bits
