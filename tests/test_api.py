"""The API for a model of your own: ringq.quantize_model, Recipe, save_packed / load_packed,
ONNX export and the torchvision example (tiny models and data: seconds, not minutes)."""
import copy
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml
from PIL import Image

import ringq
from models import build_model
from models.utils import quantized_layers, ring_layers, set_weight_mode, weight_mode
from ringq import api, data, engine, train
from ringq.config import OPTION_BY_NAME
from ringq.errors import CheckpointError, RingqError
from ringq.packing import packed_nbytes, size_report

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import quantize_torchvision as example  # noqa: E402

KBIT_CONFIG = yaml.safe_load((ROOT / "experiments/cifar10_cpu/resnet20_ring4_kbit.yaml").read_text())


class BiasNet(nn.Module):
    """Bias convs (one dilated depthwise, one strided), a hidden linear, no BatchNorm."""

    def __init__(self, width=8):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=2, dilation=2, groups=width)
        self.conv3 = nn.Conv2d(width, 16, 1, stride=2)
        self.hidden = nn.Linear(16, 16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu(self.conv3(F.relu(self.conv2(F.relu(self.conv1(x))))))
        return self.fc(F.relu(self.hidden(x.mean((2, 3)))))


def _plain_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def _hard(model, x):
    with weight_mode(model, "hard"), torch.no_grad():
        return model.eval()(x)


@pytest.fixture(scope="module")
def mobilenet_ring():
    """A ring-4 mobilenet_v2 whose BatchNorms saw one batch; and its FP32 state-dict bytes."""
    torch.manual_seed(0)
    model = example.build("mobilenet_v2")
    fp32_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    ringq.quantize_model(model)
    with torch.no_grad():
        model.train()(torch.randn(8, 3, 32, 32))
    return model, fp32_bytes


# --- conversion ------------------------------------------------------------------------------

@pytest.mark.parametrize("name, quantization", [("resnet18", "ring"), ("mobilenet_v2", "ring"),
                                                ("mobilenet_v2", "uniform")])
def test_torchvision_layers_take_at_most_2_bits_of_levels(name, quantization):
    torch.manual_seed(0)
    model = example.build(name)
    before = _plain_layers(model)
    classifier = [n for n, m in before.items() if isinstance(m, nn.Linear)][-1]
    kept = before[classifier].weight.detach().clone()
    ringq.quantize_model(model, quantization)
    layers = dict(quantized_layers(model))
    assert set(layers) == set(before) - {classifier}
    assert model.get_submodule(classifier) is before[classifier]
    assert torch.equal(model.get_submodule(classifier).weight, kept)
    for layer_name, layer in layers.items():
        plain = before[layer_name]
        assert layer.weight_shape == tuple(plain.weight.shape)
        assert getattr(layer, "groups", 1) == getattr(plain, "groups", 1)
        assert layer.output_scale is None  # every one is followed by its BatchNorm
    with weight_mode(model, "hard"), torch.no_grad():
        for layer in layers.values():
            weight = layer.quantized_weight().reshape(layer.weight_shape[0], -1)
            per_unit = [weight] if quantization == "ring" else weight
            assert max(len(torch.unique(w)) for w in per_unit) <= 4
    levels = max(ringq.distinct_levels(model).values())  # LSQ's initial step leaves -2 unused
    assert levels == 4 if quantization == "ring" else 3 <= levels <= 4
    assert _hard(model, torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("quantization", ["ring", "uniform"])
def test_geometry_and_bias_are_kept(quantization):
    """Each quantized layer computes what its FP32 module does with the hard weights."""
    torch.manual_seed(0)
    model = BiasNet()
    before = copy.deepcopy(_plain_layers(model))
    ringq.quantize_model(model, quantization)
    assert [n for n, _ in quantized_layers(model)] == ["conv1", "conv2", "conv3", "hidden"]
    assert torch.equal(model.fc.weight, before["fc"].weight)
    set_weight_mode(model, "hard")
    for name, layer in quantized_layers(model):
        plain = before[name]
        assert torch.equal(layer.bias, plain.bias)
        conv = isinstance(plain, nn.Conv2d)
        x = torch.randn(2, plain.in_channels, 9, 9) if conv else torch.randn(4, plain.in_features)
        with torch.no_grad():
            plain.weight.copy_(layer.quantized_weight().view(layer.weight_shape))
            want = plain(x)
            if layer.output_scale is not None:
                view = (-1, 1, 1) if conv else (-1,)
                want = (want - plain.bias.view(view)) * layer.output_factor().view(view) \
                    + plain.bias.view(view)
            assert torch.allclose(layer(x), want, atol=1e-5)
        assert (layer.output_scale is not None) == (quantization == "ring")


def test_ring_layers_without_batchnorm_get_an_output_scale_and_warm_start_exactly():
    torch.manual_seed(0)
    fp32 = BiasNet()
    x = torch.randn(4, 3, 12, 12)
    with torch.no_grad():
        want = fp32(x)
    model = ringq.quantize_model(copy.deepcopy(fp32), warm_start=True)
    assert all(layer.output_scale is not None for _, layer in quantized_layers(model))
    with weight_mode(model, "soft"), torch.no_grad():
        assert torch.allclose(model(x), want, atol=1e-4 * want.abs().max())
    fresh = ringq.quantize_model(copy.deepcopy(fp32))  # scale from the FP32 weights' RMS
    for name, layer in quantized_layers(fresh):
        with torch.no_grad():
            rms = float(layer.output_factor()[0] * layer.quantized_weight().pow(2).mean().sqrt())
        assert rms == pytest.approx(float(fp32.get_submodule(name).weight.detach().pow(2).mean().sqrt()),
                                    rel=1e-4)


def test_warm_start_folds_the_ring_scale_into_batchnorm():
    """As --init-from: exact but for BatchNorm's eps (its weight grows by 1 / scale**2, about
    0.1% of these outputs at eps 1e-5), hence a negligible eps here."""
    torch.manual_seed(0)
    fp32 = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8, eps=1e-12), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, groups=8, bias=False), nn.BatchNorm2d(8, eps=1e-12),
                         nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    with torch.no_grad():
        fp32.train()(torch.randn(16, 3, 10, 10))
    x = torch.randn(4, 3, 10, 10)
    with torch.no_grad():
        want = fp32.eval()(x)
    model = ringq.quantize_model(copy.deepcopy(fp32), warm_start=True)
    assert all(layer.output_scale is None for _, layer in quantized_layers(model))
    with weight_mode(model, "soft"), torch.no_grad():
        assert torch.allclose(model.eval()(x), want, atol=1e-5 * want.abs().max())
    uniform = ringq.quantize_model(copy.deepcopy(fp32), "uniform", bits=8, warm_start=True)
    assert torch.equal(uniform[0].weight, fp32[0].weight)


