"""Quantized networks from trained FP32 ones: warm starts and post-training quantization."""
import torch
import torch.nn as nn

from . import RING_CONFIG_KEYS, build_model
from .quant_layers import QuantizedLayer
from .utils import quantized_layers, set_weight_mode, uniform_layers


def following_batchnorms(model):
    """{name of each quantized layer: the BatchNorm registered right after it}.

    The networks here register every quantized layer's BatchNorm directly
    after it. ValueError when a quantized layer has none, or one of another width.
    """
    found, pending = {}, None
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLayer):
            if pending is not None:
                raise ValueError(f"quantized layer {pending[0]} is not followed by BatchNorm")
            pending = (name, module)
        elif isinstance(module, nn.modules.batchnorm._BatchNorm) and pending is not None:
            outputs = pending[1].weight_shape[0]
            if module.num_features != outputs:
                raise ValueError(f"BatchNorm {name} does not match the {outputs} outputs of "
                                 f"{pending[0]}")
            found[pending[0]] = module
            pending = None
    if pending is not None:
        raise ValueError(f"quantized layer {pending[0]} is not followed by BatchNorm")
    return found


def _check_fits(model, state_dict):
    """ValueError unless ``state_dict`` is the FP32 state dict of ``model``'s network."""
    latent = {f"{name}.{key}" for name, layer in quantized_layers(model)
              for key in layer.state_dict()}
    expected = {k: tuple(t.shape) for k, t in model.state_dict().items() if k not in latent}
    expected.update({f"{name}.weight": tuple(layer.weight_shape)
                     for name, layer in quantized_layers(model)})
    given = {k: tuple(t.shape) for k, t in state_dict.items()}
    missing = sorted(expected.keys() - given.keys())
    unexpected = sorted(given.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(f"not the FP32 state dict of this network (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    wrong = [k for k in expected if expected[k] != given[k]]
    if wrong:
        raise ValueError(f"{wrong[0]}: FP32 shape {list(given[wrong[0]])}, this network "
                         f"needs {list(expected[wrong[0]])}")
    return latent


@torch.no_grad()
def init_from_fp32(model, state_dict):
    """Start a ring or uniform ``model`` from the FP32 ``state_dict`` of the same network.

    Every tensor but the quantized layers' weights is copied; each quantized
    layer takes its FP32 ``weight`` through ``load_fp32_weight`` (uniform:
    latent weights copied, steps from them; ring: positions whose values are
    the weights times a per-layer scale). That scale is folded into the
    running statistics of the BatchNorm after the layer (mean x scale, var x
    scale**2), so in eval mode the model computes what the FP32 one did, but
    for BatchNorm's eps, which now weighs as eps / scale**2 against the variance.
    Returns {layer name: scale}. ValueError when the state dict does not fit.
    """
    latent = _check_fits(model, state_dict)
    norms = following_batchnorms(model)
    model.load_state_dict({k: t for k, t in state_dict.items() if k not in latent}, strict=False)
    scales = {}
    for name, layer in quantized_layers(model):
        scale = layer.load_fp32_weight(state_dict[f"{name}.weight"])
        norms[name].running_mean.mul_(scale)
        norms[name].running_var.mul_(scale * scale)
        scales[name] = scale
    return scales


def uniform_config(config, bits):
    """The ``build_model`` config of the K-bit uniform twin of a model config."""
    keep = {k: v for k, v in config.items() if k not in RING_CONFIG_KEYS + ("fp32_first_layer",)}
    return {**keep, "quantization": "uniform", "bits": bits}


@torch.no_grad()
def post_training_quantize(model, config, bits, scale="mse"):
    """K-bit post-training quantization of FP32 ``model``: (uniform model, its config).

    Every layer a ring model quantizes is rounded per output channel to the
    integer levels -2**(K-1) .. 2**(K-1)-1 times a step chosen by ``scale``
    (``max`` or ``mse``, see :meth:`UniformQuantizer.ptq_step`); the rest is
    copied. The model is returned in hard and eval mode, on the CPU.
    """
    if config.get("quantization") != "none":
        raise ValueError(f"post-training quantization needs an FP32 model, got quantization "
                         f"{config.get('quantization')!r}")
    qconfig = uniform_config(config, bits)
    with torch.random.fork_rng(devices=[]):  # leave the caller's random stream alone
        quantized = build_model(qconfig)
    init_from_fp32(quantized, {k: t.cpu() for k, t in model.state_dict().items()})
    for _, layer in uniform_layers(quantized):
        layer.step.copy_(layer.quantizer.ptq_step(layer.weight, scale))
    set_weight_mode(quantized, "hard")
    return quantized.eval(), qconfig
