import math

import pytest
import torch

from models import ring_math as rm


def test_published_triangle_rings():
    assert torch.allclose(rm.ring_values(4), torch.tensor([-1.0, 1 / 3, 1 / 3, -1.0]))
    r8 = rm.ring_values(8)
    assert r8[0] == r8[-1] == -1.0
    assert len(rm.distinct_values(rm.ring_values(4))) == 2
    assert len(rm.distinct_values(r8)) == 4
    assert rm.effective_bits(rm.ring_values(4)) == 1.0


def test_published_sin_ring():
    r = rm.ring_values(8, "sin")
    t = torch.linspace(0, 2 * math.pi, 8)
    assert torch.allclose(r, torch.sin(t), atol=1e-6)


@pytest.mark.parametrize("n", [2, 3, 4, 5, 8, 16, 32])
@pytest.mark.parametrize("ring_type", ["triangle", "sin"])
def test_distinct_layout_uses_every_value(n, ring_type):
    r = rm.ring_values(n, ring_type, "distinct")
    assert len(rm.distinct_values(r)) == n
    assert r.abs().max() <= 1.0


@pytest.mark.parametrize("n", [2, 4, 8, 16])
def test_distinct_triangle_levels_evenly_spaced(n):
    levels = rm.distinct_values(rm.ring_values(n, "triangle", "distinct"))
    expected = torch.tensor([-1 + (2 * k + 1) / n for k in range(n)])
    assert torch.allclose(levels, expected, atol=1e-6)


def test_bad_ring_arguments():
    for args in [(1,), (0,), (4, "square"), (4, "triangle", "nope")]:
        with pytest.raises(ValueError):
            rm.ring_values(*args)


def test_default_sigma():
    assert rm.default_sigma(4) == 0.5 and rm.default_sigma(64) == 2.0


@pytest.mark.parametrize("interp", ["gaussian", "linear"])
def test_soft_values_inside_ring_range(interp):
    ring = rm.ring_values(8)
    p = torch.rand(10000)
    v = rm.soft_values(p, ring, 0.5, interp)
    assert v.min() >= ring.min() - 1e-6 and v.max() <= ring.max() + 1e-6


CASES = [(n, t, layout, interp) for n in (2, 4, 8, 16) for t in ("triangle", "sin")
         for layout in ("published", "distinct") for interp in ("gaussian", "linear")]


@pytest.mark.parametrize("n,ring_type,layout,interp", CASES)
def test_soft_values_match_reference_formula(n, ring_type, layout, interp):
    torch.manual_seed(n)
    ring = rm.ring_values(n, ring_type, layout)
    sigma = rm.default_sigma(n)
    # random positions plus the 0/1 wrap, exact ring points and exact ties (p*N - i = N/2)
    special = torch.tensor([0.0, 1.0, 1e-7, 1 - 1e-7, 0.5, 0.5 + 1e-6, 1 / n, 0.25])
    p = torch.cat([torch.rand(3000), special]).double()
    a = p.clone().requires_grad_(True)
    b = p.clone().requires_grad_(True)
    va = rm.soft_values(a, ring.double(), sigma, interp)
    vb = rm.reference_soft_values(b, ring.double(), sigma, interp)
    g = torch.randn_like(p)
    (va * g).sum().backward()
    (vb * g).sum().backward()
    assert torch.allclose(va, vb, atol=1e-6)
    assert torch.allclose(a.grad, b.grad, atol=1e-6)


def test_soft_values_float32_gradients_close_to_reference():
    ring = rm.ring_values(8)
    p = torch.rand(50000)
    a, b = p.clone().requires_grad_(), p.clone().requires_grad_()
    rm.soft_values(a, ring, 0.5).sum().backward()
    rm.reference_soft_values(b, ring, 0.5).sum().backward()
    assert torch.allclose(a.grad, b.grad, atol=1e-4)


