"""Ring maths as pure functions.

A ring of size N is a vector of N values read around a circle. A weight is a
*position* p in [0, 1]; ``q = p * N`` is its place on the circle in units of
ring indices. Every function here works on flat or shaped tensors and returns a
tensor of the positions' shape unless said otherwise.
"""
import math

import torch
import torch.nn.functional as F

RING_TYPES = ("triangle", "sin")
RING_LAYOUTS = ("published", "distinct")
INTERPOLATIONS = ("gaussian", "linear")

# Positions handled per step inside the memory-lean interpolation: the N-wide
# temporaries of one chunk stay at a few MB whatever the layer size.
_CHUNK = 1 << 18


def ring_values(ring_size, ring_type="triangle", layout="published"):
    """Return the ring, a float32 tensor of shape [ring_size].

    ``published``: ``t = linspace(0, 2*pi, N)`` with the endpoint included, as in
    the original paper, so ring[0] == ring[N-1] and symmetric shapes repeat
    values (triangle ring-4 holds 2 distinct values, ring-8 holds 4).
    ``distinct``: ``t_i = 2*pi*(i + phase)/N`` for i < N (endpoint excluded)
    with a quarter step of phase (none for a sin ring of odd N), so all N
    values differ for both shapes; for the triangle they are the N evenly
    spaced levels ``-1 + (2k+1)/N``.
    """
    if ring_size < 2:
        raise ValueError(f"ring_size must be >= 2, got {ring_size}")
    if layout == "published":
        t = torch.linspace(0, 2 * math.pi, ring_size, dtype=torch.float64)
    elif layout == "distinct":
        phase = 0.0 if ring_type == "sin" and ring_size % 2 else 0.25
        t = 2 * math.pi * (torch.arange(ring_size, dtype=torch.float64) + phase) / ring_size
    else:
        raise ValueError(f"unknown ring layout {layout!r}; choose from {RING_LAYOUTS}")
    if ring_type == "triangle":
        x = t / (2 * math.pi)
        values = 2 * torch.abs(2 * (x - torch.floor(x + 0.5))) - 1
    elif ring_type == "sin":
        values = torch.sin(t)
    else:
        raise ValueError(f"unknown ring type {ring_type!r}; choose from {RING_TYPES}")
    return values.to(torch.float32)


def default_sigma(ring_size):
    """The published kernel width, in ring-index units: max(0.5, N/32)."""
    return max(0.5, ring_size / 32.0)


def distinct_values(ring, tol=1e-6):
    """Sorted distinct values of a ring (1-D tensor); values closer than ``tol`` count once.

    The tolerance absorbs float rounding: a float32 ``linspace`` ring can hold
    1/3 twice with different last bits, which is still one weight value.
    """
    values = torch.sort(ring.detach().cpu().double()).values
    keep = torch.ones_like(values, dtype=torch.bool)
    keep[1:] = values[1:] - values[:-1] > tol
    return values[keep].float()


def effective_bits(ring):
    """log2 of the number of distinct ring values."""
    return math.log2(len(distinct_values(ring)))


def hard_indices(positions, ring_size):
    """Index of the ring value nearest each position: round(p*N) mod N (int64)."""
    return torch.remainder(torch.round(positions.detach() * ring_size), ring_size).long()


def snap_to_ring(positions, ring):
    """The value a k-bit network really uses: ring[round(p*N) mod N]."""
    return ring[hard_indices(positions, ring.numel())]


def reference_soft_values(positions, ring, sigma, interpolation="gaussian"):
    """The published interpolation formula written out directly.

    Keeps several [n, N] tensors alive for backward; used as the reference
    that :func:`soft_values` must match and as the benchmark baseline.
    """
    n = ring.numel()
    q = positions * n
    if interpolation == "linear":
        lower = torch.floor(q)
        frac = q - lower
        i0 = torch.remainder(lower, n).long()
        i1 = torch.remainder(i0 + 1, n)
        return (1 - frac) * ring[i0] + frac * ring[i1]
    indices = torch.arange(n, device=positions.device, dtype=positions.dtype)
    distance = torch.abs(q.unsqueeze(-1) - indices)
    circular = torch.min(distance, n - distance)
    kernel = F.softmax(-0.5 * (circular / sigma) ** 2, dim=-1)
    return kernel @ ring


