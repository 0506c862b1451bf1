"""What the bf16-update FSDP2 tests run on each rank, and their one-process counterparts.

A bf16 model sharded by FSDP2 at world 2 (dim-0 shards, torch.chunk's split): the first weight
(71 x 64) splits unevenly (36 and 35 rows: 2304 and 2240 elements; above the int8 min-size rule,
and rank 0's shard is 9 whole quantization blocks, so rank 1's blocks start where one process's
do), its bias (71) likewise, and the second layer (1 x 71, bias 1) leaves rank 1 an empty shard.

The gradients are set directly (each rank's rows of a full gradient that depends only on the step
and the param), without a backward pass: the optimizer then sees exactly the gradients a one-process
run sees, so element-wise results can be compared bit for bit (a backward would reduce in another
order). The steps still go through the sharded path: DTensor params and state, global gradient
statistics over the mesh, local shards in the updates.
"""

from __future__ import annotations

import math
import types

import torch
import torch.distributed as dist
from torch import nn

import dist_optim
from tests.distributed._fsdp_cases import shard

STEPS = 4
SEED = 77


def model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 71), nn.Tanh(), nn.Linear(71, 1)).to(torch.bfloat16)


def sharded_model(seed: int = 0) -> nn.Module:
    return shard(model(seed))


def optimizer(params, name: str, mode: str, state_dtype: str = "fp32"):
    kw = dict(bf16_update=mode, rounding_seed=SEED, state_dtype=state_dtype, backend="torch")
    if name == "Ranger":
        return dist_optim.Ranger(params, lr=0.01, k=2, **kw)
    return dist_optim.AdamW(params, lr=0.01, **kw)


def full_grad(step: int, index: int, shape) -> torch.Tensor:
    gen = torch.Generator().manual_seed(100 * step + index)
    return torch.randn(shape, generator=gen).to(torch.bfloat16)


def rows(full: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """``rank``'s dim-0 shard of ``full`` as FSDP2 (and DTensor's Shard(0)) lay it out: torch.chunk's
    pieces, empty for ranks past the last piece."""
    pieces = torch.chunk(full, world, dim=0)
    return pieces[rank] if rank < len(pieces) else full[:0]


def set_sharded_grads(params, step: int) -> None:
    from torch.distributed.tensor import DTensor

    rank, world = dist.get_rank(), dist.get_world_size()
    for i, p in enumerate(params):
        local = rows(full_grad(step, i, p.shape), rank, world).contiguous()
        assert local.shape == p.to_local().shape
        p.grad = DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                    stride=p.stride())


def set_plain_grads(params, step: int, rank: int | None = None, world: int = 1) -> None:
    """One process: the full gradients, or with ``rank`` that rank's rows of them."""
    for i, p in enumerate(params):
        full = full_grad(step, i, p.shape if rank is None else FULL_SHAPES[i])
        p.grad = full if rank is None else rows(full, rank, world).clone()


FULL_SHAPES = [(71, 64), (71,), (1, 71), (1,)]  # model()'s params


def local_state(opt, params) -> list[dict[str, torch.Tensor]]:
    out = []
    for p in params:
        out.append({k: (v.to_local() if hasattr(v, "to_local") else v).detach().clone()
                    for k, v in opt.state.get(p, {}).items()})
    return out


def run_sharded(name: str, mode: str, state_dtype: str = "fp32", steps: int = STEPS):
    """This rank's (local param shards, local state) after ``steps`` steps."""
    net = sharded_model()
    params = list(net.parameters())
    opt = optimizer(params, name, mode, state_dtype)
    for step in range(steps):
        set_sharded_grads(params, step)
        opt.step()
        opt.zero_grad()
    return [p.to_local().detach().clone() for p in params], local_state(opt, params)


def run_whole(name: str, mode: str, state_dtype: str = "fp32", steps: int = STEPS):
    """One process on the full params: (params, state)."""
    params = [p.detach().clone().requires_grad_() for p in model().parameters()]
    opt = optimizer(params, name, mode, state_dtype)
    for step in range(steps):
        set_plain_grads(params, step)
        opt.step()
    return [p.detach() for p in params], local_state(opt, params)


def emulate_rank(rank: int, world: int, name: str, mode: str, state_dtype: str = "fp32", steps: int = STEPS):
    """One process stepping ``rank``'s shards as plain tensors, with that rank's stream bases (the
    optimizer is told its rank) and the sharded run's choice of int8 moments."""
    from dist_optim.optim import base

    from dist_optim.state import quantizes

    params = [rows(p.detach(), rank, world).clone().requires_grad_() for p in model().parameters()]
    opt = optimizer(params, name, mode, state_dtype)
    # int8 or fp32 moments as the sharded run decides them: by the full param's size
    full = {id(p): math.prod(shape) for p, shape in zip(params, FULL_SHAPES)}
    opt._quantizes = lambda p: state_dtype == "int8" and quantizes(full[id(p)])
    told = types.SimpleNamespace(is_available=lambda: True, is_initialized=lambda: True, get_rank=lambda: rank)
    real, base.dist = base.dist, told
    try:
        opt._make_stream_bases()
    finally:
        base.dist = real
    for step in range(steps):
        set_plain_grads(params, step, rank, world)
        opt.step()
    return [p.detach() for p in params], local_state(opt, params)


def run_replicated(steps: int = 2):
    """A plain bf16 param, identical on every rank with identical gradients, under stochastic
    rounding: its local bits after ``steps`` steps (the ranks' streams differ)."""
    p = torch.full((4096,), 1.5, dtype=torch.bfloat16, requires_grad=True)
    opt = dist_optim.SGD([p], lr=1e-3, bf16_update="stochastic", rounding_seed=SEED, backend="torch")
    for _ in range(steps):
        p.grad = torch.ones_like(p)
        opt.step()
    return p.detach().clone()


def run_save_and_go_on(root: str, name: str, mode: str, steps: int, then: int):
    from dist_optim.distributed.checkpoint import save_checkpoint

    net = sharded_model()
    params = list(net.parameters())
    opt = optimizer(params, name, mode)
    for step in range(steps):
        set_sharded_grads(params, step)
        opt.step()
        opt.zero_grad()
    save_checkpoint(root, net, opt, step=steps)
    for step in range(steps, steps + then):
        set_sharded_grads(params, step)
        opt.step()
        opt.zero_grad()
    return [p.to_local().detach().clone() for p in params], local_state(opt, params)


def run_resume(root: str, name: str, mode: str, then: int):
    from dist_optim.distributed.checkpoint import load_checkpoint

    net = sharded_model(seed=123)  # a different init: everything must come from the checkpoint
    params = list(net.parameters())
    opt = optimizer(params, name, mode)
    start = load_checkpoint(root, net, opt)["step"]
    loaded = {k: v.dtype for k, v in opt.state[params[0]].items()}
    for step in range(start, start + then):
        set_sharded_grads(params, step)
        opt.step()
        opt.zero_grad()
    return [p.to_local().detach().clone() for p in params], local_state(opt, params), loaded
