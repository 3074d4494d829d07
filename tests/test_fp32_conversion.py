"""FP32 LeNet on the real Fashion-MNIST: post-training quantization and warm starts.

A small FP32 LeNet is trained here (5,000 training images, 2 epochs) since no
FP32 network is shipped; the test split is the full 10,000 images.
"""
import json

import pytest
import torch

import evaluate
import export
from conftest import SHARED
from models import build_model
from models.convert import init_from_fp32
from ringq import data as data_lib
from ringq.checkpoint import load_model_from_checkpoint
from ringq.runtime import run_cli
from run_helpers import exit_code, train_main

pytest_plugins = ["run_helpers"]
FASHION = SHARED / "data" / "fashion-mnist"


@pytest.fixture(scope="module")
def fp32_lenet(tmp_path_factory, one_thread):
    if not (FASHION / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip(f"Fashion-MNIST not found in {FASHION} (../shared is absent)")
    out = tmp_path_factory.mktemp("fp32") / "lenet"
    assert train_main("mnist", ["--dataset", "fashion-mnist", "--data-dir", FASHION,
                                "--no-download", "--quantization", "none", "--subset", 5000,
                                "--epochs", 2, "--schedule", 1, "--quiet",
                                "--output-dir", out]) == 0
    return out / "last.pt"


def _evaluate(tmp_path, *argv):
    """evaluate.py's JSON report for ``argv``."""
    path = tmp_path / f"report{len(list(tmp_path.iterdir()))}.json"
    assert exit_code(run_cli, evaluate.main, [*map(str, argv), "--data-dir", str(FASHION),
                                              "--quiet", "--no-download", "--json", str(path)]) == 0
    return json.loads(path.read_text())


@pytest.mark.parametrize("scale", ["max", "mse"])
def test_ptq_8_bits_keeps_fp32_accuracy(fp32_lenet, tmp_path, scale, capsys):
    fp32 = _evaluate(tmp_path, "--checkpoint", fp32_lenet)["accuracy"]["fp32"]
    int8 = _evaluate(tmp_path, "--checkpoint", fp32_lenet, "--ptq-bits", 8, "--ptq-scale", scale)
    assert set(int8["accuracy"]) == {"hard"} and int8["ptq"] == {"bits": 8, "scale": scale}
    assert int8["quantization"] == "uniform" and int8["bits"] == 8
    assert abs(int8["accuracy"]["hard"] - fp32) <= 0.3
    assert "uniform 8-bit, 256 integer levels per output channel (post-training" \
        in capsys.readouterr().out


def test_ptq_file_predicts_as_ptq_evaluation(fp32_lenet, tmp_path):
    packed = tmp_path / "lenet_int4.rqp"
    assert exit_code(run_cli, export.main, ["--checkpoint", str(fp32_lenet), "--bits", "4",
                                            "--output", str(packed), "--quiet"]) == 0
    direct = _evaluate(tmp_path, "--checkpoint", fp32_lenet, "--ptq-bits", 4)
    from_file = _evaluate(tmp_path, "--checkpoint", packed)
    assert from_file["accuracy"] == direct["accuracy"] and from_file["loss"] == direct["loss"]
    recalibrated = _evaluate(tmp_path, "--checkpoint", fp32_lenet, "--ptq-bits", 2,
                             "--bn-recalibrate", 2000)
    assert recalibrated["bn_recalibration"]["images"] == 2000


# config -> least top-1 agreement with the FP32 network over the 10,000 test images
WARM_STARTS = {
    "ring4-kbit": (dict(quantization="ring", ring_size=4, ring_layout="distinct", sigma=2.0),
                   0.999),
    "ring8-kbit": (dict(quantization="ring", ring_size=8, ring_layout="distinct", sigma=4.0),
                   0.999),
    "uniform8": (dict(quantization="uniform", bits=8), 0.99),
}


@pytest.mark.parametrize("name", WARM_STARTS)
def test_warm_start_reproduces_fp32_predictions(fp32_lenet, name):
    config, least = WARM_STARTS[name]
    fp32, fp32_config, _ = load_model_from_checkpoint(fp32_lenet)
    fp32.eval()
    model = build_model({**fp32_config, **config})
    init_from_fp32(model, fp32.state_dict())
    test = data_lib.load_split("fashion-mnist", FASHION, "test", download=False)
    mean, std = data_lib.NORMALIZATION["fashion-mnist"]
    loader = data_lib.make_loader("memory", test, 1000, mean=mean, std=std,
                                  device=torch.device("cpu"), shuffle=False, augment=False, seed=0)
    agree = count = 0
    model.eval()
    with torch.no_grad():
        for x, _ in loader:
            agree += (model(x).argmax(1) == fp32(x).argmax(1)).sum().item()
            count += x.shape[0]
    assert count == 10_000 and agree / count >= least
    print(f"{name}: {agree} of {count} test predictions equal the FP32 network's")
