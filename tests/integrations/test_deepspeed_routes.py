"""Every way our optimizer reaches a DeepSpeed engine equals DeepSpeed's built-in AdamW (torch_adam)
in the identical set-up, at world 2 (gloo, DS_ACCELERATOR=cpu), with the data giving each rank a
different local gradient norm, so clipping by a local norm would show.

Tolerances, fp32 master weights after 4 steps:
- fp32: rtol 1e-5 / atol 1e-6: the two clip coefficients come from the same norm summed in another
  order (ours in fp32 over flat partitions, DeepSpeed's in fp64), as for FSDP2 against one process;
- bf16 / fp16 compute: atol 2e-4, about 2% of the lr: the forward and backward run in half
  precision on weights rounded from the masters, so a last-bit difference in a master weight can
  flip one rounded weight and move the next gradients by a half-precision ulp. A per-rank clip
  (the bug this guards) moves the weights by 1e-2 here.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("deepspeed", reason="pip install --no-build-isolation deepspeed")

from tests.integrations import _ds_routes as routes  # noqa: E402
from tests.multiproc import world_fixture  # noqa: E402

WORLD = 2
CLIP = 0.05  # below every rank's local gradient norm on this data
world = world_fixture(WORLD)


def tol(precision: str) -> dict:
    return dict(rtol=1e-5, atol=1e-6) if precision == "fp32" else dict(rtol=0.0, atol=2e-4)


@pytest.fixture(scope="module")
def builtin(world):
    """DeepSpeed's own AdamW runs, computed once per set-up."""
    cache: dict = {}

    def get(stage, precision, max_norm, **kw):
        key = (stage, precision, max_norm, tuple(sorted((k, repr(v)) for k, v in kw.items())))
        if key not in cache:
            cache[key] = world.run(routes.run, "builtin", stage, precision, max_norm, **kw)
        return cache[key]

    return get


def assert_same(ours, ref, precision):
    for (a_params, a_lrs, _, a_norm), (b_params, b_lrs, _, b_norm) in zip(ours, ref):
        assert a_lrs == b_lrs
        if a_norm is not None and b_norm is not None:  # what the engine reports (HF Trainer, Megatron log it)
            assert a_norm == pytest.approx(b_norm, rel=1e-4)
        for a, b in zip(a_params, b_params):
            torch.testing.assert_close(a, b, **tol(precision))


# Every precision set-up DeepSpeed accepts (it has no ZeRO-0 with bf16 and fp32 accumulation).
SET_UPS = [(stage, precision) for stage in (0, 1, 2, 3) for precision in ("fp32", "bf16", "bf16+fp32acc", "fp16")
           if (stage, precision) != (0, "bf16+fp32acc")]


@pytest.mark.parametrize("max_norm", [None, CLIP])
@pytest.mark.parametrize("stage,precision", SET_UPS)
def test_plain_deepspeed_initialize_with_our_optimizer_equals_builtin(world, builtin, stage, precision, max_norm):
    ours = world.run(routes.run, "client", stage, precision, max_norm)
    assert_same(ours, builtin(stage, precision, max_norm), precision)


@pytest.mark.parametrize("stage", [1, 2])
def test_fp16_steps_that_grow_the_loss_scale_clip_as_builtin(world, builtin, stage):
    ours = world.run(routes.run, "client", stage, "fp16-growing", CLIP)
    assert_same(ours, builtin(stage, "fp16-growing", CLIP), "fp16")


def test_clipping_is_active_in_these_set_ups(builtin):
    clipped = builtin(2, "fp32", CLIP)[0][0]
    unclipped = builtin(2, "fp32", None)[0][0]
    assert max((a - b).abs().max().item() for a, b in zip(clipped, unclipped)) > 1e-3


@pytest.mark.parametrize("route,stage", [("config", 1), ("config", 3), ("wrapper", 2), ("config", 2)])
def test_ds_config_type_and_our_wrapper_equal_builtin(world, builtin, route, stage):
    ours = world.run(routes.run, route, stage, "bf16", CLIP)
    assert_same(ours, builtin(stage, "bf16", CLIP), "bf16")