def test_untraceable_model_gets_output_scales_with_a_warning():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.norm, self.fc = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2)

        def forward(self, x):
            x = self.norm(self.conv(x))
            return self.fc(x.mean((2, 3)) if x.sum() > 0 else x.amax((2, 3)))

    with pytest.warns(UserWarning, match="cannot trace Branchy with torch.fx"):
        model = ringq.quantize_model(Branchy())
    assert model.conv.output_scale is not None


def test_first_layer_and_named_layers_stay_fp32():
    model = ringq.quantize_model(BiasNet(), "uniform", fp32_first_layer=True,
                                 keep_fp32=["conv3"])
    assert [n for n, _ in quantized_layers(model)] == ["conv2", "hidden", "fc"]
    assert type(model.conv1) is nn.Conv2d and type(model.conv3) is nn.Conv2d


class _Wide(nn.Conv2d):
    pass


@pytest.mark.parametrize("model, kwargs, message", [
    (nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), {}, "nothing to quantize: Sequential has no"),
    (nn.Sequential(nn.ReLU()), {}, "nothing to quantize"),
    (BiasNet(), {"quantization": "none"}, "quantization: invalid value 'none'"),
    (BiasNet(), {"ring_sizes": 4}, "unknown option 'ring_sizes'"),
    (BiasNet(), {"quantization": "uniform", "ring_size": 4}, "ring_size: only for quantization='ring'"),
    (BiasNet(), {"bits": 2}, "bits: only for quantization='uniform'"),
    (BiasNet(), {"ring_type": "square"}, "ring_type: invalid value 'square'"),
    (BiasNet(), {"quantization": "uniform", "bits": 9}, "bits: must be between 2 and 8"),
    (BiasNet(), {"keep_fp32": ["head"]}, "keep_fp32: the model has no nn.Conv2d or nn.Linear named 'head'"),
    (nn.Sequential(_Wide(3, 4, 3), nn.Flatten(), nn.Linear(4, 2)), {}, "0: a _Wide (subclass of Conv2d)"),
    (nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), nn.Flatten()), {},
     "0: padding_mode 'reflect'"),
    (ringq.quantize_model(BiasNet()), {}, "the model is already quantized (conv1 is a RingConv2d)"),
])
def test_refusals_are_one_line(model, kwargs, message):
    with pytest.raises(RingqError) as info:
        ringq.quantize_model(model, **kwargs)
    assert message in str(info.value) and "\n" not in str(info.value)


