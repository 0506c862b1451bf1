"""The torch reference of block-wise 8-bit quantization (dist_optim.state.blockwise, codes) and
the checkpoint conversions: error within the code map's bound, nearest code, tie rule, zero and
non-finite blocks, idempotence, re-blocking between shard layouts."""

from __future__ import annotations

import pytest
import torch

from dist_optim.state import blockwise, checkpoint, codes

MAPS = ["dynamic_tree-signed", "dynamic_tree-unsigned", "dynamic_tree_nozero-unsigned", "linear-signed",
        "linear-unsigned", "power-signed:2", "power-signed:3", "power-unsigned:4"]
SIZES = [0, 1, 3, 255, 256, 257, 1000, 4099]


def heavy(n: int, signed: bool, seed: int = 0) -> torch.Tensor:
    """Magnitudes over ~10 decades within a block, like optimizer moments."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen) * torch.exp(3.0 * torch.randn(n, generator=gen))
    return x if signed else x.abs()


def is_signed(name: str) -> bool:
    return "-signed" in name


@pytest.mark.parametrize("name", MAPS)
def test_code_maps_are_sorted_tables_with_exact_ends(name):
    c = codes.named(name)
    assert c.shape == (256,) and c.dtype == torch.float32
    assert bool((c[1:] >= c[:-1]).all())
    assert c[-1].item() == 1.0 and (c[0].item() == -1.0 if is_signed(name) else c[0].item() >= 0.0)
    if is_signed(name):  # symmetric around one zero; the 256th entry duplicates +1
        assert c[127].item() == 0.0 and torch.equal(c[:127], -c[128:255].flip(0)) and c[254].item() == 1.0
    else:  # no duplicates
        assert bool((c[1:] > c[:-1]).all())
    t = codes.thresholds(c)
    # every threshold lies between its entries, so each entry is reachable unless duplicated
    assert bool((t[:-1] >= c[:-1]).all() and (t[:-1] <= c[1:]).all()) and t[-1].item() == float("inf")


def test_the_chosen_maps():
    assert torch.equal(codes.SIGNED, codes.power(True, 3.0)) and torch.equal(codes.UNSIGNED, codes.dynamic_tree_nozero())
    assert codes.SIGNED[127].item() == 0.0
    assert codes.SIGNED[128].item() == pytest.approx(127.0 ** -3)  # cubic: down to ~5e-7 of absmax
    # no zero among the second-moment codes: a nonzero v never dequantizes to 0 (8 decades, then 1e-8)
    assert codes.UNSIGNED[0].item() == pytest.approx(1e-8) and codes.UNSIGNED[1].item() == pytest.approx(1e-7)
    v = torch.tensor([1.0, 0.0, 1e-12])
    q, a = blockwise.quantize_blockwise(v, codes.UNSIGNED, 4)
    assert bool((blockwise.dequantize_blockwise(q, a, codes.UNSIGNED, 4) > 0).all())


@pytest.mark.parametrize("name", MAPS)
@pytest.mark.parametrize("block", [32, 256])
@pytest.mark.parametrize("n", SIZES)
def test_error_within_the_bound_and_nearest(name, block, n):
    c = codes.named(name)
    x = heavy(n, is_signed(name))
    q, a = blockwise.quantize_blockwise(x, c, block)
    assert q.dtype == torch.uint8 and q.shape == (n,) and a.shape == (-(-n // block),)
    d = blockwise.dequantize_blockwise(q, a, c, block)
    assert d.dtype == torch.float32 and d.shape == (n,)
    err = (d.double() - x.double()).abs()
    assert bool((err <= blockwise.error_bound(x, a, c, block)).all())
    if n:
        # nearest: no table entry is closer than the chosen one by more than the fp32 rounding of
        # the scaled threshold and of the product (4 ulps of absmax)
        scale = a.double().repeat_interleave(block)[:n]
        best = (c.double()[None, :] * scale[:, None] - x.double()[:, None]).abs().min(dim=1).values
        assert bool((err <= best + 4 * scale * 2.0 ** -23).all())
        # absmax is the block's largest magnitude, and it is coded exactly
        assert torch.equal(a, torch.nn.functional.pad(x.abs(), (0, -n % block)).view(-1, block).amax(1))


def test_ties_take_the_lower_code():
    c = codes.SIGNED
    t = codes.thresholds(c)
    i = 200
    x = torch.tensor([1.0, t[i].item() * 1.0], dtype=torch.float32)  # absmax 1: thresholds unscaled
    q, _ = blockwise.quantize_blockwise(x, c, 2)
    assert q.tolist() == [254, i]  # +1 is entry 254 (255 duplicates it, never produced); the tie goes down


def test_zero_block_and_non_finite_blocks():
    block = 4
    x = torch.tensor([0.0, -0.0, 0.0, 0.0, 1.0, float("nan"), 2.0, 3.0, 1.0, float("inf"), 1.0, 1.0, 5.0, -1.0, 0.5, 2.0])
    for code in (codes.SIGNED, codes.UNSIGNED):
        q, a = blockwise.quantize_blockwise(x if code is codes.SIGNED else x.abs(), code, block)
        d = blockwise.dequantize_blockwise(q, a, code, block)
        assert torch.equal(d[:4], torch.zeros(4)) and a[0].item() == 0.0  # no NaN from 0 / 0
        assert bool(a[1].isnan()) and not bool(d[4:8].isfinite().any())  # a NaN block stays visible
        assert a[2].item() == float("inf") and not bool(d[8:12].isfinite().any())
        assert bool(d[12:].isfinite().all()) and d[12].item() == 5.0  # other blocks unaffected


@pytest.mark.parametrize("name", MAPS)
def test_requantizing_dequantized_values_is_exact(name):
    c = codes.named(name)
    x = heavy(3000, is_signed(name), seed=1)
    q, a = blockwise.quantize_blockwise(x, c, 128)
    q2, a2 = blockwise.quantize_blockwise(blockwise.dequantize_blockwise(q, a, c, 128), c, 128)
    assert torch.equal(q, q2) and torch.equal(a, a2)


def test_bad_arguments():
    with pytest.raises(ValueError):
        blockwise.quantize_blockwise(torch.zeros(4), codes.SIGNED, 512)  # blocks are at most 256
    with pytest.raises(ValueError):
        blockwise.quantize_blockwise(torch.zeros(4), codes.SIGNED, 48)  # a power of two
    with pytest.raises(ValueError):
        blockwise.quantize_blockwise(torch.zeros(4, dtype=torch.float64), codes.SIGNED, 64)
    with pytest.raises(ValueError):
        blockwise.dequantize_blockwise(torch.zeros(5, dtype=torch.uint8), torch.zeros(3), codes.SIGNED, 4)  # 2 blocks


# --- checkpoint conversion and re-blocking


def test_to_int8_and_back_keep_the_shape():
    c = codes.SIGNED
    x = heavy(6 * 70, True).view(6, 70)
    q, a = checkpoint.to_int8(x, c, 64)
    back = checkpoint.to_fp32(q, a, c, 64, x.shape)
    assert back.shape == x.shape
    assert bool(((back - x).abs().double().reshape(-1) <= blockwise.error_bound(x.reshape(-1), a, c, 64)).all())


def shard(x, bounds, code, block):
    return [blockwise.quantize_blockwise(x[s:e].contiguous(), code, block) for s, e in zip(bounds, bounds[1:])]


def flat(shards, code, block):
    return torch.cat([blockwise.dequantize_blockwise(q, a, code, block) for q, a in shards])


@pytest.mark.parametrize("code", [codes.SIGNED, codes.UNSIGNED], ids=["signed", "unsigned"])
def test_reblocking_on_block_boundaries_is_lossless(code):
    block, n = 64, 64 * 37 + 5
    x = heavy(n, code is codes.SIGNED)
    old = [0, 64 * 10, 64 * 25, n]  # 3 ranks -> 2 ranks and -> 4 ranks (one of them empty)
    shards = shard(x, old, code, block)
    for new in ([0, 64 * 18, n], [0, 64 * 5, 64 * 5, 64 * 30, n]):
        out = checkpoint.reblock(shards, old, new, code, block)
        again = shard(flat(shards, code, block), new, code, block)
        for (q, a), (q2, a2) in zip(out, again):
            assert torch.equal(q, q2) and torch.equal(a, a2)
        # and back to the old layout: the very codes saved
        for (q, a), (q0, a0) in zip(checkpoint.reblock(out, new, old, code, block), shards):
            assert torch.equal(q, q0) and torch.equal(a, a0)


@pytest.mark.parametrize("code", [codes.SIGNED, codes.UNSIGNED], ids=["signed", "unsigned"])
def test_reblocking_across_block_boundaries_within_the_stated_bound(code):
    block, n = 128, 5000
    x = heavy(n, code is codes.SIGNED, seed=3)
    old, new = [0, 1234, 2500, 2501, n], [0, 777, 3333, n]
    shards = shard(x, old, code, block)
    x1 = flat(shards, code, block)  # the old dequantized values
    old_bound = torch.cat([blockwise.error_bound(x[s:e], a, code, block) for (_, a), s, e in zip(shards, old, old[1:])])
    out = checkpoint.reblock(shards, old, new, code, block)
    x2 = flat(out, code, block)
    new_bound = torch.cat([blockwise.error_bound(x1[s:e], a, code, block) for (_, a), s, e in zip(out, new, new[1:])])
    assert bool(((x2 - x1).abs().double() <= new_bound).all())
    assert bool(((x2 - x).abs().double() <= old_bound + new_bound).all())
    # a new block's absmax never exceeds the largest old absmax it overlaps
    assert max(a.max().item() for _, a in out) <= max(a.max().item() for _, a in shards)


def test_reblock_checks_the_layouts():
    shards = shard(torch.randn(100), [0, 50, 100], codes.SIGNED, 16)
    with pytest.raises(ValueError):
        checkpoint.reblock(shards, [0, 50, 100], [0, 99], codes.SIGNED, 16)
    with pytest.raises(ValueError):
        checkpoint.reblock(shards, [0, 40, 100], [0, 100], codes.SIGNED, 16)


@pytest.mark.parametrize("code", [codes.SIGNED, codes.UNSIGNED], ids=["signed", "unsigned"])
def test_dequantize_pieces_equals_the_shards_own_dequantized_values(code):
    """Fragments of shards (a ZeRO partition's slice of one param), each starting and ending
    mid-block, give the same fp32 values as dequantizing each whole shard and slicing it."""
    block, n = 64, 64 * 20 + 9
    x = heavy(n, code is codes.SIGNED, seed=5)
    bounds = [0, 500, 1000, n]
    shards = shard(x, bounds, code, block)
    whole = [blockwise.dequantize_blockwise(q, a, code, block) for q, a in shards]
    cuts = [(0, 70, 499), (1, 0, 3), (1, 130, 130), (2, 1, n - 1000)]
    got = checkpoint.dequantize_pieces([(*shards[i], lo, hi) for i, lo, hi in cuts], code, block)
    want = torch.cat([whole[i][lo:hi] for i, lo, hi in cuts])
    assert torch.equal(got, want)
    assert checkpoint.dequantize_pieces([], code, block).shape == (0,)


def test_dequantize_pieces_refuses_a_piece_outside_its_shard():
    q, a = blockwise.quantize_blockwise(torch.randn(100), codes.SIGNED, 16)
    for lo, hi in ((-1, 5), (10, 101), (20, 10)):
        with pytest.raises(ValueError, match=rf"piece \[{lo}, {hi}\) lies outside its shard of 100 codes"):
            checkpoint.dequantize_pieces([(q, a, lo, hi)], codes.SIGNED, 16)


def test_saved_absmax_shape_follows_dim0_slices():
    from dist_optim.state.layout import saved_absmax_shape

    assert saved_absmax_shape((4101,)) == (17,)
    assert saved_absmax_shape((71, 512)) == (71, 2)
    assert saved_absmax_shape((3, 4, 128)) == (3, 2)  # 512 elements per dim-0 slice
    assert saved_absmax_shape((0, 256)) == (0, 1)
    assert saved_absmax_shape((65, 66)) is None and saved_absmax_shape((71, 64)) is None
    assert saved_absmax_shape(()) is None
