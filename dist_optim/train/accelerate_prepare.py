"""single/ddp/fsdp2 under ``accelerate launch``: the model and optimizer prepared by accelerate, the
way an accelerate user's script is (``Accelerator()``, then ``prepare(model, optimizer)`` on an
optimizer built over the unsharded model).

On a GPU, ``Accelerator()`` turns FSDP2 on from the launcher's settings and its ``prepare`` shards.
On a CPU, accelerate never turns FSDP on (it runs MULTI_CPU, i.e. DDP), so the FSDP2 case runs
accelerate's own preparation functions directly: its ``FullyShardedDataParallelPlugin`` read from
the launcher's environment (wrap policy, resharding, the ``MixedPrecisionPolicy`` it derives from
``mixed_precision``), ``fsdp2_apply_ac`` where ``fsdp_activation_checkpointing`` asks,
``fsdp2_prepare_model``, and ``fsdp2_switch_optimizer_parameters``, which swaps the optimizer's
params for the sharded ones exactly as ``Accelerator.prepare`` does. Its compile step is not run
here: a ``dynamo_backend`` is refused on this route.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .config import TrainConfig


def prepare(cfg: TrainConfig, model: torch.nn.Module, device: torch.device, make_optimizer: Callable[[torch.nn.Module], Any]):
    """(prepared model, our optimizer over its params, FSDP2 MixedPrecisionPolicy or None).

    The loop steps our optimizer itself, not accelerate's ``AcceleratedOptimizer`` wrapper: the
    wrapper adds only fp16's GradScaler (fp16 is refused outside DeepSpeed) and its own
    accumulation flag, and it does not pass on ``step(grad_scale=)``, into which our gradient
    accumulation folds the 1/N."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision=cfg.mixed_precision)
    optimizer = make_optimizer(model)
    if cfg.strategy == "fsdp2" and accelerator.distributed_type != DistributedType.FSDP:
        model, policy = _fsdp2_by_hand(accelerator, model, optimizer)
        return model, optimizer, policy
    if cfg.strategy == "fsdp2" and not getattr(accelerator.state.fsdp_plugin, "fsdp_version", 1) == 2:
        raise ValueError("Invalid fsdp_version: 1 (dist-optim trains under FSDP2: set fsdp_version: 2)")
    if cfg.mixed_precision != "no" and not accelerator.native_amp:
        raise ValueError(f"Invalid mixed_precision: {cfg.mixed_precision!r} (accelerate runs no autocast for it on {device.type})")
    model, _ = accelerator.prepare(model, optimizer)  # DDP, and the forward under autocast for bf16
    policy = accelerator.state.fsdp_plugin.mixed_precision_policy if cfg.strategy == "fsdp2" else None
    return model, optimizer, policy


def _fsdp2_by_hand(accelerator, model: torch.nn.Module, optimizer):
    from accelerate.utils import DynamoBackend, FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_apply_ac, fsdp2_prepare_model, fsdp2_switch_optimizer_parameters

    plugin = FullyShardedDataParallelPlugin()  # from the launcher's FSDP_* environment
    if plugin.fsdp_version != 2:
        raise ValueError("Invalid fsdp_version: 1 (dist-optim trains under FSDP2: set fsdp_version: 2)")
    backend = accelerator.state.dynamo_plugin.backend
    if backend != DynamoBackend.NO:
        raise ValueError(f"Invalid dynamo_backend: {backend.value!r} (FSDP2 on the CPU is prepared outside "
                         "Accelerator.prepare, which would compile: set it to 'no' for this route)")
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    accelerator.state.fsdp_plugin = plugin  # where fsdp2_prepare_model looks for it
    # As Accelerator._prepare_fsdp2: activation checkpointing before the swap and the sharding.
    if plugin.activation_checkpointing:
        model = fsdp2_apply_ac(accelerator, model)
    # As Accelerator._prepare_fsdp2: the optimizer holds placeholders carrying the old params'
    # data_ptr, so the swap can find each param's sharded replacement by it.
    names = {p.data_ptr(): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for i, p in enumerate(group["params"]):
            placeholder = torch.empty(1, dtype=p.dtype, device=p.device)
            placeholder.data_ptr = p.data_ptr()
            group["params"][i] = placeholder
    model = fsdp2_prepare_model(accelerator, model)
    sharded = dict(model.named_parameters())
    fsdp2_switch_optimizer_parameters(optimizer, {ptr: sharded[n] for ptr, n in names.items()})
    return model, plugin.mixed_precision_policy
