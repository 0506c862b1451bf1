"""What the FSDP2 tests run on each rank, and the one-process references they are compared with.

The model has uneven shards by design: Linear(5, 7) has 7 rows (4/3 at world 2, 3/3/1 at world 3)
and Linear(7, 2) has 2 rows (a rank holds none at world 3). Each rank trains on its slice of a
global batch; FSDP2 averages gradients over ranks, so the one-process reference uses the mean loss
over the whole batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

import dist_optim
from tests.optim._factories import CONFIGS

PER_RANK = 3


def model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 2))


def global_batch(step: int, world: int, micro: int = 0, per_rank: int = PER_RANK):
    gen = torch.Generator().manual_seed(1000 * step + micro)
    return torch.randn(per_rank * world, 5, generator=gen), torch.randn(per_rank * world, 2, generator=gen)


def rank_slice(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    n = t.shape[0] // world
    return t[rank * n : (rank + 1) * n]


def loss_fn(net, x, y):
    return torch.nn.functional.mse_loss(net(x), y)


def sharded_model(seed: int = 0, dtype: torch.dtype = torch.float32, hsdp: bool = False) -> nn.Module:
    """FSDP2 over the world, or HSDP (2 replicas of a half-world shard group) with ``hsdp``."""
    return shard(model(seed).to(dtype), hsdp)  # the dtype before fully_shard, which fixes what it computes in


def shard(net: nn.Module, hsdp: bool = False) -> nn.Module:
    """``fully_shard`` the first layer, then the whole model, over the world (or HSDP)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    world = dist.get_world_size()
    if hsdp:
        mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh("cpu", (world,))
    fully_shard(net[0], mesh=mesh)
    fully_shard(net, mesh=mesh)
    return net


