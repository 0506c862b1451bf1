"""Distributed L-BFGS under FSDP2 at world 2 and 3 (uneven shards, an empty one at 3) equals
torch.optim.LBFGS in one process; every rank stops at the same iteration; a closure evaluation
costs one all-reduce; resuming from state_dict continues the same trajectory.

In fp64 so that the comparison is tight: rtol 1e-8 — gradient reduction order and float64 inner
products differ from one process by ulps.
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed import _fsdp_cases as cases
from tests.multiproc import World

LBFGS_KW = [
    dict(lr=1, max_iter=4, history_size=3),
    dict(lr=1, max_iter=4, history_size=3, line_search_fn="strong_wolfe"),
]


@pytest.fixture(scope="module", params=[2, 3], ids=["world2", "world3"])
def world(request):
    w = World(request.param)
    yield w
    if not w.broken:
        w.close()


@pytest.mark.parametrize("kw", LBFGS_KW, ids=["fixed-step", "strong-wolfe"])
def test_equals_one_process_and_ranks_agree(world, kw):
    results = world.run(cases.run_lbfgs, 3, **kw)
    ref_params, ref_losses, ref_evals = cases.lbfgs_reference(3, world.world_size, **kw)
    for params, losses, evals, calls in results:
        for a, b in zip(params, ref_params):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
        assert losses == pytest.approx(ref_losses, rel=1e-8)
        assert evals == ref_evals  # every rank took torch's decisions, and the same number of them
        assert calls == evals  # one all-reduce per closure evaluation (target: <= 3)


def test_resume_from_state_dict_continues_the_same_trajectory(world):
    kw = dict(lr=1, max_iter=3, history_size=2, line_search_fn="strong_wolfe")
    straight = world.run(cases.run_lbfgs, 4, **kw)
    resumed = world.run(cases.run_lbfgs, 4, resume_after=2, **kw)
    for (p1, l1, _, _), (p2, l2, _, _) in zip(straight, resumed):
        assert l1 == l2
        for a, b in zip(p1, p2):
            assert torch.equal(a, b)


def test_reducer_takes_one_device_and_reads_once():
    """The reduction's values stay on the device they were computed on until its one read: values
    from two devices are refused (a CPU scalar next to CUDA dot products would be a host sync, or
    a failed cat), and one process gets its sums and maxima back from a single tolist()."""
    from dist_optim.distributed.lbfgs_comm import Reducer

    reduce = Reducer(None)
    with pytest.raises(ValueError, match="every value must be on cpu"):
        reduce([torch.ones(2), torch.ones((), device="meta")], [torch.ones(())])
    reads = []
    real = torch.Tensor.tolist
    torch.Tensor.tolist = lambda self: reads.append(1) or real(self)
    try:
        sums, maxima = reduce([torch.tensor(2.5, dtype=torch.float32), torch.arange(3.0)], [torch.tensor(4.0), torch.tensor(0.5)])
    finally:
        torch.Tensor.tolist = real
    assert (sums, maxima, len(reads)) == ([2.5, 0.0, 1.0, 2.0], [4.0, 0.5], 1)
