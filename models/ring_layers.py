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

from . import ring_math
from .quant_layers import QuantizedConv2d, QuantizedLayer, QuantizedLinear

WEIGHT_MODES = ("soft", "hard", "ste")
# Positions at which load_fp32_weight reads the value function.
_INIT_GRID = 1 << 16
# Positions at which output_norm reads the soft value function's largest magnitude.
_NORM_GRID = 1 << 12


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

    def table(self, ring, values=None):
        """The interpolation table of ``ring`` at the current sigma, shared by equal rings.

        ``values``: ``tuple(ring.tolist())``, when the caller holds it (saves a device read).
        """
        values = tuple(ring.tolist()) if values is None else values
        key = (values, self.sigma, self.interpolation, ring.dtype, ring.device)
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


class RingLayer(QuantizedLayer):
    """Shared part of ring layers: positions, ring buffer and the interpolation table.

    Conv positions are flat, [out*in*kh*kw], linear ones [out, in], as in the
    original checkpoints.
    """

    default_quantizer = RingQuantizer
    latent_names = ("positions", "ring_template")

    def __init__(self, quantizer):
        super().__init__(quantizer)
        shape = self.weight_shape
        if len(shape) != 2:
            shape = (math.prod(shape),)
        self.register_buffer("ring_template", self.quantizer.ring())
        self.positions = nn.Parameter(torch.rand(shape))
        self._table = None
        self._table_key = None
        self._ring_buffer = None
        self._ring_values = None
        self._norm_key = None
        self._norm = None

    @property
    def ring_size(self):
        return self.quantizer.ring_size

    def compute_weight(self):
        return self.quantizer.weights(self.positions, self.ring_template, self._ring_table())

    def _ring_table(self):
        """Interpolation table for this layer's ring buffer, looked up only when it changes."""
        if self.quantizer.mode == "hard":
            return None
        ring = self.ring_template
        buffer = (ring.data_ptr(), ring._version, ring.dtype, ring.device)
        if buffer != self._ring_buffer:  # read the ring's values once per buffer change
            self._ring_buffer, self._ring_values = buffer, tuple(ring.tolist())
        key = (buffer, self.quantizer.sigma, self.quantizer.interpolation)
        if key != self._table_key:
            self._table = self.quantizer.table(ring, self._ring_values)
            self._table_key = key
        return self._table

    @torch.compiler.disable
    def output_norm(self):
        """The largest |weight| in the current mode (float): max |ring| when the forward is
        hard (hard, ste), else the soft value function's, read on a grid of positions; it
        grows 32x as sigma anneals from 4 to 0.05 (ring-4). Recomputed only when the
        ring, mode or sigma change."""
        ring = self.ring_template
        key = (ring.data_ptr(), ring._version, ring.device, self.quantizer.cache_key())
        if key != self._norm_key:
            with torch.no_grad():
                grid = torch.arange(_NORM_GRID, dtype=ring.dtype, device=ring.device) / _NORM_GRID
                values = ring if self.quantizer.mode != "soft" else \
                    self.quantizer.weights(grid, ring, self._ring_table())
                self._norm, self._norm_key = float(values.abs().max()), key
        return self._norm

    @staticmethod
    def batch_weights(layers):
        """Weights of all ring ``layers`` sharing an interpolation table in one call.

        A training step otherwise runs the interpolation's dozen small operations
        once per layer; here they run once per table, on the concatenated
        positions, and each layer gets its slice as ``_step_weight`` (the gradient
        reaches every layer's positions through the concatenation). Layers in hard
        mode, or alone with their table, are left to compute their own.
        """
        groups = {}
        for layer in layers:
            if layer.positions.requires_grad:
                table = layer._ring_table()
                if table is not None:
                    groups.setdefault(id(table), (table, []))[1].append(layer)
        for table, group in groups.values():
            if len(group) < 2:
                continue
            flat = torch.cat([layer.positions.reshape(-1) for layer in group])
            first = group[0]
            weights = first.quantizer.weights(flat, first.ring_template, table)
            for layer, weight in zip(group, weights.split([l.positions.numel() for l in group])):
                layer._step_weight = weight.view_as(layer.positions)

    def hard_indices(self):
        """Ring index of every weight, int64, shape of ``positions``."""
        return ring_math.hard_indices(self.positions, self.ring_size)

    @torch.no_grad()
    def load_fp32_weight(self, weight):
        """Positions whose values (current mode and sigma) are ``scale * weight``; returns scale.

        The value v(p) is read on a fine grid of positions and inverted on both
        of its branches around the ring (rising from its minimum to its maximum,
        falling back); ``scale`` is the largest that keeps every scaled weight
        inside [min v, max v], so each weight's value is as close to it as the
        grid allows (linear interpolation between grid points). Of the two
        positions with that value, each weight takes the one whose hard (ring)
        value is nearer the weight scaled to the ring's largest magnitude.
        """
        grid = torch.arange(_INIT_GRID, dtype=torch.float64) / _INIT_GRID
        values = self.quantizer.weights(grid.float(), self.ring_template,
                                        self._ring_table()).double()
        flat = weight.detach().double().cpu().reshape(-1)
        limits = [values.max() / flat.max() if flat.max() > 0 else math.inf,
                  values.min() / flat.min() if flat.min() < 0 else math.inf]
        scale = float(min(limits)) if math.isfinite(min(limits)) else 1.0
        low, high = int(values.argmin()), int(values.argmax())
        rise = (high - low) % _INIT_GRID  # grid steps from the minimum forward to the maximum
        candidates = [_invert_branch(values, low, rise, flat * scale),
                      _invert_branch(values, low, rise - _INIT_GRID, flat * scale)]
        ring = self.ring_template.detach().double().cpu()
        hard_target = flat * (ring.abs().max() / flat.abs().max().clamp_min(1e-30))
        errors = [(ring[ring_math.hard_indices(p, self.ring_size)] - hard_target).abs()
                  for p in candidates]
        positions = torch.where(errors[1] < errors[0], candidates[1], candidates[0])
        self.positions.copy_(positions.view_as(self.positions))
        return scale

    def extra_repr(self):
        q = self.quantizer
        return (f"ring_size={q.ring_size}, ring_type={q.ring_type}, layout={q.layout}, "
                f"interpolation={q.interpolation}, sigma={q.sigma:g}, mode={q.mode}")


def _invert_branch(values, start, length, target):
    """Positions p in [0, 1) with v(p) = ``target`` on one monotone branch of ``values``.

    values: v on the grid p = i / G [G] (float64); the branch runs from grid
    index ``start`` (v's minimum) over ``length`` steps (> 0 forward, < 0
    backward, around the ring) to v's maximum. target: [n] within [min v, max v].
    """
    grid = values.numel()
    step = 1 if length > 0 else -1
    branch = (start + step * torch.arange(abs(length) + 1)) % grid
    rising = torch.cummax(values[branch], 0).values
    k = torch.searchsorted(rising, target).clamp_(1, rising.numel() - 1)
    lo, hi = rising[k - 1], rising[k]
    frac = torch.where(hi > lo, (target - lo) / (hi - lo), torch.zeros_like(lo)).clamp_(0, 1)
    return torch.remainder((branch[k - 1].double() + step * frac) / grid, 1.0)


class RingConv2d(QuantizedConv2d, RingLayer):
    """Conv2d whose weights are read off a ring; positions [out*in/groups*kh*kw]."""


class RingLinear(QuantizedLinear, RingLayer):
    """Linear layer whose weights are read off a ring; positions [out, in]."""


RING_LAYERS = (RingConv2d, RingLinear)