@pytest.mark.parametrize("stage", [2, 3])
def test_cpu_offload_needs_no_force_flag_and_equals_builtin(world, builtin, stage):
    ours = world.run(routes.run, "client", stage, "fp32", CLIP, offload=True)
    assert_same(ours, builtin(stage, "fp32", CLIP, offload=True), "fp32")


@pytest.mark.parametrize("stage", [1, 3])
def test_gradient_accumulation_steps_equal_builtin(world, builtin, stage):
    ours = world.run(routes.run, "client", stage, "fp32", CLIP, accum=2)
    assert_same(ours, builtin(stage, "fp32", CLIP, accum=2), "fp32")


@pytest.mark.parametrize(
    "scheduler",
    [
        {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 0.01, "warmup_num_steps": 3}},
        {"type": "WarmupCosineLR", "params": {"total_num_steps": 6, "warmup_num_steps": 2}},
    ],
)
def test_a_ds_config_scheduler_drives_our_lr(world, builtin, scheduler):
    ours = world.run(routes.run, "client", 2, "fp32", CLIP, scheduler=scheduler)
    lrs = ours[0][1]
    assert len(set(lrs)) > 1, "the schedule must move the lr"
    assert_same(ours, builtin(2, "fp32", CLIP, scheduler=scheduler), "fp32")


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_engine_checkpoint_continues_bit_for_bit(world, tmp_path, stage):
    root = str(tmp_path / "ckpt")
    straight = world.run(routes.run_checkpoint, "client", stage, root, False)
    resumed = world.run(routes.run_checkpoint, "client", stage, root, True)
    for a_params, b_params in zip(straight, resumed):
        for a, b in zip(a_params, b_params):
            assert torch.equal(a, b)


@pytest.mark.parametrize(
    "stage,precision,kw,expected",
    [
        (0, "fp32", {}, (0.0, CLIP, "skip", True, "AdamW")),
        (1, "fp32", {}, (0.0, CLIP, "skip", True, "DeepSpeedZeroOptimizer")),
        # Megatron-DeepSpeed's bf16 set-up: DeepSpeed needs its norm there, ours still clips once.
        (1, "bf16+fp32acc", {}, (0.0, CLIP, "skip", True, "BF16_Optimizer")),
        (2, "fp32", {"offload": True}, (0.0, CLIP, "skip", True, "DeepSpeedZeroOptimizer")),
        (2, "fp32", {"zero_extra": {"compute_grad_norm": True}}, (0.0, CLIP, "skip", True, "DeepSpeedZeroOptimizer")),
        (3, "fp32", {}, (CLIP, None, "apply", True, "DeepSpeedZeroOptimizer_Stage3")),
    ],
)
def test_clipping_has_one_owner_in_every_set_up(world, stage, precision, kw, expected):
    assert world.run(routes.ownership, stage, precision, **kw) == [expected] * WORLD


@pytest.mark.parametrize("into", ["ours", "deepspeed"])
@pytest.mark.parametrize("stage,precision", [(1, "fp32"), (2, "fp32"), (1, "bf16+fp32acc")])
def test_resuming_a_run_where_the_other_side_clipped_keeps_this_runs_clipping(world, tmp_path, stage, precision, into):
    """These wrappers restore their clip value from the checkpoint: into ours clipping, DeepSpeed's
    1.0 would clip a second time; into DeepSpeed clipping, the 0 saved where ours clipped would
    clip nothing. The steps after loading equal those with this run's value put back."""
    results = world.run(routes.run_resume_across_clipping_owners, stage, precision, str(tmp_path), into)
    for loaded, put_back, clip in results:
        assert clip == (0.0 if into == "ours" else 1.0)
        for a, b in zip(loaded, put_back):
            assert torch.equal(a, b)


