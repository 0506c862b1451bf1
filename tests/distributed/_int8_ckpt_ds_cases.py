"""What the int8-checkpoint DeepSpeed tests run on each rank (gloo, DS_ACCELERATOR=cpu).

The model's one ZeRO param group flattens a 130 x 64 weight (8320 elements), its bias and a 2 x 130
layer: 8712 elements, 4356 per partition at world 2 (above the min-size rule, so each partition's
moments are int8, blocks over the partition). The weight starts both partitions' layouts at a block
boundary, but rank 0's partition ends 4 elements into a block, so the canonical blocks of the
universal form and the world-1 blocks differ from the saved ones around that end and wherever a
block spans two params.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

PER_RANK = 4
ADAMW_INT8 = {"type": "dist_optim.AdamW", "params": {"lr": 0.01, "state_dtype": "int8"}}


def model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 130), nn.Tanh(), nn.Linear(130, 2))


def config(per_rank: int = PER_RANK, state_dtype: str = "int8") -> dict:
    return {
        "train_micro_batch_size_per_gpu": per_rank,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 2},
        "gradient_clipping": 0.0,
        "steps_per_print": 10**9,
        "optimizer": {"type": "dist_optim.AdamW", "params": {"lr": 0.01, "state_dtype": state_dtype}},
    }


def global_batch(step: int, rows: int):
    gen = torch.Generator().manual_seed(4000 + step)
    return torch.randn(rows, 64, generator=gen), torch.randn(rows, 2, generator=gen)


def train(engine, start: int, steps: int, rows: int) -> None:
    """Steps on this rank's share of global batches of ``rows`` rows."""
    rank, world = dist.get_rank(), dist.get_world_size()
    n = rows // world
    for step in range(start, start + steps):
        x, y = global_batch(step, rows)
        loss = torch.nn.functional.mse_loss(engine(x[rank * n:(rank + 1) * n]), y[rank * n:(rank + 1) * n])
        engine.backward(loss)
        engine.step()


def params_of(engine) -> list[torch.Tensor]:
    return [p.detach().clone() for p in engine.module.parameters()]


def partition_state(engine) -> dict[str, torch.Tensor]:
    """This rank's live optimizer state of its partition (codes, absmax, counters), copied."""
    zero = engine.optimizer
    flat = zero.single_partition_of_fp32_groups[0]
    return {k: v.clone() for k, v in zero.optimizer.state[flat].items()}


def run_save(root: str, steps: int, then: int, state_dtype: str = "int8"):
    """Train, save a ZeRO-2 checkpoint (tag "saved"), go on; returns (this rank's partition state
    at the save, params after ``then`` more steps)."""
    import dist_optim.deepspeed

    engine, *_ = dist_optim.deepspeed.initialize(model=model(), config=config(state_dtype=state_dtype))
    rows = PER_RANK * dist.get_world_size()
    train(engine, 0, steps, rows)
    state = partition_state(engine)
    engine.save_checkpoint(root, tag="saved")
    train(engine, steps, then, rows)
    return state, params_of(engine)


def run_resume(root: str, start: int, then: int):
    """A fresh engine (another seed) loading the checkpoint at the same world size."""
    import dist_optim.deepspeed

    engine, *_ = dist_optim.deepspeed.initialize(model=model(seed=7), config=config())
    engine.load_checkpoint(root, tag="saved")
    state = partition_state(engine)
    train(engine, start, then, PER_RANK * 2)
    return state, params_of(engine)


def run_universal_load(universal: str, start: int, then: int, saved_world: int, state_dtype: str = "int8"):
    """An engine at this world size filled from the universal folder, continuing on the saving
    run's global batches; returns (this rank's partition state after the load, where each param's
    fragment lies in it: name -> (start in the partition, start in the param, numel), params after)."""
    import dist_optim.deepspeed
    from dist_optim.integrations.ds_universal import load_universal

    rows = PER_RANK * saved_world
    cfg = config(per_rank=rows // dist.get_world_size(), state_dtype=state_dtype)
    engine, *_ = dist_optim.deepspeed.initialize(model=model(seed=11), config=cfg)
    load_universal(engine, universal)
    state = partition_state(engine)
    where = {}
    for name, p in engine.module.named_parameters():
        mapping = getattr(p, "_hp_mapping", None)
        if mapping is not None:
            hp, lp = mapping.hp_fragment_address, mapping.lp_fragment_address
            where[name] = (hp.start, lp.start, hp.numel)
    train(engine, start, then, rows)
    return state, where, params_of(engine)
