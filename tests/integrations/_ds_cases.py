"""What the DeepSpeed tests run on each rank (gloo, DS_ACCELERATOR=cpu), and their references."""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist

from tests.distributed._fsdp_cases import PER_RANK, global_batch, loss_fn, model, rank_slice

OPT_SPECS = {
    "AdamW": {"type": "dist_optim.AdamW", "params": {"lr": 0.01, "betas": [0.9, 0.99], "weight_decay": 0.1}},
    "Ranger": {"type": "dist_optim.Ranger", "params": {"lr": 0.01, "k": 3, "alpha": 0.3}},
    "SGD": {"type": "dist_optim.SGD", "params": {"lr": 0.05, "momentum": 0.9, "nesterov": True}},
    "RAdam": {"type": "dist_optim.RAdam", "params": {"lr": 0.01, "rho_threshold": 4.0}},
    "Adagrad": {"type": "dist_optim.Adagrad", "params": {"lr": 0.05}},
    "RMSprop": {"type": "dist_optim.RMSprop", "params": {"lr": 0.01, "momentum": 0.5, "centered": True}},
    "Lookahead(AdamW)": {"type": "dist_optim.Lookahead", "params": {
        "optimizer": {"type": "AdamW", "params": {"lr": 0.01}}, "k": 2, "alpha": 0.4}},
}


def ds_config(stage: int, spec: dict | None, *, clipping: float = 0.0, train_micro_batch_size_per_gpu: int = PER_RANK, **extra) -> dict:
    zero = {"stage": stage}
    if stage == 3:
        zero.update(sub_group_size=8, stage3_param_persistence_threshold=0)  # several sub-groups per rank
    cfg = {
        "train_micro_batch_size_per_gpu": train_micro_batch_size_per_gpu,
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
        "gradient_clipping": clipping,
        "steps_per_print": 10**9,
        **extra,
    }
    if spec is not None:
        cfg["optimizer"] = spec
    return cfg


def full_params(engine) -> list[torch.Tensor]:
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=hasattr(params[0], "ds_id")):
        return [p.detach().clone() for p in params]


def train(engine, steps: int, start: int = 0, nan_at: int | None = None, nan_in: str = "loss") -> None:
    """``nan_at``: at that step the last rank's loss is NaN (``nan_in="loss"``), or only its last
    bias's grad (``"bias"``: one param group's grads bad, the other's finite)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    for step in range(start, start + steps):
        x, y = global_batch(step, world)
        loss = loss_fn(engine, rank_slice(x, rank, world), rank_slice(y, rank, world))
        hook = None
        if step == nan_at and rank == world - 1:
            if nan_in == "loss":
                loss = loss * float("nan")
            else:
                hook = list(engine.module.parameters())[-1].register_hook(lambda g: g * float("nan"))
        engine.backward(loss)
        if hook is not None:
            hook.remove()
        engine.step()


def spec_of(name: str, max_grad_norm: float | None = None) -> dict:
    """OPT_SPECS[name], with our clipping on where ``max_grad_norm`` is given."""
    spec = copy.deepcopy(OPT_SPECS[name])
    if max_grad_norm is not None:
        inner = spec["params"]["optimizer"] if spec["type"] == "dist_optim.Lookahead" else spec
        inner["params"]["max_grad_norm"] = max_grad_norm
    return spec


def run_zero(stage: int, name: str, steps: int, *, groups: bool = False, nan_at: int | None = None,
             nan_in: str = "loss", max_grad_norm: float | None = None, **cfg):
    """The full params after ``steps``; with ``nan_at``, also ours' and the engine's skipped-step
    counts. ``groups``: HF's decay / no-decay split handed to initialize as model_parameters."""
    import dist_optim.deepspeed

    net = model()
    spec = spec_of(name, max_grad_norm)
    engine, *_ = dist_optim.deepspeed.initialize(
        model=net, model_parameters=decay_groups(net) if groups else None, config=ds_config(stage, spec, **cfg)
    )
    train(engine, steps, nan_at=nan_at, nan_in=nan_in)
    if nan_at is None:
        return full_params(engine)
    return full_params(engine), dist_optim.optim.fused_core(engine.basic_optimizer).skipped_steps, engine.skipped_steps


def run_client_optimizer(stage: int, steps: int):
    """deepspeed.initialize itself with our optimizer: importing dist_optim.deepspeed is enough."""
    import deepspeed

    import dist_optim
    import dist_optim.deepspeed  # noqa: F401 (marks our optimizers ZeRO-supported)

    net = model()
    opt = dist_optim.Ranger(net.parameters(), lr=0.01, k=3, alpha=0.3)
    engine, *_ = deepspeed.initialize(model=net, optimizer=opt, config=ds_config(stage, None))
    train(engine, steps)
    return full_params(engine)


def decay_groups(net, weight_decay: float = 0.1) -> list[dict]:
    """HF Trainer's split: matrices decay, biases do not (two param groups)."""
    params = list(net.parameters())
    return [
        {"params": [p for p in params if p.dim() > 1], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0},
    ]


