"""What every quantized layer shares, whatever its quantizer.

A quantized layer holds latent tensors (ring positions, or latent weights and
steps) and a quantizer that turns them into weight values in its current
``mode``. The base class caches those weights while the latent tensors are
unchanged; the conv / linear classes add the geometry and the forward pass.
One quantizer object is shared by all quantized layers of a model, so a mode
switch reaches all of them.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class QuantizedLayer(nn.Module):
    """Base of ring and uniform layers: the quantizer and the cached weights.

    Subclasses define :meth:`latent` (the tensors the weights are computed
    from) and :meth:`compute_weight` (the weights in the current mode), and set
    ``weight_shape`` (e.g. [out, in, kh, kw]) before calling this ``__init__``.
    """

    default_quantizer = None

    def __init__(self, quantizer):
        super().__init__()
        self.quantizer = quantizer or self.default_quantizer()
        self._cached = None
        self._cache_key = None
        self._step_weight = None

    def latent(self):
        """The tensors the weights are computed from."""
        raise NotImplementedError

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
        """Inputs per output unit: in_channels * kh * kw, or in_features."""
        return math.prod(self.weight_shape[1:])


class QuantizedConv2d:
    """Conv2d geometry and forward (no bias) for a :class:`QuantizedLayer` subclass.

    Listed first among the bases: ``class RingConv2d(QuantizedConv2d, RingLayer)``.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0,
                 quantizer=None):
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
        self.weight_shape = (out_channels, in_channels, kh, kw)
        super().__init__(quantizer)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = (kh, kw)
        self.stride, self.padding = stride, padding

    def forward(self, x):
        weight = self.quantized_weight().view(self.weight_shape)
        return F.conv2d(x, weight.to(x.dtype), None, self.stride, self.padding)

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, " + super().extra_repr())


class QuantizedLinear:
    """Linear geometry and forward (no bias) for a :class:`QuantizedLayer` subclass."""

    def __init__(self, in_features, out_features, quantizer=None):
        self.weight_shape = (out_features, in_features)
        super().__init__(quantizer)
        self.in_features, self.out_features = in_features, out_features

    def forward(self, x):
        return F.linear(x, self.quantized_weight().view(self.weight_shape).to(x.dtype))

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, " + super().extra_repr()


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
