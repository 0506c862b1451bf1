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
from tests.distributed._fsdp_cases import shard

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
    return shard(model(seed))


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


# --- flat partitions (ZeRO-1/2/3 style): each rank steps its own slice of one flat buffer ---------

FLAT = 2 * 8192 + 300  # rank 0: [0, 8192) = 32 whole blocks; rank 1: the rest, ending in a partial block


def flat_grad(step: int) -> torch.Tensor:
    return torch.randn(FLAT, generator=torch.Generator().manual_seed(7000 + step))


def flat_start() -> torch.Tensor:
    return torch.randn(FLAT, generator=torch.Generator().manual_seed(3))


def flat_bounds(world: int) -> list[int]:
    return [0, 8192, FLAT] if world == 2 else [0, FLAT]


def train_flat(steps: int, rank: int, world: int, group=None):
    """The partition of ``rank`` stepped ``steps`` times; returns (partition, its state)."""
    lo, hi = flat_bounds(world)[rank], flat_bounds(world)[rank + 1]
    part = flat_start()[lo:hi].clone().requires_grad_()
    opt = dist_optim.AdamW([part], lr=0.01, backend="torch", state_dtype="int8", process_group=group)
    for step in range(steps):
        part.grad = flat_grad(step)[lo:hi].clone()
        opt.step()
    return part.detach(), {k: v.clone() for k, v in opt.state[part].items()}


def run_flat_partitions(steps: int):
    return train_flat(steps, dist.get_rank(), dist.get_world_size(), dist.group.WORLD)


# --- a param whose shard on rank 1 is empty ------------------------------------------------------

class OneRow(nn.Module):
    """A (1, width) weight: above the min-size rule, one row, so FSDP2 at world 2 leaves rank 1 an
    empty shard (int8 state of 0 codes and 0 blocks). At width 4096 it has an int8 checkpoint form
    (absmax [1, 16]); at 4100 its moments are saved in fp32 form."""

    def __init__(self, width: int = 4100, seed: int = 5) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(1, width, generator=torch.Generator().manual_seed(seed)))

    def forward(self, x):
        return x @ self.w.T


def one_row_batch(step: int, width: int = 4100) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(9000 + step)
    return torch.randn(8, width, generator=gen), torch.randn(8, 1, generator=gen)


def train_one_row(net, steps: int):
    opt = optimizer(net.parameters())
    for step in range(steps):
        x, y = one_row_batch(step, net.w.shape[1])
        torch.nn.functional.mse_loss(net(x), y).backward()
        opt.step()
        opt.zero_grad()
    return opt


def run_empty_shard(steps: int):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    net = OneRow()
    fully_shard(net, mesh=init_device_mesh("cpu", (dist.get_world_size(),)))
    opt = train_one_row(net, steps)
    s = opt.state[net.w]
    return net.w.full_tensor().detach().clone(), (s["exp_avg"].numel(), s["exp_avg_absmax"].numel())


# --- int8 checkpoints through DCP at several world sizes ------------------------------------------
# A model with both checkpoint forms: the first weight (71 x 512) is saved as codes + absmax
# [71, 2] (whole blocks per row: lossless under any dim-0 sharding), the second (64 x 71) in fp32
# form (its blocks straddle rows; at world 2 each shard of 32 rows is 2272 elements, not whole
# blocks, so another world size quantizes it over other blocks). The rest keeps fp32 state.
# A global batch of 12 rows splits evenly at world 1, 2 and 3, so runs at different sizes see the
# same averaged gradients.

CKPT_BATCH = 12


def ckpt_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(512, 71), nn.Tanh(), nn.Linear(71, 64), nn.Tanh(), nn.Linear(64, 2))


def ckpt_sharded_model(seed: int = 0) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    net = ckpt_model(seed)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    fully_shard(net[0], mesh=mesh)
    fully_shard(net[2], mesh=mesh)
    fully_shard(net, mesh=mesh)
    return net


def ckpt_optimizer(params, state_dtype: str = "int8"):
    return dist_optim.AdamW(params, lr=0.01, backend="torch", state_dtype=state_dtype)


