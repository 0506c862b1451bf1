"""What an external launcher asked for, read the way the launcher itself reads it.

``accelerate launch`` hands its settings to the ranks in environment variables. Under DeepSpeed the
yaml's ``deepspeed_config_file`` is the authority (accelerate sets no ZeRO-stage variable then), so it
is resolved with accelerate's own ``DeepSpeedPlugin`` (its merging of the file with the launcher's
settings, its ``mixed_precision`` handling and its refusals) and then honoured as a whole: ZeRO
stage, optimizer, micro-batch size, accumulation, bf16/fp16, clipping and lr scheduler. A command-line flag that
contradicts the file is refused rather than silently overridden; ``"auto"`` in the file takes the
flag (or the default), as it does under accelerate.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .config import DEFAULT_LR, DS_SCHEDULE, MIXED_PRECISION, TrainConfig

# Values TrainConfig would use for a flag the user did not give.
_DEFAULTS = {f: getattr(TrainConfig, f) for f in ("batch_size", "accum")}
# DeepSpeed's schedulers whose parameters give the lr itself (WarmupCosineLR scales the optimizer's).
_ABSOLUTE_LR_SCHEDULERS = ("WarmupLR", "WarmupDecayLR", "OneCycle", "LRRangeTest")
# What the ZeRO stage means as a strategy; stage 0 (no ZeRO) is not one of ours.
_STAGES = {1: "zero1", 2: "zero2", 3: "zero3"}


def under_accelerate(env: Mapping[str, str]) -> bool:
    """Every one of accelerate's launchers (simple, torchrun-based, DeepSpeed) sets this."""
    return "ACCELERATE_MIXED_PRECISION" in env


