"""dist-optim under DeepSpeed ZeRO: ds_config plug-in, ZeRO support marking, clipping ownership.

    import dist_optim.deepspeed
    engine, optimizer, _, _ = dist_optim.deepspeed.initialize(model=model, config="ds_config.json")

with ``"optimizer": {"type": "dist_optim.Ranger", "params": {"lr": 3e-4, "betas": [0.95, 0.999]}}`` in the
config (JSON lists become tuples), or ``optimizer=dist_optim.AdamW(...)`` as a client optimizer.
Importing this module marks our optimizers as ZeRO-supported, so ``zero_allow_untested_optimizer``
is not needed.

Our optimizers step ZeRO's flat fp32 partitions. Per-param step counters (bias corrections, RAdam's
rho_t, Lookahead's k) advance once per global step, also when ZeRO-3 calls ``step()`` once per
sub-group. Clipping and non-finite steps, never twice:
- ZeRO-1/2 call ``step()`` once per global step on the rank's partitions: our ``max_grad_norm`` and
  ``nonfinite`` work as everywhere (one all-reduce over the data-parallel group, the coefficient
  folded into the update); DeepSpeed's ``gradient_clipping`` is set to 0 and, where DeepSpeed has
  the switch, its own norm computation (``zero_optimization.compute_grad_norm``) is turned off;
- ZeRO-3 calls ``step()`` per sub-group, where no call sees the global norm: ``max_grad_norm``
  becomes DeepSpeed's ``gradient_clipping`` (a global norm over all partitions), and DeepSpeed's own
  check skips non-finite steps on every rank; the inner optimizer runs with ``nonfinite="apply"``.
Giving both ``max_grad_norm`` and a non-zero ``gradient_clipping`` is refused. With neither,
DeepSpeed's configuration stands as written (its ``gradient_clipping`` defaults to 1.0).
L-BFGS is refused: the engine's ``step()`` takes no closure.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .. import optim as _optim

PREFIX = "dist_optim."
OPTIMIZERS: dict[str, type] = {
    cls.__name__.lower(): cls
    for cls in (_optim.SGD, _optim.Adagrad, _optim.RMSprop, _optim.Adam, _optim.AdamW, _optim.RAdam, _optim.Ranger)
}
VALID_TYPES = [PREFIX + cls.__name__ for cls in OPTIMIZERS.values()] + [PREFIX + "Lookahead"]


def mark_zero_supported() -> None:
    """Add our optimizer classes to DeepSpeed's list of ZeRO-supported optimizers."""
    from deepspeed.runtime.zero import utils

    for cls in (*OPTIMIZERS.values(), _optim.Lookahead):
        if cls not in utils.ZERO_SUPPORTED_OPTIMIZERS:
            utils.ZERO_SUPPORTED_OPTIMIZERS.append(cls)


