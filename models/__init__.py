"""Models for Ring Quantization and the one place that builds them from a config."""
import torch.nn as nn

from .mnist_nets import LeNet, MLP
from .resnet_ring import DEPTHS, cifar_resnet
from .ring_layers import (RingConv2d, RingLinear, RingQuantizer, clear_ring_weights,
                          precompute_ring_weights)

CIFAR_MODELS = tuple(DEPTHS)
MNIST_MODELS = ("mlp", "lenet")
MODELS = CIFAR_MODELS + MNIST_MODELS
QUANTIZATIONS = ("ring", "none")


def layer_factories(config):
    """(conv, linear) constructors for the config's quantization.

    conv(in, out, kernel_size, stride, padding); linear(in, out). Ring layers
    of one model share one :class:`RingQuantizer`, so a mode or sigma change
    reaches all of them.
    """
    if config["quantization"] == "none":
        def conv(cin, cout, k, stride, padding):
            return nn.Conv2d(cin, cout, k, stride, padding, bias=False)

        def linear(cin, cout):
            return nn.Linear(cin, cout, bias=False)
        return conv, linear
    quantizer = RingQuantizer(
        ring_size=config["ring_size"], ring_type=config.get("ring_type", "triangle"),
        layout=config.get("ring_layout", "published"),
        interpolation=config.get("interpolation", "gaussian"), sigma=config.get("sigma"))

    def ring_conv(cin, cout, k, stride, padding):
        return RingConv2d(cin, cout, k, stride, padding, quantizer=quantizer)

    def ring_linear(cin, cout):
        return RingLinear(cin, cout, quantizer=quantizer)
    return ring_conv, ring_linear


def build_model(config):
    """Build the model a config (mapping) describes.

    Keys: model, quantization (ring|none), ring_size, ring_type, ring_layout,
    interpolation, sigma, fp32_first_layer, num_classes, in_channels, image_size.
    """
    name = config["model"]
    if config["quantization"] not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {config['quantization']!r}; choose from {QUANTIZATIONS}")
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {MODELS}")
    conv, linear = layer_factories(config)
    first_conv, first_linear = conv, linear
    if config.get("fp32_first_layer"):
        first_conv, first_linear = layer_factories({"quantization": "none"})
    num_classes = config.get("num_classes", 10)
    in_channels = config.get("in_channels", 3 if name in CIFAR_MODELS else 1)
    image_size = config.get("image_size", 28)
    if name in CIFAR_MODELS:
        model = cifar_resnet(name, conv, num_classes, in_channels, first_conv)
    elif name == "mlp":
        model = MLP(linear, num_classes, in_channels, image_size, first_linear)
    else:
        model = LeNet(conv, linear, num_classes, in_channels, image_size, first_conv)
    if config["quantization"] == "ring":
        model.register_forward_pre_hook(precompute_ring_weights)
        model.register_forward_hook(clear_ring_weights)
    return model
