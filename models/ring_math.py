"""Ring maths as pure functions.

A ring of size N is a vector of N values read around a circle. A weight is a
*position* p in [0, 1]; ``q = p * N`` is its place on the circle in units of
ring indices. Every function here works on flat or shaped tensors and returns a
tensor of the positions' shape unless said otherwise.
"""
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

RING_TYPES = ("triangle", "sin")
RING_LAYOUTS = ("published", "distinct")
INTERPOLATIONS = ("gaussian", "linear")

# Ring values closer than this are one weight value (float rounding of one level).
SAME_VALUE_TOL = 1e-6

# Positions handled per step inside the memory-lean interpolation, so that its
# temporaries stay at a few MB whatever the layer size.
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


def distinct_values(ring, tol=SAME_VALUE_TOL):
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


def _gaussian_terms(q, ring, sigma, branch_q=None):
    """Gaussian-kernel value and d value / dq at scaled positions ``q`` [m].

    The circular distance to ring index i is |q - i| or N - |q - i|. With
    ``branch_q`` (a point strictly inside the same table cell) that choice and
    its sign are taken at ``branch_q``, giving the one-sided limit at a cell
    end; without it they are taken at ``q`` itself, and an exact tie
    contributes zero slope, as autograd does for the reference formula.
    """
    n = ring.numel()
    index = torch.arange(n, dtype=q.dtype)
    diff = q.unsqueeze(-1) - index
    if branch_q is None:
        absdiff = diff.abs()
        wrapped = n - absdiff
        circular = torch.minimum(absdiff, wrapped)
        direction = torch.sign(diff) * torch.sign(wrapped - absdiff)
    else:
        bdiff = branch_q.unsqueeze(-1) - index
        side = torch.sign(bdiff)
        direct = bdiff.abs() < n - bdiff.abs()
        circular = torch.where(direct, side * diff, n - side * diff)
        direction = torch.where(direct, side, -side)
    kernel = torch.softmax(-0.5 * (circular / sigma) ** 2, dim=-1)
    values = kernel @ ring
    kernel_dlogit = kernel * (-(circular / (sigma * sigma)) * direction)
    return values, kernel_dlogit @ ring - values * kernel_dlogit.sum(-1)