def _gaussian_chunk(q, ring, sigma):
    """Kernel terms for one chunk of scaled positions q [c]: (values, dvalues/dq)."""
    n = ring.numel()
    diff = q.unsqueeze(-1) - torch.arange(n, device=q.device, dtype=q.dtype)
    absdiff = diff.abs()
    wrapped = n - absdiff
    circular = torch.minimum(absdiff, wrapped)
    kernel = torch.softmax(-0.5 * (circular / sigma) ** 2, dim=-1)
    values = kernel @ ring
    # d(circular)/dq: +-1 on the short way round, 0 at an exact tie (as autograd does).
    direction = torch.sign(diff) * torch.sign(wrapped - absdiff)
    dlogit = -(circular / (sigma * sigma)) * direction
    kernel_dlogit = kernel * dlogit
    dvalues = kernel_dlogit @ ring - values * kernel_dlogit.sum(-1)
    return values, dvalues


def _linear_chunk(q, ring):
    """Linear interpolation between the two circular neighbours: (values, dvalues/dq)."""
    n = ring.numel()
    lower = torch.floor(q)
    frac = q - lower
    i0 = torch.remainder(lower, n).long()
    r0 = ring[i0]
    r1 = ring[torch.remainder(i0 + 1, n)]
    return r0 + frac * (r1 - r0), r1 - r0


def _chunked(positions, ring, sigma, interpolation, want_grad):
    """Apply the interpolation chunk by chunk; returns values or d values / d positions."""
    n = ring.numel()
    flat = positions.reshape(-1)
    out = torch.empty_like(flat)
    with torch.autocast(device_type=flat.device.type, enabled=False):
        for start in range(0, flat.numel(), _CHUNK):
            q = flat[start:start + _CHUNK] * n
            if interpolation == "gaussian":
                values, dvalues = _gaussian_chunk(q, ring, sigma)
            else:
                values, dvalues = _linear_chunk(q, ring)
            out[start:start + _CHUNK] = dvalues * n if want_grad else values
    return out.view_as(positions)


class _SoftValues(torch.autograd.Function):
    """Soft (or straight-through hard) ring values with O(n) extra memory.

    Saves only the positions; backward recomputes the kernel chunk by chunk.
    """

    @staticmethod
    def forward(ctx, positions, ring, sigma, interpolation, hard_forward):
        ctx.save_for_backward(positions, ring)
        ctx.sigma, ctx.interpolation = sigma, interpolation
        if hard_forward:
            return snap_to_ring(positions, ring)
        return _chunked(positions, ring, sigma, interpolation, want_grad=False)

    @staticmethod
    def backward(ctx, grad_output):
        positions, ring = ctx.saved_tensors
        slope = _chunked(positions, ring, ctx.sigma, ctx.interpolation, want_grad=True)
        return grad_output * slope, None, None, None, None


def soft_values(positions, ring, sigma, interpolation="gaussian", hard_forward=False):
    """Ring values for ``positions`` (any shape, float32), differentiable in positions.

    Equal to :func:`reference_soft_values` in value and gradient, but the
    backward keeps no [n, N] tensor: extra memory is O(n). With
    ``hard_forward`` the forward returns :func:`snap_to_ring` values while the
    gradient is still the soft kernel's (a straight-through estimator).
    """
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"unknown interpolation {interpolation!r}; choose from {INTERPOLATIONS}")
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    ring = ring.to(device=positions.device, dtype=positions.dtype)
    return _SoftValues.apply(positions, ring, float(sigma), interpolation, bool(hard_forward))
