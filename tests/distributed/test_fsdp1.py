"""FSDP1 (FullyShardedDataParallel, both use_orig_params settings) at world 2: the element-wise
optimizers step its flat shards and equal one process, global clipping included (tolerance as in
test_fsdp2: gradient reduction order)."""

from __future__ import annotations

import pytest
import torch

from tests.distributed import _fsdp_cases as cases
from tests.multiproc import world_fixture

WORLD = 2
world = world_fixture(WORLD)


@pytest.mark.parametrize("use_orig_params", [False, True])
@pytest.mark.parametrize("name", ["AdamW", "Ranger", "SGD", "Adagrad"])
def test_fsdp1_equals_one_process(world, name, use_orig_params):
    results = world.run(cases.run_fsdp1, name, 6, use_orig_params, max_grad_norm=0.1)
    ref, ref_opt = cases.train_reference(name, 6, WORLD, max_grad_norm=0.1)
    for params, norm in results:
        assert norm == pytest.approx(ref_opt.last_grad_norm, rel=1e-5)
        for a, b in zip(params, ref.parameters()):
            torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)