def run_clipping(stage: int, steps: int, max_norm: float, *, groups: bool = False, late: bool = False, **cfg):
    """``late``: the optimizer is built with no checks and gets ``max_grad_norm`` and the default
    non-finite skip after ``deepspeed.initialize``; a refusal is returned as its message."""
    import dist_optim
    import dist_optim.deepspeed

    net = model()
    params = decay_groups(net) if groups else net.parameters()
    opt = dist_optim.AdamW(params, lr=0.01, **(dict(nonfinite="apply") if late else dict(max_grad_norm=max_norm)))
    engine, *_ = dist_optim.deepspeed.initialize(model=net, optimizer=opt, config=ds_config(stage, None, **cfg))
    if late:
        opt.max_grad_norm, opt.nonfinite = max_norm, "skip"
    try:
        train(engine, steps)
    except ValueError as err:
        return str(err)
    return full_params(engine), engine.config["gradient_clipping"] if isinstance(engine.config, dict) else None


def run_nan(stage: int):
    import dist_optim.deepspeed

    engine, *_ = dist_optim.deepspeed.initialize(model=model(), config=ds_config(stage, OPT_SPECS["Ranger"]))
    train(engine, 2)
    before = full_params(engine)
    train(engine, 1, start=2, nan_at=2)
    after = full_params(engine)
    return all(torch.equal(a, b) for a, b in zip(before, after))


def run_checkpoint(stage: int, name: str, root: str, steps: int, then: int, resume: bool):
    """Train ``steps``, save; then either continue ``then`` steps, or (resume) load into a fresh
    engine built from another seed and continue ``then`` steps."""
    import dist_optim.deepspeed

    engine, *_ = dist_optim.deepspeed.initialize(model=model(), config=ds_config(stage, OPT_SPECS[name]))
    if not resume:
        train(engine, steps)
        engine.save_checkpoint(root, tag="ckpt")
    else:
        engine2, *_ = dist_optim.deepspeed.initialize(model=model(seed=7), config=ds_config(stage, OPT_SPECS[name]))
        engine2.load_checkpoint(root, tag="ckpt")
        engine = engine2
    train(engine, then, start=steps)
    return full_params(engine)


def reference(name: str, steps: int, world: int, *, groups: bool = False, skip_at: int | None = None,
              max_grad_norm: float | None = None):
    """One process, our optimizer on the plain model, the whole batch; ``skip_at``: no step there."""
    import dist_optim.deepspeed

    net = model()
    opt = dist_optim.deepspeed.build_from_config(spec_of(name, max_grad_norm), decay_groups(net) if groups else net.parameters())
    for step in range(steps):
        x, y = global_batch(step, world)
        loss_fn(net, x, y).backward()
        if step != skip_at:
            opt.step()
        opt.zero_grad()
    return [p.detach() for p in net.parameters()]


def run_universal_save(name: str, root: str, steps: int, then: int):
    import dist_optim.deepspeed

    engine, *_ = dist_optim.deepspeed.initialize(model=model(), config=ds_config(2, OPT_SPECS[name]))
    train(engine, steps)
    engine.save_checkpoint(root, tag="saved")
    train(engine, then, start=steps)
    return full_params(engine)


def run_universal_load(name: str, universal: str, start: int, then: int, saved_world: int):
    """A ZeRO-2 engine at this world size, filled from the universal folder, continuing on the global
    batches the saving run used (so the trajectories are comparable)."""
    import dist_optim.deepspeed
    from dist_optim.integrations.ds_universal import load_universal

    rank, world = dist.get_rank(), dist.get_world_size()
    per_rank = PER_RANK * saved_world // world
    cfg = ds_config(2, OPT_SPECS[name], train_micro_batch_size_per_gpu=per_rank)
    engine, *_ = dist_optim.deepspeed.initialize(model=model(seed=11), config=cfg)
    load_universal(engine, universal)
    for step in range(start, start + then):
        x, y = global_batch(step, saved_world)
        engine.backward(loss_fn(engine, rank_slice(x, rank, world), rank_slice(y, rank, world)))
        engine.step()
    return full_params(engine)


def run_atomic_save_crash(root: str):
    """Save at step 2, then crash inside the step-4 save: the step-2 checkpoint stays the latest and
    loads; returns (latest name, params at step 2, params after loading)."""
    import dist_optim.deepspeed as dod
    from dist_optim.distributed.checkpoint import latest_checkpoint

    engine, *_ = dod.initialize(model=model(), config=ds_config(2, OPT_SPECS["Ranger"]))
    train(engine, 2)
    dod.save_checkpoint_atomic(engine, root, 2)
    at_two = full_params(engine)
    train(engine, 2, start=2)
    real = engine.save_checkpoint

    def crashing(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt("killed during the save")

    engine.save_checkpoint = crashing
    try:
        dod.save_checkpoint_atomic(engine, root, 4)
    except KeyboardInterrupt:
        pass
    dist.barrier()
    latest = latest_checkpoint(root)
    fresh, *_ = dod.initialize(model=model(seed=5), config=ds_config(2, OPT_SPECS["Ranger"]))
    extra = dod.load_checkpoint(fresh, str(latest))
    return latest.name, extra["step"], at_two, full_params(fresh)