# --- the recipe ------------------------------------------------------------------------------

def test_recipe_defaults_are_the_kbit_config():
    for key, value in {**api.RING_DEFAULTS, **api.RECIPE_DEFAULTS}.items():
        assert KBIT_CONFIG.get(key, OPTION_BY_NAME[key].default) == value, key
    assert ringq.Recipe(BiasNet(), KBIT_CONFIG["epochs"]).cfg["ste_epochs"] == \
        KBIT_CONFIG["ste_epochs"]


def test_recipe_moves_sigma_and_modes_as_the_scripts():
    model = ringq.quantize_model(BiasNet())
    recipe = ringq.Recipe(model, KBIT_CONFIG["epochs"])
    for epoch in range(1, KBIT_CONFIG["epochs"] + 1):
        state = recipe.step(epoch)
        assert state["sigma"] == engine.sigma_at(KBIT_CONFIG, KBIT_CONFIG["sigma"], epoch)
        assert state["weight_mode"] == engine.train_mode_at(KBIT_CONFIG, epoch)
        assert {(l.quantizer.sigma, l.quantizer.mode) for _, l in ring_layers(model)} == \
            {(state["sigma"], state["weight_mode"])}


def test_two_epoch_run_through_the_recipe():
    torch.manual_seed(0)
    model = ringq.quantize_model(BiasNet())
    recipe = ringq.Recipe(model, epochs=2, ste_epochs=1)
    optimizer = recipe.attach(torch.optim.SGD(recipe.param_groups(lr=0.5), momentum=0.9))
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 10, (16,))
    cfg = {"epochs": 2, "sigma_final": 0.05, "ste_epochs": 1}
    for epoch, mode in ((1, "soft"), (2, "ste")):
        assert recipe.step(epoch) == {"epoch": epoch, "sigma": engine.sigma_at(cfg, 4.0, epoch),
                                      "weight_mode": mode}
        for _ in range(3):
            optimizer.zero_grad()
            F.cross_entropy(model.train()(x), y).backward()
            optimizer.step()
        positions = torch.cat([l.positions.flatten() for _, l in ring_layers(model)])
        assert 0 <= positions.min() and positions.max() <= 1  # clamped after every step
    assert model.conv1.quantizer.sigma == 0.05
    with pytest.raises(RingqError, match="epoch must be an int in 1..2, got 3"):
        recipe.step(3)
    with pytest.raises(RingqError, match="ste_epochs: 3 is more than epochs 2"):
        ringq.Recipe(model, 2, ste_epochs=3)


def test_param_groups_are_the_training_scripts():
    assert train.param_groups is engine.param_groups
    model = build_model({"model": "resnet20", "quantization": "ring", "ring_size": 4,
                         "ring_layout": "distinct", "sigma": 4.0})
    recipe = ringq.Recipe(model, 30)
    groups, script = recipe.param_groups(0.1, 1e-4), engine.param_groups(model, KBIT_CONFIG)
    assert len(groups) == len(script) == 1 + len(ring_layers(model))
    for ours, theirs in zip(groups, script):
        assert [id(p) for p in ours["params"]] == [id(p) for p in theirs["params"]]
        assert ours["lr_scale"] == theirs["lr_scale"] and ours["lr"] == 0.1 * ours["lr_scale"]
        assert ours["weight_decay"] == theirs["weight_decay"]
    assert groups[1]["weight_decay"] == 0 and groups[1]["lr_scale"] == 27 / 64  # stem: 3x3x3


