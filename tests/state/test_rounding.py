"""Torch references of stochastic rounding to bf16 (counter-based hash) and the Kahan-compensated
bf16 update (dist_optim.state.rounding)."""

from __future__ import annotations

import torch

from dist_optim.state import rounding

MASK = 0xFFFFFFFF


def test_hash_on_tensors_is_the_host_mix():
    # the torch version (int64 masked, split multiplications) against plain Python integers
    idx = torch.tensor([0, 1, 2, 12345, 2 ** 31 - 1, 2 ** 31, 2 ** 32 - 1, 2 ** 32, 2 ** 40 + 17, 2 ** 62 + 3])
    for seed in (0, 1, 2 ** 31 + 5, MASK):
        got = rounding.hash32(seed, idx).tolist()
        want = [rounding.fmix32(rounding.fmix32(seed ^ rounding.fmix32(i >> 32)) ^ rounding.fmix32(i & MASK))
                for i in idx.tolist()]
        assert got == want and all(0 <= h <= MASK for h in got)


def test_hash_bits_look_uniform():
    h = rounding.hash32(rounding.stream_seed(0, 1, 0), torch.arange(1 << 16))
    # each of the 16 bits stochastic rounding uses is set about half the time: 65536 draws, a
    # standard deviation of 128; 6 sigma
    for bit in range(16):
        assert abs(int(((h >> bit) & 1).sum()) - 32768) < 6 * 128
    assert h.unique().numel() > 65000  # no short cycle


def test_bf16_round_to_nearest_on_the_bits_is_torch_conversion():
    x = torch.randn(100_000) * torch.exp(10 * torch.randn(100_000))
    x = torch.cat([x, torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 3.3895314e38, 1e-40, -1e-45])])
    assert torch.equal(rounding.round_nearest_bf16(x).view(torch.int16), x.bfloat16().view(torch.int16))
    assert bool(rounding.round_nearest_bf16(torch.tensor([float("nan")])).isnan().all())


def sr(x, seed, step=0, rank=0, offset=0):
    return rounding.stochastic_round_bf16(x, rounding.stream_seed(seed, step, rank), torch.arange(x.numel()) + offset)


def test_stochastic_rounding_picks_a_neighbour_and_keeps_representable_values():
    x = torch.randn(50_000) * torch.exp(5 * torch.randn(50_000))
    r = sr(x, 0).float()
    down = x.bfloat16()  # either neighbour in magnitude: truncation and truncation + 1 ulp
    trunc = (x.view(torch.int32) & ~0xFFFF).view(torch.float32)
    up = ((x.view(torch.int32) & ~0xFFFF) + 0x10000).view(torch.float32)
    assert bool(((r == trunc) | (r == up)).all())
    exact = down.float()
    assert torch.equal(sr(exact, 5), down)
    special = torch.tensor([float("inf"), -float("inf"), 0.0, -0.0])
    assert torch.equal(sr(special, 1).float(), special) and bool(sr(torch.tensor([float("nan")]), 1).isnan().all())


def test_stochastic_rounding_is_reproducible_and_streams_differ():
    x = torch.randn(4096)
    a = sr(x, 7, step=3, rank=1).view(torch.int16)
    assert torch.equal(a, sr(x, 7, step=3, rank=1).view(torch.int16))
    for other in (sr(x, 8, 3, 1), sr(x, 7, 4, 1), sr(x, 7, 3, 0), sr(x, 7, 3, 1, offset=1)):
        # about half the elements round the other way in an independent stream
        assert int((other.view(torch.int16) != a).sum()) > 1000
    # an element's bits depend on its own index only: any split of the tensor gives the same result
    parts = torch.cat([rounding.stochastic_round_bf16(x[:1000], rounding.stream_seed(7, 3, 1), torch.arange(1000)),
                       rounding.stochastic_round_bf16(x[1000:], rounding.stream_seed(7, 3, 1), torch.arange(1000, 4096))])
    assert torch.equal(parts.view(torch.int16), a)


def test_stochastic_rounding_is_unbiased():
    # 32 values, each at a different fraction of a bf16 ulp, rounded 20000 times (20000 indices):
    # the mean of the rounded values is x within 5 standard errors, ulp * sqrt(f (1 - f) / n)
    # (deterministic given the hash; 5 sigma leaves no room for a biased rounding to pass: a
    # round-to-nearest of f = 1/4 would be off by 0.25 ulp = 70 standard errors)
    n = 20_000
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(32, generator=gen).bfloat16().float()
    frac = torch.rand(32, generator=gen) * 0.98 + 0.01
    ulp = (base.view(torch.int32) + 0x10000).view(torch.float32) - base
    x = (base + frac * ulp).float()
    frac = (x - base) / ulp  # the fraction actually represented in fp32
    r = rounding.stochastic_round_bf16(x.repeat_interleave(n), rounding.stream_seed(3, 0, 0), torch.arange(32 * n))
    mean = r.float().view(32, n).double().mean(1)
    se = ulp.double().abs() * (frac.double() * (1 - frac.double()) / n).sqrt()
    assert bool(((mean - x.double()).abs() <= 5 * se).all())


def test_kahan_keeps_updates_that_round_to_nearest_loses():
    # 1000 updates of 1e-3 to a weight of 1.0: each is below half of bf16's ulp at 1 (2**-7), so
    # round-to-nearest never moves the weight; Kahan lands within one ulp of the exact sum (2.0
    # has an ulp of 2**-6). Not closer: the compensation is itself bf16 and loses up to half its
    # own ulp (2**-16 below 2**-7) at every step.
    p = torch.ones(3, dtype=torch.bfloat16)
    comp = torch.zeros(3, dtype=torch.bfloat16)
    naive = p.clone()
    delta = torch.full((3,), 1e-3)
    exact = torch.ones(3, dtype=torch.float64)
    for _ in range(1000):
        p, comp = rounding.kahan_add_bf16(p, comp, delta)
        naive = (naive.float() + delta).bfloat16()
        exact += delta.double()
    assert torch.equal(naive, torch.ones(3, dtype=torch.bfloat16))
    assert bool(((p.double() - exact).abs() <= 2.0 ** -6).all())


def test_kahan_matches_exact_sums_of_mixed_updates():
    gen = torch.Generator().manual_seed(1)
    p0 = torch.randn(1000, generator=gen)
    p, comp = p0.bfloat16(), torch.zeros(1000, dtype=torch.bfloat16)
    exact = p.double()
    naive = p.clone()
    for _ in range(200):
        d = torch.randn(1000, generator=gen) * 1e-4
        p, comp = rounding.kahan_add_bf16(p, comp, d)
        naive = (naive.float() + d).bfloat16()
        exact += d.double()
    kahan_err = (p.double() + comp.double() - exact).abs().mean()
    naive_err = (naive.double() - exact).abs().mean()
    assert kahan_err < naive_err / 20  # the compensated sum tracks the exact one; naive drifts
