"""Our optimizers under DeepSpeed ZeRO-1/2/3 at world 2 (gloo, DS_ACCELERATOR=cpu) equal one process;
the ds_config plug-in and the client-optimizer paths; clipping ownership; non-finite agreement;
checkpoints resume bit-identically; config errors are clear.

Tolerance against one process: rtol 1e-5 / atol 1e-6 (gradient reduction order, as for FSDP2).
ZeRO-3 runs with sub_group_size=8, so each rank's partition spans several sub-groups and step()
is called several times per global step.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("deepspeed", reason="pip install --no-build-isolation deepspeed")

import dist_optim  # noqa: E402
import dist_optim.deepspeed as dod  # noqa: E402
from tests.integrations import _ds_cases as cases  # noqa: E402
from tests.multiproc import world_fixture  # noqa: E402

WORLD = 2
TOL = dict(rtol=1e-5, atol=1e-6)
world = world_fixture(WORLD)


def assert_equal_reference(results, ref):
    for params in results:
        for a, b in zip(params, ref):
            torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.parametrize("name", sorted(cases.OPT_SPECS))
def test_every_optimizer_under_every_zero_stage_equals_one_process(world, stage, name):
    results = world.run(cases.run_zero, stage, name, 5)
    assert_equal_reference(results, cases.reference(name, 5, WORLD))


@pytest.mark.parametrize("stage", [2, 3])
def test_client_optimizer_path_needs_no_untested_flag(world, stage):
    results = world.run(cases.run_client_optimizer, stage, 4)
    assert_equal_reference(results, cases.reference("Ranger", 4, WORLD))


@pytest.mark.parametrize(
    "groups,offload", [(False, False), (True, False), (True, True)], ids=["one-group", "two-groups", "two-groups-offload"]
)
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_max_grad_norm_equals_clip_grad_norm_and_applies_once(world, stage, groups, offload):
    """One global clip coefficient, also over two param groups (HF's decay split), which DeepSpeed
    ZeRO-1/2 steps one at a time."""
    cfg = {"zero_optimization": {"stage": stage, "offload_optimizer": {"device": "cpu"}}} if offload else {}
    if offload and stage == 3:
        cfg["zero_optimization"].update(sub_group_size=8, stage3_param_persistence_threshold=0)
    results = world.run(cases.run_clipping, stage, 4, 0.05, groups=groups, **cfg)
    assert_equal_reference([r[0] for r in results], clipped_adamw_reference(4, 0.05, groups=groups))


def clipped_adamw_reference(steps: int, max_norm: float, *, groups: bool) -> list[torch.Tensor]:
    """torch.optim.AdamW after clip_grad_norm_ over the whole model, in one process."""
    net = cases.model()
    opt = torch.optim.AdamW(cases.decay_groups(net) if groups else net.parameters(), lr=0.01)
    for step in range(steps):
        x, y = cases.global_batch(step, WORLD)
        cases.loss_fn(net, x, y).backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), max_norm)
        opt.step()
        opt.zero_grad()
    return [p.detach() for p in net.parameters()]


@pytest.mark.parametrize("stage", [1, 2])
def test_max_grad_norm_set_after_initialize_still_clips_by_the_global_norm(world, stage):
    """Clipping turned on after deepspeed.initialize, over two param groups that ZeRO-1/2 steps one
    at a time: still one global clip coefficient, not one per group."""
    results = world.run(cases.run_clipping, stage, 4, 0.05, groups=True, late=True)
    assert_equal_reference([r[0] for r in results], clipped_adamw_reference(4, 0.05, groups=True))


def test_checks_set_after_initialize_under_zero3_are_refused(world):
    """ZeRO-3 steps ours once per sub-group: checks turned on after initialize would decide per
    sub-group (both clipping after initialize: test_deepspeed_routes)."""
    for result in world.run(cases.run_clipping, 3, 1, 0.05, groups=True, late=True):
        assert "set on the optimizer after deepspeed.initialize under ZeRO-3" in result


@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.parametrize("name", ["Ranger", "Lookahead(AdamW)"])
def test_several_param_groups_step_once_and_skip_together(world, stage, name):
    """Two param groups (DeepSpeed steps ours once per group at ZeRO-1/2) and our clipping, a NaN in
    one bias's grad on one rank at step 2: the Lookahead counters advance once per step, and the NaN
    step is skipped in both groups."""
    results = world.run(cases.run_zero, stage, name, 6, groups=True, nan_at=2, nan_in="bias", max_grad_norm=0.05)
    assert_equal_reference([r[0] for r in results], cases.reference(name, 6, WORLD, groups=True, skip_at=2, max_grad_norm=0.05))
    assert [r[1:] for r in results] == [(0, 1)] * WORLD  # fp32: DeepSpeed skips, ours never sees the step


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_nan_on_one_rank_skips_the_step_everywhere(world, stage):
    assert world.run(cases.run_nan, stage) == [True] * WORLD


@pytest.mark.parametrize("stage,name", [(2, "Ranger"), (3, "Ranger"), (1, "AdamW")])
def test_checkpoint_resume_continues_bit_identically(world, tmp_path, stage, name):
    root = str(tmp_path / "ds")
    straight = world.run(cases.run_checkpoint, stage, name, root, 3, 3, False)
    resumed = world.run(cases.run_checkpoint, stage, name, root, 3, 3, True)
    for a_params, b_params in zip(straight, resumed):
        for a, b in zip(a_params, b_params):
            assert torch.equal(a, b)


# --- configuration, no processes needed ------------------------------------------------------------

def _params():
    return [torch.nn.Parameter(torch.zeros(3))]


def test_ds_config_lists_become_tuples_and_types_resolve():
    opt = dod.build_from_config({"type": "dist_optim.Ranger", "params": {"betas": [0.9, 0.99], "k": 4}}, _params())
    assert isinstance(opt, dist_optim.Ranger) and opt.param_groups[0]["betas"] == (0.9, 0.99)
    la = dod.build_from_config(
        {"type": "dist_optim.Lookahead", "params": {"optimizer": {"type": "RAdam", "params": {"lr": 0.1}}, "k": 3}}, _params()
    )
    assert isinstance(la, dist_optim.Lookahead) and isinstance(la.optimizer, dist_optim.RAdam) and la.k == 3


def test_unknown_type_lists_the_valid_names():
    with pytest.raises(ValueError, match=r"Invalid optimizer type: 'dist_optim.Adamax' \(valid: dist_optim.SGD, .*dist_optim.Lookahead\)"):
        dod.build_from_config({"type": "dist_optim.Adamax"}, _params())


def test_lbfgs_is_refused_in_a_ds_config():
    with pytest.raises(ValueError, match="takes no closure"):
        dod.build_from_config({"type": "dist_optim.LBFGS"}, _params())


world1 = world_fixture(1)


@pytest.mark.parametrize("name", ["Ranger", "SGD", "RMSprop"])
def test_zero2_world2_checkpoint_resumes_at_world1_through_the_universal_form(world, world1, tmp_path, name):
    """Slow weights, momentum buffers, centred averages and the counters all cross the resharding;
    tolerance as for one process (the world-1 run reduces gradients in another order)."""
    from dist_optim.integrations.ds_universal import ds_to_universal

    root = tmp_path / "ds"
    uninterrupted = world.run(cases.run_universal_save, name, str(root), 3, 3)
    ds_to_universal(root / "saved", tmp_path / "universal")
    (resumed,) = world1.run(cases.run_universal_load, name, str(tmp_path / "universal"), 3, 3, WORLD)
    for a, b in zip(uninterrupted[0], resumed):
        torch.testing.assert_close(a, b, **TOL)


def test_universal_refuses_a_zero3_checkpoint(world, tmp_path):
    from dist_optim.integrations.ds_universal import ds_to_universal

    world.run(cases.run_checkpoint, 3, "AdamW", str(tmp_path / "z3"), 1, 0, False)
    with pytest.raises(ValueError, match="ZeRO stage 3"):
        ds_to_universal(tmp_path / "z3" / "ckpt", tmp_path / "u")


def test_a_crash_mid_save_leaves_the_previous_checkpoint_loadable(world, tmp_path):
    for name, step, at_two, loaded in world.run(cases.run_atomic_save_crash, str(tmp_path / "ds")):
        assert (name, step) == ("step_00000002", 2)
        for a, b in zip(at_two, loaded):
            assert torch.equal(a, b)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_world_1_equals_one_process(world1, stage):
    (params,) = world1.run(cases.run_zero, stage, "Ranger", 4)
    for a, b in zip(params, cases.reference("Ranger", 4, 1)):
        torch.testing.assert_close(a, b, **TOL)
