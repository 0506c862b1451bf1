"""triton_kernels._quant / triton_kernels.quant against the torch references of dist_optim.state,
bit for bit: codes and absmax, dequantized values, stochastic rounding, round-to-nearest and Kahan
on the bits; and the helpers composed in an update kernel (tests/state/_int8_adam_kernel.py).
Under the Triton interpreter on CPU, or on CUDA (`cuda` mark). Exact equality everywhere: the
kernels use only fp32 products and comparisons (quantization), one product (dequantization) and
integer bit operations (rounding), which no backend evaluates differently."""

from __future__ import annotations

import pytest
import torch

import triton_kernels
from dist_optim.state import blockwise, codes, rounding

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from triton_kernels import _launch, _quant, quant  # noqa: E402
from tests._triton import device  # noqa: F401 (a fixture)

MAPS = ["dynamic_tree-signed", "power-signed:3", "dynamic_tree_nozero-unsigned", "power-unsigned:4"]
# The interpreter's tile is max(64, QBLOCK): sizes cross tiles and quantization blocks, end inside
# a block, or are empty or tiny.
SIZES = [0, 1, 2, 63, 64, 65, 257, 1000, 4099]



def moments(n: int, signed: bool, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen) * torch.exp(3.0 * torch.randn(n, generator=gen))
    if n > 20:  # a block of zeros, a negative zero, a denormal, an exact threshold
        x[3:20] = 0.0
        x[5] = -0.0
        x[7] = 1e-41
    return x if signed else x.abs()


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    view = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.uint8: torch.uint8}[a.dtype]
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.cpu().view(view), b.cpu().view(view))


@pytest.mark.parametrize("name", MAPS)
@pytest.mark.parametrize("qblock", [16, 64, 256])
@pytest.mark.parametrize("n", SIZES)
def test_quantize_and_dequantize_equal_the_reference(device, name, qblock, n):
    code = codes.named(name)
    x = moments(n, "-signed" in name)
    want_codes, want_absmax = blockwise.quantize_blockwise(x, code, qblock)
    got_codes, got_absmax = quant.quantize_blockwise(x.to(device), codes.thresholds(code).to(device), qblock)
    assert same_bits(got_codes, want_codes) and same_bits(got_absmax, want_absmax)
    want = blockwise.dequantize_blockwise(want_codes, want_absmax, code, qblock)
    assert same_bits(quant.dequantize_blockwise(got_codes, got_absmax, code.to(device), qblock), want)


def test_non_finite_blocks_equal_the_reference(device):
    x = moments(300, True)
    x[70], x[140] = float("nan"), float("inf")  # blocks 1 and 2 of 64
    for code in (codes.SIGNED, codes.UNSIGNED):
        v = x if code is codes.SIGNED else x.abs()
        want = blockwise.quantize_blockwise(v, code, 64)
        got = quant.quantize_blockwise(v.to(device), codes.thresholds(code).to(device), 64)
        assert same_bits(got[0], want[0]) and same_bits(got[1], want[1])
        assert bool(got[1][1].isnan()) and got[1][2].item() == float("inf")


@pytest.mark.parametrize("n", [0, 1, 63, 1000])
@pytest.mark.parametrize("seed,offset", [(0, 0), (2 ** 32 - 1, 12345), (2 ** 31 + 7, 2 ** 33 - 500)])
def test_stochastic_rounding_equals_the_reference(device, n, seed, offset):
    # offsets past 2**32 exercise the hash's high word
    x = moments(n, True, seed=2)
    want = rounding.stochastic_round_bf16(x, seed, torch.arange(n, dtype=torch.int64) + offset)
    assert same_bits(quant.stochastic_round_bf16(x.to(device), seed, offset), want)


def test_stochastic_rounding_specials(device):
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 3.4e38, -1e-44, 1.0])
    want = rounding.stochastic_round_bf16(x, 99, torch.arange(8))
    got = quant.stochastic_round_bf16(x.to(device), 99, 0)
    assert same_bits(got, want) and bool(got[0].isnan())