def _cells_per_index(ring_size):
    """Table cells per ring step: fine enough for 1e-6 agreement at the published sigma."""
    return max(512, min(16384, (1 << 18) // ring_size))


class InterpolationTable(NamedTuple):
    """Soft value v(q) of one ring and sigma, tabulated on a periodic grid.

    The grid has ``cells`` = k*N cells of width 1/k in q = p*N, so every
    integer and half-integer q (where the circular distance has kinks) is a
    node. Per cell [cells]: ``value_lo`` / ``value_hi``, v at its left / right
    node; ``slope_lo`` / ``slope_hi``, dv/dp at its left / right end, one-sided.
    ``slope_node`` [cells]: dv/dp exactly at each cell's left node. Inside a
    cell v and dv/dp are interpolated linearly.
    """
    value_lo: torch.Tensor
    value_hi: torch.Tensor
    slope_lo: torch.Tensor
    slope_hi: torch.Tensor
    slope_node: torch.Tensor
    cells_per_index: int
    ring_size: int


def interpolation_table(ring, sigma, interpolation="gaussian", cells_per_index=None):
    """Build the :class:`InterpolationTable` for ``ring`` (1-D) and ``sigma``.

    Computed in float64 on the CPU, returned in the ring's dtype and device.
    """
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"unknown interpolation {interpolation!r}; choose from {INTERPOLATIONS}")
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    n = ring.numel()
    k = cells_per_index or _cells_per_index(n)
    ring64 = ring.detach().double().cpu()
    nodes = torch.arange(k * n + 1, dtype=torch.float64) / k
    if interpolation == "gaussian":
        mids = (nodes[:-1] + nodes[1:]) / 2
        values, slope_node = _gaussian_terms(nodes[:-1], ring64, sigma)
        _, slope_lo = _gaussian_terms(nodes[:-1], ring64, sigma, branch_q=mids)
        _, slope_hi = _gaussian_terms(nodes[1:], ring64, sigma, branch_q=mids)
    else:
        lower = torch.div(torch.arange(k * n), k, rounding_mode="floor")
        step = ring64[(lower + 1) % n] - ring64[lower]
        values = ring64[lower] + (nodes[:-1] - lower) * step
        slope_node = slope_lo = slope_hi = step
    value_hi = torch.roll(values, -1)  # v is periodic: the last cell ends at v(0)
    tables = (values, value_hi, slope_lo * n, slope_hi * n, slope_node * n)
    return InterpolationTable(*(t.to(device=ring.device, dtype=ring.dtype).contiguous()
                                for t in tables), k, n)


def _lookup(table, positions, slope):
    """Table read-out for flat ``positions``: values, or d values / d positions."""
    cells = table.cells_per_index * table.ring_size
    x = torch.remainder(positions * cells, cells)
    cell = torch.floor(x).clamp_(max=cells - 1)
    t = x - cell
    cell = cell.long()
    if not slope:
        return torch.lerp(table.value_lo.index_select(0, cell),
                          table.value_hi.index_select(0, cell), t)
    inside = torch.lerp(table.slope_lo.index_select(0, cell),
                        table.slope_hi.index_select(0, cell), t)
    return torch.where(t == 0, table.slope_node.index_select(0, cell), inside)


def _chunked(table, positions, slope, scale=None):
    """Apply :func:`_lookup` chunk by chunk so temporaries stay a few MB.

    ``scale`` (positions' shape) multiplies the result inside the loop, so the
    backward needs no full-size temporary beside its output.
    """
    flat = positions.reshape(-1)
    factor = None if scale is None else scale.reshape(-1)
    if flat.numel() <= _CHUNK:
        part = _lookup(table, flat, slope)
        return (part if factor is None else part.mul_(factor)).view_as(positions)
    out = torch.empty_like(flat)
    for start in range(0, flat.numel(), _CHUNK):
        part = _lookup(table, flat[start:start + _CHUNK], slope)
        if factor is not None:
            part.mul_(factor[start:start + _CHUNK])
        out[start:start + _CHUNK] = part
    return out.view_as(positions)


class _SoftValues(torch.autograd.Function):
    """Soft (or straight-through hard) ring values with O(n) extra memory.

    Saves only the positions; backward reads the slope table chunk by chunk.
    """

    @staticmethod
    def forward(ctx, positions, ring, table, hard_forward):
        ctx.save_for_backward(positions)
        ctx.table = table
        if hard_forward:
            return snap_to_ring(positions, ring)
        return _chunked(table, positions, slope=False)

    @staticmethod
    def backward(ctx, grad_output):
        (positions,) = ctx.saved_tensors
        return _chunked(ctx.table, positions, slope=True, scale=grad_output), None, None, None


def soft_values(positions, ring, sigma, interpolation="gaussian", hard_forward=False, table=None):
    """Ring values for ``positions`` (any shape), differentiable in positions.

    Equal to :func:`reference_soft_values` in value and gradient (to about
    1e-7 at the published sigma), but reads a precomputed
    :func:`interpolation_table` (pass ``table`` to reuse one) instead of
    building [n, N] tensors: extra memory is O(n) and the cost a few
    operations per weight. With ``hard_forward`` the forward returns
    :func:`snap_to_ring` values while the gradient is still the soft
    kernel's (a straight-through estimator). Runs in the positions' dtype,
    outside autocast.
    """
    ring = ring.to(device=positions.device, dtype=positions.dtype)
    if table is None:
        table = interpolation_table(ring, sigma, interpolation)
    with torch.autocast(device_type=positions.device.type, enabled=False):
        return _SoftValues.apply(positions, ring, table, bool(hard_forward))
