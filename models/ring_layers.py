"""Ring-quantized layers.

The quantizer (:class:`RingQuantizer`) is its own object: it knows the ring and
how positions become weights. The layers own the learnable ``positions`` and the
``ring_template`` buffer under the same names as the original implementation,
so the authors' state dicts load as they are.
"""
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ring_math

WEIGHT_MODES = ("soft", "hard", "ste")


@dataclass
class RingQuantizer:
    """How positions in [0, 1] become weight values.

    ring_size: N values on the ring; ring_type: ``triangle`` or ``sin``;
    layout: ``published`` or ``distinct`` (see :func:`ring_math.ring_values`);
    interpolation: ``gaussian`` or ``linear``; sigma: kernel width in
    ring-index units (None = published rule); mode: ``soft`` (published
    forward), ``hard`` (snapped to ring values, what a k-bit network computes)
    or ``ste`` (hard forward, soft-kernel gradient).
    """

    ring_size: int = 8
    ring_type: str = "triangle"
    layout: str = "published"
    interpolation: str = "gaussian"
    sigma: float = None
    mode: str = "soft"
    _tables: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        if self.sigma is None:
            self.sigma = ring_math.default_sigma(self.ring_size)
        ring_math.ring_values(self.ring_size, self.ring_type, self.layout)  # validates
        if self.interpolation not in ring_math.INTERPOLATIONS:
            raise ValueError(f"unknown interpolation {self.interpolation!r}")
        if self.mode not in WEIGHT_MODES:
            raise ValueError(f"unknown weight mode {self.mode!r}; choose from {WEIGHT_MODES}")

    @property
    def nominal_bits(self):
        return math.log2(self.ring_size)

    def ring(self):
        return ring_math.ring_values(self.ring_size, self.ring_type, self.layout)

    def table(self, ring):
        """The interpolation table of ``ring`` at the current sigma, shared by equal rings."""
        key = (tuple(ring.tolist()), self.sigma, self.interpolation, ring.dtype, ring.device)
        if key not in self._tables:
            if len(self._tables) >= 8:
                self._tables.pop(next(iter(self._tables)))
            self._tables[key] = ring_math.interpolation_table(ring, self.sigma, self.interpolation)
        return self._tables[key]

    def weights(self, positions, ring, table=None):
        """Weight values for ``positions`` (same shape) in the current mode."""
        if self.mode == "hard":
            return ring_math.snap_to_ring(positions, ring.to(positions.device))
        return ring_math.soft_values(positions, ring, self.sigma, self.interpolation,
                                     hard_forward=self.mode == "ste",
                                     table=table or self.table(ring))

    def cache_key(self):
        return (self.mode, self.sigma, self.interpolation)


class _RingLayer(nn.Module):
    """Shared part of ring layers: positions, ring buffer and cached weights."""

    def __init__(self, num_weights_shape, quantizer):
        super().__init__()
        self.quantizer = quantizer
        self.register_buffer("ring_template", quantizer.ring())
        self.positions = nn.Parameter(torch.rand(num_weights_shape))
        self._cached = None
        self._cache_key = None
        self._table = None
        self._table_key = None
        self._step_weight = None

    @property
    def ring_size(self):
        return self.quantizer.ring_size

    def ring_weight(self):
        """Weight values in the current mode, reused while positions are unchanged.

        Weights are recomputed when autograd needs a graph; otherwise (eval,
        ``torch.no_grad``) they are cached until positions, ring or mode change.
        """
        if torch.is_grad_enabled() and self.positions.requires_grad:
            weight, self._step_weight = self._step_weight, None
            if weight is not None:
                return weight
            return self.quantizer.weights(self.positions, self.ring_template, self._ring_table())
        key = (self.positions._version, self.positions.data_ptr(), self.positions.device,
               self.ring_template._version, self.ring_template.data_ptr(),
               self.quantizer.cache_key())
        if key != self._cache_key:
            with torch.no_grad():
                self._cached = self.quantizer.weights(self.positions, self.ring_template,
                                                      self._ring_table())
            self._cache_key = key
        return self._cached

    def _ring_table(self):
        """Interpolation table for this layer's ring buffer, looked up only when it changes."""
        if self.quantizer.mode == "hard":
            return None
        ring = self.ring_template
        key = (ring.data_ptr(), ring._version, ring.dtype, self.quantizer.sigma,
               self.quantizer.interpolation)
        if key != self._table_key:
            self._table, self._table_key = self.quantizer.table(ring), key
        return self._table

    def hard_indices(self):
        """Ring index of every weight, int64, shape of ``positions``."""
        return ring_math.hard_indices(self.positions, self.ring_size)

    def extra_repr(self):
        q = self.quantizer
        return (f"ring_size={q.ring_size}, ring_type={q.ring_type}, layout={q.layout}, "
                f"interpolation={q.interpolation}, sigma={q.sigma:g}, mode={q.mode}")


