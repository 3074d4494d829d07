"""Ring (or LSQ) quantization of a model of your own: convert it, train it with the k-bit
recipe in your own loop, pack it (docs/OWN_MODELS.md).

    model = torchvision.models.mobilenet_v2(num_classes=10)
    ringq.quantize_model(model)                         # k-bit ring-4, classifier FP32
    recipe = ringq.Recipe(model, epochs=30)
    optimizer = torch.optim.SGD(recipe.param_groups(lr=0.1), momentum=0.9)
    recipe.attach(optimizer)                            # positions clamped after each step
    for epoch in range(1, 31):
        recipe.step(epoch)                              # sigma, soft / straight-through
        ...                                             # your training pass
    ringq.save_packed(model, "mobilenet_v2.rqp")        # 2 bits per quantized weight

Everything here calls the code the training scripts run: the layer classes and
``layer_factories`` of :mod:`models`, the warm start of :mod:`models.convert`, the
epoch schedule and parameter groups of :mod:`ringq.engine`, the packed format of
:mod:`ringq.packing`.
"""
import warnings

import torch
import torch.nn as nn

from models import layer_factories
from models.convert import following_batchnorms, init_from_fp32
from models.quant_layers import register_weight_hooks
from models.ring_layers import RingLayer
from models.utils import clamp_positions, quantized_layers, ring_summary, weight_mode

from . import packing
from .engine import apply_epoch_schedule, param_groups, sigma_at, train_mode_at
from .errors import RingqError
from .trust import option_problem

# The k-bit ring-4 recipe of experiments/cifar10_cpu/resnet20_ring4_kbit.yaml (tests check it).
RING_DEFAULTS = {"ring_size": 4, "ring_layout": "distinct", "ring_type": "triangle",
                 "interpolation": "gaussian", "sigma": 4.0}
UNIFORM_DEFAULTS = {"bits": 2}
RECIPE_DEFAULTS = {"sigma_final": 0.05, "position_lr_scale": 1 / 64,
                   "position_lr_fan_in": True, "position_weight_decay": 0.0}
QUANTIZATIONS = {"ring": RING_DEFAULTS, "uniform": UNIFORM_DEFAULTS}
PLAIN_LAYERS = (nn.Conv2d, nn.Linear)


def _check(name, value):
    problem = option_problem(name, value)
    if problem:
        raise RingqError(f"{name}: {problem}")


def _options(quantization, options):
    """The quantizer options (``build_model`` keys) with defaults filled in, checked."""
    if quantization not in QUANTIZATIONS:
        raise RingqError(f"quantization: invalid value {quantization!r}; choose from "
                         f"{', '.join(QUANTIZATIONS)}")
    defaults = QUANTIZATIONS[quantization]
    for name, value in options.items():
        if name not in defaults:
            other = next((q for q, d in QUANTIZATIONS.items() if name in d), None)
            raise RingqError(f"{name}: only for quantization={other!r}" if other else
                             f"unknown option {name!r}; choose from {', '.join(defaults)}, "
                             f"keep_fp32, fp32_first_layer, warm_start")
        _check(name, value)
    return {"quantization": quantization, **defaults, **options}


def _targets(model, keep_fp32, fp32_first_layer):
    """[(name, module)] of the nn.Conv2d / nn.Linear layers to quantize, in module order
    (every name under which a shared module is registered)."""
    layers = [(n, m) for n, m in model.named_modules(remove_duplicate=False)
              if isinstance(m, PLAIN_LAYERS)]
    quantized = quantized_layers(model)
    if quantized:
        raise RingqError(f"the model is already quantized ({quantized[0][0]} is a "
                         f"{type(quantized[0][1]).__name__})")
    linears = [n for n, m in layers if isinstance(m, nn.Linear)]
    keep = set(linears[-1:] if keep_fp32 is None else
               [keep_fp32] if isinstance(keep_fp32, str) else keep_fp32)
    unknown = sorted(keep - {n for n, _ in layers})
    if unknown:
        raise RingqError(f"keep_fp32: the model has no nn.Conv2d or nn.Linear named "
                         f"{unknown[0]!r}")
    if fp32_first_layer and layers:
        keep.add(layers[0][0])
    kept = {id(m) for n, m in layers if n in keep}
    targets = [(n, m) for n, m in layers if id(m) not in kept]
    if not targets:
        raise RingqError(f"nothing to quantize: {type(model).__name__} has no nn.Conv2d or "
                         f"nn.Linear besides those kept FP32 ({', '.join(sorted(keep)) or 'none'})")
    for name, module in targets:
        if type(module) not in PLAIN_LAYERS:
            raise RingqError(f"{name or 'the model'}: a {type(module).__name__} (subclass of "
                             f"{type(module).__mro__[1].__name__}) may compute otherwise; keep "
                             f"it FP32 with keep_fp32")
        if getattr(module, "padding_mode", "zeros") != "zeros":
            raise RingqError(f"{name}: padding_mode {module.padding_mode!r}; quantized convs "
                             f"pad with zeros only (keep it FP32 with keep_fp32)")
        if not name:
            raise RingqError(f"the model itself is an {type(module).__name__}: wrap it (e.g. "
                             f"nn.Sequential) to quantize it in place")
    return targets


