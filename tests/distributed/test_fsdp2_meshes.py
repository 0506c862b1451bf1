"""2-D device meshes at world 4, in the user's own idiom, with clipping active: HSDP
(``init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))``) and TP x FSDP (a
("dp", "tp") mesh, ``parallelize_module`` with Colwise/RowwiseParallel on the "tp" sub-mesh, then
``fully_shard`` per block and on the root over the "dp" sub-mesh). Under TP x FSDP each TP-sharded
param has its own (equal) 2-D mesh and placements mixing (strided) shards and replicas, while the
norms, the embedding and the head are DTensors on the 1-D "dp" mesh, replicated over "tp".

Each layout is compared with torch.optim + clipping in the identical setup (grad norms included),
and with one process training on the whole global batch.
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed import _route_cases as cases
from tests.multiproc import world_fixture

WORLD = 4
STEPS = 4  # > K = 3: Ranger takes a slow-weight sync
CLIP = 0.05  # grad norms here are 0.4 to 1.2: every step clips
N_DATA = {"hsdp": 4, "tp": 2}  # data-parallel ranks: 2 replicas x 2 shards; 2 dp groups of 2 TP ranks

# Same grads bit for bit on both sides; the clip coefficient may differ by an ulp (our fused sum of
# squares over local shards vs torch's norm of per-param DTensor norms, reduced in another order),
# and the update's fp32 ops are ordered differently (see test_fsdp2_routes): a relative 1e-6 with
# an absolute floor of 1e-7 for elements near zero.
SAME_SETUP = dict(rtol=1e-6, atol=1e-7)
NORM_REL = 1e-6
# Against one process: the grads themselves are reduced in another order (reduce-scatter and TP's
# all-reduce vs one backward over the whole batch), an ulp per step that the updates carry, as in
# test_fsdp2.py.
ONE_PROCESS = dict(rtol=1e-5, atol=1e-6)
ONE_PROCESS_NORM_REL = 1e-5

world = world_fixture(WORLD)


@pytest.fixture(scope="module")
def runs(world):
    """Each (layout, optimizer) trained once on the world; the tests below read what they need."""
    cache = {}

    def get(layout, name):
        if (layout, name) not in cache:
            cache[layout, name] = world.run(cases.run_mesh_pair, layout, name, STEPS, CLIP)
        return cache[layout, name]

    return get


def assert_same_as_torch(results):
    cases.assert_same_as_torch(results, SAME_SETUP, NORM_REL, clip=CLIP)


def assert_same_as_one_process(results, layout, name):
    ref_params, ref_norms = cases.one_process(name, STEPS, N_DATA[layout], CLIP)
    for rank_result in results:
        params, _, norms = rank_result["ours"]
        for n in ref_params:
            torch.testing.assert_close(params[n], ref_params[n], **ONE_PROCESS, msg=lambda m: f"{n}: {m}")
        assert norms == pytest.approx(ref_norms, rel=ONE_PROCESS_NORM_REL)


@pytest.mark.parametrize("name", ["AdamW", "Ranger"])
def test_hsdp_with_clipping_equals_torch_optim(runs, name):
    """Replicas along "replicate" count once in the global norm; shards along "shard" all count."""
    results = runs("hsdp", name)
    assert set(results[0]["ours_layout"].values()) == {(2, (True, False))}  # (Replicate, Shard(0))
    assert_same_as_torch(results)


@pytest.mark.parametrize("name", ["AdamW", "Ranger"])
def test_hsdp_with_clipping_equals_one_process(runs, name):
    assert_same_as_one_process(runs("hsdp", name), "hsdp", name)


@pytest.mark.parametrize("name", ["AdamW", "Ranger"])
def test_tp_fsdp_with_clipping_equals_torch_optim(runs, name):
    """TP-sharded weights (2-D meshes, strided shards, a replicated row-parallel bias) beside
    DP-only norms: every element counts once in the norm; every shard steps like torch.optim's."""
    results = runs("tp", name)
    layout = results[0]["ours_layout"]
    assert layout["blocks.0.up.weight"] == layout["blocks.0.down.weight"] == (2, (False, False))  # dp x tp shards
    assert layout["blocks.0.down.bias"] == (2, (False, True))  # row-parallel bias: replicated over tp
    assert layout["blocks.0.norm.weight"] == layout["norm.bias"] == layout["embed.weight"] == (1, (False,))  # dp only
    assert_same_as_torch(results)


@pytest.mark.parametrize("name", ["AdamW", "Ranger"])
def test_tp_fsdp_with_clipping_equals_one_process(runs, name):
    assert_same_as_one_process(runs("tp", name), "tp", name)


@pytest.mark.parametrize(
    "layout,param",
    [
        ("tp", "blocks.0.norm.weight"),
        ("tp", "blocks.0.down.bias"),
        ("tp", "blocks.0.up.weight"),
        ("hsdp", "norm.weight"),
    ],
)
def test_nan_on_one_rank_is_skipped_on_every_rank(world, layout, param):
    """The last rank sits at coordinate 1 of "tp" ("replicate" for HSDP): its copy of a DP-only norm,
    of the row-parallel bias or of an HSDP param is a replica the norm does not count, yet its NaN
    must make every rank skip; a NaN in a TP shard likewise. Params and state stay as they were."""
    results = world.run(cases.run_nan_on_the_last_rank, layout, "AdamW", param)
    for skipped, same_params, same_state in results:
        assert skipped == 1 and same_params and same_state


@pytest.mark.parametrize("line_search_fn", [None, "strong_wolfe"])
def test_lbfgs_under_hsdp_counts_each_replica_once_and_equals_one_process(world, line_search_fn):
    """L-BFGS's inner products follow the placements as the grad statistics do: the two HSDP
    replicas of a shard count once. fp64, rtol 1e-8 as in test_lbfgs_fsdp.py."""
    from tests.distributed import _fsdp_cases

    kw = dict(lr=1, max_iter=4, history_size=3, line_search_fn=line_search_fn)
    results = world.run(_fsdp_cases.run_lbfgs, 3, hsdp=True, **kw)
    ref_params, ref_losses, ref_evals = _fsdp_cases.lbfgs_reference(3, WORLD, **kw)
    for params, losses, evals, _ in results:  # (HSDP's own replica all-reduces run inside backward)
        for a, b in zip(params, ref_params):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
        assert losses == pytest.approx(ref_losses, rel=1e-8)
        assert evals == ref_evals


def test_pipeline_stages_need_their_group_and_then_clip_by_the_norm_over_all_stages(world):
    """Stages on a ("pp", "dp") mesh hold different params: without process_group= the norm over one
    stage would be partial, so step() raises; with the world group it is the norm over both."""
    from tests.distributed import _zero_pp_cases

    for err in world.run(_zero_pp_cases.run_pipeline_stages, None, CLIP):
        assert "pipeline stages" in err and "process_group=" in err
    for ours, total in world.run(_zero_pp_cases.run_pipeline_stages, "world", CLIP):
        assert ours == pytest.approx(total, rel=1e-6)


@pytest.mark.parametrize("layout", ["per_block", "hsdp", "tp"])
def test_one_step_with_clipping_is_one_all_reduce_over_the_world(world, layout):
    """Norm and non-finite flag travel together: one all-reduce per step, over every rank the
    params' meshes span (the world here), whatever the layout."""
    assert world.run(cases.step_collectives, layout) == [[("all_reduce", WORLD)]] * WORLD
