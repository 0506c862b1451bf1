"""bf16 updates under FSDP2 at world 2 (gloo): uneven shards, a rank with an empty shard, int8
state combined, DCP checkpoints.

- "nearest" and "kahan" are element-wise and need no rank: each rank's shards equal the rows of a
  one-process run on the full params, bit for bit (the gradients are the same bits: see
  _bf16_fsdp_cases), Kahan buffers and bf16 slow weights included.
- "stochastic" rounds with streams seeded per rank and indexed within the local shard: each rank's
  shards equal a one-process emulation stepping that rank's shards with that rank's stream bases,
  bit for bit; and the same replicated param rounds differently on the two ranks.
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed import _bf16_fsdp_cases as cases
from tests.optim._factories import torch_equal_bits
from tests.multiproc import world_fixture

WORLD = 2
world = world_fixture(WORLD)


def assert_rows_equal(results, whole_params, whole_state):
    """Each rank's local params and state are its rows of the one-process tensors, bit for bit."""
    for rank, (local_params, local_state) in enumerate(results):
        for i, (local, full) in enumerate(zip(local_params, whole_params)):
            assert torch_equal_bits(local, cases.rows(full, rank, WORLD)), (rank, i)
        for i, (state, full_state) in enumerate(zip(local_state, whole_state)):
            assert state.keys() == full_state.keys(), (rank, i)
            for key in ("kahan_comp", "slow_buffer", "exp_avg", "exp_avg_sq"):
                if key in state and not key + "_absmax" in state:
                    assert torch_equal_bits(state[key], cases.rows(full_state[key], rank, WORLD)), (rank, i, key)


@pytest.mark.parametrize("name, mode", [("AdamW", "nearest"), ("AdamW", "kahan"), ("Ranger", "kahan")])
def test_nearest_and_kahan_equal_one_process_bit_for_bit(world, name, mode):
    results = world.run(cases.run_sharded, name, mode)
    whole_params, whole_state = cases.run_whole(name, mode)
    assert_rows_equal(results, whole_params, whole_state)
    # shards: uneven rows, and an empty one on rank 1
    assert [tuple(p.shape) for p in results[0][0]] == [(36, 64), (36,), (1, 71), (1,)]
    assert [tuple(p.shape) for p in results[1][0]] == [(35, 64), (35,), (0, 71), (0,)]
    if mode == "kahan":
        for _, state in results:
            assert all(s["kahan_comp"].dtype == torch.bfloat16 for s in state)
    if name == "Ranger":
        for _, state in results:
            assert all(s["slow_buffer"].dtype == torch.bfloat16 for s in state)


def test_kahan_with_int8_state_equals_one_process_bit_for_bit(world):
    """The int8 blocks of rank 1 start where one process's do (rank 0 holds 9 whole blocks), so the
    codes, absmax, buffers and params are the same bits."""
    results = world.run(cases.run_sharded, "AdamW", "kahan", "int8")
    whole_params, whole_state = cases.run_whole("AdamW", "kahan", "int8")
    for rank, (local_params, local_state) in enumerate(results):
        for i, (local, full) in enumerate(zip(local_params, whole_params)):
            assert torch_equal_bits(local, cases.rows(full, rank, WORLD)), (rank, i)
        assert torch_equal_bits(local_state[0]["kahan_comp"], cases.rows(whole_state[0]["kahan_comp"], rank, WORLD))
        lo = 0 if rank == 0 else 2304
        codes = local_state[0]["exp_avg"]
        assert codes.dtype == torch.uint8
        assert torch.equal(codes, whole_state[0]["exp_avg"][lo:lo + codes.numel()])


@pytest.mark.parametrize("name, state_dtype", [("AdamW", "fp32"), ("AdamW", "int8"), ("Ranger", "fp32")])
def test_stochastic_equals_a_per_rank_emulation(world, name, state_dtype):
    results = world.run(cases.run_sharded, name, "stochastic", state_dtype)
    emulated = [cases.emulate_rank(rank, WORLD, name, "stochastic", state_dtype) for rank in range(WORLD)]
    for rank, ((local_params, local_state), (emu_params, emu_state)) in enumerate(zip(results, emulated)):
        for i, (a, b) in enumerate(zip(local_params, emu_params)):
            assert torch_equal_bits(a, b), (rank, i)
        for i, (a, b) in enumerate(zip(local_state, emu_state)):
            assert a.keys() == b.keys()
            for key in a:
                assert torch_equal_bits(a[key], b[key]), (rank, i, key)
    # the emulation is not the one-process run: the streams depend on the rank and the local index
    whole_params, _ = cases.run_whole(name, "stochastic", state_dtype)
    assert not torch.equal(results[1][0][0], cases.rows(whole_params[0], 1, WORLD))


def test_stochastic_rounding_differs_per_rank(world):
    a, b = world.run(cases.run_replicated)
    assert not torch.equal(a, b)
    again = world.run(cases.run_replicated)
    assert torch_equal_bits(again[0], a) and torch_equal_bits(again[1], b)


@pytest.mark.parametrize("name, mode", [("Ranger", "kahan"), ("AdamW", "stochastic")])
def test_dcp_resume_is_bit_exact(world, tmp_path, name, mode):
    root = str(tmp_path / "ckpt")
    uninterrupted = world.run(cases.run_save_and_go_on, root, name, mode, 3, 3)
    resumed = world.run(cases.run_resume, root, name, mode, 3)
    for (params_a, state_a), (params_b, state_b, loaded) in zip(uninterrupted, resumed):
        for a, b in zip(params_a, params_b):
            assert torch_equal_bits(a, b)
        for a, b in zip(state_a, state_b):
            assert a.keys() == b.keys()
            for key in a:
                assert torch_equal_bits(a[key], b[key]), key
        if mode == "kahan":
            assert loaded["kahan_comp"] == torch.bfloat16 and loaded["slow_buffer"] == torch.bfloat16
