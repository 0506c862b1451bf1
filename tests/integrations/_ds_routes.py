"""Every way a user hands our optimizer to a DeepSpeed engine, each beside DeepSpeed's built-in
optimizer (torch.optim.AdamW through ``"torch_adam": true``) in the identical set-up.

Run on each rank of a gloo world (DS_ACCELERATOR=cpu). The model, data and per-rank slices are the
FSDP2 tests'; under bf16/fp16 the module computes in that dtype and the loss in fp32. Results are
the fp32 master weights (``safe_get_full_fp32_param``), which is what both optimizers update.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from tests.distributed._fsdp_cases import PER_RANK, global_batch, model, rank_slice
from tests.integrations._ds_cases import decay_groups

ADAMW = {"lr": 0.01, "betas": [0.9, 0.99], "eps": 1e-8, "weight_decay": 0.1}
PRECISIONS = {
    "fp32": {},
    "bf16": {"bf16": {"enabled": True}},
    "bf16-unchecked": {"bf16": {"enabled": True, "check_grad_overflow": False}},  # DeepSpeed steps on NaN norms
    "bf16+fp32acc": {"bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "fp32"}},
    "fp16": {"fp16": {"enabled": True, "initial_scale_power": 8, "loss_scale_window": 1000}},
    # the loss scale doubles after every step without overflow: the grads a step sees were divided
    # by the new scale, its norm by the old one
    "fp16-growing": {"fp16": {"enabled": True, "initial_scale_power": 8, "loss_scale_window": 1}},
    "fp16-autocast": {"torch_autocast": {"enabled": True, "dtype": "torch.float16"}},  # a GradScaler of its own
}


def ds_config(stage: int, precision: str, *, clipping: float | None, accum: int = 1, offload: bool = False,
              optimizer: dict | None = None, scheduler: dict | None = None, zero_extra: dict | None = None) -> dict:
    zero: dict = {"stage": stage, **(zero_extra or {})}
    if stage == 3:
        zero.update(sub_group_size=8, stage3_param_persistence_threshold=0)
    if offload:
        zero["offload_optimizer"] = {"device": "cpu"}
    cfg = {
        "train_micro_batch_size_per_gpu": PER_RANK,
        "gradient_accumulation_steps": accum,
        "zero_optimization": zero,
        "steps_per_print": 10**9,
        **PRECISIONS[precision],
    }
    if clipping is not None:
        cfg["gradient_clipping"] = clipping
    if optimizer is not None:
        cfg["optimizer"] = optimizer
    if scheduler is not None:
        cfg["scheduler"] = scheduler
    return cfg


def allow_cpu_fp16() -> None:
    """DeepSpeed's CPU accelerator reports fp16 unsupported unless oneDNN has fp16 kernels; torch's own
    CPU kernels compute fp16 (slowly), which is all these tiny models need to exercise loss scaling."""
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    accel.is_fp16_supported = lambda: True
    accel.supported_dtypes = lambda: [torch.float, torch.bfloat16, torch.float16]


def build(route: str, stage: int, precision: str, max_norm: float | None, *, accum: int = 1,
          offload: bool = False, scheduler: dict | None = None, seed: int = 0, ds_clip: float | None = None,
          zero_extra: dict | None = None, nonfinite: str = "skip", groups: bool = False):
    """An engine for ``route``:
    - ``builtin``: DeepSpeed's AdamW (torch_adam) with ``gradient_clipping = max_norm``;
    - ``client``: plain ``deepspeed.initialize(optimizer=dist_optim.AdamW(..., max_grad_norm=max_norm))``;
    - ``config``: plain ``deepspeed.initialize`` with ``"type": "dist_optim.AdamW"`` in the ds_config;
    - ``wrapper``: ``dist_optim.deepspeed.initialize`` with our optimizer object.
    ``groups``: ours gets HF's decay / no-decay param groups (client and wrapper routes)."""
    import deepspeed

    import dist_optim
    import dist_optim.deepspeed

    if precision.startswith("fp16"):
        allow_cpu_fp16()
    net = model(seed)
    ours_kw = dict(ADAMW, betas=tuple(ADAMW["betas"]), max_grad_norm=max_norm, nonfinite=nonfinite)
    if route == "builtin":
        cfg = ds_config(stage, precision, clipping=max_norm or 0.0, accum=accum, offload=offload, scheduler=scheduler,
                        optimizer={"type": "AdamW", "params": {**ADAMW, "torch_adam": True}})
        engine, *_ = deepspeed.initialize(model=net, model_parameters=net.parameters(), config=cfg)
    elif route == "config":
        params = {**ADAMW} if max_norm is None else {**ADAMW, "max_grad_norm": max_norm}
        cfg = ds_config(stage, precision, clipping=None, accum=accum, offload=offload, scheduler=scheduler,
                        optimizer={"type": "dist_optim.AdamW", "params": params})
        engine, *_ = deepspeed.initialize(model=net, model_parameters=net.parameters(), config=cfg)
    elif route in ("client", "wrapper"):
        opt = dist_optim.AdamW(decay_groups(net, ADAMW["weight_decay"]) if groups else net.parameters(), **ours_kw)
        clipping = ds_clip if ds_clip is not None else (None if max_norm else 0.0)
        cfg = ds_config(stage, precision, clipping=clipping, accum=accum, offload=offload, scheduler=scheduler,
                        zero_extra=zero_extra)
        init = deepspeed.initialize if route == "client" else dist_optim.deepspeed.initialize
        engine, *_ = init(model=net, optimizer=opt, config=cfg)
    else:
        raise ValueError(f"route: {route!r}")
    return engine


