"""dist-optim under DeepSpeed: every way our optimizer reaches an engine behaves the same.

``import dist_optim`` arranges (at once, or when DeepSpeed is first imported) for DeepSpeed's engine
to know our optimizers, so all of these give the same engine:
- ``deepspeed.initialize(model=..., optimizer=dist_optim.AdamW(...), config=...)``;
- a ds_config ``"optimizer": {"type": "dist_optim.Ranger", "params": {...}}`` (JSON lists become
  tuples; ``dist_optim.Lookahead`` nests ``{"optimizer": {...}, "k": 5, "alpha": 0.5}``);
- accelerate's DeepSpeed plugin (``accelerator.prepare``) and HF-style ``optimizers=(opt, sched)``,
  which call ``deepspeed.initialize`` themselves;
- ``dist_optim.deepspeed.initialize(...)``, which is ``deepspeed.initialize`` after the import.
Our optimizers are marked ZeRO-supported (no ``zero_allow_untested_optimizer``) and accepted with
``offload_optimizer`` (no ``zero_force_ds_cpu_optimizer: false``, unless the config sets it).

One clipping owner, settled once the engine knows its precision wrapper:
- ZeRO-1/2: ours, and DeepSpeed's ``gradient_clipping`` becomes 0. ``DeepSpeedZeroOptimizer`` steps
  ours once per param group, and a group's grads may not exist before its turn, so ours clips and
  skips on the global norm DeepSpeed reduces over every group before the first (under
  ``offload_optimizer``, computed on the device as each grad is copied to the host: no pass over
  the host grads). DeepSpeed itself skips a step whose norm is not finite, on every rank, except
  with bf16 params without ``check_grad_overflow``, where ours does (``"raise"`` is refused where
  DeepSpeed skips first; so is torch autocast in fp16, whose GradScaler scales the grads that norm
  is taken of). On a step that grows the fp16 loss scale, DeepSpeed divides the grads by the new
  scale and the norm by the old one: ours rescales the norm to the grads it is handed. Its
  bf16 + fp32-accumulation wrapper steps ours once: there the update's
  own statistics reduce over the wrapper's data-parallel group (bound after the wrapper swaps in
  its flat partitions);
- ZeRO-0 (replicated params, fp32 or DeepSpeed's fp16/bf16 master copies): ours, statistics local;
- ZeRO-3, which calls ``step()`` once per sub-group so no call sees the global norm: DeepSpeed's.
  ``max_grad_norm`` becomes ``gradient_clipping``; DeepSpeed skips non-finite steps on every rank,
  and the inner optimizer runs with ``nonfinite="apply"`` (``"raise"`` is refused). The padding of
  its sub-group tensors, left uninitialized by DeepSpeed, is zeroed (``zero_partition_padding``:
  int8 blocks span it).

DeepSpeed's per-param optimizer-state accessors (``deepspeed.utils.safe_get_full_optimizer_state``
and its set and local forms) see an int8 moment of ours in fp32, its dequantized values; a set is
quantized back. Left alone they would read the uint8 codes as the moment.
A non-zero ``gradient_clipping`` in the config together with ``max_grad_norm`` is refused; with
neither, DeepSpeed's configuration stands as written (its ``gradient_clipping`` defaults to 1.0).
``engine.load_checkpoint`` keeps the run's clip value (DeepSpeed restores the checkpoint's), and
settings that cannot be served (ours and DeepSpeed both clipping, checks set on ours after
initialize at ZeRO-3) are refused as the engine's step starts.
L-BFGS is refused: the engine's ``step()`` takes no closure.
"""
from __future__ import annotations