def train_ckpt(net, opt, start: int, steps: int) -> None:
    """Steps on this rank's rows of each global batch (all rows without a process group)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    rows = CKPT_BATCH // world
    for step in range(start, start + steps):
        gen = torch.Generator().manual_seed(5000 + step)
        x, y = torch.randn(CKPT_BATCH, 512, generator=gen), torch.randn(CKPT_BATCH, 2, generator=gen)
        x, y = x[rank * rows:(rank + 1) * rows], y[rank * rows:(rank + 1) * rows]
        torch.nn.functional.mse_loss(net(x), y).backward()
        opt.step()
        opt.zero_grad()


def _whole(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def state_entries(net, opt) -> dict[str, dict[str, torch.Tensor]]:
    """Per param name: the optimizer's state_dict() entries as whole tensors, and for each int8
    moment the live per-element absmax ("<key>@absmax": each element's block's absmax on its rank's
    shard) as a whole tensor. Collective on DTensor params: every rank calls it."""
    from dist_optim.distributed.shard import is_dtensor, local_tensor
    from dist_optim.state.layout import QBLOCK, absmax_key

    sd = opt.state_dict()
    out = {}
    for i, (name, p) in enumerate(net.named_parameters()):
        entry = {k: _whole(v) for k, v in sorted(sd["state"].get(i, {}).items())}  # one gather order on all ranks
        live, local = opt.state.get(p, {}), local_tensor(p)
        for key in ("exp_avg", "exp_avg_sq"):
            if absmax_key(key) in live:
                per_element = live[absmax_key(key)].repeat_interleave(QBLOCK)[: local.numel()].view(local.shape)
                if is_dtensor(p):
                    per_element = placed_like(p, per_element)
                entry[key + "@absmax"] = _whole(per_element)
        out[name] = entry
    return out


def placed_like(param, local: torch.Tensor):
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local, param.device_mesh, param.placements, run_check=False, shape=param.shape,
                              stride=param.stride())


def _build(state_dtype: str, seed: int = 0):
    net = ckpt_sharded_model(seed) if dist.is_initialized() else ckpt_model(seed)
    return net, ckpt_optimizer(net.parameters(), state_dtype)


def raw_dcp_save(root: str, steps: int, then: int, state_dtype: str = "int8"):
    """Train, save with torch's own get_state_dict + dcp.save, go on; returns (state entries at
    the save, whole params after ``then`` more steps)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    net, opt = _build(state_dtype)
    train_ckpt(net, opt, 0, steps)
    entries = state_entries(net, opt)
    model_sd, optim_sd = get_state_dict(net, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=root)
    train_ckpt(net, opt, steps, then)
    return entries, full_params(net)


def raw_dcp_load(root: str, start: int, then: int, state_dtype: str = "int8"):
    """A model from another seed filled by dcp.load + set_state_dict; returns (state entries after
    the load, whole params after ``then`` more steps)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    net, opt = _build(state_dtype, seed=123)
    model_sd, optim_sd = get_state_dict(net, opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=root)
    set_state_dict(net, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    entries = state_entries(net, opt)
    train_ckpt(net, opt, start, then)
    return entries, full_params(net)


def helper_save(root: str, steps: int, state_dtype: str):
    from dist_optim.distributed.checkpoint import save_checkpoint

    net, opt = _build(state_dtype)
    train_ckpt(net, opt, 0, steps)
    entries = state_entries(net, opt)
    save_checkpoint(root, net, opt, step=steps)
    return entries


def helper_load(root: str, state_dtype: str):
    from dist_optim.distributed.checkpoint import load_checkpoint

    net, opt = _build(state_dtype, seed=123)
    load_checkpoint(root, net, opt)
    return state_entries(net, opt)


def run_empty_shard_checkpoint(root: str, steps: int):
    """A (1, 4096) weight sharded over world 2 (rank 1's shard empty) saved in int8 form by torch's
    dcp.save and loaded into a fresh model; returns (state entries at the save, after the load)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    nets = []
    for seed in (5, 6):
        net = OneRow(4096, seed)
        fully_shard(net, mesh=init_device_mesh("cpu", (dist.get_world_size(),)))
        nets.append(net)
    opt = train_one_row(nets[0], steps)
    before = state_entries(nets[0], opt)
    model_sd, optim_sd = get_state_dict(nets[0], opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=root)
    fresh = optimizer(nets[1].parameters())
    model_sd, optim_sd = get_state_dict(nets[1], fresh)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=root)
    set_state_dict(nets[1], fresh, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return before, state_entries(nets[1], fresh)
