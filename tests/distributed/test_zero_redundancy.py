"""torch's ZeroRedundancyOptimizer with ours inside (each rank's local optimizer steps a disjoint
share of the params) clips by the global norm, as torch.optim + clip_grad_norm_ under DDP does.

Tolerance rtol 1e-6 / atol 1e-7, norms rel 1e-6: the same grads on both sides; the norm is summed
over the shares in another order and the update's fp32 ops are ordered differently."""

from __future__ import annotations

import pytest
import torch

from tests.distributed import _zero_pp_cases as cases
from tests.multiproc import world_fixture

world = world_fixture(2)
CLIP = 0.05


def test_zero_redundancy_optimizer_with_ours_clips_by_the_global_norm(world):
    ours = world.run(cases.run_zero_redundancy, True, CLIP)
    ref = world.run(cases.run_zero_redundancy, False, CLIP)
    for (params, norms), (ref_params, ref_norms) in zip(ours, ref):
        assert min(ref_norms) > CLIP  # clipping really was active
        assert norms == pytest.approx(ref_norms, rel=1e-6)
        for a, b in zip(params, ref_params):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
