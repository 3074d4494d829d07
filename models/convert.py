"""Quantized networks from trained FP32 ones: warm starts and post-training quantization."""
import torch
import torch.fx
import torch.nn as nn

from . import RING_CONFIG_KEYS, build_model
from .quant_layers import QuantizedLayer
from .utils import quantized_layers, set_weight_mode, uniform_layers


class _Tracer(torch.fx.Tracer):
    """torch.fx tracer that keeps quantized layers whole, as it keeps torch.nn's."""

    def is_leaf_module(self, module, name):
        return isinstance(module, QuantizedLayer) or super().is_leaf_module(module, name)


def _outputs(layer):
    """Output channels (features) of a conv, linear or quantized layer."""
    return layer.weight_shape[0] if isinstance(layer, QuantizedLayer) else layer.weight.shape[0]


def following_batchnorms(model, kinds=(QuantizedLayer,)):
    """{name of each layer of ``kinds``: the BatchNorm that alone takes its output, or None}.

    Read off the dataflow that torch.fx traces: a layer's BatchNorm is the one module
    its output goes to, a BatchNorm of its width; None when its output goes anywhere
    else too (or the layer is called twice, once without it). ValueError when the
    model cannot be traced.
    """
    try:
        graph = _Tracer().trace(model)
    except Exception as e:  # tracing runs the model's own forward: any failure means untraceable
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise ValueError(f"cannot trace {type(model).__name__} with torch.fx ({first})") from None
    modules = dict(model.named_modules())
    found = {}
    for node in graph.nodes:
        layer = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(layer, kinds):
            continue
        users = list(node.users)
        norm = modules.get(users[0].target) if len(users) == 1 \
            and users[0].op == "call_module" else None
        if not (isinstance(norm, nn.modules.batchnorm._BatchNorm)
                and norm.num_features == _outputs(layer)):
            norm = None
        found[node.target] = norm if found.get(node.target, norm) is norm else None
    return found


def _check_fits(model, state_dict):
    """ValueError unless ``state_dict`` is the FP32 state dict of ``model``'s network."""
    latent = {f"{name}.{key}" for name, layer in quantized_layers(model)
              for key in layer.state_dict() if key != "bias"}  # the bias is the FP32 layer's
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

    Every tensor but the quantized layers' weights is copied (biases too); each
    quantized layer takes its FP32 ``weight`` through ``load_fp32_weight``
    (uniform: latent weights copied, steps from them, scale 1; ring: positions
    whose values are the weights times a per-layer scale). A layer with an
    ``output_scale`` takes output_norm / scale there (an output factor of 1 / scale),
    exactly; otherwise the scale is folded into the running statistics of the
    BatchNorm after the layer (mean x scale, var x scale**2), so in eval mode the
    model computes what the FP32 one did, but for BatchNorm's eps, which now
    weighs as eps / scale**2 against the variance.
    Returns {layer name: scale}. ValueError when the state dict does not fit, or
    a layer with a scale other than 1 has neither an output scale nor a BatchNorm.
    """
    latent = _check_fits(model, state_dict)
    model.load_state_dict({k: t for k, t in state_dict.items() if k not in latent}, strict=False)
    scales, norms = {}, None
    for name, layer in quantized_layers(model):
        scale = layer.load_fp32_weight(state_dict[f"{name}.weight"])
        if layer.output_scale is not None:
            layer.output_scale.fill_(layer.output_norm() / scale)
        elif scale != 1.0:
            norms = following_batchnorms(model) if norms is None else norms
            if norms.get(name) is None:
                raise ValueError(f"quantized layer {name} is not followed by BatchNorm (and has "
                                 f"no output scale to take its scale {scale:.4g})")
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
