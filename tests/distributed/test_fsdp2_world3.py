"""FSDP2 at world 3, where Linear(7, 2)'s two rows leave one rank with an empty shard: that rank
still joins every collective, holds state with the same keys, and the run equals one process
(tolerance as in test_fsdp2: gradient reduction order)."""

from __future__ import annotations

import pytest
import torch

from tests.distributed import _fsdp_cases as cases
from tests.multiproc import world_fixture

WORLD = 3
world = world_fixture(WORLD)


@pytest.mark.parametrize("name", ["Ranger", "AdamW", "SGD", "RMSprop"])
def test_empty_shard_rank_takes_part_and_run_equals_one_process(world, name):
    results = world.run(cases.run_optimizer, name, 7, max_grad_norm=0.1)
    ref, _ = cases.train_reference(name, 7, WORLD, max_grad_norm=0.1)
    numels = [r[2] for r in results]
    assert any(0 in n for n in numels), numels  # some rank really holds an empty shard
    for params, keys, _, skipped in results:
        assert keys == results[0][1] and skipped == 0
        for a, b in zip(params, ref.parameters()):
            torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)


def test_nan_on_the_last_rank_is_skipped_everywhere(world):
    for skipped, same_params, same_state in world.run(cases.run_nan_on_one_rank):
        assert skipped == 1 and same_params and same_state