def _unnormalised(model, targets):
    """Names among ``targets`` whose output no BatchNorm alone takes (all of them, with a
    warning, when torch.fx cannot trace the model)."""
    try:
        norms = following_batchnorms(model, PLAIN_LAYERS)
    except ValueError as e:
        warnings.warn(f"{e}: every ring layer gets a per-channel output scale", stacklevel=3)
        return {name for name, _ in targets}
    return {name for name, module in targets if norms.get(name) is None}


def _twin(module, conv, linear, output_scale):
    """The quantized layer (latent weights freshly initialised) with ``module``'s geometry."""
    terms = {"bias": module.bias is not None, "output_scale": output_scale}
    if isinstance(module, nn.Conv2d):
        layer = conv(module.in_channels, module.out_channels, module.kernel_size,
                     module.stride, module.padding, dilation=module.dilation,
                     groups=module.groups, **terms)
    else:
        layer = linear(module.in_features, module.out_features, **terms)
    layer = layer.to(module.weight.device)
    if module.bias is not None:
        with torch.no_grad():
            layer.bias.copy_(module.bias)
    return layer


@torch.no_grad()
def _match_rms(layer, weight):
    """Output scale such that the layer's weights times its output factor have the RMS of
    the FP32 ``weight``."""
    values = layer.quantized_weight()
    layer.output_scale.fill_(layer.output_norm() * float(
        weight.pow(2).mean().sqrt() / values.pow(2).mean().sqrt().clamp_min(1e-12)))


def quantize_model(model, quantization="ring", keep_fp32=None, fp32_first_layer=False,
                   warm_start=False, **options):
    """Replace, in place, every nn.Conv2d and nn.Linear of ``model`` by its ring or uniform
    twin; returns ``model``.

    quantization: ``ring`` (options ring_size, ring_layout, ring_type, interpolation,
    sigma; default the k-bit ring-4 recipe, :data:`RING_DEFAULTS`) or ``uniform`` (LSQ,
    option bits, default 2). keep_fp32: names of layers left FP32 (default: the last
    nn.Linear, the classifier); fp32_first_layer: also the first conv / linear. The
    twins keep stride, padding, dilation, groups (depthwise) and bias; all share one
    quantizer. A ring layer whose output no BatchNorm normalises (read off the torch.fx
    dataflow) gets a learned per-channel ``output_scale`` [out]. warm_start: positions
    (latent weights) from the layers' current FP32 weights, as ``--init-from``
    (:func:`models.convert.init_from_fp32`); else fresh ones, as the training scripts
    start (an output scale then gives the weights the FP32 layer's RMS). The rest of
    the model (biases, BatchNorms, FP32 layers) is kept. RingqError (one line) for an
    invalid option or a model with nothing to quantize.
    """
    config = _options(quantization, options)
    _check("fp32_first_layer", fp32_first_layer)
    targets = _targets(model, keep_fp32, fp32_first_layer)
    scaled = _unnormalised(model, targets) if quantization == "ring" else set()
    fp32 = model.state_dict() if warm_start else None
    try:
        conv, linear = layer_factories(config)
    except ValueError as e:
        raise RingqError(str(e)) from None
    twins = {}
    for name, module in targets:
        if id(module) not in twins:
            twins[id(module)] = (_twin(module, conv, linear, name in scaled), module.weight)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, twins[id(module)][0])
    register_weight_hooks(model)
    if warm_start:
        init_from_fp32(model, fp32)
    else:
        for layer, weight in twins.values():
            if layer.output_scale is not None:
                _match_rms(layer, weight)
    return model


