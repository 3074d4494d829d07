"""Helpers that act on every quantized (ring or uniform) layer of a model."""
import contextlib
import math

import torch

from . import ring_math
from .quant_layers import QuantizedLayer
from .ring_layers import RING_LAYERS
from .uniform_layers import UNIFORM_LAYERS, integer_range


def quantized_layers(model):
    """(name, layer) for every ring or uniform layer of ``model``, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, QuantizedLayer)]


def ring_layers(model):
    """(name, layer) for every ring layer of ``model``, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, RING_LAYERS)]


def uniform_layers(model):
    """(name, layer) for every uniform K-bit layer of ``model``, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, UNIFORM_LAYERS)]


def is_ring_model(model):
    return bool(ring_layers(model))


def is_quantized_model(model):
    return bool(quantized_layers(model))


@torch.no_grad()
def clamp_positions(model):
    """Clamp every position to [0, 1], as the published training does after each step."""
    for _, layer in ring_layers(model):
        layer.positions.clamp_(0, 1)


def set_weight_mode(model, mode):
    """Set ``soft``, ``hard`` or ``ste`` on every quantized layer (uniform ones have no soft)."""
    for _, layer in quantized_layers(model):
        layer.quantizer.mode = mode


@contextlib.contextmanager
def weight_mode(model, mode):
    """Run a block with every quantized layer in ``mode`` (None: unchanged), then restore
    each layer's."""
    layers = [layer for _, layer in quantized_layers(model)]
    previous = [layer.quantizer.mode for layer in layers]
    if mode is not None:
        set_weight_mode(model, mode)
    try:
        yield
    finally:
        for layer, m in zip(layers, previous):
            layer.quantizer.mode = m


def set_sigma(model, sigma):
    """Set the Gaussian kernel width (ring-index units) on every ring layer."""
    for _, layer in ring_layers(model):
        layer.quantizer.sigma = float(sigma)


def ring_summary(model):
    """Facts users must see about a ring model's weights, as a dict (None for FP32).

    Distinct values and effective bits are read off the ring buffer actually
    loaded, so a checkpoint's ring is described as it is.
    """
    layers = ring_layers(model)
    if not layers:
        return None
    layer = layers[0][1]
    q = layer.quantizer
    distinct = ring_math.distinct_values(layer.ring_template)
    return {
        "ring_size": q.ring_size,
        "ring_type": q.ring_type,
        "ring_layout": q.layout,
        "interpolation": q.interpolation,
        "sigma": q.sigma,
        "nominal_bits": math.log2(q.ring_size),
        "distinct_values": [round(v, 6) for v in distinct.tolist()],
        "num_distinct_values": len(distinct),
        "effective_bits": ring_math.effective_bits(layer.ring_template),
        "quantized_weights": sum(m.positions.numel() for _, m in layers),
    }


def uniform_summary(model):
    """Facts about a uniform K-bit model's weights, as a dict (None without uniform layers).

    ``distinct_values`` are the integer levels, in units of each channel's step.
    """
    layers = uniform_layers(model)
    if not layers:
        return None
    bits = layers[0][1].quantizer.bits
    qn, qp = integer_range(bits)
    return {"bits": bits, "nominal_bits": bits, "distinct_values": list(range(-qn, qp + 1)),
            "num_distinct_values": 2 ** bits, "effective_bits": float(bits),
            "quantized_weights": sum(m.weight.numel() for _, m in layers)}


def quant_summary(model):
    """:func:`ring_summary` or :func:`uniform_summary`, whichever applies (None for FP32)."""
    return ring_summary(model) or uniform_summary(model)


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())