import functools
import inspect
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .. import optim as _optim
from ..state.layout import absmax_key, dequantize_state, quantize_state

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
        unknown = sorted(set(inner) - {"type", "params"})
        if unknown:
            raise ValueError(f"Invalid optimizer.params.optimizer key: {unknown[0]!r} (Lookahead's inner optimizer "
                             "takes \"type\" and \"params\"; its settings go in \"params\")")
        inner_type = str(inner.get("type", ""))
        inner["type"] = inner_type if inner_type.startswith(PREFIX) else PREFIX + inner_type
        return _optim.Lookahead(build_from_config(inner, params), **kwargs)
    if name == "lbfgs":
        raise ValueError("Invalid optimizer type: 'dist_optim.LBFGS' cannot run under DeepSpeed (the engine's step() takes no closure)")
    if name not in OPTIMIZERS:
        raise ValueError(f"Invalid optimizer type: {kind!r} (valid: {', '.join(VALID_TYPES)})")
    return OPTIMIZERS[name](params, **kwargs)


def _raw_config(engine: Any) -> dict:
    """The config as the user wrote it (DeepSpeed fills defaults into its parsed form)."""
    return getattr(engine._config, "_param_dict", None) or {}


def settle_clipping(engine: Any, optimizer: Any) -> None:
    """Before the engine builds its wrapper: decide who clips and skips (see the module doc)."""
    if isinstance(optimizer, _optim.LBFGS):
        raise ValueError("Invalid optimizer: LBFGS cannot run under DeepSpeed (the engine's step() takes no closure)")
    base = _optim.fused_core(optimizer)
    if base is None:
        return
    raw = _raw_config(engine)
    ds_clip = raw.get("gradient_clipping")
    if base.max_grad_norm is not None and ds_clip not in (None, 0, 0.0, "auto"):
        raise ValueError(
            f"Invalid gradient_clipping: {ds_clip!r} together with max_grad_norm={base.max_grad_norm!r} "
            "(clip once: drop one of them; a config saying \"auto\" is filled by accelerate or HF Trainer "
            "from their own max_grad_norm, 1.0 by default: set it to 0 there)"
        )
    if engine.zero_optimization_stage() >= 3:
        if base.nonfinite == "raise":
            raise ValueError("Invalid nonfinite: 'raise' under ZeRO-3 (DeepSpeed skips non-finite steps on every rank)")
        if base.max_grad_norm is not None:
            engine._config.gradient_clipping = base.max_grad_norm
            base.max_grad_norm = None
        base.nonfinite = "apply"
    elif base.max_grad_norm is not None:
        engine._config.gradient_clipping = 0.0
    base.expect_binding()


