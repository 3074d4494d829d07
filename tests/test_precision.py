"""Training precision (bf16 autocast on capable hardware), FP32 reporting, and the hot loop's
host syncs: one device read per training step, global batch sizes taken from the loader."""
import json

import pytest
import torch

import ringq.precision as precision_lib
from models import build_model
from models.utils import set_sigma
from ringq import data as data_lib
from ringq.engine import evaluate, train_one_epoch
from ringq.errors import RingqError
from ringq.precision import autocast, resolve_precision
from ringq.runtime import determinism
from run_helpers import random_images, run_script, tiny_args, train_main

pytest_plugins = ["run_helpers"]
CPU = torch.device("cpu")
NATIVE = precision_lib.native_bf16(CPU)


@pytest.mark.parametrize("native,name,expected", [
    (True, "auto", "bf16"), (False, "auto", "fp32"), (True, "bf16", "bf16"),
    (True, "fp32", "fp32"), (False, "fp32", "fp32")])
def test_resolve_precision(monkeypatch, native, name, expected):
    monkeypatch.setattr(precision_lib, "native_bf16", lambda device: native)
    assert resolve_precision(name, CPU) == expected


def test_bf16_without_native_support_is_refused(monkeypatch):
    monkeypatch.setattr(precision_lib, "native_bf16", lambda device: False)
    with pytest.raises(RingqError, match="no native bf16 arithmetic.*--precision fp32"):
        resolve_precision("bf16", CPU)