def train(engine, steps: int, *, start: int = 0, accum: int = 1) -> list[float]:
    """``steps`` optimizer steps of ``accum`` micro-batches each; returns the lr seen at each step."""
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = next(engine.module.parameters()).dtype
    lrs = []
    for step in range(start, start + steps):
        for micro in range(accum):
            x, y = global_batch(step, world, micro)
            out = engine(rank_slice(x, rank, world).to(dtype)).float()
            engine.backward(torch.nn.functional.mse_loss(out, rank_slice(y, rank, world)))
            engine.step()
        lrs.append(engine.get_lr()[0])
    return lrs


def master_weights(engine) -> list[torch.Tensor]:
    from deepspeed.utils import safe_get_full_fp32_param

    out = []
    for p in engine.module.parameters():
        full = safe_get_full_fp32_param(p)
        out.append((full if full is not None else p).detach().float().clone())
    return out


def run(route: str, stage: int, precision: str, max_norm: float | None, steps: int = 4, **kw):
    """(fp32 master weights, the lr at each step, the wrapper's class, the engine's grad norm)."""
    accum = kw.get("accum", 1)
    engine = build(route, stage, precision, max_norm, **kw)
    lrs = train(engine, steps, accum=accum)
    norm = engine.get_global_grad_norm()
    return master_weights(engine), lrs, engine.optimizer.__class__.__name__, None if norm is None else float(norm)


def run_checkpoint(route: str, stage: int, root: str, resume: bool):
    """3 steps, save; then 3 more straight on, or in a fresh engine (other seed) after loading."""
    engine = build(route, stage, "bf16", 0.05)
    if not resume:
        train(engine, 3)
        engine.save_checkpoint(root, tag="ckpt")
    else:
        engine = build(route, stage, "bf16", 0.05, seed=7)
        engine.load_checkpoint(root, tag="ckpt")
    train(engine, 3, start=3)
    return master_weights(engine)


def run_resume_across_clipping_owners(stage: int, precision: str, root: str, into: str):
    """A run saves after 2 steps; a run where the other side clips (``into``: "ours", or
    "deepspeed" with gradient_clipping 1.0) loads it (DeepSpeed restores the saved run's clip value:
    1.0, or the 0 it had where ours clipped) and takes 2 more, as loaded and with this run's own
    value put back by hand: (master weights as loaded, put back, the wrapper's clip value after)."""
    ours = into == "ours"
    engine = build("client", stage, precision, None if ours else CLIP_FOR_REPORT, ds_clip=1.0 if ours else None)
    train(engine, 2)
    engine.save_checkpoint(root, tag="ckpt")
    out = []
    for put_back in (False, True):
        engine = build("client", stage, precision, CLIP_FOR_REPORT if ours else None, seed=7,
                       ds_clip=None if ours else 1.0)
        engine.load_checkpoint(root, tag="ckpt")
        if put_back:
            engine.optimizer.clip_grad = 0.0 if ours else 1.0
        train(engine, 2, start=2)
        out.append(master_weights(engine))
    return *out, engine.optimizer.clip_grad


