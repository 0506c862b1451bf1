"""FSDP2 at world 2 equals one process: every optimizer, global clipping, non-finite agreement,
accumulation, rank-consistent decisions and checkpoints resharded 2 -> 1 and 1 -> 2.

Tolerance against one process: rtol 1e-5 / atol 1e-6 — FSDP2 reduces gradients in another order
than one process's backward over the whole batch (an ulp per step), which the updates carry.
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed import _fsdp_cases as cases
from tests.multiproc import world_fixture
from tests.optim._factories import CONFIGS

WORLD = 2
TOL = dict(rtol=1e-5, atol=1e-6)
world = world_fixture(WORLD)


def assert_all_ranks_equal_reference(results, ref_params):
    for rank_params in results:
        for a, b in zip(rank_params, ref_params):
            torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_optimizer_equals_one_process(world, name):
    results = world.run(cases.run_optimizer, name, 8)
    ref, _ = cases.train_reference(name, 8, WORLD)
    assert_all_ranks_equal_reference([r[0] for r in results], [p.detach() for p in ref.parameters()])
    assert results[0][1] == results[1][1]  # every rank keeps the same state keys
    assert results[0][2] != results[1][2]  # the shards really are uneven


def test_clipping_equals_clip_grad_norm_on_the_unsharded_model(world):
    results = world.run(cases.run_clipping_against_torch, 6, 0.05)
    ref = cases.model()
    opt = torch.optim.AdamW(ref.parameters(), lr=0.01)  # as CONFIGS["AdamW"]
    for step in range(6):
        x, y = cases.global_batch(step, WORLD)
        cases.loss_fn(ref, x, y).backward()
        norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
        opt.step()
        opt.zero_grad()
    assert_all_ranks_equal_reference([r[0] for r in results], [p.detach() for p in ref.parameters()])
    for _, rank_norm in results:
        assert rank_norm == pytest.approx(float(norm), rel=1e-5)


def test_nan_on_one_rank_is_skipped_on_every_rank(world):
    for skipped, same_params, same_state in world.run(cases.run_nan_on_one_rank):
        assert skipped == 1 and same_params and same_state


def test_accumulation_of_4_micro_steps_equals_one_process_with_8x_batch(world):
    micro, steps, per_rank = 4, 3, 2
    results = world.run(cases.run_accumulation, micro, steps, per_rank)
    ref = cases.model()
    opt = torch.optim.AdamW(ref.parameters(), lr=0.01)
    for step in range(steps):
        xs, ys = zip(*(cases.global_batch(step, WORLD, micro=m, per_rank=per_rank) for m in range(micro)))
        # rank r's micro-batches are the r-th slices: the one-process batch is their union.
        cases.loss_fn(ref, torch.cat(xs), torch.cat(ys)).backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        opt.step()
        opt.zero_grad()
    assert_all_ranks_equal_reference([r[0] for r in results], [p.detach() for p in ref.parameters()])


def test_ranks_with_uneven_micro_batch_counts_agree_without_hanging(world):
    (sizes0, params0), (sizes1, params1) = world.run(cases.run_uneven_windows, [6, 3], 4)
    assert sizes0 == sizes1 == [3]
    for a, b in zip(params0, params1):
        assert torch.equal(a, b)


def test_plateau_and_early_stopping_decide_identically_on_every_rank(world):
    metrics = [1.0, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9]
    (lrs0, stops0), (lrs1, stops1) = world.run(cases.run_decisions, metrics)
    assert lrs0 == lrs1 and stops0 == stops1
    # The means are the metrics themselves: the decisions are those of one process seeing them.
    net = cases.model()
    opt = torch.optim.SGD(net.parameters(), lr=1.0)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=1, factor=0.5)
    expected = []
    for m in metrics:
        plateau.step(m)
        expected.append(opt.param_groups[0]["lr"])
    assert lrs0 == expected
    assert stops0 == [False, False, False, False, True, True, True]


@pytest.mark.parametrize("name", ["Ranger", "Lookahead(AdamW)", "SGD"])
def test_checkpoint_saved_at_world_2_resumes_at_world_1(world, tmp_path, name):
    root = str(tmp_path / "ckpt")
    uninterrupted = world.run(cases.run_save, name, 4, root, 3)[0]
    from dist_optim.distributed.checkpoint import load_checkpoint

    net = cases.model(seed=123)
    opt = CONFIGS[name](net.parameters(), backend="torch")
    start = load_checkpoint(root, net, opt)["step"]
    if "slow_buffer" in opt.state[next(net.parameters())]:
        assert opt.state[next(net.parameters())]["slow_buffer"].shape == next(net.parameters()).shape
    cases.train_reference(name, 3, WORLD, start=start, net=net, opt=opt)
    for a, b in zip(uninterrupted, [p.detach() for p in net.parameters()]):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("name", ["Ranger", "Adam"])
def test_checkpoint_saved_at_world_1_resumes_at_world_2(world, tmp_path, name):
    from dist_optim.distributed.checkpoint import save_checkpoint

    root = str(tmp_path / "ckpt")
    net, opt = cases.train_reference(name, 4, WORLD)
    save_checkpoint(root, net, opt, step=4)
    cases.train_reference(name, 3, WORLD, start=4, net=net, opt=opt)
    for rank_params in world.run(cases.run_resume, name, root, 3):
        for a, b in zip(rank_params, [p.detach() for p in net.parameters()]):
            torch.testing.assert_close(a, b, **TOL)


def test_hsdp_replicas_count_once_in_the_global_norm(world):
    results = world.run(cases.run_hsdp_norm, 0.05, 4)
    ref = cases.model()
    opt = torch.optim.AdamW(ref.parameters(), lr=0.01)
    norms = []
    for step in range(4):
        x, y = cases.global_batch(step, WORLD)
        cases.loss_fn(ref, x, y).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)))
        opt.step()
        opt.zero_grad()
    assert_all_ranks_equal_reference([r[0] for r in results], [p.detach() for p in ref.parameters()])
    for _, rank_norms in results:
        assert rank_norms == pytest.approx(norms, rel=1e-5)


def test_a_replicated_param_beside_shards_counts_once(world):
    extra = [3.0, 4.0]
    norms = world.run(cases.run_replicated_beside_shards, extra)
    ref = cases.model()
    x, y = cases.global_batch(0, WORLD)
    cases.loss_fn(ref, x, y).backward()
    sharded_sq = sum(float(p.grad.square().sum()) for p in ref.parameters())
    for norm in norms:
        assert norm == pytest.approx((sharded_sq + 25.0) ** 0.5, rel=1e-5)


def test_ddp_accumulation_equals_one_process_with_the_whole_batch(world):
    micro, steps, per_rank = 3, 2, 2
    results = world.run(cases.run_ddp_accumulation, micro, steps, per_rank)
    ref = cases.model()
    opt = torch.optim.AdamW(ref.parameters(), lr=0.01)
    for step in range(steps):
        xs, ys = zip(*(cases.global_batch(step, WORLD, micro=m, per_rank=per_rank) for m in range(micro)))
        cases.loss_fn(ref, torch.cat(xs), torch.cat(ys)).backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        opt.step()
        opt.zero_grad()
    assert_all_ranks_equal_reference(results, [p.detach() for p in ref.parameters()])
