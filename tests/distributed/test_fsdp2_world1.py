"""FSDP2 on a mesh of one rank equals the plain one-process run (the degenerate case users hit when
they launch a sharded config on one GPU). Same tolerance as test_fsdp2."""

from __future__ import annotations

import pytest
import torch

from tests.distributed import _fsdp_cases as cases
from tests.multiproc import world_fixture
from tests.optim._factories import CONFIGS

world = world_fixture(1)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_world_1_equals_one_process(world, name):
    ((params, _, _, skipped),) = world.run(cases.run_optimizer, name, 6, max_grad_norm=0.1)
    ref, _ = cases.train_reference(name, 6, 1, max_grad_norm=0.1)
    assert skipped == 0
    for a, b in zip(params, ref.parameters()):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)


def test_lbfgs_world_1(world):
    ((params, losses, evals, calls),) = world.run(cases.run_lbfgs, 2, lr=1, max_iter=4, history_size=3)
    ref_params, ref_losses, ref_evals = cases.lbfgs_reference(2, 1, lr=1, max_iter=4, history_size=3)
    assert evals == ref_evals and calls == 0  # one rank: nothing to reduce
    for a, b in zip(params, ref_params):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("backend", ["triton", "cpu", "auto"])
def test_a_replicated_dtensor_grad_on_a_plain_param_steps_as_the_plain_grad(world, backend):
    """The fused kernels read a DTensor grad's local tensor (a DTensor has no storage of its own: its
    pointer is null, which a kernel would dereference)."""
    ((ours, plain),) = world.run(cases.run_dtensor_grad_on_plain_param, backend)
    torch.testing.assert_close(ours, plain, rtol=0, atol=0)