def both_clipping_after_initialize(stage: int, precision: str, how: str) -> tuple[str, bool]:
    """Ours and DeepSpeed both clipping, set up after initialize: ``late``, our max_grad_norm set on
    an engine where DeepSpeed clips; ``by hand``, DeepSpeed's clip value set where ours clips. The
    refusal of the first step, or "", and whether the grads the module holds were left as they were."""
    import dist_optim

    if how == "late":
        engine = build("client", stage, precision, None, ds_clip=1.0)
        dist_optim.optim.fused_core(engine.basic_optimizer).max_grad_norm = CLIP_FOR_REPORT
    else:
        engine = build("client", stage, precision, CLIP_FOR_REPORT)
        if engine.optimizer is engine.basic_optimizer:  # ZeRO-0 in fp32: the engine clips
            engine._config.gradient_clipping = 0.5
        else:
            engine.optimizer.clip_grad = 0.5
    rank, world = dist.get_rank(), dist.get_world_size()
    x, y = global_batch(0, world, 0)
    dtype = next(engine.module.parameters()).dtype
    out = engine(rank_slice(x, rank, world).to(dtype)).float()
    engine.backward(torch.nn.functional.mse_loss(out, rank_slice(y, rank, world)))
    grads = [p.grad.clone() for p in engine.module.parameters() if p.grad is not None]
    error = error_of(engine.step)
    after = [p.grad for p in engine.module.parameters() if p.grad is not None]
    return error, all(torch.equal(a, b) for a, b in zip(grads, after))


def ownership(stage: int, precision: str, **kw):
    """(DeepSpeed's gradient_clipping, our max_grad_norm, our nonfinite, DeepSpeed computes its norm,
    the wrapper's class) for our optimizer with max_grad_norm=0.05 handed to plain deepspeed.initialize."""
    engine = build("client", stage, precision, 0.05, **kw)
    ours = engine.basic_optimizer
    zero = engine._config.zero_config
    return (engine.gradient_clipping(), ours.max_grad_norm, ours.nonfinite, zero.compute_grad_norm,
            type(engine.optimizer).__name__)


def build_autocast_fp16():
    """Our clipping under ZeRO-2 with torch autocast in fp16. DeepSpeed marks autocast on in a
    process-wide flag that no later engine clears; cleared here, as this process builds more."""
    from deepspeed.runtime import torch_autocast

    try:
        return build("client", 2, "fp16-autocast", CLIP_FOR_REPORT)
    finally:
        torch_autocast.TORCH_AUTOCAST_INITIALIZED = False
        torch_autocast.TORCH_AUTOCAST_DTYPE = None


