"""Uniform K-bit layers: per-output-channel symmetric integer levels, steps learned by LSQ.

A layer holds latent FP32 ``weight`` [out, ...] (the shape and name of an FP32
layer's weight, so FP32 state dicts copy in) and ``step`` [out], one step size
per output channel. Its weights are ``step * clamp(round(weight / step), -Qn,
Qp)`` with Qn = 2**(K-1), Qp = 2**(K-1) - 1: 2**K signed integer levels per
channel (LSQ's convention, Esser et al., ICLR 2020). The rounding's gradient is
straight through (zero where the weight is clipped); the step's gradient is
LSQ's, times the gradient scale g = 1 / sqrt(fan_in * Qp), where fan_in is the
number of weights that share one step (the weights of one output channel).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from .quant_layers import QuantizedConv2d, QuantizedLayer, QuantizedLinear

MIN_BITS, MAX_BITS = 2, 8
PTQ_SCALES = ("max", "mse")
# Steps are used as at least this (a step that SGD pushes to 0 or below would divide by 0).
STEP_MIN = 1e-8
# Candidate steps of the MSE search: fractions of the max-abs step.
_MSE_FRACTIONS = torch.linspace(0.05, 1.0, 96, dtype=torch.float64)


def integer_range(bits):
    """(Qn, Qp): the levels are the integers -Qn .. Qp."""
    return 2 ** (bits - 1), 2 ** (bits - 1) - 1


def _per_channel(step, weight):
    """``step`` [out] viewed to broadcast over ``weight`` [out, ...]."""
    return step.view(-1, *([1] * (weight.dim() - 1)))


class _LSQ(torch.autograd.Function):
    """w_q = s * clamp(round(w / s), -Qn, Qp) per output channel; LSQ gradients.

    d w_q / d w = 1 where -Qn < w/s < Qp, else 0 (straight through the rounding);
    d w_q / d s = round(w/s) - w/s inside, -Qn below, Qp above, summed over each
    channel and multiplied by ``grad_scale``.
    """

    @staticmethod
    def forward(ctx, weight, step, qn, qp, grad_scale):
        ctx.save_for_backward(weight, step)
        ctx.qn, ctx.qp, ctx.grad_scale = qn, qp, grad_scale
        s = _per_channel(step.clamp_min(STEP_MIN), weight)
        return torch.clamp(torch.round(weight / s), -qn, qp) * s

    @staticmethod
    def backward(ctx, grad_output):
        weight, step = ctx.saved_tensors
        v = weight / _per_channel(step.clamp_min(STEP_MIN), weight)
        q = torch.clamp(torch.round(v), -ctx.qn, ctx.qp)
        inside = (v > -ctx.qn) & (v < ctx.qp)
        grad_weight = grad_output * inside
        grad_step = (grad_output * torch.where(inside, q - v, q)).flatten(1).sum(1)
        return grad_weight, grad_step * ctx.grad_scale, None, None, None


@dataclass
class UniformQuantizer:
    """How latent weights and per-channel steps become K-bit weight values.

    bits: K in 2..8; mode: ``hard`` (what the K-bit network computes) or ``ste``
    (the same forward: the training forward of LSQ is already quantized, with
    straight-through gradients). There is no ``soft`` mode.
    """

    bits: int = 8
    mode: str = "hard"

    def __post_init__(self):
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) \
                or not MIN_BITS <= self.bits <= MAX_BITS:
            raise ValueError(f"bits must be an int in {MIN_BITS}..{MAX_BITS}, got {self.bits!r}")

    @property
    def nominal_bits(self):
        return self.bits

    def initial_step(self, weight):
        """LSQ's initial step per output channel: 2 * mean|w| / sqrt(Qp), shape [out]."""
        _, qp = integer_range(self.bits)
        return 2 * weight.detach().abs().flatten(1).mean(1) / math.sqrt(qp)

    def weights(self, weight, step):
        """Quantized weights [weight's shape] from ``weight`` [out, ...] and ``step`` [out]."""
        if self.mode not in ("hard", "ste"):
            raise ValueError(f"uniform quantization has no {self.mode!r} mode (only hard)")
        qn, qp = integer_range(self.bits)
        return _LSQ.apply(weight, step, qn, qp, 1.0 / math.sqrt(weight[0].numel() * qp))

    def integers(self, weight, step):
        """Integer level of every weight, int64 [weight's shape], in [-Qn, Qp]."""
        qn, qp = integer_range(self.bits)
        s = _per_channel(step.detach().clamp_min(STEP_MIN), weight)
        return torch.clamp(torch.round(weight.detach() / s), -qn, qp).long()

    def ptq_step(self, weight, scale="mse"):
        """Post-training step per output channel [out] (float32) for FP32 ``weight`` [out, ...].

        ``max``: max|w| / Qp, so every weight lies within the levels. ``mse``: of
        96 fractions (0.05 .. 1) of that step, the one with the least squared
        rounding error of the channel's weights.
        """
        if scale not in PTQ_SCALES:
            raise ValueError(f"unknown PTQ scale {scale!r}; choose from {PTQ_SCALES}")
        qn, qp = integer_range(self.bits)
        w = weight.detach().double().flatten(1)
        step = (w.abs().amax(1) / qp).clamp_min(STEP_MIN)
        if scale == "max":
            return step.float()
        best, best_error = step, torch.full_like(step, math.inf)
        for fraction in _MSE_FRACTIONS:
            s = (step * fraction).unsqueeze(1)
            error = ((torch.clamp(torch.round(w / s), -qn, qp) * s - w) ** 2).sum(1)
            better = error < best_error
            best = torch.where(better, s.squeeze(1), best)
            best_error = torch.where(better, error, best_error)
        return best.float()

    def cache_key(self):
        return (self.bits,)


class UniformLayer(QuantizedLayer):
    """Shared part of uniform layers: latent ``weight`` [weight_shape] and ``step`` [out].

    The latent weight starts as PyTorch's default for conv / linear layers
    (Kaiming uniform, a = sqrt(5)) and the step from it (:meth:`reset_step`).
    """

    default_quantizer = UniformQuantizer
    latent_names = ("weight", "step")

    def __init__(self, quantizer):
        super().__init__(quantizer)
        self.weight = nn.Parameter(torch.empty(self.weight_shape))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.step = nn.Parameter(torch.empty(self.weight_shape[0]))
        self.reset_step()

    @torch.no_grad()
    def reset_step(self):
        """Steps from the current latent weights (:meth:`UniformQuantizer.initial_step`)."""
        self.step.copy_(self.quantizer.initial_step(self.weight))

    def compute_weight(self):
        return self.quantizer.weights(self.weight, self.step)

    def integers(self):
        """Integer level of every weight, int64 [weight_shape], in [-Qn, Qp]."""
        return self.quantizer.integers(self.weight, self.step)

    @torch.no_grad()
    def load_fp32_weight(self, weight):
        """Latent weights copied from ``weight``, steps initialised from them; returns 1.0."""
        self.weight.copy_(weight)
        self.reset_step()
        return 1.0

    def extra_repr(self):
        return f"bits={self.quantizer.bits}, mode={self.quantizer.mode}"


class UniformConv2d(QuantizedConv2d, UniformLayer):
    """Conv2d with K-bit per-channel uniform weights; weight [out, in / groups, kh, kw]."""


class UniformLinear(QuantizedLinear, UniformLayer):
    """Linear layer with K-bit per-channel uniform weights; weight [out, in]."""


UNIFORM_LAYERS = (UniformConv2d, UniformLinear)
