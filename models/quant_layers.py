"""What every quantized layer shares, whatever its quantizer.

A quantized layer holds latent tensors (ring positions, or latent weights and
steps) and a quantizer that turns them into weight values in its current
``mode``. The base class caches those weights while the latent tensors are
unchanged; the conv / linear classes add the geometry and the forward pass.
One quantizer object is shared by all quantized layers of a model, so a mode
switch reaches all of them.

A layer may also hold FP32 output terms, registered only when asked for (so the
repository's networks keep their state-dict layout): a ``bias`` [out] and an
``output_scale`` [out], one learned factor per output channel for a ring layer
whose output no BatchNorm normalises (docs/OWN_MODELS.md). The layer computes
``output_scale / output_norm() * (x conv w) + bias``; the weights keep their k-bit
values, and ``output_norm`` (a ring layer: the largest weight magnitude the kernel
allows at the current sigma) keeps the output's size steady while sigma anneals.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class QuantizedLayer(nn.Module):
    """Base of ring and uniform layers: the quantizer and the cached weights.

    Subclasses name in ``latent_names`` the state-dict entries the weights are
    computed from, define :meth:`compute_weight` (the weights in the current
    mode), and set ``weight_shape`` (e.g. [out, in / groups, kh, kw]) before
    calling this ``__init__``.
    """

    default_quantizer = None
    latent_names = ()

    def __init__(self, quantizer):
        super().__init__()
        self.quantizer = quantizer or self.default_quantizer()
        self._cached = None
        self._cache_key = None
        self._step_weight = None

    def latent(self):
        """The tensors the weights are computed from (``latent_names``)."""
        return tuple(getattr(self, name) for name in self.latent_names)

    def compute_weight(self):
        """Weight values in the quantizer's current mode (shape of the latent parameter)."""
        raise NotImplementedError

    def load_fp32_weight(self, weight):
        """Start from an FP32 layer's ``weight`` [weight_shape]; returns the factor (float)
        by which this layer's output is that of the FP32 layer."""
        raise NotImplementedError

    def quantized_weight(self):
        """Weight values in the current mode (shape of the latent parameter).

        Inside a model's forward these are the ones :func:`prepare_weights` left for
        it; a layer called on its own computes them with :meth:`eager_weight`.
        """
        weight = self._step_weight
        return weight if weight is not None else self.eager_weight()

    @torch.compiler.disable
    def eager_weight(self):
        """Weight values in the current mode, reused while the latent tensors are unchanged.

        Weights are recomputed when autograd needs a graph; otherwise (eval,
        ``torch.no_grad``) they are cached until a latent tensor or the mode changes.
        Never traced by ``torch.compile``: the cache key (tensor versions and
        addresses, the mode, sigma) is Python bookkeeping that would break the graph
        and recompile it whenever it changes.
        """
        latent = self.latent()
        if torch.is_grad_enabled() and any(t.requires_grad for t in latent):
            return self.compute_weight()
        key = tuple((t._version, t.data_ptr(), t.device) for t in latent) \
            + (self.quantizer.cache_key(),)
        if key != self._cache_key:
            with torch.no_grad():
                self._cached = self.compute_weight()
            self._cache_key = key
        return self._cached

    @staticmethod
    def batch_weights(layers):
        """Set ``_step_weight`` of ``layers`` (all of this class's kind) in fewer calls than
        one per layer, where the quantizer allows; called with autograd on. Default: no
        batching."""

    @property
    def fan_in(self):
        """Inputs per output unit: in_channels / groups * kh * kw, or in_features."""
        return math.prod(self.weight_shape[1:])

    def add_output_terms(self, bias, output_scale):
        """Register ``bias`` [out] (zeros) and ``output_scale`` [out] (ones) where asked; the
        others stay None and out of the state dict."""
        out = self.weight_shape[0]
        self.register_parameter("bias", nn.Parameter(torch.zeros(out)) if bias else None)
        self.register_parameter("output_scale",
                                nn.Parameter(torch.ones(out)) if output_scale else None)

    def output_norm(self):
        """What ``output_scale`` is relative to (float): 1 here; ring layers override it."""
        return 1.0

    def output_factor(self):
        """The factor [out] the raw output is multiplied by: output_scale / output_norm()."""
        return self.output_scale / self.output_norm()

    def scaled_output(self, y, view):
        """``output_factor() * y + bias`` for the raw output ``y`` (channels broadcast by
        ``view``)."""
        y = y * self.output_factor().to(y.dtype).view(view)
        return y if self.bias is None else y + self.bias.to(y.dtype).view(view)

    def plain_twin(self, weight, zero_bias=False):
        """The FP32 modules this layer computes with ``weight`` [weight_shape]: nn.Conv2d or
        nn.Linear with its geometry and bias (a zero one where it has none and ``zero_bias``),
        then :class:`OutputScale` where the layer scales its outputs."""
        scaled = self.output_scale is not None
        own_bias = self.bias is not None and not scaled
        plain = self.plain_layer(bias=own_bias or zero_bias)
        with torch.no_grad():
            plain.weight.copy_(weight)
            if plain.bias is not None:
                plain.bias.copy_(self.bias if own_bias else torch.zeros_like(plain.bias))
        return nn.Sequential(plain, OutputScale(self)) if scaled else plain


