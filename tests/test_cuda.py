"""Checks that need a CUDA GPU (``bench/gpu_check.py`` runs them); skipped without one."""
import json

import pytest
import torch

from models import build_model
from ringq import data as data_lib
from ringq.precision import autocast, native_bf16
from run_helpers import random_images, run_differences, run_script, tiny_args, train_main

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
pytest_plugins = ["run_helpers"]
CUDA = torch.device("cuda", 0)


def _on_cuda(args):
    return [a if a != "cpu" else "cuda" for a in args]


def test_memory_loader_on_cuda_draws_the_cpu_batches():
    ds = random_images(40)
    mean, std = data_lib.NORMALIZATION["cifar10"]
    batches = {}
    for device in ("cpu", CUDA):
        loader = data_lib.make_loader("memory", ds, 16, mean, std, device, shuffle=True,
                                      augment=True, seed=3)
        loader.set_epoch(2)
        batches[str(device)] = [(x.cpu(), y.cpu()) for x, y in loader]
    for (xa, ya), (xb, yb) in zip(batches["cpu"], batches["cuda:0"]):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


@pytest.mark.skipif(not torch.cuda.is_available() or not native_bf16(CUDA),
                    reason="needs a GPU with native bf16")
def test_ring_weights_stay_fp32_under_cuda_autocast():
    model = build_model(dict(model="resnet20", quantization="ring", ring_size=4,
                             ring_layout="distinct")).to(CUDA).train()
    with autocast(CUDA, "bf16"):
        out = model(torch.randn(4, 3, 32, 32, device=CUDA))
    assert out.dtype == torch.bfloat16
    assert model.conv1.quantized_weight().dtype == torch.float32


def test_fast_cuda_run_reports_what_a_cpu_evaluation_measures(idx_data, tmp_path):
    out = tmp_path / "run"
    args = _on_cuda(tiny_args(idx_data, out, "--ring-size", 4, "--ring-layout", "distinct",
                              "--precision", "auto", "--channels-last"))
    assert train_main("mnist", args) == 0
    final = json.loads((out / "final.json").read_text())
    result = run_script("evaluate.py", "--checkpoint", out / "last.pt", "--data-dir", idx_data,
                        "--dataset", "fashion-mnist", "--device", "cpu", "--json",
                        tmp_path / "cpu.json", "--quiet", "--no-download")
    assert result.returncode == 0, result.stderr
    cpu = json.loads((tmp_path / "cpu.json").read_text())
    for mode in ("soft", "hard"):
        assert abs(cpu["accuracy"][mode] - final["accuracy"][mode]) <= 100 / 60 + 1e-9


def test_deterministic_resume_on_cuda_is_exact(idx_data, tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    common = ("--ring-size", 4, "--deterministic", "--epochs", 2)
    assert train_main("mnist", _on_cuda(tiny_args(idx_data, whole, *common))) == 0
    assert train_main("mnist", _on_cuda(tiny_args(idx_data, split, *common[:-1], 1,
                                                  "--schedule"))) == 0
    assert train_main("mnist", ["--resume", split / "last.pt", "--epochs", 2,
                                "--schedule", 1]) == 0
    assert not run_differences(whole, split)
