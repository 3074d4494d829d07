"""Uniform K-bit layers (LSQ), FP32 warm starts and post-training quantization."""
import math

import pytest
import torch
import torch.nn as nn

from models import build_model
from models.convert import following_batchnorms, init_from_fp32, post_training_quantize
from models.uniform_layers import (UniformConv2d, UniformLinear, UniformQuantizer,
                                   integer_range)
from models.utils import quantized_layers, set_weight_mode, uniform_layers, weight_mode
from ringq.engine import eval_modes

pytest_plugins = ["run_helpers"]
pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: one thread is fastest


def _trained_like_bn(model, seed=0):
    """``model`` in eval mode with BatchNorm statistics of random 28x28 inputs."""
    torch.manual_seed(seed)
    model.train()
    with torch.no_grad():
        for _ in range(5):
            model(torch.randn(64, 1, 28, 28))
    return model.eval()


@pytest.mark.parametrize("bits", range(2, 9))
def test_k_bit_weights_take_at_most_2k_values_per_channel(bits):
    torch.manual_seed(bits)
    layer = UniformConv2d(6, 5, 3, quantizer=UniformQuantizer(bits))
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.5)
    for _ in range(3):  # training moves weights and steps; the levels stay 2**K
        optimizer.zero_grad()
        layer(torch.randn(4, 6, 8, 8)).square().mean().backward()
        optimizer.step()
    with torch.no_grad():
        weight = layer.quantized_weight().view(5, -1)
    qn, qp = integer_range(bits)
    assert (qn, qp) == (2 ** (bits - 1), 2 ** (bits - 1) - 1)
    for channel, step in zip(weight, layer.step):
        assert len(torch.unique(channel)) <= 2 ** bits
        levels = channel / step
        assert torch.allclose(levels, levels.round(), atol=1e-4)
        assert levels.min() >= -qn and levels.max() <= qp


def test_ste_and_lsq_gradients_equal_the_formulas():
    torch.manual_seed(0)
    bits, fan_in = 3, 4 * 3 * 3
    qn, qp = integer_range(bits)
    w = (torch.randn(6, 4, 3, 3, dtype=torch.float64) * 0.5).requires_grad_()
    s = (torch.rand(6, dtype=torch.float64) * 0.1 + 0.05).requires_grad_()
    out = UniformQuantizer(bits).weights(w, s)
    upstream = torch.randn_like(out)
    (out * upstream).sum().backward()
    v = (w / s.view(-1, 1, 1, 1)).detach()
    inside = (v > -qn) & (v < qp)
    assert torch.equal(out.detach(), torch.clamp(v.round(), -qn, qp) * s.detach().view(-1, 1, 1, 1))
    assert torch.equal(w.grad, upstream * inside)  # straight through, zero where clipped
    per_weight = torch.where(inside, v.round() - v, torch.where(v <= -qn, -qn, qp) * 1.0)
    g = 1 / math.sqrt(fan_in * qp)
    assert torch.allclose(s.grad, (upstream * per_weight).flatten(1).sum(1) * g, atol=1e-12)
    assert ((v < -qn) | (v > qp)).any() and inside.any()  # both branches were exercised


def test_step_starts_at_lsq_init_and_latent_weights_at_pytorch_default():
    torch.manual_seed(3)
    layer = UniformLinear(20, 7, quantizer=UniformQuantizer(4))
    _, qp = integer_range(4)
    assert torch.allclose(layer.step, 2 * layer.weight.abs().mean(1) / math.sqrt(qp))
    torch.manual_seed(3)
    assert torch.equal(layer.weight, nn.Linear(20, 7, bias=False).weight)


def test_uniform_lenet_starts_like_fp32_lenet():
    torch.manual_seed(1)
    fp32 = build_model(dict(model="lenet", quantization="none"))
    torch.manual_seed(1)
    uniform = build_model(dict(model="lenet", quantization="uniform", bits=4))
    names = [name for name, _ in uniform_layers(uniform)]
    assert names == ["features.0", "features.4", "features.9"]  # as ring LeNet; classifier FP32
    for name, layer in uniform_layers(uniform):
        assert torch.equal(layer.weight, fp32.get_submodule(name).weight)
    resnet = build_model(dict(model="resnet20", quantization="uniform", bits=2,
                              fp32_first_layer=True))
    assert isinstance(resnet.conv1, nn.Conv2d) and len(uniform_layers(resnet)) == 20
    for _, layer in uniform_layers(resnet):  # steps follow the ResNet's own weight init
        assert torch.allclose(layer.step, layer.quantizer.initial_step(layer.weight))


def test_uniform_models_have_one_mode():
    model = build_model(dict(model="mlp", quantization="uniform", bits=3))
    assert eval_modes(model) == ("hard",)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad(), weight_mode(model, "ste"):
        assert model(x).shape == (2, 10)
    set_weight_mode(model, "soft")
    with pytest.raises(ValueError, match="no 'soft' mode"):
        model(x)
    with pytest.raises(ValueError, match="bits"):
        UniformQuantizer(9)


def test_eval_weights_cached_until_weights_or_steps_change():
    layer = UniformLinear(5, 3, quantizer=UniformQuantizer(2))
    with torch.no_grad():
        first = layer.quantized_weight()
        assert layer.quantized_weight() is first
        layer.step.mul_(2)
        assert layer.quantized_weight() is not first
    assert layer.quantized_weight().grad_fn is not None