def strategy_from_launcher(env: Mapping[str, str]) -> str:
    """The strategy an external launcher asked for, before any config file is read: accelerate's
    FSDP/DeepSpeed settings, else DDP when there are several ranks."""
    if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        return _STAGES.get(int(env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")), "zero2")
    if env.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        if env.get("FSDP_VERSION", "1") != "2":
            raise ValueError("Invalid fsdp_version: 1 (dist-optim trains under FSDP2: set fsdp_version: 2)")
        return "fsdp2"
    return "ddp" if int(env.get("WORLD_SIZE", "1")) > 1 else "single"


def accelerate_values(env: Mapping[str, str], given: dict[str, Any], world: int) -> dict[str, Any]:
    """TrainConfig values for a rank started by ``accelerate launch``: ``given`` (the flags the user
    wrote) completed with what the accelerate config and its DeepSpeed config file say."""
    values = dict(given, launcher="accelerate")
    precision = env.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if precision not in MIXED_PRECISION:
        raise ValueError(f"Invalid mixed_precision: {precision!r} (launch/train.py runs {', '.join(MIXED_PRECISION)})")
    values["mixed_precision"] = precision
    strategy = strategy_from_launcher(env)
    if strategy.startswith("zero"):
        values = _deepspeed_values(env, values, world)
        precision, source = values["mixed_precision"], "the DeepSpeed config, with accelerate's setting, runs"
    else:
        source = "accelerate was launched with"
    if given.get("mixed_precision", precision) != precision:
        raise ValueError(
            f"Invalid mixed_precision: {given['mixed_precision']!r} ({source} mixed_precision {precision!r}; "
            "set it in one place)"
        )
    if strategy.startswith("zero"):
        return values
    if given.get("strategy", strategy) != strategy:
        raise ValueError(f"Invalid strategy: {given['strategy']!r} (the accelerate config asks for {strategy})")
    state_dict_type = env.get("FSDP_STATE_DICT_TYPE", "SHARDED_STATE_DICT")
    if state_dict_type.isdigit():  # accelerate also takes StateDictType's number
        from torch.distributed.fsdp import StateDictType

        state_dict_type = StateDictType(int(state_dict_type)).name
    if strategy == "fsdp2" and state_dict_type.upper() != "SHARDED_STATE_DICT":
        raise ValueError(f"Invalid fsdp_state_dict_type: {state_dict_type!r} (launch/train.py checkpoints FSDP2 "
                         "with torch.distributed.checkpoint, sharded: set SHARDED_STATE_DICT)")
    values["strategy"] = strategy
    return values


def _deepspeed_values(env: Mapping[str, str], values: dict[str, Any], world: int) -> dict[str, Any]:
    import deepspeed  # noqa: F401  (accelerate's plugin needs it; fail here with its own message)
    from accelerate.utils import DeepSpeedPlugin

    source = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    if source != "none" and not Path(source).is_file():
        raise ValueError(
            f"Invalid deepspeed_config_file: {source!r} (no such file from the working directory {os.getcwd()!r})"
        )
    where = f"the DeepSpeed config {source}" if source != "none" else "the accelerate DeepSpeed config"
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the plugin reads the process environment
    try:
        plugin = DeepSpeedPlugin()
        plugin.set_mixed_precision(values["mixed_precision"])
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    config = copy.deepcopy(plugin.deepspeed_config)
    config["steps_per_print"] = 10**9  # the plugin's float("inf") is not JSON a later run could read back

    stage = config.get("zero_optimization", {}).get("stage")
    if stage not in _STAGES:
        raise ValueError(f"Invalid zero_optimization.stage: {stage!r} in {where} (dist-optim trains ZeRO stage 1, 2 or 3)")
    if values.get("strategy", _STAGES[stage]) != _STAGES[stage]:
        raise ValueError(f"Invalid strategy: {values['strategy']!r} ({where} sets ZeRO stage {stage})")
    values["strategy"] = _STAGES[stage]

    # Set true in the yaml and kept by the plugin (which turns it off below ZeRO-3, with a warning).
    if env.get("ACCELERATE_DEEPSPEED_ZERO3_INIT", "").lower() == "true" and plugin.zero3_init_flag:
        raise ValueError("Invalid zero3_init_flag: true (launch/train.py builds its model before DeepSpeed, outside "
                         "deepspeed.zero.Init: set it to false)")

    spec = config.get("optimizer")
    # Whether the lr and the clipping come from the flags (no optimizer section, or "auto" in it).
    lr_from_flags = spec is None or _spec_param(spec, "lr") == "auto"
    clip_from_flags = spec is None or _spec_param(spec, "max_grad_norm") == "auto"
    if spec is not None:
        for flag, fills_auto in (("optimizer", False), ("lr", lr_from_flags), ("max_grad_norm", clip_from_flags)):
            if flag in values and not fills_auto:
                raise ValueError(
                    f"Invalid {flag}: {values[flag]!r} ({where} names the optimizer {spec.get('type')!r}; "
                    "set its parameters there, or write \"auto\" there)"
                )
        # "auto" takes the flag, or the flag's default (an lr unknown for the type stays "auto": refused below)
        lr = values.get("lr", DEFAULT_LR.get(_spec_name(spec)))
        if lr_from_flags and lr is not None:
            _spec_params(spec, "lr")["lr"] = lr
        if clip_from_flags:
            _spec_params(spec, "max_grad_norm")["max_grad_norm"] = values.get("max_grad_norm", TrainConfig.max_grad_norm)
    if "scheduler" in config:
        sets_lr = config["scheduler"].get("type") in _ABSOLUTE_LR_SCHEDULERS
        for flag in ("schedule", "warmup") + (("lr",) if sets_lr and lr_from_flags else ()):
            if flag in values:
                raise ValueError(
                    f"Invalid {flag}: {values[flag]!r} ({where} has a scheduler section, which sets the lr; "
                    "drop the flag or the section)"
                )
        values.update(schedule=DS_SCHEDULE, warmup=0)  # the engine steps the file's scheduler

    total = config.get("train_batch_size")
    if "train_micro_batch_size_per_gpu" not in config and isinstance(total, int):
        # DeepSpeed derives the micro-batch from the total, the accumulation and the world
        accum = config.get("gradient_accumulation_steps", "auto")
        accum = values.get("accum", _DEFAULTS["accum"]) if accum == "auto" else accum
        if total % (accum * world):
            raise ValueError(f"Invalid train_batch_size: {total} in {where} (not a multiple of gradient_accumulation_steps "
                             f"{accum} x world size {world})")
        config["train_micro_batch_size_per_gpu"] = total // (accum * world)
    for key, flag in (("train_micro_batch_size_per_gpu", "batch_size"), ("gradient_accumulation_steps", "accum")):
        written = config.get(key, "auto")
        if written == "auto":
            config[key] = values.get(flag, _DEFAULTS[flag])
        elif flag in values and values[flag] != written:
            raise ValueError(
                f"Invalid {flag}: {values[flag]} ({where} sets {key}={written}; change one of them or write \"auto\" there)"
            )
        values[flag] = int(config[key])
    if config.get("train_batch_size") == "auto":
        config["train_batch_size"] = values["batch_size"] * values["accum"] * world

    clip = config.get("gradient_clipping")
    if spec is None:
        if clip in (None, "auto"):
            # The file says nothing: the flag (default 1.0, 0 for none) clips, in the optimizer built
            # from the flags, and DeepSpeed's own default 1.0 must not clip as well.
            config["gradient_clipping"] = 0.0
        else:
            if "max_grad_norm" in values and (values["max_grad_norm"] or 0.0) != clip:
                raise ValueError(
                    f"Invalid max_grad_norm: {values['max_grad_norm'] or 0} ({where} sets gradient_clipping={clip}; "
                    "change one of them or write \"auto\" there)"
                )
            values["max_grad_norm"] = None  # the file's clipping (or none) stands, done by DeepSpeed
    else:
        ours_clip = _spec_param(spec, "max_grad_norm")
        if clip in (None, "auto"):
            # The named optimizer clips (once, globally) when it has max_grad_norm, and where the flag
            # said no clipping nothing does; otherwise 1.0, accelerate's and DeepSpeed's default.
            config["gradient_clipping"] = 0.0 if ours_clip or clip_from_flags else 1.0
        values["max_grad_norm"] = ours_clip
        values["lr"] = _spec_param(spec, "lr")

    unfilled = [k for k, v in _leaves(config) if v == "auto"]
    if unfilled:
        raise ValueError(f"Invalid {unfilled[0]}: 'auto' in {where} (launch/train.py cannot fill it; write a value)")
    values["mixed_precision"] = (
        "bf16" if config.get("bf16", {}).get("enabled") else "fp16" if config.get("fp16", {}).get("enabled") else "no"
    )
    values["ds_config"] = config
    return values


def _spec_params(spec: Mapping[str, Any], name: str) -> dict[str, Any]:
    """The params of a ds_config optimizer entry that hold ``name``: Lookahead's inner optimizer's
    for a name Lookahead itself does not take."""
    params = spec.get("params", {})
    if name not in params and isinstance(params.get("optimizer"), Mapping):
        return _spec_params(params["optimizer"], name)
    return params


def _spec_param(spec: Mapping[str, Any], name: str) -> Any:
    return _spec_params(spec, name).get(name)


def _spec_name(spec: Mapping[str, Any]) -> str:
    """The (inner, for Lookahead) optimizer's name as DEFAULT_LR spells it: ``dist_optim.AdamW`` -> adamw."""
    inner = spec.get("params", {}).get("optimizer")
    if isinstance(inner, Mapping):
        return _spec_name(inner)
    return str(spec.get("type", "")).removeprefix("dist_optim.").lower()


def _leaves(tree: Mapping[str, Any], prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value
