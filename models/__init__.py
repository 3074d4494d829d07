"""Models for Ring Quantization and the one place that builds them from a config."""
import torch.nn as nn

from .mnist_nets import LeNet, MLP
from .resnet_ring import DEPTHS, cifar_resnet
from .quant_layers import register_weight_hooks
from .ring_layers import RingConv2d, RingLinear, RingQuantizer
from .uniform_layers import UniformConv2d, UniformLayer, UniformLinear, UniformQuantizer

CIFAR_MODELS = tuple(DEPTHS)
MNIST_MODELS = ("mlp", "lenet")
MODELS = CIFAR_MODELS + MNIST_MODELS
QUANTIZATIONS = ("ring", "uniform", "none")
# build_model keys that only ring models read
RING_CONFIG_KEYS = ("ring_size", "ring_type", "ring_layout", "interpolation", "sigma")


def layer_factories(config):
    """(conv, linear) constructors for the config's quantization.

    conv(in, out, kernel_size, stride, padding, **geometry); linear(in, out, **terms),
    where the quantized ones take the keywords of :class:`quant_layers.QuantizedConv2d`
    (dilation, groups, bias, output_scale) and :class:`quant_layers.QuantizedLinear`.
    The quantized layers of one model share one quantizer (:class:`RingQuantizer` or
    :class:`UniformQuantizer`), so a mode or sigma change reaches all of them.
    """
    if config["quantization"] == "none":
        def conv(cin, cout, k, stride, padding):
            return nn.Conv2d(cin, cout, k, stride, padding, bias=False)

        def linear(cin, cout):
            return nn.Linear(cin, cout, bias=False)
        return conv, linear
    if config["quantization"] == "uniform":
        quantizer = UniformQuantizer(bits=config["bits"])
        conv_class, linear_class = UniformConv2d, UniformLinear
    else:
        quantizer = RingQuantizer(
            ring_size=config["ring_size"], ring_type=config.get("ring_type", "triangle"),
            layout=config.get("ring_layout", "published"),
            interpolation=config.get("interpolation", "gaussian"), sigma=config.get("sigma"))
        conv_class, linear_class = RingConv2d, RingLinear

    def quantized_conv(cin, cout, k, stride, padding, **geometry):
        return conv_class(cin, cout, k, stride, padding, quantizer=quantizer, **geometry)

    def quantized_linear(cin, cout, **terms):
        return linear_class(cin, cout, quantizer=quantizer, **terms)
    return quantized_conv, quantized_linear


def build_model(config):
    """Build the model a config (mapping) describes.

    Keys: model, quantization (ring|uniform|none), ring_size, ring_type,
    ring_layout, interpolation, sigma (ring), bits (uniform), fp32_first_layer,
    num_classes, in_channels, image_size. The quantized layers are every conv /
    linear layer but the classifier (and the first, with fp32_first_layer).
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
    if config["quantization"] != "none":
        register_weight_hooks(model)
    for layer in model.modules():
        if isinstance(layer, UniformLayer):
            layer.reset_step()  # after the network's own weight initialisation
    return model
