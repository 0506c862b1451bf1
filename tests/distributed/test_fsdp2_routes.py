"""Every FSDP2 route a user takes at world 2, in that user's own idiom, against torch.optim in the
identical setup (same model, data and sharding, run in the same worker): torchtitan's per-block
``fully_shard`` without a mesh, bf16 mixed precision, CPU offload, frozen params and params without
a grad on some steps, tied embeddings, two param groups, a DCP round trip (nested and flattened
optimizer state dicts) and accelerate's FSDP2 parameter swap.

Our optimizers run with the default ``nonfinite="skip"``, so the grad statistics (one all-reduce
over the params' device meshes) run on every step, and with ``max_grad_norm`` small enough to clip
where a test says "clipping": torch's side then calls ``torch.nn.utils.clip_grad_norm_``.
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed import _route_cases as cases
from tests.multiproc import world_fixture

WORLD = 2
STEPS = 4  # > K = 3, so Ranger/Lookahead take a slow-weight sync
CLIP = 0.05  # the grad norms here are 0.6 to 3.4: every step clips

# Ours and torch.optim see the same grads bit for bit (same model, data, sharding and reduce-scatter);
# only the update's fp32 arithmetic is ordered differently (torch's RAdam rectification term and the
# written-out Lookahead interpolation, bias corrections as Python floats vs tensors): an ulp or two
# per step, so a relative 1e-6 (8 ulps) with an absolute floor of 1e-7 for elements near zero.
SAME_SETUP = dict(rtol=1e-6, atol=1e-7)
# Norms: our one fused sum of squares over the local shards vs torch's norm of per-param norms.
NORM_REL = 1e-6

world = world_fixture(WORLD)


def assert_same_as_torch(results, *, clipping: bool = False):
    cases.assert_same_as_torch(results, SAME_SETUP, NORM_REL, clip=CLIP if clipping else None)


def assert_resumed_exactly(params, state, params_r, state_r):
    """The uninterrupted run and the resumed one hold the same params and state, bit for bit."""
    assert params.keys() == params_r.keys() and state.keys() == state_r.keys()
    for n in params:
        assert torch.equal(params[n], params_r[n]), n
    for n in state:
        assert state[n].keys() == state_r[n].keys(), n
        for key in state[n]:
            assert torch.equal(state[n][key], state_r[n][key]), (n, key)


@pytest.mark.parametrize(
    "name,max_grad_norm",
    [("AdamW", None), ("AdamW", CLIP), ("SGD", CLIP), ("Ranger", CLIP), ("Lookahead(AdamW)", None)],
)
def test_per_block_fully_shard_without_a_mesh_equals_torch_optim(world, name, max_grad_norm):
    """torchtitan's idiom: ``fully_shard(block)`` per block, then ``fully_shard(model)``, no ``mesh=``:
    three equal DeviceMesh objects, which must count as one mesh."""
    results = world.run(cases.run_route_pair, name, STEPS, max_grad_norm=max_grad_norm)
    assert_same_as_torch(results, clipping=max_grad_norm is not None)


@pytest.mark.parametrize("name", ["AdamW", "Ranger"])
def test_bf16_mixed_precision_with_fp32_reduce_equals_torch_optim(world, name):
    """``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``: fp32 sharded params and grads,
    bf16 compute; the optimizer steps the fp32 shards."""
    results = world.run(cases.run_route_pair, name, STEPS, route="mixed_precision", max_grad_norm=CLIP)
    assert_same_as_torch(results, clipping=True)


@pytest.mark.parametrize("name", ["AdamW", "SGD"])
def test_cpu_offload_equals_torch_optim(world, name):
    results = world.run(cases.run_route_pair, name, STEPS, route="cpu_offload", max_grad_norm=CLIP)
    assert_same_as_torch(results, clipping=True)


@pytest.mark.parametrize("name", ["AdamW", "Ranger"])
def test_frozen_params_and_params_without_a_grad_on_some_steps_equal_torch_optim(world, name):
    """A frozen Linear handed to the optimizer anyway (grad always None) and a branch that only odd
    steps use (grad None on even steps, step 0 included, so its state starts late)."""
    results = world.run(cases.run_route_pair, name, STEPS, frozen=True, aux=True, max_grad_norm=CLIP)
    assert_same_as_torch(results, clipping=True)
    init = {n: p.detach() for n, p in cases.make_model(aux=True).named_parameters()}
    for rank_result in results:
        params, state, _ = rank_result["ours"]
        for frozen in ("blocks.0.up.weight", "blocks.0.up.bias"):
            assert torch.equal(params[frozen], init[frozen])  # never moved
            assert not state.get(frozen)  # and holds no state, not even slow weights
        assert int(state["aux.weight"]["step"]) == sum(cases.uses_aux(s) for s in range(STEPS))


@pytest.mark.parametrize("name", ["AdamW", "Ranger"])
def test_tied_embedding_and_output_weights_equal_torch_optim(world, name):
    results = world.run(cases.run_route_pair, name, STEPS, tied=True, max_grad_norm=CLIP)
    assert_same_as_torch(results, clipping=True)
    for rank_result in results:
        # One shared param, stepped once per step with the sum of both uses' grads.
        assert "head.weight" not in rank_result["ours"][0]
        assert int(rank_result["ours"][1]["embed.weight"]["step"]) == STEPS


@pytest.mark.parametrize("name", ["AdamW", "Lookahead(AdamW)"])
def test_two_param_groups_without_decay_on_norms_and_biases_equal_torch_optim(world, name):
    results = world.run(cases.run_route_pair, name, STEPS, two_groups=True, max_grad_norm=CLIP)
    assert_same_as_torch(results, clipping=True)
    # The groups matter: a single group (decay everywhere) moves the norms elsewhere.
    one_group = world.run(cases.run_reference_alone, name, STEPS, max_grad_norm=CLIP)[0][0]
    assert not torch.allclose(results[0]["ours"][0]["norm.weight"], one_group["norm.weight"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["AdamW", "Ranger"])
def test_nan_on_one_rank_is_skipped_on_every_rank_without_a_mesh(world, name):
    """nonfinite="skip" under per-block meshes: one rank's NaN skips the step everywhere, nothing moves."""
    results = world.run(cases.run_nan_on_the_last_rank, "per_block", name, "blocks.1.up.weight")
    for skipped, same_params, same_state in results:
        assert skipped == 1 and same_params and same_state