# --- packed files ----------------------------------------------------------------------------

def test_mobilenet_round_trip_is_exact_and_small(tmp_path, mobilenet_ring):
    model, fp32_bytes = mobilenet_ring
    path = tmp_path / "mobilenet_v2.rqp"
    stats = ringq.save_packed(model, path)
    torch.manual_seed(1)  # other random positions: everything must come from the file
    other = ringq.quantize_model(example.build("mobilenet_v2"))
    assert ringq.load_packed(path, other) is other
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(_hard(other, x), _hard(model, x))
    weights = sum(math.prod(l.weight_shape) for _, l in quantized_layers(model))
    latent = {f"{n}.{k}" for n, l in quantized_layers(model) for k in l.latent_names}
    raw = sum(t.numel() * t.element_size() for k, t in model.state_dict().items()
              if k not in latent)
    expected = packed_nbytes(weights, 2) + raw
    assert expected <= stats["file_bytes"] <= 1.05 * expected
    assert size_report(model, path)["quantized_layers_ratio"] == 16
    assert fp32_bytes / stats["file_bytes"] > 10  # measured 10.4: the BatchNorms' FP32 terms
    half = ringq.save_packed(model, tmp_path / "half.rqp", half=True)
    assert fp32_bytes / half["file_bytes"] >= 12  # measured 12.8 with them in float16


@pytest.fixture(scope="module")
def bias_file(tmp_path_factory):
    torch.manual_seed(0)
    model = ringq.quantize_model(BiasNet())
    path = tmp_path_factory.mktemp("bias") / "bias.rqp"
    ringq.save_packed(model, path)
    return path, model


def test_bias_net_round_trip_keeps_bias_and_output_scale(bias_file):
    path, model = bias_file
    other = ringq.load_packed(path, ringq.quantize_model(BiasNet()))
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(_hard(other, x), _hard(model, x))
    assert torch.equal(other.conv2.output_scale, model.conv2.output_scale)
    assert torch.equal(other.conv2.bias, model.conv2.bias)


@pytest.mark.parametrize("make, message", [
    (lambda: ringq.quantize_model(example.build("mobilenet_v2")),
     "'conv1' is not a ring layer of this model"),
    (lambda: ringq.quantize_model(BiasNet(), "uniform"), "'conv1' is not a ring layer"),
    (lambda: ringq.quantize_model(BiasNet(width=4)),
     "conv1.positions: stored shape [216] does not match the model's [108]"),
    (lambda: ringq.quantize_model(BiasNet(), ring_size=8),
     "conv1.ring_template: stored shape [4] does not match the model's [8]"),
    (lambda: ringq.quantize_model(BiasNet(), keep_fp32=["hidden"]),
     "'hidden' is not a ring layer of this model"),
    (lambda: None, "holds a test_api.BiasNet converted by ringq.quantize_model, not a "
                   "build_model network"),
])
def test_a_file_that_does_not_fit_is_refused_naming_the_layer(bias_file, make, message):
    path, _ = bias_file
    with pytest.raises(CheckpointError) as info:
        ringq.load_packed(path, make())
    assert str(info.value).startswith(f"{path}: ") and message in str(info.value)
    assert "\n" not in str(info.value)


def test_uniform_bits_must_match(tmp_path):
    path = tmp_path / "u2.rqp"
    ringq.save_packed(ringq.quantize_model(BiasNet(), "uniform"), path)
    with pytest.raises(CheckpointError, match="conv1: stored at 2 bits, the model's layer has 4"):
        ringq.load_packed(path, ringq.quantize_model(BiasNet(), "uniform", bits=4))


