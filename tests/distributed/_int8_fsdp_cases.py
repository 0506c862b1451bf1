"""What the int8-state FSDP2 tests run on each rank, and their one-process references.

The first layer's weight (71 x 64 = 4544 elements) is above the min-size rule and gets int8 state;
its shards are uneven (36 and 35 rows at world 2: 2304 and 2240 elements). Rank 0's shard is 9 whole
quantization blocks, so rank 1's blocks start where the one-process blocks do: the 1-process and
2-rank runs have the same block layout, and differ only by FSDP2's reduction order. The biases and
the second layer keep fp32 state.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

import dist_optim

PER_RANK = 4


def model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 71), nn.Tanh(), nn.Linear(71, 2))


def optimizer(params):
    return dist_optim.AdamW(params, lr=0.01, backend="torch", state_dtype="int8")


def global_batch(step: int, world: int):
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randn(PER_RANK * world, 64, generator=gen), torch.randn(PER_RANK * world, 2, generator=gen)


def sharded_model(seed: int = 0) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    net = model(seed)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    fully_shard(net[0], mesh=mesh)
    fully_shard(net, mesh=mesh)
    return net


def train(net, opt, start: int, steps: int, world: int, rank: int | None = None):
    for step in range(start, start + steps):
        x, y = global_batch(step, world)
        if rank is not None:
            x, y = x[rank * PER_RANK:(rank + 1) * PER_RANK], y[rank * PER_RANK:(rank + 1) * PER_RANK]
        torch.nn.functional.mse_loss(net(x), y).backward()
        opt.step()
        opt.zero_grad()


def full_params(net) -> list[torch.Tensor]:
    return [(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for p in net.parameters()]


def run_int8(steps: int):
    """(full params, per param: the local codes' and absmax's sizes or None for fp32 state)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    net = sharded_model()
    opt = optimizer(net.parameters())
    train(net, opt, 0, steps, world, rank)
    layout = []
    for p in net.parameters():
        s = opt.state[p]
        layout.append((s["exp_avg"].numel(), s["exp_avg_absmax"].numel()) if "exp_avg_absmax" in s else None)
    return full_params(net), layout


def run_save_and_go_on(root: str, steps: int, then: int):
    from dist_optim.distributed.checkpoint import save_checkpoint

    rank, world = dist.get_rank(), dist.get_world_size()
    net = sharded_model()
    opt = optimizer(net.parameters())
    train(net, opt, 0, steps, world, rank)
    save_checkpoint(root, net, opt, step=steps)
    train(net, opt, steps, then, world, rank)
    return full_params(net), [p.to_local().detach().clone() for p in net.parameters()]


def run_resume(root: str, then: int):
    from dist_optim.distributed.checkpoint import load_checkpoint

    rank, world = dist.get_rank(), dist.get_world_size()
    net = sharded_model(seed=123)  # a different init: everything must come from the checkpoint
    opt = optimizer(net.parameters())
    start = load_checkpoint(root, net, opt)["step"]
    assert "exp_avg_absmax" in opt.state[net[0].weight]
    train(net, opt, start, then, world, rank)
    return full_params(net), [p.to_local().detach().clone() for p in net.parameters()]