@triton.jit
def _rounding_kernel(P, COMP, DELTA, RN, P_OUT, COMP_OUT, HASH, seed, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    delta = tl.load(DELTA + offs, mask=mask, other=0.0)
    tl.store(RN + offs, _quant.round_nearest_bf16(delta), mask=mask)
    p, comp = _quant.kahan_add_bf16(tl.load(P + offs, mask=mask), tl.load(COMP + offs, mask=mask), delta)
    tl.store(P_OUT + offs, p, mask=mask)
    tl.store(COMP_OUT + offs, comp, mask=mask)
    tl.store(HASH + offs, _quant.hash32(seed, offs.to(tl.int64) * 3 + 2 ** 35).to(tl.int32, bitcast=True), mask=mask)


def test_round_nearest_kahan_and_hash_helpers_equal_the_reference(device):
    n = 1000
    gen = torch.Generator().manual_seed(4)
    p = torch.randn(n, generator=gen).bfloat16()
    comp = (torch.randn(n, generator=gen) * 1e-3).bfloat16()
    delta = torch.randn(n, generator=gen) * torch.exp(4 * torch.randn(n, generator=gen)) * 1e-3
    delta[:4] = torch.tensor([float("nan"), float("inf"), 0.0, 3.3961776e38])  # the last rounds up to inf
    outs = [torch.empty(n, dtype=torch.bfloat16, device=device) for _ in range(3)] + [
        torch.empty(n, dtype=torch.int32, device=device)]
    seed = 2 ** 31 + 3
    _launch.run(_rounding_kernel, (1,), device, p.to(device), comp.to(device), delta.to(device), *outs,
                quant.seed_arg(seed), n, BLOCK=1024)
    assert same_bits(outs[0], rounding.round_nearest_bf16(delta)) and bool(outs[0][0].isnan())
    want_p, want_comp = rounding.kahan_add_bf16(p, comp, delta)
    assert same_bits(outs[1], want_p) and same_bits(outs[2], want_comp)
    want_hash = rounding.hash32(seed, torch.arange(n) * 3 + 2 ** 35)
    assert torch.equal(outs[3].cpu().long() & 0xFFFFFFFF, want_hash)


def reference_int8_adam(p, g, m_state, v_state, lr, beta1, beta2, eps, seed, qblock):
    """The kernel's step written with the torch references, in the kernel's order of operations."""
    s_code, u_code = codes.SIGNED, codes.UNSIGNED
    m = blockwise.dequantize_blockwise(*m_state, s_code, qblock)
    v = blockwise.dequantize_blockwise(*v_state, u_code, qblock)
    lr, beta1, beta2, eps = (torch.tensor(x, dtype=torch.float32) for x in (lr, beta1, beta2, eps))
    m = beta1 * m + (1.0 - beta1) * g
    v = beta2 * v + (1.0 - beta2) * (g * g)
    p32 = p.float() - lr * (m / (v.sqrt() + eps))
    new_p = rounding.stochastic_round_bf16(p32, seed, torch.arange(p.numel()))
    return new_p, blockwise.quantize_blockwise(m, s_code, qblock), blockwise.quantize_blockwise(v, u_code, qblock)


@pytest.mark.parametrize("n", [1, 256, 700])
def test_an_int8_adam_kernel_built_from_the_helpers(n):
    """Under the interpreter only: on a GPU the kernel's multiply-adds may be fused (the AOT compile
    enables fp fusion), so its fp32 update would differ from torch's in the last bits."""
    from tests.state._int8_adam_kernel import int8_adam_kernel

    if not triton_kernels.supports(torch.device("cpu")):
        pytest.skip("needs the Triton interpreter")
    qblock, block = 256, 512  # tiles of two quantization blocks: a full tile and a masked tail
    gen = torch.Generator().manual_seed(5)
    p = torch.randn(n, generator=gen).bfloat16()
    m_state = blockwise.quantize_blockwise(torch.randn(n, generator=gen) * 1e-2, codes.SIGNED, qblock)
    v_state = blockwise.quantize_blockwise(torch.rand(n, generator=gen) * 1e-4, codes.UNSIGNED, qblock)
    seed = rounding.stream_seed(0, 1, 0)
    for step in range(3):
        g = torch.randn(n, generator=gen)
        want = reference_int8_adam(p, g, m_state, v_state, 1e-2, 0.9, 0.999, 1e-8, seed, qblock)
        got_p, (mc, ma), (vc, va) = p.clone(), [t.clone() for t in m_state], [t.clone() for t in v_state]
        sc, uc = codes.SIGNED, codes.UNSIGNED
        _launch.run(int8_adam_kernel, (triton.cdiv(n, block),), p.device, got_p, g, mc, ma, vc, va, sc,
                    codes.thresholds(sc), uc, codes.thresholds(uc), n, 1e-2, 0.9, 0.999, 1e-8, quant.seed_arg(seed),
                    BLOCK=block, QBLOCK=qblock, num_warps=4)
        assert same_bits(got_p, want[0]) and not torch.equal(got_p, p)
        for got, ref in zip((mc, ma, vc, va), (*want[1], *want[2])):
            assert same_bits(got, ref)
        p, m_state, v_state = want
