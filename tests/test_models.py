import pytest
import torch
import torch.nn as nn

from models import MODELS, build_model
from models.resnet_ring import DEPTHS
from models.quant_layers import prepare_weights
from models.ring_layers import RingConv2d, RingLinear, RingQuantizer
from models.utils import clamp_positions, count_parameters, ring_layers, ring_summary, set_weight_mode


def resnet_param_count(n, num_classes=10):
    """Parameters of a CIFAR ResNet-(6n+2) with 1x1-conv shortcuts, counted by hand."""
    convs = 3 * 16 * 9
    bns = 16
    cin = 16
    for width in (16, 32, 64):
        for b in range(n):
            convs += cin * width * 9 + width * width * 9
            bns += 2 * width
            if cin != width:
                convs += cin * width
                bns += width
            cin = width
    return convs + 2 * bns + 64 * num_classes + num_classes


@pytest.mark.parametrize("name", list(DEPTHS))
@pytest.mark.parametrize("quantization", ["ring", "none"])
def test_resnet_shapes_and_parameters(name, quantization):
    model = build_model(dict(model=name, quantization=quantization, ring_size=4))
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)
    assert count_parameters(model) == resnet_param_count(DEPTHS[name])
    convs = [m for m in model.modules() if isinstance(m, (RingConv2d, nn.Conv2d))]
    assert len(convs) == 6 * DEPTHS[name] + 1 + 2  # stem, 2 per block, 2 shortcuts
    kinds = {type(m) for m in convs}
    assert kinds == ({RingConv2d} if quantization == "ring" else {nn.Conv2d})
    assert isinstance(model.linear, nn.Linear)


def test_resnet20_parameter_count_is_known_value():
    assert resnet_param_count(3) == 272474


@pytest.mark.parametrize("name", ["mlp", "lenet"])
@pytest.mark.parametrize("quantization", ["ring", "none"])
def test_mnist_nets(name, quantization):
    model = build_model(dict(model=name, quantization=quantization, ring_size=8))
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    assert isinstance(model.classifier, nn.Linear)
    assert bool(ring_layers(model)) == (quantization == "ring")


@pytest.mark.parametrize("name, first", [("resnet20", "conv1"), ("lenet", "features.0"),
                                         ("mlp", "features.1")])
def test_fp32_first_layer_replaces_only_the_first_ring_layer(name, first):
    config = dict(model=name, quantization="ring", ring_size=4)
    ring = build_model(config)
    mixed = build_model(dict(config, fp32_first_layer=True))
    names = [n for n, _ in ring_layers(ring)]
    assert names[0] == first
    assert [n for n, _ in ring_layers(mixed)] == names[1:]
    plain = mixed.get_submodule(first)
    assert type(plain) in (nn.Conv2d, nn.Linear)
    assert plain.weight.numel() == ring.get_submodule(first).positions.numel()
    assert count_parameters(mixed) == count_parameters(ring)
    shape = (2, 3, 32, 32) if name == "resnet20" else (2, 1, 28, 28)
    assert mixed(torch.randn(shape)).shape == (2, 10)


def test_fp32_first_layer_in_resnet_takes_the_resnet_init():
    torch.manual_seed(0)
    model = build_model(dict(model="resnet20", quantization="ring", ring_size=4,
                             fp32_first_layer=True))
    fan_out = 16 * 3 * 3  # kaiming normal, fan-out mode, as every FP32 ResNet conv
    assert model.conv1.weight.std().item() == pytest.approx((2 / fan_out) ** 0.5, rel=0.15)


def test_unknown_model_and_quantization():
    with pytest.raises(ValueError):
        build_model(dict(model="vgg", quantization="none"))
    with pytest.raises(ValueError):
        build_model(dict(model="resnet20", quantization="int8"))


def test_ring_layers_share_one_quantizer_and_modes():
    model = build_model(dict(model="resnet20", quantization="ring", ring_size=4))
    layers = ring_layers(model)
    assert len({id(layer.quantizer) for _, layer in layers}) == 1
    set_weight_mode(model, "hard")
    conv = layers[0][1]
    w = conv.quantized_weight()
    assert torch.isin(w, conv.ring_template).all()


def test_ring_conv_matches_plain_conv_with_same_weights():
    conv = RingConv2d(3, 5, 3, stride=2, padding=1, quantizer=RingQuantizer(ring_size=8))
    x = torch.randn(2, 3, 9, 9)
    plain = nn.Conv2d(3, 5, 3, 2, 1, bias=False)
    with torch.no_grad():
        plain.weight.copy_(conv.quantized_weight().view(5, 3, 3, 3))
    assert torch.allclose(conv(x), plain(x), atol=1e-6)
    assert conv.fan_in == 3 * 3 * 3 == plain.weight[0].numel()