def test_chunking_does_not_change_results(monkeypatch):
    ring = rm.ring_values(8, "sin", "distinct")
    p = torch.rand(1000, dtype=torch.float64, requires_grad=True)
    full = rm.soft_values(p, ring.double(), 0.7)
    (g_full,) = torch.autograd.grad(full.sum(), p)
    monkeypatch.setattr(rm, "_CHUNK", 97)
    chunked = rm.soft_values(p, ring.double(), 0.7)
    (g_chunk,) = torch.autograd.grad(chunked.sum(), p)
    assert torch.allclose(full, chunked, atol=1e-12) and torch.allclose(g_full, g_chunk, atol=1e-12)


def test_gradients_reach_positions():
    ring = rm.ring_values(4)
    p = torch.rand(100, requires_grad=True)
    rm.soft_values(p, ring, 0.5).sum().backward()
    assert p.grad is not None and p.grad.abs().sum() > 0


@pytest.mark.parametrize("interp", ["gaussian", "linear"])
def test_continuous_across_wrap(interp):
    ring = rm.ring_values(8, "sin", "distinct")
    eps = 1e-5
    lo = rm.soft_values(torch.tensor([eps]), ring, 0.5, interp)
    hi = rm.soft_values(torch.tensor([1 - eps]), ring, 0.5, interp)
    zero = rm.soft_values(torch.tensor([0.0]), ring, 0.5, interp)
    one = rm.soft_values(torch.tensor([1.0]), ring, 0.5, interp)
    assert torch.allclose(zero, one, atol=1e-6)
    assert torch.allclose(lo, hi, atol=1e-3)


def test_hard_values_are_exact_ring_values():
    for layout in ("published", "distinct"):
        ring = rm.ring_values(8, "triangle", layout)
        p = torch.rand(5000)
        hard = rm.snap_to_ring(p, ring)
        assert torch.isin(hard, ring).all()
        idx = rm.hard_indices(p, 8)
        assert torch.equal(idx, torch.remainder(torch.round(p * 8), 8).long())
        assert torch.equal(hard, ring[idx])
    assert rm.hard_indices(torch.tensor([1.0, 0.0, 0.99]), 4).tolist() == [0, 0, 0]


def test_linear_interpolation_between_neighbours():
    ring = torch.tensor([0.0, 1.0, 2.0, 3.0])
    v = rm.soft_values(torch.tensor([0.125, 0.375, 0.875]), ring, 1.0, "linear")
    # q = 0.5 -> halfway 0..1; q = 1.5 -> 1..2; q = 3.5 -> halfway ring[3]=3 and ring[0]=0 (wrap)
    assert torch.allclose(v, torch.tensor([0.5, 1.5, 1.5]))


def test_ste_forward_is_hard_backward_is_soft():
    ring = rm.ring_values(4, "triangle", "distinct")
    p = torch.rand(200)
    a, b = p.clone().requires_grad_(), p.clone().requires_grad_()
    va = rm.soft_values(a, ring, 0.5, hard_forward=True)
    assert torch.equal(va, rm.snap_to_ring(p, ring))
    va.sum().backward()
    rm.soft_values(b, ring, 0.5).sum().backward()
    assert torch.equal(a.grad, b.grad)


def test_small_sigma_soft_converges_to_hard():
    ring = rm.ring_values(4, "triangle", "distinct")
    p = torch.rand(20000)
    # stay away from the midpoints between ring points, where soft is 50/50 by definition
    q = p * 4
    p = p[(q - q.round()).abs() < 0.4]
    hard = rm.snap_to_ring(p, ring)
    gaps = [(rm.soft_values(p, ring, s) - hard).abs().max().item() for s in (0.5, 0.2, 0.1, 0.05)]
    assert gaps == sorted(gaps, reverse=True)
    assert gaps[-1] < 1e-6


def test_invalid_sigma_and_interpolation():
    with pytest.raises(ValueError):
        rm.soft_values(torch.rand(3), rm.ring_values(4), 0.0)
    with pytest.raises(ValueError):
        rm.soft_values(torch.rand(3), rm.ring_values(4), 0.5, "cubic")
