"""Rank functions for torch's ZeroRedundancyOptimizer and for pipeline stages under FSDP2."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

import dist_optim
from tests.distributed._fsdp_cases import global_batch, loss_fn, model, rank_slice

ADAMW = dict(lr=0.01, betas=(0.9, 0.99), weight_decay=0.1)


def run_zero_redundancy(ours: bool, max_norm: float, steps: int = 4):
    """DDP + ZeroRedundancyOptimizer(optimizer_class=dist_optim.AdamW, max_grad_norm=...), or DDP +
    torch.optim.AdamW + clip_grad_norm_; returns (params, the grad norm of each step)."""
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel

    rank, world = dist.get_rank(), dist.get_world_size()
    net = DistributedDataParallel(model())
    if ours:
        opt = ZeroRedundancyOptimizer(net.parameters(), optimizer_class=dist_optim.AdamW, max_grad_norm=max_norm, **ADAMW)
    else:
        opt = torch.optim.AdamW(net.parameters(), **ADAMW)
    norms = []
    for step in range(steps):
        x, y = global_batch(step, world)
        loss_fn(net, rank_slice(x, rank, world), rank_slice(y, rank, world)).backward()
        if ours:
            opt.step()
            norms.append(opt.optim.last_grad_norm)
        else:
            norms.append(float(torch.nn.utils.clip_grad_norm_(net.parameters(), max_norm)))
            opt.step()
        opt.zero_grad()
    return [p.detach().clone() for p in net.module.parameters()], norms


def _stage_model(stage: int) -> nn.Module:
    torch.manual_seed(stage)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 5))


def run_pipeline_stages(process_group: str | None, max_norm: float):
    """A ("pp", "dp") mesh at world 4, each stage's module fully_shard-ed on mesh["dp"] (torchtitan's
    layout), a step with clipping; returns the error, or (our grad norm, the global norm computed by
    hand over both stages)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "dp"))
    stage = mesh.get_local_rank("pp")
    net = fully_shard(_stage_model(stage), mesh=mesh["dp"])
    group = dist.group.WORLD if process_group == "world" else None
    opt = dist_optim.AdamW(net.parameters(), max_grad_norm=max_norm, process_group=group)
    torch.manual_seed(100 + dist.get_rank())
    net(torch.randn(3, 5)).square().mean().backward()
    local_sumsq = sum(p.grad.full_tensor().square().sum() for p in net.parameters())
    stage_sumsq = torch.tensor([0.0, 0.0])
    stage_sumsq[stage] = local_sumsq / 2  # both dp ranks of a stage hold the stage's full norm
    dist.all_reduce(stage_sumsq)
    try:
        opt.step()
    except ValueError as err:
        return str(err)
    return opt.last_grad_norm, float(stage_sumsq.sum().sqrt())