class RingConv2d(_RingLayer):
    """Conv2d (no bias) whose weights are read off a ring.

    ``positions`` is flat, shape [out*in*kh*kw], as in the original checkpoints.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0,
                 quantizer=None):
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
        super().__init__(out_channels * in_channels * kh * kw, quantizer or RingQuantizer())
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = (kh, kw)
        self.stride, self.padding = stride, padding

    @property
    def weight_shape(self):
        return (self.out_channels, self.in_channels, *self.kernel_size)

    @property
    def fan_in(self):
        """Inputs per output channel: in_channels * kh * kw."""
        return self.in_channels * self.kernel_size[0] * self.kernel_size[1]

    def forward(self, x):
        weight = self.ring_weight().view(self.weight_shape)
        return F.conv2d(x, weight.to(x.dtype), None, self.stride, self.padding)

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, " + super().extra_repr())


class RingLinear(_RingLayer):
    """Linear layer (no bias) whose weights are read off a ring; positions [out, in]."""

    def __init__(self, in_features, out_features, quantizer=None):
        super().__init__((out_features, in_features), quantizer or RingQuantizer())
        self.in_features, self.out_features = in_features, out_features

    @property
    def weight_shape(self):
        return (self.out_features, self.in_features)

    @property
    def fan_in(self):
        return self.in_features

    def forward(self, x):
        return F.linear(x, self.ring_weight().view(self.weight_shape).to(x.dtype))

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, " + super().extra_repr()


RING_LAYERS = (RingConv2d, RingLinear)


def precompute_ring_weights(module, inputs=None):
    """Compute the weights of all ring layers sharing a table in one call.

    A training step otherwise runs the interpolation's dozen small operations
    once per layer; here they run once per model, on the concatenated
    positions, and each layer picks up its slice in its next forward (the
    gradient reaches every layer's positions through the concatenation).
    Used as a forward pre-hook of the model; does nothing without autograd or
    in hard mode.
    """
    if not torch.is_grad_enabled():
        return
    groups = {}
    for layer in module.modules():
        if isinstance(layer, _RingLayer) and layer.positions.requires_grad:
            table = layer._ring_table()
            if table is not None:
                groups.setdefault(id(table), (table, []))[1].append(layer)
    for table, layers in groups.values():
        if len(layers) < 2:
            continue
        flat = torch.cat([layer.positions.reshape(-1) for layer in layers])
        first = layers[0]
        weights = first.quantizer.weights(flat, first.ring_template, table)
        for layer, weight in zip(layers, weights.split([l.positions.numel() for l in layers])):
            layer._step_weight = weight.view_as(layer.positions)


def clear_ring_weights(module, inputs=None, output=None):
    """Forward hook: drop precomputed weights a forward did not use."""
    for layer in module.modules():
        if isinstance(layer, _RingLayer):
            layer._step_weight = None