def test_build_model_files_load_as_before(tmp_path):
    from ringq.packing import export_packed
    config = {"model": "lenet", "quantization": "ring", "ring_size": 4, "num_classes": 10}
    model = build_model(config)
    export_packed(model, config, tmp_path / "lenet.rqp")
    loaded = ringq.load_packed(tmp_path / "lenet.rqp")
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(_hard(loaded, x), _hard(model, x))
    with pytest.raises(RingqError, match="nothing to pack: the model has no quantized layers"):
        ringq.save_packed(BiasNet(), tmp_path / "fp32.rqp")


# --- ONNX and the example --------------------------------------------------------------------

@pytest.mark.parametrize("quantization", ["ring", "uniform"])
def test_onnx_export_of_a_bias_cnn(tmp_path, quantization):
    pytest.importorskip("onnxruntime")
    from ringq.onnx_export import export_onnx, run_onnx
    torch.manual_seed(0)
    model = ringq.quantize_model(BiasNet(), quantization)
    report = export_onnx(model, tmp_path / "bias.onnx", (1, 3, 16, 16), "cifar10")
    assert {row["name"] for row in report["layers"]} == {"conv1", "conv2", "conv3", "hidden"}
    assert all(row["bits"] == 2 for row in report["layers"])
    x = torch.randn(8, 3, 16, 16)
    want = _hard(model, x).numpy()
    got = run_onnx(tmp_path / "bias.onnx", x.numpy())
    assert np.allclose(got, want, atol=1e-4 * np.abs(want).max())


def test_example_runs_end_to_end_on_tiny_data(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in range(10):
            folder = tmp_path / "data" / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                    folder / f"{i}.png")
    out = tmp_path / "out" / "m.rqp"
    report = example.main(["--model", "mobilenet_v2", "--data-dir", str(tmp_path / "data"),
                           "--epochs", "1", "--batch-size", "10", "--output", str(out),
                           "--no-onnx"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == report
    assert report["train_images"] == report["test_images"] == 20
    assert report["max_distinct_levels"] == 4 and report["bytes"] == out.stat().st_size
    assert isinstance(ringq.load_packed(out, ringq.quantize_model(example.build("mobilenet_v2"))),
                      nn.Module)
    half = example.main(["--model", "mobilenet_v2", "--data-dir", str(tmp_path / "data"),
                         "--load", str(out), "--half", "--output", str(tmp_path / "h.rqp"),
                         "--no-onnx"])
    assert half["loaded_from"] == str(out) and half["half"]
    assert (half["epochs"], half["train_images"]) == (1, 20)  # the facts the file carries
    assert half["bytes"] < report["bytes"] and half["max_distinct_levels"] == 4
    assert half["accuracy"] == _hard_accuracy_of(tmp_path / "h.rqp", tmp_path / "data")


def _hard_accuracy_of(path, data_dir):
    """Test accuracy (%) of a packed mobilenet_v2 file, read back and run in hard mode."""
    model = ringq.load_packed(path, ringq.quantize_model(example.build("mobilenet_v2")))
    images, labels = [], []
    for folder in sorted((data_dir / "test").iterdir()):
        for f in sorted(folder.iterdir()):
            images.append(np.asarray(Image.open(f), dtype=np.float32) / 255)
            labels.append(int(folder.name[len("class"):]))
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in data.NORMALIZATION["cifar10"])
    x = (torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2) - mean) / std
    with torch.no_grad():
        predictions = model(x).argmax(1)
    return round(100 * float((predictions == torch.tensor(labels)).float().mean()), 2)


def test_example_keeps_the_depthwise_convs_fp32_when_asked():
    model = example.build("mobilenet_v2")
    assert example.fp32_layers(model, False) == ["classifier.1"]
    ringq.quantize_model(model, keep_fp32=example.fp32_layers(model, True))
    plain = [n for n, m in model.named_modules() if type(m) in (nn.Conv2d, nn.Linear)]
    assert len(plain) == 18 and plain[-1] == "classifier.1"
    assert all(model.get_submodule(n).groups == model.get_submodule(n).in_channels > 1
               for n in plain[:-1])
    assert len(ringq.distinct_levels(model)) == 53 - 17 - 1  # 52 convs and a linear in all
