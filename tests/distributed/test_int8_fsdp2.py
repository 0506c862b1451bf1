"""int8 optimizer state under FSDP2 at world 2 (uneven shards): the run equals one process, and
DCP checkpoints resume bit-exactly at world 2 and reshard to world 1; flat partitions (ZeRO-style,
plain tensors with a process group) equal the one-process run on the whole buffer bit for bit.

Tolerance against one process: test_fsdp2's rtol 1e-5 / atol 1e-6 (FSDP2 reduces gradients in
another order, an ulp per step) for all but a few elements. The block layouts agree (see
_int8_fsdp_cases), so the int8 runs differ beyond that only where a moment an ulp from a code's
threshold rounds to the neighbouring code: rare (at most 0.2% of the elements allowed; one of 4544
seen), and such an element's param moves by at most what Adam's steps can move it (lr per step:
|m_hat| / sqrt(v_hat) <= 1 up to eps for a constant-sign gradient, and close to it otherwise).
"""

from __future__ import annotations

import torch

from tests.distributed import _int8_fsdp_cases as cases
from tests.multiproc import world_fixture

WORLD = 2
TOL = dict(rtol=1e-5, atol=1e-6)
world = world_fixture(WORLD)


def assert_close_up_to_code_flips(a, b, steps, lr=0.01):
    far = ~torch.isclose(a, b, **TOL)
    assert far.float().mean() <= 0.002, f"{int(far.sum())} of {a.numel()} elements beyond the fp32 tolerance"
    assert bool(((a - b).abs() <= steps * lr).all())


def test_int8_state_on_uneven_shards_equals_one_process(world):
    results = world.run(cases.run_int8, 6)
    net = cases.model()
    opt = cases.optimizer(net.parameters())
    cases.train(net, opt, 0, 6, WORLD)
    (params0, layout0), (params1, layout1) = results
    # int8 over each rank's shard (2304 codes = 9 blocks, 2240 = 8 blocks and a partial one); fp32 below the rule
    assert layout0 == [(2304, 9), None, None, None] and layout1 == [(2240, 9), None, None, None]
    for rank_params in (params0, params1):
        for a, b in zip(rank_params, net.parameters()):
            assert_close_up_to_code_flips(a, b.detach(), steps=6)


def test_dcp_resume_at_world_2_is_bit_exact_and_reshards_to_world_1(world, tmp_path):
    root = str(tmp_path / "ckpt")
    uninterrupted = world.run(cases.run_save_and_go_on, root, 3, 3)
    resumed = world.run(cases.run_resume, root, 3)
    for (_, a_local), (_, b_local) in zip(uninterrupted, resumed):
        for a, b in zip(a_local, b_local):
            assert torch.equal(a, b)

    from dist_optim.distributed.checkpoint import load_checkpoint

    net = cases.model(seed=123)
    opt = cases.optimizer(net.parameters())
    start = load_checkpoint(root, net, opt)["step"]
    assert start == 3 and "exp_avg_absmax" in opt.state[net[0].weight]
    assert opt.state[net[0].weight]["exp_avg"].numel() == 4544
    cases.train(net, opt, start, 3, WORLD)
    for a, b in zip(uninterrupted[0][0], net.parameters()):
        assert_close_up_to_code_flips(a, b.detach(), steps=3)


def test_flat_partitions_equal_one_process_bit_for_bit(world):
    """Rank 0's partition ends on a block boundary, so each rank's blocks are the one-process
    blocks: codes, absmax and params are the same bits (the update is element-wise; no clipping)."""
    results = world.run(cases.run_flat_partitions, 4)
    whole, state = cases.train_flat(4, 0, 1)
    bounds = cases.flat_bounds(WORLD)
    for rank, (part, part_state) in enumerate(results):
        lo, hi = bounds[rank], bounds[rank + 1]
        assert torch.equal(part, whole[lo:hi])
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(part_state[key], state[key][lo:hi])
            assert torch.equal(part_state[key + "_absmax"], state[key + "_absmax"][lo // 256: -(-hi // 256)])


def test_an_empty_shard_holds_empty_int8_state(world):
    (w0, layout0), (w1, layout1) = world.run(cases.run_empty_shard, 3)
    assert layout0 == (4100, 17) and layout1 == (0, 0)
    net = cases.OneRow()
    cases.train_one_row(net, 3)
    # both ranks train on the same batch: FSDP2's average of two equal gradients is the one-process one
    for w in (w0, w1):
        assert_close_up_to_code_flips(w, net.w.detach(), steps=3)