def test_cli_refuses_bf16_in_one_line(monkeypatch, idx_data, tmp_path, capsys):
    monkeypatch.setattr(precision_lib, "native_bf16", lambda device: False)
    out = tmp_path / "run"
    assert train_main("mnist", tiny_args(idx_data, out, "--precision", "bf16")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "precision bf16" in err
    assert not out.exists()


def test_ring_weights_stay_fp32_under_autocast():
    model = build_model(dict(model="lenet", quantization="ring", ring_size=4,
                             ring_layout="distinct")).train()
    seen = {}
    conv = model.features[0]
    conv.register_forward_hook(lambda m, i, o: seen.update(weight=m.quantized_weight(), out=o))
    with autocast(CPU, "bf16"):
        model(torch.randn(2, 1, 28, 28))
    assert seen["weight"].dtype == torch.float32 and conv.positions.dtype == torch.float32
    assert seen["out"].dtype == torch.bfloat16


class _Counter:
    """Counts Python-level reads of tensor values back to the host."""

    READS = ("item", "tolist", "__bool__", "__float__", "__int__")

    def __init__(self, monkeypatch):
        self.count = 0
        for name in self.READS:
            real = getattr(torch.Tensor, name)

            def wrapped(t, *a, _real=real, **k):
                self.count += 1
                return _real(t, *a, **k)
            monkeypatch.setattr(torch.Tensor, name, wrapped)


def _loader(n, batch, augment=True):
    return data_lib.make_loader("memory", random_images(n, (1, 28, 28)), batch, (0.5,), (0.25,),
                                CPU, shuffle=True, augment=augment, seed=0)


@pytest.mark.parametrize("nan_policy", ["stop", "skip-step"])
def test_one_device_read_per_training_step(monkeypatch, nan_policy):
    model = build_model(dict(model="lenet", quantization="ring", ring_size=4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    loader = _loader(70, 16, augment=False)
    cfg = {"channels_last": False, "clip_grad": 5.0, "nan_policy": nan_policy}
    train_one_epoch(model, loader, optimizer, cfg, 1, CPU, progress=False)  # builds the tables
    set_sigma(model, 0.3)
    counter = _Counter(monkeypatch)
    stats = train_one_epoch(model, loader, optimizer, cfg, 2, CPU, progress=False)
    monkeypatch.undo()
    assert counter.count <= len(loader)
    assert stats["skipped_steps"] == 0 and stats["loss"] > 0


def test_evaluate_reads_the_device_once(monkeypatch):
    model = build_model(dict(model="lenet", quantization="ring", ring_size=4))
    loader = _loader(70, 16, augment=False)
    counter = _Counter(monkeypatch)
    result = evaluate(model, loader, CPU, "hard")
    monkeypatch.undo()
    assert counter.count == 1 and result["num_examples"] == 70


def test_epoch_statistics_count_the_loaders_global_batches():
    model = build_model(dict(model="lenet", quantization="none"))
    loader = _loader(70, 16)
    cfg = {"channels_last": False, "clip_grad": 0.0, "nan_policy": "stop"}
    stats = train_one_epoch(model, loader, torch.optim.SGD(model.parameters(), lr=0.0), cfg, 1,
                            CPU, progress=False)
    x_all = [(x, y) for x, y in loader]  # the same epoch's batches: lr 0 left the weights
    model.train()
    losses = [torch.nn.functional.cross_entropy(model(x), y, reduction="sum") for x, y in x_all]
    assert stats["loss"] == pytest.approx(float(sum(losses).detach()) / 70, rel=1e-5)


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("drop_last", [False, True])
def test_global_batch_sizes_match_the_batches(world_size, drop_last):
    ds = random_images(50, (1, 4, 4))
    for kind in data_lib.LOADER_KINDS:
        per_rank = [data_lib.make_loader(kind, ds, 12, (0.5,), (0.25,), CPU, shuffle=True,
                                         augment=False, seed=0, drop_last=drop_last, rank=r,
                                         world_size=world_size) for r in range(world_size)]
        sizes = [[y.numel() for _, y in loader] for loader in per_rank]
        assert [sum(s) for s in zip(*sizes)] == per_rank[0].global_batch_sizes(), kind


def test_evaluation_inputs_follow_channels_last():
    model = build_model(dict(model="resnet20", quantization="none"))
    model = model.to(memory_format=torch.channels_last)
    formats = []
    model.conv1.register_forward_pre_hook(
        lambda m, i: formats.append(i[0].is_contiguous(memory_format=torch.channels_last)))
    ds = random_images(8)
    mean, std = data_lib.NORMALIZATION["cifar10"]
    loader = data_lib.make_loader("memory", ds, 4, mean, std, CPU, shuffle=False,
                                  augment=False, seed=0)
    plain = evaluate(model, loader, CPU)
    assert formats == [False, False]
    assert evaluate(model, loader, CPU, channels_last=True) == pytest.approx(plain)
    assert formats[2:] == [True, True]


def test_pin_memory_only_for_a_cuda_target():
    ds = data_lib.ArrayDataset(torch.zeros(4, 1, 4, 4, dtype=torch.uint8), torch.arange(4),
                               list("0123"))
    args = (ds, 2, (0.5,), (0.25,))
    on_cpu = data_lib.make_loader("torchvision", *args, CPU, shuffle=False, augment=False, seed=0)
    assert not on_cpu.pin_memory
    on_gpu = data_lib.make_loader("torchvision", *args, torch.device("cuda", 1), shuffle=False,
                                  augment=False, seed=0)
    assert on_gpu.pin_memory and on_gpu.pin_memory_device == "cuda:1"


def test_determinism_is_restored_after_the_block():
    before = torch.are_deterministic_algorithms_enabled()
    with determinism(True, CPU):
        assert torch.are_deterministic_algorithms_enabled()
    assert torch.are_deterministic_algorithms_enabled() == before


@pytest.mark.skipif(not NATIVE, reason="this CPU has no native bf16 (AVX-512 BF16 or AMX)")
def test_bf16_run_reports_fp32_accuracy(idx_data, one_thread, tmp_path):
    out = tmp_path / "bf16"
    args = tiny_args(idx_data, out, "--ring-size", 4, "--precision", "auto", "--channels-last",
                     "--deterministic")
    assert train_main("mnist", args) == 0
    final = json.loads((out / "final.json").read_text())
    config = (out / "config.yaml").read_text()
    assert "precision_used: bf16" in config
    result = run_script("evaluate.py", "--checkpoint", out / "last.pt", "--data-dir", idx_data,
                        "--dataset", "fashion-mnist", "--device", "cpu", "--json",
                        tmp_path / "e.json", "--quiet", "--no-download")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "e.json").read_text())
    assert report["accuracy"] == final["accuracy"]
    assert report["loss"] == pytest.approx(final["loss"], abs=1e-6)