@pytest.mark.parametrize("how", ["late", "by hand"])
@pytest.mark.parametrize("stage,precision", [(0, "fp32"), (0, "bf16"), (1, "bf16+fp32acc"), (2, "fp32")])
def test_ours_and_deepspeed_both_clipping_after_initialize_is_refused(world, stage, precision, how):
    """Refused before DeepSpeed touches the grads (at ZeRO-0 in fp32 the engine clips them before
    stepping ours)."""
    for error, grads_untouched in world.run(routes.both_clipping_after_initialize, stage, precision, how):
        assert "while DeepSpeed clips too" in error
        assert grads_untouched


def test_without_our_clipping_deepspeeds_config_stands(world):
    assert world.run(routes.deepspeed_clipping_without_ours) == [1.0] * WORLD  # DeepSpeed's default


def test_misuse_is_refused_with_what_to_do(world):
    errors = world.run(routes.refused_routes)[0]
    assert "gradient_clipping: 0.5 together with max_grad_norm=0.05" in errors["both clippings"]
    assert "takes no closure" in errors["lbfgs"]
    assert "Invalid optimizer type: 'dist_optim.Adamax' (valid: dist_optim.SGD" in errors["unknown type"]
    assert "Invalid nonfinite: 'raise' under ZeRO-3" in errors["raise on zero3"]
    assert "Invalid nonfinite: 'raise' under ZeRO-1/2 with fp32" in errors["raise on zero1"]
    assert "Invalid torch_autocast: dtype float16 under ZeRO-1/2" in errors["fp16 autocast"]


def test_a_sharded_optimizer_without_its_group_refuses_to_clip_per_rank(world):
    for swapped, own in world.run(routes.swapped_params_step):
        assert own == ""
        assert "process_group=None" in swapped and "per rank" in swapped


@pytest.mark.parametrize("stage", [1, 3])
def test_accelerate_deepspeed_plugin_with_hf_style_optimizer_and_scheduler_equals_builtin(world, builtin, stage):
    """``Accelerator(deepspeed_plugin=...)`` and ``prepare(model, opt, sched)``, as HF's Trainer hands
    over ``optimizers=(opt, sched)``; accelerate's DeepSpeed path runs on CPU here."""
    ours = world.run(routes.run_accelerate, stage, "bf16", CLIP)
    assert_same(ours, builtin(stage, "bf16", CLIP), "bf16")


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_a_skipped_step_is_skipped_for_the_engine_and_the_norm_is_reported(world, stage):
    """No scheduler step and engine.skipped_steps counts it; get_global_grad_norm() gives the norm
    (at ZeRO-0 DeepSpeed's own optimizer reports none, so ZeRO-1's figure, the same norm, is used).
    In fp32 ZeRO-1/2's DeepSpeed skips before ours runs; at ZeRO-0 ours skips."""
    results = world.run(routes.run_skip_reported, stage)
    ref_norm = world.run(routes.run, "builtin", max(stage, 1), "fp32", CLIP, steps=1)
    for skipped, lrs, norm, ours_skipped in results:
        assert skipped == 1 and ours_skipped == (1 if stage == 0 else 0)
        assert lrs[1] == lrs[0]  # the skipped step did not advance the warm-up
        assert norm == pytest.approx(ref_norm[0][3], rel=1e-5)


@pytest.mark.parametrize("stage", [1, 2])
def test_bf16_step_ours_skips_counts_once_over_param_groups(world, stage):
    """bf16 with check_grad_overflow off: DeepSpeed goes on with a non-finite norm and steps ours
    once per param group; ours skips every group and counts one skipped step."""
    for skipped, lrs, _, ours_skipped in world.run(routes.run_skip_reported, stage, "bf16-unchecked", True):
        assert (skipped, ours_skipped) == (1, 1)
        assert lrs[1] == lrs[0]


def test_an_optimizer_factory_under_offload_needs_no_force_flag(world, builtin):
    ours = world.run(routes.run_callable_offload, 2)
    ref = builtin(2, "fp32", CLIP, offload=True)
    for (a_params, *_), (b_params, *_) in zip(ours, ref):
        for a, b in zip(a_params, b_params):
            torch.testing.assert_close(a, b, **tol("fp32"))