def distinct_levels(model):
    """{quantized layer name: distinct values its hard weights take}: per layer for a ring
    layer, the most of any output channel for a uniform one (per-channel steps)."""
    levels = {}
    with weight_mode(model, "hard"), torch.no_grad():
        for name, layer in quantized_layers(model):
            weight = layer.quantized_weight().reshape(layer.weight_shape[0], -1)
            levels[name] = len(torch.unique(weight)) if isinstance(layer, RingLayer) \
                else max(len(torch.unique(row)) for row in weight)
    return levels


class Recipe:
    """The k-bit training recipe of the training scripts, for a training loop of your own.

    model: a model converted by :func:`quantize_model` (an FP32 one trains plainly);
    epochs: how many the loop runs. sigma_final: the kernel width reached at the last
    epoch, geometrically from the model's sigma; ste_epochs: last epochs trained
    straight-through, hard forward (default: the last fifth, 6 of 30 as the CPU
    configs); position_lr_scale, position_lr_fan_in, position_weight_decay: the
    positions' learning rate (``lr * scale * fan_in``) and weight decay. Defaults:
    :data:`RECIPE_DEFAULTS`, the k-bit ring-4 config's.
    """

    def __init__(self, model, epochs, ste_epochs=None, **options):
        unknown = sorted(options.keys() - RECIPE_DEFAULTS.keys())
        if unknown:
            raise RingqError(f"unknown recipe option {unknown[0]!r}; choose from ste_epochs, "
                             f"{', '.join(RECIPE_DEFAULTS)}")
        cfg = {**RECIPE_DEFAULTS, **options, "epochs": epochs,
               "ste_epochs": epochs // 5 if ste_epochs is None and isinstance(epochs, int)
               else ste_epochs}
        for name, value in cfg.items():
            _check(name, value)
        if cfg["ste_epochs"] > epochs:
            raise RingqError(f"ste_epochs: {cfg['ste_epochs']} is more than epochs {epochs}")
        self.model, self.cfg = model, cfg
        ring = ring_summary(model)
        self.base_sigma = ring["sigma"] if ring else None

    def param_groups(self, lr, weight_decay=1e-4):
        """SGD parameter groups, each with its ``lr`` (and ``lr_scale``), as the scripts'."""
        groups = param_groups(self.model, {**self.cfg, "weight_decay": weight_decay})
        return [{**group, "lr": lr * group["lr_scale"]} for group in groups]

    def attach(self, optimizer):
        """Clamp ring positions to [0, 1] after every ``optimizer.step()``; returns it."""
        optimizer.register_step_post_hook(lambda *_: clamp_positions(self.model))
        return optimizer

    def step(self, epoch):
        """Set the kernel width and the training mode of 1-based ``epoch``; returns
        {"epoch", "sigma", "weight_mode"} (None for a model without ring layers)."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) \
                or not 1 <= epoch <= self.cfg["epochs"]:
            raise RingqError(f"epoch must be an int in 1..{self.cfg['epochs']}, got {epoch!r}")
        apply_epoch_schedule(self.model, self.cfg, self.base_sigma, epoch)
        ring = self.base_sigma is not None
        return {"epoch": epoch,
                "sigma": sigma_at(self.cfg, self.base_sigma, epoch) if ring else None,
                "weight_mode": train_mode_at(self.cfg, epoch) if ring else None}


def save_packed(model, path, half=False, extra=None):
    """Write a converted model as a packed file (:func:`ringq.packing.export_packed`);
    returns its stats (file_bytes, packed_bytes, raw_bytes, bits_per_layer, ...)."""
    try:
        return packing.export_packed(model, None, path, half, extra)
    except ValueError as e:
        raise RingqError(str(e)) from None


def load_packed(path, model=None):
    """The model a packed file holds, in hard + eval mode. Without ``model``: the
    ``build_model`` network it describes; with one (built and converted as the file's
    was): that model, its state loaded exactly. CheckpointError naming the first layer
    that does not fit."""
    return packing.load_packed(path, model=model)[0]