def test_ring_linear_positions_shape_and_forward():
    lin = RingLinear(7, 4, quantizer=RingQuantizer(ring_size=4, layout="distinct"))
    assert lin.positions.shape == (4, 7)
    assert lin(torch.randn(2, 7)).shape == (2, 4)
    assert lin.fan_in == 7


def test_eval_weights_cached_until_positions_change():
    conv = RingConv2d(2, 2, 3, quantizer=RingQuantizer(ring_size=8))
    with torch.no_grad():
        w1 = conv.quantized_weight()
        assert conv.quantized_weight() is w1
        conv.positions.add_(0.01)
        w2 = conv.quantized_weight()
        assert w2 is not w1 and not torch.equal(w1, w2)
        conv.quantizer.mode = "hard"
        assert torch.isin(conv.quantized_weight(), conv.ring_template).all()
    # with autograd on, soft weights are recomputed and carry a graph
    conv.quantizer.mode = "soft"
    assert conv.quantized_weight().grad_fn is not None


def test_clamp_positions():
    model = build_model(dict(model="lenet", quantization="ring", ring_size=4))
    with torch.no_grad():
        for _, layer in ring_layers(model):
            layer.positions.mul_(3).sub_(1)
    clamp_positions(model)
    for _, layer in ring_layers(model):
        assert layer.positions.min() >= 0 and layer.positions.max() <= 1


def test_ring_summary_reports_distinct_values():
    s = ring_summary(build_model(dict(model="resnet20", quantization="ring", ring_size=4)))
    assert s["nominal_bits"] == 2 and s["num_distinct_values"] == 2 and s["effective_bits"] == 1
    s = ring_summary(build_model(dict(model="resnet20", quantization="ring", ring_size=4,
                                      ring_layout="distinct")))
    assert s["num_distinct_values"] == 4 and s["effective_bits"] == 2
    assert ring_summary(build_model(dict(model="resnet20", quantization="none"))) is None


def test_every_model_name_builds():
    for name in MODELS:
        build_model(dict(model=name, quantization="ring", ring_size=4))


@pytest.mark.parametrize("name", ["resnet20", "lenet"])
def test_batched_ring_weights_equal_per_layer_weights(name):
    """The model-level pre-hook computes all layers' weights at once; results are unchanged."""
    torch.manual_seed(0)
    config = dict(model=name, quantization="ring", ring_size=8, ring_layout="distinct")
    batched = build_model(config)
    per_layer = build_model(config)
    per_layer.load_state_dict(batched.state_dict())
    per_layer._forward_pre_hooks.clear()
    x = torch.randn(4, 3, 32, 32) if name == "resnet20" else torch.randn(4, 1, 28, 28)
    outputs = []
    for model in (batched, per_layer):
        out = model(x)
        out.square().sum().backward()
        outputs.append((out, [layer.positions.grad for _, layer in ring_layers(model)]))
    assert torch.allclose(outputs[0][0], outputs[1][0], atol=1e-5)
    for a, b in zip(outputs[0][1], outputs[1][1]):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    assert all(layer._step_weight is None for _, layer in ring_layers(batched))
    prepare_weights(batched)  # what the hook does: one weight tensor for all layers
    steps = [layer._step_weight for _, layer in ring_layers(batched)]
    assert all(w is not None for w in steps) and len({id(w._base) for w in steps}) == 1


def test_weight_mode_context_restores_modes_even_on_error():
    from models.utils import weight_mode
    model = build_model(dict(model="lenet", quantization="ring", ring_size=4))
    set_weight_mode(model, "ste")
    with pytest.raises(RuntimeError):
        with weight_mode(model, "hard"):
            assert {layer.quantizer.mode for _, layer in ring_layers(model)} == {"hard"}
            raise RuntimeError
    assert {layer.quantizer.mode for _, layer in ring_layers(model)} == {"ste"}


def test_layer_lists_have_distinct_names():
    """models.utils.quantized_layers gives (name, layer) pairs; the hooks' plain list of layers
    is quant_layers.quantized_modules, no longer a second function of the same name."""
    from models import quant_layers, utils
    model = build_model({"model": "mlp", "quantization": "ring", "ring_size": 4})
    pairs = utils.quantized_layers(model)
    assert [name for name, _ in pairs] == ["features.1", "features.4"]
    assert quant_layers.quantized_modules(model) == [layer for _, layer in pairs]
    assert not hasattr(quant_layers, "quantized_layers")