def error_of(fn, *args, **kwargs) -> str:
    try:
        fn(*args, **kwargs)
    except (ValueError, AssertionError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return ""


def refused_routes() -> dict[str, str]:
    """The error each misuse gets (empty when none)."""
    import deepspeed

    import dist_optim

    net = model()
    return {
        "both clippings": error_of(build, "client", 2, "fp32", 0.05, ds_clip=0.5),
        "lbfgs": error_of(deepspeed.initialize, model=net, optimizer=dist_optim.LBFGS(net.parameters()),
                          config=ds_config(2, "fp32", clipping=0.0)),
        "unknown type": error_of(deepspeed.initialize, model=net, model_parameters=net.parameters(),
                                 config=ds_config(2, "fp32", clipping=0.0, optimizer={"type": "dist_optim.Adamax"})),
        "raise on zero3": error_of(build, "client", 3, "fp32", None, nonfinite="raise"),
        "raise on zero1": error_of(build, "client", 1, "fp32", None, nonfinite="raise"),
        "fp16 autocast": error_of(build_autocast_fp16),
    }


def swapped_params_step() -> tuple[str, str]:
    """Our optimizer whose params a wrapper replaced with tensors it was never given, with no group:
    the error of its step(); and that of the same step on its own params (none: replicas are fine)."""
    import dist_optim

    rank = dist.get_rank()
    params = [torch.nn.Parameter(torch.full((4,), float(rank + 1)))]
    opt = dist_optim.AdamW(params, max_grad_norm=1.0)
    params[0].grad = torch.ones(4)
    fine = error_of(opt.step)
    partition = torch.nn.Parameter(torch.zeros(2))
    partition.grad = torch.ones(2)
    opt.param_groups[0]["params"] = [partition]
    return error_of(opt.step), fine


def deepspeed_clipping_without_ours() -> float:
    """DeepSpeed's gradient_clipping when neither it nor max_grad_norm is set."""
    import deepspeed

    import dist_optim

    net = model()
    engine, *_ = deepspeed.initialize(model=net, optimizer=dist_optim.AdamW(net.parameters()),
                                      config=ds_config(2, "fp32", clipping=None))
    return engine.gradient_clipping()


def run_accelerate(stage: int, precision: str, max_norm: float | None, steps: int = 4):
    """accelerate's DeepSpeed plugin with HF-style ``optimizers=(opt, sched)``: our optimizer and a
    scheduler built by the user, handed to ``Accelerator.prepare``, which calls deepspeed.initialize."""
    import os

    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DeepSpeedPlugin

    import dist_optim

    if precision.startswith("fp16"):
        allow_cpu_fp16()
    # accelerate registers its config with transformers' HfDeepSpeedConfig (for from_pretrained's
    # ZeRO-3 init) and fails without transformers installed; a plain nn.Module does not need it.
    DeepSpeedPlugin.set_deepspeed_weakref = lambda self: None
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"  # what `accelerate launch` with a DeepSpeed config sets
    try:
        cfg = ds_config(stage, precision, clipping=None if max_norm else 0.0)
        accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=cfg))
        net = model()
        opt = dist_optim.AdamW(net.parameters(), **dict(ADAMW, betas=tuple(ADAMW["betas"]), max_grad_norm=max_norm))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
        engine, opt, sched = accelerator.prepare(net, opt, sched)
        rank, world = dist.get_rank(), dist.get_world_size()
        dtype = next(engine.module.parameters()).dtype
        lrs = []
        for step in range(steps):
            x, y = global_batch(step, world)
            out = engine(rank_slice(x, rank, world).to(dtype)).float()
            accelerator.backward(torch.nn.functional.mse_loss(out, rank_slice(y, rank, world)))
            opt.step()
            sched.step()
            opt.zero_grad()
            lrs.append(engine.get_lr()[0])
        return master_weights(engine), lrs, type(engine.optimizer).__name__, None
    finally:
        os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
        AcceleratorState._reset_state(True)


def run_skip_reported(stage: int, precision: str = "fp32", groups: bool = False):
    """A step with a NaN on the last rank is skipped (by ours, or by DeepSpeed first): the engine
    counts it as skipped (no scheduler step) and reports the norm on the other steps. Returns
    (engine.skipped_steps, the lrs seen, the norm DeepSpeed reports after a normal step, the steps
    ours skipped)."""
    engine = build("client", stage, precision, CLIP_FOR_REPORT, groups=groups,
                   scheduler={"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 0.01,
                                                             "warmup_num_steps": 4}})
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = next(engine.module.parameters()).dtype
    lrs, norms = [], []
    for step in range(3):
        x, y = global_batch(step, world)
        out = engine(rank_slice(x, rank, world).to(dtype)).float()
        loss = torch.nn.functional.mse_loss(out, rank_slice(y, rank, world))
        if step == 1 and rank == world - 1:
            loss = loss * float("nan")
        engine.backward(loss)
        engine.step()
        lrs.append(engine.get_lr()[0])
        norms.append(engine.get_global_grad_norm())
    ours = engine.basic_optimizer
    return engine.skipped_steps, lrs, float(norms[0]), ours.last_grad_norm is not None and ours.skipped_steps


CLIP_FOR_REPORT = 0.05


def run_callable_offload(stage: int):
    """``deepspeed.initialize(optimizer=callable)`` returning ours, under offload_optimizer."""
    import deepspeed

    import dist_optim

    net = model()
    cfg = ds_config(stage, "fp32", clipping=None, offload=True)
    engine, *_ = deepspeed.initialize(
        model=net, model_parameters=net.parameters(), config=cfg,
        optimizer=lambda params: dist_optim.AdamW(params, **dict(ADAMW, betas=tuple(ADAMW["betas"]), max_grad_norm=0.05)),
    )
    train(engine, 4)
    return master_weights(engine), [0.0], type(engine.optimizer).__name__, None