@pytest.mark.parametrize("flatten", [False, True], ids=["nested", "flattened"])
@pytest.mark.parametrize("name", ["AdamW", "Ranger", "Lookahead(AdamW)"])
def test_dcp_round_trip_resumes_exactly(world, tmp_path, name, flatten):
    """The user's own DCP calls: ``get_state_dict`` -> ``dcp.save``; a fresh model and optimizer,
    ``get_state_dict`` -> ``dcp.load`` -> ``set_state_dict``, with
    ``StateDictOptions(flatten_optimizer_state_dict=flatten)``. Resuming continues bit for bit."""
    results = world.run(cases.run_dcp_round_trip, name, str(tmp_path / "ckpt"), 4, 3, flatten, CLIP)
    for (params, state, skipped), (params_r, state_r, skipped_r) in results:
        assert skipped == skipped_r == 0
        assert_resumed_exactly(params, state, params_r, state_r)
        if name != "AdamW":
            assert all("slow_buffer" in state[n] for n in state)  # slow weights went through DCP


@pytest.mark.parametrize("name", ["AdamW", "Ranger"])
def test_dcp_round_trip_with_frozen_and_gradless_params_resumes_exactly(world, tmp_path, name):
    """A frozen Linear (never any state, not even Ranger's slow weights) and a branch whose state lags
    (grad on odd steps only) go through a flattened DCP round trip and resume bit for bit. (Saved
    after step 2, when the branch has state: DCP's load template comes from a zero-grad step over
    every trainable param, so a param still without state at save time fails ``dcp.load`` with
    "Missing key in checkpoint state_dict", for torch.optim just the same.)"""
    results = world.run(cases.run_dcp_round_trip, name, str(tmp_path / "ckpt"), 2, 3, True, CLIP, True, True)
    frozen = {"blocks.0.up.weight", "blocks.0.up.bias"}
    for (params, state, _), (params_r, state_r, _) in results:
        # torch's set_state_dict loads no optimizer state for a param with requires_grad=False (by
        # design, torch/distributed/checkpoint/state_dict.py), so we keep none for them: everything
        # else must come back as it was.
        assert_resumed_exactly(params, state, params_r, state_r)
        assert int(state_r["aux.weight"]["step"]) == sum(cases.uses_aux(s) for s in range(5))
        assert all(not state_r.get(n) for n in frozen)


@pytest.mark.parametrize("name,tied", [("AdamW", False), ("Ranger", False), ("AdamW", True)])
def test_accelerate_fsdp2_parameter_swap_equals_torch_optim(world, name, tied):
    """The optimizer is built on the plain model; accelerate's ``prepare`` swaps its params for
    placeholders, shards with ``fsdp2_prepare_model`` (per-block units, the embedding, the
    [final norm, head] tail, the root: no mesh) and hands it the sharded params through
    ``fsdp2_switch_optimizer_parameters``. Both optimizers go through exactly that."""
    results = world.run(cases.run_accelerate_swap, name, STEPS, CLIP, tied)
    assert_same_as_torch(results, clipping=True)