class OutputScale(nn.Module):
    """A layer's output terms (in its current mode) as plain buffers: ``x * scale + shift``,
    channels on dim 1 (conv [N, C, H, W]) or last (linear [..., out])."""

    def __init__(self, layer):
        super().__init__()
        self.view = layer.output_view
        with torch.no_grad():
            shift = layer.bias if layer.bias is not None else torch.zeros_like(layer.output_scale)
            self.register_buffer("scale", layer.output_factor().detach().float().clone())
            self.register_buffer("shift", shift.detach().float().clone())

    def forward(self, x):
        return x * self.scale.view(self.view) + self.shift.view(self.view)


def _cast(tensor, x):
    return None if tensor is None else tensor.to(x.dtype)


class QuantizedConv2d:
    """Conv2d geometry and forward for a :class:`QuantizedLayer` subclass (zero padding;
    ``groups`` = in_channels is a depthwise conv); no bias unless asked for.

    Listed first among the bases: ``class RingConv2d(QuantizedConv2d, RingLayer)``.
    """

    output_view = (-1, 1, 1)

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0,
                 quantizer=None, *, dilation=1, groups=1, bias=False, output_scale=False):
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"groups {groups} must divide in_channels {in_channels} and "
                             f"out_channels {out_channels}")
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
        self.weight_shape = (out_channels, in_channels // groups, kh, kw)
        super().__init__(quantizer)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = (kh, kw)
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.add_output_terms(bias, output_scale)

    def forward(self, x):
        weight = self.quantized_weight().view(self.weight_shape).to(x.dtype)
        if self.output_scale is None:
            return F.conv2d(x, weight, _cast(self.bias, x), self.stride, self.padding,
                            self.dilation, self.groups)
        return self.scaled_output(F.conv2d(x, weight, None, self.stride, self.padding,
                                           self.dilation, self.groups), self.output_view)

    def plain_layer(self, bias):
        return nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride,
                         self.padding, self.dilation, self.groups, bias=bias)

    def extra_repr(self):
        extra = "".join(f"{k}={v}, " for k, v in (("dilation", self.dilation),
                                                   ("groups", self.groups)) if v not in (1, (1, 1)))
        extra += "".join(f"{k}=True, " for k in ("bias", "output_scale")
                         if getattr(self, k) is not None)
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, {extra}" + super().extra_repr())


class QuantizedLinear:
    """Linear geometry and forward for a :class:`QuantizedLayer` subclass; no bias unless
    asked for."""

    output_view = (-1,)

    def __init__(self, in_features, out_features, quantizer=None, *, bias=False,
                 output_scale=False):
        self.weight_shape = (out_features, in_features)
        super().__init__(quantizer)
        self.in_features, self.out_features = in_features, out_features
        self.add_output_terms(bias, output_scale)

    def forward(self, x):
        weight = self.quantized_weight().view(self.weight_shape).to(x.dtype)
        if self.output_scale is None:
            return F.linear(x, weight, _cast(self.bias, x))
        return self.scaled_output(F.linear(x, weight), self.output_view)

    def plain_layer(self, bias):
        return nn.Linear(self.in_features, self.out_features, bias=bias)

    def extra_repr(self):
        extra = "".join(f"{k}=True, " for k in ("bias", "output_scale")
                        if getattr(self, k) is not None)
        return f"{self.in_features}, {self.out_features}, {extra}" + super().extra_repr()


def quantized_modules(module):
    """Every :class:`QuantizedLayer` in ``module``, in module order (the layers only; for
    (name, layer) pairs see :func:`models.utils.quantized_layers`)."""
    return [m for m in module.modules() if isinstance(m, QuantizedLayer)]


@torch.compiler.disable
def prepare_weights(module, inputs=None):
    """Forward pre-hook of a quantized model: each layer's weights for this forward.

    With autograd on, layers whose class batches (ring layers sharing a table) get
    theirs from one call; the others compute their own, cached in eval. Runs
    eagerly, also under ``torch.compile``, so the compiled graph only reads the
    weight tensors: sigma annealing, mode switches and position updates recompile
    nothing.
    """
    layers = quantized_modules(module)
    for layer in layers:
        layer._step_weight = None
    if torch.is_grad_enabled():
        for batch in dict.fromkeys(type(layer).batch_weights for layer in layers):
            batch([layer for layer in layers if type(layer).batch_weights is batch])
    for layer in layers:
        if layer._step_weight is None:
            layer._step_weight = layer.eager_weight()


@torch.compiler.disable
def clear_weights(module, inputs=None, output=None):
    """Forward hook: drop the weights :func:`prepare_weights` set (they hold the step's graph)."""
    for layer in quantized_modules(module):
        layer._step_weight = None


def register_weight_hooks(model):
    """Give a quantized model's root the :func:`prepare_weights` / :func:`clear_weights` hooks."""
    model.register_forward_pre_hook(prepare_weights)
    model.register_forward_hook(clear_weights)