def full_params(net) -> list[torch.Tensor]:
    return [(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for p in net.parameters()]


def train_sharded(name: str, steps: int, start: int = 0, net=None, opt=None, **opt_kw):
    """Train under FSDP2 on this rank's slices; returns (net, opt)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    if net is None:
        net = sharded_model()
        opt = CONFIGS[name](net.parameters(), backend="torch", **opt_kw)
    for step in range(start, start + steps):
        x, y = global_batch(step, world)
        loss_fn(net, rank_slice(x, rank, world), rank_slice(y, rank, world)).backward()
        opt.step()
        opt.zero_grad()
    return net, opt


def train_reference(name: str, steps: int, world: int, start: int = 0, net=None, opt=None, **opt_kw):
    """The same run in one process on the whole batch."""
    if net is None:
        net = model()
        opt = CONFIGS[name](net.parameters(), backend="torch", **opt_kw)
    for step in range(start, start + steps):
        x, y = global_batch(step, world)
        loss_fn(net, x, y).backward()
        opt.step()
        opt.zero_grad()
    return net, opt


# --- functions the tests run on every rank -------------------------------------------------------

def run_optimizer(name: str, steps: int, **opt_kw):
    net, opt = train_sharded(name, steps, **opt_kw)
    keys = [sorted(opt.state[p]) for p in net.parameters()]
    local_numels = [p.to_local().numel() for p in net.parameters()]
    return full_params(net), keys, local_numels, opt.skipped_steps


def run_clipping_against_torch(steps: int, max_norm: float):
    net, opt = train_sharded("AdamW", steps, max_grad_norm=max_norm)
    return full_params(net), opt.last_grad_norm


def run_nan_on_one_rank():
    rank, world = dist.get_rank(), dist.get_world_size()
    net, opt = train_sharded("Ranger", 2)
    before = full_params(net)
    state_before = {i: {k: (v.full_tensor() if hasattr(v, "full_tensor") else v.clone()) for k, v in opt.state[p].items()}
                    for i, p in enumerate(net.parameters())}
    x, y = global_batch(99, world)
    loss_fn(net, rank_slice(x, rank, world), rank_slice(y, rank, world)).backward()
    if rank == world - 1:
        grad = net[0].weight.grad.to_local()
        grad.view(-1)[0] = float("nan")
    opt.step()
    after = full_params(net)
    state_after = {i: {k: (v.full_tensor() if hasattr(v, "full_tensor") else v.clone()) for k, v in opt.state[p].items()}
                   for i, p in enumerate(net.parameters())}
    same_params = all(torch.equal(a, b) for a, b in zip(before, after))
    same_state = all(torch.equal(state_before[i][k], state_after[i][k]) for i in state_before for k in state_before[i])
    return opt.skipped_steps, same_params, same_state


def run_accumulation(micro_steps: int, steps: int, per_rank: int):
    from dist_optim.distributed.accumulation import GradientAccumulation

    rank, world = dist.get_rank(), dist.get_world_size()
    net = sharded_model()
    opt = dist_optim.AdamW(net.parameters(), lr=0.01, backend="torch", max_grad_norm=0.5)
    accum = GradientAccumulation(net, opt, micro_steps)
    for step in range(steps):
        mbs = [global_batch(step, world, micro=m, per_rank=per_rank) for m in range(micro_steps)]
        mbs = [(rank_slice(x, rank, world), rank_slice(y, rank, world)) for x, y in mbs]
        for window in accum.windows(mbs):
            for (x, y), sync in accum.micro_batches(window):
                with sync:
                    loss_fn(net, x, y).backward()
            accum.step()
    return full_params(net), opt.last_grad_norm


def run_uneven_windows(counts: list[int], micro_steps: int):
    from dist_optim.distributed.accumulation import GradientAccumulation

    rank = dist.get_rank()
    net = sharded_model()
    opt = dist_optim.SGD(net.parameters(), lr=0.1, backend="torch")
    accum = GradientAccumulation(net, opt, micro_steps)
    sizes = []
    for window in accum.windows(range(counts[rank])):
        for i, sync in accum.micro_batches(window):
            with sync:
                x, y = global_batch(i, 1)
                loss_fn(net, x, y).backward()
        accum.step()
        sizes.append(len(window))
    return sizes, full_params(net)


def run_decisions(metrics: list[float]):
    from dist_optim.distributed.decisions import EarlyStopping, ReduceLROnPlateau

    rank = dist.get_rank()
    net = model()
    opt = dist_optim.SGD(net.parameters(), lr=1.0)
    plateau = ReduceLROnPlateau(opt, patience=1, factor=0.5)
    stopper = EarlyStopping(patience=3, min_delta=0.01)
    lrs, stops = [], []
    for m in metrics:
        local = m + (0.3 if rank == 0 else -0.3) * (1 if len(lrs) % 2 else -1)  # ranks disagree, means agree
        plateau.step(local)
        lrs.append(opt.param_groups[0]["lr"])
        stops.append(stopper.step(local))
    return lrs, stops


def run_save(name: str, steps: int, root: str, then: int):
    from dist_optim.distributed.checkpoint import save_checkpoint

    net, opt = train_sharded(name, steps)
    save_checkpoint(root, net, opt, step=steps)
    net, opt = train_sharded(name, then, start=steps, net=net, opt=opt)
    return full_params(net)


def run_resume(name: str, root: str, then: int):
    from dist_optim.distributed.checkpoint import load_checkpoint

    net = sharded_model(seed=123)  # different init: everything must come from the checkpoint
    opt = CONFIGS[name](net.parameters(), backend="torch")
    start = load_checkpoint(root, net, opt)["step"]
    net, opt = train_sharded(name, then, start=start, net=net, opt=opt)
    return full_params(net)


def run_fsdp1(name: str, steps: int, use_orig_params: bool, **opt_kw):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    rank, world = dist.get_rank(), dist.get_world_size()
    net = FSDP(model(), use_orig_params=use_orig_params, device_id=torch.device("cpu"))
    opt = CONFIGS[name](net.parameters(), backend="torch", **opt_kw)
    for step in range(steps):
        x, y = global_batch(step, world)
        loss_fn(net, rank_slice(x, rank, world), rank_slice(y, rank, world)).backward()
        opt.step()
        opt.zero_grad()
    with FSDP.summon_full_params(net):
        params = [p.detach().clone() for p in net.parameters()]
    return params, opt.last_grad_norm


def lbfgs_reference(steps: int, world: int, **kw):
    """torch.optim.LBFGS in one process on the whole batch, fp64."""
    net = model().double()
    opt = torch.optim.LBFGS(net.parameters(), **kw)
    x, y = global_batch(0, world)
    x, y = x.double(), y.double()

    def closure():
        opt.zero_grad()
        loss = loss_fn(net, x, y)
        loss.backward()
        return loss

    losses = [float(opt.step(closure).detach()) for _ in range(steps)]
    return [p.detach() for p in net.parameters()], losses, opt.state[opt._params[0]]["func_evals"]


def run_lbfgs(steps: int, resume_after: int | None = None, hsdp: bool = False, **kw):
    """dist_optim.LBFGS under FSDP2 or HSDP (fp64) on this rank's slice; counts every all-reduce issued."""
    rank, world = dist.get_rank(), dist.get_world_size()
    net = sharded_model(dtype=torch.float64, hsdp=hsdp)
    opt = dist_optim.LBFGS(net.parameters(), **kw)
    x, y = global_batch(0, world)
    x, y = rank_slice(x.double(), rank, world), rank_slice(y.double(), rank, world)
    calls = []
    real = dist.all_reduce

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    def closure():
        opt.zero_grad()
        loss = loss_fn(net, x, y)
        loss.backward()
        return loss

    losses = []
    dist.all_reduce = counting
    try:
        for i in range(steps):
            if resume_after is not None and i == resume_after:  # rebuild from state_dict mid-run
                saved = opt.state_dict()
                opt = dist_optim.LBFGS(net.parameters(), **kw)
                opt.load_state_dict(saved)
            losses.append(float(opt.step(closure)))
    finally:
        dist.all_reduce = real
    evals = opt.state[opt._params[0]]["func_evals"]
    return full_params(net), losses, evals, len(calls)


def run_hsdp_norm(max_norm: float, steps: int):
    """HSDP: a (replicate=world, shard=1) mesh, so every param is replicated across ranks. The global
    norm must count each element once."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    rank, world = dist.get_rank(), dist.get_world_size()
    net = model()
    mesh = init_device_mesh("cpu", (world, 1), mesh_dim_names=("replicate", "shard"))
    fully_shard(net, mesh=mesh)
    opt = dist_optim.AdamW(net.parameters(), lr=0.01, max_grad_norm=max_norm, backend="torch")
    norms = []
    for step in range(steps):
        x, y = global_batch(step, world)
        loss_fn(net, rank_slice(x, rank, world), rank_slice(y, rank, world)).backward()
        opt.step()
        opt.zero_grad()
        norms.append(opt.last_grad_norm)
    return full_params(net), norms


def run_replicated_beside_shards(extra_grad: list[float]):
    """FSDP2 shards plus a plain param every rank holds (and whose grad every rank has) identically:
    the norm counts it once."""
    rank, world = dist.get_rank(), dist.get_world_size()
    net = sharded_model()
    extra = torch.nn.Parameter(torch.zeros(len(extra_grad)))
    opt = dist_optim.SGD([*net.parameters(), extra], lr=0.0, max_grad_norm=1e9, backend="torch")
    x, y = global_batch(0, world)
    loss_fn(net, rank_slice(x, rank, world), rank_slice(y, rank, world)).backward()
    extra.grad = torch.tensor(extra_grad)
    opt.step()
    return opt.last_grad_norm


def run_ddp_accumulation(micro_steps: int, steps: int, per_rank: int):
    from torch.nn.parallel import DistributedDataParallel

    from dist_optim.distributed.accumulation import GradientAccumulation

    rank, world = dist.get_rank(), dist.get_world_size()
    net = DistributedDataParallel(model())
    opt = dist_optim.AdamW(net.parameters(), lr=0.01, backend="torch", max_grad_norm=0.5)
    accum = GradientAccumulation(net, opt, micro_steps)
    for step in range(steps):
        mbs = [global_batch(step, world, micro=m, per_rank=per_rank) for m in range(micro_steps)]
        mbs = [(rank_slice(x, rank, world), rank_slice(y, rank, world)) for x, y in mbs]
        for window in accum.windows(mbs):
            for (x, y), sync in accum.micro_batches(window):
                with sync:
                    loss_fn(net, x, y).backward()
            accum.step()
    return [p.detach().clone() for p in net.module.parameters()]


def run_dtensor_grad_on_plain_param(backend: str, steps: int = 3):
    """A plain param given a replicated DTensor grad (torch allows the assignment), beside the same
    param given the plain grad: (ours, plain)."""
    from torch.distributed.tensor import Replicate, distribute_tensor, init_device_mesh

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(300))
    q = nn.Parameter(p.detach().clone())
    opts = [dist_optim.AdamW([t], lr=0.1, max_grad_norm=0.5, backend=backend) for t in (p, q)]
    for _ in range(steps):
        g = torch.randn(300)
        p.grad, q.grad = distribute_tensor(g, mesh, [Replicate()]), g.clone()
        for opt in opts:
            opt.step()
    return p.detach(), q.detach()