def _norm_of_this_step(wrapper: Any, base: Any) -> None:
    """ZeRO-1/2's ``DeepSpeedZeroOptimizer`` sets ``_global_grad_norm`` (over every group, unscaled)
    before stepping the first group; ours takes it (see the module doc). Installed whether or not
    ours checks grads now: a ``max_grad_norm`` or ``nonfinite`` set after ``deepspeed.initialize``
    must still see the global norm, never one group's. What cannot be served is refused at
    initialize when ours checks grads then, else as the first step that does starts, before
    DeepSpeed has touched anything."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if not isinstance(wrapper, DeepSpeedZeroOptimizer):
        return
    if base._checks_grads():
        _refuse_unserved_checks(wrapper, base)
    scale_at_start = [1.0]
    step = wrapper.step

    def stepping(*args: Any, **kwargs: Any):
        if base._checks_grads():
            _refuse_unserved_checks(wrapper, base)  # the settings may have changed since initialize
        scale_at_start[0] = float(wrapper.loss_scale)
        return step(*args, **kwargs)

    wrapper.step = stepping
    base.use_norm_from(functools.partial(_norm_of_grads_seen, wrapper, scale_at_start))


def _clip_once(engine: Any, wrapper: Any, base: Any, own: bool) -> None:
    """ZeRO-0/1/2: ours and DeepSpeed never both clip, however either was set.
    - ``engine.load_checkpoint``: DeepSpeed's precision wrappers (ZeRO-1/2's, bf16 with fp32
      accumulation) restore their clip value from the checkpoint; the run's own value is kept. Who
      clips is this run's configuration: a checkpoint saved while DeepSpeed clipped would clip a
      second time where ours clips, and one saved while ours clipped (DeepSpeed's value then 0)
      would clip nothing where DeepSpeed clips.
    - Each engine step, before DeepSpeed touches the grads (``_take_model_step``: at ZeRO-0 in fp32
      the engine clips them itself before stepping ours), refuses ours clipping while DeepSpeed's
      clip value (its wrapper's, or the engine's at ZeRO-0 in fp32) is on: ``max_grad_norm`` set on
      ours after initialize, or a clip value set on the wrapper by hand."""
    load = engine.load_checkpoint

    def load_checkpoint(*args: Any, **kwargs: Any):
        before = getattr(wrapper, "clip_grad", None)
        out = load(*args, **kwargs)
        if before is not None:
            wrapper.clip_grad = before
        return out

    engine.load_checkpoint = load_checkpoint
    take_step = engine._take_model_step

    def taking_step(*args: Any, **kwargs: Any):
        clip = engine.gradient_clipping() if own else getattr(wrapper, "clip_grad", 0.0)
        if base.max_grad_norm is not None and clip > 0:  # DeepSpeed clips at > 0 only
            raise ValueError(
                f"Invalid max_grad_norm: {base.max_grad_norm!r} while DeepSpeed clips too (gradient_clipping "
                f"{clip!r}): set max_grad_norm before deepspeed.initialize, which hands clipping to ours "
                "(its gradient_clipping becomes 0), or leave clipping to DeepSpeed"
            )
        return take_step(*args, **kwargs)

    engine._take_model_step = taking_step


def _refuse_unserved_checks(wrapper: Any, base: Any) -> None:
    """ZeRO-1/2 with ours clipping or skipping: the settings under which DeepSpeed's norm is not the
    one ours needs, or DeepSpeed decides first."""
    if getattr(wrapper, "torch_autocast_gradscaler", None) is not None:
        raise ValueError(
            "Invalid torch_autocast: dtype float16 under ZeRO-1/2 with max_grad_norm or nonfinite='skip' "
            "(DeepSpeed's norm is then of the grads its GradScaler scaled, which it unscales only after; "
            "ours would clip by a norm a loss scale too large): use bf16 autocast or DeepSpeed's fp16 "
            "section, or max_grad_norm=None with nonfinite='apply'"
        )
    if base.nonfinite == "raise" and (wrapper.dtype != torch.bfloat16 or wrapper.check_grad_overflow):
        raise ValueError(
            "Invalid nonfinite: 'raise' under ZeRO-1/2 with fp32 or fp16 params, or bf16 with check_grad_overflow "
            "(DeepSpeed skips a step whose norm is not finite on every rank before ours runs); use 'skip'"
        )
    if not getattr(wrapper, "compute_grad_norm", True) and len(wrapper.bit16_groups) > 1:
        raise ValueError(
            f"Invalid zero_optimization.compute_grad_norm: False with {len(wrapper.bit16_groups)} param "
            "groups (DeepSpeed steps each group on its own, so clipping and the non-finite check need "
            "DeepSpeed's norm over all of them); leave it on, or set max_grad_norm=None and "
            "nonfinite='apply'"
        )


def _refuse_checks_after_initialize(wrapper: Any, base: Any) -> None:
    """ZeRO-3 steps ours once per sub-group, and clipping and skipping were handed to DeepSpeed at
    initialize: checks turned on in ours afterwards would decide per sub-group. Refused as the
    engine's step starts."""
    step = wrapper.step

    def stepping(*args: Any, **kwargs: Any):
        if base._checks_grads():
            raise ValueError(
                "Invalid max_grad_norm or nonfinite: set on the optimizer after deepspeed.initialize under ZeRO-3 "
                "(ZeRO-3 steps it once per sub-group, so it cannot see the global norm); set them before "
                "initialize, which hands them to DeepSpeed, or use DeepSpeed's gradient_clipping"
            )
        return step(*args, **kwargs)

    wrapper.step = stepping


def _norm_of_grads_seen(wrapper: Any, scale_at_start: list[float]):
    """The global norm of the grads ours is handed in this step. DeepSpeed divides the norm it
    reduced by the loss scale the loss was scaled with, but the grads by the scale after this
    step's update (twice that on a step that grows it)."""
    norm = wrapper._global_grad_norm
    if norm is None:
        return None
    return norm * (scale_at_start[0] / float(wrapper.loss_scale))


def bind_to_wrapper(engine: Any, optimizer: Any) -> None:
    """After the engine built its wrapper around ours: tell ours which ranks share its params, and
    let the wrapper report our decisions as its own."""
    base = _optim.fused_core(optimizer)
    if base is None:
        return
    wrapper = engine.optimizer
    group = getattr(wrapper, "dp_process_group", None) if wrapper is not optimizer else None
    groups = getattr(wrapper, "real_dp_process_group", [group])
    if any(g is not group for g in groups) and base.max_grad_norm is not None:
        raise ValueError(
            "Invalid optimizer: param groups partitioned over different data-parallel groups (MoE expert "
            "parallelism) need one global norm over several groups; use DeepSpeed's gradient_clipping and "
            "nonfinite='apply' instead of max_grad_norm"
        )
    if base.state_dtype == "int8" and engine.zero_optimization_stage() in (1, 2) and engine.zero_elastic_checkpoint():
        # Elastic checkpoints cut and merge the live state tensors by element, bypassing state_dict():
        # codes would be cut off their blocks' scales and only one rank's scales kept.
        raise ValueError(
            "Invalid zero_optimization.elastic_checkpoint: True with state_dtype='int8' (elastic checkpoints "
            "re-partition the live state element by element, which int8 codes with per-block scales are not); "
            "set it to false, or use fp32 state"
        )
    # ZeRO-0: the params (or DeepSpeed's master copies) are replicas, None; ZeRO-3: unused there
    # (DeepSpeed clips and skips), but true.
    base.bind_params(group)
    if engine.zero_optimization_stage() < 3:
        _report_through(wrapper, base, own=wrapper is optimizer)
        _norm_of_this_step(wrapper, base)
        _clip_once(engine, wrapper, base, own=wrapper is optimizer)
        if base.state_dtype == "int8":  # for the accessors: ZeRO-1/2 params do not know their optimizer
            for p in engine.module.parameters():
                p._dist_optim_core = weakref.ref(base)
    else:
        zero_partition_padding(wrapper)
        _refuse_checks_after_initialize(wrapper, base)


def zero_partition_padding(wrapper: Any) -> None:
    """Zero the padding in ZeRO-3's fp32 sub-group tensors (the tensors ours steps).

    ZeRO-3 pads each param's last partition up to the common partition size and leaves the padding
    as allocated (uninitialized memory: a stray subnormal was seen). It never reaches the model, and
    fp32 state keeps it to itself, but int8 state shares one absmax per block with its neighbours:
    under coupled weight decay (grad + wd * p: Adam, SGD, Adagrad, RMSprop) a NaN or huge value there
    becomes the block's absmax, and the block's real moments turn NaN or round to zero. Its grads
    are zero, so a zero padding stays zero."""
    import torch.distributed as dist

    flats = getattr(wrapper, "fp32_partitioned_groups_flat", None) or []
    for flat, params in zip(flats, getattr(wrapper, "fp16_groups", None) or []):
        if flat.numel() == 0:  # swapped out to NVMe: DeepSpeed holds it elsewhere
            continue
        at = 0
        for p in params:
            size = p.partition_numel()
            held = min(size, max(0, p.ds_numel - dist.get_rank(group=p.ds_process_group) * size))
            if held < size:
                with torch.no_grad():
                    flat[at + held:at + size].zero_()
            at += size


@contextmanager
def _int8_moment_in_fp32(param: Any, key: Any, write: bool) -> Iterator[None]:
    """While one of DeepSpeed's optimizer-state accessors runs on ``param``: if the moment ``key``
    of the tensor holding ``param``'s partition is an int8 moment of ours, DeepSpeed finds its fp32
    values where it looks (ZeRO-3: the state entry it narrows; ZeRO-1/2: the param's fragment view,
    made when DeepSpeed linked the state), and a write is quantized back into codes and absmax."""
    located = _int8_state_of(param, key) if isinstance(key, str) else None
    if located is None:
        yield
        return
    state, put = located
    codes, absmax = state[key], state[absmax_key(key)]
    full = dequantize_state(codes, absmax, key)
    undo = put(full)
    try:
        yield
    finally:
        undo()
        if write:
            new_codes, new_absmax = quantize_state(full, key)
            codes.copy_(new_codes.view_as(codes))
            absmax.copy_(new_absmax)


def _int8_state_of(param: Any, key: str):
    """(state, put): the optimizer state holding ``param``'s partition when ``key`` is int8 there,
    and ``put(fp32)`` that shows DeepSpeed ``fp32`` in the codes' place and returns the undo; else None."""
    z3 = getattr(param, "_z3_optimizer", None)
    if z3 is not None and _optim.fused_core(z3.optimizer) is not None:
        position = z3.grad_position.get(z3.get_param_id(param))  # none for a frozen param
        if position is None:
            return None
        state = z3.optimizer.state.get(z3.fp32_partitioned_groups_flat[position[0]])
        if not state or absmax_key(key) not in state:
            return None

        def put(fp32):
            codes, state[key] = state[key], fp32
            return lambda: state.__setitem__(key, codes)

        return state, put
    core = getattr(param, "_dist_optim_core", None)
    mapping = getattr(param, "_hp_mapping", None)
    base = core() if core is not None else None
    if base is None or mapping is None or mapping.optim_fragment is None:
        return None
    state = base.state.get(base.param_groups[mapping.param_group_index]["params"][0])
    if not state or absmax_key(key) not in state:
        return None
    address = mapping.hp_fragment_address

    def put(fp32):
        fragments = mapping.optim_fragment
        codes_view = fragments.get(key)
        fragments[key] = fp32.narrow(0, address.start, address.numel)
        return lambda: fragments.__setitem__(key, codes_view) if codes_view is not None else fragments.pop(key)

    return state, put


def _serve_int8_moments() -> None:
    """Wrap DeepSpeed's optimizer-state accessors with ``_int8_moment_in_fp32``: where they are
    looked up when called (ZeRO-3's optimizer methods) or bound to each param while the engine is
    built (ZeRO-1/2's linkage), so a ``from deepspeed.utils import safe_get_full_optimizer_state``
    made before ``import dist_optim`` is served too."""
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.utils import mixed_precision_linkage

    for owner, name, write in ((mixed_precision_linkage, "get_full_hp_param", False),
                               (mixed_precision_linkage, "set_full_hp_param", True),
                               (DeepSpeedZeroOptimizer_Stage3, "get_full_hp_param", False),
                               (DeepSpeedZeroOptimizer_Stage3, "get_local_fp32_param", False),
                               (DeepSpeedZeroOptimizer_Stage3, "set_full_hp_param", True),
                               (DeepSpeedZeroOptimizer_Stage3, "set_local_hp_param", True)):
        accessor = getattr(owner, name, None)
        if accessor is not None and not getattr(accessor, "_dist_optim_serves", False):
            setattr(owner, name, _serving(accessor, write))


def _serving(accessor: Any, write: bool) -> Any:
    signature = inspect.signature(accessor)

    @functools.wraps(accessor)
    def serving(*args: Any, **kwargs: Any):
        bound = signature.bind(*args, **kwargs).arguments
        # ZeRO-3's methods take (self=optimizer, ..., param, optim_state_key); the linkage's (self=param, ...)
        param = bound.get("param", bound.get("self"))
        with _int8_moment_in_fp32(param, bound.get("optim_state_key"), write):
            return accessor(*args, **kwargs)

    serving._dist_optim_serves = True
    return serving


def _report_through(wrapper: Any, base: Any, *, own: bool) -> None:
    """The engine reads ``overflow`` and ``_global_grad_norm`` off its wrapper after each step: a step
    we skipped then counts as skipped (no lr-scheduler step, ``engine.skipped_steps``), and
    ``engine.get_global_grad_norm()`` returns our norm where DeepSpeed computed none."""
    wrapper_step = wrapper.step
    # own: ZeRO-0 in fp32, where the engine steps ours directly and no DeepSpeed wrapper resets
    # these attributes at each step.

    def step(*args: Any, **kwargs: Any):
        skipped = base.skipped_steps
        if not own:
            wrapper._global_grad_norm = None  # a norm ours reads is this step's, never a stale one
        out = wrapper_step(*args, **kwargs)
        if base.skipped_steps != skipped:
            base.count_skips_as_one(base.skipped_steps - skipped)  # one skip per group stepped
            wrapper.overflow = True
        elif own:
            wrapper.overflow = False
        if own or getattr(wrapper, "_global_grad_norm", None) is None:
            wrapper._global_grad_norm = base.last_grad_norm
        return out

    wrapper.step = step


def _patch_engine(engine_module: Any) -> None:
    """Teach DeepSpeedEngine our optimizers (idempotent)."""
    engine_cls = engine_module.DeepSpeedEngine
    if getattr(engine_cls, "_dist_optim_patched", False):
        return
    mark_zero_supported()
    _serve_int8_moments()
    is_supported = engine_cls._is_supported_optimizer
    configure_basic = engine_cls._configure_basic_optimizer
    sanity_check = engine_cls._do_optimizer_sanity_check
    configure = engine_cls._configure_optimizer

    def _is_supported_optimizer(self, optimizer_name):
        if isinstance(optimizer_name, str) and optimizer_name.startswith(PREFIX):
            if optimizer_name[len(PREFIX):].lower() not in (*OPTIMIZERS, "lookahead"):
                raise ValueError(f"Invalid optimizer type: {optimizer_name!r} (valid: {', '.join(VALID_TYPES)})")
            return True
        return is_supported(self, optimizer_name)

    def _configure_basic_optimizer(self, model_parameters):
        name = self.optimizer_name()
        if isinstance(name, str) and name.startswith(PREFIX):
            return build_from_config({"type": name, "params": self.optimizer_params() or {}}, model_parameters)
        return configure_basic(self, model_parameters)

    def _do_optimizer_sanity_check(self, basic_optimizer):
        settle_clipping(self, basic_optimizer)
        return sanity_check(self, basic_optimizer)

    def _configure_optimizer(self, client_optimizer, model_parameters):
        # DeepSpeed refuses client optimizers under offload for torch.optim's sake; ours step CPU
        # partitions themselves. A config that sets the flag is obeyed.
        may_offload = "zero_force_ds_cpu_optimizer" not in _raw_config(self)
        if callable(client_optimizer) and not isinstance(client_optimizer, torch.optim.Optimizer):
            factory = client_optimizer

            def client_optimizer(params):  # a callable: DeepSpeed checks what it returns
                built = factory(params)
                if may_offload and _optim.fused_core(built) is not None:
                    self._config.zero_force_ds_cpu_optimizer = False
                return built

        elif may_offload and client_optimizer is not None and _optim.fused_core(client_optimizer) is not None:
            self._config.zero_force_ds_cpu_optimizer = False
        configure(self, client_optimizer, model_parameters)
        bind_to_wrapper(self, self.basic_optimizer)

    engine_cls._is_supported_optimizer = _is_supported_optimizer
    engine_cls._configure_basic_optimizer = _configure_basic_optimizer
    engine_cls._do_optimizer_sanity_check = _do_optimizer_sanity_check
    engine_cls._configure_optimizer = _configure_optimizer
    engine_cls._dist_optim_patched = True


def install() -> None:
    """Patch DeepSpeed's engine now if DeepSpeed is imported, else right after it is."""
    from ._post_import import when_imported

    when_imported("deepspeed.runtime.engine", _patch_engine)


def initialize(**kwargs: Any):
    """``deepspeed.initialize(**kwargs)`` with our optimizers known to the engine (the same as calling
    it after ``import dist_optim``); ``"type": "dist_optim.<Name>"`` works in ``config``."""
    import deepspeed

    install()
    return deepspeed.initialize(**kwargs)


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
