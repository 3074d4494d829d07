"""Every file in pretrained/ reproduces the figures of README's pretrained table.

The table (``| `FILE` | data | weights | bytes | test accuracy | command |``) is the
record: each file must be listed, be as large as listed, load as what its weights
column says, and evaluate to the listed accuracy on the shared dataset copy; an `.onnx`
file evaluates in onnxruntime and agrees with the hard mode of the file it was made from.
"""
import json
import re
import subprocess
import sys

import pytest

from conftest import ROOT, SHARED
from ringq.checkpoint import load_model_from_checkpoint
from ringq.onnx_export import check_onnx_file

FASHION = SHARED / "data" / "fashion-mnist"
DATASETS = {"Fashion-MNIST": "fashion-mnist", "CIFAR-10 (JPEG copy)": "cifar10"}
ROW = re.compile(r"^\| `(?P<file>[^`]+)` \| (?P<data>[^|]+?) \| (?P<weights>[^|]+?) \| "
                 r"(?P<bytes>[\d,]+) \| (?P<accuracy>[\d.]+) \| (?P<command>.*) \|$", re.M)
FILES = sorted(p.name for p in (ROOT / "pretrained").iterdir()
               if p.suffix in (".rqp", ".pt", ".onnx"))
ONNX_SOURCE = re.compile(r"--checkpoint (pretrained/\S+) --onnx")


def readme_rows():
    return {m["file"]: m.groupdict() for m in ROW.finditer((ROOT / "README.md").read_text())}


def test_readme_lists_exactly_the_pretrained_files():
    assert FILES and set(readme_rows()) == set(FILES)


@pytest.mark.parametrize("name", FILES)
def test_pretrained_file_size_and_kind(name):
    row = readme_rows()[name]
    path = ROOT / "pretrained" / name
    assert path.stat().st_size == int(row["bytes"].replace(",", ""))
    if path.suffix == ".onnx":
        info = check_onnx_file(path)
        assert info["dataset"] == DATASETS[row["data"]] and info["opset"] == 25
        assert ONNX_SOURCE.search(row["command"])  # made from a shipped file, by export.py
        return
    _, config, meta = load_model_from_checkpoint(path)
    assert meta["dataset"] == DATASETS[row["data"]]
    if row["weights"] == "FP32":
        assert config["quantization"] == "none" and meta["source"] == "ringq"
    else:
        assert meta["source"] == "packed"
        assert (config["quantization"], config.get("ring_layout")) in (("ring", "distinct"),
                                                                       ("uniform", None))


def _data_dir(row, request):
    if row["data"].startswith("CIFAR-10"):
        return request.getfixturevalue("cifar_dir")
    if not (FASHION / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip(f"Fashion-MNIST not found in {FASHION} (../shared is absent)")
    return FASHION


@pytest.mark.parametrize("name", FILES)
def test_pretrained_accuracy(name, tmp_path, request):
    row = readme_rows()[name]
    out = tmp_path / "report.json"
    reference = ["--reference", ONNX_SOURCE.search(row["command"]).group(1)] \
        if name.endswith(".onnx") else []
    result = subprocess.run([sys.executable, "evaluate.py", "--checkpoint", f"pretrained/{name}",
                             "--data-dir", str(_data_dir(row, request)), "--json", str(out),
                             "--quiet", "--no-download", "--device", "cpu", *reference],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    (mode, accuracy), = report["accuracy"].items()
    assert mode == ("fp32" if row["weights"] == "FP32" else "hard")
    assert accuracy == pytest.approx(float(row["accuracy"]), abs=0.02)
    if reference:  # onnxruntime against PyTorch's hard mode of the file it was made from
        agree = report["reference"]
        assert agree["same_top1"] >= 9990 and agree["max_abs_logit_diff"] < 1e-3
        return
    if row["weights"] != "FP32":
        levels, bits = re.fullmatch(r"(\d+) levels(?: per channel)?, (\d+) bits",
                                    row["weights"]).groups()
        assert report["num_distinct_values"] == int(levels)
        assert report.get("effective_bits", report.get("bits")) == int(bits)