def _tuples(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    return value


def build_from_config(spec: Mapping[str, Any], params: Any):
    """Our optimizer from a ds_config ``"optimizer"`` entry whose type is ``dist_optim.<Name>``.
    ``dist_optim.Lookahead`` takes ``{"optimizer": {"type": ..., "params": ...}, "k": 5, "alpha": 0.5}``."""
    kind = str(spec.get("type", ""))
    name = kind[len(PREFIX):].lower() if kind.startswith(PREFIX) else ""
    kwargs = _tuples(dict(spec.get("params", {})))
    if name == "lookahead":
        inner = dict(kwargs.pop("optimizer", {}))
        inner_type = str(inner.get("type", ""))
        inner["type"] = inner_type if inner_type.startswith(PREFIX) else PREFIX + inner_type
        return _optim.Lookahead(build_from_config(inner, params), **kwargs)
    if name == "lbfgs":
        raise ValueError("Invalid optimizer type: 'dist_optim.LBFGS' cannot run under DeepSpeed (the engine's step() takes no closure)")
    if name not in OPTIMIZERS:
        raise ValueError(f"Invalid optimizer type: {kind!r} (valid: {', '.join(VALID_TYPES)})")
    return OPTIMIZERS[name](params, **kwargs)


def _base(optimizer: Any):
    return optimizer.optimizer if isinstance(optimizer, _optim.Lookahead) else optimizer


def _load_config(config: Any) -> dict:
    if config is None:
        return {}
    if isinstance(config, (str, Path)):
        return json.loads(Path(config).read_text())
    return copy.deepcopy(dict(config))


def prepare(config: Any, optimizer: Any, params: Any) -> tuple[dict, Any]:
    """(the config DeepSpeed should see, our optimizer or the caller's) with the clipping and
    non-finite ownership settled for the ZeRO stage."""
    config = _load_config(config)
    spec = config.get("optimizer")
    if spec is not None and str(spec.get("type", "")).startswith(PREFIX):
        if optimizer is not None:
            raise ValueError("Invalid optimizer: give it in ds_config or as optimizer=, not both")
        optimizer = build_from_config(spec, params)
        del config["optimizer"]
    if isinstance(optimizer, _optim.LBFGS):
        raise ValueError("Invalid optimizer: LBFGS cannot run under DeepSpeed (the engine's step() takes no closure)")
    base = _base(optimizer)
    if not isinstance(base, _optim.FusedOptimizer):
        return config, optimizer
    stage = int(config.get("zero_optimization", {}).get("stage", 0))
    ds_clip = config.get("gradient_clipping")
    if base.max_grad_norm is not None and ds_clip not in (None, 0, 0.0):
        raise ValueError(
            f"Invalid gradient_clipping: {ds_clip!r} together with max_grad_norm={base.max_grad_norm!r} "
            "(clip once: drop one of them)"
        )
    if stage >= 3:
        if base.nonfinite == "raise":
            raise ValueError("Invalid nonfinite: 'raise' under ZeRO-3 (DeepSpeed skips non-finite steps on every rank)")
        if base.max_grad_norm is not None:
            config["gradient_clipping"] = base.max_grad_norm
            base.max_grad_norm = None
        base.nonfinite = "apply"
    elif base.max_grad_norm is not None:
        config["gradient_clipping"] = 0.0
    return config, optimizer


def _skip_deepspeeds_norm(config: dict, optimizer: Any) -> None:
    """When our clipping owns the norm on ZeRO-1/2, DeepSpeed's own global-norm all-reduce (which it
    would compute for nothing) is turned off, where this DeepSpeed version has the switch and the
    user did not set it."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    base = _base(optimizer)
    zero = config.get("zero_optimization", {})
    if (
        isinstance(base, _optim.FusedOptimizer)
        and base.max_grad_norm is not None
        and int(zero.get("stage", 0)) in (1, 2)
        and "compute_grad_norm" in getattr(DeepSpeedZeroConfig, "model_fields", {})
    ):
        config["zero_optimization"] = {**zero, "compute_grad_norm": zero.get("compute_grad_norm", False)}


def initialize(*, model: Any, config: Any = None, optimizer: Any = None, model_parameters: Any = None, **kwargs: Any):
    """``deepspeed.initialize`` that understands ``"type": "dist_optim.<Name>"`` (see the module doc)."""
    import deepspeed

    mark_zero_supported()
    params = model_parameters if model_parameters is not None else [p for p in model.parameters() if p.requires_grad]
    config, optimizer = prepare(config, optimizer, params)
    _skip_deepspeeds_norm(config, optimizer)
    engine, opt, loader, sched = deepspeed.initialize(
        model=model, optimizer=optimizer, model_parameters=params, config=config, **kwargs
    )
    base = _base(optimizer)
    stage = int(config.get("zero_optimization", {}).get("stage", 0))
    if isinstance(base, _optim.FusedOptimizer) and stage in (1, 2) and base.process_group is None:
        # ZeRO-1/2 hand each rank disjoint flat partitions: our grad statistics sum over the
        # data-parallel group (ZeRO-3's were handed to DeepSpeed above; without ZeRO the params
        # are replicated and local statistics are already global).
        base.process_group = opt.dp_process_group
    return engine, opt, loader, sched


def save_checkpoint_atomic(engine: Any, root: str, step: int, *, extra: dict | None = None, keep: int = 2) -> Path:
    """``engine.save_checkpoint`` into the layout of dist_optim.distributed.checkpoint: written under
    a hidden temporary tag, moved into place once every rank has finished, then ``latest`` (which
    DeepSpeed's ``load_checkpoint(root)`` also reads) replaced atomically. A crash mid-save leaves
    the previous checkpoint and ``latest`` as they were."""
    import torch.distributed as dist

    from ..distributed import checkpoint as ckpt

    root_path, tmp, final = ckpt.paths(root, step)
    engine.save_checkpoint(str(root_path), tag=tmp.name, save_latest=False)
    dist.barrier()
    if dist.get_rank() == 0:
        ckpt.commit(root_path, tmp, final, {"step": step, **(extra or {})}, keep)
    dist.barrier()
    return final


def load_checkpoint(engine: Any, path: str) -> dict:
    """Load a checkpoint folder written by ``save_checkpoint_atomic``; returns its ``extra``."""
    from ..distributed.checkpoint import checkpoint_extra

    folder = Path(path)
    engine.load_checkpoint(str(folder.parent), tag=folder.name)
    return checkpoint_extra(folder)