def test_ptq_steps_max_and_mse():
    torch.manual_seed(0)
    w = torch.randn(8, 50)
    q = UniformQuantizer(4)
    _, qp = integer_range(4)
    top = q.ptq_step(w, "max")
    assert torch.allclose(top, w.abs().amax(1) / qp)

    def error(step):
        return ((q.weights(w, step) - w) ** 2).sum(1)
    mse = q.ptq_step(w, "mse")
    assert (mse <= top).all() and (error(mse) <= error(top) + 1e-7).all()
    assert error(mse).sum() < error(top).sum()
    with pytest.raises(ValueError, match="PTQ scale"):
        q.ptq_step(w, "percentile")


@pytest.mark.parametrize("config", [
    dict(model="lenet", quantization="uniform", bits=8),
    dict(model="lenet", quantization="ring", ring_size=4, ring_layout="distinct", sigma=2.0),
    dict(model="lenet", quantization="ring", ring_size=8, ring_layout="distinct", sigma=4.0),
    dict(model="lenet", quantization="ring", ring_size=4, sigma=0.5),  # published ring-4
    dict(model="resnet20", quantization="ring", ring_size=4, ring_layout="distinct", sigma=4.0,
         fp32_first_layer=True),
], ids=["uniform8", "ring4-sigma2", "ring8-sigma4", "ring4-published", "resnet20-ring4"])
def test_init_from_fp32_reproduces_the_fp32_network(config):
    """Ring values equal the scaled FP32 weights up to the grid; BN absorbs the scale."""
    torch.manual_seed(0)
    fp32 = build_model({**config, "quantization": "none"})
    size = 32 if config["model"] == "resnet20" else 28
    x = torch.randn(32, 3 if size == 32 else 1, size, size)
    fp32.train()
    with torch.no_grad():
        for _ in range(3):
            fp32(x)
    fp32.eval()
    model = build_model(config)
    scales = init_from_fp32(model, fp32.state_dict())
    model.eval()
    with torch.no_grad():
        ref, out = fp32(x), model(x)
    for name, layer in quantized_layers(model):
        with torch.no_grad():
            weight = layer.quantized_weight().view(layer.weight_shape)
        target = fp32.get_submodule(name).weight * scales[name]
        if config["quantization"] == "uniform":  # rounding only: LSQ's initial step clips none
            half_step = layer.step.view(-1, *[1] * (weight.dim() - 1)) / 2
            assert ((weight - target).abs() <= half_step * (1 + 1e-5)).all()
        else:
            assert (weight - target).abs().max() <= 1e-4 * target.abs().max()
    if config["quantization"] == "ring":
        # exact but for BatchNorm's eps, which acts as eps / scale**2 after the rescaling:
        # negligible at LeNet's scales (0.4-2.5), about 1e-3 of the variance at ResNet's (~0.05)
        tolerance = 0.05 if config["model"] == "resnet20" else 1e-3
        assert (out - ref).abs().max() <= tolerance * ref.abs().max()
    assert (out.argmax(1) == ref.argmax(1)).float().mean() >= 0.9


def test_init_from_fp32_refuses_other_networks():
    lenet = build_model(dict(model="lenet", quantization="uniform", bits=4))
    with pytest.raises(ValueError, match="missing"):
        init_from_fp32(lenet, build_model(dict(model="mlp", quantization="none")).state_dict())
    wide = build_model(dict(model="lenet", quantization="none", num_classes=12)).state_dict()
    with pytest.raises(ValueError, match="classifier.weight: FP32 shape"):
        init_from_fp32(lenet, wide)


def test_every_quantized_layer_has_its_batchnorm():
    model = build_model(dict(model="resnet20", quantization="ring", ring_size=4))
    norms = following_batchnorms(model)
    assert len(norms) == 21 and norms["layer2.0.shortcut.0"] is model.layer2[0].shortcut[1]
    assert norms["conv1"] is model.bn1


def test_post_training_quantization_keeps_the_rest():
    fp32 = _trained_like_bn(build_model(dict(model="lenet", quantization="none")))
    config = dict(model="lenet", quantization="none", ring_size=8, sigma=None, num_classes=10)
    model, qconfig = post_training_quantize(fp32, config, 8, "max")
    assert qconfig == dict(model="lenet", quantization="uniform", bits=8, num_classes=10)
    assert not model.training and eval_modes(model) == ("hard",)
    assert torch.equal(model.classifier.weight, fp32.classifier.weight)
    assert torch.equal(model.features[1].running_var, fp32.features[1].running_var)
    x = torch.randn(64, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(model(x), fp32(x), atol=0.05 * fp32(x).abs().max())
    with pytest.raises(ValueError, match="needs an FP32 model"):
        post_training_quantize(model, qconfig, 4)


def test_warm_started_ring_weights_keep_their_sign_when_snapped():
    """Of the two positions with the right soft value, each weight takes the one whose ring
    value has its sign, so the hard network starts symmetric (levels ±1/4, ±3/4)."""
    torch.manual_seed(0)
    fp32 = build_model(dict(model="lenet", quantization="none"))
    model = build_model(dict(model="lenet", quantization="ring", ring_size=4,
                             ring_layout="distinct", sigma=2.0))
    init_from_fp32(model, fp32.state_dict())
    set_weight_mode(model, "hard")
    for name, layer in quantized_layers(model):
        with torch.no_grad():
            hard = layer.quantized_weight().view(layer.weight_shape)
        assert torch.equal(torch.sign(hard), torch.sign(fp32.get_submodule(name).weight))
        assert len(torch.unique(hard)) == 4
